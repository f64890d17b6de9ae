"""Issue 21's claim: a model trained with ``--side-info age sex diagnosis`` moves its synthetic
PET with the diagnosis as the phantom does (precuneus and posterior cingulate lower for AD
than CN), measured on held-out subjects, and its age sweep still moves.

1. Train DUAL-GLOW on the first ``--train-subjects`` rows of an MNI phantom stack (version 2;
   ``dualglow-phantom STACK --mni-stack``), conditioned on age, sex and diagnosis, with the
   group level's own loop (:func:`dualglow_app.train.train`; covariates learnt by
   :meth:`PairedVolumes.covariate_specs`, stored in the model file).
2. On held-out rows (``--test-rows``, never seen in training): the diagnosis sweep CN / MCI /
   AD of each subject's own MRI at its own age and sex, through :func:`dualglow_app.inference.sweep`
   (the participant level's sweep), conditional mode (T = 0); AAL2 regional means on the
   model grid; the AD / CN - 1 margin per region and subject.
3. The phantom's own margins for the same subjects: the same subject simulated as CN and as AD
   (:func:`dualglow_app.phantom.mni.simulate_subject` with the diagnosis overridden: its
   metabolism AND its AD atrophy change), in the same regions; and the designed margins
   (docs/DESIGN.md: precuneus -19 %, posterior cingulate -21 %, Bailly 2015, measured after the
   8 mm PSF on the phantom's own Desikan-Killiany regions).
4. The age sweep 65 -> 85 of the same subjects (whole brain and the same regions), next to the
   truth of the phantom's fixed-anatomy ageing (:func:`dualglow_app.phantom.mni.age_sweep_truth`).

Prints a table and writes JSON (``--out``). CPU, 1 thread::

    nice -n 19 python benchmarks/bench_covariates.py --stack /work/runs/stack400_v2 \\
        --train-subjects 120 --test-rows 300:340 --epochs 40 --patience 10 --work /tmp/cov21
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

REGIONS = {"precuneus": ("Precuneus_L", "Precuneus_R"), "posterior cingulate": ("Cingulate_Post_L", "Cingulate_Post_R")}
DESIGNED = {"precuneus": -0.19, "posterior cingulate": -0.21}
SIDE_INFO = ("age", "sex", "diagnosis")


def _rows(text: str) -> np.ndarray:
    start, stop = (int(v) for v in text.split(":"))
    return np.arange(start, stop)


def _region_means(volumes: np.ndarray, atlas: Any, masks: np.ndarray) -> dict[str, np.ndarray]:
    from dualglow_app.regions import regional_mean_matrix

    names = {name: label for label, name in atlas.names.items()}
    out = {}
    for region, parts in REGIONS.items():
        table = regional_mean_matrix(volumes, atlas.labels, [names[p] for p in parts], masks=masks)
        out[region] = np.nanmean(table, axis=1)
    brain = np.array([v[m > 0].mean() for v, m in zip(volumes, masks, strict=True)])
    out["whole brain"] = brain
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", type=Path, required=True)
    parser.add_argument("--train-subjects", type=int, default=120)
    parser.add_argument("--test-rows", default="300:340")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None, help="score this model file instead of training one")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/covariates_diagnosis_sweep.json"))
    args = parser.parse_args()

    import torch

    from dualglow_app.dataset import load_mni_stack
    from dualglow_app.inference import sweep
    from dualglow_app.log import setup_logging
    from dualglow_app.options import TrainOptions
    from dualglow_app.phantom import mni
    from dualglow_app.phantom.cohort import subject_index
    from dualglow_app.regions import atlas_on_model_grid
    from dualglow_app.train import train
    from dualglow_app.weights import open_model

    setup_logging(0)
    torch.set_num_threads(args.threads)
    stack = load_mni_stack(args.stack)
    index = json.loads((args.stack / "index.json").read_text())
    test_rows = _rows(args.test_rows)
    train_rows = np.arange(args.train_subjects)
    if set(test_rows) & set(train_rows):
        raise SystemExit("--test-rows overlap the training rows")
    start = time.perf_counter()
    # The code that trains is the code at the start (another commit may land while it runs).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "dualglow_app"], capture_output=True,
                                text=True).stdout.strip())  # fmt: skip
    if args.model is None:
        data = stack.subset(train_rows)
        options = TrainOptions(
            bids_dir=args.stack, output_dir=args.work / "out", work_dir=args.work / "work", grid="cpu4mm",
            depth=args.depth, hidden=args.hidden, lr=args.lr, epochs=args.epochs, patience=args.patience,
            side_info=SIDE_INFO, skip_bids_validation=True, report=False, nprocs=args.threads, seed=0,
            model_name="covariates",
        )  # fmt: skip
        result = train(options, data=data)
        model_path = result.model_path
        training = {"epochs": result.epochs, "selected_epoch": result.selected_epoch, "final": result.final_metrics,
                    "wall_s": round(result.wall_time_s)}  # fmt: skip
    else:
        model_path, training = args.model, {}
    loaded = open_model(model_path)
    specs = loaded.covariates
    levels = list(specs["diagnosis"].levels)
    atlas = atlas_on_model_grid(loaded.grid)

    model_rows: dict[str, list[np.ndarray]] = {}
    truth_rows: dict[str, list[np.ndarray]] = {}
    age_model, age_truth = [], []
    for row in test_rows.tolist():
        t1w, mask = np.asarray(stack.mri[row], np.float32), np.asarray(stack.mask[row])
        own = {"age": float(stack.age[row]), "sex": specs["sex"].encode(stack.covariates["sex"][row]),
               "diagnosis": specs["diagnosis"].encode(stack.diagnosis[row])}  # fmt: skip
        by_level = sweep(loaded.model, loaded.scaling, t1w, mask, own, "diagnosis",
                         [specs["diagnosis"].encode(level) for level in levels])  # fmt: skip
        for level, prediction in zip(levels, by_level, strict=True):
            model_rows.setdefault(level, []).append(prediction.mean)
        index_in_cohort = subject_index(stack.labels[row])
        for level in ("CN", "AD"):
            subject = mni.simulate_subject(int(index["seed"]), index_in_cohort, stack.grid, int(index["version"]),
                                           diagnosis=level)  # fmt: skip
            truth_rows.setdefault(level, []).append(subject.pet)
        ages = sweep(loaded.model, loaded.scaling, t1w, mask, own, "age", [65.0, 85.0])
        age_model.append([p.mean for p in ages])
        age_truth.append(mni.age_sweep_truth(int(index["seed"]), index_in_cohort, stack.grid, [65.0, 85.0],
                                             int(index["version"])))  # fmt: skip
    masks = np.asarray(stack.mask[test_rows])
    model_means = {level: _region_means(np.stack(v), atlas, masks) for level, v in model_rows.items()}
    truth_means = {level: _region_means(np.stack(v), atlas, masks) for level, v in truth_rows.items()}
    age_model_means = [_region_means(np.stack([a[k] for a in age_model]), atlas, masks) for k in range(2)]
    age_truth_means = [_region_means(np.stack([a[k] for a in age_truth]), atlas, masks) for k in range(2)]

    def margin(means: dict[str, dict[str, np.ndarray]], region: str, level: str = "AD") -> dict[str, float]:
        ratio = means[level][region] / means["CN"][region] - 1.0
        return {"mean": float(ratio.mean()), "sd": float(ratio.std(ddof=1)), "lower_in": float((ratio < 0).mean())}

    rows = []
    for region in (*REGIONS, "whole brain"):
        age_m = age_model_means[1][region] / age_model_means[0][region] - 1.0
        age_t = age_truth_means[1][region] / age_truth_means[0][region] - 1.0
        rows.append({
            "region": region, "model_AD_vs_CN": margin(model_means, region),
            "model_MCI_vs_CN": margin(model_means, region, "MCI") if "MCI" in model_means else None,
            "phantom_AD_vs_CN": margin(truth_means, region), "designed_AD_vs_CN": DESIGNED.get(region),
            "model_age85_vs_65": float(age_m.mean()), "phantom_age85_vs_65": float(age_t.mean()),
        })  # fmt: skip
    summary = {
        "command": "python benchmarks/bench_covariates.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "commit": commit + ("-dirty" if dirty else ""), "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "train_subjects": int(len(train_rows)), "test_rows": args.test_rows, "test_subjects": int(len(test_rows)),
        "test_diagnoses": {d: int(sum(stack.diagnosis[r] == d for r in test_rows.tolist())) for d in levels},
        "covariates": {name: spec.summary() for name, spec in specs.items()}, "training": training,
        "model": str(model_path), "wall_s": round(time.perf_counter() - start),
        "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'region':22s} {'model AD/CN-1':>16s} {'phantom AD/CN-1':>16s} {'designed':>9s} {'model MCI/CN-1':>15s} "
          f"{'age 85/65-1 model':>18s} {'truth':>7s}")  # fmt: skip
    for r in rows:
        m, t = r["model_AD_vs_CN"], r["phantom_AD_vs_CN"]
        designed = "" if r["designed_AD_vs_CN"] is None else f"{100 * r['designed_AD_vs_CN']:.0f} %"
        mci = "" if r["model_MCI_vs_CN"] is None else f"{100 * r['model_MCI_vs_CN']['mean']:+.1f} %"
        print(f"{r['region']:22s} {100 * m['mean']:+7.1f} +- {100 * m['sd']:4.1f} % {100 * t['mean']:+7.1f} +- "
              f"{100 * t['sd']:4.1f} % {designed:>9s} {mci:>15s} {100 * r['model_age85_vs_65']:+17.1f} % "
              f"{100 * r['phantom_age85_vs_65']:+6.1f} %")  # fmt: skip
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
