"""Memory-saving backpropagation through invertible blocks (DESIGN.md, "Memory").

Plain autograd keeps every intermediate activation of every flow step until the backward
pass, so training memory grows linearly with depth. A flow is invertible, so a block of
layers only needs to keep its *output*: during backward each layer's input is rebuilt from
its output by ``inverse``, the layer is re-run with grad enabled on that input, and the
incoming gradient is pushed through the re-run (Gomez et al. 2017, "The Reversible Residual
Network"; the same trick as i-RevNet and FrEIA-free Glow ports). Activation memory is then
one block output per block plus the working set of ONE layer, whatever the depth.

Rule for when it is on (``memory_saving_pays``): only while gradients are being recorded
(training), and by default only from ``AUTO_MIN_DEPTH`` steps per level on, where the saved
memory outgrows the ~1.3x step-time cost. Inference (``torch.no_grad``) always runs plain.

The layers this module drives follow :class:`dualglow_app.model.flows.InvertibleModule`, plus
one hook, ``recompute(y) -> (leaves, y_again, logdet)``: rebuild the input from ``y`` as
leaf tensors that require grad (their concatenation along channels IS the input), and redo
the forward from them with grad enabled. A coupling overrides it to evaluate its network
once for both the inverse and the re-run, which is what keeps the overhead near one extra
forward instead of two.

Drift guard: reconstruction is exact only up to floating-point error, which compounds over
depth (and badly under fp16 or with ill-conditioned weights). Each block keeps a strided
sample of its input (``FINGERPRINT_SIZE`` values per image, a few KiB) and, in backward,
compares the reconstructed input with it; above ``tolerance`` (relative L2) it warns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dualglow_app.log import get_logger

log = get_logger(__name__)

# Depth (flow steps per level) from which DualGlow/Glow turn memory saving on by default. At
# depth 8 on the default CPU grid plain autograd needs well under 1 GiB per image, and the
# ~1.3x step time is not worth it; from 16 on (the paper's 4 x 16 x 512 size) plain autograd
# does not fit common GPUs. See docs/PERFORMANCE.md for the measurements behind it.
AUTO_MIN_DEPTH = 16

# Relative L2 error of a reconstructed block input above which the drift guard warns: float32
# round trips over 32 steps sit around 1e-6; 1e-3 means gradients are off by ~0.1 % or more.
DEFAULT_DRIFT_TOLERANCE = 1e-3

# Values per image kept to check reconstruction: a strided sample, so the check costs a few
# KiB per block instead of the full input the mode exists to avoid storing.
FINGERPRINT_SIZE = 4096


def memory_saving_pays(depth: int) -> bool:
    """The default rule: memory saving from ``AUTO_MIN_DEPTH`` flow steps per level on."""
    return depth >= AUTO_MIN_DEPTH


class Recomputable(Protocol):
    """What :func:`invertible_checkpoint` needs from a layer (flows.InvertibleModule has it)."""

    training: bool

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def inverse(self, y: Tensor) -> Tensor: ...

    def recompute(self, y: Tensor) -> tuple[list[Tensor], Tensor, Tensor]: ...

    def parameters(self, recurse: bool = True) -> Any: ...


@dataclass
class DriftGuard:
    """Tolerance and last measurement of the reconstruction check for one block.

    ``last_error`` is the relative L2 error of the last reconstructed input (``None`` before
    the first memory-saving backward); a training loop may log it. Warnings are rate-limited:
    again only when the error is 10x worse than the last one warned about.
    """

    tolerance: float = DEFAULT_DRIFT_TOLERANCE
    name: str = "block"
    last_error: float | None = None
    _warned_at: float = field(default=0.0, repr=False)

    def check(self, reconstructed: Tensor, fingerprint: Tensor) -> None:
        """Compare the rebuilt input's fingerprint with the stored one; warn if it drifted."""
        got = _fingerprint(reconstructed).to(fingerprint.dtype)
        scale = fingerprint.norm().clamp_min(torch.finfo(fingerprint.dtype).tiny)
        error = float((got - fingerprint).norm() / scale)
        self.last_error = error
        if not math.isfinite(error) or error > self.tolerance:
            if not math.isfinite(error) or error > 10 * self._warned_at:
                log.warning(
                    "memory-saving backward: %s input reconstructed with relative error %.2e "
                    "(tolerance %.0e); gradients are inexact. Likely causes: ill-conditioned "
                    "weights (huge actnorm/1x1-conv scales), low precision (fp16), or an inexact "
                    "inverse. Turn memory saving off (model.set_memory_saving(False)) to compare.",
                    self.name,
                    error,
                    self.tolerance,
                )
                self._warned_at = error if math.isfinite(error) else math.inf
        else:
            log.debug("%s reconstruction error %.2e", self.name, error)


