"""Flow layers: exact inverses, exact log-determinants, ActNorm's one-time init."""

from __future__ import annotations

import doctest
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from dualglow_app.model import flows
from dualglow_app.model.flows import (
    ActNorm,
    AffineCoupling,
    FlowStep,
    Glow,
    InvConv,
    InvertibleModule,
    Split,
    Squeeze,
)

NDIMS = (2, 3)


def perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every parameter off its initial value, so zero-initialised couplings are not
    the identity and the tests exercise real scales and shifts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_layer(kind: str, ndim: int) -> InvertibleModule:
    torch.manual_seed(1)
    makers: dict[str, Callable[[], InvertibleModule]] = {
        "actnorm": lambda: ActNorm(4, ndim),
        "invconv": lambda: InvConv(4, ndim),
        "coupling": lambda: AffineCoupling(4, hidden=8, ndim=ndim),
        "squeeze": lambda: Squeeze(ndim),
        "step": lambda: FlowStep(4, hidden=8, ndim=ndim),
    }
    layer = makers[kind]()
    # Initialise ActNorms on shifted, scaled data, then perturb everything.
    layer(torch.randn(3, *input_shape(kind, ndim)) * 2 + 1)
    perturb(layer)
    return layer


def input_shape(kind: str, ndim: int) -> tuple[int, ...]:
    """Tiny per-sample shapes (16 or 32 values), so a full Jacobian is cheap."""
    if kind == "squeeze":
        return (1, 4, 4) if ndim == 2 else (2, 2, 2, 2)
    return (4, 2, 2) if ndim == 2 else (4, 2, 2, 2)


LAYER_KINDS = ("actnorm", "invconv", "coupling", "squeeze", "step")


