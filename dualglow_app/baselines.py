"""The paper's comparison methods (Sun et al. 2019, Table 1), small enough to share DUAL-GLOW's budget.

Four MRI -> PET translators behind one interface, :class:`Baseline`: ``fit(mri, pet)`` on
stacked model-grid volumes (N, X, Y, Z) on the model's [0, 1] scale, ``predict(mri)``
returning the same shape and scale. The input may carry more channels than the T1w
(``BaselineOptions.input_channels``; ``mri`` then (N, C, X, Y, Z), the T1w first): the
evaluation's ``--baseline-inputs t1w+tissue-maps`` gives each method the T1w's native tissue
maps beside it, what DUAL-GLOW's anatomy template reads with ``--anatomy-reading native``, so
the comparison can also be made on the same information. Every method sees the same arrays and batch size as
DUAL-GLOW in the evaluation; nothing is tuned per fold.

Two ways to train (:meth:`Baseline.fit`):

- without validation data, a fixed ``BaselineOptions.epochs`` epochs;
- with ``val_mri`` / ``val_pet`` (a subject-level inner split), up to ``max_epochs`` with
  early stopping: after every epoch the validation MAE of :meth:`Baseline.predict` (the
  deterministic prediction: the cGAN with its noise at 0, the cVAE at the prior mean z = 0) is
  measured on the model's [0, 1] PET scale (SUVR / ``pet_suvr_max``, i.e. SUVR / 3 with the
  default :class:`~dualglow_app.data.IntensityScaling`; inside ``val_mask`` when given). The
  best epoch's weights are kept and restored at the end; training stops after ``patience``
  epochs without a relative improvement of ``min_delta``, or at ``budget_seconds``.

Either way ``baseline.history`` holds one JSON-able row per epoch (train losses, validation
MAE, seconds) and :meth:`Baseline.summary` the epochs run, the best epoch, whether and why it
stopped, and the wall time. With ``checkpoint=PATH`` the fit writes its whole state there after
every epoch (atomically; tensors and plain values only, read back without unpickling code) and a
fit interrupted at any point continues from its last finished epoch with the same result as an
uninterrupted one: the networks, optimisers, best weights, patience count and every random
generator are restored. A finished fit's checkpoint returns its result at once.

- ``unet``: 3D U-Net trained with L1 (the paper's "U-Net").
- ``pix2pix``: the same U-Net as generator + a 3D PatchGAN on (MRI, PET) pairs, loss
  adversarial + 100 * L1 (Isola et al. 2017's weighting).
- ``cgan``: a plain conditional GAN: the U-Net generator gets (MRI, noise), the discriminator
  sees (MRI, PET) as one global decision (no patches); adversarial loss only, no L1. Noise is
  drawn while training; predictions use noise 0 (the noise's mean and mode), so they are
  deterministic.
- Both GANs' generator output is set to 0 where the MRI is 0 (outside the brain): the
  preprocessed T1w and PET are exactly 0 there, a sigmoid never is, and without this the
  critic told real from fake by the background alone (critic loss ~0.02 from the first
  epochs, the generator's L1 stuck near 0.3 on the model scale; pix2pix r = 0.20 and the cGAN
  r = -0.03 in the 8-epoch evaluation). The U-Net and the cVAE have no critic and learn the
  zero background from their L1 loss, unchanged.
- ``cvae``: a conditional VAE: an encoder of (MRI, PET) -> z (``latent`` dims), a U-Net decoder
  of the MRI with z broadcast at its bottleneck; L1 reconstruction + KL. Prediction uses the
  prior mean z = 0.
- ``meanpet``: not from the paper, a reference that ignores the MRI: every prediction is the
  voxel-wise mean training PET on the model grid. A translator that does not beat it has not
  learned anything from the MRI.

Example:
    >>> model = make_baseline("unet", BaselineOptions(epochs=1, width=4))
    >>> rng = np.random.default_rng(0)
    >>> mri = rng.random((2, 8, 8, 8), dtype=np.float32)
    >>> _ = model.fit(mri, mri * 0.5)
    >>> model.predict(mri).shape
    (2, 8, 8, 8)

Architectures are deliberately plain (two poolings, instance norm, LeakyReLU); the grid side
must be divisible by 4.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualglow_app.log import get_logger

log = get_logger(__name__)


@dataclass
class BaselineOptions:
    """Training settings shared by every baseline (the evaluation copies the batch size from DUAL-GLOW).

    ``lr`` is Adam's for the U-Net and the cVAE; the GANs use ``gan_lr`` with beta1 = 0.5
    (pix2pix's settings). ``l1_weight`` is pix2pix's lambda; ``kl_weight`` scales the cVAE's
    KL term (summed over latent dims) against the per-voxel mean L1.

    ``input_channels``: the T1w alone (1), or the T1w and maps of it stacked after it on a
    channel axis (the inputs are then (N, C, X, Y, Z)).

    ``epochs`` is the fixed length of a fit without validation data. With validation data
    the fit runs up to ``max_epochs`` (the budget) and stops after ``patience`` epochs in
    which the validation MAE did not fall below ``best * (1 - min_delta)`` (``min_delta`` is
    relative), or once ``budget_seconds`` (if set) have passed at the end of an epoch.
    """

    epochs: int = 20
    max_epochs: int = 200
    patience: int = 10
    min_delta: float = 1e-3
    budget_seconds: float | None = None
    batch_size: int = 2
    width: int = 16
    lr: float = 1e-3
    gan_lr: float = 2e-4
    l1_weight: float = 100.0
    kl_weight: float = 1e-3
    latent: int = 16
    input_channels: int = 1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        problems = [f"{name}={getattr(self, name)} (must be >= 1)"
                    for name in ("epochs", "max_epochs", "patience", "batch_size", "width", "latent", "input_channels")
                    if getattr(self, name) < 1]  # fmt: skip
        if not 0.0 <= self.min_delta < 1.0:
            problems.append(f"min_delta={self.min_delta} (a relative improvement, 0 <= d < 1)")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            problems.append(f"budget_seconds={self.budget_seconds} (must be > 0, or None)")
        if problems:
            raise ValueError("invalid baseline options: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Options that say where a fit runs, not which fit it is: a checkpoint written on a GPU resumes
#: on the CPU and back (its tensors are mapped on loading; the seeded draws stay on the CPU).
RESUMABLE_ELSEWHERE = frozenset({"device"})


def _digest(prefix: bytes, arrays: tuple[np.ndarray | None, ...]) -> str:
    """sha256 of ``prefix`` and the arrays' bytes (``None`` as a marker)."""
    digest = hashlib.sha256(prefix)
    for array in arrays:
        digest.update(b"none" if array is None else np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


#: What ``val_mae`` in a baseline's history and summary measures.
VAL_METRIC = "MAE of predict() on the model's [0, 1] PET scale (SUVR / pet_suvr_max), inside val_mask if given"


# --------------------------------------------------------------------------- networks


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.2),
        nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.2),
    )  # fmt: skip


