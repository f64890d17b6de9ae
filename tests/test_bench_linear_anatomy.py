"""The linear-start benchmark's log space (an affine map of log SUVR onto the model's range, so
that its least squares is multiplicative in SUVR, and back)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_linear_anatomy import LOG_FLOOR_SUVR, log_decoded, log_encoded  # noqa: E402

from dualglow_app.data import IntensityScaling  # noqa: E402


def test_log_space_round_trips_brain_values_and_keeps_the_model_range() -> None:
    scaling = IntensityScaling()
    suvr = np.array([0.4, 1.0, 1.7, 2.5, scaling.pet_suvr_max], np.float32)
    encoded = log_encoded(suvr, scaling)
    assert encoded.min() > 0 and encoded[-1] == pytest.approx(scaling.pet_suvr_max)
    np.testing.assert_allclose(log_decoded(encoded, scaling), suvr, rtol=1e-5)


def test_log_space_turns_a_ratio_into_a_constant_step_and_the_background_stays_zero() -> None:
    scaling = IntensityScaling()
    suvr = np.array([0.5, 1.0, 1.5], np.float32)
    steps = log_encoded(0.8 * suvr, scaling) - log_encoded(suvr, scaling)
    np.testing.assert_allclose(steps, steps[0], atol=1e-5)
    assert log_encoded(np.array([0.0], np.float32), scaling)[0] == 0.0 == log_decoded(np.zeros(1, np.float32), scaling)[0]
    assert log_decoded(log_encoded(np.array([LOG_FLOOR_SUVR / 2], np.float32), scaling), scaling)[0] == 0.0
