"""DUAL-GLOW: the objective, conditional sampling, side information, boundary errors."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dualglow_app.model import AGE_SCALING, DualGlow, DualGlowConfig, grad_reverse
from dualglow_app.model import dualglow as dualglow_module


def tiny_config(ndim: int = 2, **overrides: Any) -> DualGlowConfig:
    base: dict[str, Any] = dict(ndim=ndim, levels=2, depth=1, hidden=8, relation_hidden=8)
    base.update(overrides)
    return DualGlowConfig(**base)


def side_config(ndim: int = 2) -> DualGlowConfig:
    return tiny_config(ndim, continuous={"age": AGE_SCALING}, categorical={"sex": 2})


def images(
    batch: int = 4, ndim: int = 2, size: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 1, *([size] * ndim))
    return torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)


def trained_like(
    model: DualGlow, x_mri: torch.Tensor, x_pet: torch.Tensor, side: object = None
) -> DualGlow:
    """Initialise ActNorms from data, then move all weights off their (partly zero) init."""
    model.train()
    model.nll(x_mri, x_pet, side)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


# -- configuration -------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    cfg = side_config(3)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DualGlowConfig.from_dict(d) == cfg
    assert d["continuous"] == {"age": [70.0, 10.0]}
    assert cfg.n_side == 1 + 2


def test_config_refuses_unknown_keys() -> None:
    d = tiny_config().to_dict() | {"levles": 3}
    with pytest.raises(ValueError, match=r"unknown keys \['levles'\]"):
        DualGlowConfig.from_dict(d)


@pytest.mark.parametrize(
    "overrides, message",
    [({"ndim": 4}, "ndim=4"), ({"levels": 0}, "levels=0"), ({"categorical": {"dx": 1}}, "'dx'")],
)
def test_config_refuses_bad_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# -- objective -----------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_nll_is_eq12_in_bits_per_voxel(ndim: int) -> None:
    torch.manual_seed(0)
    model = DualGlow(tiny_config(ndim, lambda_mri=0.25))
    mri, pet = images(ndim=ndim)
    model = trained_like(model, mri, pet)
    out = model.nll(mri, pet)
    assert {"loss", "bpd_pet_given_mri", "bpd_mri"} <= set(out)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    expected = out["bpd_pet_given_mri"] + 0.25 * out["bpd_mri"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    grads = [p.grad for p in model.flow_pet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_eval_nll_is_deterministic_and_training_nll_dequantises() -> None:
    torch.manual_seed(0)
    mri, pet = images()
    model = trained_like(DualGlow(tiny_config()), mri, pet)
    assert torch.equal(model.nll(mri, pet)["loss"], model.nll(mri, pet)["loss"])
    model.train()
    assert not torch.equal(model.nll(mri, pet)["loss"], model.nll(mri, pet)["loss"])


def test_fresh_model_scores_pet_under_standard_normal_prior() -> None:
    """Zero-initialised relation networks give p(zp | zm) = N(0, I): the PET term then equals
    the PET flow's own bits per voxel, computed here from its latents and log-determinant."""
    torch.manual_seed(0)
    mri, pet = images()
    model = DualGlow(tiny_config())
    model.nll(mri, pet)  # ActNorm init (a new module is in training mode)
    model.eval()
    out = model.nll(mri, pet)
    n_bins, voxels = model.config.n_bins, 64
    zp, logdet = model.flow_pet(pet + 0.5 / n_bins - 0.5)
    log_p = sum(-0.5 * (z**2 + math.log(2 * math.pi)).flatten(1).sum(1) for z in zp)
    bpd = -(log_p + logdet - voxels * math.log(n_bins)) / (voxels * math.log(2))
    assert out["bpd_pet_given_mri"].item() == pytest.approx(bpd.mean().item(), rel=1e-5)


