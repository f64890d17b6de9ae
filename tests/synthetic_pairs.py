"""Tiny paired volumes for training tests, and entry points run in child processes.

The MRI and PET share a random blob per subject (the PET is a brighter copy), so the MRI
carries information about the PET, as in the real problem, at 16^3 voxels.

Child-process entry points (importable by ``torch.multiprocessing.spawn`` and ``python -m``):
:func:`ddp_worker` (one rank of a 2-process gloo job) and ``python -m synthetic_pairs
KILL_AT_STEP OUT WORK`` (a run that SIGKILLs itself after that step).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from dualglow_app.dataset import PairedVolumes
from dualglow_app.grid import ModelGrid
from dualglow_app.options import TrainOptions
from dualglow_app.tissue import DEFAULT_ANATOMY_READING
from dualglow_app.train import train

SHAPE = (16, 16, 16)


def paired_volumes(n: int = 6, seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> PairedVolumes:
    """``n`` subjects (one session each) with MRI in [0, 1], PET in SUVR, a spherical mask and
    stand-ins for native tissue maps (:func:`tissue_maps_of`), labelled with the reading the group
    level uses by default."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, s) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    mask = (x**2 + y**2 + z**2 < 0.8).astype(np.uint8)
    mri, pet = [], []
    for _ in range(n):
        c = rng.normal(0, 0.3, 3)
        blob = np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 0.1)
        mri.append((0.3 + 0.6 * blob) * mask)
        pet.append((0.5 + 1.5 * blob) * mask)
    mri_array = np.asarray(mri, dtype=np.float32)
    return PairedVolumes(
        labels=[f"sub-{i:02d}" for i in range(n)],
        subjects=[f"{i:02d}" for i in range(n)],
        mri=mri_array,
        pet=np.asarray(pet, dtype=np.float32),
        mask=np.stack([mask] * n),
        age=np.linspace(60, 85, n).astype(np.float32),
        grid=ModelGrid.centred(8.0, shape, levels=2),
        tissue_maps=np.stack([tissue_maps_of(m, mask) for m in mri_array]),
        tissue_maps_reading=DEFAULT_ANATOMY_READING,
    )


def tiny_options(out: Path | str, work: Path | str, **overrides: Any) -> TrainOptions:
    """A model small enough for a few steps per second on one CPU thread."""
    settings: dict[str, Any] = dict(
        bids_dir=Path(out).parent / "bids", output_dir=out, work_dir=work, epochs=3, batch_size=2,
        depth=2, hidden=8, relation_hidden=8, warmup_steps=2, val_fraction=0.34,
        skip_bids_validation=True, report=False, nprocs=1,
    )  # fmt: skip
    settings.update(overrides)
    return TrainOptions(**settings)


def fake_preprocessing(monkeypatch: pytest.MonkeyPatch, fail: set[str] = frozenset()) -> dict[str, int]:  # type: ignore[assignment]
    """Replace the slow registration by grid-sized volumes; subjects in ``fail`` raise."""
    from dualglow_app import preprocess

    calls = {"t1w": 0}

    def t1w(path: Path, grid: Any, work_dir: Any, nprocs: int = 2, options: Any = None) -> Any:
        calls["t1w"] += 1
        if any(f"sub-{label}_" in Path(path).name for label in fail):
            raise preprocess.InputImageError(f"{path}: the image is all zeros")
        volumes = paired_volumes(1, seed=calls["t1w"], shape=grid.shape)
        return SimpleNamespace(
            image=nib.Nifti1Image(volumes.mri[0], grid.affine),
            brain_mask=nib.Nifti1Image(volumes.mask[0], grid.affine),
            pet=volumes.pet[0], grid=grid,
        )  # fmt: skip

    def pet(path: Path, t1: Any, work_dir: Any, nprocs: int = 2, options: Any = None) -> Any:
        return SimpleNamespace(image=nib.Nifti1Image(t1.pet, t1.grid.affine))

    def tissue_maps(t1: Any, nprocs: int = 2, reading: str = "native") -> np.ndarray:
        calls["tissue_maps"] += 1
        calls[f"tissue_maps {reading}"] = calls.get(f"tissue_maps {reading}", 0) + 1
        return tissue_maps_of(np.asarray(t1.image.dataobj), np.asarray(t1.brain_mask.dataobj))

    calls["tissue_maps"] = 0
    monkeypatch.setattr(preprocess, "preprocess_t1w", t1w)
    monkeypatch.setattr(preprocess, "preprocess_pet", pet)
    monkeypatch.setattr(preprocess, "tissue_maps_on_grid", tissue_maps)
    return calls


def tissue_maps_of(mri: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(2, *mri.shape) stand-ins for native tissue maps, a function of the MRI: "grey matter"
    highest at mid intensities, "CSF" at low ones, 0 outside the mask."""
    grey = np.clip(1.0 - np.abs(mri - 0.5) / 0.3, 0.0, 1.0)
    csf = np.clip((0.45 - mri) / 0.15, 0.0, 1.0)
    return (np.stack([grey, csf]) * (mask > 0)).astype(np.float32)


def ddp_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """One rank of a torchrun-like job: the environment torchrun would set, then train()."""
    import torch

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    base = Path(folder)
    options = tiny_options(base / f"out-rank{rank}", base / f"work-rank{rank}", epochs=2, batch_size=1,
                           device="cpu")  # fmt: skip
    result = train(options, data=paired_volumes(6))
    torch.save(result.model.state_dict(), base / f"weights-rank{rank}.pt")


def _kill_after(step_to_die: int) -> Any:
    def on_step(step: int) -> None:
        if step == step_to_die:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    kill_at, out, work = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    train(tiny_options(out, work), data=paired_volumes(6), on_step=_kill_after(kill_at))
