"""NIfTI reading and world-space resampling, the one implementation every module uses.

:func:`resample_to` puts an image onto another voxel grid (an affine and a shape) by world
(RAS mm) coordinates, zero outside the source. Grids that differ from the source only by axis
permutations, flips and whole-voxel shifts (the wheel atlases and templates against
TemplateFlow's grids, for instance) are copied by indexing when ``order`` is 0 or 1, which is
exact for those orders and much faster; anything else goes through
``scipy.ndimage.affine_transform`` (constant mode, 0 outside), which is also what
``nibabel.processing.resample_from_to`` does. Both give the same bytes for finite data; only a
NaN or infinity differs: the copy keeps it to its own voxel, where affine_transform's
zero-weight neighbour terms spread NaN to the voxels around it.

>>> img = nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4))
>>> flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])
>>> flip_x[0, 3] = 1.0
>>> resample_to(img, flip_x, (2, 2, 2), order=0, dtype=None)[:, 0, 0].tolist()
[4, 0]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import cast

import nibabel as nib
import numpy as np
from numpy.typing import DTypeLike

#: Largest distance (in source voxels) from a whole voxel that still counts as one.
WHOLE_VOXEL_ATOL = 1e-6
#: A Gaussian's sigma per unit of its full width at half maximum, 1 / (2 sqrt(2 ln 2)).
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def load_nifti(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """``nib.load`` typed as the NIfTI image it returns for ``.nii``/``.nii.gz`` files."""
    return cast(nib.Nifti1Image, nib.load(path))


def _index_copy_axes(lin: np.ndarray, shift: np.ndarray) -> np.ndarray | None:
    """Source axis of each target axis when target voxel -> source voxel (``lin``, ``shift``)
    is an axis permutation with flips and whole-voxel shifts; None otherwise."""
    rounded = np.round(lin)
    if not np.allclose(lin, rounded, rtol=0.0, atol=WHOLE_VOXEL_ATOL):
        return None
    if not np.allclose(shift, np.round(shift), rtol=0.0, atol=WHOLE_VOXEL_ATOL):
        return None
    magnitude = np.abs(rounded)
    if not (np.all(magnitude.sum(axis=0) == 1) and np.all(magnitude.sum(axis=1) == 1)):
        return None
    return np.argmax(magnitude, axis=0)


def resample_to(
    img: nib.Nifti1Image,
    affine: np.ndarray,
    shape: Sequence[int],
    order: int,
    dtype: DTypeLike | None = np.float32,
) -> np.ndarray:
    """``img`` on the grid (``affine``, ``shape``) in world space, spline ``order``, 0 outside.

    ``dtype``: the data are read as this type before resampling (default float32); ``None``
    keeps the image's own data type (the output then has it too, so an integer image
    interpolated with ``order`` >= 1 is rounded to integers).

    Example::

        >>> from dualglow_app.templates import tf_grid
        >>> affine, shape = tf_grid(2)
        >>> resample_to(load_nifti("sub-01_T1w.nii.gz"), affine, shape, order=1).shape  # doctest: +SKIP
        (97, 115, 97)
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"resample_to needs a 3D target shape, got {shape}")
    if len(img.shape) != 3:
        raise ValueError(f"resample_to needs a 3D image, got shape {img.shape}")
    to_src = np.linalg.inv(img.affine) @ affine
    lin, shift = to_src[:3, :3], to_src[:3, 3]
    data = np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    src_axes = _index_copy_axes(lin, shift) if order <= 1 else None
    if src_axes is None:
        from scipy import ndimage

        return ndimage.affine_transform(
            data, lin, shift, output_shape=shape, order=order, mode="constant", cval=0.0
        )
    index = [
        int(round(lin[a, t])) * np.arange(n) + int(round(shift[a]))
        for t, (a, n) in enumerate(zip(src_axes, shape, strict=True))
    ]
    valid = [(i >= 0) & (i < data.shape[a]) for i, a in zip(index, src_axes, strict=True)]
    out = np.zeros(shape, dtype=data.dtype)
    sub = data.transpose(src_axes)[np.ix_(*[i[v] for i, v in zip(index, valid, strict=True)])]
    out[np.ix_(*[np.flatnonzero(v) for v in valid])] = sub
    if out.dtype.kind == "f":
        out += 0.0  # -0.0 -> +0.0, as affine_transform returns it: both paths give the same bytes
    return out
