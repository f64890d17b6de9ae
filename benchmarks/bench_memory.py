"""Peak memory of one DualGlow training step vs depth, with and without memory saving.

    python benchmarks/bench_memory.py                       # depths 8 16 32, CPU
    python benchmarks/bench_memory.py --device cuda         # on a GPU machine

Every (depth, mode) runs in a fresh subprocess, so no allocator state leaks between rows.
Model: the default CPU grid (40 x 48 x 40, levels 3), hidden 64, batch 1, age side input;
one step = ``DualGlow.nll`` + backward + AdaMax update. Before the measured step, a no-grad
forward initialises ActNorm and the model state is allocated (gradients, AdaMax moments):
that state is 4x the weights in every mode and grows with depth whatever backprop does; it
is reported apart (``state_mib``). Three figures per row measure the step itself:

- ``rss_mib``: peak resident memory of the step minus the resident memory just before it
  (Linux: ``/proc/self/clear_refs`` resets VmHWM, then VmHWM - VmRSS). glibc is told to
  serve every allocation over 128 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors
  leave RSS at once and the figure follows live tensors rather than heap fragmentation;
- ``saved_mib``: bytes of distinct tensors autograd keeps for backward, counted by
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded): the activations the
  mode exists to drop; it does not see the backward pass's own working set;
- ``cuda_mib`` (``--device cuda``): ``torch.cuda.max_memory_allocated`` minus the allocation
  before the step.

Prints a markdown table and writes benchmarks/results/memory_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import perfkit
import torch
from perfkit import BATCH, GRID, HIDDEN, LEVELS

from dualglow_app.model import AGE_SCALING, DualGlow, DualGlowConfig

MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(
    depth: int, saving: bool, device_name: str, threads: int, hidden: int, batch: int,
    grid: tuple[int, ...] = GRID, levels: int = LEVELS,
) -> dict[str, float | None]:
    """One configuration, in this (fresh) process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    cfg = DualGlowConfig(
        levels=levels, depth=depth, hidden=hidden, continuous={"age": AGE_SCALING}
    )
    model = DualGlow(cfg).to(device).train()
    model.set_memory_saving(saving)
    mri = torch.rand(batch, 1, *grid, device=device)
    pet = torch.rand(batch, 1, *grid, device=device)
    side = {"age": torch.linspace(60.0, 80.0, batch, device=device)}
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    def step() -> torch.Tensor:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return model.nll(mri, pet, side)["loss"]

    with torch.no_grad():
        model.nll(mri, pet, side)  # ActNorm init, outside the measured step
        # Model state (gradients, AdaMax moments) grows with depth in any mode: allocate it
        # before the measurement. A zero-gradient AdaMax step leaves the weights unchanged.
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    optimizer.step()
    state_mib = sum(
        t.numel() * t.element_size()
        for p in model.parameters()
        for t in (p, p.grad, *optimizer.state[p].values())
        if isinstance(t, torch.Tensor) and t.dim() > 0
    ) / MIB
    storages.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss_measured = True
    except OSError:  # sandboxed kernels (gVisor) refuse it: no RSS figure, CUDA's still holds
        rss_measured = False
    rss_before = _status_kib("VmRSS")
    seconds = perfkit.train_step(step, optimizer, device, keep_grads=True)
    rss_peak = _status_kib("VmHWM")
    out: dict[str, float | None] = {
        "depth": depth,
        "memory_saving": saving,
        "rss_mib": (rss_peak - rss_before) / 1024 if rss_measured else None,
        "saved_mib": sum(storages.values()) / MIB,
        "state_mib": state_mib,
        "step_s": seconds,
    }
    if device.type == "cuda":
        out["cuda_mib"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / MIB
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--grid", type=int, nargs=3, default=list(GRID))
    parser.add_argument("--levels", type=int, default=LEVELS)
    perfkit.add_device_options(parser)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--child", nargs=2, metavar=("DEPTH", "SAVING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        depth, saving = int(args.child[0]), args.child[1] == "1"
        print(json.dumps(child(depth, saving, args.device, args.threads, args.hidden, args.batch,
                               tuple(args.grid), args.levels)))
        return
    torch.set_num_threads(args.threads)  # the children's setting, so the JSON reports it
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (not measured: no GPU lent).")

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    rows = []
    for depth in args.depths:
        for saving in (False, True):
            cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
                   "--hidden", str(args.hidden), "--batch", str(args.batch),
                   "--levels", str(args.levels), "--grid", *map(str, args.grid)]
            cmd += ["--child", str(depth), "1" if saving else "0"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"# {rows[-1]}", file=sys.stderr)

    def base(saving: bool, key: str) -> float:
        return next(r[key] for r in rows if r["memory_saving"] == saving and r["depth"] == args.depths[0])

    # Without a resettable RSS peak (gVisor), what autograd saves is the CPU figure left.
    key = "cuda_mib" if args.device == "cuda" else "rss_mib" if rows[0]["rss_mib"] is not None else "saved_mib"
    headers = ["depth", "memory saving", "peak step MiB", f"x depth {args.depths[0]}",
               "autograd-saved MiB", "model state MiB", "step s"]
    table = []
    for r in rows:
        table.append([r["depth"], "on" if r["memory_saving"] else "off", r[key],
                      r[key] / base(r["memory_saving"], key), r["saved_mib"], r["state_mib"],
                      r["step_s"]])
    print(f"peak memory of one training step ({key}; grid {tuple(args.grid)}, levels {args.levels}, "
          f"hidden {args.hidden}, batch {args.batch}, {args.device}, {args.threads} threads)")
    perfkit.print_table(headers, table)
    path = perfkit.write_json(
        f"memory_{args.device}.json",
        {"grid": args.grid, "levels": args.levels, "hidden": args.hidden, "batch": args.batch, "measure": key,
         "rows": rows}, results=args.results_dir,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
