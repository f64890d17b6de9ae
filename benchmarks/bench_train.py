"""Training throughput (subjects/s) and peak memory of the group level on this machine.

    python benchmarks/bench_train.py                           # default configuration, CPU
    python benchmarks/bench_train.py --device cuda --grid paper2mm
    python benchmarks/bench_train.py --depth 4 --hidden 32     # a small model

Runs :func:`dualglow_app.train.train` (the real loop: AdaMax, clipping, NaN guard,
checkpoints) on synthetic paired volumes on the model grid, so preprocessing is not timed.
Throughput is training subjects per second over the last epoch (the first pays for the
ActNorm init and allocator warm-up); validation is off. Peak memory is the process's maximum
resident set (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA). Prints a table and writes
JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic_pairs import paired_volumes  # noqa: E402

from dualglow_app.log import get_logger, setup_logging  # noqa: E402
from dualglow_app.options import TrainOptions  # noqa: E402
from dualglow_app.train import train  # noqa: E402

LOG = get_logger("dualglow.bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainOptions("bids", "out")
    parser.add_argument("--grid", default=defaults.grid)
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--subjects", type=int, default=8, help="training subjects per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench_train.json"))
    args = parser.parse_args()
    setup_logging(-1)

    import torch

    with tempfile.TemporaryDirectory() as folder:
        options = TrainOptions(
            Path(folder) / "bids", Path(folder) / "out", work_dir=Path(folder) / "work",
            grid=args.grid, depth=args.depth, hidden=args.hidden, batch_size=args.batch_size,
            epochs=args.epochs, val_fraction=0.0, device=args.device, nprocs=args.threads,
            skip_bids_validation=True, report=False,
        )  # fmt: skip
        grid = options.model_grid
        data = paired_volumes(args.subjects, shape=grid.shape)
        data.grid = grid
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        result = train(options, data=data)
    last = result.history[-1]
    cuda = result.device.startswith("cuda")
    peak_mb = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    parameters = sum(p.numel() for p in result.model.parameters())
    row = {
        "grid": f"{args.grid} {grid.shape}", "levels": grid.levels, "depth": args.depth, "hidden": args.hidden,
        "parameters": parameters, "batch_size": args.batch_size, "device": result.device,
        "threads": args.threads if not cuda else None, "subjects_per_s": round(last["samples_per_s"], 3),
        "seconds_per_epoch_of_100": round(100 / last["samples_per_s"], 1),
        "peak_memory_mb": round(peak_mb), "peak_memory_kind": "cuda allocated" if cuda else "max RSS",
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
    }  # fmt: skip
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value}")  # noqa: T201 - a benchmark prints its table
    args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
