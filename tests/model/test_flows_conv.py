"""flows.conv: the oneDNN convolution and its gradients equal nn.Conv2d/3d's (float32 rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualglow_app.model.flows import AffineCoupling, InvConv, conv


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    ("ndim", "c_in", "c_out", "kernel"),
    [(3, 4, 32, 3), (3, 32, 4, 3), (3, 32, 32, 1), (3, 16, 24, 3), (2, 20, 18, 3)],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_forward_and_every_gradient_match_the_stock_convolution(
    ndim: int, c_in: int, c_out: int, kernel: int, batch: int
) -> None:
    torch.manual_seed(0)
    layer = conv(ndim, c_in, c_out, kernel)
    x = torch.randn(batch, c_in, *([6] * ndim), requires_grad=True)
    grad_out = torch.randn(batch, c_out, *([6] * ndim))
    stock = {2: F.conv2d, 3: F.conv3d}[ndim]
    ref_y = stock(x, layer.weight, layer.bias, padding=kernel // 2)
    ref = torch.autograd.grad(ref_y, [x, layer.weight, layer.bias], grad_out)
    y = layer(x)
    # Batch 1 takes the oneDNN path (the stock dispatcher's slow fallback there); batch 2 stock.
    assert (y.grad_fn.name() == "_SameConvFunctionBackward") == (batch == 1)
    got = torch.autograd.grad(y, [x, layer.weight, layer.bias], grad_out)
    assert _relative(y, ref_y) < 1e-5
    for name, g, r in zip(["input", "weight", "bias"], got, ref, strict=True):
        assert g.shape == r.shape and _relative(g, r) < 1e-5, name


def test_a_frozen_input_gets_no_gradient_and_float64_takes_the_stock_path() -> None:
    layer = conv(3, 16, 16, 3)
    x = torch.randn(1, 16, 4, 4, 4)
    (w_grad,) = torch.autograd.grad(layer(x).square().sum(), [layer.weight])
    assert w_grad.shape == layer.weight.shape
    assert layer.double()(x.double()).grad_fn.name() == "ConvolutionBackward0"


def test_under_bf16_autocast_the_flow_arithmetic_stays_float32_and_inverts() -> None:
    # The coupling's network runs in bf16 under autocast; scale, shift, the 1x1x1 mixing and
    # the logdet must not, or inverse(forward(x)) drifts (~1e-2 before the fix).
    torch.manual_seed(0)
    coupling, mix = AffineCoupling(8, hidden=16, ndim=3), InvConv(8, ndim=3)
    with torch.no_grad():
        for p in coupling.net[-1].parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 8, 6, 6, 6)
    with torch.autocast("cpu", torch.bfloat16):
        y, logdet = coupling(mix(x)[0])
        back = mix.inverse(coupling.inverse(y))
    assert y.dtype == torch.float32 and logdet.dtype == torch.float32 and back.dtype == torch.float32
    assert _relative(back, x) < 1e-5
