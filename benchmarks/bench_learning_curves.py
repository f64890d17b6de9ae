"""Learning curves of the baselines under early stopping: does each one reach its plateau?

    python benchmarks/bench_learning_curves.py --bids phantom24/ --work WORK [--methods unet,cgan]
    python benchmarks/bench_learning_curves.py --mni-stack STACK_DIR
    python benchmarks/bench_learning_curves.py --bids phantom200_v2/ --work WORK \
        --train-of models/dualglow-phantom-demo.json --test 049-060 [--phantom-seed 0 --phantom-version 2] \
        [--paired-with DEFAULT_MODEL_BENCH.json] [--checkpoint-dir DIR]

The evaluation compares DUAL-GLOW with the paper's baselines, which only means something when
every method has converged. This script takes a stacked paired dataset (a BIDS dataset
through :func:`dualglow_app.dataset.prepare_dataset`, i.e. the group level's preprocessing and
work-dir cache; or a ready stack through ``dualglow_app.dataset.load_mni_stack`` where that
exists), splits it by subject into training and validation scans
(:func:`dualglow_app.dataset.split_subjects`), and trains each method with
:meth:`dualglow_app.baselines.Baseline.fit`'s early stopping: up to ``--max-epochs``, stopping
after ``--patience`` epochs without a relative improvement of ``--min-delta`` in the
validation MAE, keeping the best epoch's weights.

Per epoch it prints the validation MAE (SUVR, inside the brain; the early-stopping criterion
is the same MAE on the model's [0, 1] scale, SUVR / 3), the voxel correlation and, when
:mod:`dualglow_app.metrics` has ``deviation_correlation``, the correlation of the predicted and
true departures from the mean training PET (0 for the mean PET itself). The mean training
PET's scores are printed as the line a method must beat. The plateau epoch is the first
epoch within ``--plateau-tolerance`` (relative) of the best validation MAE.

With ``--train-of`` a model's own training and validation subjects (its JSON's
``training.subjects`` / ``validation_subjects``) replace the split, so a baseline is the oracle
of that model on the same scans; ``--test`` then scores each method's kept weights on held-out
subjects (MAE, PSNR, SSIM, deviation r, against each phantom's explainable PET with
``--phantom-seed``/``--phantom-version``, input specificity), and ``--paired-with`` (the JSON of
``bench_default_model.py``) adds a paired Wilcoxon test against that model's rows.
``--checkpoint-dir`` makes each fit resumable.

Output: a table per method, a summary table, and JSON (default
``benchmarks/results/learning_curves_<grid>.json``) with the machine (``lscpu`` model name,
threads), the exact command, the split, the budget and every epoch's row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dualglow_app import dataset as dataset_module  # noqa: E402
from dualglow_app import metrics as metrics_module  # noqa: E402
from dualglow_app.baselines import BASELINES, VAL_METRIC, BaselineOptions, make_baseline  # noqa: E402
from dualglow_app.data import IntensityScaling  # noqa: E402
from dualglow_app.dataset import DatasetSpec, PairedVolumes, prepare_dataset, split_subjects  # noqa: E402
from dualglow_app.evaluate.crossval import baseline_inputs  # noqa: E402
from dualglow_app.evaluate.options import BASELINE_INPUTS  # noqa: E402
from dualglow_app.evaluate.statistics import explainable_truth  # noqa: E402
from dualglow_app.grid import resolve_grid  # noqa: E402
from dualglow_app.log import get_logger, setup_logging  # noqa: E402
from dualglow_app.metrics import image_metrics  # noqa: E402
from dualglow_app.phantom.cohort import subject_index  # noqa: E402
from dualglow_app.runtime import cpu_threads  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from perfkit import labels  # noqa: E402

LOG = get_logger("dualglow.bench")
RESULTS = ROOT / "benchmarks" / "results"


def cpu_description() -> dict[str, Any]:
    """``lscpu``'s model name and CPU/thread counts, and the threads torch uses."""
    fields: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "model_name": fields.get("Model name", "unknown"),
        "cpus": fields.get("CPU(s)", str(os.cpu_count())),
        "threads_per_core": fields.get("Thread(s) per core"),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load_data(args: argparse.Namespace) -> tuple[PairedVolumes, str]:
    """The stacked pairs and a description of where they came from."""
    if args.mni_stack is not None:
        loader = getattr(dataset_module, "load_mni_stack", None)
        if loader is None:
            sys.exit("--mni-stack: this version of dualglow_app.dataset has no load_mni_stack(); use --bids")
        return loader(args.mni_stack), f"mni-stack {args.mni_stack}"
    work = args.work or args.bids.resolve().parent / "dualglow-work"
    chosen: tuple[str, ...] = ()
    if args.train_of is not None:
        chosen = tuple(label.removeprefix("sub-") for label in sum(model_split(args.train_of), []))
        chosen += tuple(labels(args.test)) if args.test else ()
    spec = DatasetSpec(args.bids, work, resolve_grid(args.grid), nprocs=args.threads, participant_labels=chosen,
                       tissue_maps="native" if BASELINE_INPUTS[args.baseline_inputs] > 1 else None)
    try:  # which cohort (a phantom cohort names its generator and seed)
        name = json.loads((args.bids / "dataset_description.json").read_text()).get("Name", "?")
    except (OSError, ValueError):
        name = "?"
    return prepare_dataset(spec), f"bids {args.bids} ({name}; work {work})"


