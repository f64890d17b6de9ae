"""DUAL-GLOW (Sun et al., "DUAL-GLOW: Conditional Flow-Based Generative Model for Modality
Transfer", ICCV 2019): an MRI flow and a PET flow tied at every scale by relation networks.

Equation numbers refer to the paper. Where the paper and the authors' released code differ,
we follow the paper: sigma_i is learned (the code fixed it to 1), and side information is
pushed out of the lower MRI latents through a gradient-reversal layer (the code has none).

Intensities: both images are expected scaled to [0, 1] (callers normalise); a value is one of
``n_bins`` intensity bins, and the likelihood is that of the dequantised image (uniform noise
of one bin width), reported in bits per voxel.

Template centring (our addition, off unless ``DualGlowConfig.template_shape`` is set): each
modality enters its flow minus a per-voxel template, the mean training image, instead of
minus the constant 0.5. A shift has unit Jacobian, so the likelihood is unchanged in meaning;
what changes is the starting point: a new model's conditional mode is the population mean
PET, and training spends its capacity on how each subject departs from it, which is where the
MRI carries information. The group level turns it on (``--template-centring``).

Conditioning range (our addition, :mod:`dualglow_app.model.conditioning`): after training,
the relation networks' inputs (MRI latents) and outputs (the prior) are bounded to what the
training scans produced, for synthesis only (:meth:`DualGlow.conditional_prior`); the
likelihood (:meth:`DualGlow.nll`) never uses it. It keeps a T1w unlike the training data from
driving the PET flow's inverse into nonsense, and the share of MRI latents outside it measures
how unlike the training data a T1w is. The anatomy template's term has a range of its own, set
with its fit, which holds it in the likelihood as well (:meth:`DualGlow.anatomy_term`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualglow_app.log import get_logger
from dualglow_app.model.conditioning import ConditioningRange, RangeFinder
from dualglow_app.model.flows import ActNorm, Glow, conv, gaussian_log_prob, zero_conv
from dualglow_app.tissue import (
    ANATOMY_READINGS,
    MIXTURE_CLASSES,
    NATIVE_READINGS,
    NATIVE_TISSUE_CHANNELS,
    SIDE_TEMPLATE_ANATOMY,
    TISSUE_CLASSES,
)

log = get_logger(__name__)

# Age enters the network as (age - 70) / 10: callers pass years, the model sees roughly unit
# scale over the ADNI range (55-90). Stored per covariate in DualGlowConfig.continuous.
AGE_SCALING: tuple[float, float] = (70.0, 10.0)

SideInput = Mapping[str, Tensor | float | int | Sequence[float] | Sequence[int]]

_T = TypeVar("_T")

#: Choices of DualGlowConfig.top_prior (its comment).
TOP_PRIORS = ("side", "mri+side")
#: Which relation networks take the side information c (DualGlowConfig.side_levels).
SIDE_LEVELS = ("top", "all", "none")


@dataclass
class DualGlowConfig:
    """Everything needed to rebuild a :class:`DualGlow`; travels with the weights as JSON.

    Side information (eq. 16-17) is declared here: ``continuous`` maps a covariate name to
    ``(center, scale)``, so callers pass natural units and the network sees
    ``(value - center) / scale`` (age: ``AGE_SCALING`` = (70, 10), i.e. pass years);
    ``categorical`` maps a name to its number of classes (callers pass class indices
    0..k-1). Both empty means no side information.

    Example:
        >>> cfg = DualGlowConfig(ndim=3, levels=2, depth=4, hidden=32,
        ...                      continuous={"age": AGE_SCALING}, categorical={"sex": 2})
        >>> DualGlowConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    in_channels: int = 1
    ndim: int = 3
    levels: int = 3
    depth: int = 8
    hidden: int = 128
    relation_hidden: int = 64
    # Hidden convolutions of each relation network (eq. 10); the paper's image runs use deep ones.
    relation_layers: int = 2
    coupling_clamp: float = 2.0
    # Bound on |log sigma_i| of the relation networks (soft, via tanh), so the conditional
    # prior can sharpen a lot (sigma >= e^-5) but never collapse to zero or explode.
    log_sigma_bound: float = 5.0
    lambda_mri: float = 1e-3
    n_bins: int = 256
    continuous: dict[str, tuple[float, float]] = field(default_factory=dict)
    categorical: dict[str, int] = field(default_factory=dict)
    side_loss_weight: float = 0.01
    # The top level's PET prior with side information (eq. 16). "side": p(zp_top | c), the
    # paper's (and the authors' code's ``prior_u``): the top MRI latent, which the eq. 17 head
    # keeps c in, is not an input, so the covariates reach the PET through c alone. "mri+side":
    # p(zp_top | zm_top, c), what versions up to 0.1 built (the network could read age from the
    # MRI and ignore c). Without side information the top prior is eq. 10's, on zm_top.
    top_prior: str = "side"
    # The eq. 17 head on the top MRI latent: "keep" (the paper: no GRL, c stays in zm_top) or
    # "remove" (behind a GRL like the lower ones: what the MRI says about c is pushed out, so a
    # "mri+side" top prior must take c from c; the MRI keeps what c does not explain).
    top_mri_side: str = "keep"
    # Output gain of the SidePrior: AdaMax moves each parameter by about the learning rate per
    # step, so a prior read straight off its parameters moves 5e-4 per step at the group
    # level's rates and needs thousands of steps to reach an age effect of a few latent SDs
    # (measured: a flat age sweep after 960 steps at gain 1); the gain lets it move as fast as
    # a relation network's output, a sum over many weights, does (Glow's zero-initialised
    # output layers use a gain for the same reason). Part of the weights' meaning.
    side_prior_gain: float = 10.0
    # Which relation networks take c (eq. 16): "top" (the paper) or "all" levels (ours: a flow
    # spreads an age effect over every scale, measured ~3 % of each level's latent variance
    # on phantom v2, so a prior that sees c at the top alone moves only part of it), or "none":
    # c moves the side template alone (docs/MODEL_EXPERIMENTS.md, finding 17).
    side_levels: str = "top"
    # The PET's centring template moves with the side information: it is T + sum_j c_j B_j,
    # not T alone (a volume-preserving shift before the PET flow, logdet 0). Ours, beyond
    # eq. 16: the flow spreads an age effect over every scale and, with c at the top only, the
    # mode's age sweep moved 2-8 % of the phantom's truth (docs/MODEL_EXPERIMENTS.md); a map
    # per covariate in image space carries it at every scale at once. B starts from a voxelwise
    # least-squares fit of the training PETs on c (:meth:`DualGlow.fit_pet_template`, the
    # data-dependent start ActNorm also uses) and trains with the rest. Needs templates.
    side_template: bool = True
    # The PET's centring template also moves with the subject's anatomy: + sum_s A_s (f_s - mean
    # f_s), f_s the MRI's tissue map (anatomy_tissue) blurred by anatomy_sigmas[s]. Ours: the
    # maps A_s are the anatomy coefficients of the same voxelwise least-squares fit that starts
    # the side template (:meth:`DualGlow.fit_pet_template`), kept instead of discarded, and
    # fixed. A voxelwise linear model of the PET on the grey matter around each voxel followed
    # the held-out subjects of phantom v2 (deviation r 0.77 from 150 training subjects, 0.75
    # from 40) better than the flows had learnt to (0.65; docs/MODEL_EXPERIMENTS.md, finding
    # 23); the flows then model what that linear start leaves. A shift by a function of the
    # conditioning input: logdet 0, a density of the PET given the MRI as before. Needs templates.
    anatomy_template: bool = False
    # The MRI terms of the template's least-squares fit: the tissue map at each voxel (sigma 0)
    # and blurred by these Gaussian sigmas (in voxels). They hold the anatomy fixed when the
    # side template's maps are fitted, and are the anatomy template's features.
    anatomy_sigmas: list[float] = field(default_factory=lambda: [0.0])
    # What those terms are made of: "t1w", the model-scale MRI itself, "gm", its grey-matter
    # posterior under a three-class intensity mixture fitted on the training brains
    # (:meth:`DualGlow.set_tissue_mixture`; dualglow_app.tissue), or "gm+csf", the grey-matter
    # and the CSF posteriors (each at every sigma). The CSF map adds where the grey matter went
    # (sulci and ventricles widen as it is lost): the linear start's held-out deviation r rose
    # from 0.772 to 0.798 (docs/MODEL_EXPERIMENTS.md, finding 24).
    anatomy_tissue: str = "t1w"
    # How the tissue maps are read from the model-scale MRI's intensity with the mixture's class
    # means (ANATOMY_READINGS): "posterior", each class's posterior, or "fractions", each
    # voxel read as a mix of two neighbouring classes, linearly between their means (inside the
    # brain support, the mean training MRI's). A 4 mm voxel mixes its tissues, and its
    # posterior saturates a little way from a class mean where its fraction keeps changing: on
    # a 240-phantom MNI stack the anatomy template's start followed the subject better with
    # fractions (deviation r 0.875 -> 0.893, MAE 0.052 -> 0.049), and through the preprocessing
    # in the reference folds too (0.782 -> 0.798, 0.0704 -> 0.0681), but there the age slopes
    # agreed less with the truth (within +-25 % 0.53 -> 0.37; docs/MODEL_EXPERIMENTS.md,
    # finding 25): a trade, not the default. Or "native": not read from the grid T1w at all but
    # given beside it, each subject's own mixture posteriors of its native-resolution brain
    # warped to the grid (``tissue_maps`` of nll / conditional_prior / sample;
    # dualglow_app.preprocess.tissue_maps_on_grid): in the reference folds the linear start's
    # deviation r rose from 0.782 to 0.869 (finding 25). Or "native-fractions": the same own
    # mixture, each native voxel read as partial-volume fractions (finding 31). Or "native-pve":
    # each native voxel's expected fractions under a partial-volume mixture (tissue.
    # PartialVolumeMixture, finding 32). The native readings need anatomy_tissue "gm" or "gm+csf".
    anatomy_reading: str = "posterior"
    # Spatial size of the per-voxel templates the images are centred on (see the module
    # docstring); None centres on 0.5 as in the paper.
    template_shape: list[int] | None = None

    def __post_init__(self) -> None:
        if self.template_shape is not None:
            self.template_shape = [int(n) for n in self.template_shape]
        self.anatomy_sigmas = [float(v) for v in self.anatomy_sigmas]
        self.continuous = {k: (float(v[0]), float(v[1])) for k, v in self.continuous.items()}
        self.categorical = {k: int(v) for k, v in self.categorical.items()}
        problems = []
        if self.ndim not in (2, 3):
            problems.append(f"ndim={self.ndim} (use 2 or 3)")
        for name in ("in_channels", "levels", "depth", "hidden", "relation_hidden", "relation_layers"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if self.n_bins < 2:
            problems.append(f"n_bins={self.n_bins} (must be >= 2)")
        for name, (_, scale) in self.continuous.items():
            if scale <= 0:
                problems.append(f"continuous[{name!r}] scale={scale} (must be > 0)")
        for name, k in self.categorical.items():
            if k < 2:
                problems.append(f"categorical[{name!r}]={k} classes (must be >= 2)")
        if self.top_prior not in TOP_PRIORS:
            problems.append(f"top_prior={self.top_prior!r} (choose from {list(TOP_PRIORS)})")
        if not self.side_prior_gain > 0:
            problems.append(f"side_prior_gain={self.side_prior_gain} (must be > 0)")
        if self.side_levels not in SIDE_LEVELS:
            problems.append(f"side_levels={self.side_levels!r} (choose from {list(SIDE_LEVELS)})")
        if self.top_mri_side not in ("keep", "remove"):
            problems.append(f"top_mri_side={self.top_mri_side!r} (keep or remove)")
        if not self.anatomy_sigmas or any(not v >= 0 for v in self.anatomy_sigmas):
            problems.append(f"anatomy_sigmas={self.anatomy_sigmas} (one or more Gaussian sigmas in voxels, >= 0)")
        if self.anatomy_tissue not in SIDE_TEMPLATE_ANATOMY:
            problems.append(f"anatomy_tissue={self.anatomy_tissue!r} (choose from {list(SIDE_TEMPLATE_ANATOMY)})")
        if self.anatomy_reading not in ANATOMY_READINGS:
            problems.append(f"anatomy_reading={self.anatomy_reading!r} (choose from {list(ANATOMY_READINGS)})")
        if self.anatomy_template and self.template_shape is None:
            problems.append("anatomy_template=True needs template_shape (the template it moves)")
        if self.anatomy_reading in NATIVE_READINGS and not TISSUE_CLASSES.get(self.anatomy_tissue):
            problems.append(f"anatomy_reading={self.anatomy_reading!r} reads tissue maps: anatomy_tissue='gm' or 'gm+csf', "
                            f"not {self.anatomy_tissue!r}")
        if self.template_shape is not None and (
            len(self.template_shape) != self.ndim or min(self.template_shape) < 1
        ):
            problems.append(f"template_shape={self.template_shape} (one positive size per axis, ndim={self.ndim})")
        overlap = set(self.continuous) & set(self.categorical)
        if overlap:
            problems.append(f"covariates {sorted(overlap)} are both continuous and categorical")
        if problems:
            raise ValueError("invalid DualGlowConfig: " + "; ".join(problems) + ".")

    @property
    def side_names(self) -> list[str]:
        """Covariate names in the order the network sees them: continuous, then categorical."""
        return [*self.continuous, *self.categorical]

    @property
    def n_side(self) -> int:
        """Width of the encoded side vector c (continuous values + one-hot categories)."""
        return len(self.continuous) + sum(self.categorical.values())

    @property
    def anatomy_terms(self) -> int:
        """How many MRI terms the PET template's fit has: each tissue map of ``anatomy_tissue``
        (the T1w counts as one) at each of ``anatomy_sigmas``."""
        return max(len(TISSUE_CLASSES.get(self.anatomy_tissue, ())), 1) * len(self.anatomy_sigmas)

    def side_channels(self, name: str) -> slice:
        """The channels of c that encode covariate ``name`` (one, or one per category)."""
        first = 0
        for other in self.side_names:
            width = 1 if other in self.continuous else self.categorical[other]
            if other == name:
                return slice(first, first + width)
            first += width
        raise KeyError(f"{name!r} is not a covariate of this model (it has {self.side_names})")

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict (tuples become lists)."""
        d = asdict(self)
        d["continuous"] = {k: list(v) for k, v in self.continuous.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DualGlowConfig:
        """Inverse of :meth:`to_dict`; refuses unknown keys rather than dropping them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"DualGlowConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}. "
                "The config was probably written by a newer dualglow: upgrade, or remove those keys."
            )
        d = dict(d)
        # Files written before these fields existed: the MRI + side top prior, and a SidePrior
        # (only in experiments) without a gain; the gain means nothing without a SidePrior.
        d.setdefault("top_prior", "mri+side")
        d.setdefault("side_template", False)
        if d["top_prior"] == "side":
            d.setdefault("side_prior_gain", 1.0)
        return cls(**d)


