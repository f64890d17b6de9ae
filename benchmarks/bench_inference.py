"""Synthesis time per subject (model part alone), FLOPs, and the fraction of conv3d peak.

    python benchmarks/bench_inference.py                   # default config, CPU
    python benchmarks/bench_inference.py --device cuda

Model: ``DualGlowConfig`` defaults (levels 3, depth 8, hidden 128, relation_hidden 64) with
an age input, on the default CPU grid (1 x 40 x 48 x 40), ActNorm initialised by one training
forward; timed: ``DualGlow.sample(mri, side, temperature=1, n=1)`` for one subject (what the
participant level runs per subject with the default --samples 1), median of --repeats.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products; elementwise work is not counted), for the whole synthesis and for one flow step at
each level. The machine's conv3d throughput is measured on a large 3x3x3 conv3d (64 -> 64
channels on 40 x 48 x 40); the achieved fraction is (synthesis FLOPs / synthesis time) / that.
Prints markdown tables and writes benchmarks/results/inference_<device>.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import perfkit
import torch
from perfkit import GRID
from torch.utils.flop_counter import FlopCounterMode

from dualglow_app.model import AGE_SCALING, DualGlow, DualGlowConfig
from dualglow_app.model.flows import FlowStep, GlowLevel


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def conv3d_peak(device: torch.device, repeats: int) -> tuple[float, int, float]:
    """-> (seconds, FLOPs, FLOP/s) of a large 3x3x3 conv3d, the machine's practical peak."""
    layer = torch.nn.Conv3d(64, 64, 3, padding=1).to(device)
    x = torch.randn(1, 64, *GRID, device=device)
    with torch.no_grad():
        layer(x)
        seconds = perfkit.median(timed(lambda: layer(x), device, repeats))
        n = flops(lambda: layer(x))
    return seconds, n, n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=DualGlowConfig.hidden)
    parser.add_argument("--depth", type=int, default=DualGlowConfig.depth)
    parser.add_argument("--levels", type=int, default=DualGlowConfig.levels)
    parser.add_argument("--repeats", type=int, default=5)
    perfkit.add_device_options(parser)
    args = parser.parse_args()
    device = perfkit.start(args)
    cfg = DualGlowConfig(levels=args.levels, depth=args.depth, hidden=args.hidden,
                         continuous={"age": AGE_SCALING})
    model = DualGlow(cfg).to(device)
    mri = torch.rand(1, 1, *GRID, device=device)
    side = {"age": 70.0}
    with torch.no_grad():
        model.train().nll(mri, torch.rand_like(mri), side)  # ActNorm init
    model.eval()

    def synthesize() -> object:
        return model.sample(mri, side, temperature=1.0, n=1)

    synthesize()
    seconds = timed(synthesize, device, args.repeats)
    per_subject = perfkit.median(seconds)
    total = flops(synthesize)
    peak_s, peak_flops, peak_rate = conv3d_peak(device, args.repeats)

    rows = []
    x = mri
    for i, level in enumerate(model.flow_mri.levels):
        assert isinstance(level, GlowLevel)
        with torch.no_grad():
            h, _ = level.squeeze(x)
            step = level.steps[0]
            assert isinstance(step, FlowStep)
            step_flops = flops(lambda step=step, h=h: step(h))
            step_s = perfkit.median(timed(lambda step=step, h=h: step(h), device, args.repeats))
            x = level(x)[0] if level.split is not None else x
        rows.append([i, "x".join(map(str, h.shape[1:])), step_flops / 1e9, step_s,
                     step_flops / step_s / peak_rate])

    print(f"synthesis per subject, model part alone (levels {args.levels}, depth {args.depth}, "
          f"hidden {args.hidden}, grid {'x'.join(map(str, GRID))}, {args.device}, "
          f"{args.threads} threads)")
    perfkit.print_table(
        ["median s / subject", "min s", "GFLOP", "achieved GFLOP/s", "conv3d peak GFLOP/s",
         "fraction of peak"],
        [[per_subject, min(seconds), total / 1e9, total / per_subject / 1e9, peak_rate / 1e9,
          total / per_subject / peak_rate]],
    )
    print("\none flow step (forward) per level")
    perfkit.print_table(
        ["level", "C x spatial", "GFLOP", "median s", "fraction of conv3d peak"], rows
    )
    path = perfkit.write_json(
        f"inference_{args.device}.json",
        {"config": cfg.to_dict(), "grid": GRID, "seconds": seconds, "median_s": per_subject,
         "flops": total, "conv3d_peak": {"seconds": peak_s, "flops": peak_flops,
                                         "flop_per_s": peak_rate},
         "fraction_of_peak": total / per_subject / peak_rate,
         "per_level_step": [dict(zip(["level", "shape", "gflop", "median_s", "fraction"], r,
                                     strict=True)) for r in rows]}, results=args.results_dir,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
