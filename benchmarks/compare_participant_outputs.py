"""Participant derivatives of two checkouts, file by file: a refactor must not change them.

Builds (once) a 3-subject phantom (2 mm) and a tiny age-conditioned model in SHARED, runs the
participant level of the checkout on PYTHONPATH with 3 samples at T = 0.7, an age sweep and
both output spaces, and writes the sha256 of every output to OUT/hashes.json. Run it for the
old checkout, then the new one, with the same SHARED and work dir (ANTs registration is not
run-to-run reproducible, so a shared preprocessing cache is what makes outputs comparable),
and compare::

    git worktree add /tmp/old 92b201d
    PYTHONPATH=/tmp/old python benchmarks/compare_participant_outputs.py /tmp/old /tmp/cmp/old /tmp/cmp/shared
    PYTHONPATH=$PWD python benchmarks/compare_participant_outputs.py $PWD /tmp/cmp/new /tmp/cmp/shared \\
        --compare /tmp/cmp/old/hashes.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="the repository whose tests/ helpers build the model")
    parser.add_argument("out", type=Path)
    parser.add_argument("shared", type=Path, help="cohort, model and preprocessing cache (reused)")
    parser.add_argument("--compare", type=Path, help="hashes.json of another checkout")
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout / "tests"))
    from participant_data import build_cohort, make_model, participant_ages

    from dualglow_app.grid import preset

    try:
        from dualglow_app.options import ParticipantOptions  # type: ignore[attr-defined]
    except ImportError:  # checkouts before the architecture change
        from dualglow_app.synthesize import ParticipantOptions  # type: ignore[attr-defined,no-redef]
    from dualglow_app.synthesize import run_participant

    bids, work, grid = args.shared / "bids", args.shared / "work", preset("tiny8mm")
    if not bids.exists():
        build_cohort(bids, n_subjects=2, seed=3)
    model = args.shared / "model" / "tiny.safetensors"
    if not model.exists():
        from dualglow_app.preprocess import preprocess_t1w

        t1w = [np.asarray(preprocess_t1w(bids / f"sub-00{i}" / "anat" / f"sub-00{i}_T1w.nii.gz", grid, work, 2)
                          .image.dataobj, dtype=np.float32) for i in (1, 2)]  # fmt: skip
        ages = participant_ages(bids)
        make_model(args.shared / "model" / "tiny", grid, t1w, [ages["001"], ages["002"]], steps=10)
    options = ParticipantOptions(bids, args.out / "out", weights=model, work_dir=work, samples=3, temperature=0.7,
                                 age_sweep=(60, 80), output_spaces=("MNI152NLin2009cAsym", "T1w"),
                                 skip_bids_validation=True, report=False, nprocs=2)  # fmt: skip
    print(run_participant(options).describe())
    hashes = {str(p.relative_to(args.out / "out")): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted((args.out / "out").rglob("*")) if p.is_file() and "logs" not in p.parts}  # fmt: skip
    (args.out / "hashes.json").write_text(json.dumps(hashes, indent=1))
    print(f"{len(hashes)} files -> {args.out / 'hashes.json'}")
    if args.compare:
        other = json.loads(args.compare.read_text())
        differ = sorted(k for k in set(hashes) | set(other) if hashes.get(k) != other.get(k))
        print(f"identical: {len(hashes) - len(differ)}/{len(hashes)}; differ: {differ or 'none'}")


if __name__ == "__main__":
    main()
