"""AAL2 atlas on TemplateFlow and model grids; regional means (one implementation)."""

from __future__ import annotations

import numpy as np
import pytest

from dualglow_app.grid import preset
from dualglow_app.regions import (
    ATLAS_NAME,
    Atlas,
    atlas_on_grid,
    atlas_on_model_grid,
    load_atlas,
    regional_mean_matrix,
    regional_means,
)
from dualglow_app.templates import tf_grid


def test_atlas_loads_offline_on_the_templateflow_grid():
    atlas = load_atlas(2)
    affine, shape = tf_grid(2)
    assert atlas.name == ATLAS_NAME
    assert atlas.labels.shape == shape == (97, 115, 97) and atlas.labels.dtype == np.int32
    np.testing.assert_array_equal(atlas.affine, affine)
    present = set(np.unique(atlas.labels).tolist())
    assert 0 in present
    assert len(atlas.regions) >= 100 and set(atlas.regions) == present - {0}
    assert {"Precuneus_L", "Precuneus_R", "Hippocampus_L"} <= set(atlas.region_names)
    assert load_atlas(2) is atlas  # cached


@pytest.mark.parametrize(("name", "at_least"), [("paper2mm", 100), ("cpu4mm", 90)])
def test_atlas_on_a_model_grid(name, at_least):
    grid = preset(name)
    atlas = atlas_on_model_grid(grid)
    assert atlas.labels.shape == grid.shape and atlas.labels.dtype == np.int32
    np.testing.assert_array_equal(atlas.affine, grid.affine)
    assert at_least <= len(atlas.regions) <= 120
    # about a quarter to a third of a brain-sized box is labelled cortex/deep grey/cerebellum
    labelled = (atlas.labels > 0).mean()
    assert 0.15 < labelled < 0.5
    assert atlas_on_model_grid(grid) is atlas  # cached per grid
    again = atlas_on_grid(grid.affine, grid.shape)
    np.testing.assert_array_equal(again.labels, atlas.labels)
    assert again.names == atlas.names


def test_left_labels_sit_left_on_a_model_grid():
    atlas = atlas_on_model_grid(preset("cpu4mm"))
    by_name = {name: label for label, name in atlas.names.items()}
    x_mm = atlas.affine[0, 0] * np.arange(atlas.labels.shape[0]) + atlas.affine[0, 3]
    for side, sign in (("L", -1), ("R", 1)):
        voxels = np.nonzero(atlas.labels == by_name[f"Precuneus_{side}"])
        assert sign * x_mm[voxels[0]].mean() > 2


def test_atlas_on_grid_matches_load_atlas_on_the_same_grid():
    affine, shape = tf_grid(3)
    np.testing.assert_array_equal(atlas_on_grid(affine, shape).labels, load_atlas(3).labels)


def _tiny() -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([[[1, 1], [2, 0]], [[2, 3], [3, 3]]], dtype=np.int32)
    volumes = np.stack([np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.full((2, 2, 2), 2.0, np.float32)])
    return labels, volumes


def test_regional_mean_matrix_known_values_and_empty_regions():
    labels, volumes = _tiny()
    # region 1: voxels 0, 1; region 2: 2, 4; region 3: 5, 6, 7; region 4: none
    out = regional_mean_matrix(volumes, labels, 4)
    assert out.shape == (2, 4) and out.dtype == np.float64
    np.testing.assert_array_equal(out[0, :3], [0.5, 3.0, 6.0])
    np.testing.assert_array_equal(out[1, :3], [2.0, 2.0, 2.0])
    assert np.isnan(out[:, 3]).all()
    # columns follow the requested labels
    np.testing.assert_array_equal(regional_mean_matrix(volumes, labels, [3, 1])[0], [6.0, 0.5])


def test_regional_mean_matrix_with_masks():
    labels, volumes = _tiny()
    masks = np.ones((2, 2, 2, 2), dtype=bool)
    masks[0, 0, 0, 0] = False  # first volume: region 1 keeps voxel 1 only
    masks[1, 0, 0] = False  # second volume: voxels 0 and 1 out, so region 1 is empty
    out = regional_mean_matrix(volumes, labels, 3, masks=masks)
    np.testing.assert_array_equal(out[0], [1.0, 3.0, 6.0])
    assert np.isnan(out[1, 0]) and out[1, 1] == 2.0 and out[1, 2] == 2.0
    # one mask of the atlas' shape applies to every volume
    shared = regional_mean_matrix(volumes, labels, 3, masks=masks[0].astype(np.uint8))
    np.testing.assert_array_equal(shared[:, 0], [1.0, 2.0])


def test_regional_mean_matrix_refuses_bad_input():
    labels, volumes = _tiny()
    with pytest.raises(ValueError, match="not \\(N"):
        regional_mean_matrix(volumes[0], labels, 3)
    with pytest.raises(ValueError, match="background"):
        regional_mean_matrix(volumes, labels, [0, 1])
    with pytest.raises(ValueError, match="integers"):
        regional_mean_matrix(volumes, labels.astype(float), 3)
    with pytest.raises(ValueError, match="masks of shape"):
        regional_mean_matrix(volumes, labels, 3, masks=np.ones((3, 2, 2, 2)))


def test_regional_means_is_the_matrix_row_by_name():
    atlas = load_atlas(3)
    data = np.random.default_rng(0).standard_normal(atlas.labels.shape).astype(np.float32)
    means = regional_means(data, atlas)
    row = regional_mean_matrix(data[None], atlas.labels, atlas.regions)[0]
    assert list(means) == atlas.region_names
    assert np.array(list(means.values())).tobytes() == row.tobytes()
    # and the same float64 bincount arithmetic as summing by hand
    label, name = next(iter(atlas.names.items()))
    inside = atlas.labels == label
    assert means[name] == pytest.approx(data[inside].astype(np.float64).mean(), rel=1e-12)


def test_constant_image_gives_the_constant_in_every_region():
    atlas = atlas_on_model_grid(preset("cpu4mm"))
    means = regional_means(np.full(atlas.labels.shape, 1.25, np.float32), atlas)
    assert len(means) == len(atlas.regions)
    assert set(means.values()) == {1.25}


def test_regional_means_refuses_another_grid():
    atlas = Atlas("tiny", np.ones((2, 2, 2), np.int32), {1: "one"}, np.eye(4))
    assert regional_means(np.full((2, 2, 2), 3.0), atlas) == {"one": 3.0}
    with pytest.raises(ValueError, match="not on the atlas grid"):
        regional_means(np.zeros((3, 2, 2)), atlas)
