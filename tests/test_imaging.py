"""imaging.resample_to and load_nifti on tiny volumes with known answers."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dualglow_app.imaging import load_nifti, resample_to

SHAPE = (5, 6, 7)
SOURCE_AFFINE = np.array([[2.0, 0, 0, -4], [0, 2, 0, -6], [0, 0, 2, 3], [0, 0, 0, 1]])


def _image(dtype: type = np.float32, seed: int = 0) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(SHAPE) * 20 + 50).clip(0, 200).astype(dtype)
    return nib.Nifti1Image(data, SOURCE_AFFINE)


def _voxel_map(matrix: list[list[float]]) -> np.ndarray:
    """Target voxel -> source voxel (4 x 4) as a target affine on the source image."""
    return SOURCE_AFFINE @ np.array(matrix, dtype=float)


def test_load_nifti_returns_the_image(tmp_path):
    img = _image()
    nib.save(img, tmp_path / "x.nii.gz")
    loaded = load_nifti(tmp_path / "x.nii.gz")
    assert isinstance(loaded, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), img.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(loaded.affine, SOURCE_AFFINE)


@pytest.mark.parametrize("order", [0, 1])
def test_identity_grid_returns_the_data_unchanged(order):
    img = _image()
    out = resample_to(img, SOURCE_AFFINE, SHAPE, order=order)
    assert out.dtype == np.float32
    assert out.tobytes() == np.asarray(img.dataobj).tobytes()


@pytest.mark.parametrize("order", [0, 1])
def test_flipped_permuted_shifted_grid_copies_exactly(order):
    img = _image()
    data = np.asarray(img.dataobj)
    # target (a, b, c) reads source (4 - c + 1, b - 2, a): z flipped into x with a shift,
    # y shifted by two voxels, x into z; parts of the target lie outside the source.
    matrix = [[0, 0, -1, 5], [0, 1, 0, -2], [1, 0, 0, 0], [0, 0, 0, 1]]
    shape = (7, 6, 5)
    out = resample_to(img, _voxel_map(matrix), shape, order=order)
    expected = np.zeros(shape, np.float32)
    for a, b, c in itertools.product(*map(range, shape)):
        i, j, k = 5 - c, b - 2, a
        if 0 <= i < SHAPE[0] and 0 <= j < SHAPE[1] and 0 <= k < SHAPE[2]:
            expected[a, b, c] = data[i, j, k]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    assert (out == 0).any() and (out != 0).sum() > 50
    # the copy is what scipy's affine_transform computes, to the byte
    vox = np.array(matrix, dtype=float)
    reference = ndimage.affine_transform(
        data, vox[:3, :3], vox[:3, 3], output_shape=shape, order=order, mode="constant", cval=0.0
    )
    assert out.tobytes() == reference.tobytes()


def test_whole_voxel_copy_keeps_nan_to_its_own_voxel():
    # affine_transform (order 1) multiplies neighbours by zero weights and spreads a NaN;
    # the exact copy used for whole-voxel grids does not.
    img = _image()
    np.asarray(img.dataobj)[2, 3, 4] = np.nan
    shift = [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    out = resample_to(img, _voxel_map(shift), SHAPE, order=1)
    assert np.isnan(out).sum() == 1 and np.isnan(out[1, 3, 4])


def test_negative_zero_comes_back_as_affine_transform_returns_it():
    data = np.array([-0.0, -1.0, 2.0], np.float32).reshape(3, 1, 1)
    out = resample_to(nib.Nifti1Image(data, np.eye(4)), np.eye(4), (3, 1, 1), order=1)
    assert not np.signbit(out[0, 0, 0]) and out[1, 0, 0] == -1.0


def test_half_voxel_shift_interpolates():
    data = np.broadcast_to(np.arange(SHAPE[0], dtype=np.float32)[:, None, None], SHAPE).copy()
    img = nib.Nifti1Image(data, SOURCE_AFFINE)
    matrix = [[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    out = resample_to(img, _voxel_map(matrix), SHAPE, order=1)
    np.testing.assert_array_equal(out[:-1, 2, 3], np.arange(SHAPE[0] - 1) + 0.5)
    # past the last voxel centre is outside the source (constant mode): zero
    assert out[-1, 2, 3] == 0.0


def test_near_whole_voxel_shift_is_interpolated_not_copied():
    img = _image()
    matrix = [[1, 0, 0, 1e-3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    out = resample_to(img, _voxel_map(matrix), SHAPE, order=1)
    data = np.asarray(img.dataobj)
    assert not np.array_equal(out, data)
    np.testing.assert_allclose(out[:-1], data[:-1], atol=0.5)


def test_dtype_none_keeps_the_data_type():
    img = _image(np.int16)
    flip = [[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    out = resample_to(img, _voxel_map(flip), SHAPE, order=1, dtype=None)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, np.asarray(img.dataobj)[::-1])
    # interpolated too (a 2x zoom is no permutation)
    zoomed = resample_to(img, SOURCE_AFFINE @ np.diag([2.0, 2, 2, 1]), (3, 3, 4), order=1, dtype=None)
    assert zoomed.dtype == np.int16
    assert zoomed[1, 1, 1] == np.asarray(img.dataobj)[2, 2, 2]
    # the default reads float32, other types on request
    assert resample_to(img, SOURCE_AFFINE, SHAPE, order=0).dtype == np.float32
    assert resample_to(img, SOURCE_AFFINE, SHAPE, order=0, dtype=np.float64).dtype == np.float64


def test_higher_orders_use_the_spline_even_on_whole_voxel_grids():
    img = _image()
    data = np.asarray(img.dataobj)
    flip = [[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    out = resample_to(img, _voxel_map(flip), SHAPE, order=3)
    vox = np.array(flip, dtype=float)
    reference = ndimage.affine_transform(
        data, vox[:3, :3], vox[:3, 3], output_shape=SHAPE, order=3, mode="constant", cval=0.0
    )
    assert out.tobytes() == reference.tobytes()
    np.testing.assert_allclose(out, data[::-1], rtol=1e-4, atol=1e-3)  # a spline through the samples


def test_non_3d_inputs_are_refused():
    with pytest.raises(ValueError, match="3D image"):
        resample_to(nib.Nifti1Image(np.zeros((2, 2, 2, 2), np.float32), np.eye(4)), np.eye(4), (2, 2, 2), order=1)
    with pytest.raises(ValueError, match="3D target"):
        resample_to(_image(), SOURCE_AFFINE, (5, 6), order=1)