def _fingerprint(x: Tensor) -> Tensor:
    flat = x.detach().flatten(1)
    stride = max(1, flat.shape[1] // FINGERPRINT_SIZE)
    return flat[:, ::stride].clone()


def _trainable(layers: Sequence[Recomputable]) -> list[Tensor]:
    seen: set[int] = set()
    params = []
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _needs_data_init(layers: Sequence[Recomputable]) -> bool:
    """Whether some layer (ActNorm) still initialises from data on its next forward."""
    for layer in layers:
        for m in layer.modules() if isinstance(layer, nn.Module) else [layer]:
            initialized = getattr(m, "initialized", None)
            if isinstance(initialized, Tensor) and m.training and not bool(initialized):
                return True
    return False


def _run_forward(layers: Sequence[Recomputable], x: Tensor) -> tuple[Tensor, Tensor]:
    logdet = x.new_zeros(x.shape[0])
    for layer in layers:
        x, ld = layer(x)
        logdet = logdet + ld
    return x, logdet


class _Run:
    """Non-tensor state of one checkpointed call, handed to the autograd Function."""

    def __init__(self, layers: Sequence[Recomputable], params: list[Tensor], guard: DriftGuard):
        self.layers = layers
        self.params = params
        self.guard = guard

    def backward(
        self, y: Tensor, grad_y: Tensor, grad_logdet: Tensor, need_x_grad: bool
    ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        """Walk the layers backwards: rebuild each input, re-run, backprop one layer at a time.

        Returns the reconstructed block input, its gradient and the parameter gradients (in
        ``self.params`` order). Only one layer's graph is alive at any time.
        """
        index = {id(p): i for i, p in enumerate(self.params)}
        param_grads: list[Tensor | None] = [None] * len(self.params)
        grad: Tensor | None = grad_y
        for k, layer in enumerate(reversed(self.layers)):
            first_layer = k == len(self.layers) - 1
            with torch.enable_grad():
                leaves, y_again, logdet = layer.recompute(y)
            layer_params = [p for p in layer.parameters() if id(p) in index]
            outputs, grads_out = [y_again], [grad]
            if logdet.requires_grad:
                # Every layer's logdet adds straight into the block's, so each gets the
                # block's logdet gradient unchanged.
                outputs.append(logdet)
                grads_out.append(grad_logdet)
            inputs = layer_params if first_layer and not need_x_grad else [*leaves, *layer_params]
            if inputs:
                grads = torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True)
            else:
                grads = ()
            n_leaves = len(inputs) - len(layer_params)
            for p, g in zip(layer_params, grads[n_leaves:], strict=True):
                slot = index[id(p)]
                if g is not None:
                    prev = param_grads[slot]
                    param_grads[slot] = g if prev is None else prev + g
            leaf_grads = (
                [
                    g if g is not None else torch.zeros_like(leaf)
                    for g, leaf in zip(grads[:n_leaves], leaves, strict=True)
                ]
                if n_leaves
                else []
            )
            grad = (
                None
                if not leaf_grads
                else leaf_grads[0]
                if len(leaf_grads) == 1
                else torch.cat(leaf_grads, 1)
            )
            y = leaves[0].detach() if len(leaves) == 1 else torch.cat([t.detach() for t in leaves], 1)
        return y, grad, param_grads


class _InvertibleCheckpoint(torch.autograd.Function):
    """Forward without a graph, keeping only the output; backward by reconstruction."""

    @staticmethod
    def forward(ctx: Any, run: _Run, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        # Function.forward already runs with grad disabled: nothing is recorded here.
        y, logdet = _run_forward(run.layers, x)
        device = x.device.type
        ctx.run = run
        ctx.fingerprint = _fingerprint(x)
        ctx.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        ctx.save_for_backward(y)
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        run: _Run = ctx.run
        device, enabled, dtype = ctx.autocast
        # The re-run must see the numerics of the original forward (AMP included), or the
        # gradients would be those of a different function.
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            x, grad_x, param_grads = run.backward(
                y.detach(), grad_y, grad_logdet, need_x_grad=ctx.needs_input_grad[1]
            )
        run.guard.check(x, ctx.fingerprint)
        return (None, grad_x, *param_grads)


def invertible_checkpoint(
    layers: Sequence[Recomputable], x: Tensor, guard: DriftGuard | None = None
) -> tuple[Tensor, Tensor]:
    """Run ``layers`` in sequence -> ``(y, logdet)``, storing only ``y`` for backward.

    Gradients (input, parameters, logdet) equal plain autograd's up to reconstruction error.
    An ActNorm that still needs its data-dependent init gets it from a plain no-grad pass
    first, so the first step initialises exactly as plain autograd would. When no gradient
    is needed this is just the plain forward.

    Example:
        >>> from dualglow_app.model.flows import FlowStep
        >>> steps = [FlowStep(4, hidden=8, ndim=3) for _ in range(3)]
        >>> x = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
        >>> y, logdet = invertible_checkpoint(steps, x)
        >>> (y.square().sum() - logdet.sum()).backward()
        >>> x.grad.shape
        torch.Size([2, 4, 4, 4, 4])
    """
    params = _trainable(layers)
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return _run_forward(layers, x)
    if _needs_data_init(layers):
        with torch.no_grad():
            _run_forward(layers, x)
    run = _Run(layers, params, guard if guard is not None else DriftGuard())
    y, logdet = _InvertibleCheckpoint.apply(run, x, *params)
    return y, logdet


__all__ = [
    "AUTO_MIN_DEPTH",
    "DEFAULT_DRIFT_TOLERANCE",
    "FINGERPRINT_SIZE",
    "DriftGuard",
    "Recomputable",
    "invertible_checkpoint",
    "memory_saving_pays",
]
