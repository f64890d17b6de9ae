"""The one prediction path: a preprocessed T1w in, a synthetic PET in SUVR out.

Every caller uses :func:`predict`: the participant level, the group level's validation each
epoch, the evaluation and the benchmarks. So a validation MAE stored in a model file is
measured exactly as the evaluation and the participant level measure it:

1. the T1w (model grid, [0, 1] in the brain) on the model's scale, with its covariates;
2. the conditional prior p(zp | zm, c) inside the conditioning range
   (:meth:`DualGlow.conditional_prior`) and the share of MRI latents outside that range;
3. ``samples`` draws zp ~ N(mu, T * sigma) (T = 0: the conditional mode) with a generator
   seeded by ``seed``, through the PET flow's inverse;
4. each sample clipped to the model's intensity range (its metadata's
   :class:`~dualglow_app.data.IntensityScaling`: a flow's inverse is unbounded, the training
   data were not), the share clipped in the brain recorded, and the samples masked to the
   brain; their voxelwise mean and, for more than one, standard deviation.

>>> prediction = predict(model, scaling, t1w, mask, {"age": 72.0})  # doctest: +SKIP
>>> prediction.mean.shape == t1w.shape                             # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from dualglow_app.data import IntensityScaling

#: Above this share of clipped in-brain values a T1w is flagged as unlike the training data.
CLIPPED_WARNING = 0.01
#: Above this share of MRI latents outside the training range, likewise.
LATENT_WARNING = 0.01


class Prediction(NamedTuple):
    """What :func:`predict` returns: voxelwise mean and SD (None for one sample) in SUVR on the
    model grid, 0 outside the brain; the share of in-brain sample values that left the model's
    intensity range and were clipped; and the share of the T1w's MRI latents outside the range
    seen in training (None for a model without one)."""

    mean: np.ndarray
    sd: np.ndarray | None
    clipped_fraction: float
    latents_outside: float | None


def scan_seed(seed: int, subject: str, session: str | None) -> int:
    """A 63-bit generator seed from (seed, subject, session): the same scan always draws the
    same noise, and neither its neighbours in the run nor the run order change it.

    >>> scan_seed(0, "01", None) == scan_seed(0, "01", None) != scan_seed(1, "01", None)
    True
    """
    digest = hashlib.sha256(f"dualglow|{seed}|{subject}|{session or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def predict(
    model: Any,
    scaling: IntensityScaling,
    t1w: np.ndarray,
    mask: np.ndarray,
    side: Mapping[str, float] | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int | None = None,
) -> Prediction:
    """Synthetic PET of one preprocessed T1w (see the module docstring).

    ``model`` is a :class:`~dualglow_app.model.DualGlow` in eval mode; ``t1w`` and ``mask``
    are arrays on its grid; ``side`` maps each covariate it was trained with to one value in
    natural units (age in years). ``seed`` seeds the sampling noise (None: torch's global
    generator; irrelevant at T = 0).
    """
    import torch

    device = next(model.parameters()).device
    x = torch.from_numpy(scaling.mri_to_model(t1w))[None, None].to(device)
    side_tensors = None if side is None else {k: torch.tensor([float(v)], device=device) for k, v in side.items()}
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        prior = model.conditional_prior(x, side_tensors)
        drawn = model.sample_prior(prior, temperature=temperature, n=samples, generator=generator)
    latents_outside = float(prior.outside_fraction[0]) if model.has_conditioning_range else None
    brain = np.asarray(mask) > 0
    suvr, outside = scaling.synthetic_pet(drawn[:, 0, 0].float().cpu().numpy())
    clipped = float(outside[:, brain].mean()) if brain.any() else 0.0
    suvr = suvr * brain[None]
    mean = suvr.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = suvr.std(axis=0, ddof=1, dtype=np.float64).astype(np.float32) if samples > 1 else None
    return Prediction(mean, sd, clipped, latents_outside)


__all__ = ["CLIPPED_WARNING", "LATENT_WARNING", "Prediction", "predict", "scan_seed"]
