"""The grey-matter spread benchmark reads each native tissue cache's mixture in units of its
CSF-to-WM distance, per reading and source, and summarises a group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_gm_spread import gather, summary  # noqa: E402


def _cache(folder: Path, name: str, reading: str, gm_sd: float) -> None:
    entry = folder / f"{name}-t1w-tissues-{reading}"
    entry.mkdir(parents=True)
    weights = [0.1, 0.3, 0.2, 0.2, 0.2] if reading == "native-pve" else [0.2, 0.4, 0.4]
    mixture = {"weights": weights, "means": [300.0, 700.0, 1000.0], "variances": [900.0, (gm_sd * 700.0) ** 2, 900.0]}
    (entry / "meta.json").write_text(json.dumps({"source": f"/data/{name}_T1w.nii.gz", "reading": reading, "mixture": mixture}))


def test_gather_reads_each_cache_in_units_of_the_csf_to_wm_distance(tmp_path: Path) -> None:
    for k, sd in enumerate((0.04, 0.05, 0.06)):
        _cache(tmp_path, f"sub-00{k}", "native-pve", sd)
    _cache(tmp_path, "sub-000", "native", 0.13)
    (tmp_path / "other-tissues-x").mkdir()
    (tmp_path / "other-tissues-x" / "meta.json").write_text(json.dumps({"source": "x", "reading": "native-fractions"}))
    found = gather(tmp_path)
    assert set(found) == {"native", "native-pve"} and len(found["native-pve"]) == 3
    row = found["native-pve"]["sub-001_T1w.nii.gz"]
    assert row["gm_sd"] == pytest.approx(0.05) and row["gm_position"] == pytest.approx(400 / 700, abs=1e-4)
    assert row["boundary_share"] == pytest.approx(0.4)
    assert "boundary_share" not in found["native"]["sub-000_T1w.nii.gz"]
    overall = summary(found["native-pve"])
    assert overall["n"] == 3 and overall["gm_sd"]["median"] == pytest.approx(0.05)
    assert overall["gm_sd"]["p5"] < 0.05 < overall["gm_sd"]["p95"]