def test_fit_toy_pairs_lowers_conditional_bpd_and_mode_beats_mean() -> None:
    """A toy paired 2D dataset where PET is a nonlinear function of the MRI (bump squared)."""
    gen = torch.Generator().manual_seed(0)

    def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        cy, cx = (torch.rand(n, 1, 1, generator=gen) * 7 for _ in range(2))
        amp = 0.4 + 0.5 * torch.rand(n, 1, 1, generator=gen)
        bump = amp * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
        return (0.1 + bump).unsqueeze(1), (0.2 + 0.7 * bump**2 / amp).unsqueeze(1)

    train_mri, train_pet = pairs(256)
    test_mri, test_pet = pairs(64)
    torch.manual_seed(0)
    model = DualGlow(tiny_config(depth=2, hidden=16, relation_hidden=16))
    model.train()
    model.nll(train_mri[:64], train_pet[:64])  # ActNorm init on a larger batch
    model.eval()
    before = model.nll(test_mri, test_pet)["bpd_pet_given_mri"].item()

    opt = torch.optim.Adamax(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        idx = torch.randint(0, 256, (16,), generator=gen)
        loss = model.nll(train_mri[idx], train_pet[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    after = model.nll(test_mri, test_pet)["bpd_pet_given_mri"].item()
    assert after < before - 2.0, (before, after)
    mode = model.sample(test_mri, temperature=0.0)[0]
    mse_mode = ((mode - test_pet) ** 2).mean().item()
    mse_mean = ((train_pet.mean(0, keepdim=True) - test_pet) ** 2).mean().item()
    assert mse_mode < 0.5 * mse_mean, (mse_mode, mse_mean)


# -- template centring ----------------------------------------------------------------------


def test_fresh_centred_model_predicts_the_template_pet() -> None:
    """With zero-initialised couplings and relation nets, a new flow is linear and its ActNorm
    init maps the data mean to 0: the T = 0 mode of a centred model is the mean training PET."""
    torch.manual_seed(0)
    mri, pet = images(batch=16)
    pet = 0.3 + 0.4 * pet  # off-centre, so 0.5-centring could not pass by accident
    model = DualGlow(tiny_config(template_shape=[8, 8]))
    model.set_templates(mri.mean(0), pet.mean(0))
    model.train()
    model.nll(mri, pet)
    mode = model.sample(mri[:2], temperature=0.0)[0]
    expected = pet.mean(0, keepdim=True).expand_as(mode)
    assert torch.allclose(mode, expected, atol=0.02), (mode - expected).abs().max()
    plain = DualGlow(tiny_config())
    plain.train()
    plain.nll(mri, pet)
    assert (plain.sample(mri[:2], temperature=0.0)[0] - expected).abs().max() > 0.05


def test_centring_is_a_shift_so_the_likelihood_only_moves_by_the_template() -> None:
    """Centring on templates is the same as feeding (x - template + 0.5) to an uncentred model."""
    torch.manual_seed(0)
    mri, pet = images()
    t_mri, t_pet = torch.rand(1, 8, 8) * 0.5, torch.rand(1, 8, 8) * 0.5 + 0.25
    centred = DualGlow(tiny_config(template_shape=[8, 8]))
    centred.set_templates(t_mri, t_pet)
    centred = trained_like(centred, mri, pet)
    plain = DualGlow(tiny_config())
    # The conditioning range is unset (unbounded) in both; its shape depends on centring.
    state = {k: v for k, v in centred.state_dict().items() if not k.startswith("conditioning_range.")}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert set(unexpected) == {"mri_template", "pet_template"}
    assert all(key.startswith("conditioning_range.") for key in missing)
    plain.eval()
    a = centred.nll(mri, pet)
    b = plain.nll(mri - t_mri + 0.5, pet - t_pet + 0.5)
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-5)
    mode = centred.sample(mri, temperature=0.0)[0]
    shifted = plain.sample(mri - t_mri + 0.5, temperature=0.0)[0] + t_pet - 0.5
    assert torch.allclose(mode, shifted, atol=1e-5)


def test_centring_errors_name_the_shape() -> None:
    model = DualGlow(tiny_config(template_shape=[8, 8]))
    mri, pet = images(size=16)
    with pytest.raises(ValueError, match=r"templates of size \(8, 8\)"):
        model.nll(mri, pet)
    with pytest.raises(ValueError, match="expected \\(1, 8, 8\\)"):
        model.set_templates(torch.zeros(1, 4, 4), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="no templates"):
        DualGlow(tiny_config()).set_templates(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="template_shape"):
        tiny_config(template_shape=[8, 8, 8])


# -- conditioning range --------------------------------------------------------------------


def test_conditioning_range_is_a_no_op_on_the_training_mris_and_bounds_the_rest() -> None:
    torch.manual_seed(0)
    mri, pet = images(batch=6)
    model = trained_like(DualGlow(tiny_config()), mri, pet)
    assert not model.has_conditioning_range
    unbounded_nll = model.nll(mri, pet)["loss"].item()
    wild = mri * 40.0 - 20.0  # far outside anything seen
    unbounded_wild = model.sample(wild, temperature=0.0)[0]

    unbounded_wild_nll = model.nll(wild, pet)["loss"].item()
    model.set_conditioning_range([(mri[:3], None), (mri[3:], None)])  # min/max over all batches
    assert model.has_conditioning_range
    assert model.nll(mri, pet)["loss"].item() == pytest.approx(unbounded_nll, rel=1e-6)
    # The likelihood never uses the range (synthesis only): training and scoring see one density.
    assert model.nll(wild, pet)["loss"].item() == unbounded_wild_nll
    prior = model.conditional_prior(mri)
    assert prior.outside_fraction.tolist() == [0.0] * 6
    wild_prior = model.conditional_prior(wild)
    assert (wild_prior.outside_fraction > 0.3).all()
    assert not torch.allclose(model.sample_prior(wild_prior, temperature=0.0)[0], unbounded_wild)
    # The relation networks saw the wild MRI's latents clamped to the training range, and
    # what they returned was clamped to the training priors' range.
    zm, _ = model.flow_mri(model._dequantize(wild, noise=False, modality="mri"))
    for i, z in enumerate(zm):
        bounds = model.conditioning_range[i]
        low, high = bounds.bounds("latent")
        mu, log_sigma = model.relations[i](torch.clamp(z, low, high))
        for name, raw, got in (("mu", mu, wild_prior.mu[i]), ("log_sigma", log_sigma, wild_prior.log_sigma[i])):
            low, high = bounds.bounds(name)
            assert torch.allclose(got, torch.clamp(raw, low, high), atol=1e-6)
            assert (got >= low).all() and (got <= high).all()


def test_fixed_size_models_bound_the_prior_per_position() -> None:
    """A template-centred model (one grid) records the prior's range per latent position, so
    a position cannot get a wider spread than any training scan had there."""
    torch.manual_seed(0)
    mri, pet = images(batch=4)
    model = DualGlow(tiny_config(template_shape=[8, 8]))
    model.set_templates(mri.mean(0), pet.mean(0))
    model = trained_like(model, mri, pet)
    model.set_conditioning_range([(mri, None)])
    for i, z in enumerate(model.conditional_prior(mri).log_sigma):
        bounds = model.conditioning_range[i]
        assert bounds.bounds("log_sigma")[1].shape == (1, *z.shape[1:])
        assert bounds.bounds("latent")[1].shape == (1, z.shape[1], 1, 1)
        assert torch.equal(bounds.bounds("log_sigma")[1][0], z.amax(0))
    # Set again from other scans: the range is replaced, not widened.
    model.set_conditioning_range([(mri[:1], None)])
    first = model.conditional_prior(mri[:1]).mu
    for i, mu in enumerate(first):
        assert torch.equal(model.conditioning_range[i].bounds("mu")[1][0], mu[0])


def test_conditioning_range_survives_a_state_dict_round_trip_and_needs_data() -> None:
    torch.manual_seed(0)
    mri, pet = images()
    model = trained_like(DualGlow(tiny_config()), mri, pet)
    model.set_conditioning_range([(mri, None)])
    copy = DualGlow(tiny_config())
    copy.load_state_dict(model.state_dict())
    assert copy.has_conditioning_range
    assert torch.equal(copy.conditioning_range[0].latent_high, model.conditioning_range[0].latent_high)
    with pytest.raises(ValueError, match="at least one batch"):
        DualGlow(tiny_config()).set_conditioning_range([])


def test_every_level_must_be_bounded_for_the_model_to_count_as_bounded() -> None:
    torch.manual_seed(0)
    mri, pet = images()
    model = trained_like(DualGlow(tiny_config()), mri, pet)
    model.set_conditioning_range([(mri, None)])
    last = model.conditioning_range[-1]
    last.set_bounds("mu", torch.full_like(last.mu_low, -math.inf), last.mu_high)
    assert not last.is_set and model.conditioning_range[0].is_set
    assert not model.has_conditioning_range


# -- sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_sample_shape_and_temperature(ndim: int) -> None:
    torch.manual_seed(0)
    mri, pet = images(batch=2, ndim=ndim)
    model = trained_like(DualGlow(tiny_config(ndim)), mri, pet)
    samples = model.sample(mri, temperature=0.8, n=3)
    assert samples.shape == (3, 2, 1, *([8] * ndim))
    assert not torch.equal(samples[0], samples[1])
    mode = model.sample(mri, temperature=0.0, n=2)
    assert torch.equal(mode[0], mode[1])
    assert torch.equal(mode, model.sample(mri, temperature=0.0, n=2))


def test_sample_is_reproducible_with_a_generator() -> None:
    mri, pet = images(batch=2)
    model = trained_like(DualGlow(tiny_config()), mri, pet)
    a = model.sample(mri, generator=torch.Generator().manual_seed(7))
    b = model.sample(mri, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message", [({"temperature": -1.0}, "temperature"), ({"n": 0}, "n=0")]
)
def test_sample_refuses_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    mri, _ = images(batch=1)
    with pytest.raises(ValueError, match=message):
        DualGlow(tiny_config()).sample(mri, **kwargs)  # type: ignore[arg-type]


# -- side information (eq. 16-17) ----------------------------------------------------------


def test_gradient_reversal_flips_the_gradient() -> None:
    x = torch.randn(5, requires_grad=True)
    weights = torch.randn(5)
    (grad_reverse(x, 0.5) * weights).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, -0.5 * weights)
    assert torch.equal(grad_reverse(x.detach()), x.detach())


def test_side_losses_enter_the_objective() -> None:
    mri, pet = images()
    side = {"age": torch.tensor([60.0, 70.0, 80.0, 90.0]), "sex": torch.tensor([0, 1, 1, 0])}
    model = trained_like(DualGlow(side_config()), mri, pet, side)
    out = model.nll(mri, pet, side)
    cfg = model.config
    expected = (
        out["bpd_pet_given_mri"]
        + cfg.lambda_mri * out["bpd_mri"]
        + cfg.side_loss_weight * (out["side_keep"] + out["side_remove"])
    )
    assert out["side_keep"].item() > 0 and out["side_remove"].item() > 0
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_side_heads_on_lower_mri_latents_push_gradient_the_other_way() -> None:
    """The heads behind the GRL learn to predict c; the MRI flow receives the opposite
    gradient (so it removes c from its lower latents)."""
    mri, pet = images()
    side = {"age": torch.tensor([60.0, 70.0, 80.0, 90.0]), "sex": torch.tensor([0, 1, 1, 0])}
    model = trained_like(DualGlow(side_config()), mri, pet, side)
    flow_params = list(model.flow_mri.parameters())
    head_params = list(model.side_remove.parameters())
    remove = model.nll(mri, pet, side)["side_remove"]
    g_flow = torch.autograd.grad(remove, flow_params, retain_graph=True, allow_unused=True)
    g_head = torch.autograd.grad(remove, head_params)

    # The same head loss without reversal, from the same (deterministic, eval-mode) latents.
    zm, _ = model.flow_mri(mri + 0.5 / model.config.n_bins - 0.5)
    age = (side["age"] - AGE_SCALING[0]) / AGE_SCALING[1]
    pred = model.side_remove[0](zm[0])
    plain = ((pred[:, 0] - age) ** 2).mean() + torch.nn.functional.cross_entropy(
        pred[:, 1:3], side["sex"]
    )
    assert plain.item() == pytest.approx(remove.item(), rel=1e-5)
    p_flow = torch.autograd.grad(plain, flow_params, retain_graph=True, allow_unused=True)
    p_head = torch.autograd.grad(plain, head_params)
    for a, b in zip(g_head, p_head, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    nonzero = 0
    for a, b in zip(g_flow, p_flow, strict=True):
        assert (a is None) == (b is None)  # levels above z'_m[0] get no gradient either way
        if a is not None and b is not None:
            assert torch.allclose(a, -b, atol=1e-6)
            nonzero += int(b.abs().max().item() > 0)
    assert nonzero > 0


def test_sample_changes_with_side_input() -> None:
    torch.manual_seed(0)
    mri, pet = images(batch=2)
    model = trained_like(DualGlow(side_config()), mri, pet, {"age": 70.0, "sex": 0})
    young = model.sample(mri, {"age": 60.0, "sex": 0}, temperature=0.0)
    old = model.sample(mri, {"age": torch.tensor([85.0, 85.0]), "sex": 0}, temperature=0.0)
    other_sex = model.sample(mri, {"age": 60.0, "sex": 1}, temperature=0.0)
    assert (young - old).abs().max().item() > 1e-4
    assert (young - other_sex).abs().max().item() > 1e-4


def test_top_prior_takes_the_side_information_alone_as_eq16_writes() -> None:
    torch.manual_seed(0)
    mri, pet = images(batch=2)
    model = trained_like(DualGlow(side_config()), mri, pet, {"age": 70.0, "sex": 0})
    side = {"age": 70.0, "sex": 0}
    prior = model.conditional_prior(mri, side)
    # Two different MRIs, one age: the top prior is the same; the lower levels differ.
    assert torch.equal(prior.mu[-1][0], prior.mu[-1][1])
    assert not torch.equal(prior.mu[0][0], prior.mu[0][1])
    older = model.conditional_prior(mri, {"age": 85.0, "sex": 0})
    assert (older.mu[-1] - prior.mu[-1]).abs().max().item() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(older.mu[:-1], prior.mu[:-1], strict=True))


def test_old_top_prior_reads_the_top_mri_latent_and_old_files_keep_it() -> None:
    torch.manual_seed(0)
    mri, pet = images(batch=2)
    config = tiny_config(continuous={"age": AGE_SCALING}, top_prior="mri+side")
    model = trained_like(DualGlow(config), mri, pet, {"age": 70.0})
    prior = model.conditional_prior(mri, {"age": 70.0})
    assert not torch.equal(prior.mu[-1][0], prior.mu[-1][1])
    assert model.side_prior is None and len(model.relations) == len(prior.mu)
    written_before_the_choice = {k: v for k, v in config.to_dict().items() if k not in ("top_prior", "side_prior_gain")}
    assert DualGlowConfig.from_dict(written_before_the_choice).top_prior == "mri+side"
    side_only_experiment = {**written_before_the_choice, "top_prior": "side"}
    assert DualGlowConfig.from_dict(side_only_experiment).side_prior_gain == 1.0
    assert (DualGlowConfig().top_prior, DualGlowConfig().side_prior_gain) == ("side", 10.0)
    # The library keeps the paper's prior; the app trains with the one that measured better.
    from dualglow_app.options import TrainOptions

    assert TrainOptions("bids", "out").top_prior == "mri+side"


def test_top_prior_extrapolates_the_age_trend_beyond_the_training_range() -> None:
    torch.manual_seed(0)
    mri, pet = images(batch=2)
    config = tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8])
    model = trained_like(DualGlow(config), mri, pet, {"age": 70.0})
    model.set_conditioning_range([(mri, {"age": torch.tensor([60.0, 80.0])})])
    top = {age: model.conditional_prior(mri[:1], {"age": age}).mu[-1] for age in (60.0, 80.0, 100.0)}
    step = top[80.0] - top[60.0]
    assert step.abs().max().item() > 1e-3
    # Linear in age and not bounded to the training ages: 100 is as far beyond 80 as 80 beyond 60.
    assert torch.allclose(top[100.0] - top[80.0], step, atol=1e-5)


