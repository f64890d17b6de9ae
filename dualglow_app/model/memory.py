"""Memory-saving backpropagation through invertible blocks (docs/DESIGN.md, "Memory").

Plain autograd keeps every intermediate activation of every flow step until the backward
pass, so training memory grows linearly with depth. A flow is invertible, so a block of
layers only needs to keep its *output*: during backward each layer's input is rebuilt from
its output by ``inverse``, the layer is re-run with grad enabled on that input, and the
incoming gradient is pushed through the re-run (Gomez et al. 2017, "The Reversible Residual
Network: Backpropagation Without Storing Activations"). Activation memory is then
one block output per block plus the working set of ONE layer, whatever the depth.

A block (a Glow level) is a chain of segments (one flow step each), one autograd Function
per segment: segment k hands its reconstructed input to segment k-1 through a shared baton,
so only the block's last output is stored, and the parameter gradients alive at once are
those of one step (a single Function for the whole level would hold all of the level's).

Rule for when it is on (``memory_saving_pays``): only while gradients are being recorded
(training), and by default only from ``AUTO_MIN_DEPTH`` steps per level on, where the saved
memory outgrows the ~1.3x step-time cost. Inference (``torch.no_grad``) always runs plain.

The layers this module drives follow :class:`dualglow_app.model.flows.InvertibleModule`, plus
one of two hooks. Preferred, ``backprop(y, grad_y, grad_logdet, need_input_grad) -> (x,
grad_x, param_grads)``: the layer rebuilds its input and pushes the gradient through itself
by hand (ActNorm, the 1x1x1 conv, squeeze), or through autograd for its network alone (the
coupling, which evaluates that network once for both the inverse and the gradient: the
overhead stays near one extra forward of the networks). Otherwise ``recompute(y) ->
(leaves, y_again, logdet)``: rebuild the input from ``y`` as leaf tensors that require grad
(their concatenation along channels IS the input), redo the forward from them with grad
enabled, and let ``autograd.grad`` take the layer's gradients.

Drift guard: reconstruction is exact only up to floating-point error, which compounds over
depth (and badly under fp16 or with ill-conditioned weights). Each block keeps a strided
sample of its input (``FINGERPRINT_SIZE`` values per image, a few KiB) and, in backward,
compares the reconstructed input with it; above ``tolerance`` (relative L2) it warns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
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
#: The ``--memory-saving`` choices as :meth:`Glow.set_memory_saving` takes them (None: the rule above).
MEMORY_SAVING_MODES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}

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

    # Optional, used when present: backprop(y, grad_y, grad_logdet, need_input_grad) ->
    # (x, grad_x, grads of the parameters that require grad, in parameters() order).

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
    """Parameters that need gradients, each once, in layer order."""
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


class _Baton:
    """Hands each segment's reconstructed input to the segment before it, during backward.

    Segment k's output is segment k+1's input, so autograd runs k's backward right after
    k+1's: k+1 reconstructs its input and leaves it here for k, instead of anything keeping
    it from the forward pass. Only the last segment's output is stored (save_for_backward).
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def take(self) -> Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(
                "memory-saving backward ran out of order (a segment's output was used outside "
                "the block?): turn memory saving off with model.set_memory_saving(False)."
            )
        return value


class _Segment:
    """Non-tensor state of one checkpointed segment, handed to the autograd Function."""

    def __init__(
        self, layers: Sequence[Recomputable], baton: _Baton, first: bool, last: bool, guard: DriftGuard
    ) -> None:
        self.layers = layers
        # Per layer, once per forward: the backward loop is Python, and its overhead counts.
        self.layer_params = [_trainable([layer]) for layer in layers]
        self.params = [p for group in self.layer_params for p in group]
        self.baton = baton
        self.first = first
        self.last = last
        self.guard = guard

    def backward(
        self, y: Tensor, grad_y: Tensor, grad_logdet: Tensor, need_x_grad: bool
    ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        """Walk the layers backwards: rebuild each input and backprop one layer at a time
        (the layer's ``backprop`` hook, or a re-run under autograd).

        Returns the reconstructed segment input, its gradient and the parameter gradients
        (in ``self.params`` order). Only one layer's graph is alive at any time.
        """
        grads_by_layer: list[Sequence[Tensor | None]] = []
        grad: Tensor | None = grad_y
        for k in range(len(self.layers) - 1, -1, -1):
            layer, layer_params, first_layer = self.layers[k], self.layer_params[k], k == 0
            backprop = getattr(layer, "backprop", None)
            if backprop is not None:
                assert grad is not None
                y, grad, layer_grads = backprop(
                    y, grad, grad_logdet, need_input_grad=need_x_grad or not first_layer
                )
                grads_by_layer.append(layer_grads)
                continue
            with torch.enable_grad():
                leaves, y_again, logdet = layer.recompute(y)
            outputs, grads_out = [y_again], [grad]
            if logdet.requires_grad:
                # Every layer's logdet adds straight into the block's, so each gets the
                # block's logdet gradient unchanged.
                outputs.append(logdet)
                grads_out.append(grad_logdet)
            inputs = layer_params if first_layer and not need_x_grad else [*leaves, *layer_params]
            grads = torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True) if inputs else ()
            n_leaves = len(inputs) - len(layer_params)
            grads_by_layer.append(grads[n_leaves:])
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
        param_grads = [g for group in reversed(grads_by_layer) for g in group]
        return y, grad, param_grads