def _blurred(images: Tensor, sigma: float) -> Tensor:
    """``images`` (N, C, *spatial) under an isotropic Gaussian of ``sigma`` voxels (0: unchanged),
    zero beyond the volume (the brain never reaches the grid's edge): scipy's gaussian_filter
    with mode="constant" (the kernel cut at 4 sigma), as separable convolutions on the images'
    device, since the anatomy template blurs every batch."""
    if sigma <= 0:
        return images
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndim = images.dim() - 2
    out = images.reshape(-1, 1, *images.shape[2:])
    convolve = F.conv3d if ndim == 3 else F.conv2d
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = kernel.numel()
        padding = [0] * ndim
        padding[axis] = radius
        out = convolve(out, kernel.view(1, 1, *shape), padding=tuple(padding))
    return out.reshape(images.shape)


def _tissue_posteriors(images: Tensor, mixture: Tensor) -> Tensor:
    """(classes, *images.shape): each class's posterior under a 1D Gaussian ``mixture`` (rows:
    weight, mean, variance; columns: classes by mean intensity, CSF, GM, WM) at every voxel."""
    weight, mean, variance = (row.to(images).view(-1, *[1] * images.dim()) for row in mixture)
    log_joint = weight.log() - 0.5 * (2 * math.pi * variance).log() - 0.5 * (images[None] - mean) ** 2 / variance
    return torch.softmax(log_joint, dim=0)


