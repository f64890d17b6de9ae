"""Does the MRI carry information about the PET? The group level's quality check.

    python benchmarks/bench_mri_information.py --bids phantom60 --work WORK --subjects 16

Trains the same DUAL-GLOW twice on the first N paired subjects of a (phantom) BIDS dataset,
once with the MRI and once with the MRI zeroed (``TrainOptions(mri_input=False)``, the CLI's
hidden ``--ablate-mri``: the same architecture as an unconditional PET model), on the same
split, seed and budget. Then scores every validation scan under both: -log p(PET | MRI) in
bits per voxel (eq. 12's PET term) and the T = 0 mode's MAE / PSNR / SSIM. The MRI carries
information when the conditional model's validation bpd is lower *for every validation scan*,
not only on average (epoch-to-epoch noise of a small run is a few hundredths of a bit).

Preprocessing goes through the group level's cache (``WORK/train-data``), so a warm work dir
makes this a training-only benchmark. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualglow_app.bids import find_scans  # noqa: E402
from dualglow_app.data import IntensityScaling  # noqa: E402
from dualglow_app.dataset import prepare_dataset, split_subjects  # noqa: E402
from dualglow_app.log import get_logger, setup_logging  # noqa: E402
from dualglow_app.options import TrainOptions  # noqa: E402
from dualglow_app.train import train  # noqa: E402
from dualglow_app.validation import score_scan  # noqa: E402

LOG = get_logger("dualglow.bench")
RUNS = {"with MRI": True, "MRI zeroed": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bids", type=Path, required=True, help="paired BIDS dataset (a phantom cohort)")
    parser.add_argument("--work", type=Path, required=True, help="work dir (preprocessing cache, checkpoints)")
    parser.add_argument("--subjects", type=int, default=16, help="the first N paired subjects")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--grid", default="cpu4mm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench_mri_information.json"))
    args = parser.parse_args()
    setup_logging(0)

    labels = sorted({scan.subject for scan in find_scans(args.bids, require_pet=True)})[: args.subjects]
    results: dict[str, dict] = {}
    for name, mri_input in RUNS.items():
        options = TrainOptions(
            args.bids, args.work / "mri-information" / ("with-mri" if mri_input else "mri-zeroed"),
            work_dir=args.work, participant_labels=labels, grid=args.grid, depth=args.depth,
            hidden=args.hidden, epochs=args.epochs, lr=args.lr, val_fraction=args.val_fraction,
            seed=args.seed, nprocs=args.threads, device="cpu", mri_input=mri_input, resume=True,
            model_name=f"mri-information-{'with' if mri_input else 'zeroed'}-s{args.subjects}",
            report=False, skip_bids_validation=True, keep="last",  # no selection on the scored scans
        )  # fmt: skip
        data = prepare_dataset(options.dataset_spec)
        start = time.perf_counter()
        result = train(options, data=data)
        _, val_rows = split_subjects(data.subjects, options.val_fraction, options.seed)
        last = result.history[-10:]
        results[name] = {
            # The group level's own per-scan validation scoring (mri_input=False zeroes the MRI).
            "scans": [{"label": data.labels[r], **score_scan(result.model.eval(), data, int(r), IntensityScaling(),
                                                              options.side_info, options.mri_input)}
                      for r in val_rows],  # fmt: skip
            "val_bpd_last10_mean": float(np.mean([h["val_bpd_pet_given_mri"] for h in last])),
            "val_bpd_history": [h["val_bpd_pet_given_mri"] for h in result.history],
            "train_seconds": time.perf_counter() - start,
            "n_train": len(result.train_labels), "n_val": len(result.val_labels),
        }  # fmt: skip

    cond, uncond = (results[name]["scans"] for name in RUNS)
    gaps = [u["bpd_pet_given_mri"] - c["bpd_pet_given_mri"] for c, u in zip(cond, uncond, strict=True)]
    voxels = int(np.prod(data.grid.shape))
    summary = {
        "command": " ".join(sys.argv),
        "config": vars(args) | {"bids": str(args.bids), "work": str(args.work), "out": str(args.out)},
        "runs": results,
        "bpd_gap_per_scan": gaps,
        "bpd_gap_mean": float(np.mean(gaps)),
        "bits_per_scan_gap_mean": float(np.mean(gaps)) * voxels,
        "scans_where_mri_helps": int(sum(g > 0 for g in gaps)),
        # Robust to epoch-to-epoch noise: is every one of the last 10 epochs' validation bpd
        # with the MRI below every one without it?
        "last10_with_mri_max": max(results["with MRI"]["val_bpd_history"][-10:]),
        "last10_mri_zeroed_min": min(results["MRI zeroed"]["val_bpd_history"][-10:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")

    header = f"{'run':12s} {'val bpd':>9s} {'last-10':>9s} {'MAE':>8s} {'PSNR':>7s} {'SSIM':>7s} {'train s':>8s}"
    print(header)
    for name in RUNS:
        scans = results[name]["scans"]
        mean = {k: float(np.mean([s[k] for s in scans])) for k in ("bpd_pet_given_mri", "mae_suvr", "psnr_db", "ssim")}
        print(f"{name:12s} {mean['bpd_pet_given_mri']:9.4f} {results[name]['val_bpd_last10_mean']:9.4f} "
              f"{mean['mae_suvr']:8.4f} {mean['psnr_db']:7.2f} {mean['ssim']:7.4f} {results[name]['train_seconds']:8.0f}")  # fmt: skip
    print(f"bpd gap (zeroed - with MRI): {summary['bpd_gap_mean']:.4f} bits/voxel = "
          f"{summary['bits_per_scan_gap_mean']:.0f} bits per scan; MRI helps on "
          f"{summary['scans_where_mri_helps']}/{len(gaps)} validation scans")  # fmt: skip
    print(f"last 10 epochs: validation bpd with MRI <= {summary['last10_with_mri_max']:.4f}, "
          f"MRI zeroed >= {summary['last10_mri_zeroed_min']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
