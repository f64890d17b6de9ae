"""Image metrics on cases whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dualglow_app.metrics import DATA_RANGE_SUVR, METRICS, image_metrics, ssim_window


@pytest.fixture
def volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    true = 1.0 + 0.5 * rng.random((16, 18, 14))
    mask = np.zeros(true.shape, bool)
    mask[3:13, 3:15, 3:11] = True
    return true * mask, mask


def test_identical_images_score_perfectly(volume: tuple[np.ndarray, np.ndarray]) -> None:
    true, mask = volume
    scores = image_metrics(true, true.copy(), mask)
    assert list(scores) == list(METRICS)
    assert scores["mae_suvr"] == 0.0
    assert scores["pearson_r"] == pytest.approx(1.0)
    assert scores["psnr_db"] == 100.0
    assert scores["ssim"] == pytest.approx(1.0)


def test_constant_offset_gives_closed_form_mae_and_psnr(volume: tuple[np.ndarray, np.ndarray]) -> None:
    true, mask = volume
    scores = image_metrics(true, true + 0.3 * mask, mask)
    assert scores["mae_suvr"] == pytest.approx(0.3)
    # PSNR = 10 log10(range^2 / MSE) with a fixed range of 3 SUVR.
    assert scores["psnr_db"] == pytest.approx(10 * math.log10(DATA_RANGE_SUVR**2 / 0.09))
    assert scores["pearson_r"] == pytest.approx(1.0)  # an offset does not change correlation
    assert scores["ssim"] < 1.0


def test_only_voxels_inside_the_mask_count(volume: tuple[np.ndarray, np.ndarray]) -> None:
    true, mask = volume
    pred = true.copy()
    pred[~mask] = 5.0  # garbage in the background
    scores = image_metrics(true, pred, mask)
    assert scores["mae_suvr"] == 0.0
    assert scores["ssim"] == pytest.approx(1.0)


def test_anticorrelated_and_noisy_predictions_score_worse(volume: tuple[np.ndarray, np.ndarray]) -> None:
    true, mask = volume
    flipped = (3.0 - true) * mask
    assert image_metrics(true, flipped, mask)["pearson_r"] == pytest.approx(-1.0)
    rng = np.random.default_rng(1)
    small = image_metrics(true, true + rng.normal(0, 0.05, true.shape) * mask, mask)
    large = image_metrics(true, true + rng.normal(0, 0.5, true.shape) * mask, mask)
    assert small["ssim"] > large["ssim"]
    assert small["psnr_db"] > large["psnr_db"]
    assert small["mae_suvr"] < large["mae_suvr"]


def test_constant_prediction_has_undefined_correlation(volume: tuple[np.ndarray, np.ndarray]) -> None:
    true, mask = volume
    assert math.isnan(image_metrics(true, np.full(true.shape, 1.2), mask)["pearson_r"])


def test_bad_inputs_are_refused_with_the_fix() -> None:
    a = np.ones((8, 8, 8))
    with pytest.raises(ValueError, match="same model grid"):
        image_metrics(a, np.ones((8, 8, 7)), a.astype(bool))
    with pytest.raises(ValueError, match="mask is empty"):
        image_metrics(a, a, np.zeros_like(a, bool))


def test_ssim_window_shrinks_to_an_odd_side() -> None:
    assert ssim_window((40, 48, 40)) == 7
    assert ssim_window((20, 6, 20)) == 5
    assert ssim_window((4, 4)) == 3
