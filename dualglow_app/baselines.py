"""The paper's comparison methods (Sun et al. 2019, Table 1), small enough to share DUAL-GLOW's budget.

Four MRI -> PET translators behind one interface, :class:`Baseline`: ``fit(mri, pet)`` on
stacked model-grid volumes (N, X, Y, Z) on the model's [0, 1] scale, ``predict(mri)``
returning the same shape and scale. Every method sees the same arrays, epochs and batch size
as DUAL-GLOW in the evaluation; nothing is tuned per fold.

- ``unet``: 3D U-Net trained with L1 (the paper's "U-Net").
- ``pix2pix``: the same U-Net as generator + a 3D PatchGAN on (MRI, PET) pairs, loss
  adversarial + 100 * L1 (Isola et al. 2017's weighting).
- ``cgan``: a plain conditional GAN: the U-Net generator gets (MRI, noise), the discriminator
  sees (MRI, PET) as one global decision (no patches); adversarial loss only, no L1.
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

import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualglow_app.log import get_logger

log = get_logger(__name__)


@dataclass
class BaselineOptions:
    """Training settings shared by every baseline (the evaluation copies epochs/batch from DUAL-GLOW).

    ``lr`` is Adam's for the U-Net and the cVAE; the GANs use ``gan_lr`` with beta1 = 0.5
    (pix2pix's settings). ``l1_weight`` is pix2pix's lambda; ``kl_weight`` scales the cVAE's
    KL term (summed over latent dims) against the per-voxel mean L1.
    """

    epochs: int = 20
    batch_size: int = 2
    width: int = 16
    lr: float = 1e-3
    gan_lr: float = 2e-4
    l1_weight: float = 100.0
    kl_weight: float = 1e-3
    latent: int = 16
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    """Discriminator on (MRI, PET): a PatchGAN map of logits, or one logit (``patch=False``)."""

    def __init__(self, width: int = 16, patch: bool = True) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv3d(2, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv3d(w, 2 * w, 4, stride=2, padding=1), nn.InstanceNorm3d(2 * w, affine=True), nn.LeakyReLU(0.2),
            nn.Conv3d(2 * w, 1, 3, padding=1),
        )  # fmt: skip
        self.patch = patch

    def forward(self, mri: Tensor, pet: Tensor) -> Tensor:
        logits = self.features(torch.cat([mri, pet], dim=1))
        return logits if self.patch else logits.mean(dim=(2, 3, 4), keepdim=True)


class Encoder3d(nn.Module):
    """q(z | MRI, PET) of the cVAE: two strided convolutions, global pooling, mean and log-variance."""

    def __init__(self, width: int, latent: int) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv3d(2, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv3d(w, 2 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.head = nn.Linear(2 * w, 2 * latent)

    def forward(self, mri: Tensor, pet: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(torch.cat([mri, pet], dim=1)).mean(dim=(2, 3, 4))
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)


# --------------------------------------------------------------------------- methods


class Baseline:
    """fit / predict on stacked volumes; subclasses define ``_build`` and ``_step``.

    Seeded: the same options and arrays give the same weights (on one device and thread count).
    """

    name: ClassVar[str] = ""

    def __init__(self, options: BaselineOptions | None = None) -> None:
        self.options = options or BaselineOptions()
        self.device = torch.device(self.options.device)
        self.fit_seconds = 0.0
        torch.manual_seed(self.options.seed)
        self._build()
        self._noise = torch.Generator().manual_seed(self.options.seed + 1)

    def _build(self) -> None:
        raise NotImplementedError

    def _step(self, mri: Tensor, pet: Tensor) -> float:
        raise NotImplementedError

    def _generate(self, mri: Tensor) -> Tensor:
        raise NotImplementedError

    def _modules(self) -> list[nn.Module]:
        return [m for m in vars(self).values() if isinstance(m, nn.Module)]

    def fit(self, mri: np.ndarray, pet: np.ndarray) -> list[float]:
        """Train on (N, X, Y, Z) arrays on [0, 1]; returns the mean loss of each epoch."""
        if mri.shape != pet.shape or mri.ndim != 4:
            raise ValueError(f"{self.name}.fit: mri {mri.shape} and pet {pet.shape} must both be (N, X, Y, Z)")
        if any(s % 4 for s in mri.shape[1:]):
            raise ValueError(f"{self.name}: grid sides {mri.shape[1:]} must be divisible by 4 (two poolings)")
        start = time.perf_counter()
        for module in self._modules():
            module.train()
        rng = np.random.default_rng(self.options.seed)
        history = []
        for _ in range(self.options.epochs):
            order = rng.permutation(len(mri))
            losses = []
            for first in range(0, len(order), self.options.batch_size):
                rows = np.sort(order[first : first + self.options.batch_size])
                losses.append(self._step(self._tensor(mri[rows]), self._tensor(pet[rows])))
            history.append(float(np.mean(losses)))
        self.fit_seconds = time.perf_counter() - start
        log.debug("%s: %d epochs in %.1f s, last loss %.4f", self.name, self.options.epochs, self.fit_seconds,
                  history[-1] if history else float("nan"))  # fmt: skip
        return history

    @torch.no_grad()
    def predict(self, mri: np.ndarray) -> np.ndarray:
        """Synthetic PET on the model's [0, 1] scale, one volume at a time (bounded memory)."""
        for module in self._modules():
            module.eval()
        out = [self._generate(self._tensor(mri[i : i + 1]))[0, 0].cpu().numpy() for i in range(len(mri))]
        return np.asarray(out, dtype=np.float32)

    def _tensor(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[:, None].to(self.device)

    def _adam(self, module: nn.Module, gan: bool = False) -> torch.optim.Optimizer:
        if gan:
            return torch.optim.Adam(module.parameters(), lr=self.options.gan_lr, betas=(0.5, 0.999))
        return torch.optim.Adam(module.parameters(), lr=self.options.lr)


class UNetL1(Baseline):
    """3D U-Net, L1 loss."""

    name = "unet"

    def _build(self) -> None:
        self.net = UNet3d(1, self.options.width).to(self.device)
        self.opt = self._adam(self.net)

    def _step(self, mri: Tensor, pet: Tensor) -> float:
        loss = F.l1_loss(self.net(mri), pet)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def _generate(self, mri: Tensor) -> Tensor:
        return self.net(mri)


class _GAN(Baseline):
    """Shared adversarial step; subclasses choose the generator input, critic and L1 weight."""

    patch = True
    l1 = True

    def _build(self) -> None:
        self.gen = UNet3d(self._gen_channels(), self.options.width).to(self.device)
        self.critic = Critic3d(self.options.width, patch=self.patch).to(self.device)
        self.opt_g = self._adam(self.gen, gan=True)
        self.opt_d = self._adam(self.critic, gan=True)

    def _gen_channels(self) -> int:
        return 1

    def _gen_input(self, mri: Tensor) -> Tensor:
        return mri

    def _step(self, mri: Tensor, pet: Tensor) -> float:
        fake = self.gen(self._gen_input(mri))
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
        loss_g = F.binary_cross_entropy_with_logits(gen_logits, torch.ones_like(gen_logits))
        if self.l1:
            loss_g = loss_g + self.options.l1_weight * F.l1_loss(fake, pet)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return float(loss_g.detach())

    def _generate(self, mri: Tensor) -> Tensor:
        return self.gen(self._gen_input(mri))


class Pix2Pix(_GAN):
    """U-Net generator + 3D PatchGAN, adversarial + L1 (lambda = ``l1_weight``)."""

    name = "pix2pix"


class CGAN(_GAN):
    """Plain conditional GAN: generator of (MRI, noise), one global critic decision, no L1."""

    name = "cgan"
    patch = False
    l1 = False

    def _gen_channels(self) -> int:
        return 2

    def _gen_input(self, mri: Tensor) -> Tensor:
        # Noise from the method's own seeded generator: predictions repeat for a given seed.
        noise = torch.randn(mri.shape, generator=self._noise).to(mri.device)
        return torch.cat([mri, noise], dim=1)


class CVAE(Baseline):
    """Conditional VAE: q(z | MRI, PET), p(PET | MRI, z) a U-Net; predicts with z = 0."""

    name = "cvae"

    def _build(self) -> None:
        self.encoder = Encoder3d(self.options.width, self.options.latent).to(self.device)
        self.decoder = UNet3d(1, self.options.width, extra=self.options.latent).to(self.device)
        self.opt = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()], lr=self.options.lr)

    def _step(self, mri: Tensor, pet: Tensor) -> float:
        mu, logvar = self.encoder(mri, pet)
        eps = torch.randn(mu.shape, generator=self._noise).to(mu.device)
        recon = self.decoder(mri, mu + torch.exp(0.5 * logvar) * eps)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
        loss = F.l1_loss(recon, pet) + self.options.kl_weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def _generate(self, mri: Tensor) -> Tensor:
        z = torch.zeros(mri.shape[0], self.options.latent, device=mri.device)
        return self.decoder(mri, z)


