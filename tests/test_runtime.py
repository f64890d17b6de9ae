"""Devices, threads and torchrun state (dualglow_app.runtime): one helper for every stage."""

from __future__ import annotations

import os

import pytest
import torch

from dualglow_app.runtime import (
    DeviceUnavailableError,
    cpu_threads,
    distributed_from_env,
    resolve_device,
    torch_threads,
)


def test_threads_follow_the_cpu_affinity_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under SLURM or taskset a process may use fewer cores than the machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpu_threads() == 2 and cpu_threads(5) == 5


def test_torch_threads_are_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceUnavailableError, match="--device cuda.*--device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError, match="--device tpu"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 1)


def test_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dist = distributed_from_env()
    assert (dist.rank, dist.local_rank, dist.world_size, dist.enabled, dist.is_main) == (3, 1, 4, True, False)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert not distributed_from_env().enabled and distributed_from_env().is_main
