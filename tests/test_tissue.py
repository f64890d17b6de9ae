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


def test_tissue_maps_read_posteriors_or_partial_volume_fractions() -> None:
    """GreyMatterModel.tissue_maps: "posterior" is the mixture's posteriors inside the brain;
    "fractions" reads a voxel a quarter of the way from the GM mean to the WM mean as 3/4 grey
    matter (where its posterior is nearly 1), and a CSF/GM half-way voxel as half of each; 0
    outside the brain, whichever the reading. own_tissue_maps fits the image's own mixture."""
    from dualglow_app.tissue import NATIVE_TISSUE_CHANNELS, own_tissue_maps

    rng = np.random.default_rng(1)
    brain = np.concatenate([rng.normal(mean, 0.03, 3000) for mean in (0.3, 0.6, 0.9)]).astype(np.float32)
    model = GreyMatterModel.fit([brain], [np.ones(brain.size, bool)], stride=1)
    means = sorted(model.mixture_parameters()[1])
    image = np.array([means[1] + 0.25 * (means[2] - means[1]), 0.5 * (means[0] + means[1]), means[1], 0.6], np.float32)
    inside = np.array([True, True, True, False])
    posterior = model.tissue_maps(image, inside, ("gm", "csf"), "posterior")
    assert np.allclose(posterior[:, :3], model.probabilities(image[:3], ("gm", "csf"))) and not posterior[:, 3].any()
    gm, csf = model.tissue_maps(image, inside, ("gm", "csf"), "fractions")
    assert gm.dtype == np.float32 and np.allclose(gm, [0.75, 0.5, 1.0, 0.0]) and np.allclose(csf, [0.0, 0.5, 0.0, 0.0])
    assert posterior[0, 0] > 0.85  # the posterior saturates where the fraction keeps falling
    with pytest.raises(ValueError, match="reading="):
        model.tissue_maps(image, inside, ("gm",), "native")
    native, mixture = own_tissue_maps(brain, np.ones(brain.size, bool), "native-fractions")
    assert native.shape == (len(NATIVE_TISSUE_CHANNELS), brain.size)
    assert np.allclose(native, mixture.tissue_maps(brain, np.ones(brain.size, bool), NATIVE_TISSUE_CHANNELS, "fractions"))


def _brain_with_boundaries(rng: np.random.Generator, gm_sd: float, n: int = 4000) -> np.ndarray:
    """Pure CSF, GM and WM voxels (means 0.3, 0.6, 0.9; the GM class ``gm_sd`` wide) and as many
    voxels on each boundary, uniform mixes of GM with CSF or WM (noise 0.02)."""
    f = rng.uniform(0, 1, (2, n))
    pure = [rng.normal(0.3, 0.02, n), rng.normal(0.6, gm_sd, n), rng.normal(0.9, 0.02, n)]
    mixed = [0.3 + 0.3 * f[0] + rng.normal(0, 0.02, n), 0.9 - 0.3 * f[1] + rng.normal(0, 0.02, n)]
    return np.concatenate(pure + mixed)


def test_partial_volume_mixture_reads_pure_tissue_inside_a_wide_class_and_fractions_between() -> None:
    """PartialVolumeMixture finds the pure classes' widths under the boundary voxels; a voxel 0.05
    above the GM mean reads nearly pure GM when the GM class is that wide (like the posterior) and
    about 5/6 GM when it is narrow (like the fractions); half way to the CSF reads about half of
    each either way; expected fractions sum to 1, and own_tissue_maps("native-pve") reads them."""
    from dualglow_app.tissue import NATIVE_TISSUE_CHANNELS, PartialVolumeMixture, own_tissue_maps

    rng = np.random.default_rng(2)
    probe = np.array([0.65, 0.45, 0.6, 0.3, 0.95])
    readings = {}
    for gm_sd in (0.02, 0.06):
        brain = _brain_with_boundaries(rng, gm_sd)
        model = PartialVolumeMixture.fit(brain, GreyMatterModel.fit([brain], [np.ones(brain.size, bool)], stride=1))
        assert np.allclose(model.means, [0.3, 0.6, 0.9], atol=0.02)
        assert abs(model.sds[1] - gm_sd) < 0.01 and np.allclose(model.weights[3:], 0.2, atol=0.05)
        fractions = model.expected_fractions(probe)
        assert np.allclose(fractions.sum(0), 1.0) and (fractions >= -1e-9).all()
        readings[gm_sd] = fractions[1]
        assert 0.35 < fractions[1, 1] < 0.65 and 0.35 < fractions[0, 1] < 0.65  # CSF/GM half way
        assert fractions[1, 2] > 0.9 and fractions[1, 3] < 0.05 and fractions[2, 4] > 0.95
    assert readings[0.06][0] > 0.9 and 0.7 < readings[0.02][0] < 0.9
    native, fitted = own_tissue_maps(brain, np.ones(brain.size, bool), "native-pve")
    assert isinstance(fitted, PartialVolumeMixture) and native.shape == (len(NATIVE_TISSUE_CHANNELS), brain.size)
    assert np.allclose(native[:, :3], fitted.expected_fractions(brain[:3])[[1, 0]], atol=1e-3)
