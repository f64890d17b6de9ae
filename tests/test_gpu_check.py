"""dualglow-check-gpu: a clear failure without a GPU, a timed bf16 step where there is one."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dualglow_app.gpu_check import DeviceInfo, NoGPUError, main, require_gpu, time_training_step

TINY = ["--grid", "tiny8mm", "--depth", "1", "--hidden", "8", "--steps", "1"]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_cpu_only_torch_is_told_to_install_a_cuda_build() -> None:
    with pytest.raises(NoGPUError, match="CPU-only build; install a CUDA build"):
        require_gpu(DeviceInfo(torch_version="2.13.0+cpu", cuda_build=None))


def test_cuda_torch_without_a_visible_gpu_is_told_about_gpus_all_and_the_driver() -> None:
    with pytest.raises(NoGPUError, match=r"--gpus all \(Docker\) or --nv \(Apptainer\).*nvidia-smi"):
        require_gpu(DeviceInfo(torch_version="2.13.0", cuda_build="13.0"))
    require_gpu(DeviceInfo(torch_version="2.13.0", cuda_build="13.0", name="H200", capability=(9, 0),
                           memory_gib=139.8, bf16=True, count=1))


def test_without_a_gpu_the_command_exits_1_with_one_error_line() -> None:
    if _cuda_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(main, TINY)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no GPU" in errors[0], result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("torch    "), "what torch is comes first"


def test_the_cpu_timing_runs_the_group_levels_step() -> None:
    result = CliRunner().invoke(main, ["--device", "cpu", *TINY])
    assert result.exit_code == 0, result.output
    assert "ms per training step (bf16 autocast, grid tiny8mm, batch 2" in result.output
    timing = time_training_step("cpu", grid="tiny8mm", depth=1, hidden=8, batch_size=1, steps=2, bf16=False)
    assert timing.seconds_per_step > 0 and timing.steps == 2 and timing.peak_memory_gib is None
    assert timing.parameters > 1000


@pytest.mark.gpu
def test_bf16_step_on_the_gpu() -> None:
    if not _cuda_available():
        pytest.skip("no CUDA device")
    result = CliRunner().invoke(main, ["--grid", "cpu4mm", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "device   " in result.output and "bf16 autocast" in result.output and "peak memory" in result.output
