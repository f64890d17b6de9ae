"""The anatomy template's start with tissue maps read at the native resolution, through the
real preprocessing, in the evaluation's folds.

    python benchmarks/bench_native_tissues.py BIDS_DIR -w WORK_DIR --folds 3 --seed 0 --side-info age \\
        --phantom-seed 0 --phantom-version 2 [--json OUT]

Finding 25 of the lab book showed on an MNI stack that the anatomy template follows the subject
as well as its tissue maps read the anatomy. This measures the candidate reading where it
matters, on BIDS phantoms through the preprocessing (skull strip, N4, SyN; the work dir's cache):
per fold, the voxelwise least squares of the training PETs on (1, the covariates, the GM and
CSF maps at 0, 8 and 24 mm FWHM), as ``DualGlow.fit_pet_template`` fits it, with the maps

- *grid*: a 3-class mixture fitted to the fold's training T1ws on the grid, its posteriors
  (today's anatomy template, ``--side-template-anatomy gm+csf``);
- *native*: each subject's own mixture fitted to its N4-corrected native brain, the posteriors
  warped to the grid as the T1w is (``bench_tissue_measurement.native_tissues_on_grid``).

Scores of the held-out scans (every scan once), as ``bench_linear_anatomy.py`` scores them: MAE,
deviation r against the fold's mean training PET and against the explainable PET, the mean
pairwise r, and the age sweep against the swept truth. As in the model, the anatomy term is held
per voxel to the range the fold's training scans give it, and the prediction to [0, 3] SUVR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_dualglow_targets import SWEEP_AGES, sweep_agreement, true_age_sweeps  # noqa: E402
from bench_interaction import design_matrix  # noqa: E402
from bench_learning_curves import cpu_description  # noqa: E402
from bench_tissue_measurement import native_tissues_on_grid  # noqa: E402
from perfkit import voxelwise_least_squares  # noqa: E402

FWHMS_MM = (0.0, 8.0, 24.0)


def blurred_maps(maps: np.ndarray, voxel_mm: float) -> np.ndarray:
    """(scans, 2 x len(FWHMS_MM), *grid): each tissue map at each FWHM (tissue-major), as the
    model blurs its own (:func:`dualglow_app.model.dualglow.blurred_tissue_maps`)."""
    from dualglow_app.imaging import FWHM_TO_SIGMA
    from dualglow_app.model.dualglow import blurred_tissue_maps

    x = torch.as_tensor(np.asarray(maps, np.float64))
    tissues = [x[:, k : k + 1] for k in range(x.shape[1])]
    return blurred_tissue_maps(tissues, [fwhm * FWHM_TO_SIGMA / voxel_mm for fwhm in FWHMS_MM])[:, :, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("-w", "--work-dir", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side-info", nargs="*", default=["age"], help="age (and nothing else, for now)")
    parser.add_argument("--phantom-seed", type=int, required=True)
    parser.add_argument("--phantom-version", type=int, required=True)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if list(args.side_info) not in ([], ["age"]):
        parser.error("--side-info: age or nothing")

    from dualglow_app.dataset import DatasetSpec, find_pairs, prepare_dataset
    from dualglow_app.evaluate.crossval import make_splits
    from dualglow_app.evaluate.statistics import explainable_truth, impairment_classes
    from dualglow_app.grid import resolve_grid
    from dualglow_app.log import setup_logging
    from dualglow_app.metrics import deviation_correlation, mean_pairwise_correlation
    from dualglow_app.phantom.cohort import subject_index
    from dualglow_app.preprocess import preprocess_t1w
    from dualglow_app.tissue import GreyMatterModel

    setup_logging(0)
    grid = resolve_grid("cpu4mm")
    spec = DatasetSpec(args.bids_dir, args.work_dir, grid, side_info=tuple(args.side_info))
    data = prepare_dataset(spec)
    by_label = {f"sub-{scan.subject}": scan for scan in find_pairs(spec)}
    n = len(data.labels)
    mask = np.asarray(data.mask[0]) > 0
    inside = mask.reshape(-1)
    mri, pet = np.asarray(data.mri, np.float64), np.asarray(data.pet, np.float64)
    cache = args.work_dir / "native_tissues.npz"
    if cache.is_file() and list(np.load(cache)["labels"]) == list(data.labels):
        native = np.load(cache)["maps"]
    else:
        native = np.stack([native_tissues_on_grid(preprocess_t1w(by_label[label].t1w, grid, args.work_dir, args.nprocs),
                                                  grid) for label in data.labels]) * mask  # fmt: skip
        np.savez(cache, maps=native, labels=np.array(data.labels))
    decades = (np.asarray(data.age, np.float64) - 70.0) / 10.0 if args.side_info else np.zeros(n)
    covariates = decades[:, None] if args.side_info else np.zeros((n, 0))
    splits = make_splits(data.subjects, args.folds, args.seed, impairment_classes(list(data.diagnosis)))
    held_out = np.concatenate([test for _, test in splits])
    indices = [subject_index(data.labels[r]) for r in held_out]
    origin = (args.phantom_seed, args.phantom_version)
    explainable = explainable_truth(origin, indices, grid, cache=args.work_dir / "explainable_truth")
    swept_truth = true_age_sweeps(origin, data, held_out, SWEEP_AGES, args.work_dir / "age_truth", indices=np.array(indices))
    masks = np.asarray(data.mask)[held_out]
    results: dict[str, Any] = {"folds": args.folds, "seed": args.seed, "side_info": list(args.side_info),
                               "fwhm_mm": list(FWHMS_MM), "held_out": [data.labels[r] for r in held_out],
                               "true_pet_pairwise_r": mean_pairwise_correlation(pet[held_out], masks),
                               "machine": cpu_description(), "readings": {}}  # fmt: skip
    for reading in ("grid", "native"):
        predictions: dict[int, np.ndarray] = {}
        coefficients: dict[int, tuple[Any, np.ndarray]] = {}
        scores = []
        for train_rows, test_rows in splits:
            if reading == "grid":
                # As the model reads them: posteriors on the whole grid (the blur sees outside too).
                mixture = GreyMatterModel.fit([mri[r] for r in train_rows], [mask] * len(train_rows))
                maps = np.stack([[mixture.probability(mri[r], t) for t in ("gm", "csf")] for r in range(n)])
            else:
                maps = native
            features = blurred_maps(maps, grid.voxel_size)
            coef = voxelwise_least_squares(design_matrix(features[train_rows], covariates[train_rows], inside),
                       pet[train_rows].reshape(len(train_rows), -1)[:, inside])  # fmt: skip
            # The model's guard (DualGlow.set_anatomy_term_range): the anatomy term held per voxel
            # to the range the training scans give it.
            terms = np.stack([anatomy_term(coef, features[r], covariates.shape[1], inside) for r in train_rows])
            guard = (coef, terms.min(0), terms.max(0))
            reference = pet[train_rows].mean(0)
            for row in test_rows:
                coefficients[int(row)] = (guard, features[row])
                predictions[int(row)] = predict(guard, features[row], covariates[row], inside, mask)
                j = int(np.flatnonzero(held_out == row)[0])
                scores.append([float(np.abs(predictions[row] - pet[row])[mask].mean()),
                               deviation_correlation(predictions[row], pet[row], reference, mask.astype(np.uint8)),
                               deviation_correlation(predictions[row], explainable[j], reference, mask.astype(np.uint8))])  # fmt: skip
        mae, dev_r, dev_explainable = np.mean(scores, axis=0)
        entry: dict[str, Any] = {"mae_suvr": float(mae), "deviation_r": float(dev_r),
                                 "deviation_r_explainable": float(dev_explainable),
                                 "pairwise_r": mean_pairwise_correlation(np.stack([predictions[int(r)] for r in held_out]), masks)}  # fmt: skip
        if args.side_info:
            def swept(row: int, coefficients: dict = coefficients) -> np.ndarray:
                guard, features = coefficients[int(row)]
                return np.stack([predict(guard, features, np.array([(age - 70.0) / 10.0]), inside, mask)
                                 for age in SWEEP_AGES])  # fmt: skip

            train_ages = np.asarray(data.age)[np.unique(np.concatenate([train for train, _ in splits]))]
            entry["age"] = sweep_agreement(swept, data, held_out, SWEEP_AGES, train_ages, swept_truth)
        results["readings"][reading] = entry
        measured = entry.get("age", {}).get("measured", {})
        print(f"{reading:7s} MAE {entry['mae_suvr']:.4f}  deviation r {entry['deviation_r']:.3f}  vs explainable "
              f"{entry['deviation_r_explainable']:.3f}  pairwise {entry['pairwise_r']:.3f} (true "
              f"{results['true_pet_pairwise_r']:.3f})  age r {measured.get('pearson_r', float('nan')):.2f} "
              f"ratio {measured.get('median_ratio', float('nan')):.2f} within {measured.get('within_25_percent', float('nan')):.2f}",
              flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


def anatomy_term(coef: np.ndarray, features: np.ndarray, n_covariates: int, inside: np.ndarray) -> np.ndarray:
    """One scan's sum over its features of coefficient x feature at each brain voxel."""
    flat = features.reshape(features.shape[0], -1)[:, inside].T
    return np.einsum("vp,vp->v", flat, coef[:, 1 + n_covariates :])


def predict(guard: tuple[np.ndarray, np.ndarray, np.ndarray], features: np.ndarray, covariates: np.ndarray,
            inside: np.ndarray, mask: np.ndarray) -> np.ndarray:  # fmt: skip
    """One scan's fitted template (SUVR on the grid, 0 outside the brain): the intercept and the
    covariates' terms plus the anatomy term held to the training range ``guard`` gives, clipped
    to the model's SUVR range [0, 3]."""
    coef, low, high = guard
    k = 1 + len(covariates)
    term = np.clip(anatomy_term(coef, features, len(covariates), inside), low, high)
    out = np.zeros(inside.size)
    out[inside] = np.clip(coef[:, 0] + coef[:, 1:k] @ covariates + term, 0.0, 3.0)
    return out.reshape(mask.shape) * mask


if __name__ == "__main__":
    main()