class UNet3d(nn.Module):
    """Two-level 3D U-Net; ``extra`` channels (a broadcast latent) join at the bottleneck."""

    def __init__(self, in_channels: int = 1, width: int = 16, extra: int = 0) -> None:
        super().__init__()
        w = width
        self.enc0 = _block(in_channels, w)
        self.enc1 = _block(w, 2 * w)
        self.enc2 = _block(2 * w + extra, 4 * w)
        self.dec1 = _block(4 * w + 2 * w, 2 * w)
        self.dec0 = _block(2 * w + w, w)
        self.out = nn.Conv3d(w, 1, 1)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        e0 = self.enc0(x)
        e1 = self.enc1(F.avg_pool3d(e0, 2))
        b = F.avg_pool3d(e1, 2)
        if z is not None:
            b = torch.cat([b, z[:, :, None, None, None].expand(-1, -1, *b.shape[2:])], dim=1)
        b = self.enc2(b)
        d1 = self.dec1(torch.cat([F.interpolate(b, size=e1.shape[2:], mode="trilinear"), e1], dim=1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, size=e0.shape[2:], mode="trilinear"), e0], dim=1))
        # Sigmoid keeps the output on the model's [0, 1] intensity scale, like the targets.
        return torch.sigmoid(self.out(d0))


