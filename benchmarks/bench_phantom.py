"""Time ``make_cohort``: the issue asks for 20 subjects in under 2 minutes on 2 cores.

    python benchmarks/bench_phantom.py --subjects 20 --jobs 2 --json bench_phantom.json

Prints a table (subjects, seconds, s/subject) and writes it as JSON. The time includes the
one-off template preparation and PET calibration, as a user running the CLI would see it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualglow_app import __version__  # noqa: E402
from dualglow_app.log import setup_logging  # noqa: E402
from dualglow_app.phantom import (  # noqa: E402
    cohort,
    make_cohort,  # noqa: E402
    pet,
    template,
)


def clear_caches() -> None:
    """Each row pays the template preparation and calibration, like a fresh CLI run."""
    for cached in (template.load_template, pet.region_maps, pet.calibrate, cohort._head_shell):
        cached.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[20])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--voxel-mm", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=Path("bench_phantom.json"))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    setup_logging(-1)
    rows = []
    for n in args.subjects:
        clear_caches()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            make_cohort(Path(tmp) / "bids", n, seed=0, sessions=args.sessions, jobs=args.jobs, voxel_mm=args.voxel_mm)
            seconds = time.perf_counter() - start
        rows.append({"subjects": n, "sessions": args.sessions, "seconds": round(seconds, 1),
                     "s_per_subject": round(seconds / n, 2)})
    header = f"{'subjects':>8} {'sessions':>8} {'seconds':>8} {'s/subject':>9}"
    lines = [header] + [f"{r['subjects']:>8} {r['sessions']:>8} {r['seconds']:>8.1f} {r['s_per_subject']:>9.2f}" for r in rows]
    lines.append(f"(load average before: {load:.2f} on {os.cpu_count()} cores; other processes slow it down)")
    sys.stdout.write("\n".join(lines) + "\n")
    result = {"benchmark": "phantom", "version": __version__, "cpus": os.cpu_count(), "jobs": args.jobs,
              "voxel_mm": args.voxel_mm, "python": platform.python_version(), "load_average_before": round(load, 2), "rows": rows}
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
