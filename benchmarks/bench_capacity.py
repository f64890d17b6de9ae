"""Capacity and budget (model issue, cause 3): the default model's recipe at other sizes.

Trains DUAL-GLOW with the group level's recipe of the shipped model (``models/MODEL_CARD.md``:
the group defaults, ``--depth 4 --hidden 32``, age and diagnosis, ``--epochs 40 --keep last
--lr 5e-4 --batch-size 2 --val-fraction 0.2 --seed 0``) on an MNI stack (``dualglow-phantom --mni-stack``: model
development only), with any option changed by ``--set NAME=VALUE`` (a ``TrainOptions`` field),
on the CPU or a GPU, under a wall-clock budget (``--time-limit``; resumable). Then scores the
kept model on the validation scans as ``bench_dualglow_targets.py`` does: deviation r (against
the truth and the explainable PET), input specificity, MAE, and the age sweep against the
phantom's swept truth.

    python benchmarks/bench_capacity.py pack STACK .gpu_carry/stack.npz     # float16, for a GPU machine
    python benchmarks/bench_capacity.py unpack .gpu_carry/stack.npz STACK16 # the stack every run uses
    python benchmarks/bench_capacity.py train STACK16 --label rel8 --set relation_layers=8 --device cuda \\
        --time-limit 300 --work WORK
    python benchmarks/bench_capacity.py score STACK16 --weights WORK/rel8/out/models/rel8.safetensors \\
        --json benchmarks/results/capacity/rel8.json
    python benchmarks/bench_capacity.py table benchmarks/results/capacity
    python benchmarks/bench_capacity.py collect WORK OUT --max-mib 56      # what a GPU machine sends back

``pack`` rounds the MRI and PET to float16 (the flows see them at 256 bins: float16's
relative 5e-4 is far below one bin) and keeps one mask when all are equal, so 240 subjects
fit beside the working tree in the 64 MiB that travels to a leased GPU; ``unpack`` writes them
back as a stack (float32 of the rounded values), so runs here and there train on the same
numbers. The explainable PET is not packed (training does not read it): ``unpack`` copies it
from ``--explainable-from`` when given (scoring wants it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_dualglow_targets import (  # noqa: E402
    SWEEP_AGES,
    git_commit,
    phantom_origin,
    scan_covariates,
    score,
    true_age_sweeps,
)
from bench_learning_curves import cpu_description  # noqa: E402

#: The shipped model's group command (models/MODEL_CARD.md) beyond the group level's defaults.
RECIPE: dict[str, Any] = {"depth": 4, "hidden": 32, "side_info": ("age", "diagnosis"), "epochs": 40, "keep": "last",
                          "lr": 5e-4, "batch_size": 2, "val_fraction": 0.2, "seed": 0}  # fmt: skip


def pack(stack: Path, out: Path, subjects: int | None) -> None:
    """The stack's MRI and PET (and tissue maps) as float16 (one mask when all are equal) and its
    index, in one npz."""
    index = json.loads((stack / "index.json").read_text())
    n = min(subjects or len(index["labels"]), len(index["labels"]))
    mask = np.load(stack / "mask.npy", mmap_mode="r")[:n]
    same = bool(np.all(mask == mask[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    # The tissue maps (--anatomy-reading native) where the stack has them, float16 like the images.
    extra = {name: np.asarray(np.load(stack / f"{name}.npy", mmap_mode="r")[:n], np.float16)
             for name in ("tissue_maps",) if (stack / f"{name}.npy").is_file()}  # fmt: skip
    np.savez_compressed(out, mri=np.asarray(np.load(stack / "mri.npy", mmap_mode="r")[:n], np.float16),
                        pet=np.asarray(np.load(stack / "pet.npy", mmap_mode="r")[:n], np.float16),
                        mask=np.asarray(mask[:1] if same else mask), index=np.array(json.dumps(index)),
                        subjects=np.array(n), **extra)  # fmt: skip
    print(f"packed {n} subjects of {stack} into {out}: {out.stat().st_size / 2**20:.1f} MiB")


def unpack(packed: Path, stack: Path, explainable_from: Path | None) -> None:
    """A stack of the packed subjects (index lists cut to them), float32 of the rounded values."""
    with np.load(packed) as archive:
        n = int(archive["subjects"])
        index = json.loads(str(archive["index"]))
        stack.mkdir(parents=True, exist_ok=True)
        np.save(stack / "mri.npy", archive["mri"].astype(np.float32))
        np.save(stack / "pet.npy", archive["pet"].astype(np.float32))
        mask = archive["mask"]
        np.save(stack / "mask.npy", np.broadcast_to(mask, (n, *mask.shape[1:])) if len(mask) == 1 else mask)
        if "tissue_maps" in archive.files:
            np.save(stack / "tissue_maps.npy", archive["tissue_maps"].astype(np.float32))
    total = len(index["labels"])
    index = {k: (v[:n] if isinstance(v, list) and len(v) == total else v) for k, v in index.items()}
    (stack / "index.json").write_text(json.dumps(index))
    if explainable_from is not None:
        np.save(stack / "explainable.npy", np.load(explainable_from / "explainable.npy", mmap_mode="r")[:n])
    print(f"unpacked {n} subjects into {stack}")


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs as TrainOptions fields, VALUE read as JSON when it parses (numbers,
    lists, true/false), else as a string."""
    from dualglow_app.options import TrainOptions

    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    settings: dict[str, Any] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {pair}: {name!r} is not a TrainOptions field")
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    return settings


