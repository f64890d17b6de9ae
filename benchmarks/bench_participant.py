"""End-to-end wall time of the participant level per subject, split into preprocessing and
synthesis (goal, issue 6: under 90 s per subject on 2 CPU cores with the default model).

    python benchmarks/bench_participant.py                       # 3 phantom subjects (1 mm)
    python benchmarks/bench_participant.py --weights models/x    # a trained model
    python benchmarks/bench_participant.py --samples 10 --temperature 0.7
    python benchmarks/bench_participant.py --subjects 2 --profile   # where the time goes

``--profile`` runs the participant level under cProfile and reports, per subject, the
cumulative seconds of its named stages (skull strip, N4, SyN, resampling, PET coregistration,
sampling, writing NIfTIs, the report); the rest is "other". It then runs the same command
again on the filled output folder: the cost of a subject whose outputs exist (cached path).

Without ``--weights`` the model has the group level's default architecture (cpu4mm grid,
3 levels x 8 steps, 128 coupling channels, relation nets 64, age) with its ActNorms
initialised on data: the cost of synthesis depends on the architecture, not on the values
of the weights, so the timing holds for the default model until one ships. Every subject is
preprocessed from scratch (fresh work directory). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualglow_app.log import get_logger, setup_logging  # noqa: E402
from dualglow_app.options import ParticipantOptions  # noqa: E402
from dualglow_app.synthesize import run_participant  # noqa: E402

LOG = get_logger("dualglow.bench")

# Stage -> (file suffix, function name) whose cumulative cProfile time is the stage's; none
# is nested in another (N4 and skull strip are taken out of _register_t1w's).
STAGES = {
    "skull strip (deepbet)": ("dualglow_app/preprocess.py", "skull_strip"),
    "N4": ("ants/ops/bias_correction.py", "n4_bias_field_correction"),
    # _register_t1w less the two above: SyN (and writing the native brain).
    "T1w registration": ("dualglow_app/preprocess.py", "_register_t1w"),
    "resampling (apply_transforms)": ("ants/registration/apply_transforms.py", "apply_transforms"),
    "PET preprocessing": ("dualglow_app/preprocess.py", "preprocess_pet"),
    "sampling (model)": ("dualglow_app/synthesize.py", "synthesize"),
    "writing NIfTI": ("nibabel/loadsave.py", "save"),
    "report": ("dualglow_app/participant_report.py", "write_subject_report"),
    "model load": ("dualglow_app/weights.py", "load_model"),
}


def stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of each of :data:`STAGES` in ``profile``."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    out = dict.fromkeys(STAGES, 0.0)
    for (filename, _, name), (_, _, _, cumulative, _) in stats.items():
        for stage, (suffix, function) in STAGES.items():
            if name == function and filename.endswith(suffix):
                out[stage] += cumulative
    out["T1w registration"] -= out["skull strip (deepbet)"] + out["N4"]
    return out


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def default_architecture_model(path: Path) -> Path:
    """The group level's default DualGlow on cpu4mm, ActNorms initialised by one forward."""
    import torch

    from dualglow_app.data import IntensityScaling
    from dualglow_app.grid import preset
    from dualglow_app.model import AGE_SCALING, DualGlow, DualGlowConfig
    from dualglow_app.weights import save_model

    grid = preset("cpu4mm")
    config = DualGlowConfig(ndim=3, levels=grid.levels, depth=8, hidden=128, relation_hidden=64,
                            continuous={"age": AGE_SCALING})
    torch.manual_seed(0)
    model = DualGlow(config).train()
    x = torch.rand(2, 1, *grid.shape)
    with torch.no_grad():
        model.nll(x, x * 0.5, {"age": torch.tensor([65.0, 75.0])})
    metadata = {"grid": grid.to_dict(), "intensity": IntensityScaling().to_dict(), "side_info": ["age"],
                "demonstration": True, "training": {"note": "benchmark: default architecture, untrained"}}
    return save_model(model.eval(), path, metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", type=Path, help="BIDS dataset (default: a new phantom cohort)")
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--weights", help="model (default: the default architecture, see above)")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--age-sweep", type=float, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/participant.json"))
    parser.add_argument("--profile", action="store_true", help="stage breakdown and the cached path (see above)")
    args = parser.parse_args()
    setup_logging(-1)
    os.environ.setdefault("DUALGLOW_NO_PROGRESS", "1")

    with tempfile.TemporaryDirectory(prefix="bench-participant-") as tmp:
        root = Path(tmp)
        bids = args.bids
        if bids is None:
            from dualglow_app.phantom import make_cohort

            bids = root / "bids"
            make_cohort(bids, n_subjects=args.subjects, seed=0, sessions=1, voxel_mm=1.0)
        weights = args.weights or default_architecture_model(root / "models" / "default-architecture")
        options = ParticipantOptions(
            bids, root / "out", weights=weights, work_dir=root / "work", nprocs=args.nprocs,
            samples=args.samples, temperature=args.temperature, age_sweep=args.age_sweep,
            skip_bids_validation=True,
        )
        profile = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        summary = run_participant(options)
        if profile is not None:
            profile.disable()
        total = time.perf_counter() - start
        cached_s = None
        if profile is not None:
            start = time.perf_counter()
            again = run_participant(options)
            cached_s = time.perf_counter() - start
            assert len(again.skipped) == len(summary.processed), "the second run must skip every scan"

    rows = []
    for outcome in summary.outcomes:
        t = outcome.timings
        rows.append({"scan": outcome.label, "status": outcome.status, "preprocess_s": round(t.get("preprocess", 0), 1),
                     "synthesis_s": round(t.get("synthesis", 0), 1), "sample_s": round(t.get("sample", 0), 2),
                     "total_s": round(t.get("preprocess", 0) + t.get("synthesis", 0), 1)})
    done = [r for r in rows if r["status"] == "processed"]
    mean = {k: round(sum(r[k] for r in done) / max(len(done), 1), 1) for k in ("preprocess_s", "synthesis_s", "total_s")}
    header = f"{'scan':<16}{'preprocess s':>14}{'synthesis s':>13}{'(sampling s)':>14}{'total s':>10}"
    lines = [header, "-" * len(header)]
    lines += [f"{r['scan']:<16}{r['preprocess_s']:>14}{r['synthesis_s']:>13}{r['sample_s']:>14}{r['total_s']:>10}" for r in rows]
    lines.append(f"{'mean':<16}{mean['preprocess_s']:>14}{mean['synthesis_s']:>13}{'':>14}{mean['total_s']:>10}")
    lines.append(f"run wall time {total:.1f} s for {len(rows)} scan(s) (includes model load, reports); goal < 20 s/subject")
    stages: dict[str, float] = {}
    if profile is not None:
        stages = stage_seconds(profile)
        stages["other"] = total - sum(stages.values())
        n = max(len(rows), 1)
        lines += ["", f"{'stage (cProfile, cumulative)':<32}{'s / subject':>12}{'share':>8}"]
        lines += [f"{k:<32}{v / n:>12.2f}{v / total:>8.0%}" for k, v in stages.items()]
        lines.append(f"second run, every output there (cached path): {cached_s:.2f} s for {n} scan(s), goal < 3 s/subject")
    sys.stdout.write("\n".join(lines) + "\n")
    result = {
        "machine": {"cpu": _cpu_name(), "cores_used": args.nprocs,
                    "python": platform.python_version(),
                    # other work on the machine slows ANTs down; record how busy it was
                    "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"samples": args.samples, "temperature": args.temperature, "age_sweep": args.age_sweep,
                     "weights": str(args.weights or "default architecture (untrained), cpu4mm")},
        "scans": rows, "mean": mean, "run_wall_s": round(total, 1), "goal_s_per_subject": 20,
        "stage_seconds_total": {k: round(v, 2) for k, v in stages.items()},
        "cached_run_s": None if cached_s is None else round(cached_s, 2),
        "failed": [f"{o.label}: {o.reason}" for o in summary.failed],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
