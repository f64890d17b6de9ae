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
    scores = image_metrics(true, true.copy(), mask, reference=np.full_like(true, float(true.mean())))
    assert list(scores) == list(METRICS)
    assert scores["deviation_r"] == pytest.approx(1.0)
    assert list(image_metrics(true, true.copy(), mask)) == list(METRICS[:-1])  # no reference, no deviation
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


# --------------------------------------------------------------------------- subject-level metrics


def test_deviation_correlation_sees_the_subject_where_image_metrics_do_not() -> None:
    """The population mean scores well on r and SSIM but has no deviation; a prediction that
    departs like the subject has deviation r 1, one that departs the other way -1."""
    from dualglow_app.metrics import deviation_correlation

    rng = np.random.default_rng(0)
    mean_pet = 1.0 + 0.5 * rng.random((12, 12, 12))
    subject = 0.05 * rng.standard_normal((12, 12, 12))
    truth, mask = mean_pet + subject, np.ones((12, 12, 12), bool)
    assert image_metrics(truth, mean_pet, mask)["pearson_r"] > 0.9
    assert image_metrics(truth, mean_pet, mask, reference=mean_pet)["deviation_r"] == 0.0
    assert deviation_correlation(mean_pet + 0.5 * subject, truth, mean_pet, mask) == pytest.approx(1.0)
    assert deviation_correlation(mean_pet - subject, truth, mean_pet, mask) == pytest.approx(-1.0)
    other = mean_pet + 0.05 * rng.standard_normal((12, 12, 12))
    assert abs(deviation_correlation(other, truth, mean_pet, mask)) < 0.15


def test_input_specificity_is_higher_for_a_model_that_ignores_the_input() -> None:
    from dualglow_app.metrics import mean_pairwise_correlation

    rng = np.random.default_rng(1)
    base = rng.random((6, 6, 6))
    masks = np.ones((4, 6, 6, 6), bool)
    truths = np.stack([base + 0.3 * rng.random((6, 6, 6)) for _ in range(4)])
    constant = np.stack([base] * 4)
    assert mean_pairwise_correlation(constant, masks) == pytest.approx(1.0)
    assert mean_pairwise_correlation(truths, masks) < 0.95
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_correlation(truths[:1], masks[:1])


def test_icc_matches_shrout_and_fleiss_and_regional_agreement() -> None:
    from dualglow_app.metrics import bland_altman, icc_2_1, regional_agreement

    # Shrout & Fleiss (1979), Table 2: 6 targets, 4 judges; ICC(2,1) = 0.29.
    ratings = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    assert icc_2_1(ratings) == pytest.approx(0.29, abs=0.005)
    agreement = bland_altman(np.array([1.1, 2.1, 3.1, 4.1]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert agreement["bias"] == pytest.approx(0.1) and agreement["sd"] == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(2)
    true = 1.0 + 0.2 * rng.standard_normal((20, 3))
    good = regional_agreement(true + 0.01 * rng.standard_normal((20, 3)), true)
    flat = regional_agreement(np.tile(true.mean(0), (20, 1)), true)
    assert good["median_icc"] > 0.95 and abs(flat["median_icc"]) < 0.05
    assert flat["median_abs_bias"] < 1e-9 and flat["median_limits_half_width"] > good["median_limits_half_width"]