def test_relation_networks_deepen_and_the_default_keeps_the_weight_names_of_older_files() -> None:
    mri, pet = images(batch=2)
    shallow, deep = DualGlow(tiny_config()), DualGlow(tiny_config(relation_layers=4))
    # Files written before relation_layers existed name the output layer relations.<i>.net.4.
    assert "relations.0.net.4.weight" in shallow.state_dict()
    assert sum(p.numel() for p in deep.relations.parameters()) > sum(p.numel() for p in shallow.relations.parameters())
    assert torch.isfinite(deep.nll(mri, pet)["loss"])


def test_top_mri_side_remove_puts_the_top_mri_latent_behind_a_gradient_reversal() -> None:
    mri, pet = images(batch=2)
    side = {"age": torch.tensor([60.0, 80.0])}
    keep = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, top_prior="mri+side"))
    remove = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, top_prior="mri+side", top_mri_side="remove"))
    assert (len(keep.side_keep), len(keep.side_remove)) == (2, 1)
    assert (len(remove.side_keep), len(remove.side_remove)) == (1, 2)  # zp_top kept; both MRI latents removed
    remove = trained_like(remove, mri, pet, side)
    out = remove.nll(mri, pet, side)
    zm, _ = remove.flow_mri(remove._dequantize(mri, noise=False, modality="mri"))
    zp, _ = remove.flow_pet(remove._dequantize(pet, noise=False, modality="pet"))
    _, cont, cats = remove._encode_side(side, 2, mri)
    assert torch.allclose(out["side_keep"], remove._side_loss(remove.side_keep[0](zp[-1]), cont, cats))
    removed = sum(remove._side_loss(head(z), cont, cats) for head, z in zip(remove.side_remove, zm, strict=True))
    assert torch.allclose(out["side_remove"], removed)
    # Behind the GRL: the MRI flow gets the head loss's gradient reversed.
    remove.zero_grad()
    out["side_remove"].backward()
    reversed_grad = [p.grad.clone() for p in remove.flow_mri.parameters() if p.grad is not None]
    remove.zero_grad()
    zm, _ = remove.flow_mri(remove._dequantize(mri, noise=False, modality="mri"))
    sum(remove._side_loss(head(z), cont, cats) for head, z in zip(remove.side_remove, zm, strict=True)).backward()
    plain = [p.grad.clone() for p in remove.flow_mri.parameters() if p.grad is not None]
    assert all(torch.allclose(a, -b, atol=1e-5) for a, b in zip(reversed_grad, plain, strict=True))


