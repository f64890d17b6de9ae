"""The grey-matter probability the side template's start can hold fixed (dualglow_app.tissue)."""

from __future__ import annotations

import numpy as np
import pytest

from dualglow_app.tissue import GreyMatterModel


def test_grey_matter_is_the_middle_intensity_class() -> None:
    """Three tissue intensities (CSF dark, WM bright): the middle one is grey matter, a
    GM/WM or GM/CSF mixture half way between is partly grey matter, and the background outside
    the masks does not enter the fit."""
    rng = np.random.default_rng(0)
    brain = np.concatenate([rng.normal(mean, 0.03, 2000) for mean in (0.3, 0.6, 0.9)]).astype(np.float32)
    image = np.concatenate([brain, np.zeros(3000, np.float32)])  # a large background
    mask = np.concatenate([np.ones(brain.size, bool), np.zeros(3000, bool)])
    model = GreyMatterModel.fit([image], [mask], stride=1)
    probability = model.probability(np.array([[0.3, 0.6, 0.9], [0.45, 0.75, 0.6]], np.float32))
    assert probability.shape == (2, 3) and probability.dtype == np.float32
    assert probability[0, 1] > 0.99 and probability[0, 0] < 0.01 and probability[0, 2] < 0.01
    assert 0.2 < probability[1, 0] < 0.8 and 0.2 < probability[1, 1] < 0.8


def test_an_empty_brain_is_refused() -> None:
    with pytest.raises(ValueError, match="3 brain voxels"):
        GreyMatterModel.fit([np.ones(4)], [np.zeros(4, bool)])
