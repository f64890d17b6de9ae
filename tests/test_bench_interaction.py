"""The anatomy-reading benches: the voxelwise least squares recovers planted maps, and the
tissue agreement tells a reading of the subject from a reading of the population."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_tissue_measurement import agreement  # noqa: E402
from perfkit import voxelwise_least_squares as fit  # noqa: E402


def test_fit_recovers_each_voxels_coefficients() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 5, 3))
    x[..., 0] = 1.0
    coef = rng.standard_normal((5, 3))
    y = np.einsum("nvp,vp->nv", x, coef)
    np.testing.assert_allclose(fit(x, y), coef, atol=1e-10)


def test_a_reading_of_the_population_mean_follows_no_subject() -> None:
    rng = np.random.default_rng(1)
    common = rng.random((6, 6, 6))
    truth = common + 0.1 * rng.standard_normal((8, 6, 6, 6))
    mask = np.ones((6, 6, 6), np.uint8)
    exact = agreement(truth, truth, mask)
    assert exact["r"] > 0.999 and exact["departure_r"] > 0.999
    population = agreement(np.broadcast_to(common, truth.shape) + 0.01 * rng.standard_normal(truth.shape), truth, mask)
    assert population["r"] > 0.9 and abs(population["departure_r"]) < 0.2


def test_the_design_has_the_intercept_the_covariates_and_the_features_inside_the_brain_only() -> None:
    from bench_interaction import design_matrix as design

    rng = np.random.default_rng(2)
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    inside = mask.reshape(-1)
    features = rng.random((12, 3, 4, 4, 4))
    covariates = rng.standard_normal((12, 1))
    x = design(features, covariates, inside)
    assert x.shape == (12, 8, 5) and np.all(x[..., 0] == 1.0)
    assert np.array_equal(x[3, :, 1], np.full(8, covariates[3, 0]))
    assert np.array_equal(x[3, :, 2:], features[3].reshape(3, -1)[:, inside].T)
    coef = rng.standard_normal((8, 5))
    np.testing.assert_allclose(fit(x, np.einsum("nvp,vp->nv", x, coef)), coef, atol=1e-8)
