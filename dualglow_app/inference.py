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
from collections.abc import Mapping, Sequence
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
    tissue_maps: np.ndarray | None = None,
) -> Prediction:
    """Synthetic PET of one preprocessed T1w (see the module docstring).

    ``model`` is a :class:`~dualglow_app.model.DualGlow` in eval mode; ``t1w`` and ``mask``
    are arrays on its grid; ``side`` maps each covariate it was trained with to one value in
    natural units (age in years). ``seed`` seeds the sampling noise (None: torch's global
    generator; irrelevant at T = 0). ``tissue_maps``: the T1w's native tissue maps on the grid,
    (2, *grid), for a model that reads them (:attr:`DualGlow.synthesis_reads_tissue_maps`;
    :func:`dualglow_app.preprocess.tissue_maps_on_grid`), else ignored.
    """
    import torch

    device = next(model.parameters()).device
    x = torch.from_numpy(scaling.mri_to_model(t1w))[None, None].to(device)
    side_tensors = None if side is None else {k: torch.tensor([float(v)], device=device) for k, v in side.items()}
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        prior = model.conditional_prior(x, side_tensors, _tissue_tensor(model, tissue_maps, device))
        drawn = model.sample_prior(prior, temperature=temperature, n=samples, generator=generator)
    latents_outside = float(prior.outside_fraction[0]) if model.has_conditioning_range else None
    brain = np.asarray(mask) > 0
    suvr, outside = scaling.synthetic_pet(drawn[:, 0, 0].float().cpu().numpy())
    clipped = float(outside[:, brain].mean()) if brain.any() else 0.0
    suvr = suvr * brain[None]
    mean = suvr.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = suvr.std(axis=0, ddof=1, dtype=np.float64).astype(np.float32) if samples > 1 else None
    return Prediction(mean, sd, clipped, latents_outside)


def _tissue_tensor(model: Any, tissue_maps: np.ndarray | None, device: Any) -> Any:
    """One scan's tissue maps as the model takes them (a batch of one), where it reads them."""
    import torch

    if tissue_maps is None or not model.synthesis_reads_tissue_maps:
        return None
    return torch.from_numpy(np.array(tissue_maps, np.float32))[None].to(device)  # a copy: memmap rows are read-only


def sweep(
    model: Any,
    scaling: IntensityScaling,
    t1w: np.ndarray,
    mask: np.ndarray,
    side: Mapping[str, float],
    name: str,
    values: Sequence[float],
    samples: int = 1,
    temperature: float = 0.0,
    seed: int | None = None,
    tissue_maps: np.ndarray | None = None,
) -> list[Prediction]:
    """:func:`predict` of the same T1w with covariate ``name`` set to each of ``values`` (as
    the model takes them: natural units, or class indices) and the other covariates as in
    ``side``: counterfactual synthetic PETs of one MRI. The same ``seed`` at every value, so
    the images differ by the covariate alone, not by the sampling noise."""
    if name not in side:
        raise ValueError(f"sweep over {name!r}: the side information has no such covariate ({', '.join(side)})")
    return [predict(model, scaling, t1w, mask, {**side, name: value}, samples, temperature, seed, tissue_maps)
            for value in values]  # fmt: skip


def counterfactual(
    model: Any,
    scaling: IntensityScaling,
    t1w: np.ndarray,
    pet: np.ndarray,
    mask: np.ndarray,
    side: Mapping[str, float],
    new_side: Mapping[str, float],
    tissue_maps: np.ndarray | None = None,
) -> Prediction:
    """A measured PET (SUVR on the model grid) moved from the covariates ``side`` to ``new_side``
    (:meth:`DualGlow.counterfactual`: the subject's residual from the prior is kept, the prior
    moves): "this subject's PET at age 85". Clipped to the model's range and masked like
    :func:`predict`; ``sd`` is None, ``clipped_fraction`` the share of brain values clipped
    (``tissue_maps`` as for :func:`predict`)."""
    import torch

    device = next(model.parameters()).device
    x_mri = torch.from_numpy(scaling.mri_to_model(t1w))[None, None].to(device)
    x_pet = torch.from_numpy(scaling.pet_to_model(pet))[None, None].to(device)

    def tensors(values: Mapping[str, float]) -> dict[str, Any]:
        return {k: torch.tensor([float(v)], device=device) for k, v in values.items()}

    maps = _tissue_tensor(model, tissue_maps, device)
    with torch.no_grad():
        moved = model.counterfactual(x_mri, x_pet, tensors(side), tensors(new_side), maps)
    prior = model.conditional_prior(x_mri, tensors(side), maps) if model.has_conditioning_range else None
    brain = np.asarray(mask) > 0
    suvr, outside = scaling.synthetic_pet(moved[0, 0].float().cpu().numpy())
    clipped = float(outside[brain].mean()) if brain.any() else 0.0
    latents_outside = None if prior is None else float(prior.outside_fraction[0])
    return Prediction((suvr * brain).astype(np.float32), None, clipped, latents_outside)


__all__ = ["CLIPPED_WARNING", "LATENT_WARNING", "Prediction", "counterfactual", "predict", "scan_seed", "sweep"]