def blurred_tissue_maps(tissues: Sequence[Tensor], sigmas: Sequence[float]) -> Tensor:
    """(batch, len(tissues) x len(sigmas), *tissues[0].shape[1:]): each tissue map blurred by
    each Gaussian sigma in voxels (tissue-major): the anatomy template's MRI terms
    (:meth:`DualGlow.anatomy_features`) from whatever reading of the tissues."""
    return torch.stack([_blurred(tissue, sigma) for tissue in tissues for sigma in sigmas], dim=1)


def tissue_fractions(images: Tensor, mixture: Tensor, inside: Tensor) -> Tensor:
    """(classes, *images.shape): CSF, GM and WM fractions of each voxel, read as a mix of the two
    classes whose means (``mixture``'s, CSF < GM < WM) its intensity lies between: from the CSF
    mean to the GM mean the grey matter rises from 0 to 1 and the CSF is the rest, from the GM
    mean to the WM mean it falls to 0 and the white matter is the rest; 0 outside ``inside``."""
    csf_mean, gm_mean, wm_mean = (float(v) for v in mixture[1])
    rising = ((images - csf_mean) / (gm_mean - csf_mean)).clamp(0.0, 1.0)
    falling = ((wm_mean - images) / (wm_mean - gm_mean)).clamp(0.0, 1.0)
    lower = images <= gm_mean
    gm = torch.where(lower, rising, falling)
    csf = torch.where(lower, 1.0 - rising, torch.zeros_like(images))
    return torch.stack([csf, gm, 1.0 - gm - csf]) * inside.to(images)


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def grad_reverse(x: Tensor, weight: float = 1.0) -> Tensor:
    """Identity forward, gradient multiplied by ``-weight`` backward (Ganin & Lempitsky 2015).

    A head trained on ``grad_reverse(z)`` learns to predict c from z, while the flow that
    produced z is pushed to make that impossible: c is removed from z (eq. 16-17).
    """
    return _GradientReversal.apply(x, weight)


class RelationNet(nn.Module):
    """Relation network of one level: zm_i (+ side channels) -> (mu_i, log_sigma_i) of
    p(zp_i | zm_i) = N(mu_i(zm_i), sigma_i(zm_i)) (eq. 9-10). Zero-initialised output, so a
    new model starts from the standard normal prior.
    """

    def __init__(
        self, c_in: int, c_out: int, hidden: int, ndim: int, log_sigma_bound: float, layers: int = 2
    ) -> None:
        super().__init__()
        self.bound = log_sigma_bound
        # ``layers`` hidden convolutions, 3x3x3 and 1x1x1 in turn (2: the original 3 -> 1).
        body: list[nn.Module] = []
        for k in range(layers):
            body += [conv(ndim, c_in if k == 0 else hidden, hidden, 3 if k % 2 == 0 else 1), nn.ReLU()]
        self.net = nn.Sequential(*body, zero_conv(ndim, hidden, 2 * c_out))

    def forward(self, zm: Tensor) -> tuple[Tensor, Tensor]:
        mu, h = self.net(zm).chunk(2, dim=1)
        return mu, self.bound * torch.tanh(h / self.bound)


