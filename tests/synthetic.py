"""Synthetic raw inputs built from the ICBM152 2009a maps in the nilearn wheel.

Until the phantom cohort exists these stand in for a subject: the ICBM152 T1 moved by a
known rigid pose, written with a non-RAS voxel order and anisotropic voxels, plus a
pseudo-FDG-PET (grey:white 4:1, 6 mm blur, 3 frames) in yet another pose.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from dualglow_app.imaging import resample_to

NILEARN_DATA = Path(__import__("nilearn").__file__).parent / "datasets" / "data"
T1 = NILEARN_DATA / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = NILEARN_DATA / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM = NILEARN_DATA / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


def _pose(rng: np.random.Generator, degrees: float, shift_mm: float) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-degrees, degrees, 3), degrees=True).as_matrix()
    pose[:3, 3] = rng.uniform(-shift_mm, shift_mm, 3)
    return pose


def scanner_grid(pose: np.ndarray, voxel: tuple[float, float, float], shape: tuple[int, int, int],
                 axes: str) -> np.ndarray:
    """Affine of a scanner grid with voxel order ``axes`` (e.g. 'PIR'), centred on the head."""
    letters = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    linear = np.zeros((3, 3))
    for column, letter in enumerate(axes):
        row, sign = letters[letter]
        linear[row, column] = sign * voxel[column]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.array([0.0, -18.0, 5.0]) - linear @ ((np.array(shape) - 1) / 2)
    return pose @ affine


def make_subject(folder: Path, seed: int = 0, t1_voxel: tuple[float, float, float] = (1.2, 1.0, 1.1),
                 pet_frames: int = 3) -> dict[str, Path]:
    """Write sub-XX_T1w.nii.gz and sub-XX_pet.nii.gz; return their paths (and the truth)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t1 = nib.load(T1)
    shape = tuple(int(round(s / v)) for s, v in zip((200.0, 220.0, 200.0), t1_voxel, strict=True))
    affine = scanner_grid(_pose(rng, 12, 10), t1_voxel, shape, "PIR")
    data = resample_to(t1, affine, shape, order=1)
    # smooth multiplicative bias field (0.85..1.15), like a receive coil
    xyz = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    bias = 1 + 0.15 * np.tanh(rng.normal(size=3) @ xyz.reshape(3, -1)).reshape(shape)
    data = data * bias + rng.normal(0, 2, shape).clip(0)
    t1_path = folder / f"sub-{seed:02d}_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), t1_path)

    gm, wm = nib.load(GM), nib.load(WM)
    gm_p = np.asarray(gm.dataobj, dtype=np.float32) / 255.0  # the wheel stores uint8 0..255
    wm_p = np.asarray(wm.dataobj, dtype=np.float32) / 255.0
    gm_path = folder / f"sub-{seed:02d}_label-GM_probseg.nii.gz"
    gm_native = resample_to(nib.Nifti1Image(gm_p, gm.affine), affine, shape, order=1)
    nib.save(nib.Nifti1Image(gm_native.astype(np.float32), affine), gm_path)
    activity = 4 * gm_p + wm_p
    activity = ndimage.gaussian_filter(activity, 6 / 2.3548)  # 6 mm FWHM at 1 mm
    pet_shape = (100, 110, 90)
    pet_affine = scanner_grid(_pose(rng, 8, 8), (2.0, 2.0, 2.0), pet_shape, "LAS")
    pet = resample_to(nib.Nifti1Image(activity, gm.affine), pet_affine, pet_shape, order=1)
    frames = np.stack([pet * 1000 * (1 + 0.02 * k) + rng.normal(0, 50, pet_shape) for k in range(pet_frames)], -1)
    pet_path = folder / f"sub-{seed:02d}_pet.nii.gz"
    nib.save(nib.Nifti1Image(frames.astype(np.float32), pet_affine), pet_path)
    return {"t1w": t1_path, "pet": pet_path, "native_gm": gm_path, "truth_t1w": T1, "truth_gm": GM}
