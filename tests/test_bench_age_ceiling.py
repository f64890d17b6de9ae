"""The age-ceiling benchmark's voxelwise least squares recovers a planted linear effect."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_age_ceiling import fit, regressors  # noqa: E402


def test_fit_separates_the_age_effect_from_the_mri_it_goes_with() -> None:
    rng = np.random.default_rng(0)
    rows, voxels = 40, 6
    decades = rng.uniform(-1.5, 2.0, rows)
    mri = 0.6 - 0.1 * decades[:, None] + 0.05 * rng.standard_normal((rows, voxels))
    per_decade = np.linspace(-0.08, 0.0, voxels)
    pet = 1.0 + per_decade * decades[:, None] + 0.5 * mri
    with_mri = fit(pet, decades, regressors(mri, ["CN"] * rows, ("mri",)))
    np.testing.assert_allclose(with_mri[1], per_decade, atol=1e-8)
    np.testing.assert_allclose(with_mri[2], 0.5, atol=1e-8)
    # Age alone also takes the -0.05 per decade that goes through the MRI.
    age_only = fit(pet, decades, regressors(mri, ["CN"] * rows, ()))
    np.testing.assert_allclose(age_only[1], per_decade - 0.05, atol=0.02)
    dx = regressors(mri, ["CN", "MCI", "AD", "AD"] * 10, ("diagnosis",))
    assert [d.shape for d in dx] == [(rows, 1), (rows, 1)] and dx[1].sum() == 20
