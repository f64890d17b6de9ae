"""Learning curves of the baselines under early stopping: does each one reach its plateau?

    python benchmarks/bench_learning_curves.py --bids phantom24/ --work WORK [--methods unet,cgan]
    python benchmarks/bench_learning_curves.py --mni-stack STACK_DIR

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
from dualglow_app.grid import resolve_grid  # noqa: E402
from dualglow_app.log import get_logger, setup_logging  # noqa: E402
from dualglow_app.metrics import image_metrics  # noqa: E402
from dualglow_app.runtime import cpu_threads  # noqa: E402

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
    spec = DatasetSpec(args.bids, work, resolve_grid(args.grid), nprocs=args.threads)
    try:  # which cohort (a phantom cohort names its generator and seed)
        name = json.loads((args.bids / "dataset_description.json").read_text()).get("Name", "?")
    except (OSError, ValueError):
        name = "?"
    return prepare_dataset(spec), f"bids {args.bids} ({name}; work {work})"


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
    parser.add_argument("--batch-size", type=int, default=BaselineOptions.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: all usable")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path. Default: benchmarks/results/learning_curves_<grid>.json")
    args = parser.parse_args()
    setup_logging(0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(BASELINES))
    if unknown:
        parser.error(f"--methods {unknown}: choose from {sorted(BASELINES)}")
    torch.set_num_threads(cpu_threads(args.threads))

    data, origin = load_data(args)
    scaling = IntensityScaling()
    train_rows, val_rows = split_subjects(data.subjects, args.val_fraction, args.seed)
    if len(val_rows) == 0:
        sys.exit("no validation scans: raise --val-fraction or add subjects")
    mri = scaling.mri_to_model(np.asarray(data.mri))
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
            seed=args.seed, device=args.device,
        )  # fmt: skip
        model = make_baseline(method, options)
        if method != "meanpet":  # closed form: no epochs
            print(f"\n{method}: epoch  train loss  val MAE (SUVR)  val r   deviation r  seconds")

        def on_epoch(row: dict[str, Any], pred: np.ndarray, method: str = method) -> None:
            row.update(scores(scaling.pet_from_model(pred)))
            print(f"{method:>7} {row['epoch']:6d}  {row['train_loss']:10.4f}  {row['val_mae_suvr']:14.4f}  "
                  f"{row['val_pearson_r']:6.4f}  {fmt(row.get('val_deviation_r'), 3):>11}  {row['seconds']:7.1f}"
                  + ("" if row["improved"] else "  (no improvement)"), flush=True)  # fmt: skip

        model.fit(mri[train_rows], pet[train_rows], mri[val_rows], pet[val_rows], val_mask=mask[val_rows],
                  on_epoch=on_epoch)  # fmt: skip
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
        results[method] = summary

    print("\nmethod   epochs  stop          best  plateau  val MAE (SUVR)  val r   deviation r  s/epoch  wall s")
    print(f"{'meanpet':8} {'-':>6}  {'closed form':12} {'-':>5}  {'-':>7}  {reference['val_mae_suvr']:14.4f}  "
          f"{reference['val_pearson_r']:6.4f}  {fmt(reference.get('val_deviation_r'), 3):>11}")  # fmt: skip
    for method, s in results.items():
        best = s["best"]
        print(f"{method:8} {s['epochs_run']:6d}  {s['stop_reason']:12} {s['best_epoch']:5d}  {s['plateau_epoch']:7d}  "
              f"{best['val_mae_suvr']:14.4f}  {best['val_pearson_r']:6.4f}  {fmt(best.get('val_deviation_r'), 3):>11}  "
              f"{fmt(s['seconds_per_epoch'], 1):>7}  {s['wall_s']:6.0f}")  # fmt: skip

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
            "val_fraction": args.val_fraction, "seed": args.seed,
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
