"""Shared fixtures: tiny, deterministic BIDS trees with real (small) NIfTI files; an isolated,
offline template cache; tests/ on sys.path for the synthetic-subject helpers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors are dominated by per-op overhead: a second thread only contends (2-core CI)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """CLI tests call setup_logging, which attaches handlers; don't let them leak into later tests."""
    from dualglow_app.log import get_logger

    logger = get_logger()
    state = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = state[0]
    logger.setLevel(state[1])
    logger.propagate = state[2]


def write_nifti(path: Path, shape: Sequence[int], seed: int, zooms: float = 2.0) -> Path:
    """A small smooth-ish positive volume (not all zero, no NaN) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = (rng.random(tuple(shape)) + 1.0).astype(np.float32)
    affine = np.diag([zooms, zooms, zooms, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def build_bids(
    root: Path,
    subjects: Sequence[str] = ("01", "02"),
    sessions: Sequence[str] = (),
    with_pet: Sequence[str] = ("01",),
    ages: dict[str, float] | None = None,
    shape: Sequence[int] = (8, 8, 8),
) -> Path:
    """A minimal raw BIDS dataset; PET (trc-FDG) only for the subjects in ``with_pet``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    ages = ages if ages is not None else {s: 60.0 + 5 * i for i, s in enumerate(subjects)}
    rows = ["participant_id\tage\tsex\tdiagnosis"]
    for i, subject in enumerate(subjects):
        age = ages.get(subject)
        rows.append(f"sub-{subject}\t{'n/a' if age is None else age}\tF\tCN")
        for session in sessions or [None]:
            folder = root / f"sub-{subject}" / (f"ses-{session}" if session else "")
            prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            write_nifti(folder / "anat" / f"{prefix}_T1w.nii.gz", shape, seed=i)
            if subject in with_pet:
                write_nifti(folder / "pet" / f"{prefix}_trc-FDG_pet.nii.gz", shape, seed=100 + i)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def tiny_bids(tmp_path: Path) -> Callable[..., Path]:
    """Factory fixture: ``tiny_bids(subjects=..., sessions=..., with_pet=..., ages=...)``."""

    def factory(**kwargs: object) -> Path:
        return build_bids(tmp_path / "bids", **kwargs)  # type: ignore[arg-type]

    return factory


@pytest.fixture(scope="session")
def template_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("templateflow-cache")


@pytest.fixture(autouse=True)
def offline_templates(
    monkeypatch: pytest.MonkeyPatch, template_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Tests must never touch the network or the developer's real caches.
    monkeypatch.setenv("DUALGLOW_TEMPLATEFLOW_OFFLINE", "1")
    monkeypatch.setenv("DUALGLOW_TEMPLATE_CACHE", str(template_cache))
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path_factory.getbasetemp() / "empty-tf-home"))
