"""IntensityScaling: the map between preprocessed images and the model's [0, 1] scale."""

from __future__ import annotations

import numpy as np
import pytest

from dualglow_app.data import IntensityScaling


def test_pet_round_trip_within_range():
    scaling = IntensityScaling(pet_suvr_max=2.5)
    suvr = np.linspace(0.0, 2.5, 101, dtype=np.float32)
    model = scaling.pet_to_model(suvr)
    assert model.dtype == np.float32
    assert model.min() == 0.0 and model.max() == 1.0
    back = scaling.pet_from_model(model)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, suvr, rtol=1e-6, atol=1e-7)


def test_to_model_clips_to_unit_range():
    scaling = IntensityScaling(pet_suvr_max=3.0, mri_max=2.0)
    np.testing.assert_array_equal(scaling.pet_to_model(np.array([-1.0, 1.5, 4.5])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(scaling.mri_to_model(np.array([-0.2, 1.0, 5.0])), [0.0, 0.5, 1.0])
    assert scaling.mri_to_model(np.array([1.0])).dtype == np.float32


def test_synthetic_pet_flags_outside_and_non_finite_values():
    scaling = IntensityScaling(pet_suvr_max=3.0)
    values = np.array([0.5, 1.5, -0.2, np.nan, np.inf, -np.inf, 1.0, 0.0], dtype=np.float32)
    suvr, outside = scaling.synthetic_pet(values)
    assert suvr.dtype == np.float32 and outside.dtype == bool
    assert np.all(np.isfinite(suvr))
    np.testing.assert_array_equal(suvr, [1.5, 3.0, 0.0, 0.0, 3.0, 0.0, 3.0, 0.0])
    np.testing.assert_array_equal(outside, [False, True, True, True, True, True, False, False])


def test_dict_round_trip_and_unknown_keys():
    scaling = IntensityScaling(pet_suvr_max=2.0, mri_max=1.5)
    assert scaling.to_dict() == {"pet_suvr_max": 2.0, "mri_max": 1.5}
    assert IntensityScaling.from_dict(scaling.to_dict()) == scaling
    assert IntensityScaling.from_dict({"pet_suvr_max": "2.5"}).pet_suvr_max == 2.5
    assert IntensityScaling.from_dict({}) == IntensityScaling()
    with pytest.raises(ValueError, match=r"unknown keys \['pet_max'\]"):
        IntensityScaling.from_dict({"pet_max": 3.0})


@pytest.mark.parametrize("kwargs", [{"pet_suvr_max": 0.0}, {"pet_suvr_max": -1.0}, {"mri_max": 0.0}, {"mri_max": -2.0}])
def test_non_positive_maxima_are_refused(kwargs):
    with pytest.raises(ValueError, match="positive maxima"):
        IntensityScaling(**kwargs)
    with pytest.raises(ValueError, match="positive maxima"):
        IntensityScaling.from_dict(kwargs)
