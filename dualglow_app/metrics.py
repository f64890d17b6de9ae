"""Agreement between true and synthetic PET, in SUVR, inside the brain: per image and per subject.

One definition for the whole package: the group level's validation, the evaluation's tables,
the participant report and the benchmarks all call these functions, so a number means the
same everywhere.

Image metrics (:func:`image_metrics`) are dominated by what every brain shares: the mean
training PET alone scores r ~0.97 and SSIM ~0.985 on the phantom cohort. The subject-level
metrics (docs/DESIGN.md, "What works means") see whether a synthesis follows the subject:

- ``deviation_r`` (:func:`deviation_correlation`): Pearson r, inside the brain, between
  (prediction - mean training PET) and (truth - mean training PET); 0 for the mean PET
  (it does not depart at all), 1 for a perfect model;
- input specificity (:func:`mean_pairwise_correlation`): the mean pairwise r between the
  synthetic PETs of different scans, to be read next to the same figure for their true PETs:
  a model that ignores the MRI has the higher one;
- regional agreement (:func:`regional_agreement`): per region, synthetic vs true mean SUVR
  over scans: ICC(2,1) (two-way random effects, absolute agreement, single measure; Shrout &
  Fleiss 1979, McGraw & Wong 1996) and Bland-Altman bias with 95 % limits of agreement
  (bias +- 1.96 SD of the differences; Bland & Altman 1986).

Definitions (``t`` true SUVR, ``p`` predicted SUVR, over the voxels of ``mask``):

- ``mae_suvr``: mean |t - p| (SUVR units).
- ``pearson_r``: Pearson correlation of t and p (NaN when either is constant).
- ``psnr_db``: scikit-image ``peak_signal_noise_ratio`` of the in-mask voxels, with a FIXED
  ``data_range`` (default :data:`DATA_RANGE_SUVR` = 3 SUVR, the model's intensity ceiling),
  not the per-image range, so values compare across subjects and methods. Capped at
  :data:`PSNR_CAP_DB` so an exact copy does not make means infinite.
- ``ssim``: scikit-image ``structural_similarity`` in 3D with a uniform
  :data:`SSIM_WINDOW`-voxel cubic window (smaller, odd, when a side is shorter), the same
  ``data_range``, K1 = 0.01, K2 = 0.03; both volumes are set to 0 outside the mask first
  (background never counts for or against a method), the full SSIM map is computed and
  averaged over the mask.
"""

from __future__ import annotations

import numpy as np

#: PSNR/SSIM data range in SUVR: IntensityScaling's default pet_suvr_max (model scale 0..1 = 0..3 SUVR).
DATA_RANGE_SUVR = 3.0
#: Side of the cubic SSIM window in voxels (scikit-image's default for 2D images).
SSIM_WINDOW = 7
PSNR_CAP_DB = 100.0
#: Keys of :func:`image_metrics` (with a reference), in table order; lower is better only for MAE.
METRICS: tuple[str, ...] = ("mae_suvr", "pearson_r", "psnr_db", "ssim", "deviation_r")
HIGHER_IS_BETTER: dict[str, bool] = {
    "mae_suvr": False, "pearson_r": True, "psnr_db": True, "ssim": True, "deviation_r": True,
}  # fmt: skip
LABELS: dict[str, str] = {
    "mae_suvr": "MAE (SUVR)", "pearson_r": "correlation", "psnr_db": "PSNR (dB)", "ssim": "SSIM",
    "deviation_r": "deviation r",
}  # fmt: skip


def ssim_window(shape: tuple[int, ...], window: int = SSIM_WINDOW) -> int:
    """The SSIM window actually used on ``shape``: ``window``, or the largest odd side that fits."""
    win = min(window, *shape)
    return win if win % 2 else win - 1


def image_metrics(
    true_suvr: np.ndarray,
    pred_suvr: np.ndarray,
    mask: np.ndarray,
    data_range: float = DATA_RANGE_SUVR,
    reference: np.ndarray | None = None,
) -> dict[str, float]:
    """MAE, Pearson r, PSNR and SSIM of ``pred_suvr`` against ``true_suvr`` inside ``mask``,
    and with ``reference`` (the mean training PET, SUVR) the deviation correlation.

    All arrays have the same 3D (or 2D) shape; see the module docstring for the exact
    definitions, data range and window.

    Example:
        >>> t = np.ones((8, 8, 8), np.float32); m = np.ones_like(t, bool)
        >>> image_metrics(t, t + 0.1, m)["mae_suvr"]  # doctest: +ELLIPSIS
        0.1...
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    true_suvr = np.asarray(true_suvr, dtype=np.float64)
    pred_suvr = np.asarray(pred_suvr, dtype=np.float64)
    inside = np.asarray(mask).astype(bool)
    if true_suvr.shape != pred_suvr.shape or true_suvr.shape != inside.shape:
        raise ValueError(
            f"image_metrics: shapes differ (true {true_suvr.shape}, pred {pred_suvr.shape}, mask "
            f"{inside.shape}); resample all three onto the same model grid first."
        )
    if not inside.any():
        raise ValueError("image_metrics: the mask is empty; pass the subject's brain mask.")
    t, p = true_suvr[inside], pred_suvr[inside]
    mae = float(np.abs(t - p).mean())
    if np.ptp(t) > 0 and np.ptp(p) > 0:
        r = float(np.corrcoef(t, p)[0, 1])
    else:
        r = float("nan")
    psnr = PSNR_CAP_DB if np.array_equal(t, p) else float(peak_signal_noise_ratio(t, p, data_range=data_range))
    _, ssim_map = structural_similarity(
        true_suvr * inside, pred_suvr * inside, data_range=data_range,
        win_size=ssim_window(true_suvr.shape), full=True,
    )  # fmt: skip
    scores = {"mae_suvr": mae, "pearson_r": r, "psnr_db": min(psnr, PSNR_CAP_DB), "ssim": float(ssim_map[inside].mean())}
    if reference is not None:
        scores["deviation_r"] = deviation_correlation(pred_suvr, true_suvr, reference, inside)
    return scores


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two flat arrays; NaN when either is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def deviation_correlation(pred: np.ndarray, truth: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Pearson r inside ``mask`` between ``pred - reference`` and ``truth - reference``.

    With the mean training PET as ``reference``: 1 when the prediction departs from the
    population exactly as the subject does, about 0 when its departures are unrelated, and 0
    for the mean PET itself (a prediction that does not depart carries no subject
    information). NaN only when the truth does not depart either.

    >>> truth = np.array([1.0, 2.0, 3.0]); mean = np.array([2.0, 2.0, 2.0]); m = np.ones(3, bool)
    >>> deviation_correlation(truth, truth, mean, m), deviation_correlation(mean, truth, mean, m)
    (1.0, 0.0)
    """
    inside = np.asarray(mask).astype(bool)
    reference = np.asarray(reference, np.float64)[inside]
    pred_dev = np.asarray(pred, np.float64)[inside] - reference
    truth_dev = np.asarray(truth, np.float64)[inside] - reference
    if pred_dev.size and np.ptp(pred_dev) == 0 and np.ptp(truth_dev) > 0:
        return 0.0
    return _pearson(pred_dev, truth_dev)


