"""``dualglow-check-gpu``: can this machine, or this container, train DUAL-GLOW on a GPU?

It prints what torch sees (its version, the CUDA it was built with, the device, its compute
capability, memory and bf16 support, the driver when ``nvidia-smi`` is there) and times
training steps of a DUAL-GLOW model under bf16 autocast, as the group level runs them
(``--amp``, AdaMax, the model grid of ``--grid``). Exit 0 when the steps ran, 1 when there is
no usable CUDA device (one line saying why, and the fix), so a job script or a health check
can test it before a long run::

    docker run --rm --gpus all --entrypoint dualglow-check-gpu dualglow:0.1.0
    apptainer exec --nv dualglow.sif dualglow-check-gpu
    dualglow-check-gpu --device cpu --grid tiny8mm      # the same timing on the CPU

Any architecture the group level trains can be timed (``--levels``, ``--depth``, ``--hidden``,
``--top-prior``, ``--side-template``, ``--memory-saving``); ``--json`` writes every figure
(device, seconds per step, images per second, peak memory, the bpd of each step) for
``benchmarks/gpu_check.sh``, which runs the model issue's configuration and the paper-size
network this way.

Example (Python)::

    >>> from dualglow_app.gpu_check import time_training_step
    >>> timing = time_training_step("cpu", grid="tiny8mm", depth=1, hidden=8, batch_size=1, steps=1)
    >>> timing.seconds_per_step > 0
    True
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from dualglow_app import __version__
from dualglow_app.grid import PRESETS


class NoGPUError(RuntimeError):
    """No CUDA device is usable from here; the message says why and what to do."""


@dataclass(frozen=True)
class DeviceInfo:
    """What torch reports about the CUDA device it would use (``name`` is None without one)."""

    torch_version: str
    cuda_build: str | None
    name: str | None = None
    capability: tuple[int, int] | None = None
    memory_gib: float | None = None
    bf16: bool | None = None
    count: int = 0
    driver: str | None = None

    def lines(self) -> list[str]:
        cuda = f"CUDA {self.cuda_build}" if self.cuda_build else "CPU-only build (no CUDA)"
        out = [f"torch    {self.torch_version} ({cuda})"]
        if self.driver:
            out.append(f"driver   NVIDIA {self.driver}")
        if self.name is not None:
            major, minor = self.capability or (0, 0)
            out.append(f"device   {self.name} (cuda:0 of {self.count}), compute capability {major}.{minor}, "
                       f"{self.memory_gib:.1f} GiB, bf16 {'yes' if self.bf16 else 'no'}")
        return out


@dataclass(frozen=True)
class StepTiming:
    """Training steps timed on one device (seconds per step: the median of ``steps``).

    ``bpd`` holds bpd(PET | MRI) of the untimed first step and of every timed one, all on the
    same batch: it must be finite and should fall, which shows the optimiser works on the
    device (a fixed batch is memorised; this is no measure of quality).
    """

    device: str
    grid: str
    batch_size: int
    bf16: bool
    seconds_per_step: float
    steps: int
    peak_memory_gib: float | None
    parameters: int
    levels: int = 0
    depth: int = 0
    hidden: int = 0
    memory_saving: bool = False
    images_per_second: float = 0.0
    bpd: list[float] = field(default_factory=list)
    # Memory saving: the last relative reconstruction error of each level's input, per flow
    # (the drift guard's; bf16 flow arithmetic shows up here first).
    reconstruction_errors: dict[str, list[float | None]] = field(default_factory=dict)

    def line(self) -> str:
        memory = f", peak memory {self.peak_memory_gib:.2f} GiB" if self.peak_memory_gib is not None else ""
        precision = "bf16 autocast" if self.bf16 else "float32"
        saving = ", memory saving" if self.memory_saving else ""
        bpd = f", bpd {self.bpd[0]:.3f} -> {self.bpd[-1]:.3f}" if self.bpd else ""
        return (f"step     {self.seconds_per_step * 1000:.0f} ms per training step ({precision}, grid {self.grid}, "
                f"batch {self.batch_size}, {self.parameters / 1e6:.1f} M parameters, median of {self.steps}{saving})"
                f"{memory}{bpd}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _driver_version() -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi`` (mounted by --gpus / --nv), if present."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def device_info() -> DeviceInfo:
    """What torch sees; never raises (a machine without a GPU gets ``name=None``)."""
    import torch

    version, cuda, driver = str(torch.__version__), torch.version.cuda, _driver_version()
    if not torch.cuda.is_available():
        return DeviceInfo(torch_version=version, cuda_build=cuda, driver=driver)
    props = torch.cuda.get_device_properties(0)
    return DeviceInfo(torch_version=version, cuda_build=cuda, driver=driver, name=props.name,
                      capability=(props.major, props.minor), memory_gib=props.total_memory / 2**30,
                      bf16=torch.cuda.is_bf16_supported(), count=torch.cuda.device_count())


def require_gpu(info: DeviceInfo) -> None:
    """Raise :class:`NoGPUError` with the likely cause and fix when ``info`` has no device."""
    if info.name is not None:
        return
    if info.cuda_build is None:
        raise NoGPUError(
            f"no GPU: torch {info.torch_version} is a CPU-only build; install a CUDA build of torch "
            "(the image's default TORCH_SPEC, or pip install torch from PyPI on Linux x86_64)"
        )
    raise NoGPUError(
        f"no GPU visible to torch {info.torch_version} (built with CUDA {info.cuda_build}): run the container "
        "with --gpus all (Docker) or --nv (Apptainer), and check the host driver with nvidia-smi "
        f"(CUDA {info.cuda_build} needs a driver that supports it; see docs/CONTAINERS.md)"
    )


def time_training_step(device: str = "cuda", grid: str = "paper2mm", depth: int = 8, hidden: int = 128,
                       batch_size: int = 2, steps: int = 5, bf16: bool = True, seed: int = 0,
                       levels: int | None = None, top_prior: str = "side", side_template: bool = False,
                       memory_saving: bool | None = None, lr: float = 1e-4) -> StepTiming:
    """Time DUAL-GLOW training steps (forward, backward, AdaMax step) on random paired images.

    The model is the group level's (``train.py``: levels from the grid unless ``levels``,
    age as side information; ``side_template`` centres on per-voxel templates as the group
    level does, so the PET template can move with age); one untimed step first initialises
    actnorm and warms the kernels up. ``memory_saving`` None applies the depth rule.
    """
    import torch

    from dualglow_app.model.dualglow import AGE_SCALING, DualGlow, DualGlowConfig

    model_grid = PRESETS[grid]
    dev = torch.device(device)
    torch.manual_seed(seed)
    config = DualGlowConfig(ndim=3, levels=levels or model_grid.levels, depth=depth, hidden=hidden,
                            continuous={"age": AGE_SCALING}, top_prior=top_prior, side_template=side_template,
                            template_shape=list(model_grid.shape) if side_template else None)
    model = DualGlow(config).to(dev).train()
    model.set_memory_saving(memory_saving)
    optimizer = torch.optim.Adamax(model.parameters(), lr=lr)
    shape = (batch_size, 1, *model_grid.shape)
    mri, pet = torch.rand(shape, device=dev), torch.rand(shape, device=dev)
    side = {"age": torch.linspace(60.0, 80.0, batch_size, device=dev)}
    bpd: list[float] = []

    def step() -> None:
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            out = model.nll(mri, pet, side)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        # .item() waits for the device: the timed step then includes all its kernels.
        bpd.append(out["bpd_pet_given_mri"].item())
        if not torch.isfinite(out["loss"]):
            raise RuntimeError(f"the timed step gave a non-finite loss ({float(out['loss'])})")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    seconds = statistics.median(times)
    return StepTiming(device=str(dev), grid=grid, batch_size=batch_size, bf16=bf16,
                      seconds_per_step=seconds, steps=steps, peak_memory_gib=peak,
                      parameters=sum(p.numel() for p in model.parameters()), levels=config.levels,
                      depth=depth, hidden=hidden, memory_saving=model.memory_saving,
                      images_per_second=batch_size / seconds, bpd=bpd,
                      reconstruction_errors={"mri": model.flow_mri.reconstruction_errors,
                                             "pet": model.flow_pet.reconstruction_errors}
                      if model.memory_saving else {})


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cpu times the same step on the CPU (and never fails for want of a GPU).")
@click.option("--grid", type=click.Choice(sorted(PRESETS)), default="paper2mm", show_default=True,
              help="Model grid of the timed model.")
@click.option("--depth", type=click.IntRange(min=1), default=8, show_default=True, help="Flow steps per level.")
@click.option("--hidden", type=click.IntRange(min=1), default=128, show_default=True, help="Coupling channels.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="Timed steps (after one untimed).")
@click.option("--no-bf16", is_flag=True, help="Time float32 steps instead of bf16 autocast.")
@click.option("--levels", type=click.IntRange(min=1), default=None, help="Glow levels (default: the grid's).")
@click.option("--top-prior", type=click.Choice(["side", "mri+side"]), default="side", show_default=True,
              help="DualGlowConfig.top_prior (the group level's default is mri+side).")
@click.option("--side-template", is_flag=True, help="Template centring with the side template (the group level's default).")
@click.option("--memory-saving", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Invertible backprop: auto = on from depth 16.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdaMax learning rate of the timed steps.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the device and every figure of the timing to this JSON file.")
@click.version_option(__version__, "--version", prog_name="dualglow-check-gpu")
def main(device: str, grid: str, depth: int, hidden: int, batch_size: int, steps: int, no_bf16: bool,
         levels: int | None, top_prior: str, side_template: bool, memory_saving: str, lr: float,
         json_path: Path | None) -> None:
    """Report the CUDA device torch sees and time DUAL-GLOW training steps under bf16 autocast.

    Exit 0 when the steps ran, 1 without a usable CUDA device (--device cuda).
    """
    info = device_info()
    for line in info.lines():
        click.echo(line)
    if device == "cuda":
        try:
            require_gpu(info)
        except NoGPUError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(1)
    bf16 = not no_bf16
    if device == "cuda" and bf16 and info.bf16 is False:
        click.echo(f"note     {info.name} has no bf16: timing float32 (the group level: --no-amp)")
        bf16 = False
    try:
        from dualglow_app.model.memory import MEMORY_SAVING_MODES

        saving = MEMORY_SAVING_MODES[memory_saving]
        timing = time_training_step(device, grid=grid, depth=depth, hidden=hidden, batch_size=batch_size,
                                    steps=steps, bf16=bf16, levels=levels, top_prior=top_prior,
                                    side_template=side_template, memory_saving=saving, lr=lr)
    except Exception as err:  # out of memory, a driver/toolkit mismatch: one line, the cause
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "out of memory" in reason.lower():
            hint = "try --batch-size 1, a smaller --grid or --memory-saving on"
        elif "non-finite" in reason:
            hint = "the step diverged: try --no-bf16, a lower --lr, or --memory-saving off"
        else:
            hint = "see the error above"
        click.echo(f"Error: the timed step failed on {device}: {type(err).__name__}: {reason} ({hint})", err=True)
        sys.exit(1)
    click.echo(timing.line())
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"device": asdict(info), "timing": timing.to_dict()}, indent=2) + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
