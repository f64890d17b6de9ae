"""How far the PET template's least-squares start goes alone: a voxelwise linear model, no flow.

    python benchmarks/bench_linear_anatomy.py BIDS_DIR -w WORK_DIR --train 001-048,061-200 --test 049-060 \
        [--side-info age diagnosis] [--anatomy gm --anatomy t1w --anatomy none] [--fwhm 0,8,24] \
        [--anatomy-reading fractions] [--pet-space log] \
        [--phantom-seed 0 --phantom-version 2] [--bootstrap 200] [--json OUT]
        (--train-of MODEL.json: a model's own training subjects)
    python benchmarks/bench_linear_anatomy.py BIDS_DIR -w WORK_DIR --folds 3 --seed 0 --side-info age ...

Per voxel, least squares of the training PETs on (1, the covariates, the MRI's tissue map at
the voxel and blurred to each FWHM): :meth:`DualGlow.fit_pet_template`, the start of the group
level's side and anatomy templates (``--anatomy-template``). The prediction of a held-out scan
is that template on its own MRI and covariates (:meth:`DualGlow._center`), which is also the
conditional mode of an anatomy-templated model before its flows have learnt anything. ``none``
keeps the covariates alone (the side template without the anatomy's terms).

With ``--folds`` the splits are the evaluation's (``dualglow-evaluate --folds K --seed S``:
grouped by subject, stratified by impairment), every scan held out once; otherwise the
``--train`` / ``--test`` subject ranges. Scores (SUVR, inside the brain): MAE, deviation r
against the split's mean training PET, and with ``--phantom-seed`` / ``--phantom-version``
also against each subject's explainable PET; input specificity (mean pairwise r) of the
predictions next to the true PETs'. With age among the covariates, each held-out scan's
template is swept over age (the others its own) and its regional slopes are scored as
``bench_dualglow_targets.py`` scores a model's (against the swept truth with the phantom's
seed and version). ``--pet-space log`` fits the same least squares to the logarithm of the PET
and exponentiates the prediction: a template multiplicative in its terms, as the phantom's
uptake is (grey matter x age factor x ...; lab book, finding 27). No training: seconds per
split on a CPU.

``--bootstrap B`` (with ``--train`` / ``--test`` and the swept truth) refits each row on B
resamples of the training subjects, drawn with replacement, and reports how far the sample
alone moves each region's age slope: :func:`~dualglow_app.evaluate.statistics.slope_resampling`
(whether the misses of +-25 % are the sample's noise or a bias, and how many training subjects
an unbiased fit would need for every region to fall within). About 15 s a replicate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualglow_app.covariates import side_config
from dualglow_app.data import IntensityScaling
from dualglow_app.dataset import DatasetSpec, mean_images, model_batch, prepare_dataset
from dualglow_app.evaluate.crossval import make_splits
from dualglow_app.evaluate.statistics import (
    explainable_truth,
    impairment_classes,
)
from dualglow_app.grid import resolve_grid
from dualglow_app.imaging import FWHM_TO_SIGMA
from dualglow_app.log import setup_logging
from dualglow_app.metrics import deviation_correlation, mean_pairwise_correlation
from dualglow_app.model import DualGlow, DualGlowConfig
from dualglow_app.phantom.cohort import subject_index
from dualglow_app.tissue import ANATOMY_READINGS, NATIVE_READINGS, SIDE_TEMPLATE_ANATOMY
from dualglow_app.train import fit_pet_template

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dualglow_targets import (  # noqa: E402
    SWEEP_AGES,
    regions_outside,
    resampled_sweep_slopes,
    sweep_agreement,
    true_age_sweeps,
)
from perfkit import labels  # noqa: E402

#: The smallest SUVR the log fits take the logarithm of (the brain's voxels sit far above it).
LOG_FLOOR_SUVR = 0.05


def log_encoded(suvr: np.ndarray, scaling: IntensityScaling) -> np.ndarray:
    """SUVR mapped affinely from its logarithm onto the model's SUVR range (the floor -> 0, the
    range's top -> itself), so that a least squares on it is one on log PET."""
    top = scaling.pet_suvr_max
    return (top * np.log(np.maximum(suvr, LOG_FLOOR_SUVR) / LOG_FLOOR_SUVR) / np.log(top / LOG_FLOOR_SUVR)).astype(np.float32)


