"""Does DUAL-GLOW follow the subject and the age? The model issue's targets on an MNI stack.

    python benchmarks/bench_dualglow_targets.py --mni-stack STACK --label paper-top --top-prior side
    python benchmarks/bench_dualglow_targets.py --mni-stack STACK --label today --top-prior mri+side

One change at a time, the same split and seed: this trains DUAL-GLOW with the group level's
own :func:`dualglow_app.train.train` on a stack written by ``dualglow-phantom --mni-stack``
(model development only: it SKIPS the native simulation and the preprocessing), validating and
early-stopping on the subjects :func:`dualglow_app.dataset.split_subjects` holds out (the same
split as ``bench_learning_curves.py``'s U-Net oracle with the same ``--val-fraction`` and
``--seed``), then scores the kept model on those validation scans:

- *follows the subject*: the deviation correlation of the T = 0 mode against the true PET and
  against the explainable PET (:mod:`dualglow_app.metrics`); input specificity: the mean
  pairwise r of the synthetic PETs next to that of the true PETs;
- *moves with age*: each validation scan synthesised at ``--ages``; regional slopes over the
  phantom's own regions against the phantom's true slopes (its calibration's age slopes,
  relative to the cerebellar reference), Pearson r, sign agreement, share of regions within
  +-25 %, and the slope beyond the training ages against the slope inside them (flat tails);
- MAE / r against the truth next to the mean training PET's.

Training runs resume from their checkpoint (``--work``/LABEL). Results: one JSON per label
(default ``benchmarks/results/dualglow_targets/<label>.json``) with the machine, the command,
every epoch's validation row and the scores; ``--table`` prints every JSON of that folder as
one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_learning_curves import cpu_description  # noqa: E402

from dualglow_app.evaluate.statistics import (  # noqa: E402
    MAX_PROJECTED_SCALE,
    SLOPE_TOLERANCE,
    slope_agreement,
    slope_ratios,
    slope_resampling,
    swept_slope_agreement,
    swept_truth,
)

RESULTS = ROOT / "benchmarks" / "results" / "dualglow_targets"
SWEEP_AGES = (50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
SAMPLES = 8


def git_commit() -> str:
    """The checkout's commit (with "+dirty" when it has uncommitted changes), or "unknown"."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def scan_covariates(data: Any, specs: dict[str, Any], row: int) -> dict[str, float]:
    """A scan's covariates as ``predict`` takes them, encoded by a model's own learnt ``specs``
    (``LoadedModel.covariates``)."""
    return {name: spec.encode(data.covariate_values(name)[row]) for name, spec in specs.items()}


def phantom_origin(stack: Path) -> tuple[int, ...] | None:
    """(seed, version, sessions per subject) of the phantoms an MNI stack holds, from its
    index.json; None when the index does not say how it was made (e.g. a group level's arrays)."""
    index = json.loads((stack / "index.json").read_text())
    if "seed" not in index or "version" not in index:
        return None
    return int(index["seed"]), int(index["version"]), int(index.get("sessions", 1))