def test_side_levels_all_gives_every_relation_network_the_covariates() -> None:
    torch.manual_seed(0)
    mri, pet = images(batch=1)
    config = tiny_config(continuous={"age": AGE_SCALING}, top_prior="mri+side", side_levels="all")
    model = trained_like(DualGlow(config), mri, pet, {"age": 70.0})
    young, old = model.conditional_prior(mri, {"age": 60.0}), model.conditional_prior(mri, {"age": 80.0})
    assert all((a - b).abs().max().item() > 1e-4 for a, b in zip(young.mu, old.mu, strict=True))
    top_only = trained_like(DualGlow(tiny_config(continuous={"age": AGE_SCALING}, top_prior="mri+side")), mri, pet,
                            {"age": 70.0})  # fmt: skip
    young, old = top_only.conditional_prior(mri, {"age": 60.0}), top_only.conditional_prior(mri, {"age": 80.0})
    assert torch.equal(young.mu[0], old.mu[0]) and not torch.equal(young.mu[-1], old.mu[-1])


def test_counterfactual_moves_a_measured_pet_along_the_covariate_only() -> None:
    torch.manual_seed(0)
    mri, pet = images(batch=2)
    model = trained_like(DualGlow(side_config()), mri, pet, {"age": 70.0, "sex": 0})
    side = {"age": torch.tensor([65.0, 75.0]), "sex": 0}
    same = model.counterfactual(mri, pet, side, side)
    assert torch.allclose(same, pet, atol=1e-4)
    older = model.counterfactual(mri, pet, side, {"age": torch.tensor([85.0, 95.0]), "sex": 0})
    assert (older - pet).abs().max().item() > 1e-3
    # Only the top latents, whose prior takes c (eq. 16), move; the subject's residual is kept,
    # so moving back to the measured ages gives the measured PET again.
    zp_old, _ = model.flow_pet(model._dequantize(pet, noise=False, modality="pet"))
    zp_new, _ = model.flow_pet(model._dequantize(older, noise=False, modality="pet"))
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(zp_old[:-1], zp_new[:-1], strict=True))
    assert (zp_new[-1] - zp_old[-1]).abs().max().item() > 1e-3
    back = model.counterfactual(mri, older, {"age": torch.tensor([85.0, 95.0]), "sex": 0}, side)
    assert torch.allclose(back, pet, atol=1e-3)


def side_template_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """PETs that are exactly a base image, plus an age map per decade, plus a sex map, plus a
    share of the MRI, whose intensity falls with age (as grey matter does)."""
    gen = torch.Generator().manual_seed(5)
    base = 0.3 + 0.3 * torch.rand(1, 8, 8, generator=gen)
    per_decade = 0.05 * torch.randn(1, 8, 8, generator=gen)
    sex_map = 0.02 * torch.randn(1, 8, 8, generator=gen)
    age = torch.linspace(55.0, 90.0, n)
    sex = torch.arange(n) % 2
    decades = ((age - 70.0) / 10.0).view(-1, 1, 1, 1)
    mri = 0.5 - 0.1 * decades + 0.1 * torch.rand(n, 1, 8, 8, generator=gen)
    pet = base + per_decade * decades + sex_map * sex.view(-1, 1, 1, 1) + 0.3 * mri
    return mri, pet, {"age": age, "sex": sex}, base, per_decade