def log_decoded(encoded: np.ndarray, scaling: IntensityScaling) -> np.ndarray:
    """SUVR from :func:`log_encoded`'s values (0 where they are 0: outside the brain)."""
    top = scaling.pet_suvr_max
    return (LOG_FLOOR_SUVR * np.exp(encoded / top * np.log(top / LOG_FLOOR_SUVR)) * (encoded > 0)).astype(np.float32)


def linear_model(data: Any, train_rows: np.ndarray, side_info: list[str], anatomy: str, fwhms: list[float],
                 reading: str = "posterior") -> DualGlow:  # fmt: skip
    """The PET template's least-squares start on ``train_rows`` (no flow worth the name); the
    tissue maps read as ``reading`` (DualGlowConfig.anatomy_reading)."""
    scaling = IntensityScaling()
    config = DualGlowConfig(
        ndim=3, levels=1, depth=1, hidden=4, relation_hidden=4, template_shape=list(data.grid.shape),
        **side_config(side_info, data.covariate_specs(side_info) if side_info else {}),
        anatomy_template=anatomy != "none", anatomy_tissue="t1w" if anatomy == "none" else anatomy,
        anatomy_sigmas=[fwhm * FWHM_TO_SIGMA / data.grid.voxel_size for fwhm in fwhms], anatomy_reading=reading,
    )  # fmt: skip
    model = DualGlow(config).double()
    model.set_templates(*mean_images(data, train_rows, scaling))
    fit_pet_template(model, data, train_rows, side_info)
    return model


def encoded_covariates(model: DualGlow, batch: Any, age: float | None = None) -> torch.Tensor | None:
    """A one-scan batch's covariates as ``model`` encodes them (c), at ``age`` if given with the
    others its own; None for a model without covariates."""
    side = batch.side
    if age is not None and side is not None:
        side = {**side, "age": torch.full_like(side["age"], age)}
    encoded = model._encode_side(side, 1, batch.pet.double())
    return None if encoded is None else encoded[0]


def linear_prediction(model: DualGlow, data: Any, row: int, side_info: list[str], age: float | None = None) -> np.ndarray:
    """A scan's template in SUVR (masked, clipped to the model's range), at its own covariates
    or at ``age`` with the others its own."""
    scaling = IntensityScaling()
    batch = model_batch(data, np.array([row]), scaling, torch.device("cpu"), side_info)
    maps = None if batch.tissue_maps is None else batch.tissue_maps.double()
    with torch.no_grad():
        centre = model._center(batch.pet.double(), "pet", encoded_covariates(model, batch, age), batch.mri.double(), maps)
    suvr = scaling.pet_from_model(np.clip(np.asarray(centre)[0, 0], 0.0, 1.0))
    return (suvr * (np.asarray(data.mask[row]) > 0)).astype(np.float32)


