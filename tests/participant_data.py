"""A small phantom BIDS cohort and a small trained DUAL-GLOW for the participant level.

The cohort is the digital phantom (``dualglow_app.phantom.make_cohort``: sub-001, sub-002,
with FDG-PET and ground truth) plus sub-003 whose two sessions are copies of sub-001's T1w
(ages in ``sub-003_sessions.tsv``, n/a in participants.tsv), so preprocessing (cached by
the input's sha256) costs two registrations for four scans. The model is tiny, on the 8 mm
grid, its ActNorms initialised by a train-mode forward on real preprocessed T1w, then
trained a few steps on pseudo-PET (grey matter brighter, scaled by age), which is enough for
outputs to depend on the T1w and on age.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dualglow_app.data import IntensityScaling
from dualglow_app.grid import ModelGrid

SESSION_AGES = {"a": 70.0, "b": 72.0}


def build_cohort(
    root: Path, n_subjects: int = 2, seed: int = 0, session_subject: bool = True, voxel_mm: float = 2.0
) -> Path:
    """A phantom cohort of ``n_subjects`` (+ sub-003 with ses-a / ses-b, see the module).

    ``voxel_mm`` 2 (the phantom's fast-test resolution) halves preprocessing; 1 is realistic.
    """
    from dualglow_app.phantom import make_cohort

    make_cohort(root, n_subjects=n_subjects, seed=seed, sessions=1, voxel_mm=voxel_mm)
    if session_subject:
        label = f"{n_subjects + 1:03d}"
        source = root / "sub-001" / "anat" / "sub-001_T1w.nii.gz"
        for session in SESSION_AGES:
            anat = root / f"sub-{label}" / f"ses-{session}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, anat / f"sub-{label}_ses-{session}_T1w.nii.gz")
        rows = "".join(f"ses-{s}\t{a:g}\n" for s, a in SESSION_AGES.items())
        (root / f"sub-{label}" / f"sub-{label}_sessions.tsv").write_text("session_id\tage\n" + rows)
        with (root / "participants.tsv").open(encoding="utf-8") as handle:
            columns = handle.readline().rstrip("\n").split("\t")
        row = {"participant_id": f"sub-{label}", "age": "n/a", "sex": "M"}
        with (root / "participants.tsv").open("a", encoding="utf-8") as handle:
            handle.write("\t".join(row.get(c, "n/a") for c in columns) + "\n")
    return root


def participant_ages(root: Path) -> dict[str, float]:
    """participants.tsv ages by label (n/a left out)."""
    with (root / "participants.tsv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {r["participant_id"][4:]: float(r["age"]) for r in rows if r["age"] not in ("", "n/a")}


def fit_briefly(model: object, mri: object, pet: object, side: object, steps: int, tissue_maps: object = None) -> None:
    """A few AdaMax steps on the model's objective: enough for the tests' toy signal."""
    import torch

    model.train()  # type: ignore[attr-defined]
    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)  # type: ignore[attr-defined]
    for _ in range(steps):
        optimizer.zero_grad()
        model.nll(mri, pet, side, tissue_maps)["loss"].backward()  # type: ignore[attr-defined]
        optimizer.step()


def make_model(
    path: Path,
    grid: ModelGrid,
    t1w_images: Sequence[np.ndarray],
    ages: Sequence[float],
    steps: int = 10,
    with_age: bool = True,
    conditioning_range: bool = True,
    **config: int,
) -> Path:
    """Train a small DualGlow on (T1w, pseudo-PET) pairs on ``grid`` and save it with the
    metadata synthesis reads (grid, intensity, side_info, demonstration)."""
    import torch

    from dualglow_app.model import AGE_SCALING, DualGlow, DualGlowConfig
    from dualglow_app.weights import save_model

    torch.manual_seed(0)
    sizes = {"levels": grid.levels, "depth": 2, "hidden": 16, "relation_hidden": 16} | config
    cfg = DualGlowConfig(ndim=3, continuous={"age": AGE_SCALING} if with_age else {}, **sizes)
    model = DualGlow(cfg)
    scaling = IntensityScaling()
    mri = torch.from_numpy(np.stack([scaling.mri_to_model(t) for t in t1w_images]))[:, None]
    age = torch.tensor([float(a) for a in ages])
    # grey matter (mid T1w intensity) is bright in FDG; older -> lower uptake (-8 %/decade)
    gm = torch.exp(-(((mri - 0.55) / 0.15) ** 2)) * (mri > 0)
    suvr = (0.6 * (mri > 0) + 1.2 * gm) * (1 - 0.008 * (age - 70))[:, None, None, None, None]
    pet = torch.from_numpy(scaling.pet_to_model(suvr.numpy()))
    side = {"age": age} if with_age else None
    fit_briefly(model, mri, pet, side, steps)
    if conditioning_range:
        model.set_conditioning_range([(mri, side)])
    model.eval()
    metadata = {
        "grid": grid.to_dict(),
        "intensity": scaling.to_dict(),
        "side_info": list(cfg.side_names),
        "demonstration": True,
        "training": {"subjects": len(t1w_images), "steps": steps, "reference_region": "cerebellum"},
    }
    return save_model(model, path, metadata)


def make_covariate_model(path: Path, grid: ModelGrid, t1w_images: Sequence[np.ndarray],
                         pet_images: Sequence[np.ndarray], values: dict[str, list], steps: int = 6,
                         tissue_maps: Sequence[np.ndarray] | None = None) -> Path:  # fmt: skip
    """A small DualGlow conditioned on age, sex and diagnosis (learnt by the group level's
    :func:`dualglow_app.covariates.learn_covariates` from ``values``), trained a few steps on
    (T1w, PET) pairs whose PET is 25 % lower in AD (so a diagnosis sweep moves it), and saved
    with the covariates in its metadata, as the group level writes it. With ``tissue_maps``
    (each T1w's native tissue maps) its anatomy template reads them (``--anatomy-reading native``)."""
    from dataclasses import replace

    import torch

    from dualglow_app.covariates import AGE_SPEC, CovariateSpec, learn_covariates, side_config
    from dualglow_app.model import DualGlow, DualGlowConfig
    from dualglow_app.weights import save_model

    declared = {"age": AGE_SPEC, "sex": CovariateSpec("sex", "categorical", levels=("M", "F")),
                "diagnosis": CovariateSpec("diagnosis", "categorical", levels=("CN", "MCI", "AD"))}
    specs = learn_covariates(values, declared)
    torch.manual_seed(0)
    native = {} if tissue_maps is None else {"anatomy_template": True, "anatomy_tissue": "gm+csf",
                                             "anatomy_reading": "native", "anatomy_sigmas": [0.0, 1.0]}
    cfg = DualGlowConfig(ndim=3, levels=grid.levels, depth=2, hidden=16, relation_hidden=16,
                         template_shape=list(grid.shape), **side_config(list(specs), specs), **native)
    model = DualGlow(cfg)
    scaling = IntensityScaling()
    mri = torch.from_numpy(np.stack([scaling.mri_to_model(t) for t in t1w_images]))[:, None]
    suvr = np.stack(pet_images) * np.array([0.75 if d == "AD" else 1.0 for d in values["diagnosis"]])[:, None, None, None]
    pet = torch.from_numpy(scaling.pet_to_model(suvr.astype(np.float32)))[:, None]
    side = {name: torch.tensor([spec.encode(v) for v in values[name]]) for name, spec in specs.items()}
    maps = None if tissue_maps is None else torch.from_numpy(np.stack(tissue_maps))
    model.set_templates(mri.mean(0), pet.mean(0))
    model.fit_pet_template([(mri, pet, side, maps)])
    if maps is not None:
        model.set_anatomy_term_range([(mri, maps)])
    fit_briefly(model, mri, pet, side, steps, maps)
    model.set_conditioning_range([(mri, side)])
    model.eval()
    metadata = {
        "grid": grid.to_dict(), "intensity": scaling.to_dict(), "side_info": list(specs), "demonstration": True,
        "training": {"subjects": len(t1w_images), "steps": steps, "reference_region": "cerebellum"},
        "covariates": {name: replace(spec).to_dict() for name, spec in specs.items()},
    }
    return save_model(model, path, metadata)
