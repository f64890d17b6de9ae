"""A one-page PNG of a few phantoms (young vs old, CN vs AD), to see they look like brains."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from dualglow_app.imaging import load_nifti
from dualglow_app.log import get_logger
from dualglow_app.phantom.subjects import SubjectInfo

log = get_logger(__name__)
SPACE = "MNI152NLin2009cAsym"


def pick_subjects(subjects: list[SubjectInfo], n: int = 4) -> list[SubjectInfo]:
    """Youngest CN, oldest CN, the most severe AD and an MCI, topped up with the rest."""
    chosen: list[SubjectInfo] = []

    def add(candidates: list[SubjectInfo]) -> None:
        for s in candidates:
            if s not in chosen:
                chosen.append(s)
                return

    by_age = sorted(subjects, key=lambda s: s.demographics.age)
    cn = [s for s in by_age if s.demographics.diagnosis == "CN"]
    add(cn)
    add(cn[::-1])
    add(sorted((s for s in subjects if s.demographics.diagnosis == "AD"), key=lambda s: -s.demographics.severity))
    add([s for s in subjects if s.demographics.diagnosis == "MCI"])
    for s in subjects:
        if len(chosen) >= n:
            break
        add([s])
    return chosen[:n]


def _canonical_slice(path: Path, axis: int, mm: float | None = None) -> tuple[np.ndarray, float]:
    img = nib.as_closest_canonical(load_nifti(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if mm is None:
        index = data.shape[axis] // 2
    else:
        world = np.zeros(3)
        world[axis] = mm
        index = int(round((np.linalg.inv(img.affine) @ np.append(world, 1.0))[axis]))
    return np.take(data, index, axis=axis), float(abs(img.affine[axis, axis]))


def save_preview(out_dir: Path, subjects: list[SubjectInfo], sessions: int = 1) -> Path:
    """Write ``derivatives/phantom/preview.png`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = pick_subjects(subjects)
    columns = [
        ("native T1w", "raw", "anat", "_T1w.nii.gz", 2, None, "gray"),
        ("native FDG-PET", "raw", "pet", "_trc-FDG_pet.nii.gz", 2, None, "hot"),
        ("MNI T1w, z=+10", "gt", "anat", f"_space-{SPACE}_T1w.nii.gz", 2, 10.0, "gray"),
        ("MNI T1w, y=-22 (hippocampi)", "gt", "anat", f"_space-{SPACE}_T1w.nii.gz", 1, -22.0, "gray"),
        ("MNI PET, z=+30", "gt", "pet", f"_trc-FDG_space-{SPACE}_desc-noisefree_pet.nii.gz", 2, 30.0, "hot"),
        ("MNI PET, x=+4 (PCC, precuneus)", "gt", "pet", f"_trc-FDG_space-{SPACE}_desc-noisefree_pet.nii.gz", 0, 4.0, "hot"),
    ]
    fig, axes = plt.subplots(len(chosen), len(columns), figsize=(3.0 * len(columns), 3.1 * len(chosen)), squeeze=False)
    for row, subject in enumerate(chosen):
        label = subject.participant_id
        rel = Path(label) if sessions == 1 else Path(label, "ses-01")
        stem = label if sessions == 1 else f"{label}_ses-01"
        for col, (title, root, kind, suffix, axis, mm, cmap) in enumerate(columns):
            base = out_dir if root == "raw" else out_dir / "derivatives" / "phantom"
            image, _ = _canonical_slice(base / rel / kind / f"{stem}{suffix}", axis, mm)
            ax = axes[row, col]
            vmax = np.percentile(image, 99.5) if image.any() else 1.0
            ax.imshow(np.rot90(image), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
        d = subject.demographics
        axes[row, 0].set_ylabel(f"{label}\n{d.diagnosis_detail}, {d.age:.0f} y", fontsize=10)
    fig.suptitle("dualglow phantoms (SYNTHETIC): young vs old, CN vs AD", fontsize=12)
    fig.tight_layout()
    path = out_dir / "derivatives" / "phantom" / "preview.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    log.info("preview written to %s", path)
    return path