def test_side_template_is_fitted_by_least_squares_and_moves_the_mode_by_its_map() -> None:
    torch.manual_seed(0)
    mri, pet, side, base, per_decade = side_template_data()
    model = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, categorical={"sex": 2}, template_shape=[8, 8]))
    assert model.pet_side_template is not None and model.pet_side_template.requires_grad
    model.set_templates(mri.mean(0), pet.mean(0))
    model.fit_pet_template([(mri[:8], pet[:8], {k: v[:8] for k, v in side.items()}),
                            (mri[8:], pet[8:], {k: v[8:] for k, v in side.items()})])
    # The age map is the slope per (age - 70) / 10 with the MRI held fixed, not the age-only
    # slope (which also takes the 0.3 * -0.1 per decade that goes through the MRI).
    assert torch.allclose(model.pet_side_template[0], per_decade, atol=1e-4)
    age_only = torch.linalg.lstsq(torch.stack([torch.ones(16), (side["age"] - 70) / 10], 1), pet.flatten(1)).solution[1]
    assert (age_only.view(1, 8, 8) - per_decade).abs().min() > 0.02
    # The template is the mean PET at c = 0: template + sum_j c_j B_j averages to the mean PET.
    c = model._encode_side(side, len(pet), pet)[0]
    assert torch.allclose(model._center(pet, "pet", c).mean(0), pet.mean(0), atol=1e-5)
    model.train()
    model.nll(mri, pet, side)
    # Zero-initialised priors do not depend on c, so the mode moves by exactly B * (c' - c).
    young, old = (model.sample(mri[:2], {"age": a, "sex": 0}, temperature=0.0)[0] for a in (60.0, 90.0))
    assert torch.allclose(old - young, 3.0 * per_decade.expand_as(old), atol=1e-4)
    same = model.counterfactual(mri[:2], pet[:2], {"age": side["age"][:2], "sex": side["sex"][:2]},
                                {"age": side["age"][:2], "sex": side["sex"][:2]})  # fmt: skip
    assert torch.allclose(same, pet[:2], atol=1e-4)


def test_side_template_adjusts_for_the_anatomy_around_each_voxel() -> None:
    """A PET that follows the MRI of its neighbourhood (as a PET voxel sees it through the
    scanner's resolution), with an MRI that falls with age: adjusting for the voxel's own MRI
    leaves part of the anatomy's effect in the age map; adding the blurred MRI removes it."""
    from dualglow_app.model.dualglow import _blurred

    gen = torch.Generator().manual_seed(3)
    n = 24
    per_decade = 0.05 * torch.randn(1, 8, 8, generator=gen)
    decades = ((torch.linspace(55.0, 90.0, n) - 70.0) / 10.0).view(-1, 1, 1, 1)
    mri = 0.5 - 0.1 * decades * torch.rand(1, 1, 8, 8, generator=gen) + 0.1 * torch.rand(n, 1, 8, 8, generator=gen)
    pet = 0.4 + per_decade * decades + 0.5 * _blurred(mri, 1.0)
    side = {"age": torch.linspace(55.0, 90.0, n)}

    def age_map(sigmas: tuple[float, ...]) -> torch.Tensor:
        model = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8], anatomy_sigmas=list(sigmas)))
        model.set_templates(mri.mean(0), pet.mean(0))
        model.fit_pet_template([(mri, pet, side)])
        assert model.pet_side_template is not None
        return model.pet_side_template[0].detach()

    assert torch.allclose(age_map((0.0, 1.0)), per_decade, atol=1e-4)
    assert (age_map((0.0,)) - per_decade).abs().max() > 0.005


def test_with_side_levels_none_the_covariates_move_the_side_template_alone() -> None:
    """No relation network takes c: trained or not, the mode moves with age by exactly the age
    map (the least-squares estimate), whatever the flows learnt."""
    torch.manual_seed(1)
    mri, pet, side, _, _ = side_template_data()
    model = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, categorical={"sex": 2}, template_shape=[8, 8],
                                 top_prior="mri+side", side_levels="none"))  # fmt: skip
    assert all(r.net[0].in_channels == c for r, c in zip(model.relations, model.flow_mri.latent_channels, strict=True))
    model.set_templates(mri.mean(0), pet.mean(0))
    model.fit_pet_template([(mri, pet, side)])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model.nll(mri, pet, side)["loss"].backward()
        optimizer.step()
    assert model.pet_side_template is not None
    young, old = (model.sample(mri[:2], {"age": a, "sex": 0}, temperature=0.0)[0] for a in (60.0, 90.0))
    assert torch.allclose(old - young, 3.0 * model.pet_side_template[0].detach().expand_as(old), atol=1e-4)


def test_side_template_needs_templates_and_old_files_lack_it() -> None:
    assert DualGlowConfig().side_template is True
    without = {k: v for k, v in side_config().to_dict().items() if k != "side_template"}
    assert DualGlowConfig.from_dict(without).side_template is False
    assert DualGlow(side_config()).pet_side_template is None  # no templates to move
    model = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8], side_template=False))
    assert model.pet_side_template is None and "pet_side_template" not in model.state_dict()
    with pytest.raises(ValueError, match="no side or anatomy template"):
        model.fit_pet_template([])
    with pytest.raises(ValueError, match="at least one"):
        DualGlow(tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8])).fit_pet_template([])


# -- boundary errors -----------------------------------------------------------------------


def test_error_for_size_the_levels_cannot_squeeze() -> None:
    model = DualGlow(tiny_config(levels=3))
    mri, pet = images(size=12)
    with pytest.raises(
        ValueError, match=r"x_mri has spatial size \(12, 12\).*2\*\*3=8.*\(16, 16\)"
    ):
        model.nll(mri, pet)


def test_error_for_wrong_channels_and_missing_channel_axis() -> None:
    model = DualGlow(tiny_config())
    mri, pet = images()
    with pytest.raises(ValueError, match="x_pet has 2 channels"):
        model.nll(mri, torch.cat([pet, pet], dim=1))
    with pytest.raises(ValueError, match=r"unsqueeze\(1\)"):
        model.sample(mri[:, 0])
    with pytest.raises(ValueError, match="paired images"):
        model.nll(mri, pet[:2])


