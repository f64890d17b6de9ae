"""The participant report's departure map: synthetic PET minus the model's mean training PET."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dualglow_app.participant_report import population_mean_pet, scan_montage
from dualglow_app.weights import open_model


def test_population_mean_pet_is_the_models_template_at_the_average_covariates(tmp_path: Path) -> None:
    model = open_model("dualglow-phantom-demo")
    grid = model.grid
    # The model grid itself: the resampled mean PET is the template at the training's average
    # covariates (age at its centre, each diagnosis at its share of the training scans), in SUVR.
    like = nib.Nifti1Image(np.zeros(grid.shape, np.float32), grid.affine)
    population = population_mean_pet(model, like)
    assert population is not None
    counts = model.covariates["diagnosis"].counts
    shares = {level: n / sum(counts.values()) for level, n in counts.items()}
    mixture = sum(share * model.model._center(torch.zeros(1, 1, *grid.shape), "pet", torch.tensor(
        [[0.0, *[float(level == other) for other in model.covariates["diagnosis"].levels]]]))[0, 0]
        for level, share in shares.items())  # fmt: skip
    assert np.allclose(population, model.scaling.pet_from_model(mixture.detach().numpy()), atol=1e-4)
    assert 0.8 < float(np.median(population[population > 0.3])) < 2.0  # an FDG-PET in SUVR

    brain = population > 0.3
    mean = np.where(brain, population + 0.1, 0.0).astype(np.float32)
    planned = {"mean": tmp_path / "mean.nii.gz", "t1w": tmp_path / "t1w.nii.gz"}
    nib.save(nib.Nifti1Image(mean, grid.affine), planned["mean"])
    nib.save(nib.Nifti1Image(brain.astype(np.float32), grid.affine), planned["t1w"])
    without, with_departure = scan_montage(planned), scan_montage(planned, model)
    assert len(with_departure.axes) > len(without.axes)
    assert any("mean training PET" in ax.get_title(loc="left") for ax in with_departure.axes)
