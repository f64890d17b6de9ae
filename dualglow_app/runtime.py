"""Where the work runs: the torch device, CPU threads and this process's place in a torchrun job.

One helper for every stage (participant level, group level, evaluation, benchmarks), so the
same option means the same thing everywhere:

- :func:`resolve_device`: ``auto`` -> CUDA when torch sees a GPU, else the CPU; ``cuda``
  without a GPU is a usage error (:class:`DeviceUnavailableError`) naming the fix. Under
  torchrun each process takes the GPU of its ``LOCAL_RANK``.
- :func:`cpu_threads`: ``--nprocs``, else the cores this process may run on
  (``sched_getaffinity``: SLURM and ``taskset`` limit it; ``os.cpu_count()`` would
  oversubscribe a shared node).
- :func:`torch_threads`: run a block on that many torch threads, restored afterwards.
- :class:`Distributed`: rank, local rank and world size from torchrun's environment.
- :func:`in_container`: Docker or Apptainer, for hints about mounting folders.

>>> cpu_threads(3)
3
>>> Distributed().is_main
True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DEVICES = ("auto", "cpu", "cuda")


class DeviceUnavailableError(ValueError):
    """The requested device does not exist here (``--device cuda`` on a machine without one)."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """Read torchrun's ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (defaults: one process)."""
    return Distributed(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def resolve_device(option: str = "auto", local_rank: int = 0) -> Any:
    """A ``torch.device`` for ``option`` (``auto``, ``cpu`` or ``cuda``).

    ``auto`` picks CUDA when torch sees a device; with several GPUs, process ``local_rank``
    takes GPU ``local_rank`` (modulo the count), as torchrun expects.
    """
    import torch

    if option not in DEVICES:
        raise DeviceUnavailableError(f"--device {option}: choose one of {', '.join(DEVICES)}")
    if option == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"--device cuda, but torch {torch.__version__} sees no CUDA device (a CPU-only torch build, or no "
            "GPU visible: docker run --gpus all / apptainer --nv); use --device cpu or auto"
        )
    if option == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def in_container() -> str | None:
    """``docker`` or ``apptainer`` when running inside one (for hints about mounts), else None."""
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return "apptainer"
    if os.path.exists("/.dockerenv"):
        return "docker"
    return None


def native_bf16(device: Any) -> bool:
    """Whether bf16 runs natively on ``device`` (a torch.device): CUDA's check, or on the CPU
    oneDNN's (AVX512-BF16 or AMX; without them oneDNN emulates bf16, slower than float32)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_threads(nprocs: int | None = None) -> int:
    """CPU threads to use: ``nprocs``, else the cores this process may run on."""
    if nprocs:
        return int(nprocs)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block (the previous count is restored)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = [
    "DEVICES",
    "DeviceUnavailableError",
    "Distributed",
    "cpu_threads",
    "distributed_from_env",
    "in_container",
    "resolve_device",
    "torch_threads",
]
