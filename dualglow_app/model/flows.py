"""Glow building blocks for 2D and 3D images (Kingma & Dhariwal 2018, as used by DUAL-GLOW).

Every layer works on tensors shaped ``(batch, channels, *spatial)`` with 2 or 3 spatial
dimensions; the dimensionality is fixed at construction (``ndim``) and picks the convolution.
The invertible-layer contract is written once, in :class:`InvertibleModule`.

Read top to bottom: ActNorm -> InvConv -> AffineCoupling form a :class:`FlowStep`;
:class:`Squeeze` + ``depth`` steps (+ :class:`Split`) form a :class:`GlowLevel`; ``levels``
of those form the multi-scale :class:`Glow`.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dualglow_app.log import get_logger
from dualglow_app.model.memory import DriftGuard, invertible_checkpoint, memory_saving_pays

log = get_logger(__name__)


# oneDNN's forward convolution is fast from this many output channels on; below it (an input
# gradient of 4 channels, a weight gradient of 8 output channels at level 0) PyTorch's own
# backward is the faster (measured at the default grid's shapes, docs/PERFORMANCE.md).
_FORWARD_CONV_MIN_CHANNELS = 16


class _SameConvFunction(torch.autograd.Function):
    """A stride-1, "same"-padded convolution on oneDNN, with its gradients as convolutions.

    Both gradients of such a convolution are themselves convolutions, which oneDNN's forward
    kernel computes at about the forward's cost, where PyTorch's backward for batch 1 and few
    voxels (its im2col fallback) took 2-5x that at levels 1 and 2:

    - input: the output gradient convolved with the flipped, transposed kernel, same padding;
    - weight: the input, batch and channel axes swapped, convolved with the output gradient
      (batch and channel swapped) as the kernel; the output is the kernel's gradient.

    Same mathematics as nn.Conv3d; results differ by float32 rounding only (tests compare
    them). Where the forward kernel would have few output channels PyTorch's backward runs.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        ones = [1] * len(padding)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, ones, ones, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        padding, nd = ctx.padding, len(ctx.padding)
        ones, zeros, spatial = [1] * nd, [0] * nd, list(range(2, 2 + nd))
        grad = grad.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x_by_conv = need_x and weight.shape[1] >= _FORWARD_CONV_MIN_CHANNELS
        w_by_conv = need_w and weight.shape[0] >= _FORWARD_CONV_MIN_CHANNELS
        grad_x = grad_w = None
        if need_x and not x_by_conv or need_w and not w_by_conv:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, ones, padding, ones, False, zeros, 1,
                [need_x and not x_by_conv, need_w and not w_by_conv, False],
            )
        if x_by_conv:
            flipped = weight.transpose(0, 1).flip(spatial)
            grad_x = torch.ops.aten.mkldnn_convolution(grad, flipped, None, padding, ones, ones, 1)
        if w_by_conv:
            grad_w = torch.ops.aten.mkldnn_convolution(
                x.transpose(0, 1).contiguous(), grad.transpose(0, 1).contiguous(), None, padding, ones, ones, 1
            ).transpose(0, 1)
        grad_b = grad.sum([0, *spatial]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class _OneDNNConv:
    """Float32 CPU convolutions on oneDNN, forward and backward (:class:`_SameConvFunction`).

    PyTorch's dispatcher sends a float32 CPU convolution with batch 1, a 3x3(x3) kernel and
    fewer than 20,480 values in (N, C, first two spatial axes) to its im2col fallback
    (``slow_conv3d``): every coupling convolution of levels 0 and 1 at batch 1 on the default
    grid. oneDNN is faster there, and so are the gradients taken as forward convolutions.
    From batch 2 on the dispatcher already picks oneDNN, whose own backward is then the
    faster (measured at hidden 128, batch 2): those keep the stock path, and so do other
    dtypes (bf16 under autocast already goes to oneDNN; float64 tests), devices, strided or
    unpadded layers and an unavailable oneDNN. State and parameters are nn.Conv2d/3d's, so
    model files do not change.
    """

    def forward(self, x: Tensor) -> Tensor:
        layer = cast(nn.Conv3d, self)
        if (
            x.device.type == "cpu"
            and x.shape[0] == 1
            and x.dtype == torch.float32
            and layer.weight.dtype == torch.float32
            and _ONEDNN
            and not torch.is_autocast_enabled("cpu")
            and layer.groups == 1
            and all(s == 1 for s in layer.stride)
            and all(d == 1 for d in layer.dilation)
            and layer.padding == tuple(k // 2 for k in layer.kernel_size)
            and all(k % 2 == 1 for k in layer.kernel_size)
        ):
            return cast(Tensor, _SameConvFunction.apply(x, layer.weight, layer.bias, list(layer.padding)))
        return cast(Tensor, super().forward(x))  # type: ignore[misc]


class Conv2d(_OneDNNConv, nn.Conv2d):
    """nn.Conv2d that takes oneDNN for float32 on the CPU (see :class:`_OneDNNConv`)."""


class Conv3d(_OneDNNConv, nn.Conv3d):
    """nn.Conv3d that takes oneDNN for float32 on the CPU (see :class:`_OneDNNConv`)."""


_ONEDNN = torch.backends.mkldnn.is_available()
_CONV: dict[int, type[nn.Conv2d] | type[nn.Conv3d]] = {2: Conv2d, 3: Conv3d}

# Smallest per-channel standard deviation ActNorm divides by: a constant channel (empty
# background after a squeeze) would otherwise give 1/0 and NaN (a known Glow-port pitfall).
ACTNORM_MIN_STD = 1e-3


def conv(ndim: int, c_in: int, c_out: int, kernel_size: int) -> nn.Conv2d | nn.Conv3d:
    """A same-padded 2D or 3D convolution."""
    if ndim not in _CONV:
        raise ValueError(f"ndim={ndim} is not supported: pass ndim=2 (images) or ndim=3 (volumes).")
    return _CONV[ndim](c_in, c_out, kernel_size, padding=kernel_size // 2)


def zero_conv(ndim: int, c_in: int, c_out: int) -> nn.Conv2d | nn.Conv3d:
    """A 3x3(x3) convolution starting at exactly zero, so a new block starts as the identity."""
    layer = conv(ndim, c_in, c_out, 3)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    return layer


def _voxels(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _channel_mix(weight: Tensor, x: Tensor) -> Tensor:
    """``weight`` (O, C) applied at every voxel of ``x`` (B, C, *S); one matrix product at
    batch 1, where einsum's reshuffling costs more than the product (channels 8-128)."""
    if x.shape[0] == 1:
        return (weight @ x.reshape(x.shape[1], -1)).view(1, -1, *x.shape[2:])
    return torch.einsum("oc,bc...->bo...", weight, x)


def _voxel_outer(a: Tensor, b: Tensor) -> Tensor:
    """sum over batch and voxels of ``a b^T``: (C_a, C_b) from (B, C_a, *S) and (B, C_b, *S)."""
    if a.shape[0] == 1:
        return a.reshape(a.shape[1], -1) @ b.reshape(b.shape[1], -1).T
    return torch.einsum("bc...,bo...->co", a, b)


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """Reshape a (C,) vector so it broadcasts over (B, C, *spatial)."""
    return v.view(1, -1, *([1] * ndim))


class InvertibleModule(nn.Module):
    """The contract every flow layer here follows.

    - ``forward(x) -> (y, logdet)``: ``y`` has the shape of ``x`` unless the layer documents
      otherwise (Squeeze); ``logdet`` has shape ``(batch,)`` and is ``log|det dy/dx|`` per
      sample, summed over channels and voxels. Never a bare tensor, never a flag-dependent
      return.
    - ``inverse(y) -> x``: the exact inverse, so ``inverse(forward(x)[0]) == x`` up to
      floating-point error (tests hold it to 1e-5 in float32 and 1e-10 in float64). The
      inverse's log-determinant is ``-logdet`` and is not returned: likelihood training only
      ever runs forward, and sampling needs no density.
    - A layer's state lives in parameters and registered buffers only, so ``state_dict``
      round-trips it and ``inverse`` can recompute inputs from outputs.
    - ``recompute(y) -> (leaves, y_again, logdet)`` rebuilds the input from ``y`` as leaf
      tensors requiring grad (concatenated along channels they are the input) and redoes the
      forward from them with grad enabled: the hook of the memory-saving backward
      (:mod:`dualglow_app.model.memory`). The default inverts then re-runs.
    - ``backprop(y, grad_y, grad_logdet, need_input_grad) -> (x, grad_x, param_grads)``,
      optional and preferred by the memory-saving backward when present: the input rebuilt
      from ``y``, the gradient pushed through the layer by hand (``grad_logdet`` is the
      per-sample gradient of the logdet) and the gradients of the parameters that require
      one, in ``parameters()`` order. Every layer here has one; tests compare each with
      autograd.

    Example:
        >>> layer = ActNorm(4, ndim=2)
        >>> x = torch.randn(8, 4, 16, 16)
        >>> y, logdet = layer(x)
        >>> logdet.shape, torch.allclose(layer.inverse(y), x, atol=1e-5)
        (torch.Size([8]), True)
    """

    def __init__(self, ndim: int) -> None:
        super().__init__()
        if ndim not in _CONV:
            raise ValueError(
                f"ndim={ndim} is not supported: pass ndim=2 (images) or ndim=3 (volumes)."
            )
        self.ndim = ndim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def recompute(self, y: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Input rebuilt from ``y`` (as grad-requiring leaves) and the forward redone from it."""
        with torch.no_grad():
            x = self.inverse(y)
        x.requires_grad_(True)
        y_again, logdet = self(x)
        return [x], y_again, logdet

    def _trainable_grads(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """``grads`` (one per parameter) restricted to the parameters that require grad."""
        return [g for p, g in zip(self.parameters(), grads, strict=True) if p.requires_grad]


class ActNorm(InvertibleModule):
    """Per-channel affine ``y = (x + loc) * exp(log_scale)``, initialised from the first batch.

    The first forward pass in training mode sets ``loc``/``log_scale`` so that batch has zero
    mean and unit variance per channel; ``initialized`` is a buffer, so the init is saved with
    the weights and never re-runs after loading. In eval mode an uninitialised ActNorm is the
    identity: evaluation never changes the model.

    Example:
        >>> norm = ActNorm(2, ndim=3)
        >>> y, _ = norm(torch.randn(4, 2, 8, 8, 8) * 5 + 3)   # initialises here
        >>> bool(norm.initialized)
        True
    """

    initialized: Tensor

    def __init__(self, channels: int, ndim: int) -> None:
        super().__init__(ndim)
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent init from ``x``; called by the first forward pass."""
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        std = flat.std(dim=1, unbiased=False).clamp_min(ACTNORM_MIN_STD)
        self.loc.copy_(-flat.mean(dim=1))
        self.log_scale.copy_(-torch.log(std))
        self.initialized.fill_(True)
        log.debug("actnorm initialised on %d channels", x.shape[1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized:
            self.initialize(x)
        y = (x + _per_channel(self.loc, self.ndim)) * _per_channel(self.log_scale.exp(), self.ndim)
        logdet = self.log_scale.sum() * _voxels(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * _per_channel((-self.log_scale).exp(), self.ndim) - _per_channel(
            self.loc, self.ndim
        )

    def backprop(
        self, y: Tensor, grad_y: Tensor, grad_logdet: Tensor, need_input_grad: bool = True
    ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        with torch.no_grad():
            x = self.inverse(y)
            dims = [0, *range(2, y.dim())]
            # y = (x + loc) * e^s: dy/dx = e^s, dy/dloc = e^s, dy/ds = y; logdet = V * sum(s).
            grad_x = grad_y * _per_channel(self.log_scale.exp(), self.ndim)
            g_loc = grad_x.sum(dims)
            g_log_scale = (grad_y * y).sum(dims) + grad_logdet.sum() * _voxels(y)
        return x, grad_x if need_input_grad else None, self._trainable_grads([g_loc, g_log_scale])


class InvConv(InvertibleModule):
    """Invertible 1x1 (2D) or 1x1x1 (3D) convolution in LU form, ``W = P L (U + diag(s))``.

    P is a fixed permutation (buffer), L unit lower triangular, U strictly upper triangular,
    and ``s = sign * exp(log_s)`` with the sign fixed at init. The log-determinant is then
    exactly ``sum(log_s) * voxels``: no slogdet, which is unreliable in float32.

    Example:
        >>> mix = InvConv(8, ndim=3)
        >>> y, logdet = mix(torch.randn(2, 8, 4, 4, 4))
        >>> y.shape
        torch.Size([2, 8, 4, 4, 4])
    """

    perm: Tensor
    sign_s: Tensor

    def __init__(self, channels: int, ndim: int) -> None:
        super().__init__(ndim)
        # A random rotation: well conditioned, and mixes all channels from the start.
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.log_s.shape[0], dtype=self.log_s.dtype, device=self.log_s.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """The (C, C) mixing matrix assembled from its LU factors."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_weight(self) -> Tensor:
        """W^-1 = U^-1 L^-1 P^T by triangular solves: more accurate than a general inverse."""
        lower, upper = self._factors()
        lower_inv_pt = torch.linalg.solve_triangular(
            lower, self.perm.T, upper=False, unitriangular=True
        )
        return torch.linalg.solve_triangular(upper, lower_inv_pt, upper=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Flow arithmetic stays in the parameters' precision under autocast: a bf16 W (or
        # W^-1) would make inverse(forward(x)) drift by ~1e-2 (measured, memory saving).
        with torch.autocast(x.device.type, enabled=False):
            y = torch.einsum("oc,bc...->bo...", self.weight(), x.to(self.log_s.dtype))
        logdet = self.log_s.sum() * _voxels(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        with torch.autocast(y.device.type, enabled=False):
            return torch.einsum("oc,bc...->bo...", self.inverse_weight(), y.to(self.log_s.dtype))

    def backprop(
        self, y: Tensor, grad_y: Tensor, grad_logdet: Tensor, need_input_grad: bool = True
    ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        with torch.no_grad(), torch.autocast(y.device.type, enabled=False):
            x = _channel_mix(self.inverse_weight(), y.to(self.log_s.dtype))
            lower, upper = self._factors()
            # P is a permutation matrix: P @ A = A[rows] and P^T @ A = A[cols], exactly.
            rows, cols = self.perm.argmax(dim=1), self.perm.argmax(dim=0)
            perm_lower = lower[rows]
            # y = W x per voxel: dL/dx = W^T g, dL/dW = sum over batch and voxels of g x^T;
            # W = (P L) U, so dL/dL = P^T dL/dW U^T and dL/dU = (P L)^T dL/dW = L^T P^T dL/dW.
            perm_t_g = _voxel_outer(grad_y.to(x.dtype), x)[cols]
            g_lower = torch.tril(perm_t_g @ upper.T, -1)
            g_upper_full = lower.T @ perm_t_g
            g_upper = torch.triu(g_upper_full, 1)
            # U's diagonal is sign * exp(log_s); logdet = V * sum(log_s).
            g_log_s = torch.diagonal(g_upper_full) * self.sign_s * self.log_s.exp()
            g_log_s = g_log_s + grad_logdet.sum() * _voxels(y)
            grad_x = _channel_mix((perm_lower @ upper).T, grad_y.to(x.dtype)) if need_input_grad else None
        return x, grad_x, self._trainable_grads([g_lower, g_upper, g_log_s])


class AffineCoupling(InvertibleModule):
    """Affine coupling: the first half of the channels sets scale and shift of the second.

    ``y_b = x_b * exp(log_s) + t`` with ``log_s = clamp * tanh(h / clamp)``: the soft clamp keeps
    the scale within ``exp(+-clamp)``, so training cannot blow up through an unbounded exp.
    The network's last conv is zero-initialised, so a fresh coupling is the identity.

    Example:
        >>> coupling = AffineCoupling(4, hidden=16, ndim=2)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.equal(coupling(x)[0], x)     # identity at init
        True
    """

    def __init__(self, channels: int, hidden: int, ndim: int, clamp: float = 2.0) -> None:
        super().__init__(ndim)
        if channels < 2:
            raise ValueError(f"AffineCoupling needs >= 2 channels, got {channels}: squeeze first.")
        self.n_keep = channels // 2
        self.n_change = channels - self.n_keep
        self.clamp = clamp
        self.net = nn.Sequential(
            conv(ndim, self.n_keep, hidden, 3),
            nn.ReLU(),
            conv(ndim, hidden, hidden, 1),
            nn.ReLU(),
            zero_conv(ndim, hidden, 2 * self.n_change),
        )

    def _scale_shift(self, x_keep: Tensor) -> tuple[Tensor, Tensor]:
        # The network may run in bf16 under autocast; scale and shift are taken back to the
        # input's precision first, so the affine map, its inverse and the logdet are exact
        # float32 functions of the (deterministic) network output.
        h_scale, shift = self.net(x_keep).to(x_keep.dtype).chunk(2, dim=1)
        return self.clamp * torch.tanh(h_scale / self.clamp), shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_keep, x_change = x.split([self.n_keep, self.n_change], dim=1)
        log_s, shift = self._scale_shift(x_keep)
        y_change = x_change * log_s.exp() + shift
        return torch.cat([x_keep, y_change], dim=1), log_s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        y_keep, y_change = y.split([self.n_keep, self.n_change], dim=1)
        log_s, shift = self._scale_shift(y_keep)
        return torch.cat([y_keep, (y_change - shift) * (-log_s).exp()], dim=1)

    def backprop(
        self, y: Tensor, grad_y: Tensor, grad_logdet: Tensor, need_input_grad: bool = True
    ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        # x_keep == y_keep, so one evaluation of the network serves both the inverse and the
        # gradient: the memory-saving backward then costs ~one extra forward, not two. The
        # affine map's gradient is written out; autograd only runs through the network.
        y_keep, y_change = y.split([self.n_keep, self.n_change], dim=1)
        g_keep, g_change = grad_y.split([self.n_keep, self.n_change], dim=1)
        params = [p for p in self.parameters() if p.requires_grad]
        x_keep = y_keep.detach().requires_grad_(need_input_grad)
        with torch.enable_grad():
            out = self.net(x_keep).to(y.dtype)
        with torch.no_grad():
            h_scale, shift = out.chunk(2, dim=1)
            tanh = torch.tanh(h_scale / self.clamp)
            log_s = self.clamp * tanh
            moved = y_change - shift  # = x_change * exp(log_s)
            x_change = moved * (-log_s).exp()
            g_x_change = g_change * log_s.exp()
            # d logdet / d log_s = 1 per voxel; d log_s / d h = 1 - tanh^2.
            g_log_s = g_change * moved + grad_logdet.view(-1, *([1] * (y.dim() - 1)))
            g_out = torch.cat([g_log_s * (1 - tanh * tanh), g_change], dim=1)
        inputs = [x_keep, *params] if need_input_grad else params
        grads: list[Tensor | None] = (
            list(torch.autograd.grad(out, inputs, g_out, allow_unused=True)) if inputs else []
        )
        x = torch.cat([y_keep, x_change], dim=1)
        if not need_input_grad:
            return x, None, grads
        g_keep_net = grads[0]
        assert g_keep_net is not None  # the network reads x_keep
        grad_x = torch.cat([g_keep + g_keep_net, g_x_change], dim=1)
        return x, grad_x, grads[1:]


class Squeeze(InvertibleModule):
    """Trade space for channels: (B, C, *S) -> (B, C * 2**ndim, *S / 2); volume preserving.

    Example:
        >>> Squeeze(ndim=3)(torch.zeros(1, 1, 4, 4, 4))[0].shape
        torch.Size([1, 8, 2, 2, 2])
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, *spatial = x.shape
        # (B, C, s1/2, 2, s2/2, 2, ...) -> move the factor-2 axes next to C and merge them.
        split_shape = [b, c] + [n for s in spatial for n in (s // 2, 2)]
        nd = self.ndim
        order = [0, 1] + [3 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
        y = x.reshape(split_shape).permute(order)
        y = y.reshape(b, c * 2**nd, *(s // 2 for s in spatial))
        return y, x.new_zeros(b)

    def inverse(self, y: Tensor) -> Tensor:
        b, c, *spatial = y.shape
        nd = self.ndim
        x = y.reshape(b, c // 2**nd, *([2] * nd), *spatial)
        order = [0, 1] + [n for i in range(nd) for n in (2 + nd + i, 2 + i)]
        return x.permute(order).reshape(b, c // 2**nd, *(s * 2 for s in spatial))

    def backprop(
        self, y: Tensor, grad_y: Tensor, grad_logdet: Tensor, need_input_grad: bool = True
    ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        # A permutation of the voxels: its gradient is the same permutation undone.
        return self.inverse(y), self.inverse(grad_y) if need_input_grad else None, []


class Split(nn.Module):
    """Factor out half the channels (multi-scale architecture). Not an InvertibleModule: it
    returns two tensors, ``forward(x) -> (kept, z)``, and ``inverse(kept, z) -> x``. It is a
    pure re-indexing, so its log-determinant is zero; the density of ``z`` is the caller's.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.n_keep = channels // 2
        self.n_out = channels - self.n_keep

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kept, z = x.split([self.n_keep, self.n_out], dim=1)
        return kept, z

    def inverse(self, kept: Tensor, z: Tensor) -> Tensor:
        return torch.cat([kept, z], dim=1)


class FlowStep(InvertibleModule):
    """One Glow step: ActNorm -> InvConv -> AffineCoupling.

    Example:
        >>> step = FlowStep(8, hidden=16, ndim=3)
        >>> y, logdet = step(torch.randn(2, 8, 4, 4, 4))
    """

    def __init__(self, channels: int, hidden: int, ndim: int, clamp: float = 2.0) -> None:
        super().__init__(ndim)
        self.layers = nn.ModuleList(
            [
                ActNorm(channels, ndim),
                InvConv(channels, ndim),
                AffineCoupling(channels, hidden, ndim, clamp),
            ]
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = cast(InvertibleModule, layer).inverse(y)
        return y


class GlowLevel(nn.Module):
    """Squeeze, ``depth`` flow steps, then (unless it is the top level) split off half.

    ``forward(x) -> (h, z, logdet)``: ``h`` goes on to the next level (``None`` at the top),
    ``z`` is this level's latent. ``inverse(h, z) -> x``.

    With ``memory_saving`` (and gradients recorded), squeeze + steps run as one
    :func:`~dualglow_app.model.memory.invertible_checkpoint` block: only the level's output is
    kept, and the backward pass walks the layers one by one, recomputing inputs by inverse.
    ``guard.last_error`` then holds the last reconstruction error of the level's input.
    """

    def __init__(
        self,
        in_channels: int,
        depth: int,
        hidden: int,
        ndim: int,
        split: bool,
        clamp: float = 2.0,
        memory_saving: bool = False,
    ) -> None:
        super().__init__()
        channels = in_channels * 2**ndim
        self.squeeze = Squeeze(ndim)
        self.steps = nn.ModuleList([FlowStep(channels, hidden, ndim, clamp) for _ in range(depth)])
        self.split = Split(channels) if split else None
        self.out_channels = self.split.n_keep if self.split is not None else 0
        self.z_channels = self.split.n_out if self.split is not None else channels
        self.memory_saving = memory_saving
        self.guard = DriftGuard(name=f"level ({channels} channels)")

    def segments(self) -> list[list[InvertibleModule]]:
        """The checkpointed block in forward order: one segment per step (squeeze joins the
        first), so backward holds one step's parameter gradients at a time."""
        segments = [list(cast(FlowStep, step).layers) for step in self.steps]
        segments[0].insert(0, self.squeeze)
        return cast(list[list[InvertibleModule]], segments)

    def forward(self, x: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        if self.memory_saving:
            x, logdet = invertible_checkpoint(self.segments(), x, self.guard)
        else:
            x, logdet = self.squeeze(x)
            for step in self.steps:
                x, ld = step(x)
                logdet = logdet + ld
        if self.split is None:
            return None, x, logdet
        h, z = self.split(x)
        return h, z, logdet

    def inverse(self, h: Tensor | None, z: Tensor) -> Tensor:
        x = z if self.split is None or h is None else self.split.inverse(h, z)
        for step in reversed(self.steps):
            x = cast(FlowStep, step).inverse(x)
        return self.squeeze.inverse(x)


class Glow(nn.Module):
    """Multi-scale Glow: ``levels`` levels of squeeze + ``depth`` steps, splitting half the
    channels after every level but the last.

    ``forward(x) -> (latents, logdet)`` with ``latents[i]`` the latent of level ``i`` (the
    last one is the top) and ``logdet`` of shape ``(batch,)``; ``inverse(latents) -> x``.
    Spatial sizes must be divisible by ``2**levels`` (callers check; see ``DualGlow``).

    ``memory_saving`` (default ``None``: :func:`~dualglow_app.model.memory.memory_saving_pays`,
    i.e. on from 16 steps per level) trades ~1.3x training step time for activation memory
    that no longer grows with depth; it changes nothing without gradients (inference) and
    never changes results beyond floating-point error. Switch with :meth:`set_memory_saving`.

    Example:
        >>> flow = Glow(in_channels=1, ndim=3, levels=2, depth=2, hidden=16)
        >>> zs, logdet = flow(torch.randn(2, 1, 8, 8, 8))
        >>> [tuple(z.shape) for z in zs]
        [(2, 4, 4, 4, 4), (2, 32, 2, 2, 2)]
        >>> flow.inverse(zs).shape
        torch.Size([2, 1, 8, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        ndim: int,
        levels: int,
        depth: int,
        hidden: int,
        clamp: float = 2.0,
        memory_saving: bool | None = None,
    ) -> None:
        super().__init__()
        if levels < 1 or depth < 1:
            raise ValueError(
                f"Glow needs levels >= 1 and depth >= 1, got levels={levels}, depth={depth}."
            )
        self.in_channels = in_channels
        self.ndim = ndim
        self.levels = nn.ModuleList()
        channels = in_channels
        for i in range(levels):
            level = GlowLevel(channels, depth, hidden, ndim, split=i < levels - 1, clamp=clamp)
            self.levels.append(level)
            channels = level.out_channels
        self.depth = depth
        self.set_memory_saving(memory_saving)

    @property
    def memory_saving(self) -> bool:
        """Whether training backpropagates by reconstruction (see :meth:`set_memory_saving`)."""
        return all(cast(GlowLevel, level).memory_saving for level in self.levels)

    def set_memory_saving(self, enabled: bool | None = True, tolerance: float | None = None) -> None:
        """Turn memory-saving backprop on or off; ``None`` applies the default depth rule.

        ``tolerance`` sets the drift guard's relative reconstruction error above which the
        backward pass logs a warning (default ``memory.DEFAULT_DRIFT_TOLERANCE``).
        """
        on = memory_saving_pays(self.depth) if enabled is None else bool(enabled)
        for level in self.levels:
            level = cast(GlowLevel, level)
            level.memory_saving = on
            if tolerance is not None:
                level.guard.tolerance = tolerance

    @property
    def reconstruction_errors(self) -> list[float | None]:
        """Last relative reconstruction error of each level's input (memory saving only)."""
        return [cast(GlowLevel, level).guard.last_error for level in self.levels]

    @property
    def latent_channels(self) -> list[int]:
        """Channels of each level's latent, bottom to top."""
        return [cast(GlowLevel, level).z_channels for level in self.levels]

    def latent_shapes(self, spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
        """(C, *spatial) of each level's latent for an input of the given spatial size."""
        shapes = []
        for i, c in enumerate(self.latent_channels):
            shapes.append((c, *(s // 2 ** (i + 1) for s in spatial)))
        return shapes

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        latents: list[Tensor] = []
        logdet = x.new_zeros(x.shape[0])
        h: Tensor | None = x
        for level in self.levels:
            assert h is not None
            h, z, ld = level(h)
            latents.append(z)
            logdet = logdet + ld
        return latents, logdet

    def inverse(self, latents: list[Tensor]) -> Tensor:
        h: Tensor | None = None
        for level, z in zip(reversed(self.levels), reversed(latents), strict=True):
            h = cast(GlowLevel, level).inverse(h, z)
        assert h is not None
        return h


def gaussian_log_prob(z: Tensor, mean: Tensor, log_sigma: Tensor) -> Tensor:
    """Sum over all but the batch axis of log N(z; mean, exp(log_sigma)**2)."""
    log_p = -0.5 * (
        math.log(2 * math.pi) + 2 * log_sigma + ((z - mean) * torch.exp(-log_sigma)) ** 2
    )
    return log_p.flatten(1).sum(1)


__all__ = [
    "ACTNORM_MIN_STD",
    "ActNorm",
    "AffineCoupling",
    "FlowStep",
    "Glow",
    "GlowLevel",
    "InvConv",
    "InvertibleModule",
    "Split",
    "Squeeze",
    "conv",
    "gaussian_log_prob",
    "zero_conv",
]