class Critic3d(nn.Module):
    """Discriminator on (MRI, PET): a PatchGAN map of logits, or one logit (``patch=False``);
    ``input_channels`` those of the MRI side."""

    def __init__(self, width: int = 16, patch: bool = True, input_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv3d(input_channels + 1, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv3d(w, 2 * w, 4, stride=2, padding=1), nn.InstanceNorm3d(2 * w, affine=True), nn.LeakyReLU(0.2),
            nn.Conv3d(2 * w, 1, 3, padding=1),
        )  # fmt: skip
        self.patch = patch

    def forward(self, mri: Tensor, pet: Tensor) -> Tensor:
        logits = self.features(torch.cat([mri, pet], dim=1))
        return logits if self.patch else logits.mean(dim=(2, 3, 4), keepdim=True)


class Encoder3d(nn.Module):
    """q(z | MRI, PET) of the cVAE: two strided convolutions, global pooling, mean and log-variance."""

    def __init__(self, width: int, latent: int, input_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv3d(input_channels + 1, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv3d(w, 2 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.head = nn.Linear(2 * w, 2 * latent)

    def forward(self, mri: Tensor, pet: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(torch.cat([mri, pet], dim=1)).mean(dim=(2, 3, 4))
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)


# --------------------------------------------------------------------------- methods


@dataclass
class _FitState:
    """The early-stopping bookkeeping of one fit: what a checkpoint stores beside the weights."""

    SCALARS: ClassVar[tuple[str, ...]] = ("best", "best_epoch", "reference", "since", "elapsed", "reason")

    best: float = math.inf
    best_epoch: int = 0
    reference: float = math.inf
    since: int = 0
    elapsed: float = 0.0
    reason: str | None = None  # set once the fit has finished (why it stopped)
    best_state: dict[str, dict[str, Tensor]] | None = None

    def scalars(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SCALARS}


class Baseline:
    """fit / predict on stacked volumes; subclasses define ``_build``, ``_step`` and ``_generate``.

    Seeded: the same options and arrays give the same weights (on one device and thread count).
    Validation only reads the model (:meth:`predict` draws no random numbers), so the first k
    epochs of an early-stopped fit are exactly a fixed k-epoch fit.
    """

    name: ClassVar[str] = ""
    #: Whether the network pools twice (the grid sides must then be divisible by 4).
    pools: ClassVar[bool] = True

    def __init__(self, options: BaselineOptions | None = None) -> None:
        self.options = options or BaselineOptions()
        self.device = torch.device(self.options.device)
        # What the last fit measured (see summary()).
        self.history: list[dict[str, Any]] = []
        self.best_epoch = 0
        self.best_val_mae: float | None = None
        self.epochs_run = 0
        self.stopped_early = False
        self.stop_reason = "not fitted"
        self.validated = False
        self.wall_s = 0.0
        self.fit_seconds = 0.0  # = wall_s (older name)
        torch.manual_seed(self.options.seed)
        self._build()
        self._noise = torch.Generator().manual_seed(self.options.seed + 1)

    def _build(self) -> None:
        raise NotImplementedError

    def _step(self, mri: Tensor, pet: Tensor) -> dict[str, float]:
        """One optimisation step on a batch; its losses, ``"loss"`` (the one minimised) first."""
        raise NotImplementedError

    def _generate(self, mri: Tensor) -> Tensor:
        raise NotImplementedError

    def _modules(self) -> dict[str, nn.Module]:
        return {name: m for name, m in vars(self).items() if isinstance(m, nn.Module)}

    def _state(self) -> dict[str, dict[str, Tensor]]:
        """A copy of every network's weights (generator and critic alike)."""
        return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in self._modules().items()}

    def _load_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        for name, module in self._modules().items():
            module.load_state_dict(state[name])

    def fit(
        self,
        mri: np.ndarray,
        pet: np.ndarray,
        val_mri: np.ndarray | None = None,
        val_pet: np.ndarray | None = None,
        *,
        val_mask: np.ndarray | None = None,
        on_epoch: Callable[[dict[str, Any], np.ndarray], None] | None = None,
        checkpoint: os.PathLike[str] | str | None = None,
    ) -> list[float]:
        """Train on (N, X, Y, Z) arrays on [0, 1]; returns the mean training loss of each epoch.

        Without ``val_mri``/``val_pet``: ``options.epochs`` epochs. With them: up to
        ``options.max_epochs`` with early stopping on the validation MAE (module docstring),
        ending with the best epoch's weights. ``val_mask`` (same shape as ``val_pet``) limits
        the MAE to the brain. ``on_epoch(row, val_pred)`` is called after each validated
        epoch with the history row (add JSON-able keys to it) and the model-scale validation
        predictions. What was measured is in :attr:`history` and :meth:`summary`. ``checkpoint``:
        resume from / save to this file after every epoch (module docstring); a checkpoint of
        other options or arrays raises :class:`~dualglow_app.weights.ModelFileError`.
        """
        self._check_pair(mri, pet, "")
        if (val_mri is None) != (val_pet is None):
            raise ValueError(f"{self.name}.fit: pass both val_mri and val_pet, or neither")
        validating = val_mri is not None and val_pet is not None
        if val_mri is not None and val_pet is not None:
            self._check_pair(val_mri, val_pet, "val_")
            if val_mri.shape[1:] != mri.shape[1:]:
                raise ValueError(f"{self.name}.fit: validation grid {val_mri.shape[1:]} differs from {mri.shape[1:]}")
            if val_mask is not None and val_mask.shape != val_pet.shape:
                raise ValueError(f"{self.name}.fit: val_mask {val_mask.shape} must match val_pet {val_pet.shape}")
        opts = self.options
        budget = opts.max_epochs if validating else opts.epochs
        rng = np.random.default_rng(opts.seed)
        self.history, self.validated = [], validating
        fit = _FitState()
        if checkpoint is not None:
            arrays = (mri, pet, val_mri, val_pet, val_mask)
            identity = self._fit_identity(*arrays)
            resumed = self._resume(Path(checkpoint), identity, arrays, rng)
            fit = resumed or fit
        start = time.perf_counter() - fit.elapsed
        reason = fit.reason or ("max_epochs" if validating else "fixed_epochs")
        for epoch in range(len(self.history) + 1, 0 if fit.reason else budget + 1):
            epoch_start = time.perf_counter()
            for module in self._modules().values():
                module.train()
            order = rng.permutation(len(mri))
            sums: dict[str, float] = {}
            for first in range(0, len(order), opts.batch_size):
                rows = np.sort(order[first : first + opts.batch_size])
                for key, value in self._step(self._inputs(mri[rows]), self._tensor(pet[rows])).items():
                    sums[key] = sums.get(key, 0.0) + value * len(rows)
            row: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v / len(mri) for k, v in sums.items()}}
            row["train_seconds"] = time.perf_counter() - epoch_start
            pred = None
            if val_mri is not None and val_pet is not None:
                pred = self.predict(val_mri)
                mae = _mae(pred, val_pet, val_mask)
                row["val_mae"] = mae
                if mae < fit.best:  # the weights kept: the lowest validation MAE
                    fit.best, fit.best_epoch, fit.best_state = mae, epoch, self._state()
                # Patience counts epochs since the last improvement by at least min_delta (relative).
                row["improved"] = bool(mae < fit.reference * (1.0 - opts.min_delta))
                fit.reference, fit.since = (mae, 0) if row["improved"] else (fit.reference, fit.since + 1)
            row["seconds"] = time.perf_counter() - epoch_start
            if pred is not None and on_epoch is not None:
                on_epoch(row, pred)
            self.history.append(row)
            log.debug("%s epoch %d: %s", self.name, epoch, {k: v for k, v in row.items() if k != "epoch"})
            if validating and fit.since >= opts.patience:
                reason = "patience"
            elif opts.budget_seconds is not None and epoch < budget and time.perf_counter() - start >= opts.budget_seconds:
                reason = "budget_seconds"
            finished = reason in ("patience", "budget_seconds") or epoch == budget
            if checkpoint is not None:
                fit.elapsed, fit.reason = time.perf_counter() - start, reason if finished else None
                self._save_checkpoint(Path(checkpoint), identity, fit, rng)
            if finished:
                break
        self.best_epoch, self.best_val_mae = fit.best_epoch, None
        if fit.best_state is not None:
            self._load_state(fit.best_state)
            self.best_val_mae = fit.best
        else:
            self.best_epoch = len(self.history)
        self.epochs_run = len(self.history)
        self.stopped_early = reason == "patience"
        self.stop_reason = reason
        self.wall_s = self.fit_seconds = time.perf_counter() - start
        log.info("%s: %d epochs (%s) in %.1f s; kept epoch %d%s", self.name, self.epochs_run, reason, self.wall_s,
                 self.best_epoch, "" if self.best_val_mae is None else f", val MAE {self.best_val_mae:.4f}")  # fmt: skip
        return [float(r["train_loss"]) for r in self.history]

    def summary(self) -> dict[str, Any]:
        """What the last fit did, JSON-able: epochs run, kept epoch, why it stopped, time, history."""
        opts = self.options
        return {
            "method": self.name,
            "validated": self.validated,
            "val_metric": VAL_METRIC if self.validated else None,
            "budget_epochs": opts.max_epochs if self.validated else opts.epochs,
            "patience": opts.patience if self.validated else None,
            "min_delta": opts.min_delta if self.validated else None,
            "budget_seconds": opts.budget_seconds,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "best_val_mae": self.best_val_mae,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "wall_s": self.wall_s,
            "history": [dict(row) for row in self.history],
        }

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: o for name, o in vars(self).items() if isinstance(o, torch.optim.Optimizer)}

    def _fit_identity(self, *arrays: np.ndarray | None) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the method, its options and a digest of
        the arrays' bytes (kept apart, so a refusal can say which changed)."""
        return {"method": self.name, "options": self.options.to_dict(), "arrays": _digest(b"", arrays)}

    def _changed_since(self, fields: dict[str, Any], identity: dict[str, Any],
                       arrays: tuple[np.ndarray | None, ...]) -> list[str]:
        """What differs between the fit a checkpoint's ``fields`` hold and ``identity`` (empty: resumable)."""
        stored = fields.get("identity")
        if stored is None:
            # Written before the identity was kept in parts: one hash of the method, the options and the arrays.
            prefix = json.dumps([self.name, self.options.to_dict()], sort_keys=True).encode()
            return [] if fields.get("fingerprint") == _digest(prefix, arrays) else ["options or training scans"]
        # An option added since the checkpoint was written had its default in the fit it holds.
        options = {**BaselineOptions().to_dict(), **stored["options"]}
        changed = [] if stored["method"] == identity["method"] else ["method"]
        changed += [f"option {name}" for name, value in identity["options"].items()
                    if options.get(name) != value and name not in RESUMABLE_ELSEWHERE]  # fmt: skip
        return changed + ([] if stored["arrays"] == identity["arrays"] else ["training or validation scans"])

    def _save_checkpoint(self, path: Path, identity: dict[str, Any], fit: _FitState, rng: np.random.Generator) -> None:
        from dualglow_app.weights import save_checkpoint

        save_checkpoint(path, {
            "model": {name: module.state_dict() for name, module in self._modules().items()},
            "optimizers": {name: opt.state_dict() for name, opt in self._optimizers().items()},
            "best_state": fit.best_state,
            # JSON text (Python's, which writes inf): PCG64's state holds integers beyond 64 bits.
            "fit": json.dumps({"identity": identity, "history": self.history, "rng": rng.bit_generator.state,
                               **fit.scalars()}),
            "noise_rng": self._noise.get_state(),
            "torch_rng": torch.get_rng_state(),
        })  # fmt: skip

    def _resume(self, path: Path, identity: dict[str, Any], arrays: tuple[np.ndarray | None, ...],
                rng: np.random.Generator) -> _FitState | None:
        """Restore the fit saved at ``path`` (networks, optimisers, history, generators) if it is
        the fit ``identity`` names; None if there is none."""
        from dualglow_app.weights import ModelFileError, load_checkpoint

        if not path.is_file():
            return None
        state = load_checkpoint(path, self.device)
        fields = json.loads(state["fit"]) if isinstance(state.get("fit"), str) else {}
        changed = self._changed_since(fields, identity, arrays) if fields else ["not a fit's checkpoint"]
        if changed:
            raise ModelFileError(
                f"{path}: checkpoint of a different {self.name} fit (changed: {', '.join(changed)}); "
                "delete it to train afresh."
            )
        self._load_state(state["model"])
        for name, opt in self._optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
        # Generator states are CPU byte tensors, whatever device the checkpoint was mapped to.
        self._noise.set_state(state["noise_rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        rng.bit_generator.state = fields["rng"]
        self.history = list(fields["history"])
        fit = _FitState(**{name: fields[name] for name in _FitState.SCALARS})
        fit.best_state = state["best_state"]
        log.info("%s: resuming from %s after epoch %d%s", self.name, path, len(self.history),
                 " (finished)" if fit.reason else "")  # fmt: skip
        return fit

    def _check_pair(self, mri: np.ndarray, pet: np.ndarray, prefix: str) -> None:
        channels = self.options.input_channels
        if pet.ndim != 4 or mri.shape != (pet.shape if channels == 1 else (len(pet), channels, *pet.shape[1:])):
            expected = "(N, X, Y, Z)" if channels == 1 else f"(N, {channels}, X, Y, Z)"
            raise ValueError(f"{self.name}.fit: {prefix}mri {mri.shape} must be {expected} and {prefix}pet "
                             f"{pet.shape} (N, X, Y, Z) on the same grid")  # fmt: skip
        if self.pools and any(s % 4 for s in pet.shape[1:]):
            raise ValueError(f"{self.name}: grid sides {pet.shape[1:]} must be divisible by 4 (two poolings)")

    @torch.no_grad()
    def predict(self, mri: np.ndarray) -> np.ndarray:
        """Synthetic PET on the model's [0, 1] scale, one volume at a time (bounded memory).

        Deterministic: the cGAN's noise is 0, the cVAE's latent its prior mean.
        """
        for module in self._modules().values():
            module.eval()
        out = [self._generate(self._inputs(mri[i : i + 1]))[0, 0].cpu().numpy() for i in range(len(mri))]
        return np.asarray(out, dtype=np.float32)

    def _tensor(self, array: np.ndarray) -> Tensor:
        """(N, X, Y, Z) volumes as an (N, 1, X, Y, Z) tensor on the device."""
        return _on(array, self.device)[:, None]

    def _inputs(self, array: np.ndarray) -> Tensor:
        """The inputs as (N, input_channels, X, Y, Z): one channel comes without its axis."""
        tensor = _on(array, self.device)
        return tensor[:, None] if self.options.input_channels == 1 else tensor

    def _adam(self, module: nn.Module, gan: bool = False) -> torch.optim.Optimizer:
        if gan:
            return torch.optim.Adam(module.parameters(), lr=self.options.gan_lr, betas=(0.5, 0.999))
        return torch.optim.Adam(module.parameters(), lr=self.options.lr)


def _on(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


def _mae(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean over scans of each scan's MAE (inside its mask when given), as the evaluation averages."""
    errors = np.abs(np.asarray(pred, np.float64) - np.asarray(truth, np.float64))
    if mask is None:
        return float(errors.mean())
    inside = np.asarray(mask).astype(bool)
    return float(np.mean([e[m].mean() for e, m in zip(errors, inside, strict=True) if m.any()]))


def in_brain(pet: Tensor, mri: Tensor) -> Tensor:
    """A generator's PET, 0 where the (skull-stripped) MRI (its first channel) is 0, as the
    real PET is: every baseline's output, so none spends its training learning the background
    (the GANs' critic told real from fake by it alone) and all start from the same place."""
    return pet * (mri[:, :1] > 0).to(mri.dtype)


class UNetL1(Baseline):
    """3D U-Net, L1 loss."""

    name = "unet"

    def _build(self) -> None:
        self.net = UNet3d(self.options.input_channels, self.options.width).to(self.device)
        self.opt = self._adam(self.net)

    def _step(self, mri: Tensor, pet: Tensor) -> dict[str, float]:
        loss = F.l1_loss(in_brain(self.net(mri), mri), pet)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def _generate(self, mri: Tensor) -> Tensor:
        return in_brain(self.net(mri), mri)


class _GAN(Baseline):
    """Shared adversarial step; subclasses choose the generator input, critic and L1 weight."""

    patch = True
    l1 = True

    def _build(self) -> None:
        self.gen = UNet3d(self._gen_channels(), self.options.width).to(self.device)
        self.critic = Critic3d(self.options.width, patch=self.patch, input_channels=self.options.input_channels).to(self.device)
        self.opt_g = self._adam(self.gen, gan=True)
        self.opt_d = self._adam(self.critic, gan=True)

    def _gen_channels(self) -> int:
        return self.options.input_channels

    def _gen_input(self, mri: Tensor, sample: bool = True) -> Tensor:
        return mri

    def _fake(self, mri: Tensor, sample: bool = True) -> Tensor:
        """The generator's PET, 0 where the MRI is 0 (outside the brain), like the real PET:
        otherwise the critic needs only the background to tell them apart (module docstring)."""
        return in_brain(self.gen(self._gen_input(mri, sample)), mri)

    def _step(self, mri: Tensor, pet: Tensor) -> dict[str, float]:
        fake = self._fake(mri)
        real_logits = self.critic(mri, pet)
        fake_logits = self.critic(mri, fake.detach())
        loss_d = 0.5 * (
            F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        )
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        gen_logits = self.critic(mri, fake)
        adversarial = F.binary_cross_entropy_with_logits(gen_logits, torch.ones_like(gen_logits))
        l1 = F.l1_loss(fake, pet)
        loss_g = adversarial + self.options.l1_weight * l1 if self.l1 else adversarial
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        # l1 is reported for both GANs (the cGAN does not minimise it: a diagnostic).
        return {"loss": float(loss_g.detach()), "loss_d": float(loss_d.detach()),
                "adversarial": float(adversarial.detach()), "l1": float(l1.detach())}  # fmt: skip

    def _generate(self, mri: Tensor) -> Tensor:
        return self._fake(mri, sample=False)


class Pix2Pix(_GAN):
    """U-Net generator + 3D PatchGAN, adversarial + L1 (lambda = ``l1_weight``)."""

    name = "pix2pix"


class CGAN(_GAN):
    """Plain conditional GAN: generator of (MRI, noise), one global critic decision, no L1."""

    name = "cgan"
    patch = False
    l1 = False

    def _gen_channels(self) -> int:
        return self.options.input_channels + 1

    def _gen_input(self, mri: Tensor, sample: bool = True) -> Tensor:
        # Training: noise from the method's own seeded generator. Prediction: noise 0, the
        # noise's mean and mode (a deterministic prediction, like the cVAE's z = 0).
        if sample:
            noise = torch.randn(mri[:, :1].shape, generator=self._noise).to(mri.device)
        else:
            noise = torch.zeros_like(mri[:, :1])
        return torch.cat([mri, noise], dim=1)


class CVAE(Baseline):
    """Conditional VAE: q(z | MRI, PET), p(PET | MRI, z) a U-Net; predicts with z = 0."""

    name = "cvae"

    def _build(self) -> None:
        self.encoder = Encoder3d(self.options.width, self.options.latent, self.options.input_channels).to(self.device)
        self.decoder = UNet3d(self.options.input_channels, self.options.width, extra=self.options.latent).to(self.device)
        self.opt = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()], lr=self.options.lr)

    def _step(self, mri: Tensor, pet: Tensor) -> dict[str, float]:
        mu, logvar = self.encoder(mri, pet)
        eps = torch.randn(mu.shape, generator=self._noise).to(mu.device)
        recon = in_brain(self.decoder(mri, mu + torch.exp(0.5 * logvar) * eps), mri)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
        l1 = F.l1_loss(recon, pet)
        loss = l1 + self.options.kl_weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach()), "l1": float(l1.detach()), "kl": float(kl.detach())}

    def _generate(self, mri: Tensor) -> Tensor:
        z = torch.zeros(mri.shape[0], self.options.latent, device=mri.device)
        return in_brain(self.decoder(mri, z), mri)