def test_errors_for_side_input() -> None:
    mri, pet = images(batch=2)
    with_side = DualGlow(side_config())
    with pytest.raises(ValueError, match=r"built with side information \['age', 'sex'\]"):
        with_side.nll(mri, pet)
    with pytest.raises(ValueError, match=r"missing \['sex'\]"):
        with_side.sample(mri, {"age": 70.0})
    with pytest.raises(ValueError, match="class indices 0..1"):
        with_side.sample(mri, {"age": 70.0, "sex": 2})
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        with_side.sample(mri, {"age": [70.0, 71.0, 72.0], "sex": 0})
    with pytest.raises(ValueError, match="built without side information"):
        DualGlow(tiny_config()).nll(mri, pet, {"age": 70.0})


def test_docstring_examples_run() -> None:
    result = doctest.testmod(dualglow_module)
    assert result.attempted > 0 and result.failed == 0


def test_side_heads_are_bounded_so_gradient_reversal_cannot_diverge() -> None:
    from dualglow_app.model.dualglow import SideHead

    head = SideHead(c_in=4, n_out=3, hidden=8, ndim=3)
    huge = torch.full((2, 4, 4, 4, 4), 1e6)
    assert head(huge).abs().max() <= head.bound


# -- the anatomy template --------------------------------------------------------------------


def test_blur_is_scipys_gaussian_filter_with_zeros_beyond_the_volume() -> None:
    from scipy.ndimage import gaussian_filter

    from dualglow_app.model.dualglow import _blurred

    images = torch.rand(2, 1, 9, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (0.85, 2.5):
        expected = gaussian_filter(images.numpy(), sigma=(0, 0, sigma, sigma, sigma), mode="constant")
        assert np.allclose(_blurred(images, sigma).numpy(), expected, atol=1e-12)
    assert _blurred(images, 0.0) is images


def test_tissue_posteriors_are_the_mixtures() -> None:
    """The model's torch posteriors equal scikit-learn's for the same three-class mixture: the
    grey matter's ("gm"), and the grey matter's then the CSF's, each at every sigma ("gm+csf")."""
    from dualglow_app.model.dualglow import _blurred
    from dualglow_app.tissue import GreyMatterModel

    rng = np.random.default_rng(1)
    brain = np.concatenate([rng.normal(m, 0.05, 800) for m in (0.25, 0.55, 0.85)])
    tissue = GreyMatterModel.fit([brain], [np.ones_like(brain, bool)])
    weights, means, variances = tissue.mixture_parameters()
    values = np.linspace(0.0, 1.0, 64).reshape(1, 1, 8, 8)
    for anatomy, tissues in (("gm", ["gm"]), ("gm+csf", ["gm", "csf"])):
        model = DualGlow(tiny_config(template_shape=[8, 8], anatomy_tissue=anatomy, anatomy_sigmas=[0.0, 1.0]))
        model.set_tissue_mixture(weights[::-1], means[::-1], variances[::-1])  # any order: sorted by mean
        got = model.anatomy_features(torch.from_numpy(values))
        assert got.shape[1] == model.config.anatomy_terms == 2 * len(tissues)
        for k, name in enumerate(tissues):
            expected = torch.from_numpy(tissue.probability(values, name)).double()
            assert torch.allclose(got[:, 2 * k], expected, atol=1e-6), name
            assert torch.allclose(got[:, 2 * k + 1], _blurred(expected, 1.0), atol=1e-6), name
    assert not np.allclose(tissue.probability(values, "csf"), tissue.probability(values, "gm"))
    with pytest.raises(ValueError, match="it has no mixture"):
        DualGlow(tiny_config(template_shape=[8, 8])).set_tissue_mixture(weights, means, variances)


def anatomy_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """PETs that are, per voxel, a linear function of age and of the MRI at that voxel and blurred."""
    from dualglow_app.model.dualglow import _blurred

    gen = torch.Generator().manual_seed(7)
    mri = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    age = torch.linspace(55.0, 90.0, n, dtype=torch.float64)
    per_decade = 0.03 * torch.randn(1, 8, 8, generator=gen, dtype=torch.float64)
    gain = 0.2 + 0.1 * torch.rand(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    pet = 0.2 + per_decade * ((age - 70.0) / 10.0).view(-1, 1, 1, 1) + gain[0] * mri + gain[1] * _blurred(mri, 1.0)
    return mri.float(), pet.float(), {"age": age.float()}, gain


def test_anatomy_template_keeps_the_fits_anatomy_maps_and_an_untrained_mode_is_that_linear_model() -> None:
    """With the anatomy template the least-squares maps of the MRI terms move the PET's centre
    with each subject's MRI: a fresh model's mode (zero priors) is then the voxelwise linear
    model, exact on PETs that are linear in it; T + B c is still the mean anatomy's PET."""
    mri, pet, side, gain = anatomy_data()
    config = tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8], anatomy_template=True,
                         anatomy_sigmas=[0.0, 1.0], side_levels="none")  # fmt: skip
    model = DualGlow(config)
    model.set_templates(mri.mean(0), pet.mean(0))
    model.fit_pet_template([(mri[:12], pet[:12], {"age": side["age"][:12]}), (mri[12:], pet[12:], {"age": side["age"][12:]})])
    assert torch.allclose(model.get_buffer("pet_anatomy_maps")[:, 0], gain[:, 0].float(), atol=1e-3)
    model.eval()
    # An untrained flow maps the zero latents to zero; the mode sits mid-bin below its centre.
    mode = model.sample(mri, side, temperature=0.0)[0] + 0.5 / model.config.n_bins
    assert torch.allclose(mode, pet, atol=1e-4)
    c = model._encode_side(side, len(pet), pet)[0]
    assert torch.allclose(model._center(pet, "pet", c).mean(0), pet.mean(0), atol=1e-4)  # no MRI: the mean anatomy
    # The likelihood centres each PET on its own MRI's template: the same as the mode's.
    latents, _ = model.flow_pet(model._dequantize(pet, noise=False, modality="pet", c=c, x_mri=mri))
    again = model._quantize_back(model.flow_pet.inverse(latents), "pet", c, mri)
    assert torch.allclose(again, pet, atol=1e-4)
    # Without covariates the anatomy template stands alone.
    alone = DualGlow(tiny_config(template_shape=[8, 8], anatomy_template=True, anatomy_sigmas=[0.0, 1.0]))
    alone.set_templates(mri.mean(0), pet.mean(0))
    alone.fit_pet_template([(mri, pet, None)])
    assert float(alone.get_buffer("pet_anatomy_maps").abs().max()) > 0.1