def model_split(model_json: Path) -> tuple[list[str], list[str]]:
    """A trained model's training and validation subjects, from its JSON's metadata."""
    training = json.loads(model_json.read_text())["metadata"]["training"]
    return list(training["subjects"]), list(training["validation_subjects"])


def test_scores(pet_suvr: np.ndarray, pred_suvr: np.ndarray, mask: np.ndarray, mean_pet: np.ndarray,
                explainable: np.ndarray | None) -> dict[str, float]:  # fmt: skip
    """One held-out scan's image metrics (with the deviation r against the mean training PET)
    and, with its explainable PET, the deviation r against that."""
    out = image_metrics(pet_suvr, pred_suvr, mask, reference=mean_pet)
    if explainable is not None:
        out["deviation_r_explainable"] = float(metrics_module.deviation_correlation(pred_suvr, explainable, mean_pet, mask))
    return out


def paired_tests(ours: list[dict[str, Any]], bench_json: Path) -> dict[str, Any]:
    """Paired two-sided Wilcoxon of this method's held-out rows against the DUAL-GLOW rows of a
    ``bench_default_model.py`` JSON, on the subjects both scored."""
    from scipy.stats import wilcoxon

    theirs = {r["subject"]: r for r in json.loads(bench_json.read_text())["rows"] if r["method"].startswith("DUAL-GLOW")}
    shared = [r for r in ours if r["subject"] in theirs]
    if len(shared) < 2:
        sys.exit(f"--paired-with {bench_json}: fewer than 2 held-out subjects in common; score the same --test")
    out: dict[str, Any] = {"subjects": len(shared)}
    for key in ("mae_suvr", "psnr_db", "ssim", "deviation_r"):
        a = np.array([r[key] for r in shared])
        b = np.array([theirs[r["subject"]][key] for r in shared])
        out[key] = {"this": float(a.mean()), "dualglow": float(b.mean()),
                    "dualglow_better": int((b < a).sum() if key == "mae_suvr" else (b > a).sum()),
                    "wilcoxon_p": float(wilcoxon(a, b).pvalue)}  # fmt: skip
    return out


