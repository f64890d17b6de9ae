from pathlib import Path

import numpy as np

from dualglow_app.report import HtmlReport, MontageRow, line_figure, orthogonal_montage


def test_report_embeds_figures_and_escapes_text(tmp_path: Path) -> None:
    volume = np.zeros((20, 24, 20), dtype=np.float32)
    volume[5:15, 6:18, 5:15] = 1.0
    report = HtmlReport("sub-<01>", banner="SYNTHETIC")
    report.add_table(["metric", "value"], [["PSNR", 24.123456], ["ICC", float("nan")], ["bias", 1.2e-9]])
    report.add_figure(orthogonal_montage([MontageRow("T1w", volume), MontageRow("PET", volume, "hot")]), "montage")
    report.add_figure(line_figure([60, 70], {"precuneus": [1.4, 1.3]}, "age", "SUVR"), "sweep")
    path = report.write(tmp_path / "r.html")
    text = path.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert "sub-&lt;01&gt;" in text and "SYNTHETIC" in text and "24.12" in text
    # A missing value reads n/a, float round-off of a zero reads 0 (not "nan", "1.2e-09").
    assert "<td>n/a</td>" in text and "<td>0</td>" in text and "<td>nan</td>" not in text and "e-09" not in text