def test_the_pet_centre_is_float32_under_bf16_autocast() -> None:
    """The anatomy maps of collinear scales are large and of opposite signs (+-50 here, as a
    least-squares fit of the voxel and its blur gives): a blur and an einsum in bf16 moved a
    trained model's centre by up to 0.4 SUVR, and a GPU's bf16 training drifted from the
    least-squares start. Under autocast the centre, and so the likelihood's input, is fp32's."""
    mri, pet, side, _ = anatomy_data()
    model = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8], anatomy_template=True,
                                 anatomy_sigmas=[0.0, 1.0], side_levels="none"))  # fmt: skip
    model.set_templates(mri.mean(0), pet.mean(0))
    model.fit_pet_template([(mri, pet, side)])
    with torch.no_grad():
        model.get_buffer("pet_anatomy_maps")[0] += 50.0
        model.get_buffer("pet_anatomy_maps")[1] -= 50.0
        model.get_buffer("anatomy_term_range")[0] = -math.inf
        model.get_buffer("anatomy_term_range")[1] = math.inf
    c = model._encode_side(side, len(pet), pet)[0]
    exact = model._center(pet, "pet", c, mri)
    with torch.autocast("cpu", torch.bfloat16):
        under_autocast = model._center(pet, "pet", c, mri)
        dequantized = model._dequantize(pet, noise=False, modality="pet", c=c, x_mri=mri)
    assert under_autocast.dtype == torch.float32 and dequantized.dtype == torch.float32
    assert torch.equal(under_autocast, exact)


def test_categorical_maps_are_centred_over_their_classes_and_predictions_unchanged() -> None:
    """One-hot classes next to the intercept leave the split between T and the class maps to the
    solver; centre_categorical_maps puts it where every class's map sums to zero, moving the mean
    into T, and T + B c of each class (and of class shares) stays what it was."""
    mri, pet, side, _ = anatomy_data()
    side = {**side, "dx": torch.arange(len(pet)) % 3}
    model = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, categorical={"dx": 3}, template_shape=[8, 8],
                                 anatomy_template=True, anatomy_sigmas=[0.0, 1.0], side_levels="none"))  # fmt: skip
    model.set_templates(mri.mean(0), pet.mean(0))
    model.fit_pet_template([(mri, pet, side)])
    block = model.config.side_channels("dx")
    assert model.pet_side_template is not None
    assert float(model.pet_side_template.detach()[block].sum(0).abs().max()) < 1e-5
    before = [model._center(pet[:1], "pet", model._encode_side({"age": 70.0, "dx": k}, 1, pet)[0]) for k in range(3)]
    with torch.no_grad():
        model.pet_side_template[block] += 5.0  # an arbitrary split, as the solver may leave it
        model.pet_template -= 5.0
    model.centre_categorical_maps()
    after = [model._center(pet[:1], "pet", model._encode_side({"age": 70.0, "dx": k}, 1, pet)[0]) for k in range(3)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(after, before, strict=True))
    assert float(model.pet_side_template.detach()[block].sum(0).abs().max()) < 1e-4


def test_anatomy_template_needs_templates_and_survives_a_model_file(tmp_path: Path) -> None:
    from dualglow_app.weights import load_model, save_model

    with pytest.raises(ValueError, match="anatomy_template=True needs template_shape"):
        tiny_config(anatomy_template=True)
    with pytest.raises(ValueError, match="anatomy_tissue='csf'"):
        tiny_config(anatomy_tissue="csf")
    assert DualGlowConfig.from_dict({k: v for k, v in tiny_config().to_dict().items()
                                     if not k.startswith("anatomy")}).anatomy_template is False  # fmt: skip
    mri, pet, side, _ = anatomy_data()
    for anatomy in ("gm", "gm+csf"):
        model = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8], anatomy_template=True,
                                     anatomy_tissue=anatomy, anatomy_sigmas=[0.0, 1.0]))  # fmt: skip
        model.set_tissue_mixture([0.3, 0.4, 0.3], [0.3, 0.5, 0.7], [0.01, 0.01, 0.01])
        model.set_templates(mri.mean(0), pet.mean(0))
        model.fit_pet_template([(mri, pet, side)])
        model.eval()
        assert model.get_buffer("pet_anatomy_maps").shape[0] == (2 if anatomy == "gm" else 4)
        path = save_model(model, tmp_path / f"{anatomy}.safetensors", metadata={})
        loaded, _ = load_model(path)
        assert loaded.config.anatomy_tissue == anatomy
        for name in ("pet_anatomy_maps", "anatomy_mean", "tissue_mixture"):
            assert torch.equal(loaded.get_buffer(name), model.get_buffer(name)), name
        assert torch.equal(loaded.sample(mri[:2], {"age": side["age"][:2]}, temperature=0.0),
                           model.sample(mri[:2], {"age": side["age"][:2]}, temperature=0.0))


def test_the_anatomy_term_stays_in_its_training_range_in_the_likelihood_and_at_synthesis() -> None:
    """Once set_anatomy_term_range has seen the training MRIs, a T1w unlike them cannot push a
    voxel's anatomy term beyond what they gave (a real brain through a phantom-trained model put
    1 % of its voxels at the 3 SUVR ceiling; a phantom with larger ventricles than any training
    one made the validation bpd grow without bound): not at synthesis, not in the likelihood.
    On the training scans the clamp changes nothing."""
    mri, pet, side, _ = anatomy_data()
    model = DualGlow(tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8], anatomy_template=True,
                                 anatomy_sigmas=[0.0, 1.0], side_levels="none"))  # fmt: skip
    model.set_templates(mri.mean(0), pet.mean(0))
    model.fit_pet_template([(mri, pet, side)])
    model.eval()
    wild = mri[:1] * 3.0
    before = model.sample(wild, {"age": 70.0}, temperature=0.0)
    nll_before = model.nll(wild, pet[:1], {"age": side["age"][:1]})["bpd_pet_given_mri"]
    nll_trained = model.nll(mri, pet, side)["bpd_pet_given_mri"]
    model.set_anatomy_term_range([mri[:12], mri[12:]])
    low, high = model.get_buffer("anatomy_term_range")
    raw = model.anatomy_term(mri, bounded=False)
    assert torch.allclose(low, raw.amin(0)) and torch.allclose(high, raw.amax(0))
    assert torch.allclose(model.anatomy_term(mri), raw)  # a no-op on the training scans
    assert torch.allclose(model.nll(mri, pet, side)["bpd_pet_given_mri"], nll_trained)
    after = model.sample(wild, {"age": 70.0}, temperature=0.0)
    held = model.anatomy_term(wild)
    assert torch.all(held <= high + 1e-6) and torch.all(held >= low - 1e-6)
    assert not torch.allclose(held, model.anatomy_term(wild, bounded=False))
    assert (before - after).abs().max() > 0.01
    assert not torch.allclose(model.nll(wild, pet[:1], {"age": side["age"][:1]})["bpd_pet_given_mri"], nll_before)
    with pytest.raises(ValueError, match="at least one batch"):
        model.set_anatomy_term_range([])