def train_variant(args: argparse.Namespace) -> None:
    """Train one variant (resuming its checkpoint) and write its history beside the model."""
    import torch

    from dualglow_app.dataset import load_mni_stack
    from dualglow_app.log import setup_logging
    from dualglow_app.options import TrainOptions
    from dualglow_app.train import train

    setup_logging(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    settings = {**RECIPE, **parse_settings(args.set)}
    options = TrainOptions(bids_dir=args.stack, output_dir=args.work / args.label / "out",
                           work_dir=args.work / args.label, device=args.device, time_limit=args.time_limit,
                           resume=True, nprocs=args.threads, skip_bids_validation=True, report=False,
                           model_name=args.label, **settings)  # fmt: skip
    start = time.perf_counter()
    result = train(options, data=load_mni_stack(args.stack))
    record = {"label": args.label, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
              "device": result.device, "machine": cpu_description(), "commit": git_commit(), "epochs": result.epochs,
              "steps": result.steps, "time_limited": result.time_limited, "seconds": round(time.perf_counter() - start, 1),
              "parameters": sum(p.numel() for p in result.model.parameters()), "history": result.history}  # fmt: skip
    if torch.cuda.is_available() and args.device != "cpu":
        record["gpu"] = torch.cuda.get_device_name(0)
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    path = args.work / args.label / "history.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"{args.label}: {result.epochs} epochs ({'time limit' if result.time_limited else 'done'}), "
          f"model {result.model_path}, history {path}")  # fmt: skip


def score_model(args: argparse.Namespace) -> None:
    """The targets of a trained model on the stack's validation scans (the recipe's split)."""
    import torch

    from dualglow_app.dataset import load_mni_stack, split_subjects
    from dualglow_app.log import setup_logging
    from dualglow_app.weights import open_model

    setup_logging(-1)
    torch.set_num_threads(args.threads)
    loaded = open_model(args.weights, "cpu")
    data = load_mni_stack(args.stack)
    training = loaded.metadata.training or {}
    train_rows, val_rows = split_subjects(data.subjects, training.get("val_fraction", RECIPE["val_fraction"]),
                                          training.get("seed", RECIPE["seed"]))  # fmt: skip
    if [data.labels[i] for i in val_rows] != list(training.get("validation_subjects", [data.labels[i] for i in val_rows])):
        raise SystemExit(f"{args.weights}: its validation subjects are not this stack's split")

    sweep = true_age_sweeps(phantom_origin(args.stack), data, val_rows, SWEEP_AGES, args.stack / "age_truth")
    start = time.perf_counter()
    scores = score(loaded.model, loaded.scaling, data, val_rows, train_rows, SWEEP_AGES,
                   getattr(data, "explainable", None), truth_sweep=sweep,
                   covariates_of=lambda row: scan_covariates(data, loaded.covariates, row))  # fmt: skip
    weights = Path(args.weights)
    # The history beside the model (as `collect` sends it back) or in its run's work folder.
    histories = [weights.with_name(f"{weights.stem}.history.json"), weights.parents[2] / "history.json"]
    record = next((json.loads(p.read_text()) for p in histories if p.is_file()), {})
    out = {**record, "weights": str(args.weights), "sha256": loaded.sha256, "scored_on": cpu_description(),
           "score_seconds": round(time.perf_counter() - start, 1), "split": {"train": len(train_rows), "val": len(val_rows)},
           "scores": scores}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, default=str))
    print(table(args.json.parent))


