"""Scoring a model on rows of the paired data: what the group level reports every epoch.

Bits per voxel (the two parts of eq. 12) and the image metrics
(:func:`dualglow_app.metrics.image_metrics`) of the prediction the participant level would
make (:func:`dualglow_app.inference.predict`, conditional mode, clipped to the model's range),
so a validation MAE stored in a model file means what the evaluation's MAE means. With the
mean training PET as the reference (:func:`reference_pet`), the deviation correlation too:
whether the prediction departs from the population the way the subject does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dualglow_app.data import IntensityScaling
from dualglow_app.dataset import PairedVolumes, model_batch
from dualglow_app.inference import predict
from dualglow_app.metrics import image_metrics
from dualglow_app.runtime import Distributed

#: What validation reports each epoch.
VALIDATION_METRICS = ("bpd_pet_given_mri", "bpd_mri", "mae_suvr", "psnr_db", "ssim", "deviation_r")


def reference_pet(data: PairedVolumes, rows: np.ndarray, scaling: IntensityScaling) -> np.ndarray:
    """The mean training PET in SUVR over ``rows`` (on the model's clipped scale, as the
    mean-PET baseline predicts it): the reference of the deviation correlation."""
    from dualglow_app.dataset import mean_images

    return scaling.pet_from_model(mean_images(data, rows, scaling)[1][0].numpy())


def validate(
    model: Any, data: PairedVolumes, rows: np.ndarray, scaling: IntensityScaling,
    side_info: Sequence[str] = (), mri_input: bool = True, dist: Distributed | None = None,
    reference: np.ndarray | None = None,
) -> dict[str, float]:  # fmt: skip
    """Validation: bits per voxel (eq. 12 parts) and the image metrics of the conditional mode
    (with ``reference``, the mean training PET in SUVR, also the deviation correlation).

    Deterministic (eval mode: no dequantisation noise; temperature 0), in float32. Each rank
    scores its share of ``rows``; the sums are all-reduced.
    """
    import torch

    dist = dist or Distributed()
    if len(rows) == 0:
        return {}
    model.eval()
    names = [name for name in VALIDATION_METRICS if reference is not None or name != "deviation_r"]
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)
    for row in rows[dist.rank :: dist.world_size]:
        scores = score_scan(model, data, int(row), scaling, side_info, mri_input, reference)
        totals += torch.tensor([scores[name] for name in names] + [1.0], dtype=torch.float64)
    if dist.enabled:
        import torch.distributed as tdist

        device = next(model.parameters()).device
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        on = totals.to(device) if device.type == "cuda" else totals
        tdist.all_reduce(on)
        totals = on.cpu()
    model.train()
    n = max(float(totals[-1]), 1.0)
    return {name: float(totals[i]) / n for i, name in enumerate(names)}


def score_scan(
    model: Any, data: PairedVolumes, row: int, scaling: IntensityScaling,
    side_info: Sequence[str] = (), mri_input: bool = True, reference: np.ndarray | None = None,
) -> dict[str, float]:  # fmt: skip
    """One scan under ``model`` (in eval mode): bits per voxel (eq. 12 parts) and the image
    metrics of its prediction (:func:`dualglow_app.inference.predict`, T = 0) against the true
    PET, in SUVR inside the mask (the deviation correlation against ``reference`` too)."""
    import torch

    device = next(model.parameters()).device
    batch = model_batch(data, np.array([row]), scaling, device, side_info, mri_input)
    with torch.no_grad():
        out = model.nll(*batch)
    side = None if batch.side is None else {k: float(v[0]) for k, v in batch.side.items()}
    t1w = np.asarray(data.mri[row], dtype=np.float32) if mri_input else np.zeros(data.grid.shape, np.float32)
    mask = np.asarray(data.mask[row])
    prediction = predict(model, scaling, t1w, mask, side, tissue_maps=data.row_tissue_maps(row))
    scores = image_metrics(np.asarray(data.pet[row], dtype=np.float32), prediction.mean, mask, scaling.pet_suvr_max,
                           reference)  # fmt: skip
    if "deviation_r" in scores and not np.isfinite(scores["deviation_r"]):
        scores["deviation_r"] = 0.0  # the truth does not depart from the mean: nothing to follow
    return {"bpd_pet_given_mri": float(out["bpd_pet_given_mri"]), "bpd_mri": float(out["bpd_mri"]), **scores}


__all__ = ["VALIDATION_METRICS", "reference_pet", "score_scan", "validate"]
