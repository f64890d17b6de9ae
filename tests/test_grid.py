"""ModelGrid: validation, (de)serialisation, presets and geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualglow_app.grid import BRAIN_CENTRE_MM, PRESETS, SPACE, ModelGrid, preset


def test_sides_must_be_divisible_by_two_to_the_levels():
    with pytest.raises(ValueError, match=r"not divisible by 2\*\*levels = 8"):
        ModelGrid(4.0, (40, 48, 44), (0.0, 0.0, 0.0), levels=3)
    # 44 is fine with two levels (divisible by 4)
    assert ModelGrid(4.0, (40, 48, 44), (0.0, 0.0, 0.0), levels=2).shape == (40, 48, 44)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"voxel_size": 0.1}, "outside 0.25..16 mm"),
        ({"voxel_size": 20.0}, "outside 0.25..16 mm"),
        ({"shape": (8, 8)}, "3D"),
        ({"space": "MNI305"}, "only MNI152NLin2009cAsym"),
    ],
)
def test_invalid_grids_are_refused(kwargs, message):
    args = {"voxel_size": 2.0, "shape": (8, 8, 8), "origin": (0.0, 0.0, 0.0), "levels": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        ModelGrid(**args)


def test_to_dict_from_dict_round_trip_through_json():
    grid = ModelGrid(2.5, (16, 24, 8), (-10.0, 20.5, -3.25), levels=3)
    data = json.loads(json.dumps(grid.to_dict()))
    assert data == {
        "voxel_size": 2.5, "shape": [16, 24, 8], "origin": [-10.0, 20.5, -3.25], "levels": 3, "space": SPACE,
    }
    back = ModelGrid.from_dict(data)
    assert back == grid
    assert isinstance(back.shape, tuple) and isinstance(back.origin, tuple)
    assert hash(back) == hash(grid)


def test_from_dict_defaults_levels_and_space():
    grid = ModelGrid.from_dict({"voxel_size": 4, "shape": [8, 8, 8], "origin": [1, 2, 3]})
    assert grid.levels == 3 and grid.space == SPACE
    assert grid.origin == (1.0, 2.0, 3.0) and isinstance(grid.voxel_size, float)


def test_from_dict_refuses_unknown_keys():
    data = preset("tiny8mm").to_dict() | {"voxelsize": 8.0}
    with pytest.raises(ValueError, match=r"unknown model grid keys \['voxelsize'\]"):
        ModelGrid.from_dict(data)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_centred_and_hold_the_brain(name):
    grid = preset(name)
    assert all(n % 2**grid.levels == 0 for n in grid.shape)
    centre = [o + (n - 1) / 2 * grid.voxel_size for o, n in zip(grid.origin, grid.shape, strict=True)]
    np.testing.assert_allclose(centre, BRAIN_CENTRE_MM)
    low, high = grid.bounding_box
    brain = ((-72, 72), (-108, 73), (-72, 82))  # MNI152NLin2009cAsym brain extent, mm
    for axis, (lo, hi) in enumerate(brain):
        assert low[axis] < lo and high[axis] > hi
    assert ModelGrid.from_dict(grid.to_dict()) == grid


def test_preset_values_and_unknown_name():
    assert preset("cpu4mm").shape == (40, 48, 40) and preset("cpu4mm").voxel_size == 4.0
    assert preset("paper2mm").shape == (80, 96, 80) and preset("paper2mm").levels == 4
    assert preset("tiny8mm").shape == (20, 24, 20) and preset("tiny8mm").levels == 2
    with pytest.raises(ValueError, match="unknown model grid 'huge'"):
        preset("huge")


def test_affine_and_bounding_box_values():
    grid = ModelGrid(2.0, (8, 16, 24), (-7.0, -8.0, 9.0), levels=3)
    expected = np.array([[2.0, 0, 0, -7], [0, 2, 0, -8], [0, 0, 2, 9], [0, 0, 0, 1]])
    np.testing.assert_array_equal(grid.affine, expected)
    # voxel (1, 2, 3) -> world
    np.testing.assert_array_equal(grid.affine @ [1, 2, 3, 1], [-5.0, -4.0, 15.0, 1.0])
    low, high = grid.bounding_box
    assert low == (-8.0, -9.0, 8.0)
    assert high == (-7.0 + 7 * 2 + 1, -8.0 + 15 * 2 + 1, 9.0 + 23 * 2 + 1)
    # the affine is a fresh array each time: editing one copy cannot change the grid
    grid.affine[0, 0] = 99.0
    assert grid.affine[0, 0] == 2.0


def test_centred_puts_the_middle_at_the_centre():
    grid = ModelGrid.centred(4.0, (8, 8, 16), levels=3, centre=(10.0, 0.0, -4.0))
    assert grid.origin == (10.0 - 14.0, -14.0, -4.0 - 30.0)