class MeanPET(Baseline):
    """The mean training PET for every MRI: the reference a model of the MRI has to beat."""

    name = "meanpet"

    def _build(self) -> None:
        self.mean: np.ndarray | None = None

    def fit(self, mri: np.ndarray, pet: np.ndarray) -> list[float]:
        if mri.shape != pet.shape or mri.ndim != 4:
            raise ValueError(f"{self.name}.fit: mri {mri.shape} and pet {pet.shape} must both be (N, X, Y, Z)")
        start = time.perf_counter()
        self.mean = np.asarray(pet, dtype=np.float64).mean(0).astype(np.float32)
        self.fit_seconds = time.perf_counter() - start
        return [float(np.abs(pet - self.mean).mean())]  # its training L1, one "epoch"

    def predict(self, mri: np.ndarray) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("meanpet.predict before fit")
        return np.broadcast_to(self.mean, mri.shape).copy()


BASELINES: dict[str, type[Baseline]] = {cls.name: cls for cls in (UNetL1, Pix2Pix, CGAN, CVAE, MeanPET)}


def make_baseline(name: str, options: BaselineOptions | None = None) -> Baseline:
    """A fresh, seeded baseline by name (``unet``, ``pix2pix``, ``cgan``, ``cvae``, ``meanpet``)."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None
    return cls(options)


__all__ = ["BASELINES", "Baseline", "BaselineOptions", "CGAN", "CVAE", "MeanPET", "Pix2Pix", "UNetL1", "make_baseline"]