class _InvertibleCheckpoint(torch.autograd.Function):
    """Forward without a graph, keeping nothing but the block's last output; backward by
    reconstruction. One application per segment, so the parameter gradients that exist at
    once are those of one segment (one flow step), not of the whole block."""

    @staticmethod
    def forward(ctx: Any, seg: _Segment, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        # Function.forward already runs with grad disabled: nothing is recorded here.
        y, logdet = _run_forward(seg.layers, x)
        device = x.device.type
        ctx.seg = seg
        ctx.fingerprint = _fingerprint(x) if seg.first else None
        ctx.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        if seg.last:
            ctx.save_for_backward(y)
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:
        seg: _Segment = ctx.seg
        y = ctx.saved_tensors[0] if seg.last else seg.baton.take()
        device, enabled, dtype = ctx.autocast
        # The re-run must see the numerics of the original forward (AMP included), or the
        # gradients would be those of a different function.
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            x, grad_x, param_grads = seg.backward(
                y.detach(), grad_y, grad_logdet, need_x_grad=ctx.needs_input_grad[1]
            )
        if seg.first:
            seg.guard.check(x, ctx.fingerprint)
        else:
            seg.baton.value = x
        return (None, grad_x, *param_grads)


def invertible_checkpoint(
    segments: Sequence[Sequence[Recomputable]], x: Tensor, guard: DriftGuard | None = None
) -> tuple[Tensor, Tensor]:
    """Run the layers of ``segments`` in order -> ``(y, logdet)``, storing only ``y``.

    A segment (e.g. one flow step's layers) is the unit whose parameter gradients are
    produced together in backward; activations stored are the block's output alone, however
    many segments. Gradients (input, parameters, logdet) equal plain autograd's up to
    reconstruction error, checked by ``guard`` on the block input. An ActNorm that still
    needs its data-dependent init gets it from a plain no-grad pass first, so the first
    step initialises exactly as plain autograd would. Without gradients this is the plain
    forward.

    Example:
        >>> from dualglow_app.model.flows import FlowStep
        >>> steps = [FlowStep(4, hidden=8, ndim=3) for _ in range(3)]
        >>> x = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
        >>> y, logdet = invertible_checkpoint([step.layers for step in steps], x)
        >>> (y.square().sum() - logdet.sum()).backward()
        >>> x.grad.shape
        torch.Size([2, 4, 4, 4, 4])
    """
    layers = [layer for segment in segments for layer in segment]
    params = _trainable(layers)
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return _run_forward(layers, x)
    if _needs_data_init(layers):
        with torch.no_grad():
            _run_forward(layers, x)
    guard = guard if guard is not None else DriftGuard()
    baton = _Baton()
    logdet = x.new_zeros(x.shape[0])
    n = len(segments)
    for i, segment in enumerate(segments):
        seg = _Segment(segment, baton, first=i == 0, last=i == n - 1, guard=guard)
        x, ld = _InvertibleCheckpoint.apply(seg, x, *seg.params)
        logdet = logdet + ld
    return x, logdet


__all__ = [
    "AUTO_MIN_DEPTH",
    "DEFAULT_DRIFT_TOLERANCE",
    "FINGERPRINT_SIZE",
    "DriftGuard",
    "Recomputable",
    "invertible_checkpoint",
    "memory_saving_pays",
]


def saved_tensor_bytes(run: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``run()`` executes.

    Tensors in ``exclude`` (typically the parameters, which exist anyway) are not counted.
    The memory tests and benchmarks use it to show what memory saving removes.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    del result
    return sum(storages.values())
