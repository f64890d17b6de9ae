"""Fault injection for the reliability tests: a fast cohort, fast registration, and a CLI run
that kills itself at a chosen point.

The cohort is small synthetic heads (40 x 48 x 40 voxels of 4 mm, centred on MNI space) with
an FDG-like PET; registration is replaced by an identity transform written the way ANTs
writes it and skull stripping by a threshold (deepbet and SyN cost ~30 s a subject), while
everything around them - reading and checking images, N4, the cache entries, resampling,
inference, the outputs, stacking, training, checkpoints - runs for real.

``python tests/reliability/harness.py [--kill SIGNAL:N] [--count-replaces FILE] [--entry
dualglow|evaluate] -- ARGS`` runs an entry point's CLI with ARGS in this process and, with
``--kill``, sends SIGNAL (TERM, INT or KILL) to itself just before the N-th ``os.replace`` -
the moment an atomic write or a cache entry is complete under its temporary name and not yet
in place, the worst moment to die. ``--count-replaces FILE`` writes how many renames an
uninterrupted run made. Runs compared with one another all run here, in fresh processes:
ITK fixes its thread count at first use in a process, and N4's result depends on it (1, 2
and 4 threads give three different images).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

SHAPE = (40, 48, 40)
VOXEL_MM = 4.0


def head_affine() -> np.ndarray:
    """4 mm voxels centred on the MNI origin (the fake registration is the identity)."""
    affine = np.diag([VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = -VOXEL_MM * (np.array(SHAPE) - 1) / 2 + np.array([0.0, -18.0, 8.0])
    return affine


def _head(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A T1w-like head (brain with grey/white contrast inside a skull-like shell) and an FDG-like
    PET (grey matter 4x white), both with a subject-specific shape."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in SHAPE]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    scale = 1 + rng.normal(0, 0.04, 3)
    r = np.sqrt((x / (0.7 * scale[0])) ** 2 + (y / (0.8 * scale[1])) ** 2 + (z / (0.7 * scale[2])) ** 2)
    brain = r < 1.0
    grey = brain & (r > 0.75 + 0.05 * np.sin(6 * x + seed) * np.cos(5 * y))
    t1 = np.where(brain, np.where(grey, 70.0, 100.0), 0.0) + np.where((r > 1.1) & (r < 1.25), 60.0, 0.0)
    t1 = t1 * (1 + 0.1 * x) + rng.normal(0, 2, SHAPE).clip(0) + 1.0
    pet = np.where(brain, np.where(grey, 4.0, 1.0), 0.0) * 1000 + rng.normal(0, 20, SHAPE).clip(0) + 1.0
    return t1.astype(np.float32), pet.astype(np.float32)


def build_cohort(root: Path, subjects: int = 3, with_pet: bool = True, ages: dict[str, str] | None = None) -> Path:
    """A raw BIDS dataset of ``subjects`` synthetic heads (sub-01, ...), ages 60 + 5 k."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "reliability", "BIDSVersion": "1.10.0"}))
    rows = ["participant_id\tage\tsex"]
    for k in range(subjects):
        label = f"{k + 1:02d}"
        t1, pet = _head(k)
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(t1, head_affine()), anat / f"sub-{label}_T1w.nii.gz")
        if with_pet:
            (root / f"sub-{label}" / "pet").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(pet, head_affine()), root / f"sub-{label}" / "pet" / f"sub-{label}_trc-FDG_pet.nii.gz")
        age = (ages or {}).get(label, f"{60 + 5 * k}")
        rows.append(f"sub-{label}\t{age}\t{'F' if k % 2 else 'M'}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def patch_registration(setattr_: Callable[[Any, str, Any], None]) -> None:
    """Threshold skull stripping and identity registrations (see the module docstring)."""
    import ants

    from dualglow_app import preprocess

    def skull_strip(img: nib.Nifti1Image, threshold: float = 0.5) -> np.ndarray:
        data = np.asarray(img.dataobj, dtype=np.float32)
        return (data > 0.5 * float(np.percentile(data, 99))) & (data < 1.2 * float(np.percentile(data, 99)))

    def registration(fixed: Any, moving: Any, outprefix: str = "", **kwargs: Any) -> dict[str, list[str]]:
        if os.environ.get("RELIABILITY_REGISTRATION_LOG"):  # one line per registration, for counting
            with open(os.environ["RELIABILITY_REGISTRATION_LOG"], "a") as handle:
                handle.write(f"{kwargs.get('type_of_transform')}\n")
            time.sleep(2.0)  # as slow as a registration can be made here, so concurrent runs overlap
        path = f"{outprefix}0GenericAffine.mat"
        ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), path)
        return {"fwdtransforms": [path], "invtransforms": [path]}

    setattr_(preprocess, "skull_strip", skull_strip)
    setattr_(ants, "registration", registration)