def collect(work: Path, out: Path, max_mib: float) -> None:
    """Every variant's history and log into ``out``, and the models (files + metrics TSV) in order
    of their last validation MAE, best first, while the total stays under ``max_mib`` (what a
    leased GPU machine may send back)."""
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for history in sorted(work.glob("*/history.json")):
        label = history.parent.name
        shutil.copy(history, out / f"{label}.history.json")
        rows = json.loads(history.read_text()).get("history") or [{}]
        variants.append((rows[-1].get("val_mae_suvr", float("inf")), label))
    for log in work.glob("*.log"):
        shutil.copy(log, out / log.name)
    used = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    sent = []
    for _, label in sorted(variants):
        files = [f for f in (work / label / "out" / "models").glob(f"{label}*") if f.is_file()]
        size = sum(f.stat().st_size for f in files) / 2**20
        if files and used + size <= max_mib:
            for f in files:
                shutil.copy(f, out / f.name)
            used += size
            sent.append(label)
    (out / "manifest.json").write_text(json.dumps({"models": sent, "by_last_val_mae": [name for _, name in sorted(variants)],
                                                   "mib": round(used, 1)}, indent=1))  # fmt: skip
    print(f"collected {len(variants)} histories and the models of {sent} ({used:.1f} MiB) into {out}")


COLUMNS = (
    ("label", "variant"), ("device", "trained on"), ("parameters", "parameters"), ("epochs", "epochs"),
    ("seconds", "train s"), ("scores.deviation_r", "dev r"), ("scores.deviation_r_explainable", "dev r expl."),
    ("scores.specificity_synthetic", "pairwise r"), ("scores.mae_suvr", "MAE"),
    ("scores.meanpet_mae_suvr", "MAE mean PET"), ("scores.deviation_amplitude", "amplitude"),
    ("scores.age.measured.pearson_r", "age r"), ("scores.age.measured.sign_agreement", "age sign"),
    ("scores.age.measured.median_ratio", "age ratio"), ("scores.age.measured.within_25_percent", "within 25 %"),
    ("last_val_bpd", "val bpd (last)"),
)


def table(folder: Path) -> str:
    """Every scored JSON of ``folder`` as one Markdown table."""
    def cell(d: Any, key: str) -> str:
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return f"{d:.3f}" if isinstance(d, float) else ("-" if d is None else str(d))

    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        history = result.get("history") or [{}]
        result["last_val_bpd"] = history[-1].get("val_bpd_pet_given_mri")
        lines.append("| " + " | ".join(cell(result, k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="an MNI stack as float16 in one npz")
    p.add_argument("stack", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--subjects", type=int, default=None, help="the first N subjects (default all)")
    p = sub.add_parser("unpack", help="a packed npz back to an MNI stack")
    p.add_argument("packed", type=Path)
    p.add_argument("stack", type=Path)
    p.add_argument("--explainable-from", type=Path, default=None, help="the original stack (its explainable.npy)")
    p = sub.add_parser("train", help="train one variant of the recipe")
    p.add_argument("stack", type=Path)
    p.add_argument("--label", required=True)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a TrainOptions field (repeat)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training (resumable)")
    p.add_argument("--work", type=Path, required=True)
    p = sub.add_parser("score", help="score a trained variant on the validation scans")
    p.add_argument("stack", type=Path)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("collect", help="histories, logs and the best models that fit, to send back")
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--max-mib", type=float, default=56.0)
    p = sub.add_parser("table", help="the table of a folder of scored JSONs")
    p.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.stack, args.out, args.subjects)
    elif args.command == "unpack":
        unpack(args.packed, args.stack, args.explainable_from)
    elif args.command == "train":
        train_variant(args)
    elif args.command == "score":
        score_model(args)
    elif args.command == "collect":
        collect(args.work, args.out, args.max_mib)
    else:
        print(table(args.folder))


if __name__ == "__main__":
    main()
