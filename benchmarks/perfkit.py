"""Shared helpers of the benchmarks (bench_memory, bench_vs_freia, bench_inference; ``labels`` for
the model benches).

Machine description, a training step, JSON output, a plain-text table printer, subject ranges,
the voxelwise least squares of the linear benches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import conv_flop_count, register_flop_formula  # noqa: E402

from dualglow_app.runtime import native_bf16  # noqa: E402


def voxelwise_least_squares(x: Any, y: Any) -> Any:
    """Per voxel, the minimum-norm least squares of ``y`` (scans, voxels) on ``x`` (scans,
    voxels, terms): coefficients (voxels, terms), numpy, as DualGlow.fit_pet_template solves it."""
    import numpy as np

    gram = np.einsum("nvp,nvq->vpq", x, x)
    moments = np.einsum("nvp,nv->vp", x, y)
    return np.einsum("vpq,vq->vp", np.linalg.pinv(gram), moments)


def labels(spans: str) -> list[str]:
    """Subject labels of comma-separated ranges: ``001-048,061-200``."""
    out = []
    for span in spans.split(","):
        first, _, last = span.partition("-")
        width = len(first)
        out += [f"{i:0{width}d}" for i in range(int(first), int(last or first) + 1)]
    return out


# flows.Conv3d calls oneDNN's convolution directly (docs/PERFORMANCE.md, section 2), which
# FlopCounterMode has no formula for: count it as the convolution it is.
@register_flop_formula(torch.ops.aten.mkldnn_convolution)  # type: ignore[untyped-decorator]
def _onednn_conv_flop(x_shape: Any, w_shape: Any, bias: Any, padding: Any, stride: Any, dilation: Any,
                      groups: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return int(conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False))

# The default CPU grid (dualglow_app.grid preset "cpu4mm": 4 mm, 40 x 48 x 40, levels 3) and
# depth 8. Hidden 64 and batch 1 (the group level defaults to 128 and 2) keep a depth-32
# training step within a minute on 2 shared cores; every script takes --hidden/--batch.
GRID = (40, 48, 40)
LEVELS = 3
DEPTH = 8
HIDDEN = 64
BATCH = 1
# One intra-op thread by default: the 2 cores are shared with other jobs, and OpenMP with 2
# threads on an oversubscribed machine spins at barriers (measured 3-10x slower and noisy).
THREADS = 1


def machine() -> dict[str, Any]:
    """CPU model, cores, torch build and (when present) the GPU: goes into every JSON."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": native_bf16(torch.device("cpu")),
    }
    return info


def train_step(
    step: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    keep_grads: bool = False,
) -> float:
    """One timed training step: loss, backward, optimiser update. Returns seconds.

    ``keep_grads`` zeroes gradients in place instead of freeing them, so a memory
    measurement sees only what the step itself allocates.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=not keep_grads)
    loss = step()
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda``, ``--threads`` and ``--results-dir``, shared by the model-level
    benchmarks (gpu_check.sh points ``--results-dir`` at the folder its figures go to)."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help=f"where the JSON goes (default {RESULTS.relative_to(ROOT)})")


def start(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, seed torch with 0, return the ``--device``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def write_json(name: str, payload: dict[str, Any], results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / name
    payload = {"machine": machine(), "command": " ".join([sys.executable, *sys.argv]), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A markdown table on stdout (pasted as is into docs/PERFORMANCE.md)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