def plateau_epoch(values: list[float], tolerance: float) -> int:
    """The first epoch (1-based) whose value is within ``tolerance`` (relative) of the minimum."""
    best = min(values)
    return next(i for i, v in enumerate(values, start=1) if v <= best * (1.0 + tolerance))


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bids", type=Path, help="paired BIDS dataset (preprocessed through the work-dir cache)")
    source.add_argument("--mni-stack", type=Path, help="a stack for dualglow_app.dataset.load_mni_stack")
    parser.add_argument("--work", type=Path, default=None, help="work dir (--bids). Default: BIDS/../dualglow-work")
    parser.add_argument("--grid", default="cpu4mm", help="model grid preset (--bids)")
    parser.add_argument("--methods", default="unet", help=f"comma-separated, from {','.join(BASELINES)}")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="share of subjects for validation")
    parser.add_argument("--max-epochs", type=int, default=BaselineOptions.max_epochs, help="epoch budget")
    parser.add_argument("--patience", type=int, default=BaselineOptions.patience)
    parser.add_argument("--min-delta", type=float, default=BaselineOptions.min_delta, help="relative")
    parser.add_argument("--budget-seconds", type=float, default=None, help="wall-time cap per method")
    parser.add_argument("--plateau-tolerance", type=float, default=0.01,
                        help="plateau epoch: first epoch within this relative distance of the best val MAE")
    parser.add_argument("--width", type=int, default=BaselineOptions.width)
    parser.add_argument("--baseline-inputs", choices=list(BASELINE_INPUTS), default="t1w",
                        help="what the methods read: the T1w, or the T1w and its native tissue maps (--bids reads them)")
    parser.add_argument("--batch-size", type=int, default=BaselineOptions.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: all usable")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-of", type=Path, metavar="MODEL_JSON",
                        help="train and validate on this model's own subjects (--bids)")
    parser.add_argument("--test", help="held-out subject ranges scored after training, e.g. 049-060 (--bids)")
    parser.add_argument("--phantom-seed", type=int, help="the phantom cohort's seed (explainable PET, with --test)")
    parser.add_argument("--phantom-version", type=int, help="the phantom cohort's version (with --test)")
    parser.add_argument("--paired-with", type=Path, metavar="BENCH_JSON",
                        help="bench_default_model.py --json of the same --test: paired Wilcoxon against its rows")
    parser.add_argument("--checkpoint-dir", type=Path, help="resume each fit from / save it to METHOD.pt here")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path. Default: benchmarks/results/learning_curves_<grid>.json")
    args = parser.parse_args()
    setup_logging(0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(BASELINES))
    if unknown:
        parser.error(f"--methods {unknown}: choose from {sorted(BASELINES)}")
    if (args.train_of or args.test) and args.bids is None:
        parser.error("--train-of and --test need --bids")
    if args.paired_with and not args.test:
        parser.error("--paired-with needs --test")
    torch.set_num_threads(cpu_threads(args.threads))

    data, origin = load_data(args)
    scaling = IntensityScaling()
    test_rows = np.array([data.labels.index(f"sub-{label}") for label in labels(args.test)] if args.test else [], int)
    if args.train_of is not None:
        trained, validating = model_split(args.train_of)
        train_rows = np.array([data.labels.index(label) for label in trained])
        val_rows = np.array([data.labels.index(label) for label in validating])
    else:
        pool = np.setdiff1d(np.arange(len(data)), test_rows)
        inner_train, inner_val = split_subjects([data.subjects[i] for i in pool], args.val_fraction, args.seed)
        train_rows, val_rows = pool[inner_train], pool[inner_val]
    if len(val_rows) == 0:
        sys.exit("no validation scans: raise --val-fraction or add subjects")
    mri = baseline_inputs(data, np.arange(len(data)), args.baseline_inputs)
    pet_suvr = np.asarray(data.pet, dtype=np.float32)
    pet = scaling.pet_to_model(pet_suvr)
    mask = np.asarray(data.mask)
    mean_pet = pet_suvr[train_rows].mean(0)
    deviation = getattr(metrics_module, "deviation_correlation", None)

    def scores(pred_suvr: np.ndarray) -> dict[str, float]:
        """Mean over validation scans: MAE (SUVR), voxel r and (if available) deviation r."""
        rows = []
        for k, row in enumerate(val_rows):
            m = image_metrics(pet_suvr[row], pred_suvr[k], mask[row])
            out = {"val_mae_suvr": m["mae_suvr"], "val_pearson_r": m["pearson_r"]}
            if deviation is not None:
                out["val_deviation_r"] = float(deviation(pred_suvr[k], pet_suvr[row], mean_pet, mask[row]))
            rows.append(out)
        return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}

    reference = scores(np.broadcast_to(mean_pet, (len(val_rows), *mean_pet.shape)))
    # Held-out scans are scored as bench_default_model.py scores a model: against the mean PET
    # of every scan it saw (training and validation).
    test_reference = pet_suvr[np.concatenate([train_rows, val_rows])].mean(0)
    explainable = None
    if len(test_rows) and args.phantom_seed is not None and args.phantom_version is not None:
        explainable = explainable_truth((args.phantom_seed, args.phantom_version),
                                        [subject_index(data.labels[row]) for row in test_rows], data.grid,
                                        cache=(args.work or args.bids.resolve().parent / "dualglow-work") / "explainable_truth")  # fmt: skip

    def explainable_of(k: int) -> np.ndarray | None:
        return None if explainable is None else explainable[k]
    machine = cpu_description()
    print(f"data: {origin}: {len(data)} scans on grid {data.grid.shape} ({data.grid.voxel_size} mm); "
          f"{len(train_rows)} training, {len(val_rows)} validation scans")  # fmt: skip
    print(f"CPU: {machine['model_name']}, {machine['usable_cpus']} usable CPUs, torch threads {machine['torch_threads']}")
    print(f"budget: max {args.max_epochs} epochs, patience {args.patience}, min_delta {args.min_delta} (relative)"
          + (f", {args.budget_seconds} s" if args.budget_seconds else ""))  # fmt: skip
    print(f"mean training PET on the validation scans: MAE {reference['val_mae_suvr']:.4f} SUVR, "
          f"r {reference['val_pearson_r']:.4f}"
          + (f", deviation r {reference['val_deviation_r']:.3f}" if "val_deviation_r" in reference else ""))  # fmt: skip

    results: dict[str, Any] = {}
    for method in methods:
        options = BaselineOptions(
            max_epochs=args.max_epochs, patience=args.patience, min_delta=args.min_delta,
            budget_seconds=args.budget_seconds, width=args.width, batch_size=args.batch_size,
            seed=args.seed, device=args.device, input_channels=BASELINE_INPUTS[args.baseline_inputs],
        )  # fmt: skip
        model = make_baseline(method, options)
        if method != "meanpet":  # closed form: no epochs
            print(f"\n{method}: epoch  train loss  val MAE (SUVR)  val r   deviation r  seconds")

        def on_epoch(row: dict[str, Any], pred: np.ndarray, method: str = method) -> None:
            row.update(scores(scaling.pet_from_model(pred)))
            print(f"{method:>7} {row['epoch']:6d}  {row['train_loss']:10.4f}  {row['val_mae_suvr']:14.4f}  "
                  f"{row['val_pearson_r']:6.4f}  {fmt(row.get('val_deviation_r'), 3):>11}  {row['seconds']:7.1f}"
                  + ("" if row["improved"] else "  (no improvement)"), flush=True)  # fmt: skip

        checkpoint = None
        if args.checkpoint_dir is not None:
            args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            checkpoint = args.checkpoint_dir / f"{method}.pt"
        model.fit(mri[train_rows], pet[train_rows], mri[val_rows], pet[val_rows], val_mask=mask[val_rows],
                  on_epoch=on_epoch, checkpoint=checkpoint)  # fmt: skip
        summary = model.summary()
        if summary["history"]:
            curve = [row["val_mae_suvr"] for row in summary["history"]]
            summary["plateau_epoch"] = plateau_epoch(curve, args.plateau_tolerance)
            summary["best"] = {k: v for k, v in summary["history"][summary["best_epoch"] - 1].items()
                               if k.startswith("val_")}  # fmt: skip
            summary["seconds_per_epoch"] = float(np.mean([row["seconds"] for row in summary["history"]]))
            summary["train_seconds_per_epoch"] = float(np.mean([row["train_seconds"] for row in summary["history"]]))
        else:  # meanpet: closed form
            summary["plateau_epoch"] = 0
            summary["best"] = reference
            summary["seconds_per_epoch"] = summary["train_seconds_per_epoch"] = None
        if len(test_rows):
            predicted = scaling.pet_from_model(model.predict(mri[test_rows]))
            summary["test"] = [{"subject": data.labels[row], **test_scores(pet_suvr[row], predicted[k] * (mask[row] > 0),
                                                                          mask[row], test_reference, explainable_of(k))}
                               for k, row in enumerate(test_rows)]  # fmt: skip
            summary["test_mean"] = {key: float(np.mean([r[key] for r in summary["test"]]))
                                    for key in summary["test"][0] if key != "subject"}  # fmt: skip
            summary["test_mean"]["pairwise_r"] = metrics_module.mean_pairwise_correlation(predicted, mask[test_rows])
            if args.paired_with:
                summary["paired_with"] = {"file": str(args.paired_with), **paired_tests(summary["test"], args.paired_with)}
        results[method] = summary

    print("\nmethod   epochs  stop          best  plateau  val MAE (SUVR)  val r   deviation r  s/epoch  wall s")
    print(f"{'meanpet':8} {'-':>6}  {'closed form':12} {'-':>5}  {'-':>7}  {reference['val_mae_suvr']:14.4f}  "
          f"{reference['val_pearson_r']:6.4f}  {fmt(reference.get('val_deviation_r'), 3):>11}")  # fmt: skip
    for method, s in results.items():
        best = s["best"]
        print(f"{method:8} {s['epochs_run']:6d}  {s['stop_reason']:12} {s['best_epoch']:5d}  {s['plateau_epoch']:7d}  "
              f"{best['val_mae_suvr']:14.4f}  {best['val_pearson_r']:6.4f}  {fmt(best.get('val_deviation_r'), 3):>11}  "
              f"{fmt(s['seconds_per_epoch'], 1):>7}  {s['wall_s']:6.0f}")  # fmt: skip

    tested = {method: s for method, s in results.items() if "test_mean" in s}
    if tested:
        print(f"\nheld-out subjects {args.test} ({len(test_rows)} scans), the kept weights:")
        print("method   MAE (SUVR)  PSNR (dB)  SSIM    deviation r  vs explainable  pairwise r")
        for method, s in tested.items():
            t = s["test_mean"]
            print(f"{method:8} {t['mae_suvr']:10.4f}  {t['psnr_db']:9.2f}  {t['ssim']:6.4f}  {t['deviation_r']:11.3f}  "
                  f"{fmt(t.get('deviation_r_explainable'), 3):>14}  {t['pairwise_r']:10.3f}")  # fmt: skip
            paired = s.get("paired_with")
            if paired:
                print(f"  vs DUAL-GLOW ({paired['file']}, {paired['subjects']} subjects): "
                      + "; ".join(f"{key} {paired[key]['this']:.4f} vs {paired[key]['dualglow']:.4f}, DUAL-GLOW better "
                                  f"{paired[key]['dualglow_better']}/{paired['subjects']}, p {paired[key]['wilcoxon_p']:.2g}"
                                  for key in ("mae_suvr", "psnr_db", "ssim", "deviation_r")))  # fmt: skip

    out = args.out or RESULTS / f"learning_curves_{args.grid if args.bids else 'mni_stack'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "learning_curves",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine,
        "data": {
            "source": origin, "scans": len(data), "grid": data.grid.to_dict(),
            "train": [data.labels[i] for i in train_rows], "validation": [data.labels[i] for i in val_rows],
            "test": [data.labels[i] for i in test_rows], "train_of": str(args.train_of) if args.train_of else None,
            "val_fraction": args.val_fraction, "seed": args.seed, "baseline_inputs": args.baseline_inputs,
        },  # fmt: skip
        "budget": {"max_epochs": args.max_epochs, "patience": args.patience, "min_delta": args.min_delta,
                   "budget_seconds": args.budget_seconds, "plateau_tolerance": args.plateau_tolerance},  # fmt: skip
        "early_stopping_metric": VAL_METRIC,
        "reported_metrics": "val_mae_suvr, val_pearson_r, val_deviation_r: means over the validation scans, "
                            "inside the brain mask, in SUVR (dualglow_app.metrics)",
        "deviation_correlation": deviation is not None,
        "reference_meanpet": reference,
        "methods": results,
    }  # fmt: skip
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