def test_tissue_fractions_read_a_voxel_as_a_mix_of_its_two_neighbouring_tissues() -> None:
    """Means CSF 0.2, GM 0.5, WM 0.8: halfway between CSF and GM is half of each, the GM mean is
    all grey matter, beyond the WM mean all white matter; every voxel's fractions sum to 1 inside
    the support and are 0 outside. A model reading fractions keeps that in its file."""
    from dualglow_app.model.dualglow import tissue_fractions

    mixture = torch.tensor([[0.3, 0.4, 0.3], [0.2, 0.5, 0.8], [0.01, 0.01, 0.01]])
    x = torch.tensor([0.0, 0.35, 0.5, 0.65, 0.9, 0.5])
    inside = torch.tensor([True, True, True, True, True, False])
    csf, gm, wm = tissue_fractions(x, mixture, inside)
    assert torch.allclose(gm, torch.tensor([0.0, 0.5, 1.0, 0.5, 0.0, 0.0]))
    assert torch.allclose(csf, torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(wm, torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 0.0]))
    mri, pet, side, _ = anatomy_data()
    config = tiny_config(continuous={"age": AGE_SCALING}, template_shape=[8, 8], anatomy_template=True,
                         anatomy_tissue="gm+csf", anatomy_reading="fractions", anatomy_sigmas=[0.0, 1.0])  # fmt: skip
    model = DualGlow(config)
    model.set_tissue_mixture([0.3, 0.4, 0.3], [0.3, 0.5, 0.7], [0.01, 0.01, 0.01])
    model.set_templates(mri.mean(0), pet.mean(0))
    features = model.anatomy_features(mri)
    assert torch.allclose(features[:, 0, 0], tissue_fractions(mri[:, 0], model.get_buffer("tissue_mixture"),
                                                               model.mri_template[0, 0] > 0)[1])  # fmt: skip
    assert DualGlowConfig.from_dict(config.to_dict()).anatomy_reading == "fractions"
    with pytest.raises(ValueError, match="anatomy_reading"):
        tiny_config(anatomy_reading="votes")


def test_a_native_reading_model_moves_its_template_with_the_tissue_maps_it_is_given() -> None:
    """anatomy_reading="native": the anatomy template's terms are the grey-matter and CSF maps
    passed beside the MRI (read at the native resolution by the preprocessing), not read from
    the MRI. PETs linear in those maps are then fitted exactly, an untrained mode is that linear
    model, the same MRI with other maps gives another PET, and a call without them says what to pass."""
    gen = torch.Generator().manual_seed(3)
    n = 24
    mri = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=gen)
    maps = torch.rand(n, 2, 8, 8, generator=gen)  # grey matter, CSF: unrelated to the MRI's intensities
    gain = torch.tensor([0.4, -0.2]).view(1, 2, 1, 1)
    pet = 0.3 + (gain * maps).sum(1, keepdim=True)
    config = tiny_config(template_shape=[8, 8], anatomy_template=True, anatomy_tissue="gm+csf",
                         anatomy_reading="native", anatomy_sigmas=[0.0])  # fmt: skip
    model = DualGlow(config)
    assert model.reads_tissue_maps and not model.uses_tissue_mixture
    model.set_templates(mri.mean(0), pet.mean(0))
    model.fit_pet_template([(mri[:12], pet[:12], None, maps[:12]), (mri[12:], pet[12:], None, maps[12:])])
    model.set_anatomy_term_range([(mri, maps)])
    fitted = model.get_buffer("pet_anatomy_maps")[:, 0]
    assert torch.allclose(fitted, gain[0].expand(2, 8, 8), atol=1e-4)
    model.eval()
    mode = model.sample(mri[:2], temperature=0.0, tissue_maps=maps[:2])[0] + 0.5 / model.config.n_bins
    assert torch.allclose(mode, pet[:2], atol=1e-4)
    swapped = model.sample(mri[:2], temperature=0.0, tissue_maps=maps[2:4])[0] + 0.5 / model.config.n_bins
    assert torch.allclose(swapped, pet[2:4], atol=1e-4)
    assert torch.isfinite(model.nll(mri[:2], pet[:2], None, maps[:2])["loss"])
    with pytest.raises(ValueError, match="pass tissue_maps"):
        model.sample(mri[:2], temperature=0.0)
    with pytest.raises(ValueError, match="tissue_maps has shape"):
        model.nll(mri[:2], pet[:2], None, maps[:3])
    assert DualGlowConfig.from_dict(config.to_dict()).anatomy_reading == "native"
    with pytest.raises(ValueError, match="reads tissue maps"):
        tiny_config(template_shape=[8, 8], anatomy_template=True, anatomy_tissue="t1w", anatomy_reading="native")
    # The native partial-volume fractions are maps given beside the MRI too, read the same way.
    fractions = DualGlow(dataclasses.replace(config, anatomy_reading="native-fractions"))
    assert fractions.reads_tissue_maps and fractions.synthesis_reads_tissue_maps and not fractions.uses_tissue_mixture
    assert (fractions.native_reading, model.native_reading) == ("native-fractions", "native")
    assert DualGlow(tiny_config(template_shape=[8, 8], anatomy_tissue="gm+csf")).native_reading is None
    assert torch.equal(fractions.anatomy_features(mri[:2], maps[:2]), model.anatomy_features(mri[:2], maps[:2]))