def participant_model(path: Path, bids: Path, work: Path) -> Path:
    """A tiny age-conditioned model on the tiny8mm grid, trained on the cohort's T1w."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from participant_data import make_model

    from dualglow_app.grid import preset
    from dualglow_app.preprocess import preprocess_t1w

    grid = preset("tiny8mm")
    t1w = sorted(bids.glob("sub-*/anat/*_T1w.nii.gz"))[:2]
    images = [np.asarray(preprocess_t1w(p, grid, work, 1).image.dataobj) for p in t1w]
    return make_model(path, grid, images, [65.0, 75.0], steps=4)


def _on_replace(hook: Callable[[int], None]) -> None:
    """Call ``hook(n)`` just before the n-th ``os.replace`` of the run's own files (the shared
    template cache, warm or cold depending on earlier runs, is not counted)."""
    real_replace = os.replace
    shared = os.environ.get("DUALGLOW_TEMPLATE_CACHE") or "\0"
    calls = {"n": 0}

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if not str(dst).startswith(shared):
            calls["n"] += 1
            hook(calls["n"])
        real_replace(src, dst, *args, **kwargs)

    os.replace = replace  # type: ignore[assignment]


def _kill_before_replace(signum: int, at: int) -> None:
    """Send ``signum`` to this process just before the ``at``-th rename."""

    def kill(n: int) -> None:
        if n == at:
            os.kill(os.getpid(), signum)

    _on_replace(kill)


def _count_replaces(out: Path) -> None:
    """Write the number of renames to ``out`` when the run ends."""
    import atexit

    calls = {"n": 0}
    _on_replace(lambda n: calls.update(n=n))
    atexit.register(lambda: out.write_text(str(calls["n"])))


def main(argv: list[str]) -> None:
    split = argv.index("--")
    own, args = argv[:split], argv[split + 1 :]
    patch_registration(setattr)
    if "--kill" in own:
        name, at = own[own.index("--kill") + 1].split(":")
        _kill_before_replace(getattr(signal, f"SIG{name}"), int(at))
    if "--count-replaces" in own:
        _count_replaces(Path(own[own.index("--count-replaces") + 1]))
    entry = own[own.index("--entry") + 1] if "--entry" in own else "dualglow"
    if entry == "evaluate":
        from dualglow_app.cli.evaluate import main as command
    else:
        from dualglow_app.cli import main as command
    command.main(args, prog_name=entry, standalone_mode=True)


if __name__ == "__main__":
    main(sys.argv[1:])


def snapshot(folder: Path) -> dict[str, Any]:
    """What a run wrote, comparable across runs: images by their data and affine, JSON parsed,
    other files by their bytes; logs, the model's creation time and the reports' time stamp
    left out."""
    import hashlib

    got: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if not path.is_file() or name.startswith("logs/"):
            continue
        if name.endswith(".nii.gz"):
            image = nib.load(path)
            data = np.asarray(image.dataobj)
            got[name] = (hashlib.sha256(data.tobytes()).hexdigest(), image.affine.tolist())
        elif name.endswith(".json"):
            got[name] = json.loads(path.read_text())
            if isinstance(got[name], dict):
                got[name].pop("created", None)
        elif name.endswith(".html"):  # the report says when it was written
            text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "WHEN", path.read_text())
            got[name] = hashlib.sha256(text.encode()).hexdigest()
        else:
            got[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return got


def temporaries(*folders: Path) -> list[Path]:
    """Every temporary of an atomic write left under ``folders``."""
    from dualglow_app.io import is_temporary

    return [p for folder in folders for p in folder.rglob("*") if is_temporary(p.name)]