class SidePrior(nn.Module):
    """The top level's PET prior from the side information alone (eq. 16):
    p(zp_top | c) = N(mu(c), sigma(c)), with (mu, log sigma) = A + sum_j c_j B_j per position
    (per channel for a model without a fixed size).

    Linear in the encoded covariates, as the authors' ``prior_u`` (a linear layer of the
    covariate): a continuous covariate outside the training range extrapolates along the
    trend the model learnt instead of saturating, and a categorical one gets one map per
    class. Zero-initialised: a new model starts from the standard normal prior.
    """

    def __init__(self, n_side: int, channels: int, ndim: int, log_sigma_bound: float,
                 shape: Sequence[int] | None = None, gain: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.bound, self.gain = log_sigma_bound, gain
        spatial = tuple(shape) if shape is not None else (1,) * ndim
        self.base = nn.Parameter(torch.zeros(2 * channels, *spatial))
        self.weight = nn.Parameter(torch.zeros(n_side, 2 * channels, *spatial))

    def forward(self, c: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log sigma) for each row of ``c``, shaped like the latent ``like``."""
        out = self.gain * (self.base + torch.einsum("bn,n...->b...", c.to(self.weight.dtype), self.weight))
        out = out.expand(like.shape[0], -1, *like.shape[2:]) if out.shape[2:] != like.shape[2:] else out
        mu, h = out.chunk(2, dim=1)
        return mu, self.bound * torch.tanh(h / self.bound)


class SideHead(nn.Module):
    """Predicts the side information from a latent: regression outputs, then class logits.

    Outputs are soft-bounded to +-``bound``. Behind a gradient-reversal layer the flow
    *maximises* the head's loss; with unbounded outputs it can do so without limit (blow up
    the latents until the MSE / cross-entropy explodes), which diverged real training runs.
    Bounded outputs cap the adversarial term: at most (bound + |c|)^2 per covariate.
    """

    def __init__(self, c_in: int, n_out: int, hidden: int, ndim: int, bound: float = 4.0) -> None:
        super().__init__()
        self.bound = bound
        self.features = nn.Sequential(conv(ndim, c_in, hidden, 3), nn.ReLU())
        self.out = nn.Linear(hidden, n_out)

    def forward(self, z: Tensor) -> Tensor:
        raw = self.out(self.features(z).flatten(2).mean(2))
        return self.bound * torch.tanh(raw / self.bound)


class ConditionalPrior(NamedTuple):
    """The PET latents' prior given an MRI, per level (coarse to fine as the flow emits them),
    and per scan the share of MRI latents outside the training range (clamped)."""

    mu: list[Tensor]
    log_sigma: list[Tensor]
    outside_fraction: Tensor
    # The encoded side information c (None without): the PET template it moves is part of the prior.
    side: Tensor | None = None
    # The model-scale MRI, where the PET template moves with its anatomy (anatomy_template).
    mri: Tensor | None = None
    # Its native tissue maps, where the anatomy template reads them (DualGlow.synthesis_reads_tissue_maps).
    tissue_maps: Tensor | None = None


class DualGlow(nn.Module):
    """Conditional flow MRI -> PET: flows f_m, f_p and per-level relation networks.

    Memory-saving training (docs/ARCHITECTURE.md, "Memory") is a runtime switch, not part of the config
    (the weights are the same either way): on by default from 16 steps per level, see
    :meth:`set_memory_saving`.

    Example:
        >>> cfg = DualGlowConfig(ndim=3, levels=2, depth=2, hidden=16, relation_hidden=16,
        ...                      continuous={"age": AGE_SCALING})
        >>> model = DualGlow(cfg)
        >>> mri, pet = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
        >>> side = {"age": torch.tensor([63.0, 78.0])}          # years
        >>> out = model.nll(mri, pet, side)
        >>> out["loss"].backward()
        >>> model.sample(mri, side, temperature=0.7, n=3).shape
        torch.Size([3, 2, 1, 8, 8, 8])
    """

    # Buffers (registered in __init__ when the config has a template shape).
    mri_template: Tensor
    pet_template: Tensor
    #: State-dict prefixes that only training uses: eq. 17's heads, which shape the latents
    #: while the flows learn and take no part in synthesis. Model files leave them out
    #: (dualglow_app.weights.save_model); checkpoints keep them.
    TRAINING_ONLY = ("side_keep.", "side_remove.")

    def __init__(self, config: DualGlowConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.flow_mri = Glow(
            cfg.in_channels, cfg.ndim, cfg.levels, cfg.depth, cfg.hidden, cfg.coupling_clamp
        )
        self.flow_pet = Glow(
            cfg.in_channels, cfg.ndim, cfg.levels, cfg.depth, cfg.hidden, cfg.coupling_clamp
        )
        channels = self.flow_mri.latent_channels
        top = len(channels) - 1
        # eq. 16: only the top-level prior sees c; from c alone (SidePrior) or next to zm_top.
        self.side_prior: SidePrior | None = None
        if cfg.n_side and cfg.top_prior == "side":
            top_shape = None if cfg.template_shape is None else [n // 2**cfg.levels for n in cfg.template_shape]
            self.side_prior = SidePrior(cfg.n_side, channels[top], cfg.ndim, cfg.log_sigma_bound, top_shape,
                                        cfg.side_prior_gain)
        self.relations = nn.ModuleList(
            RelationNet(c + (cfg.n_side if self._relation_takes_side(i, top) else 0), c, cfg.relation_hidden, cfg.ndim,
                        cfg.log_sigma_bound, cfg.relation_layers)
            for i, c in enumerate(channels[:top] if self.side_prior is not None else channels)
        )
        if cfg.n_side:
            # eq. 17: heads without GRL on the top latents of both flows keep c in them; heads
            # behind a GRL on the lower MRI latents z'_m push c out of them (top_mri_side="remove":
            # out of the top MRI latent too).
            kept, removed = self._side_head_inputs(channels, channels[top])
            self.side_keep = nn.ModuleList(SideHead(c, cfg.n_side, cfg.relation_hidden, cfg.ndim) for c in kept)
            self.side_remove = nn.ModuleList(SideHead(c, cfg.n_side, cfg.relation_hidden, cfg.ndim) for c in removed)
        # False once loaded from a model file, which leaves the heads out (TRAINING_ONLY): nll
        # is then eq. 12's likelihood alone.
        self.has_side_heads = bool(cfg.n_side)
        if cfg.template_shape is not None:
            shape = (1, cfg.in_channels, *cfg.template_shape)
            # Buffers: saved with the weights, moved with .to(), never trained.
            self.register_buffer("mri_template", torch.full(shape, 0.5))
            self.register_buffer("pet_template", torch.full(shape, 0.5))
        self.pet_side_template: nn.Parameter | None = None
        if cfg.n_side and cfg.side_template and cfg.template_shape is not None:
            # One map per encoded covariate (B_j, see DualGlowConfig.side_template); zero = off.
            self.pet_side_template = nn.Parameter(torch.zeros(cfg.n_side, cfg.in_channels, *cfg.template_shape))
        if self.uses_tissue_mixture:
            # Rows weight, mean, variance of the intensity mixture; columns CSF, GM, WM. Until
            # set_tissue_mixture: a placeholder that makes every voxel half grey matter.
            self.register_buffer("tissue_mixture", torch.tensor([[0.25, 0.5, 0.25], [0.0, 0.5, 1.0], [1.0, 1.0, 1.0]]))
        if cfg.anatomy_template and cfg.template_shape is not None:
            # A_s and mean f_s (DualGlowConfig.anatomy_template); zero maps = off.
            shape = (cfg.anatomy_terms, cfg.in_channels, *cfg.template_shape)
            self.register_buffer("pet_anatomy_maps", torch.zeros(shape))
            self.register_buffer("anatomy_mean", torch.zeros(shape))
            # Per voxel, the range of the anatomy term over the training scans, which holds the
            # term in the likelihood and at synthesis alike (set_anatomy_term_range, right after
            # the fit). Unbounded until set.
            bound = torch.full((2, cfg.in_channels, *cfg.template_shape), math.inf)
            self.register_buffer("anatomy_term_range", bound * torch.tensor([-1.0, 1.0]).view(2, *[1] * (bound.dim() - 1)))
        # The conditioning range (module docstring): unbounded until set_conditioning_range. Level
        # i's latents are 2^(i+1) times coarser than the image; a model of one fixed size
        # (template-centred) bounds its prior per position, any other per channel.
        self.conditioning_range = nn.ModuleList(
            ConditioningRange(
                c, cfg.ndim,
                None if cfg.template_shape is None else [n // 2 ** (i + 1) for n in cfg.template_shape],
            )
            for i, c in enumerate(channels)
        )  # fmt: skip

    @torch.no_grad()
    def set_templates(self, mri: Tensor, pet: Tensor) -> None:
        """Set the centring templates (mean training images on the [0, 1] scale), each
        shaped ``(in_channels, *template_shape)`` or with a leading 1; before training.

        Example:
            >>> model = DualGlow(DualGlowConfig(ndim=3, levels=1, depth=1, hidden=8, template_shape=[4, 4, 4]))
            >>> model.set_templates(torch.full((1, 4, 4, 4), 0.2), torch.full((1, 4, 4, 4), 0.6))
            >>> round(float(model.pet_template.mean()), 3)
            0.6
        """
        if self.config.template_shape is None:
            raise ValueError(
                "this model has no templates; build it with DualGlowConfig(template_shape=[...]) to centre on them."
            )
        for name, value in (("mri_template", mri), ("pet_template", pet)):
            target = self.get_buffer(name)
            value = torch.as_tensor(value, dtype=target.dtype, device=target.device)
            if value.numel() != target.numel():
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}; expected {tuple(target.shape[1:])} "
                    "(the mean training image on the model grid)."
                )
            target.copy_(value.reshape(target.shape))

    @torch.no_grad()
    def set_tissue_mixture(self, weights: Sequence[float], means: Sequence[float], variances: Sequence[float]) -> None:
        """The three-class intensity mixture (CSF, GM, WM in any order; sorted here by mean) that
        ``anatomy_tissue="gm"`` (and ``"gm+csf"``) takes its posteriors from: fitted on the training
        brains (:class:`dualglow_app.tissue.GreyMatterModel`), before :meth:`fit_pet_template`."""
        if not self.uses_tissue_mixture:
            raise ValueError(f"this model's anatomy terms are {self.config.anatomy_tissue!r}, not tissue "
                             "probabilities ('gm', 'gm+csf'): it has no mixture.")  # fmt: skip
        rows = torch.tensor([list(weights), list(means), list(variances)], dtype=torch.float64)
        if rows.shape != (3, 3) or not bool((rows[0] > 0).all() and (rows[2] > 0).all()):
            raise ValueError(f"a tissue mixture is 3 positive weights, 3 means and 3 positive variances; got {rows.tolist()}")
        order = torch.argsort(rows[1])
        self.get_buffer("tissue_mixture").copy_(rows[:, order])

    @property
    def uses_tissue_mixture(self) -> bool:
        """Whether the anatomy terms are tissue posteriors read from the grid T1w with the
        training brains' mixture (``anatomy_tissue`` "gm", "gm+csf", not read natively)."""
        return bool(TISSUE_CLASSES[self.config.anatomy_tissue]) and not self.reads_tissue_maps

    @property
    def reads_tissue_maps(self) -> bool:
        """Whether the template's MRI terms are tissue maps given beside the MRI
        (``anatomy_reading`` one of NATIVE_READINGS): then :meth:`fit_pet_template` needs them, and
        with the anatomy template so do :meth:`nll`, :meth:`conditional_prior` and the rest:
        ``tissue_maps``, (batch, 2, *spatial) in NATIVE_TISSUE_CHANNELS order."""
        return self.config.anatomy_reading in NATIVE_READINGS

    @property
    def native_reading(self) -> str | None:
        """The native reading (NATIVE_READINGS) of the tissue maps this model takes beside the
        MRI, what :func:`dualglow_app.preprocess.tissue_maps_on_grid` must read for it; None
        for a model that takes none."""
        return self.config.anatomy_reading if self.reads_tissue_maps else None

    @property
    def synthesis_reads_tissue_maps(self) -> bool:
        """Whether :meth:`nll`, :meth:`conditional_prior` and what builds on them need
        ``tissue_maps``: a native reading moving the PET's centre (the anatomy template); the
        side template's start alone reads them only in :meth:`fit_pet_template`."""
        return self.reads_tissue_maps and self.config.anatomy_template

    @staticmethod
    def _checked_tissue_maps(x_mri: Tensor, tissue_maps: Tensor | None) -> Tensor:
        """``tissue_maps``, after checking a native-reading model got them, shaped for ``x_mri``."""
        if tissue_maps is None:
            raise ValueError("this model reads the anatomy from native tissue maps: pass tissue_maps, (batch, 2, "
                             "*spatial) grey matter and CSF (dualglow_app.preprocess.tissue_maps_on_grid)")  # fmt: skip
        expected = (x_mri.shape[0], len(NATIVE_TISSUE_CHANNELS), *x_mri.shape[2:])
        if tuple(tissue_maps.shape) != expected:
            raise ValueError(f"tissue_maps has shape {tuple(tissue_maps.shape)}; expected {expected} for these MRIs")
        return tissue_maps

    def anatomy_features(self, x_mri: Tensor, tissue_maps: Tensor | None = None) -> Tensor:
        """The template's MRI terms of each model-scale MRI: (batch, terms, in_channels, *spatial),
        each tissue map of ``anatomy_tissue`` at each of ``anatomy_sigmas`` (tissue-major); with
        a native ``anatomy_reading`` the maps are ``tissue_maps``, not read from ``x_mri``."""
        classes = TISSUE_CLASSES[self.config.anatomy_tissue]
        if not classes:
            tissues = [x_mri]
        elif self.reads_tissue_maps:
            maps = self._checked_tissue_maps(x_mri, tissue_maps).to(x_mri.dtype)
            channels = [NATIVE_TISSUE_CHANNELS.index(MIXTURE_CLASSES[k]) for k in classes]
            tissues = [maps[:, i : i + 1] for i in channels]
        else:
            mixture = self.get_buffer("tissue_mixture")
            if self.config.anatomy_reading == "fractions":
                support = self.get_buffer("mri_template") > 0 if self.config.template_shape is not None else x_mri > 0
                maps = tissue_fractions(x_mri, mixture, support)
            else:
                maps = _tissue_posteriors(x_mri, mixture)
            tissues = [maps[k] for k in classes]
        return blurred_tissue_maps(tissues, self.config.anatomy_sigmas)

    @torch.no_grad()
    def fit_pet_template(self, batches: Iterable[tuple[Tensor, Tensor, SideInput | None]
                                                 | tuple[Tensor, Tensor, SideInput | None, Tensor | None]]) -> None:
        """Start the side template (``DualGlowConfig.side_template``) and the anatomy template
        (``anatomy_template``) from the training pairs: per voxel, least squares of the PET on
        (1, c, the MRI's tissue map around that voxel, :meth:`anatomy_features`) over
        ``(mri, pet, side[, tissue_maps])`` batches (model scale, as :meth:`nll` takes them). The maps B_j are
        the coefficients of c: the covariates' effect with the anatomy held fixed, which is
        what a sweep of one MRI should show. Without the MRI terms they would also take what
        the anatomy says about c (atrophy goes with age): measured on phantom v2, the age-only
        fit's slopes are 1.56x those of the same brains aged with their anatomy fixed, the
        MRI-adjusted fit's 1.22x (docs/MODEL_EXPERIMENTS.md).

        The MRI enters once per ``anatomy_sigmas`` (Gaussian sigmas in voxels; 0 = the voxel's
        own value). A PET voxel sees its neighbourhood through the scanner's resolution, and its
        uptake follows its region's grey matter, so the voxel's own MRI leaves part of what
        atrophy does to the PET to be taken as age: with the MRI at the voxel only, a
        150-subject fit's caudate fell 8.9 %/decade against the swept truth's 2.7 %; adding it
        blurred to a PET's resolution and to a region's scale brought the regional slopes'
        correlation with the truth from 0.60 to 0.82 (docs/MODEL_EXPERIMENTS.md, finding 17).

        The PET template becomes the mean training PET minus B times the mean c (the PET at
        c = 0 for the mean anatomy); the anatomy maps A_s are the coefficients of the MRI terms,
        taken around their training means (so T + B c is still the PET of the mean anatomy).
        Rank-deficient designs (one-hot categories next to the intercept, a covariate that never
        varies, no MRI signal outside the brain) get the minimum-norm solution, and each
        categorical covariate's maps are then centred over its classes
        (:meth:`centre_categorical_maps`)."""
        anatomy_maps = self.get_buffer("pet_anatomy_maps") if self.config.anatomy_template else None
        if self.pet_side_template is None and anatomy_maps is None:
            raise ValueError(
                "this model has no side or anatomy template: build it with template_shape=[...] and side "
                "information with DualGlowConfig(side_template=True), or anatomy_template=True."
            )
        n_side = self.config.n_side if self.pet_side_template is not None else 0
        gram, moments, pet_sum, c_sum, feature_sum, rows = None, None, None, None, None, 0
        for batch in batches:
            mri, pet, side, tissue_maps = (*batch, None)[:4]
            device = self.pet_template.device
            mri, pet = torch.as_tensor(mri).to(device).double(), torch.as_tensor(pet).to(device).double()
            tissue_maps = None if tissue_maps is None else torch.as_tensor(tissue_maps).to(device).double()
            encoded = self._encode_side(side, pet.shape[0], pet)
            if n_side and encoded is None:
                raise ValueError("fit_pet_template needs the covariates of every batch (side=None given).")
            c = encoded[0] if n_side and encoded is not None else pet.new_zeros(pet.shape[0], 0)
            voxels = mri[0].numel()
            features = self.anatomy_features(mri, tissue_maps).flatten(2).transpose(1, 2)  # (batch, voxels, scales)
            # (batch, voxels, 1 + n_side + scales): intercept, covariates, the MRI around each voxel.
            design = torch.cat([pet.new_ones(pet.shape[0], 1), c], dim=1)[:, None, :].expand(-1, voxels, -1)
            design = torch.cat([design, features], dim=2)
            values = pet.flatten(1)
            batch_gram = torch.einsum("nvp,nvq->vpq", design, design)
            batch_moments = torch.einsum("nvp,nv->vp", design, values)
            gram = batch_gram if gram is None else gram + batch_gram
            moments = batch_moments if moments is None else moments + batch_moments
            pet_sum = values.sum(0) if pet_sum is None else pet_sum + values.sum(0)
            c_sum = c.sum(0) if c_sum is None else c_sum + c.sum(0)
            feature_sum = features.sum(0) if feature_sum is None else feature_sum + features.sum(0)
            rows += pet.shape[0]
        if gram is None or moments is None or pet_sum is None or c_sum is None or feature_sum is None:
            raise ValueError("fit_pet_template needs at least one (mri, pet, side) batch of training images.")
        coef = (torch.linalg.pinv(gram) @ moments[..., None])[..., 0]  # (voxels, 1 + n_side + scales)
        maps = coef[:, 1 : 1 + n_side].T  # (n_side, voxels)
        template = pet_sum / rows - (c_sum / rows) @ maps
        self.pet_template.copy_(template.reshape(self.pet_template.shape).to(self.pet_template.dtype))
        if self.pet_side_template is not None:
            self.pet_side_template.copy_(maps.reshape(self.pet_side_template.shape).to(self.pet_side_template.dtype))
            self.centre_categorical_maps(template.reshape(self.pet_template.shape), maps.reshape(self.pet_side_template.shape))
            log.debug("side template fitted on %d pairs: |B| max %.4f", rows, float(self.pet_side_template.detach().abs().max()))
        if anatomy_maps is not None:
            anatomy_maps.copy_(coef[:, 1 + n_side :].T.reshape(anatomy_maps.shape).to(anatomy_maps.dtype))
            mean = self.get_buffer("anatomy_mean")
            mean.copy_((feature_sum / rows).T.reshape(mean.shape).to(mean.dtype))
            log.debug("anatomy template fitted on %d pairs: |A| max %.4f", rows, float(anatomy_maps.abs().max()))

    @torch.no_grad()
    def centre_categorical_maps(self, template: Tensor | None = None, maps: Tensor | None = None) -> None:
        """Centre each categorical covariate's side-template maps over its classes and move their
        mean into the PET template (from ``template`` / ``maps`` in float64 where given, else the
        model's own). Every prediction with one-hot covariates (or class shares summing to 1) is
        unchanged: the split of a class's level between T and its map is arbitrary (the one-hot
        columns sum to the intercept), and the least-squares start's minimum-norm solution put
        +-8564 into both at some voxels of a 150-subject fit, which float32 storage rounds to
        0.002 SUVR (docs/MODEL_EXPERIMENTS.md, finding 24)."""
        if self.pet_side_template is None or not self.config.categorical:
            return
        template = (self.pet_template if template is None else template).double().clone()
        maps = (self.pet_side_template if maps is None else maps).double().clone()
        for name in self.config.categorical:
            block = self.config.side_channels(name)
            mean = maps[block].mean(0)
            maps[block] -= mean
            template += mean
        self.pet_template.copy_(template.to(self.pet_template.dtype))
        self.pet_side_template.copy_(maps.to(self.pet_side_template.dtype))

    def fix_side_template(self, names: Sequence[str]) -> None:
        """Keep the side template's maps of covariates ``names`` where they are (their least-squares
        start) while the rest trains: their gradient is zeroed, so AdaMax never moves them."""
        if self.pet_side_template is None or not names:
            return
        keep = torch.ones(self.config.n_side, *[1] * (self.pet_side_template.dim() - 1))
        for name in names:
            keep[self.config.side_channels(name)] = 0.0
        self.pet_side_template.register_hook(lambda grad: grad * keep.to(grad))

    def anatomy_term(self, x_mri: Tensor, bounded: bool = True, tissue_maps: Tensor | None = None) -> Tensor:
        """sum_s A_s (f_s - mean f_s) of each model-scale MRI (``anatomy_template``): how far its
        anatomy moves the PET's centre, clamped per voxel to the range the training scans gave
        (:meth:`set_anatomy_term_range`; ``bounded=False``: the raw term, to measure that range).

        A brain unlike the training ones cannot push a voxel beyond what they did: a voxel's
        least-squares maps extrapolate where its features never varied in training (a real T1w
        put 1 % of its voxels at the 3 SUVR ceiling; a phantom with larger ventricles than any
        training one got a term of 8 on the [0, 1] scale from the CSF maps). In the likelihood
        too: there the unclamped term made that validation subject's bpd grow without bound as
        the flows sharpened (docs/MODEL_EXPERIMENTS.md, finding 24). A clamp of a function of
        the MRI is still a shift by a function of the conditioning input (logdet 0)."""
        departure = self.anatomy_features(x_mri, tissue_maps) - self.get_buffer("anatomy_mean").to(x_mri.dtype)
        term = (departure * self.get_buffer("pet_anatomy_maps").to(x_mri.dtype)).sum(1)
        if bounded:
            low, high = self.get_buffer("anatomy_term_range").to(x_mri.dtype)
            term = torch.minimum(torch.maximum(term, low), high)
        return term

    @torch.no_grad()
    def set_anatomy_term_range(self, mri_batches: Iterable[Tensor | tuple[Tensor, Tensor | None]]) -> None:
        """Per voxel, the minimum and maximum of the raw anatomy term over these model-scale MRIs
        (the training scans; ``(mri, tissue_maps)`` pairs for a model that reads them): the range
        :meth:`anatomy_term` holds it to. Right after :meth:`fit_pet_template` (the maps are
        fixed from then on, so the range is final)."""
        low = high = None
        like = self.get_buffer("pet_template")
        for batch in mri_batches:
            x_mri, tissue_maps = batch if isinstance(batch, tuple) else (batch, None)
            term = self.anatomy_term(torch.as_tensor(x_mri).to(like), bounded=False,
                                     tissue_maps=None if tissue_maps is None else torch.as_tensor(tissue_maps).to(like))  # fmt: skip
            low = term.amin(0) if low is None else torch.minimum(low, term.amin(0))
            high = term.amax(0) if high is None else torch.maximum(high, term.amax(0))
        if low is None or high is None:
            raise ValueError("set_anatomy_term_range needs at least one batch of training MRIs.")
        self.get_buffer("anatomy_term_range").copy_(torch.stack([low, high]))

    def _center(self, x: Tensor, modality: str, c: Tensor | None = None, x_mri: Tensor | None = None,
                tissue_maps: Tensor | None = None) -> Tensor | float:  # fmt: skip
        """What an image is centred on before its flow: its template (for the PET, moved by the
        side information ``c`` where the model has a side template, and by the anatomy of the
        model-scale MRI ``x_mri`` (or its ``tissue_maps``, :attr:`synthesis_reads_tissue_maps`) where it
        has an anatomy template, held to its training range; without ``x_mri``, the training
        scans' mean anatomy), or 0.5."""
        if self.config.template_shape is None:
            return 0.5
        template = self.get_buffer(f"{modality}_template")
        if modality != "pet":
            return template.to(x.dtype)
        # In float32 whatever autocast says: the anatomy maps of the blurred tissue maps are
        # large and of opposite signs (the scales are collinear), so the blur and the einsum in
        # bf16 moved a trained model's centre by up to 0.4 SUVR, 30 dequantisation bins; on a
        # GPU its bf16 training then drifted away from the least-squares start that fp32 keeps
        # (docs/MODEL_EXPERIMENTS.md, finding 25).
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            centre = template.to(dtype)
            if self.pet_side_template is not None and c is not None:
                centre = centre + torch.einsum("bn,n...->b...", c.to(dtype), self.pet_side_template.to(dtype))
            if self.config.anatomy_template and x_mri is not None:
                centre = centre + self.anatomy_term(x_mri.to(dtype), tissue_maps=tissue_maps)
        return centre

    @torch.no_grad()
    def set_conditioning_range(self, batches: Iterable[tuple[Tensor, SideInput | None]]) -> None:
        """Set the conditioning range (:mod:`dualglow_app.model.conditioning`) from ``batches``
        of training scans, each ``(x_mri, side)`` as for :meth:`nll`: per level, the minimum and
        maximum of the MRI latents per channel and of the prior's mean and log-scale per position
        (per channel for a model without a fixed size). After training; replaces any earlier
        range. (The anatomy template's term has its own range, set with its fit:
        :meth:`set_anatomy_term_range`.)

        Example:
            >>> model = DualGlow(DualGlowConfig(ndim=2, levels=1, depth=1, hidden=8))
            >>> model.set_conditioning_range([(torch.rand(2, 1, 8, 8), None)])
            >>> model.has_conditioning_range
            True
        """
        was_training = self.training
        self.eval()
        finder = RangeFinder(self.ranges)
        for x_mri, side in batches:
            zm, c = self._mri_latents(x_mri, side)
            for i, z in enumerate(zm):
                mu, log_sigma = self._relation(i, z, c)
                for name, value in (("latent", z), ("mu", mu), ("log_sigma", log_sigma)):
                    finder.observe(i, name, value)
        self.train(was_training)
        finder.apply()

    @property
    def has_conditioning_range(self) -> bool:
        """Whether :meth:`set_conditioning_range` has bounded every level."""
        return all(level.is_set for level in self.ranges)

    @property
    def ranges(self) -> list[ConditioningRange]:
        """The conditioning range of each level, coarse to fine as the flow emits latents."""
        return cast(list[ConditioningRange], list(self.conditioning_range))

    @property
    def memory_saving(self) -> bool:
        """Whether both flows backpropagate by reconstruction instead of stored activations."""
        return self.flow_mri.memory_saving and self.flow_pet.memory_saving

    def set_memory_saving(self, enabled: bool | None = True, tolerance: float | None = None) -> None:
        """Memory-saving backprop for both flows: ``True``/``False``, or ``None`` for the
        default rule (on from ``memory.AUTO_MIN_DEPTH`` = 16 steps per level).

        Activation memory of a training step then stops growing with depth, for ~1.3x step
        time; gradients match plain autograd up to reconstruction error, which is checked
        every backward against ``tolerance`` (relative; a warning is logged above it).

        Example:
            >>> model = DualGlow(DualGlowConfig(ndim=3, levels=2, depth=2, hidden=8))
            >>> model.set_memory_saving(True)
            >>> model.memory_saving
            True
        """
        self.flow_mri.set_memory_saving(enabled, tolerance)
        self.flow_pet.set_memory_saving(enabled, tolerance)

    # -- boundary checks -------------------------------------------------------------------

    def _check_image(self, x: Tensor, name: str) -> None:
        cfg = self.config
        expected = f"(batch, {cfg.in_channels}, " + ", ".join(["size"] * cfg.ndim) + ")"
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{name} is a {type(x).__name__}; expected a torch.Tensor shaped {expected}."
            )
        if x.dim() != 2 + cfg.ndim:
            hint = " Add the channel axis with x.unsqueeze(1)." if x.dim() == 1 + cfg.ndim else ""
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; this model (ndim={cfg.ndim}) expects {expected}.{hint}"
            )
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"{name} has {x.shape[1]} channels (shape {tuple(x.shape)}); this model expects "
                f"in_channels={cfg.in_channels}: pass {expected}."
            )
        factor = 2**cfg.levels
        spatial = tuple(x.shape[2:])
        if cfg.template_shape is not None and list(spatial) != cfg.template_shape:
            raise ValueError(
                f"{name} has spatial size {spatial}; this model is centred on templates of size "
                f"{tuple(cfg.template_shape)}: resample the image onto the model's grid."
            )
        if any(s % factor for s in spatial):
            fixed = tuple(max(factor, round(s / factor) * factor) for s in spatial)
            raise ValueError(
                f"{name} has spatial size {spatial}; with levels={cfg.levels} every size must be "
                f"divisible by 2**{cfg.levels}={factor}: pad or crop to e.g. {fixed}."
            )

    def _encode_side(
        self, side: SideInput | None, batch: int, like: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor]] | None:
        """-> (c, continuous targets (B, n_cont), categorical targets [(B,) long]) or None."""
        cfg = self.config
        if not cfg.n_side:
            if side:
                raise ValueError(
                    f"side={sorted(side)} was passed, but this model was built without side "
                    "information: pass side=None, or build it with DualGlowConfig(continuous=..., categorical=...)."
                )
            return None
        example = ", ".join(f"{k!r}: ..." for k in cfg.side_names)
        if side is None:
            raise ValueError(
                f"this model was built with side information {cfg.side_names}; pass side={{{example}}} "
                f"(continuous in natural units, e.g. age in years; categorical as class indices)."
            )
        missing, unknown = (
            sorted(set(cfg.side_names) - set(side)),
            sorted(set(side) - set(cfg.side_names)),
        )
        if missing or unknown:
            raise ValueError(
                f"side has keys {sorted(side)} (missing {missing}, unknown {unknown}); this model "
                f"expects exactly {cfg.side_names}: pass side={{{example}}}."
            )

        def values(name: str, dtype: torch.dtype) -> Tensor:
            v = torch.as_tensor(side[name], device=like.device)
            v = v.expand(batch) if v.dim() == 0 else v
            if v.shape != (batch,):
                raise ValueError(
                    f"side[{name!r}] has shape {tuple(v.shape)}; expected a scalar or shape ({batch},), one value per image."
                )
            return v.to(dtype)

        cont = [
            (values(name, like.dtype) - center) / scale
            for name, (center, scale) in cfg.continuous.items()
        ]
        cont_t = torch.stack(cont, dim=1) if cont else like.new_zeros(batch, 0)
        cats, onehots = [], []
        for name, k in cfg.categorical.items():
            raw = values(name, like.dtype)
            idx = raw.round().long()
            if (raw != idx).any() or (idx < 0).any() or (idx >= k).any():
                raise ValueError(
                    f"side[{name!r}] = {raw.tolist()}; expected class indices 0..{k - 1} (map labels to integers first)."
                )
            cats.append(idx)
            onehots.append(F.one_hot(idx, k).to(like.dtype))
        return torch.cat([cont_t, *onehots], dim=1), cont_t, cats

    # -- likelihood ------------------------------------------------------------------------

    def _dequantize(self, x: Tensor, noise: bool, modality: str, c: Tensor | None = None,
                    x_mri: Tensor | None = None, tissue_maps: Tensor | None = None) -> Tensor:  # fmt: skip
        """[0, 1] intensities -> continuous values centred on 0 (or on the template), plus up
        to one bin of noise."""
        u = torch.rand_like(x) if noise else torch.full_like(x, 0.5)
        return x + u / self.config.n_bins - self._center(x, modality, c, x_mri, tissue_maps)

    def _quantize_back(self, y: Tensor, modality: str, c: Tensor | None = None, x_mri: Tensor | None = None,
                       tissue_maps: Tensor | None = None) -> Tensor:  # fmt: skip
        return y + self._center(y, modality, c, x_mri, tissue_maps) - 0.5 / self.config.n_bins

    def _side_head_inputs(self, mri: Sequence[_T], pet_top: _T) -> tuple[list[_T], list[_T]]:
        """What the eq. 17 heads see, given the MRI's per-level items (latents, or their channel
        counts when building the heads) and the PET's top one: (kept in: the top latents of
        both flows; pushed out through the GRL: the lower MRI latents), with
        ``top_mri_side="remove"`` the top MRI latent moved to the second list."""
        if self.config.top_mri_side == "keep":
            return [mri[-1], pet_top], list(mri[:-1])
        return [pet_top], list(mri)

    def _relation_takes_side(self, i: int, top: int) -> bool:
        """Whether level ``i``'s relation network (of ``top + 1`` levels) takes c (``side_levels``)."""
        return self.config.side_levels == "all" or (self.config.side_levels == "top" and i == top)

    def _from_side_prior(self, i: int) -> bool:
        """Whether level ``i``'s PET prior is the :class:`SidePrior` (of c alone)."""
        return self.side_prior is not None and i == len(self.conditioning_range) - 1

    def _relation(self, i: int, zm: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        """(mu_i, log sigma_i) of p(zp_i | zm_i[, c]) (eq. 10, 16): the density training fits;
        at the top with a :class:`SidePrior`, of p(zp_top | c) (``zm`` gives only the shape)."""
        if self._from_side_prior(i):
            assert c is not None and self.side_prior is not None
            return self.side_prior(c, zm)
        if c is not None and self._relation_takes_side(i, len(self.conditioning_range) - 1):
            side_map = c.view(*c.shape, *([1] * self.config.ndim)).expand(-1, -1, *zm.shape[2:])
            zm = torch.cat([zm, side_map], dim=1)
        return self.relations[i](zm)

    def _side_loss(self, pred: Tensor, cont: Tensor, cats: list[Tensor]) -> Tensor:
        n_cont = cont.shape[1]
        loss = pred.new_zeros(())
        if n_cont:
            loss = loss + F.mse_loss(pred[:, :n_cont], cont, reduction="none").sum(1).mean()
        start = n_cont
        for idx, k in zip(cats, self.config.categorical.values(), strict=True):
            loss = loss + F.cross_entropy(pred[:, start : start + k], idx)
            start += k
        return loss

    def nll(self, x_mri: Tensor, x_pet: Tensor, side: SideInput | None = None,
            tissue_maps: Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
        """The training objective (eq. 12) and its parts, averaged over the batch (``tissue_maps``:
        the MRIs' native tissue maps, for a model that reads them, :attr:`synthesis_reads_tissue_maps`).

        Returns ``loss`` (what to minimise), ``bpd_pet_given_mri`` (-log p(xp | xm) in bits
        per voxel), ``bpd_mri`` (-log p(xm) in bits per voxel) and, with side information,
        ``side_keep`` / ``side_remove`` (the eq. 17 head losses, before weighting).
        Dequantisation noise is drawn in training mode; in eval mode each value sits in the
        middle of its bin, so the result is deterministic.
        """
        self._check_image(x_mri, "x_mri")
        self._check_image(x_pet, "x_pet")
        if x_mri.shape != x_pet.shape:
            raise ValueError(
                f"x_mri has shape {tuple(x_mri.shape)} but x_pet has {tuple(x_pet.shape)}: pass paired images on the same grid."
            )
        cfg = self.config
        batch = x_mri.shape[0]
        encoded = self._encode_side(side, batch, x_mri)
        c = encoded[0] if encoded is not None else None

        zm, logdet_m = self.flow_mri(self._dequantize(x_mri, self.training, "mri"))
        zp, logdet_p = self.flow_pet(self._dequantize(x_pet, self.training, "pet", c, x_mri, tissue_maps))

        # log p(zm) under the standard normal prior of the MRI flow.
        log_p_zm = sum(gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) for z in zm)
        # eq. 10-11: log p(zp | zm) = sum_i log N(zp_i; mu_i(zm_i), sigma_i(zm_i)).
        log_p_zp = x_mri.new_zeros(batch)
        for i, (z_m, z_p) in enumerate(zip(zm, zp, strict=True)):
            mu, log_sigma = self._relation(i, z_m, c)
            log_p_zp = log_p_zp + gaussian_log_prob(z_p, mu, log_sigma)

        # Continuous density -> probability of the intensity bin: - D * log(n_bins); then bits
        # per voxel by dividing by D * ln 2.
        voxels = math.prod(x_mri.shape[1:])
        discretisation = voxels * math.log(cfg.n_bins)
        to_bits = 1.0 / (voxels * math.log(2.0))
        bpd_pet = -(log_p_zp + logdet_p - discretisation) * to_bits
        bpd_mri = -(log_p_zm + logdet_m - discretisation) * to_bits
        # eq. 12: maximise log p(zp|zm) + log|det dzp/dxp| + lambda * log p(xm).
        loss = (bpd_pet + cfg.lambda_mri * bpd_mri).mean()
        out = {"bpd_pet_given_mri": bpd_pet.mean(), "bpd_mri": bpd_mri.mean()}

        if encoded is not None and self.has_side_heads:
            _, cont, cats = encoded
            keep = x_mri.new_zeros(())
            kept, removed = self._side_head_inputs(zm, zp[-1])
            for head, z in zip(self.side_keep, kept, strict=True):
                keep = keep + self._side_loss(head(z), cont, cats)
            remove = x_mri.new_zeros(())
            for head, z in zip(self.side_remove, removed, strict=True):
                remove = remove + self._side_loss(head(grad_reverse(z)), cont, cats)
            # eq. 17: side-information losses enter the objective with a small weight.
            loss = loss + cfg.side_loss_weight * (keep + remove)
            out["side_keep"] = keep
            out["side_remove"] = remove
        out["loss"] = loss
        return out

    def forward(
        self, x_mri: Tensor, x_pet: Tensor, side: SideInput | None = None, tissue_maps: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Same as :meth:`nll` (so DataParallel/DDP wrappers call the objective)."""
        return self.nll(x_mri, x_pet, side, tissue_maps)

    # -- synthesis -------------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        """Whether every ActNorm has seen data (i.e. the model was trained or loaded)."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))

    def _mri_latents(self, x_mri: Tensor, side: SideInput | None) -> tuple[list[Tensor], Tensor | None]:
        """The MRI's latents (each value mid-bin, no noise) and the encoded side information."""
        self._check_image(x_mri, "x_mri")
        encoded = self._encode_side(side, x_mri.shape[0], x_mri)
        zm, _ = self.flow_mri(self._dequantize(x_mri, noise=False, modality="mri"))
        return zm, encoded[0] if encoded is not None else None

    @torch.no_grad()
    def conditional_prior(self, x_mri: Tensor, side: SideInput | None = None,
                          tissue_maps: Tensor | None = None) -> ConditionalPrior:  # fmt: skip
        """p(zp | zm, c) for synthesis (eq. 10-11, 16), inside the conditioning range, and per
        MRI the share of its latents that fell outside that range (0 for a model without one)."""
        zm, c = self._mri_latents(x_mri, side)
        mus, log_sigmas = [], []
        outside = torch.zeros(x_mri.shape[0], dtype=torch.long, device=x_mri.device)
        for i, (z, bounds) in enumerate(zip(zm, self.ranges, strict=True)):
            outside = outside + bounds.count_outside(z)
            mu, log_sigma = self._relation(i, bounds.clamp("latent", z), c)
            if not self._from_side_prior(i):
                # The prior of c alone is left as it is: bounding it to the training ages
                # would flatten every age sweep beyond them.
                mu, log_sigma = bounds.clamp("mu", mu), bounds.clamp("log_sigma", log_sigma)
            mus.append(mu)
            log_sigmas.append(log_sigma)
        fraction = outside / sum(z[0].numel() for z in zm)
        if self.synthesis_reads_tissue_maps:
            self._checked_tissue_maps(x_mri, tissue_maps)  # fail here, not at sampling
        anatomy = self.config.anatomy_template
        return ConditionalPrior(mus, log_sigmas, fraction.to(x_mri.dtype), c, x_mri if anatomy else None,
                                tissue_maps if anatomy else None)  # fmt: skip

    @torch.no_grad()
    def sample(
        self,
        x_mri: Tensor,
        side: SideInput | None = None,
        temperature: float = 1.0,
        n: int = 1,
        generator: torch.Generator | None = None,
        tissue_maps: Tensor | None = None,
    ) -> Tensor:
        """Synthetic PET for each MRI: ``(n, batch, in_channels, *spatial)``, on the [0, 1] scale.

        zp_i = mu_i(zm_i) + temperature * sigma_i(zm_i) * eps, eps ~ N(0, I); temperature 0
        gives the conditional mode of the latents, deterministically (then all n are equal).
        """
        return self.sample_prior(self.conditional_prior(x_mri, side, tissue_maps), temperature, n, generator)

    @torch.no_grad()
    def counterfactual(self, x_mri: Tensor, x_pet: Tensor, side: SideInput, new_side: SideInput,
                       tissue_maps: Tensor | None = None) -> Tensor:  # fmt: skip
        """A measured PET as it would look with other side information (the authors' released
        code does this): encode the PET, keep each latent's standardised residual from its prior
        under ``side``, (zp - mu) / sigma, and put it on the prior under ``new_side``. Where the
        prior does not depend on c (the lower levels, eq. 16), the latents stay as they are;
        with a prior whose scale does not depend on c this is zp - mu(c) + mu(c').

        Returns ``(batch, in_channels, *spatial)`` on the [0, 1] scale; ``side == new_side``
        gives back the measured PET (up to the flow's numerical inverse).
        """
        self._check_image(x_pet, "x_pet")
        old, new = self.conditional_prior(x_mri, side, tissue_maps), self.conditional_prior(x_mri, new_side, tissue_maps)
        zp, _ = self.flow_pet(self._dequantize(x_pet, noise=False, modality="pet", c=old.side, x_mri=x_mri,
                                               tissue_maps=tissue_maps))  # fmt: skip
        moved = [
            mu_new + (z - mu_old) * (log_sigma_new - log_sigma_old).exp()
            for z, mu_old, log_sigma_old, mu_new, log_sigma_new in zip(
                zp, old.mu, old.log_sigma, new.mu, new.log_sigma, strict=True)
        ]  # fmt: skip
        return self._quantize_back(self.flow_pet.inverse(moved), "pet", new.side, x_mri, tissue_maps)

    @torch.no_grad()
    def sample_prior(
        self,
        prior: ConditionalPrior,
        temperature: float = 1.0,
        n: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:meth:`sample` from a prior :meth:`conditional_prior` has already computed."""
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(
                f"temperature={temperature}; expected a finite value >= 0 (0 = mode, 1 = the model's spread)."
            )
        if n < 1:
            raise ValueError(f"n={n}; expected the number of samples per image, >= 1.")
        if not self.is_initialized:
            log.warning(
                "sampling from a DualGlow that has never seen data: the output is meaningless"
            )
        # One sample at a time: a full-size 3D inverse pass per sample bounds peak memory.
        samples = []
        for _ in range(n):
            zp = []
            for mu, log_sigma in zip(prior.mu, prior.log_sigma, strict=True):
                if temperature == 0:
                    zp.append(mu)
                else:
                    eps = torch.randn(
                        mu.shape, generator=generator, dtype=mu.dtype, device=mu.device
                    )
                    zp.append(mu + temperature * log_sigma.exp() * eps)
            samples.append(self._quantize_back(self.flow_pet.inverse(zp), "pet", prior.side, prior.mri, prior.tissue_maps))
        return torch.stack(samples)


__all__ = [
    "AGE_SCALING", "SIDE_LEVELS", "TOP_PRIORS", "ConditionalPrior", "DualGlow", "DualGlowConfig", "RelationNet", "SideHead", "SidePrior",
    "grad_reverse", "tissue_fractions",
]  # fmt: skip