class MeanPET(Baseline):
    """The mean training PET for every MRI: the reference a model of the MRI has to beat.

    Closed form: "converged" after 0 epochs (``stop_reason`` ``"closed_form"``); with
    validation data its validation MAE is measured like the others'.
    """

    name = "meanpet"
    pools = False

    def _build(self) -> None:
        self.mean: np.ndarray | None = None

    def fit(
        self,
        mri: np.ndarray,
        pet: np.ndarray,
        val_mri: np.ndarray | None = None,
        val_pet: np.ndarray | None = None,
        *,
        val_mask: np.ndarray | None = None,
        on_epoch: Callable[[dict[str, Any], np.ndarray], None] | None = None,
        checkpoint: os.PathLike[str] | str | None = None,
    ) -> list[float]:
        """The voxel-wise mean of ``pet``; returns its training L1 (one "epoch"). Nothing to
        checkpoint: ``checkpoint`` is accepted and unused."""
        self._check_pair(mri, pet, "")
        if (val_mri is None) != (val_pet is None):
            raise ValueError(f"{self.name}.fit: pass both val_mri and val_pet, or neither")
        start = time.perf_counter()
        self.mean = np.asarray(pet, dtype=np.float64).mean(0).astype(np.float32)
        self.history, self.epochs_run, self.best_epoch = [], 0, 0
        self.stopped_early, self.stop_reason = False, "closed_form"
        self.validated = val_mri is not None
        self.best_val_mae = None
        if val_mri is not None and val_pet is not None:
            self.best_val_mae = _mae(self.predict(val_mri), val_pet, val_mask)
        self.wall_s = self.fit_seconds = time.perf_counter() - start
        return [float(np.abs(pet - self.mean).mean())]  # its training L1, one "epoch"

    def predict(self, mri: np.ndarray) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("meanpet.predict before fit")
        return np.broadcast_to(self.mean, (len(mri), *self.mean.shape)).copy()


BASELINES: dict[str, type[Baseline]] = {cls.name: cls for cls in (UNetL1, Pix2Pix, CGAN, CVAE, MeanPET)}


def make_baseline(name: str, options: BaselineOptions | None = None) -> Baseline:
    """A fresh, seeded baseline by name (``unet``, ``pix2pix``, ``cgan``, ``cvae``, ``meanpet``)."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None
    return cls(options)


__all__ = [
    "BASELINES", "VAL_METRIC", "Baseline", "BaselineOptions", "CGAN", "CVAE", "MeanPET", "Pix2Pix", "UNetL1",
    "make_baseline",
]  # fmt: skip
