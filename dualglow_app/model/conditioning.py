"""The conditioning range: what conditions the PET flow stays inside what training produced.

One :class:`ConditioningRange` per level of a :class:`~dualglow_app.model.DualGlow`. After
training, the group level records from the training scans, per level:

- ``latent``: the range of the MRI latents zm_i, per channel;
- ``mu`` / ``log_sigma``: the range of the prior's mean and log-scale (eq. 10), per latent
  position for a model of one fixed size (template-centred), else per channel.

For synthesis, the relation networks then see clamped MRI latents and return clamped priors
(:meth:`DualGlow.conditional_prior`); the likelihood that training optimises (:meth:`DualGlow.nll`)
never uses the range, so training and scoring see the same density. Until it is set the
range is unbounded (every bound infinite) and clamping is the identity.

Why: with the small lambda of eq. 12 the MRI flow is barely pulled towards its prior, so
its latents are not standard normal; a T1w unlike the training scans drives them far
outside anything the relation networks were fitted on, and the PET flow's inverse turns that
into SUVR in the hundreds (a phantom-trained model on Colin27). Clamping only the MRI latents
still left the relation networks' scales far above any seen in training (10 % of brain values
clipped at T = 0.7); clamping the prior too brought that to 0.2 %. See models/MODEL_CARD.md.

The share of MRI latents outside their range (:meth:`ConditioningRange.count_outside`) is
reported per scan: near 0 for scans like the training data, a few percent for a brain the
model does not know.

>>> import torch
>>> level = ConditioningRange(channels=2, ndim=3)
>>> level.is_set
False
>>> level.set_bounds("latent", torch.full((1, 2, 1, 1, 1), -1.0), torch.full((1, 2, 1, 1, 1), 1.0))
>>> level.clamp("latent", torch.full((1, 2, 2, 2, 2), 3.0)).max().item()
1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: The quantities bounded per level: MRI latents, prior mean, prior log-scale.
RANGE_NAMES = ("latent", "mu", "log_sigma")
#: Values within this share of a range's width beyond it count as inside: a training scan's
#: own extremes, recomputed in another batch, can come out a rounding error beyond them.
OUTSIDE_SLACK = 1e-3


class ConditioningRange(nn.Module):
    """Bounds of one level's MRI latents (per channel) and prior (per position or channel).

    ``prior_shape`` is the spatial size of the level's latents for a model of one fixed size;
    None bounds the prior per channel. Bounds are buffers: saved with the weights, never trained.
    """

    def __init__(self, channels: int, ndim: int, prior_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        per_channel = (1, channels, *([1] * ndim))
        prior = per_channel if prior_shape is None else (1, channels, *prior_shape)
        for name, shape in (("latent", per_channel), ("mu", prior), ("log_sigma", prior)):
            self.register_buffer(f"{name}_low", torch.full(shape, -math.inf))
            self.register_buffer(f"{name}_high", torch.full(shape, math.inf))

    def bounds(self, name: str) -> tuple[Tensor, Tensor]:
        """(low, high) of ``name`` (one of :data:`RANGE_NAMES`)."""
        return self.get_buffer(f"{name}_low"), self.get_buffer(f"{name}_high")

    @property
    def is_set(self) -> bool:
        """Whether every bound of this level is finite (set from training scans)."""
        return all(bool(b.isfinite().all()) for name in RANGE_NAMES for b in self.bounds(name))

    def clamp(self, name: str, x: Tensor) -> Tensor:
        """``x`` clamped to the range ``name`` (the identity while unbounded)."""
        low, high = self.bounds(name)
        return torch.clamp(x, min=low.to(x.dtype), max=high.to(x.dtype))

    def count_outside(self, z: Tensor) -> Tensor:
        """Per batch item, how many MRI latents lie outside the range by more than the slack."""
        low, high = self.bounds("latent")
        slack = OUTSIDE_SLACK * (high - low)
        return ((z < low - slack) | (z > high + slack)).flatten(1).sum(1)

    def observed(self, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """The min and max of ``x`` over the batch and every axis the bound is shared along."""
        low = self.bounds(name)[0]
        dims = [d for d in range(x.dim()) if low.shape[d] == 1]
        return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)

    @torch.no_grad()
    def set_bounds(self, name: str, low: Tensor, high: Tensor) -> None:
        """Replace the bounds of ``name``."""
        for target, value in zip(self.bounds(name), (low, high), strict=True):
            target.copy_(value.reshape(target.shape))


class RangeFinder:
    """Accumulates the observed ranges of every level over batches of training scans.

    >>> import torch
    >>> levels = [ConditioningRange(1, 2)]
    >>> finder = RangeFinder(levels)
    >>> finder.observe(0, "latent", torch.tensor([[[[-2.0, 1.0]]]]))
    >>> finder.observe(0, "latent", torch.tensor([[[[0.0, 3.0]]]]))
    >>> [float(b) for b in finder.found[0]["latent"]]
    [-2.0, 3.0]
    """

    def __init__(self, levels: Sequence[ConditioningRange]) -> None:
        self.levels = list(levels)
        self.found: list[dict[str, tuple[Tensor, Tensor]]] = [{} for _ in self.levels]

    def observe(self, level: int, name: str, x: Tensor) -> None:
        low, high = self.levels[level].observed(name, x)
        if name in self.found[level]:
            old_low, old_high = self.found[level][name]
            low, high = torch.minimum(old_low, low), torch.maximum(old_high, high)
        self.found[level][name] = (low, high)

    def apply(self) -> None:
        """Write what was observed into the levels' bounds (all or, with nothing seen, none)."""
        if not all(self.found):
            raise ValueError("set_conditioning_range needs at least one batch of training MRIs.")
        for level, found in zip(self.levels, self.found, strict=True):
            for name, (low, high) in found.items():
                level.set_bounds(name, low, high)


def legacy_state_keys(level_count: int) -> dict[str, str]:
    """Model files of format version 1 stored the range as ``<what>_{low,high}_<level>``
    buffers on the model; the state-dict key each maps to now."""
    old = {"latent": "mri_latent", "mu": "prior_mu", "log_sigma": "prior_log_sigma"}
    return {
        f"{old[name]}_{side}_{i}": f"conditioning_range.{i}.{name}_{side}"
        for i in range(level_count) for name in RANGE_NAMES for side in ("low", "high")
    }  # fmt: skip


__all__ = ["OUTSIDE_SLACK", "RANGE_NAMES", "ConditioningRange", "RangeFinder", "legacy_state_keys"]
