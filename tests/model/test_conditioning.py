"""The conditioning range (dualglow_app.model.conditioning): bounds, clamping, counting, fitting."""

from __future__ import annotations

import math

import pytest
import torch

from dualglow_app.model.conditioning import ConditioningRange, RangeFinder, legacy_state_keys


def test_unbounded_until_set_then_clamps_and_counts() -> None:
    level = ConditioningRange(channels=2, ndim=2, prior_shape=[2, 2])
    z = torch.tensor([[[[-5.0, 0.0], [0.5, 9.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert not level.is_set
    assert torch.equal(level.clamp("latent", z), z) and level.count_outside(z).tolist() == [0]
    finder = RangeFinder([level])
    for name, value in (("latent", torch.zeros(1, 2, 2, 2) + torch.tensor([-1.0, 1.0])), ("mu", torch.zeros(1, 2, 2, 2)),
                        ("log_sigma", torch.zeros(1, 2, 2, 2))):  # fmt: skip
        finder.observe(0, name, value)
    finder.apply()
    assert level.is_set
    low, high = level.bounds("latent")
    assert low.shape == (1, 2, 1, 1) and level.bounds("mu")[0].shape == (1, 2, 2, 2)
    assert level.clamp("latent", z).max().item() <= high.max().item()
    assert level.count_outside(z).tolist() == [2]  # -5 and 9 (range [-1, 1]); 0 and 0.5 inside


def test_values_within_the_slack_count_as_inside() -> None:
    level = ConditioningRange(channels=1, ndim=1)
    level.set_bounds("latent", torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    assert level.count_outside(torch.tensor([[[1.0005, -0.0005, 1.01]]])).tolist() == [1]


def test_finder_widens_over_batches_and_needs_every_level() -> None:
    levels = [ConditioningRange(1, 1), ConditioningRange(1, 1)]
    finder = RangeFinder(levels)
    finder.observe(0, "latent", torch.tensor([[[-2.0, 1.0]]]))
    finder.observe(0, "latent", torch.tensor([[[0.0, 3.0]]]))
    with pytest.raises(ValueError, match="at least one batch"):
        finder.apply()  # level 1 saw nothing
    assert [float(b) for b in finder.found[0]["latent"]] == [-2.0, 3.0]
    assert math.isinf(float(levels[0].latent_low))  # nothing written on failure


def test_legacy_keys_map_every_bound_of_every_level() -> None:
    keys = legacy_state_keys(2)
    assert keys["mri_latent_low_0"] == "conditioning_range.0.latent_low"
    assert keys["prior_log_sigma_high_1"] == "conditioning_range.1.log_sigma_high"
    assert len(keys) == 2 * 3 * 2
