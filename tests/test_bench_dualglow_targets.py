"""The age targets' bench helpers: the regions whose slope misses the swept truth's, and the
bootstrap of the training subjects that tells how much of the miss is the sample's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_dualglow_targets import regions_outside, resampled_sweep_slopes  # noqa: E402


def test_regions_outside_names_the_misses_the_target_counts() -> None:
    age = {"regions": ["a", "b", "c", "d"], "synthetic_per_decade": [-0.02, -0.013, -0.03, 0.01],
           "measured": {"true_per_decade": [-0.02, -0.01, -0.02, 0.0005]}}  # fmt: skip
    # b: 1.3x, c: 1.5x; d's true slope is below the 1e-3 the share leaves out.
    assert regions_outside(age) == {"b": 1.3, "c": 1.5}
    assert regions_outside(age, tolerance=0.4) == {"c": 1.5}


def test_resampled_sweep_slopes_refits_on_each_resample_and_scores_the_fit(capsys: pytest.CaptureFixture[str]) -> None:
    truth = np.array([-0.04, -0.02, -0.01, 0.012])
    subjects = np.arange(10, 40)
    drawn_sets = []

    def slopes_of(drawn: np.ndarray) -> list[float]:
        drawn_sets.append(drawn)
        return (truth * (1 + (drawn.mean() - subjects.mean()) / 10)).tolist()  # moves with the sample

    age = {"regions": ["a", "b", "c", "d"], "synthetic_per_decade": (1.1 * truth).tolist(),
           "measured": {"true_per_decade": truth.tolist()}}  # fmt: skip
    out = resampled_sweep_slopes(slopes_of, subjects, 20, 3, age)
    assert len(drawn_sets) == 20 and all(set(d) <= set(subjects) and len(d) == len(subjects) for d in drawn_sets)
    assert any(len(set(d)) < len(subjects) for d in drawn_sets)  # drawn with replacement
    assert out["replicates"] == len(out["replicate_slopes"]) == 20 and out["seed"] == 3 and out["regions_counted"] == 4
    np.testing.assert_allclose(np.array(out["se_per_decade"]) / np.abs(truth), out["se_per_decade"][0] / 0.04)
    assert "resamples of the 30 training subjects" in capsys.readouterr().out
