"""Image agreement between a true and a synthetic PET, in SUVR, inside the brain.

One definition for the whole package: the training loop's validation scores and the
evaluation's Table 1 both call :func:`image_metrics`, so a number means the same everywhere.

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
#: Keys of :func:`image_metrics`, in table order; lower is better only for MAE.
METRICS: tuple[str, ...] = ("mae_suvr", "pearson_r", "psnr_db", "ssim")
HIGHER_IS_BETTER: dict[str, bool] = {"mae_suvr": False, "pearson_r": True, "psnr_db": True, "ssim": True}
LABELS: dict[str, str] = {"mae_suvr": "MAE (SUVR)", "pearson_r": "correlation", "psnr_db": "PSNR (dB)", "ssim": "SSIM"}


def ssim_window(shape: tuple[int, ...], window: int = SSIM_WINDOW) -> int:
    """The SSIM window actually used on ``shape``: ``window``, or the largest odd side that fits."""
    win = min(window, *shape)
    return win if win % 2 else win - 1


def image_metrics(
    true_suvr: np.ndarray,
    pred_suvr: np.ndarray,
    mask: np.ndarray,
    data_range: float = DATA_RANGE_SUVR,
) -> dict[str, float]:
    """MAE, Pearson r, PSNR and SSIM of ``pred_suvr`` against ``true_suvr`` inside ``mask``.

    All three arrays have the same 3D (or 2D) shape; see the module docstring for the exact
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
    return {"mae_suvr": mae, "pearson_r": r, "psnr_db": min(psnr, PSNR_CAP_DB), "ssim": float(ssim_map[inside].mean())}


__all__ = ["DATA_RANGE_SUVR", "HIGHER_IS_BETTER", "LABELS", "METRICS", "SSIM_WINDOW", "image_metrics", "ssim_window"]