def mean_pairwise_correlation(volumes: np.ndarray, masks: np.ndarray) -> float:
    """Input specificity: the mean Pearson r over all pairs of ``volumes`` (N, ...), each pair
    inside the intersection of its two masks. Needs N >= 2.

    >>> v = np.stack([np.arange(8.0), np.arange(8.0) ** 2]); m = np.ones((2, 8), bool)
    >>> round(mean_pairwise_correlation(v, m), 3)
    0.962
    """
    volumes, masks = np.asarray(volumes), np.asarray(masks).astype(bool)
    if len(volumes) < 2:
        raise ValueError(f"mean_pairwise_correlation needs at least 2 volumes, got {len(volumes)}")
    values = [
        _pearson(volumes[i][both], volumes[j][both])
        for i in range(len(volumes)) for j in range(i + 1, len(volumes))
        for both in [masks[i] & masks[j]]
    ]  # fmt: skip
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def icc_2_1(ratings: np.ndarray) -> float:
    """ICC(2,1): two-way random effects, absolute agreement, single measure (Shrout & Fleiss
    1979, case 2; McGraw & Wong 1996 ICC(A,1)) of ``ratings`` (n targets, k raters).

    >>> round(icc_2_1(np.array([[1.0, 1.1], [2.0, 2.1], [3.0, 2.9], [4.0, 4.2]])), 3)
    0.995
    """
    x = np.asarray(ratings, np.float64)
    x = x[np.all(np.isfinite(x), axis=1)]
    n, k = x.shape
    if n < 2:
        return float("nan")
    grand = x.mean()
    ms_rows = k * np.sum((x.mean(axis=1) - grand) ** 2) / (n - 1)
    ms_cols = n * np.sum((x.mean(axis=0) - grand) ** 2) / (k - 1)
    residual = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + grand
    ms_error = np.sum(residual**2) / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    return float((ms_rows - ms_error) / denominator) if denominator > 0 else float("nan")


def bland_altman(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Bland-Altman agreement of paired values: bias (mean of pred - truth), the SD of the
    differences and the 95 % limits of agreement (bias +- 1.96 SD)."""
    diff = np.asarray(pred, np.float64) - np.asarray(truth, np.float64)
    diff = diff[np.isfinite(diff)]
    if diff.size < 2:
        return {"bias": float("nan"), "sd": float("nan"), "lower": float("nan"), "upper": float("nan")}
    bias, sd = float(diff.mean()), float(diff.std(ddof=1))
    return {"bias": bias, "sd": sd, "lower": bias - 1.96 * sd, "upper": bias + 1.96 * sd}


def regional_agreement(pred_regions: np.ndarray, true_regions: np.ndarray) -> dict[str, object]:
    """Per region (columns of the (scans, regions) matrices of mean SUVR): ICC(2,1) of synthetic
    vs true over scans and the Bland-Altman bias and limits; and their medians over regions.

    A model that gives every scan the same regional values has an ICC near 0 even with no bias.
    """
    pred, true = np.asarray(pred_regions, np.float64), np.asarray(true_regions, np.float64)
    icc = np.array([icc_2_1(np.stack([true[:, r], pred[:, r]], axis=1)) for r in range(true.shape[1])])
    agreement = [bland_altman(pred[:, r], true[:, r]) for r in range(true.shape[1])]
    bias = np.array([a["bias"] for a in agreement])
    half_width = np.array([a["upper"] - a["bias"] for a in agreement])
    finite = np.isfinite(icc)
    return {
        "icc": icc.tolist(), "bias": bias.tolist(), "limits_half_width": half_width.tolist(),
        "median_icc": float(np.median(icc[finite])) if finite.any() else float("nan"),
        "median_abs_bias": float(np.nanmedian(np.abs(bias))) if np.isfinite(bias).any() else float("nan"),
        "median_limits_half_width": float(np.nanmedian(half_width)) if np.isfinite(half_width).any() else float("nan"),
    }  # fmt: skip


__all__ = [
    "DATA_RANGE_SUVR", "HIGHER_IS_BETTER", "LABELS", "METRICS", "SSIM_WINDOW", "bland_altman", "deviation_correlation",
    "icc_2_1", "image_metrics", "mean_pairwise_correlation", "regional_agreement", "ssim_window",
]  # fmt: skip