def flatten_forward(module: nn.Module, shape: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """A vector -> vector function through ``module`` for torch.autograd.functional.jacobian."""

    def f(v: Tensor) -> Tensor:
        out = module(v.view(1, *shape))[0]
        if isinstance(out, list):
            return torch.cat([z.flatten() for z in out])
        return out.flatten()

    return f


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_layer_round_trip(kind: str, ndim: int, dtype: torch.dtype, tol: float) -> None:
    layer = make_layer(kind, ndim).to(dtype)
    x = torch.randn(5, *input_shape(kind, ndim), dtype=dtype)
    with torch.no_grad():
        y, logdet = layer(x)
        x_back = layer.inverse(y)
    assert logdet.shape == (5,)
    assert (x_back - x).abs().max().item() < tol


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_logdet_is_log_abs_det_jacobian(kind: str, ndim: int) -> None:
    layer = make_layer(kind, ndim).double()
    shape = input_shape(kind, ndim)
    x = torch.randn(1, *shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(flatten_forward(layer, shape), x.flatten())
    expected = torch.linalg.slogdet(jac).logabsdet
    assert layer(x)[1].item() == pytest.approx(expected.item(), abs=1e-8)


def small_glow(ndim: int, levels: int = 2) -> Glow:
    torch.manual_seed(2)
    flow = Glow(in_channels=1, ndim=ndim, levels=levels, depth=2, hidden=8)
    flow(torch.randn(4, 1, *([8] * ndim)))  # ActNorm init on data like the tests'
    perturb(flow, scale=0.05)
    return flow


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_glow_round_trip(ndim: int, dtype: torch.dtype, tol: float) -> None:
    flow = small_glow(ndim).to(dtype)
    x = torch.randn(3, 1, *([8] * ndim), dtype=dtype)
    with torch.no_grad():
        latents, logdet = flow(x)
        x_back = flow.inverse(latents)
    assert logdet.shape == (3,)
    assert (x_back - x).abs().max().item() < tol


@pytest.mark.parametrize("ndim", NDIMS)
def test_two_level_glow_logdet_is_log_abs_det_jacobian(ndim: int) -> None:
    flow = small_glow(ndim).double()
    shape = (1, *([4] * ndim))
    x = torch.randn(1, *shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(flatten_forward(flow, shape), x.flatten())
    expected = torch.linalg.slogdet(jac).logabsdet
    assert abs(expected.item()) > 0.1  # a non-trivial volume change is being checked
    assert flow(x)[1].item() == pytest.approx(expected.item(), abs=1e-8)


@pytest.mark.parametrize("ndim", NDIMS)
def test_glow_latent_shapes(ndim: int) -> None:
    flow = Glow(in_channels=1, ndim=ndim, levels=3, depth=1, hidden=4)
    spatial = (8,) * ndim
    latents, _ = flow(torch.randn(2, 1, *spatial))
    assert len(latents) == 3
    assert [tuple(z.shape[1:]) for z in latents] == flow.latent_shapes(spatial)
    # Dimension is preserved: the latents hold exactly the input's values.
    assert sum(z[0].numel() for z in latents) == 8**ndim


def test_split_round_trip() -> None:
    split = Split(5)
    x = torch.randn(2, 5, 3, 3)
    kept, z = split(x)
    assert kept.shape[1] + z.shape[1] == 5
    assert torch.equal(split.inverse(kept, z), x)


@pytest.mark.parametrize("ndim", NDIMS)
def test_squeeze_moves_neighbourhoods_into_channels(ndim: int) -> None:
    x = torch.arange(4**ndim, dtype=torch.float32).view(1, 1, *([4] * ndim))
    y, logdet = Squeeze(ndim)(x)
    corner = x[0, 0][(slice(0, 2),) * ndim].flatten()  # the first 2x2(x2) block
    first_voxel = y[0].flatten(1)[:, 0]  # all channels of output voxel 0
    assert torch.equal(first_voxel, corner)
    assert torch.equal(logdet, torch.zeros(1))


def test_actnorm_initialises_once_from_data() -> None:
    norm = ActNorm(3, ndim=2)
    x = torch.randn(16, 3, 8, 8) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 4
    y, _ = norm(x)
    assert bool(norm.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    norm(torch.randn(16, 3, 8, 8) * 100)
    after = norm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_actnorm_does_not_initialise_in_eval_mode() -> None:
    norm = ActNorm(2, ndim=2).eval()
    x = torch.randn(4, 2, 4, 4) * 3 + 1
    y, logdet = norm(x)
    assert not bool(norm.initialized)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4))


def test_actnorm_constant_channel_gives_no_nan() -> None:
    norm = ActNorm(2, ndim=3)
    x = torch.cat([torch.zeros(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)], dim=1)
    y, logdet = norm(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert torch.allclose(norm.inverse(y), x, atol=1e-5)


def test_actnorm_init_survives_state_dict_round_trip() -> None:
    trained = ActNorm(2, ndim=2)
    trained(torch.randn(8, 2, 4, 4) * 3 + 2)
    assert "initialized" in trained.state_dict()
    fresh = ActNorm(2, ndim=2)
    fresh.load_state_dict(trained.state_dict())
    assert bool(fresh.initialized)
    other = torch.randn(8, 2, 4, 4) * 50  # would give a very different init
    assert torch.equal(fresh(other)[0], trained(other)[0])


def test_coupling_is_identity_at_init_and_scale_is_bounded() -> None:
    coupling = AffineCoupling(4, hidden=8, ndim=2, clamp=2.0)
    x = torch.randn(2, 4, 4, 4)
    y, logdet = coupling(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(2))
    perturb(coupling, scale=50.0)  # absurd weights: the exp scale must still stay bounded
    y, logdet = coupling(x * 100)
    assert torch.isfinite(y).all()
    assert logdet.abs().max().item() <= 2.0 * 2 * 16 + 1e-3  # clamp * changed channels * voxels


def test_invconv_starts_as_a_rotation_and_inverts_its_weight() -> None:
    mix = InvConv(6, ndim=3)
    w = mix.weight()
    assert torch.allclose(w @ w.T, torch.eye(6), atol=1e-5)
    assert torch.allclose(mix(torch.randn(1, 6, 2, 2, 2))[1], torch.zeros(1), atol=1e-5)
    perturb(mix)
    assert torch.allclose(mix.inverse_weight() @ mix.weight(), torch.eye(6), atol=1e-5)


def test_unsupported_ndim_is_refused() -> None:
    with pytest.raises(ValueError, match="ndim=1"):
        ActNorm(2, ndim=1)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(flows)
    assert result.attempted > 0 and result.failed == 0


LAYERS: dict[str, Callable[[int], InvertibleModule]] = {
    "actnorm": lambda nd: ActNorm(8, nd),
    "invconv": lambda nd: InvConv(8, nd),
    "coupling": lambda nd: AffineCoupling(8, hidden=16, ndim=nd),
    "squeeze": lambda nd: Squeeze(nd),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backprop_matches_autograd(name: str, ndim: int, batch: int, dtype: torch.dtype) -> None:
    """The hand-written gradients of the memory-saving backward are autograd's (1e-5 relative)."""
    torch.manual_seed(0)
    layer = LAYERS[name](ndim).to(dtype)
    perturb(layer)
    x = torch.randn(batch, 8, *([6] * ndim), dtype=dtype, requires_grad=True)
    y, logdet = layer(x)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn_like(logdet)
    params = [p for p in layer.parameters() if p.requires_grad]
    outputs = [y, logdet] if logdet.requires_grad else [y]  # a squeeze's logdet is a constant
    expected = torch.autograd.grad(outputs, [x, *params], [grad_y, grad_logdet][: len(outputs)])
    x_again, grad_x, param_grads = layer.backprop(y.detach(), grad_y, grad_logdet)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(x_again, x.detach(), rtol=tol, atol=tol)
    assert len(param_grads) == len(params)
    for got, want in zip([grad_x, *param_grads], expected, strict=True):
        assert got is not None and want is not None
        assert float((got - want).norm() / want.norm().clamp_min(1e-30)) < tol


@pytest.mark.parametrize("name", LAYERS)
def test_backprop_skips_input_gradient_and_frozen_parameters(name: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name](3).double()
    perturb(layer)
    frozen = next(iter(layer.parameters()), None)
    if frozen is not None:
        frozen.requires_grad_(False)
    x = torch.randn(1, 8, 4, 4, 4, dtype=torch.float64)
    y, logdet = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    _, grad_x, param_grads = layer.backprop(y, torch.ones_like(y), torch.ones_like(logdet), False)
    assert grad_x is None
    assert len(param_grads) == len(params)
