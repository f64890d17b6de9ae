"""A small T1w-only BIDS cohort and a small trained DUAL-GLOW for the participant level.

Subjects are the ICBM152 T1 in a random pose (``synthetic.make_subject``); sub-03's two
sessions are copies of sub-01's T1w, so preprocessing (cached by the input's sha256) costs
two registrations for four scans. The model is tiny, on the 8 mm grid, its ActNorms
initialised by a train-mode forward on real preprocessed T1w, then trained a few steps on
pseudo-PET (grey matter brighter, scaled by age), which is enough for outputs to depend on
the T1w and on age.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from synthetic import make_subject

from dualglow_app.data import IntensityScaling
from dualglow_app.grid import ModelGrid


def build_cohort(root: Path, subjects: Sequence[int] = (1, 2), session_subject: bool = True) -> Path:
    """Raw BIDS: sub-01 (65 y), sub-02 (75 y), and sub-03 with ses-a / ses-b (70 / 72 y in
    ``sub-03_sessions.tsv``, n/a in participants.tsv)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "dualglow participant test cohort", "BIDSVersion": "1.10.0", "DatasetType": "raw",
                    "Authors": ["dualglow tests", "nobody else"]}, indent=1)
    )
    (root / "README").write_text("ICBM152 T1 in random poses, for the dualglow tests.\n")
    rows = ["participant_id\tage\tsex"]
    for seed in subjects:
        anat = root / f"sub-{seed:02d}" / "anat"
        made = make_subject(anat, seed=seed)
        for key in ("pet", "native_gm"):
            made[key].unlink()
        rows.append(f"sub-{seed:02d}\t{55 + 10 * seed}\tF")
    if session_subject:
        source = root / f"sub-{subjects[0]:02d}" / "anat" / f"sub-{subjects[0]:02d}_T1w.nii.gz"
        for session in ("a", "b"):
            anat = root / "sub-03" / f"ses-{session}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, anat / f"sub-03_ses-{session}_T1w.nii.gz")
        (root / "sub-03" / "sub-03_sessions.tsv").write_text("session_id\tage\nses-a\t70\nses-b\t72\n")
        rows.append("sub-03\tn/a\tM")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def make_model(
    path: Path,
    grid: ModelGrid,
    t1w_images: Sequence[np.ndarray],
    ages: Sequence[float],
    steps: int = 10,
    with_age: bool = True,
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
    model.train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model.nll(mri, pet, side)["loss"].backward()
        optimizer.step()
    model.eval()
    metadata = {
        "grid": grid.to_dict(),
        "intensity": scaling.to_dict(),
        "side_info": list(cfg.side_names),
        "demonstration": True,
        "training": {"subjects": len(t1w_images), "steps": steps, "reference_region": "cerebellum"},
    }
    return save_model(model, path, metadata)
