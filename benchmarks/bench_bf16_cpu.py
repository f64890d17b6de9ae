"""Does bf16 autocast on the CPU train as well as float32? Validation bpd curves, same seeds.

    python benchmarks/bench_bf16_cpu.py                      # 40 phantoms, 8 epochs, seeds 0 1
    python benchmarks/bench_bf16_cpu.py --epochs 4 --seeds 0

The group level (``dualglow_app.train.train``) with the model issue's configuration (cpu4mm,
levels 3, depth 4, hidden 32, top prior mri+side, side template, age), on an MNI-stack of
phantoms (made on the grid directly, ~15 s), once in float32 and once under bf16 autocast,
per seed. Under autocast the coupling and relation networks run in bf16 while the flow
arithmetic, logdet and likelihood stay float32 (flows.py). bf16 is the group level's own
``--cpu-bf16`` (``TrainOptions.cpu_bf16``, the only change), so the comparison is its loop. The spread between seeds
in float32 is the noise the bf16 difference is judged against. Needs a CPU with native bf16
(AVX512-BF16 or AMX); elsewhere oneDNN emulates bf16 and it is slower than float32.

Prints a table (validation bpd(PET | MRI) per epoch and mean step time per run) and writes
benchmarks/results/bf16_cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import perfkit
import torch

from dualglow_app import train as train_module
from dualglow_app.dataset import load_mni_stack
from dualglow_app.grid import preset
from dualglow_app.log import setup_logging
from dualglow_app.options import TrainOptions
from dualglow_app.phantom import make_mni_stack
from dualglow_app.runtime import native_bf16


def run(data: Any, root: Path, seed: int, bf16: bool, epochs: int) -> dict[str, Any]:
    """One group-level training; ``bf16``: ``--cpu-bf16`` (TrainOptions.cpu_bf16)."""
    name = f"{'bf16' if bf16 else 'fp32'}-seed{seed}"
    options = TrainOptions(
        bids_dir=root / "bids", output_dir=root / name, work_dir=root / f"work-{name}", grid="cpu4mm",
        levels=3, depth=4, hidden=32, top_prior="mri+side", side_template=True, side_info=["age"],
        epochs=epochs, batch_size=2, seed=seed, device="cpu", cpu_bf16=bf16, report=False,
        skip_bids_validation=True, nprocs=1, keep="last",
    )
    result = train_module.train(options, data=data)
    val = [row["val_bpd_pet_given_mri"] for row in result.history]
    return {"run": name, "seed": seed, "bf16": bf16, "device": result.device, "val_bpd": val,
            "final_val_bpd": val[-1], "best_val_bpd": min(val), "steps": result.steps,
            "seconds_per_step": result.wall_time_s / max(result.steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    perfkit.add_device_options(parser)
    args = parser.parse_args()
    perfkit.start(args)
    setup_logging(-1)
    if not native_bf16(torch.device("cpu")):
        parser.exit(1, "this CPU has no native bf16 (AVX512-BF16 or AMX): nothing to compare\n")
    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as tmp:
        root = Path(tmp)
        data = load_mni_stack(make_mni_stack(root / "stack", args.subjects, seed=0, grid=preset("cpu4mm")))
        rows = [run(data, root, seed, bf16, args.epochs) for seed in args.seeds for bf16 in (False, True)]
    fp32 = [r["final_val_bpd"] for r in rows if not r["bf16"]]
    diffs = [b["final_val_bpd"] - f["final_val_bpd"] for f, b in zip(rows[::2], rows[1::2], strict=True)]
    print(f"validation bpd(PET | MRI) per epoch; {args.subjects} phantoms, cpu4mm, levels 3, depth 4, "
          f"hidden 32, batch 2, {args.threads} thread(s), {perfkit.machine()['cpu']}")
    perfkit.print_table(
        ["run", *[f"epoch {i + 1}" for i in range(args.epochs)], "s / step"],
        [[r["run"], *r["val_bpd"], r["seconds_per_step"]] for r in rows],
    )
    spread = max(fp32) - min(fp32) if len(fp32) > 1 else float("nan")
    print(f"final bf16 - fp32 (same seed): {[round(d, 4) for d in diffs]}; "
          f"fp32 spread between seeds: {spread:.4f}; "
          f"step time bf16 / fp32: {statistics.median(r['seconds_per_step'] for r in rows if r['bf16']) / statistics.median(r['seconds_per_step'] for r in rows if not r['bf16']):.2f}")
    path = perfkit.write_json("bf16_cpu.json", {"subjects": args.subjects, "epochs": args.epochs, "rows": rows,
                                                "bf16_minus_fp32": diffs, "fp32_seed_spread": spread},
                              results=args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
