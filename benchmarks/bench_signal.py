"""Is there a subject-specific signal for a model to learn? Measured on the data alone, no model.

On a stacked paired dataset (a BIDS cohort through the group level's own preprocessing, or a
phantom MNI stack written by ``dualglow-phantom --mni-stack``) this prints and writes as JSON:

- how alike the subjects are after preprocessing: mean pairwise Pearson r of the T1w and of
  the true PET inside the brain (docs/DESIGN.md: two real brains correlate ~0.87 after
  preprocessing; a fair phantom lands near ~0.85-0.93, not near 1);
- Table 2's reference rows on the evaluation's folds: impaired vs not from AAL2 regional means
  of the true PET, of the T1w plus the age (the ceiling of anything computed from the MRI
  and age) and of the age alone, next to the majority class;
- for a stack with an explainable truth (phantom version 2), how much of the between-subject
  PET variation it carries: 1 - var(PET - explainable) / var(PET - mean PET), in the brain.

    python benchmarks/bench_signal.py --bids phantom60 -w work --json benchmarks/results/signal_phantom60.json
    python benchmarks/bench_signal.py --mni-stack stack_v2 --json benchmarks/results/signal_stack_v2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def load(args: argparse.Namespace) -> Any:
    from dualglow_app import dataset
    from dualglow_app.grid import resolve_grid

    if args.mni_stack is not None:
        return dataset.load_mni_stack(args.mni_stack)  # type: ignore[attr-defined]
    spec = dataset.DatasetSpec(args.bids, args.work_dir, resolve_grid(args.grid), side_info=("age",), nprocs=args.nprocs)
    return dataset.prepare_dataset(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bids", type=Path, help="a paired BIDS cohort (preprocessed through the work dir)")
    source.add_argument("--mni-stack", type=Path, help="a phantom MNI stack (skips preprocessing)")
    parser.add_argument("-w", "--work-dir", type=Path, default=Path("work"))
    parser.add_argument("--grid", default="cpu4mm")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprocs", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from dualglow_app.evaluate import aal_regions, classification, impairment_classes, make_splits
    from dualglow_app.log import setup_logging
    from dualglow_app.metrics import mean_pairwise_correlation

    setup_logging(-1)
    data = load(args)
    masks = np.asarray(data.mask) > 0
    pet, mri = np.asarray(data.pet, np.float64), np.asarray(data.mri, np.float64)
    alike = {"t1w": mean_pairwise_correlation(mri, masks), "pet": mean_pairwise_correlation(pet, masks)}

    atlas = aal_regions(data.grid)
    age = np.asarray(data.age, np.float64)[:, None]
    splits = make_splits(data.subjects, args.folds, args.seed, impairment_classes(data.diagnosis))
    features = {"true PET": atlas.means(pet, masks), "MRI (T1w regional means) + age": np.hstack([atlas.means(mri, masks), age]),
                "age alone": age}  # fmt: skip
    table2 = classification({k: [v] * len(splits) for k, v in features.items()}, data.diagnosis, splits, args.seed)
    classes = impairment_classes(data.diagnosis)
    known = classes[classes >= 0]
    majority = float(max(np.mean(known == 0), np.mean(known == 1))) if known.size else float("nan")

    explained = None
    explainable = getattr(data, "explainable", None)
    if explainable is not None:
        mean_pet = pet.mean(axis=0)
        residual = (pet - np.asarray(explainable, np.float64))[:, masks.all(axis=0)]
        spread = (pet - mean_pet)[:, masks.all(axis=0)]
        explained = float(1.0 - residual.var() / spread.var())

    result = {
        "cpu": cpu_name(), "scans": len(data), "subjects": len(set(data.subjects)), "grid": data.grid.to_dict(),
        "pairwise_r": alike, "majority_class": majority, "table2": table2, "explainable_share": explained,
        "command": "python benchmarks/bench_signal.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
    }  # fmt: skip
    print(f"{result['scans']} scans of {result['subjects']} subjects on {data.grid.voxel_size} mm {data.grid.shape}; "
          f"CPU {result['cpu']}")  # fmt: skip
    print(f"mean pairwise r after preprocessing: T1w {alike['t1w']:.3f}, true PET {alike['pet']:.3f}")
    if "skipped" in table2:
        print(f"Table 2 skipped: {table2['skipped']}")
    else:
        print(f"impaired vs not, {args.folds} folds ({table2['counts']}; majority class {majority:.3f}):")
        for name, row in table2["sources"].items():
            print(f"  {name:<34} accuracy {row['accuracy']:.3f}  FNR {row['fnr']:.3f}  FPR {row['fpr']:.3f}")
    if explained is not None:
        print(f"share of between-subject PET variance the explainable truth carries: {explained:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
