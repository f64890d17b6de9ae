"""Read a phantom's true transforms back, to score registration against them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from dualglow_app.imaging import load_nifti


def _sample(field: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(affine)
    vox = inv[:3, :3] @ points + inv[:3, 3:4]
    return np.stack([ndi.map_coordinates(field[..., c], vox, order=1, mode="nearest") for c in range(3)])


@dataclass(frozen=True)
class TrueTransform:
    """Point maps between native T1w, native PET and MNI152NLin2009cAsym (mm, RAS, shape (3, n)).

    Example::

        tt = load_truth("phantom_bids", "sub-001")
        tt.mni_to_t1w(np.array([[0.0], [-18.0], [12.0]]))   # where the brain centre is in the T1w
    """

    t1w_from_aligned: np.ndarray
    t1w_from_pet: np.ndarray
    u: np.ndarray  # MNI -> aligned displacement
    w: np.ndarray  # aligned -> MNI displacement
    field_affine: np.ndarray

    def mni_to_t1w(self, points: np.ndarray) -> np.ndarray:
        a = points + _sample(self.u, self.field_affine, points)
        return self.t1w_from_aligned[:3, :3] @ a + self.t1w_from_aligned[:3, 3:4]

    def t1w_to_mni(self, points: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.t1w_from_aligned)
        a = inv[:3, :3] @ points + inv[:3, 3:4]
        return a + _sample(self.w, self.field_affine, a)

    def pet_to_t1w(self, points: np.ndarray) -> np.ndarray:
        return self.t1w_from_pet[:3, :3] @ points + self.t1w_from_pet[:3, 3:4]


def load_truth(bids_dir: Path | str, participant: str, session: str | None = None) -> TrueTransform:
    """The true transforms of ``participant`` ('sub-001' or '001') from ``derivatives/phantom``."""
    label = participant.removeprefix("sub-")
    rel = Path(f"sub-{label}") if session is None else Path(f"sub-{label}", f"ses-{session.removeprefix('ses-')}")
    stem = "_".join(p for p in rel.parts)
    xfm = Path(bids_dir) / "derivatives" / "phantom" / rel / "xfm"
    doc = json.loads((xfm / f"{stem}_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.json").read_text())
    pet = json.loads((xfm / f"{stem}_from-PET_to-T1w_mode-image_xfm.json").read_text())
    u_img = load_nifti(xfm / doc["MNIToAlignedField"])
    w_img = load_nifti(xfm / doc["AlignedToMNIField"])
    return TrueTransform(
        t1w_from_aligned=np.array(doc["T1wFromAligned"]),
        t1w_from_pet=np.array(pet["T1wFromPET"]),
        u=np.asarray(u_img.dataobj, dtype=np.float32),
        w=np.asarray(w_img.dataobj, dtype=np.float32),
        field_affine=u_img.affine,
    )