def true_age_sweeps(origin: tuple[int, ...] | None, data: Any, rows: np.ndarray, ages: tuple[float, ...], cache: Path,
                    indices: np.ndarray | None = None) -> np.ndarray | None:  # fmt: skip
    """(rows, ages, regions): :func:`dualglow_app.evaluate.statistics.swept_truth` of the rows
    (over each row's mask, cached in ``cache``). ``origin``: the phantoms' (seed, version[,
    sessions]), None -> None; ``indices``: each row's phantom subject index (default: as an MNI
    stack orders them, subject-major, each row (subject, session) with several sessions)."""
    if origin is None:
        return None
    sessions = (*origin, 1)[2]
    rows = np.asarray(rows)
    scans = ([(int(r) // sessions, int(r) % sessions) for r in rows] if indices is None and sessions > 1
             else np.asarray(rows if indices is None else indices).tolist())  # fmt: skip
    return swept_truth(origin, scans, data.grid, np.asarray(data.mask[rows]), ages, cache)


def age_response(model: Any, scaling: Any, data: Any, rows: np.ndarray, ages: tuple[float, ...],
                 train_ages: np.ndarray, truth_sweep: np.ndarray | None = None,
                 covariates_of: Any = None) -> dict[str, Any]:  # fmt: skip
    """Regional slopes of each scan's age sweep against the phantom's truth: its calibration's
    activity slopes, and (``truth_sweep``) the same subjects' true PETs swept the same way.
    ``covariates_of(row)``: the scan's covariates as ``predict`` takes them (default: its age);
    the sweep moves age and keeps the others."""
    from dualglow_app.inference import predict

    def swept(row: int) -> np.ndarray:
        mask = np.asarray(data.mask[row])
        own = covariates_of(row) if covariates_of is not None else {}
        maps = data.row_tissue_maps(row)
        return np.stack([predict(model, scaling, np.asarray(data.mri[row]), mask, {**own, "age": a}, tissue_maps=maps).mean
                         for a in ages])  # fmt: skip

    return sweep_agreement(swept, data, rows, ages, train_ages, truth_sweep)


def sweep_agreement(swept: Any, data: Any, rows: np.ndarray, ages: tuple[float, ...], train_ages: np.ndarray,
                    truth_sweep: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """The age targets of any predictor: ``swept(row)`` -> (ages, *grid) synthetic PETs (SUVR) of
    a scan at each age; their regional slopes against the phantom's calibration and, with
    ``truth_sweep``, against the swept truth (:func:`age_response`)."""
    from dualglow_app.evaluate.atlases import phantom_regions
    from dualglow_app.evaluate.statistics import (
        age_trends,
        phantom_calibrated_slopes,
        regional_slopes,
    )
    from dualglow_app.regions import regional_mean_matrix

    labels, names = phantom_regions(data.grid)
    regions = list(range(1, len(names) + 1))
    sweep = np.empty((len(rows), len(ages), len(names)))
    for k, row in enumerate(rows):
        sweep[k] = regional_mean_matrix(swept(row), labels, regions, masks=np.asarray(data.mask[row]))
    truth = phantom_calibrated_slopes(names)
    trends = age_trends({"phantom": sweep}, {"phantom": names}, ages,
                        {"regions": names, "suvr_per_decade": truth.tolist()})["phantom_comparison"]  # fmt: skip
    synthetic = np.array(trends["synthetic_relative_per_decade"])
    # Pearson r and the signs as the evaluation computes them; the ratios as for the swept truth.
    calibrated = slope_agreement(synthetic, truth)
    a = np.asarray(ages)
    inside = (a >= train_ages.min()) & (a <= train_ages.max())
    beyond = a >= train_ages.max()
    slope_in = np.nanmean(regional_slopes(sweep[:, inside], a[inside])[1], axis=0)
    slope_beyond = np.nanmean(regional_slopes(sweep[:, beyond], a[beyond])[1], axis=0) if beyond.sum() >= 2 else None
    out = {
        "pearson_r": trends["pearson_r"], "sign_agreement": trends["sign_agreement"],
        "mean_true_per_decade": trends["mean_true"], "mean_synthetic_per_decade": trends["mean_synthetic"],
        "median_ratio": calibrated["median_ratio"], "within_25_percent": calibrated["within_25_percent"],
        "regions": names, "true_per_decade": truth.tolist(), "synthetic_per_decade": synthetic.tolist(),
        "ages": list(ages), "training_ages": [float(train_ages.min()), float(train_ages.max())],
    }  # fmt: skip
    if slope_beyond is not None:
        keep = np.isfinite(slope_in) & (np.abs(slope_in) > 1e-4)
        out["beyond_over_inside"] = float(np.median(slope_beyond[keep] / slope_in[keep]))
    if truth_sweep is not None:
        out["measured"] = swept_slope_agreement(synthetic, truth_sweep, a)
    return out


def regions_outside(age: dict[str, Any], tolerance: float = SLOPE_TOLERANCE) -> dict[str, float]:
    """The regions whose synthetic age slope misses the swept truth's by more than
    ``tolerance`` (ratio synthetic / true), among those the target counts (:func:`slope_ratios`)."""
    ratios = slope_ratios(np.asarray(age["synthetic_per_decade"], float), np.asarray(age["measured"]["true_per_decade"], float))
    return {region: round(float(r), 3) for region, r in zip(age["regions"], ratios, strict=True)
            if np.isfinite(r) and abs(r - 1) > tolerance}  # fmt: skip


def resampled_sweep_slopes(swept_of_resample: Any, subjects: np.ndarray, replicates: int, seed: int,
                           age: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The age slopes' sampling noise: ``swept_of_resample(drawn)`` refits a predictor on the
    training ``subjects`` ``drawn`` (a bootstrap resample, with replacement) and returns its
    regional slopes (:func:`sweep_agreement`'s ``synthetic_per_decade``), ``replicates`` times
    (kept as ``replicate_slopes``). Scored against ``age`` (:func:`sweep_agreement` of the fit
    on the subjects themselves, with its swept truth) by
    :func:`~dualglow_app.evaluate.statistics.slope_resampling`, and printed: the regions nearest
    the tolerance's edge, then the projection to more subjects."""
    from rich.progress import track

    rng = np.random.default_rng(seed)
    slopes = [swept_of_resample(rng.choice(subjects, size=len(subjects), replace=True))
              for _ in track(range(replicates), description=f"bootstrap of {len(subjects)} training subjects")]  # fmt: skip
    truth, estimate = np.asarray(age["measured"]["true_per_decade"]), np.asarray(age["synthetic_per_decade"])
    out = {"seed": seed, **slope_resampling(np.array(slopes), estimate, truth), "replicate_slopes": slopes}
    ratios, se, count = slope_ratios(estimate, truth), np.asarray(out["se_per_decade"]), out["count_within"]
    print(f"\n{replicates} resamples of the {len(subjects)} training subjects: regions within +-25 % {count['mean']:.1f} "
          f"of {out['regions_counted']} on average (5-95 %: {count['q5']:.0f}-{count['q95']:.0f}); every region in "
          f"{out['share_all_within']:.0%} of them; chi-square of the misses {out['chi2']:.1f} on "
          f"{out['regions_counted']} regions, p {out['chi2_p']:.2g}")  # fmt: skip
    print(f"{'region':22s} {'true %/dec':>10s} {'fit':>7s} {'ratio':>6s} {'SE':>6s} {'z':>6s} {'share within':>12s}")
    margin = np.where(np.isfinite(ratios), SLOPE_TOLERANCE * np.abs(truth) / se, np.inf)
    for i in np.argsort(margin)[:12]:  # the regions whose tolerance is the fewest SEs wide
        print(f"{age['regions'][i]:22s} {100 * truth[i]:10.2f} {100 * estimate[i]:7.2f} {ratios[i]:6.2f} "
              f"{100 * se[i]:6.2f} {out['z'][i]:6.2f} {out['share_within'][i]:12.2f}")
    print("if the misses were the sample's noise alone: " + "; ".join(
        f"{p['subjects_times']:g}x the subjects -> {p['expected_within']:.1f} within, all {p['all_within']:.2f}"
        for p in out["projected"]))  # fmt: skip
    times = out["subjects_for_all_within"]
    print(f"every region within with even odds at {times:.3g}x the training subjects" if times else
          f"every region within beyond {MAX_PROJECTED_SCALE}x the training subjects")  # fmt: skip
    return out


#: Which parts of the conditioning range (:mod:`dualglow_app.model.conditioning`) bound the
#: prior at synthesis: what the model file holds, the MRI latents only, nothing.
RANGE_VARIANTS = {"latent+prior": ("latent", "mu", "log_sigma"), "latent": ("latent",), "none": ()}


def with_range(model: Any, kept: tuple[str, ...]) -> Any:
    """A copy of ``model`` whose conditioning range bounds only ``kept`` (the rest unbounded)."""
    import copy
    import math

    import torch

    variant = copy.deepcopy(model)
    for level in variant.ranges:
        for name in ("latent", "mu", "log_sigma"):
            if name not in kept:
                low, high = level.bounds(name)
                level.set_bounds(name, torch.full_like(low, -math.inf), torch.full_like(high, math.inf))
    return variant


def score(model: Any, scaling: Any, data: Any, val_rows: np.ndarray, train_rows: np.ndarray,
          ages: tuple[float, ...] | None, explainable: np.ndarray | None, samples: int = 1,
          temperature: float = 0.0, truth_sweep: np.ndarray | None = None,
          covariates_of: Any = None) -> dict[str, Any]:  # fmt: skip
    """The targets on the validation scans (by default the T = 0 mode at each scan's own age;
    else the mean of ``samples`` at ``temperature``); the age response unless ``ages`` is None.
    ``covariates_of(row)``: a scan's covariates as ``predict`` takes them, for a model with
    more than age (default: its age alone)."""
    from dualglow_app.inference import predict
    from dualglow_app.metrics import deviation_correlation, image_metrics, mean_pairwise_correlation
    from dualglow_app.validation import reference_pet

    reference = reference_pet(data, train_rows, scaling)
    side_info = "age" in model.config.continuous
    preds, dev, dev_expl, mae, r, mae_mean, r_mean, clipped, amplitude = [], [], [], [], [], [], [], [], []
    for row in val_rows:
        mask = np.asarray(data.mask[row])
        truth = np.asarray(data.pet[row], dtype=np.float32)
        own = covariates_of(row) if covariates_of is not None else ({"age": float(data.age[row])} if side_info else None)
        out = predict(model, scaling, np.asarray(data.mri[row]), mask, own, samples=samples, temperature=temperature,
                      seed=int(row), tissue_maps=data.row_tissue_maps(row))  # fmt: skip
        preds.append(out.mean)
        clipped.append(out.clipped_fraction)
        scores, mean_scores = image_metrics(truth, out.mean, mask), image_metrics(truth, reference * mask, mask)
        mae.append(scores["mae_suvr"]), r.append(scores["pearson_r"])
        mae_mean.append(mean_scores["mae_suvr"]), r_mean.append(mean_scores["pearson_r"])
        dev.append(deviation_correlation(out.mean, truth, reference, mask))
        # How far the prediction departs from the mean PET, as a share of how far the truth does
        # (SD in the brain): below 1, the subject's departures are shrunk towards the population.
        inside = mask > 0
        amplitude.append(float(np.std(out.mean[inside] - reference[inside]) / np.std(truth[inside] - reference[inside])))
        if explainable is not None:
            dev_expl.append(deviation_correlation(out.mean, explainable[row], reference, mask))
    masks = np.asarray(data.mask[val_rows])
    scores_out: dict[str, Any] = {
        "deviation_r": float(np.mean(dev)), "deviation_r_explainable": float(np.mean(dev_expl)) if dev_expl else None,
        "specificity_synthetic": mean_pairwise_correlation(np.stack(preds), masks),
        "specificity_true": mean_pairwise_correlation(np.asarray(data.pet[val_rows]), masks),
        "specificity_explainable": (mean_pairwise_correlation(np.asarray(explainable[val_rows]), masks)
                                    if explainable is not None else None),
        "deviation_amplitude": float(np.mean(amplitude)),
        "mae_suvr": float(np.mean(mae)), "pearson_r": float(np.mean(r)),
        "meanpet_mae_suvr": float(np.mean(mae_mean)), "meanpet_pearson_r": float(np.mean(r_mean)),
        "clipped_fraction": float(np.mean(clipped)),
    }  # fmt: skip
    if side_info and ages is not None:
        scores_out["age"] = age_response(model, scaling, data, val_rows, ages, np.asarray(data.age[train_rows]),
                                         truth_sweep, covariates_of)
    return scores_out


COLUMNS = (
    ("label", "variant"), ("epochs", "epochs"), ("best_epoch", "kept"), ("train_seconds", "train s"),
    ("deviation_r", "dev r"), ("deviation_r_last10", "val dev r, last 10 epochs"), ("deviation_r_explainable", "dev r expl."), ("specificity_synthetic", "pairwise r syn."),
    ("specificity_true", "pairwise r true"), ("specificity_explainable", "pairwise r expl."), ("deviation_amplitude", "dev amplitude"), ("mae_suvr", "MAE"), ("meanpet_mae_suvr", "MAE mean PET"),
    ("age.pearson_r", "age r"), ("age.sign_agreement", "age sign"), ("age.median_ratio", "age slope ratio"),
    ("age.within_25_percent", "within 25 %"), ("age.beyond_over_inside", "beyond/inside"),
    ("age.measured.pearson_r", "age r (swept truth)"), ("age.measured.sign_agreement", "sign (swept truth)"),
    ("age.measured.median_ratio", "slope ratio (swept truth)"), ("age.measured.within_25_percent", "within 25 % (swept truth)"),
)


def table(folder: Path) -> str:
    """Every result JSON in ``folder`` as one Markdown table."""
    def cell(d: dict[str, Any], key: str) -> str:
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
        return f"{d:.3f}" if isinstance(d, float) else ("-" if d is None else str(d))

    rows = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        # The validation deviation r moves by up to +-0.07 between epochs: its mean over the
        # last 10 compares variants more fairly than the kept epoch's value alone.
        curve = [row["val_deviation_r"] for row in result.get("history", []) if "val_deviation_r" in row][-10:]
        if curve:
            result["deviation_r_last10"] = f"{np.mean(curve):.3f} +- {np.std(curve):.3f}"
        rows.append("| " + " | ".join(cell({**result, **result.get("scores", {})}, k) for k, _ in COLUMNS) + " |")
        for name, scores in result.get("scores_by_range", {}).items():
            prefix = "" if name.startswith("mean of") else "range: "
            variant = {**result, **scores, "label": f"{result['label']}, {prefix}{name}"}
            rows.append("| " + " | ".join(cell(variant, k) for k, _ in COLUMNS) + " |")
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return head + "\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mni-stack", type=Path, help="a stack written by dualglow-phantom --mni-stack")
    parser.add_argument("--label", help="name of this variant (its JSON and checkpoint folder)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dualglow-targets"), help="checkpoints (resumable)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of --out-dir's results and exit")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=200, help="budget")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after the epoch reaching this many steps")
    parser.add_argument("--patience", type=int, default=15)
    parser.add_argument("--min-delta", type=float, default=0.0)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--relation-hidden", type=int, default=64)
    parser.add_argument("--relation-layers", type=int, default=2)
    parser.add_argument("--top-prior", default="side")
    parser.add_argument("--top-mri-side", default="keep")
    parser.add_argument("--side-template", choices=("on", "off"), default="off",
                        help="the PET template moves with the covariates (DualGlowConfig.side_template)")
    parser.add_argument("--side-loss-weight", type=float, default=0.01)
    parser.add_argument("--lambda-mri", type=float, default=1e-3, help="weight of log p(xm) in eq. 12")
    parser.add_argument("--side-levels", choices=("top", "all", "none"), default="top")
    # The lab book's rows before finding 17 fitted the side template's start with the voxel's MRI
    # and trained every map: these defaults keep them reproducible (the group level's are 0,8,24 / age).
    parser.add_argument("--side-template-mri-fwhm", default="0", help="comma-separated FWHMs in mm (0 = the voxel)")
    parser.add_argument("--side-template-fixed", default="", help="comma-separated covariates whose maps stay fixed")
    parser.add_argument("--side-info", default="age", help="'age' or '' (none)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ages", type=float, nargs="+", default=list(SWEEP_AGES))
    args = parser.parse_args()
    if args.table:
        print(table(args.out_dir))
        return
    if args.mni_stack is None or not args.label:
        parser.error("--mni-stack and --label are required (or --table)")

    import torch

    from dualglow_app.dataset import load_mni_stack, split_subjects
    from dualglow_app.log import setup_logging
    from dualglow_app.options import TrainOptions
    from dualglow_app.train import train

    setup_logging(0)
    torch.set_num_threads(args.threads)
    data = load_mni_stack(args.mni_stack)
    explainable_path = args.mni_stack / "explainable.npy"
    explainable = np.load(explainable_path, mmap_mode="r") if explainable_path.is_file() else None
    options = TrainOptions(
        bids_dir=args.mni_stack, output_dir=args.work / args.label / "out", work_dir=args.work / args.label,
        depth=args.depth, hidden=args.hidden, relation_hidden=args.relation_hidden,
        relation_layers=args.relation_layers, top_prior=args.top_prior, top_mri_side=args.top_mri_side,
        side_template=args.side_template == "on",
        side_template_mri_fwhm=[float(v) for v in args.side_template_mri_fwhm.split(",")],
        side_template_fixed=[name for name in args.side_template_fixed.split(",") if name],
        side_loss_weight=args.side_loss_weight, side_levels=args.side_levels, lambda_mri=args.lambda_mri,
        side_info=tuple(s for s in args.side_info.split(",") if s), epochs=args.epochs, max_steps=args.max_steps,
        patience=args.patience, min_delta=args.min_delta, batch_size=args.batch_size, lr=args.lr,
        val_fraction=args.val_fraction, seed=args.seed, device="cpu", resume=True, nprocs=args.threads,
        skip_bids_validation=True, report=False, model_name=args.label,
    )  # fmt: skip
    start = time.perf_counter()
    result = train(options, data=data)
    train_seconds = time.perf_counter() - start
    train_rows, val_rows = split_subjects(data.subjects, args.val_fraction, args.seed)
    truth_sweep = true_age_sweeps(phantom_origin(args.mni_stack), data, val_rows, tuple(args.ages), args.work / "age_truth")
    scores = score(result.model, result.scaling, data, val_rows, train_rows, tuple(args.ages), explainable,
                   truth_sweep=truth_sweep)
    by_range = {name: score(with_range(result.model, kept), result.scaling, data, val_rows, train_rows,
                            tuple(args.ages), explainable, truth_sweep=truth_sweep)
                for name, kept in RANGE_VARIANTS.items() if name != "latent+prior"}  # fmt: skip
    # The mean of samples estimates the conditional mean, which MAE rewards, not the mode.
    by_range[f"mean of {SAMPLES} samples at T = 1"] = score(result.model, result.scaling, data, val_rows, train_rows,
                                                            None, explainable, SAMPLES, 1.0)  # fmt: skip
    out = {
        "label": args.label, "command": " ".join(sys.argv), "machine": cpu_description(), "commit": git_commit(),
        "stack": str(args.mni_stack), "split": {"train": len(train_rows), "val": len(val_rows)},
        "options": {k: v for k, v in vars(args).items() if k not in ("table",)},
        "epochs": result.epochs, "best_epoch": result.selected_epoch, "stopped_early": result.stopped_early,
        "train_seconds": round(train_seconds, 1), "history": result.history, "scores": scores,
        "scores_by_range": by_range,
    }  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.label}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(table(args.out_dir))
    print(f"written {path}")


if __name__ == "__main__":
    main()