def linear_age_slopes(data: Any, fitted: Any, drawn: np.ndarray, *, test_rows: np.ndarray, side_info: list[str],
                      anatomy: str, fwhms: list[float], reading: str, to_suvr: Any, train_ages: np.ndarray,
                      swept_truth: np.ndarray | None) -> list[float]:  # fmt: skip
    """The regional age slopes (:func:`sweep_agreement`'s) of ``linear_model`` fitted on ``fitted``'s
    rows ``drawn``, swept on ``test_rows`` (scored on ``data``'s SUVR)."""
    model = linear_model(fitted, drawn, side_info, anatomy, fwhms, reading)

    def swept(row: int) -> np.ndarray:
        return np.stack([to_suvr(linear_prediction(model, fitted, row, side_info, age)) for age in SWEEP_AGES])

    return sweep_agreement(swept, data, test_rows, SWEEP_AGES, train_ages, swept_truth)["synthetic_per_decade"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("-w", "--work-dir", type=Path, required=True)
    parser.add_argument("--train", help="training subject ranges, e.g. 001-048,061-200")
    parser.add_argument("--train-of", type=Path, metavar="MODEL_JSON",
                        help="train on the subjects a model trained on (its JSON's metadata.training.subjects)")
    parser.add_argument("--test", help="held-out subject range, e.g. 049-060")
    parser.add_argument("--folds", type=int, help="the evaluation's K folds over every subject instead")
    parser.add_argument("--seed", type=int, default=0, help="the folds' seed (dualglow-evaluate --seed)")
    parser.add_argument("--side-info", nargs="*", default=["age"])
    parser.add_argument("--anatomy", action="append", choices=(*SIDE_TEMPLATE_ANATOMY, "none"), default=None)
    parser.add_argument("--fwhm", default="0,8,24", help="FWHMs in mm of the MRI terms (0: the voxel's own)")
    parser.add_argument("--anatomy-reading", choices=ANATOMY_READINGS, default="posterior",
                        help="the tissue maps as mixture posteriors or fractions of the grid T1w, or the native "
                             "ones (DualGlowConfig.anatomy_reading)")
    parser.add_argument("--pet-space", choices=("suvr", "log"), default="suvr",
                        help="fit the least squares to the PET (the template's form) or to its logarithm")
    parser.add_argument("--grid", default="cpu4mm")
    parser.add_argument("--phantom-seed", type=int)
    parser.add_argument("--phantom-version", type=int)
    parser.add_argument("--bootstrap", type=int, default=0, metavar="B",
                        help="refit on B resamples of the training subjects: the age slopes' sampling noise")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.train_of is not None:
        trained = json.loads(args.train_of.read_text())["metadata"]["training"]["subjects"]
        args.train = ",".join(label.removeprefix("sub-") for label in trained)
    if (args.folds is None) == (args.train is None or args.test is None):
        parser.error("give either --folds K or both --train (or --train-of) and --test")
    if args.bootstrap and (args.folds or args.phantom_seed is None or args.phantom_version is None
                           or "age" not in args.side_info):  # fmt: skip
        parser.error("--bootstrap needs --train / --test, age among --side-info and the swept truth "
                     "(--phantom-seed and --phantom-version)")
    setup_logging(0)

    grid = resolve_grid(args.grid)
    chosen = None if args.folds else tuple(labels(args.train) + labels(args.test))
    data = prepare_dataset(DatasetSpec(args.bids_dir, args.work_dir, grid, participant_labels=chosen or (),
                                       side_info=tuple(args.side_info),
                                       tissue_maps=args.anatomy_reading if args.anatomy_reading in NATIVE_READINGS else None))  # fmt: skip
    if args.folds:
        splits = make_splits(data.subjects, args.folds, args.seed, impairment_classes(list(data.diagnosis)))
    else:
        rows = {label: data.labels.index(f"sub-{label}") for label in chosen or ()}
        splits = [(np.array([rows[x] for x in labels(args.train)]), np.array([rows[x] for x in labels(args.test)]))]
    if args.bootstrap and len(set(np.asarray(data.subjects)[splits[0][0]])) < len(splits[0][0]):
        parser.error("--bootstrap resamples the training scans as subjects: give one session per training subject")
    fwhms = [float(v) for v in args.fwhm.split(",")]
    # The fits read ``fitted``; every score reads ``data``'s SUVR.
    fitted, to_suvr = data, (lambda values: values)
    if args.pet_space == "log":
        fitted = dataclasses.replace(data, pet=log_encoded(np.asarray(data.pet), IntensityScaling()))
        to_suvr = partial(log_decoded, scaling=IntensityScaling())
    held_out = np.concatenate([test for _, test in splits])
    masks = np.stack([np.asarray(data.mask[r]) for r in held_out])
    truths = np.stack([np.asarray(data.pet[r]) for r in held_out])
    explainable = None
    if args.phantom_seed is not None and args.phantom_version is not None:
        explainable = explainable_truth((args.phantom_seed, args.phantom_version),
                                        [subject_index(data.labels[r]) for r in held_out], grid,
                                        cache=args.work_dir / "explainable_truth")  # fmt: skip

    results: dict[str, Any] = {
        "splits": "folds" if args.folds else "train/test", "folds": args.folds, "seed": args.seed,
        "side_info": args.side_info, "fwhm_mm": fwhms, "anatomy_reading": args.anatomy_reading,
        "pet_space": args.pet_space, "held_out": [data.labels[r] for r in held_out],
        "true_pet_pairwise_r": mean_pairwise_correlation(truths, masks), "rows": {},
    }  # fmt: skip
    print(f"{len(held_out)} held-out scans over {len(splits)} split(s); MRI terms at FWHM {args.fwhm} mm; "
          f"covariates {args.side_info or 'none'}; true PETs' pairwise r {results['true_pet_pairwise_r']:.3f}")
    print(f"{'anatomy':8s} {'MAE (SUVR)':>10s} {'deviation r':>12s} {'vs explainable':>15s} {'pairwise r':>11s}")
    sweeping = "age" in args.side_info
    swept_truth = None
    if sweeping and explainable is not None:
        swept_truth = true_age_sweeps((args.phantom_seed, args.phantom_version), data, held_out, SWEEP_AGES,
                                      args.work_dir / "age_truth", indices=np.array([subject_index(data.labels[r]) for r in held_out]))  # fmt: skip
    for anatomy in args.anatomy or ["gm", "t1w", "none"]:
        predictions, scores, model_of = [], [], {}
        for train_rows, test_rows in splits:
            reference = np.mean([np.asarray(data.pet[r]) for r in train_rows], axis=0)
            model = linear_model(fitted, train_rows, list(args.side_info), anatomy, fwhms, args.anatomy_reading)
            model_of.update(dict.fromkeys(test_rows.tolist(), model))
            fold = np.stack([to_suvr(linear_prediction(model, fitted, row, list(args.side_info))) for row in test_rows])
            for row, pred in zip(test_rows, fold, strict=True):
                truth, mask = np.asarray(data.pet[row]), np.asarray(data.mask[row])
                j = int(np.flatnonzero(held_out == row)[0])
                scores.append([float(np.abs(pred - truth)[mask > 0].mean()), deviation_correlation(pred, truth, reference, mask),
                               deviation_correlation(pred, explainable[j], reference, mask) if explainable is not None
                               else float("nan")])  # fmt: skip
            predictions.append(fold)
        mae, dev_r, dev_explainable = np.mean(scores, axis=0)
        pairwise = mean_pairwise_correlation(np.concatenate(predictions), masks)
        row_scores: dict[str, Any] = {"mae_suvr": mae, "deviation_r": dev_r, "deviation_r_explainable": dev_explainable,
                                      "pairwise_r": pairwise}  # fmt: skip
        line = f"{anatomy:8s} {mae:10.4f} {dev_r:12.3f} {dev_explainable:15.3f} {pairwise:11.3f}"
        if sweeping:
            # The sweep of each held-out scan through its own split's fit, age alone moving.
            def swept(row: int, model_of: dict[int, DualGlow] = model_of) -> np.ndarray:
                return np.stack([to_suvr(linear_prediction(model_of[row], fitted, row, list(args.side_info), age))
                                 for age in SWEEP_AGES])

            train_ages = np.asarray(data.age)[np.unique(np.concatenate([train for train, _ in splits]))]
            age = sweep_agreement(swept, data, held_out, SWEEP_AGES, train_ages, swept_truth)
            row_scores["age"] = age
            agreement = age.get("measured", age)
            line += (f"   age {'(swept truth)' if 'measured' in age else '(calibration)'}: r {agreement['pearson_r']:.2f} / sign "
                     f"{agreement['sign_agreement']:.2f} / ratio {agreement['median_ratio']:.2f} / within {agreement['within_25_percent']:.2f}")  # fmt: skip
            if "measured" in age:
                row_scores["age_regions_outside_25_percent"] = outside = regions_outside(age)
                line += "\n         outside +-25 %: " + (", ".join(f"{name} {r:.2f}x" for name, r in outside.items()) or "none")
        results["rows"][anatomy] = row_scores
        print(line)
        if args.bootstrap:
            (train_rows, test_rows), = splits
            resampled_slopes = partial(linear_age_slopes, data, fitted, test_rows=test_rows, side_info=list(args.side_info),
                                       anatomy=anatomy, fwhms=fwhms, reading=args.anatomy_reading, to_suvr=to_suvr,
                                       train_ages=train_ages, swept_truth=swept_truth)  # fmt: skip
            row_scores["age_resampling"] = resampled_sweep_slopes(resampled_slopes, train_rows, args.bootstrap,
                                                                  args.bootstrap_seed, row_scores["age"])  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
