"""How well can ANY model recover the phantom's age effect from this many subjects? A ceiling.

    python benchmarks/bench_age_ceiling.py --mni-stack STACK [--json OUT]

Fits, on the training split of an MNI stack (``dualglow_app.dataset.split_subjects``, the
split of ``bench_dualglow_targets.py``), a voxelwise linear model of the PET on
(1, (age - 70) / 10) with and without the MRI at that voxel (and the diagnosis, which the
phantom knows and the model does not), then sweeps each validation subject's prediction over
the ages of the model benchmark, with its own MRI, and scores the regional slopes the same
way as the model benchmark: against the phantom's calibration (activity slopes) and against
the swept truth (the same brains aged with their anatomy fixed,
:func:`dualglow_app.phantom.mni.age_sweep_truth`). A correctly specified linear model is
the best a flow can hope for on the age target at this sample size: if it misses the target,
the data (not the network) is what limits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_dualglow_targets import SWEEP_AGES, phantom_origin, true_age_sweeps  # noqa: E402
from bench_learning_curves import cpu_description  # noqa: E402
from perfkit import voxelwise_least_squares  # noqa: E402

from dualglow_app.evaluate.statistics import slope_agreement  # noqa: E402

#: Regressors besides the intercept and the age: the MRI at the voxel, the diagnosis (one-hot).
MODELS = {"age": (), "age + MRI": ("mri",), "age + diagnosis": ("diagnosis",), "age + MRI + diagnosis": ("mri", "diagnosis")}


def regressors(mri: np.ndarray, diagnosis: list[str], terms: tuple[str, ...]) -> list[np.ndarray]:
    """Per-row extra regressors (each (rows, voxels), or (rows, 1) to broadcast)."""
    extra = []
    if "mri" in terms:
        extra.append(mri)
    if "diagnosis" in terms:
        extra += [np.array([[d == level] for d in diagnosis], dtype=float) for level in ("MCI", "AD")]
    return extra


def fit(pet: np.ndarray, decades: np.ndarray, extra: list[np.ndarray]) -> np.ndarray:
    """Voxelwise least squares: coefficients (1 + 1 + len(extra), voxels)."""
    rows, voxels = pet.shape
    design = [np.ones((rows, voxels)), np.repeat(decades[:, None], voxels, 1)] + [np.broadcast_to(e, (rows, voxels)) for e in extra]
    return voxelwise_least_squares(np.stack(design, axis=2), pet).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mni-stack", type=Path, required=True)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="cache of the swept truth")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from dualglow_app.dataset import load_mni_stack, split_subjects
    from dualglow_app.evaluate.atlases import phantom_regions
    from dualglow_app.evaluate.statistics import phantom_calibrated_slopes, regional_slopes
    from dualglow_app.regions import regional_mean_matrix

    data = load_mni_stack(args.mni_stack)
    train_rows, val_rows = split_subjects(data.subjects, args.val_fraction, args.seed)
    ages = np.asarray(SWEEP_AGES)
    inside = np.asarray(data.mask)[train_rows].all(0) > 0
    pet = np.asarray(data.pet)[train_rows][:, inside]
    mri = np.asarray(data.mri)[:, inside]
    decades = (np.asarray(data.age, dtype=float) - 70.0) / 10.0
    diagnosis = list(data.diagnosis)
    labels, names = phantom_regions(data.grid)
    regions = list(range(1, len(names) + 1))
    calibrated = phantom_calibrated_slopes(names)
    swept = true_age_sweeps(phantom_origin(args.mni_stack), data, val_rows, tuple(ages), args.work / "age_truth")
    measured = np.nanmean(regional_slopes(swept, ages)[1], axis=0) if swept is not None else None

    results = {}
    for name, terms in MODELS.items():
        coef = fit(pet, decades[train_rows], regressors(mri[train_rows], [diagnosis[i] for i in train_rows], terms))
        sweep = np.empty((len(val_rows), len(ages), len(names)))
        for k, row in enumerate(val_rows):
            extra = regressors(mri[row : row + 1], [diagnosis[row]], terms)
            fixed = coef[0] + sum(c * e[0] for c, e in zip(coef[2:], extra, strict=True))
            volumes = np.zeros((len(ages), *data.grid.shape), dtype=np.float32)
            for j, age in enumerate(ages):
                volumes[j][inside] = fixed + coef[1] * (age - 70.0) / 10.0
            sweep[k] = regional_mean_matrix(volumes, labels, regions, masks=np.asarray(data.mask[row]))
        slopes = np.nanmean(regional_slopes(sweep, ages)[1], axis=0)
        results[name] = {"calibration": slope_agreement(slopes, calibrated),
                         "swept_truth": slope_agreement(slopes, measured) if measured is not None else None,
                         "per_decade": slopes.tolist()}  # fmt: skip

    print(f"{args.mni_stack}: {len(train_rows)} training, {len(val_rows)} validation subjects; {cpu_description()}\n")
    print("| linear model | vs swept truth: r / sign / median ratio / within 25 % | vs calibration: r / sign / median ratio / within 25 % |")
    print("|---|---|---|")
    for name, result in results.items():
        cells = [" / ".join(f"{v[k]:.2f}" for k in ("pearson_r", "sign_agreement", "median_ratio", "within_25_percent"))
                 if v else "-" for v in (result["swept_truth"], result["calibration"])]  # fmt: skip
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "stack": str(args.mni_stack), "split": {"train": len(train_rows), "val": len(val_rows)},
            "command": " ".join(sys.argv), "regions": names, "calibrated_per_decade": calibrated.tolist(),
            "swept_truth_per_decade": None if measured is None else measured.tolist(), "models": results,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
