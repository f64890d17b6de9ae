"""Time to find the scans of a large dataset: what a participant or group run costs before its first subject.

    python benchmarks/bench_indexing.py                    # 1,000 subjects, T1w + FDG-PET
    python benchmarks/bench_indexing.py --subjects 200 --sessions 2

Builds a BIDS layout of empty image files (indexing reads names, not voxels) with a
participants.tsv of ages, then times :func:`dualglow_app.bids.find_scans` without participant
labels: cold (pybids indexes the dataset and stores the index in the work dir) and warm (the
stored index is reused), and the sweep for a killed run's temporaries that every run starts
with, over a work dir holding a T1w and a PET cache entry per scan. Target (issue 20): < 10 s before the first subject for 1,000 subjects
(it was 52-62 s: three pybids queries and a re-read of participants.tsv per subject).
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perfkit import RESULTS, machine, print_table  # noqa: E402

from dualglow_app.bids import find_scans  # noqa: E402
from dualglow_app.io import remove_stale_work_temporaries  # noqa: E402

TARGET_S = 10.0


def build_layout(root: Path, subjects: int, sessions: int) -> None:
    """``subjects`` subjects (x ``sessions``) with an empty T1w and FDG-PET each, and their ages."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "indexing benchmark", "BIDSVersion": "1.10.0"}))
    rows = ["participant_id\tage\tsex"]
    for k in range(subjects):
        label = f"{k:04d}"
        for s in range(sessions):
            folder = root / f"sub-{label}" / (f"ses-{s + 1}" if sessions > 1 else "")
            prefix = f"sub-{label}" + (f"_ses-{s + 1}" if sessions > 1 else "")
            (folder / "anat").mkdir(parents=True)
            (folder / "pet").mkdir()
            (folder / "anat" / f"{prefix}_T1w.nii.gz").write_bytes(b"")
            (folder / "pet" / f"{prefix}_trc-FDG_pet.nii.gz").write_bytes(b"")
        rows.append(f"sub-{label}\t{55 + k % 35}\t{'FM'[k % 2]}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


def fill_cache(work: Path, scans: int) -> None:
    """What a work dir holds after a run: a T1w and a PET cache entry per scan (and their locks)."""
    for k in range(scans):
        for kind, files in (("t1w", 6), ("pet", 2)):
            entry = work / "cache" / f"{kind}-{k:016x}-0123456789"
            entry.mkdir(parents=True)
            (work / "cache" / f".{entry.name}.lock").write_bytes(b"")
            for f in range(files):
                (entry / f"file{f}").write_bytes(b"")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "indexing_1000.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root, work = Path(folder) / "bids", Path(folder) / "work"
        start = time.perf_counter()
        build_layout(root, args.subjects, args.sessions)
        built = time.perf_counter() - start
        timings: dict[str, float] = {}
        start = time.perf_counter()
        scans = find_scans(root, work_dir=work)
        timings["find_scans, cold (index built and stored)"] = time.perf_counter() - start
        start = time.perf_counter()
        again = find_scans(root, work_dir=work)
        timings["find_scans, warm (stored index)"] = time.perf_counter() - start
        fill_cache(work, args.subjects * args.sessions)
        start = time.perf_counter()
        remove_stale_work_temporaries(work)
        timings["sweep of the work dir (a cache entry per scan)"] = time.perf_counter() - start
    assert len(scans) == len(again) == args.subjects * args.sessions
    assert all(s.age is not None for s in scans)
    before_first = timings["find_scans, cold (index built and stored)"] + timings[
        "sweep of the work dir (a cache entry per scan)"
    ]
    rows = [[name, f"{seconds:.2f}"] for name, seconds in timings.items()]
    rows.append(["before the first subject (cold)", f"{before_first:.2f}"])
    print(f"{args.subjects} subjects x {args.sessions} session(s), T1w + FDG-PET, layout built in {built:.1f} s")
    print_table(["step", "seconds"], rows)
    print(f"target < {TARGET_S:g} s: {'met' if before_first < TARGET_S else 'MISSED'}")
    result = {
        "command": " ".join(["python benchmarks/bench_indexing.py", *sys.argv[1:]]),
        "subjects": args.subjects, "sessions": args.sessions, "scans": len(scans),
        "seconds": timings, "before_first_subject_s": before_first, "target_s": TARGET_S, "machine": machine(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
