"""Group level: train DUAL-GLOW on a study's own paired T1w + FDG-PET.

Reads top to bottom, like nanoGPT's train.py:

1. :class:`TrainOptions` - every setting, a plain dataclass (the CLI only fills it in).
2. :func:`prepare_dataset` - find the T1w + PET pairs, preprocess each one (cached per
   subject by :mod:`dualglow_app.preprocess`), stack the model-grid volumes once into ``.npy``
   files in the work directory, so epochs read from a memory map, never from NIfTI.
3. :func:`train` - AdaMax with warm-up, gradient clipping, a NaN/inf guard, a subject-level
   validation split scored every epoch (bits per voxel; MAE, PSNR, SSIM in SUVR inside the
   brain), an atomic checkpoint every epoch, and at the end the model file, ``group.html`` and
   the metrics TSV. One process, or one per GPU under ``torchrun`` (PyTorch DDP).

Distributed training is launched by torchrun, which sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; then each process trains on its shard of the subjects (DistributedSampler), DDP
averages the gradients, and only rank 0 logs, checkpoints and writes files::

    torchrun --nproc-per-node 4 --no-python dualglow bids/ out/ group --device cuda

Example::

    >>> options = TrainOptions("bids/", "out/", epochs=20, grid="tiny8mm")  # doctest: +SKIP
    >>> result = train(options)                                             # doctest: +SKIP
    >>> result.model_path
    PosixPath('out/models/dualglow.safetensors')
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dualglow_app import __version__
from dualglow_app.bids import BIDSInputError, Scan, find_scans, validate_dataset
from dualglow_app.data import IntensityScaling
from dualglow_app.grid import ModelGrid, preset
from dualglow_app.io import atomic_path, write_json, write_text
from dualglow_app.log import get_logger, progress, progress_enabled
from dualglow_app.metrics import image_metrics  # one definition for training and evaluation

log = get_logger(__name__)

SIDE_INFO_CHOICES = ("age",)
# The presets cover 160 x 192 x 160 mm around the MNI brain centre; --grid-mm keeps that box.
GRID_EXTENT_MM = (160.0, 192.0, 160.0)
DATASET_CACHE_VERSION = 1
# Consecutive skipped (non-finite) steps after which training stops: the run has diverged.
MAX_CONSECUTIVE_BAD_STEPS = 20
METRIC_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_bpd_pet_given_mri", "train_bpd_mri",
    "val_bpd_pet_given_mri", "val_bpd_mri", "val_mae_suvr", "val_psnr_db", "val_ssim",
    "skipped_steps", "samples_per_s", "epoch_seconds",
)  # fmt: skip


class TrainingError(RuntimeError):
    """Training cannot go on (too few usable pairs, divergence, an incompatible checkpoint)."""


# --------------------------------------------------------------------------- 1. options


@dataclass
class TrainOptions:
    """Everything the group level needs; the CLI maps its options one to one onto these.

    ``grid`` names a preset of :data:`dualglow_app.grid.PRESETS`; ``grid_mm`` instead builds a
    grid of that voxel size over the presets' 160 x 192 x 160 mm box. ``levels`` defaults to
    the grid's. ``side_info`` lists the covariates the model is conditioned on (eq. 16-17).
    ``mri_input=False`` zeroes the MRI: the same architecture then learns an unconditional
    PET model, the baseline that shows the MRI carries information. ``max_steps`` ends the
    run after the epoch in which that many batches were processed (smoke tests, benchmarks).
    """

    bids_dir: Path
    output_dir: Path
    work_dir: Path | None = None
    participant_labels: Sequence[str] = ()
    session_labels: Sequence[str] = ()
    tracer: str = "FDG"
    grid: str = "cpu4mm"
    grid_mm: float | None = None
    levels: int | None = None
    depth: int = 8
    hidden: int = 128
    relation_hidden: int = 64
    side_info: Sequence[str] = ()
    epochs: int = 100
    batch_size: int = 2
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 50.0
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    max_steps: int | None = None
    model_name: str = "dualglow"
    nprocs: int | None = None
    preprocess_only: bool = False
    skip_bids_validation: bool = False
    mri_input: bool = True
    report: bool = True
    # Centre both images on the mean training image (DualGlowConfig.template_shape): the
    # model starts from the population mean PET and learns departures from it.
    template_centring: bool = True
    # Which weights become the model: "best" = the epoch with the lowest validation
    # bpd(PET | MRI) (small cohorts overfit), "last" = the final epoch. Without a validation
    # split, always the last.
    keep: str = "best"
    # Invertible backprop (dualglow_app.model.memory): "auto" turns it on for deep flows
    # (depth >= 16), where stored activations dominate memory; "on"/"off" force it.
    memory_saving: str = "auto"

    def __post_init__(self) -> None:
        self.bids_dir = Path(self.bids_dir)
        self.output_dir = Path(self.output_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir else self.output_dir.parent / "dualglow-work"
        self.participant_labels = tuple(self.participant_labels)
        self.session_labels = tuple(self.session_labels)
        self.side_info = tuple(self.side_info)
        problems = []
        unknown = sorted(set(self.side_info) - set(SIDE_INFO_CHOICES))
        if unknown:
            problems.append(f"side_info {unknown}: choose from {list(SIDE_INFO_CHOICES)}")
        for name in ("epochs", "batch_size", "depth", "hidden", "relation_hidden"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction={self.val_fraction} (use 0 <= F < 1)")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r} (auto, cpu or cuda)")
        if self.keep not in ("best", "last"):
            problems.append(f"keep={self.keep!r} (best or last)")
        if self.memory_saving not in ("auto", "on", "off"):
            problems.append(f"memory_saving={self.memory_saving!r} (auto, on or off)")
        if not self.model_name or any(c in self.model_name for c in "/\\ "):
            problems.append(f"model_name={self.model_name!r} (a file name without '/' or spaces)")
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems) + ".")

    @property
    def checkpoint_path(self) -> Path:
        """Where the per-epoch checkpoint lives (work dir: shared by nodes, not a derivative)."""
        assert self.work_dir is not None
        return self.work_dir / "train" / self.model_name / "checkpoint.pt"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (paths as strings), stored in the model metadata and checkpoints."""
        return json.loads(json.dumps(asdict(self), default=str))


def resolve_grid(options: TrainOptions) -> ModelGrid:
    """The model grid: a named preset, or ``grid_mm`` voxels over the presets' box."""
    if options.grid_mm is None:
        grid = preset(options.grid)
        if options.levels is None or options.levels == grid.levels:
            return grid
        return ModelGrid(grid.voxel_size, grid.shape, grid.origin, levels=options.levels)
    levels = options.levels or 3
    step = 2**levels
    shape = tuple(int(math.ceil(extent / options.grid_mm / step) * step) for extent in GRID_EXTENT_MM)
    return ModelGrid.centred(options.grid_mm, shape, levels=levels)  # type: ignore[arg-type]


def is_phantom_cohort(bids_dir: Path) -> bool:
    """Whether ``bids_dir`` is the synthetic cohort of ``dualglow-phantom`` (a demonstration)."""
    description = bids_dir / "dataset_description.json"
    try:
        data = json.loads(description.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    generators = [g.get("Name", "") for g in data.get("GeneratedBy", []) if isinstance(g, dict)]
    if "dualglow-phantom" in generators:
        return True
    text = str(data.get("Name", ""))
    readme = next((p for p in bids_dir.glob("README*") if p.is_file()), None)
    if readme is not None:
        text += readme.read_text(encoding="utf-8", errors="replace")[:5000]
    return "dualglow-phantom" in text or "dualglow phantom" in text.lower()


# --------------------------------------------------------------------------- 2. data


@dataclass
class PairedVolumes:
    """The stacked training data: one row per usable T1w + PET pair, on one model grid.

    ``mri`` is the preprocessed T1w ([0, 1], 0 outside the brain), ``pet`` the PET in SUVR,
    ``mask`` the brain mask; all (N, X, Y, Z), memory-mapped from the work-dir cache.
    ``labels`` are ``sub-<l>[_ses-<l>]``, ``subjects`` the subject label of each row (the
    validation split keeps a subject's sessions together), ``age`` NaN where unknown.
    """

    labels: list[str]
    subjects: list[str]
    mri: np.ndarray
    pet: np.ndarray
    mask: np.ndarray
    age: np.ndarray
    grid: ModelGrid
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def _find_pairs(options: TrainOptions) -> list[Scan]:
    """Every scan with a T1w and a PET of ``options.tracer`` (and an age when conditioning)."""
    scans = find_scans(
        options.bids_dir,
        options.participant_labels,
        options.session_labels,
        tracer=options.tracer,
        require_pet=True,
        work_dir=options.work_dir,
    )
    if "age" in options.side_info:
        without = [s for s in scans if s.age is None]
        for scan in without:
            log.warning(
                "%s: no age in participants.tsv or sessions.tsv; not used (--side-info age needs one)",
                scan.prefix,
            )
        scans = [s for s in scans if s.age is not None]
    return scans


def _too_few(options: TrainOptions, usable: Sequence[str], skipped: dict[str, str]) -> TrainingError:
    details = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return TrainingError(
        f"{options.bids_dir}: {len(usable)} usable T1w + {options.tracer} PET pair(s)"
        f" ({', '.join(usable) or 'none'}); training needs at least 2."
        + (f" Skipped: {details}." if details else "")
        + f" Add paired subjects (anat/*_T1w + pet/*_trc-{options.tracer}_pet) or check --participant-label / --tracer."
    )


def _dataset_key(scans: Sequence[Scan], grid: ModelGrid) -> str:
    """Cache key: the inputs (path, size, mtime), the grid and the preprocessing settings."""
    from dualglow_app import preprocess

    parts: list[Any] = [DATASET_CACHE_VERSION, preprocess.CACHE_VERSION, grid.to_dict()]
    parts.append([asdict(preprocess.T1wOptions()), asdict(preprocess.PETOptions())])
    for scan in scans:
        for path in (scan.t1w, scan.pet):
            stat = Path(str(path)).stat()
            parts.append([scan.prefix, str(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _load_cached(folder: Path, scans: Sequence[Scan], grid: ModelGrid) -> PairedVolumes:
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    n = len(index["labels"])
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r")[:n] for name in ("mri", "pet", "mask")}
    by_label = {s.prefix: s for s in scans}
    # Ages are read from the TSVs on every run, so editing participants.tsv needs no re-preprocessing.
    age = np.array([by_label[k].age if by_label[k].age is not None else np.nan for k in index["labels"]])
    return PairedVolumes(
        labels=list(index["labels"]),
        subjects=[by_label[k].subject for k in index["labels"]],
        age=age.astype(np.float32),
        grid=grid,
        skipped=dict(index["skipped"]),
        **arrays,
    )


def prepare_dataset(options: TrainOptions, rank: int = 0) -> PairedVolumes:
    """Find the pairs, preprocess them (a failing subject is logged and skipped) and stack them.

    The stack is written once to ``WORK_DIR/train-data/<key>/{mri,pet,mask}.npy`` (built in a
    temporary folder and renamed into place) and memory-mapped on later runs. Under torchrun
    only rank 0 preprocesses; the other ranks wait for the cache, so no collective times out
    during hours of preprocessing (``group --preprocess-only`` fills it beforehand).
    Raises :class:`TrainingError` when fewer than 2 pairs are usable, naming them.
    """
    from dualglow_app.preprocess import preprocess_pet, preprocess_t1w

    assert options.work_dir is not None
    grid = resolve_grid(options)
    scans = _find_pairs(options)
    if len(scans) < 2:
        raise _too_few(options, [s.prefix for s in scans], {})
    folder = options.work_dir / "train-data" / _dataset_key(scans, grid)
    if (folder / "index.json").is_file():
        log.info("reusing the stacked training data in %s", folder)
        data = _load_cached(folder, scans, grid)
    elif rank != 0:
        waited = 0.0
        while not (folder / "index.json").is_file():
            if waited % 300 == 0:
                log.info("rank %d: waiting for rank 0 to preprocess into %s", rank, folder)
            time.sleep(5.0)
            waited += 5.0
        data = _load_cached(folder, scans, grid)
    else:
        nprocs = options.nprocs or os.cpu_count() or 1
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            shape = (len(scans), *grid.shape)
            mri = np.lib.format.open_memmap(tmp / "mri.npy", "w+", np.float32, shape)
            pet = np.lib.format.open_memmap(tmp / "pet.npy", "w+", np.float32, shape)
            mask = np.lib.format.open_memmap(tmp / "mask.npy", "w+", np.uint8, shape)
            labels: list[str] = []
            skipped: dict[str, str] = {}
            for scan in progress(scans, "preprocessing T1w + PET pairs", total=len(scans)):
                try:
                    t1 = preprocess_t1w(scan.t1w, grid, options.work_dir, nprocs)
                    suvr = preprocess_pet(scan.pet, t1, options.work_dir, nprocs)  # type: ignore[arg-type]
                except Exception as err:  # noqa: BLE001 - one bad subject must not stop the cohort
                    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    log.error("%s: preprocessing failed (%s); skipped", scan.prefix, reason)
                    skipped[scan.prefix] = reason
                    continue
                row = len(labels)
                mri[row] = np.asarray(t1.image.dataobj, dtype=np.float32)
                pet[row] = np.asarray(suvr.image.dataobj, dtype=np.float32)
                mask[row] = np.asarray(t1.brain_mask.dataobj, dtype=np.uint8)
                labels.append(scan.prefix)
            for array in (mri, pet, mask):
                array.flush()
            del mri, pet, mask
            if len(labels) < 2:
                raise _too_few(options, labels, skipped)
            index = {"labels": labels, "skipped": skipped, "grid": grid.to_dict(), "version": __version__}
            write_json(tmp / "index.json", index)
            if folder.exists():  # a concurrent run finished first: keep its copy
                shutil.rmtree(tmp)
            else:
                tmp.rename(folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        data = _load_cached(folder, scans, grid)
    for label, reason in data.skipped.items():
        log.warning("%s: not used for training (%s)", label, reason)
    log.info("%d paired scans on the %s mm grid %s", len(data), grid.voxel_size, grid.shape)
    return data


def split_subjects(subjects: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), split by subject so no subject is on both sides.

    At least one subject stays in training; with ``val_fraction`` > 0 at least one goes to
    validation (2 subjects: 1 + 1).
    """
    unique = sorted(set(subjects))
    n_val = 0 if val_fraction <= 0 else min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    val_subjects = {unique[i] for i in order[:n_val]}
    rows = np.arange(len(subjects))
    is_val = np.array([s in val_subjects for s in subjects], dtype=bool)
    return rows[~is_val], rows[is_val]


# --------------------------------------------------------------------------- 3. training


@dataclass
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


def resolve_device(option: str, dist: Distributed) -> Any:
    """``auto`` -> CUDA when present; under torchrun, the GPU of this process's LOCAL_RANK."""
    import torch

    if option == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "--device cuda, but torch sees no CUDA device (CPU-only torch build, or no GPU "
            "visible: docker --gpus all / apptainer --nv); use --device cpu or auto."
        )
    if option == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank % torch.cuda.device_count())


@dataclass
class TrainResult:
    """What a finished :func:`train` wrote and measured (paths are None on ranks > 0).

    ``model`` is the trained :class:`~dualglow_app.model.DualGlow` in eval mode (every rank).
    """

    model_path: Path | None
    report_path: Path | None
    metrics_path: Path | None
    history: list[dict[str, float]]
    final_metrics: dict[str, float]
    epochs: int
    # The epoch whose weights the model holds (``keep="best"``: the best validation epoch).
    selected_epoch: int
    steps: int
    skipped_steps: int
    wall_time_s: float
    device: str
    world_size: int
    train_labels: list[str]
    val_labels: list[str]
    model: Any = None


def build_config(options: TrainOptions, grid: ModelGrid) -> Any:
    """The :class:`DualGlowConfig` for these options on ``grid``."""
    from dualglow_app.model import AGE_SCALING, DualGlowConfig

    return DualGlowConfig(
        ndim=3,
        levels=options.levels or grid.levels,
        depth=options.depth,
        hidden=options.hidden,
        relation_hidden=options.relation_hidden,
        continuous={"age": AGE_SCALING} if "age" in options.side_info else {},
        template_shape=list(grid.shape) if options.template_centring else None,
    )


def mean_images(
    data: PairedVolumes, rows: np.ndarray, scaling: IntensityScaling, options: TrainOptions
) -> tuple[Any, Any]:
    """Voxel-wise means of the model-scale MRI and PET over ``rows``: the centring templates."""
    import torch

    sums = None
    for mri, pet, _ in _batches(data, rows, scaling, options, torch.device("cpu"), 8):
        batch_sums = (mri.double().sum(0), pet.double().sum(0))
        sums = batch_sums if sums is None else (sums[0] + batch_sums[0], sums[1] + batch_sums[1])
    assert sums is not None, "mean_images needs at least one row"
    return (sums[0] / len(rows)).float(), (sums[1] / len(rows)).float()


def _batch(
    data: PairedVolumes, rows: np.ndarray, scaling: IntensityScaling, options: TrainOptions, device: Any
) -> tuple[Any, Any, dict[str, Any] | None]:
    """Rows of the memmap -> (mri, pet, side) tensors on ``device``, on the model's [0, 1] scale."""
    import torch

    rows = np.sort(rows)  # memmaps read faster in order; the order in a batch does not matter
    mri = torch.from_numpy(scaling.mri_to_model(data.mri[rows]))[:, None].to(device)
    pet = torch.from_numpy(scaling.pet_to_model(data.pet[rows]))[:, None].to(device)
    if not options.mri_input:
        mri = torch.zeros_like(mri)
    side = {"age": torch.from_numpy(data.age[rows]).to(device)} if "age" in options.side_info else None
    return mri, pet, side


def _batches(
    data: PairedVolumes, rows: np.ndarray, scaling: IntensityScaling, options: TrainOptions, device: Any, size: int
) -> Iterator[tuple[Any, Any, dict[str, Any] | None]]:
    """:func:`_batch` over ``rows``, ``size`` at a time."""
    for first in range(0, len(rows), size):
        yield _batch(data, rows[first : first + size], scaling, options, device)


def evaluate(
    model: Any,
    data: PairedVolumes,
    rows: np.ndarray,
    scaling: IntensityScaling,
    options: TrainOptions,
    device: Any,
    dist: Distributed,
) -> dict[str, float]:
    """Validation: bits per voxel (eq. 12 parts) and image metrics of the conditional mode.

    Deterministic (eval mode: no dequantisation noise; temperature 0 sampling), in float32.
    Each rank scores its share of ``rows``; the sums are all-reduced.
    """
    import torch

    if len(rows) == 0:
        return {}
    model.eval()
    names = ("bpd_pet_given_mri", "bpd_mri", "mae_suvr", "psnr_db", "ssim")
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)
    for row in rows[dist.rank :: dist.world_size]:
        scores = score_scan(model, data, int(row), scaling, options, device)
        totals += torch.tensor([scores[name] for name in names] + [1.0], dtype=torch.float64)
    if dist.enabled:
        import torch.distributed as tdist

        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        on = totals.to(device) if device.type == "cuda" else totals
        tdist.all_reduce(on)
        totals = on.cpu()
    model.train()
    n = max(float(totals[-1]), 1.0)
    return {name: float(totals[i]) / n for i, name in enumerate(names)}


def score_scan(
    model: Any, data: PairedVolumes, row: int, scaling: IntensityScaling, options: TrainOptions, device: Any
) -> dict[str, float]:
    """One scan under ``model`` (in eval mode): bits per voxel (eq. 12 parts) and the image
    metrics of its conditional mode (T = 0) against the true PET, in SUVR inside the mask."""
    import torch

    with torch.no_grad():
        mri, pet, side = _batch(data, np.array([row]), scaling, options, device)
        out = model.nll(mri, pet, side)
        synth = model.sample(mri, side, temperature=0.0)[0, 0, 0].float().cpu().numpy()
    scores = image_metrics(
        np.asarray(data.pet[row], dtype=np.float32),
        scaling.pet_from_model(synth),
        np.asarray(data.mask[row]),
        scaling.pet_suvr_max,
    )
    return {"bpd_pet_given_mri": float(out["bpd_pet_given_mri"]), "bpd_mri": float(out["bpd_mri"]), **scores}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _fingerprint(config: Any, grid: ModelGrid, train_labels: Sequence[str], options: TrainOptions) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (architecture, grid, data, objective)."""
    return {
        "config": config.to_dict(),
        "grid": grid.to_dict(),
        "train_labels": list(train_labels),
        "mri_input": options.mri_input,
        "batch_size": options.batch_size,
    }


def train(
    options: TrainOptions,
    data: PairedVolumes | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train DUAL-GLOW on the paired scans of ``options.bids_dir`` (or on ``data``).

    ``data`` skips :func:`prepare_dataset` (tests, notebooks); ``on_step(step)`` is called
    after every batch (tests use it to kill a run at a known point).
    Randomness is a function of (seed, epoch, rank) - every epoch reseeds the generators - so
    a run resumed from an epoch's checkpoint repeats exactly what the uninterrupted run did.
    """
    import torch
    import torch.distributed as tdist

    start_time = time.perf_counter()
    dist = distributed_from_env()
    if options.nprocs:
        torch.set_num_threads(options.nprocs)
    if dist.is_main and not options.skip_bids_validation and data is None:
        _validate_input(options.bids_dir)
    if data is None:
        data = prepare_dataset(options, rank=dist.rank)
    if options.preprocess_only:
        log.info("--preprocess-only: %d pairs stacked in the work dir; no training", len(data))
        return TrainResult(None, None, None, [], {}, 0, 0, 0, 0, time.perf_counter() - start_time,
                           "none", dist.world_size, list(data.labels), [])  # fmt: skip

    device = resolve_device(options.device, dist)
    if dist.enabled:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    use_amp = options.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    try:
        return _train_loop(options, data, dist, device, use_amp, on_step, start_time)
    finally:
        if dist.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


def _train_loop(
    options: TrainOptions,
    data: PairedVolumes,
    dist: Distributed,
    device: Any,
    use_amp: bool,
    on_step: Callable[[int], None] | None,
    start_time: float,
) -> TrainResult:
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from dualglow_app.model import DualGlow
    from dualglow_app.weights import save_model

    grid, scaling = data.grid, IntensityScaling()
    train_rows, val_rows = split_subjects(data.subjects, options.val_fraction, options.seed)
    train_labels = [data.labels[i] for i in train_rows]
    val_labels = [data.labels[i] for i in val_rows]
    if dist.is_main:
        log.info("training on %d scans, validating on %d (%s)", len(train_rows), len(val_rows),
                 ", ".join(val_labels) or "no validation")  # fmt: skip
    config = build_config(options, grid)
    torch.manual_seed(options.seed)  # same initial weights on every rank
    model = DualGlow(config)
    if config.template_shape is not None:
        # Every rank sees the same training rows, so every rank sets the same templates.
        model.set_templates(*mean_images(data, train_rows, scaling, options))
    model = model.to(device)
    model.set_memory_saving({"auto": None, "on": True, "off": False}[options.memory_saving])
    log.info("memory-saving invertible backprop: %s", "on" if model.memory_saving else "off")
    optimizer = torch.optim.Adamax(model.parameters(), lr=options.lr)
    # Linear warm-up: Glow's data-dependent actnorm init and small 3D batches make the
    # first steps at full lr unstable.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(options.warmup_steps, 1))
    )
    fingerprint = _fingerprint(config, grid, train_labels, options)
    start_epoch, step, history, skipped_total = 0, 0, [], 0
    best: dict[str, Any] | None = None  # {"epoch", "val_bpd", "model"}: the best validation epoch so far
    checkpoint_path = options.checkpoint_path
    if options.resume and checkpoint_path.is_file():
        # weights_only: a checkpoint is data, never code (no pickle of arbitrary objects).
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if checkpoint["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if checkpoint["fingerprint"].get(k) != fingerprint[k])
            raise TrainingError(
                f"{checkpoint_path}: checkpoint of a different run (changed: {', '.join(changed)}); "
                "use the same options and subjects, or drop --resume (or the file) to start afresh."
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])
        history, skipped_total = list(checkpoint["history"]), int(checkpoint["skipped_steps"])
        best = checkpoint.get("best")
        if dist.is_main:
            log.info("resuming from %s after epoch %d (step %d)", checkpoint_path, start_epoch, step)
    elif options.resume and dist.is_main:
        log.info("--resume: no checkpoint at %s yet, starting from scratch", checkpoint_path)

    # The sampler only needs len(); it yields positions in train_rows, sharded by rank.
    sampler: DistributedSampler[int] = DistributedSampler(
        range(len(train_rows)),  # type: ignore[arg-type]
        num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=options.seed, drop_last=False,
    )  # fmt: skip
    steps_per_epoch = math.ceil(len(sampler) / options.batch_size)
    if not model.is_initialized:
        # ActNorm's data-dependent init (Glow) needs one forward in train mode; DDP then
        # broadcasts rank 0's parameters, so every rank starts from rank 0's init.
        torch.manual_seed(options.seed + dist.rank)
        init_rows = train_rows[np.random.default_rng(options.seed + dist.rank).permutation(len(train_rows))[:4]]
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
            model.nll(*_batch(data, init_rows, scaling, options, device))
    net: Any = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model

    bar = _ProgressBar(dist.is_main and progress_enabled(), options.epochs * steps_per_epoch, step)
    consecutive_bad = 0
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, options.epochs):
            if options.max_steps is not None and step >= options.max_steps:
                break
            torch.manual_seed(options.seed + 1000 * (epoch + 1) + dist.rank)
            sampler.set_epoch(epoch)
            order = train_rows[np.fromiter(iter(sampler), dtype=np.int64)]
            model.train()
            sums = {"loss": 0.0, "bpd_pet_given_mri": 0.0, "bpd_mri": 0.0, "n": 0}
            epoch_start, skipped_epoch = time.perf_counter(), 0
            for first in range(0, len(order), options.batch_size):
                mri, pet, side = _batch(data, order[first : first + options.batch_size], scaling, options, device)
                with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                    out = net(mri, pet, side)
                loss = out["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
                # NaN/inf guard: DDP has averaged the gradients, but the loss is local, so the
                # ranks agree on skipping through one tiny all-reduce.
                finite = torch.tensor(float(torch.isfinite(loss) and torch.isfinite(grad_norm)), device=device)
                if dist.enabled:
                    tdist.all_reduce(finite, op=tdist.ReduceOp.MIN)
                step += 1
                if finite.item() > 0:
                    optimizer.step()
                    scheduler.step()
                    consecutive_bad = 0
                    sums["loss"] += float(loss.detach()) * len(mri)
                    sums["bpd_pet_given_mri"] += float(out["bpd_pet_given_mri"].detach()) * len(mri)
                    sums["bpd_mri"] += float(out["bpd_mri"].detach()) * len(mri)
                    sums["n"] += len(mri)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    skipped_epoch += 1
                    consecutive_bad += 1
                    log.warning("epoch %d step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped",
                                epoch + 1, step, float(loss.detach()), float(grad_norm))  # fmt: skip
                    if consecutive_bad >= MAX_CONSECUTIVE_BAD_STEPS:
                        raise TrainingError(
                            f"{consecutive_bad} consecutive non-finite steps at step {step}: training "
                            f"diverged; lower --lr (now {options.lr}) or raise --warmup-steps."
                        )
                elapsed = time.perf_counter() - epoch_start
                samples_per_s = (first + len(mri)) * dist.world_size / max(elapsed, 1e-9)
                bar.update(epoch, options.epochs, step, float(loss.detach()),
                           float(out["bpd_pet_given_mri"].detach()), samples_per_s)
                if on_step is not None:
                    on_step(step)
                if options.max_steps is not None and step >= options.max_steps:
                    break
            skipped_total += skipped_epoch
            epoch_seconds = time.perf_counter() - epoch_start
            train_means = _all_reduce_means(sums, device, dist)
            val = evaluate(model, data, val_rows, scaling, options, device, dist)
            row = {
                "epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                **{f"train_{k}": v for k, v in train_means.items()},
                **{f"val_{k}": v for k, v in val.items()},
                "skipped_steps": skipped_epoch,
                "samples_per_s": len(order) * dist.world_size / max(epoch_seconds, 1e-9),
                "epoch_seconds": epoch_seconds,
            }  # fmt: skip
            history.append(row)
            val_bpd = val.get("bpd_pet_given_mri")
            if val_bpd is not None and math.isfinite(val_bpd) and (best is None or val_bpd < best["val_bpd"]):
                best = {"epoch": epoch + 1, "val_bpd": val_bpd,
                        "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}  # fmt: skip
            if dist.is_main:
                log.info("epoch %d/%d  step %d  loss %.4f  bpd(PET|MRI) %.4f  val bpd %s  val MAE %s  %.2f samples/s",
                         epoch + 1, options.epochs, step, row["train_loss"], row["train_bpd_pet_given_mri"],
                         _fmt(val.get("bpd_pet_given_mri")), _fmt(val.get("mae_suvr")), row["samples_per_s"])  # fmt: skip
                _save_checkpoint(checkpoint_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step,
                    "history": history, "skipped_steps": skipped_total, "fingerprint": fingerprint, "best": best,
                    "options": options.to_dict(), "rng_seed_rule": "seed + 1000 * (epoch + 1) + rank",
                })  # fmt: skip
            if dist.enabled:
                tdist.barrier()
    finally:
        bar.close()

    wall = time.perf_counter() - start_time
    selected = len(history)
    if options.keep == "best" and best is not None:
        selected = int(best["epoch"])
        model.load_state_dict(best["model"])
        if dist.is_main:
            log.info("keeping the weights of epoch %d (lowest validation bpd %.4f; --keep last for the final epoch's)",
                     selected, best["val_bpd"])  # fmt: skip
    # Bound what the relation networks see to the training scans' MRI latents (see
    # dualglow_app.model.dualglow, "Conditioning range"): a no-op on them, a guard elsewhere.
    model.set_conditioning_range(
        (mri, side) for mri, _, side in _batches(data, train_rows, scaling, options, device, options.batch_size)
    )
    final = {k.removeprefix("val_"): v for k, v in (history[selected - 1] if history else {}).items() if k.startswith("val_")}
    result = TrainResult(
        model_path=None, report_path=None, metrics_path=None, history=history, final_metrics=final,
        epochs=len(history), selected_epoch=selected, steps=step, skipped_steps=skipped_total, wall_time_s=wall,
        device=str(device) + (" (bf16 autocast)" if use_amp else ""), world_size=dist.world_size,
        train_labels=train_labels, val_labels=val_labels, model=model.eval(),
    )  # fmt: skip
    if dist.is_main:
        models = options.output_dir / "models"
        metadata = _model_metadata(options, data, result, scaling)
        result.model_path = save_model(model, models / options.model_name, metadata)
        result.metrics_path = write_metrics_tsv(models / f"{options.model_name}_metrics.tsv", history)
        if options.report:
            result.report_path = _write_report_safely(options, data, model, val_rows, train_rows, scaling, result, device)
        log.info("model written to %s (%d epochs, %d steps, %.0f s)", result.model_path, result.epochs, step, wall)
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _all_reduce_means(sums: dict[str, float], device: Any, dist: Distributed) -> dict[str, float]:
    """Per-sample means of the training sums over all ranks."""
    import torch

    keys = ("loss", "bpd_pet_given_mri", "bpd_mri")
    values = torch.tensor([sums[k] for k in keys] + [sums["n"]], dtype=torch.float64)
    if dist.enabled:
        import torch.distributed as tdist

        on = values.to(device) if device.type == "cuda" else values
        tdist.all_reduce(on)
        values = on.cpu()
    n = float(values[-1])
    return {k: float(values[i]) / n if n else float("nan") for i, k in enumerate(keys)}


def _validate_input(bids_dir: Path) -> None:
    """The official BIDS validator; errors stop the run (skip with --skip-bids-validation)."""
    try:
        result = validate_dataset(bids_dir)
    except FileNotFoundError:
        log.warning("bids-validator-deno is not installed; the input was not validated")
        return
    if not result.ok:
        shown = "; ".join(sorted(set(result.errors))[:5])
        raise BIDSInputError(
            f"{bids_dir}: the BIDS validator found errors ({shown}); fix them or pass --skip-bids-validation."
        )


class _ProgressBar:
    """Rich progress over the whole run: epoch, step, loss, bpd, samples/s and the ETA."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.progress: Any = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=True,
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task("training", total=total, completed=completed, stats="")

    def update(self, epoch: int, epochs: int, step: int, loss: float, bpd: float, samples_per_s: float) -> None:
        if self.progress is None:
            return
        stats = f"loss {loss:.4f}  bpd {bpd:.4f}  {samples_per_s:.2f} samples/s"
        self.progress.update(self.task, completed=step, description=f"epoch {epoch + 1}/{epochs}", stats=stats)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --------------------------------------------------------------------------- outputs


def _model_metadata(options: TrainOptions, data: PairedVolumes, result: TrainResult, scaling: IntensityScaling) -> dict[str, Any]:
    """The metadata keys of :mod:`dualglow_app.data` that the participant level reads."""
    import torch

    return {
        "grid": data.grid.to_dict(),
        "intensity": scaling.to_dict(),
        "side_info": list(options.side_info),
        "demonstration": is_phantom_cohort(options.bids_dir),
        "training": {
            "subjects": result.train_labels,
            "validation_subjects": result.val_labels,
            "skipped_subjects": data.skipped,
            "epochs": result.epochs,
            "selected_epoch": result.selected_epoch,
            "keep": options.keep,
            "steps": result.steps,
            "skipped_steps": result.skipped_steps,
            "seed": options.seed,
            "batch_size_per_process": options.batch_size,
            "world_size": result.world_size,
            "lr": options.lr,
            "tracer": options.tracer,
            "mri_input": options.mri_input,
            "validation": result.final_metrics,
            "wall_time_s": round(result.wall_time_s, 1),  # of this invocation (a resumed run: since the resume)
            "epoch_seconds_total": round(sum(h.get("epoch_seconds", 0.0) for h in result.history), 1),  # all epochs
            "device": result.device,
            "versions": {"dualglow": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "options": options.to_dict(),
        },
    }


def write_metrics_tsv(path: Path, history: Sequence[dict[str, float]]) -> Path:
    """One row per epoch; columns :data:`METRIC_COLUMNS` (``n/a`` where not measured)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in history:
        writer.writerow(["n/a" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                         for c in METRIC_COLUMNS])  # fmt: skip
    return write_text(path, buffer.getvalue())


def _write_report_safely(*args: Any) -> Path | None:
    try:
        return write_report(*args)
    except Exception as err:  # noqa: BLE001 - a failed figure never fails the training
        log.error("group report could not be written (%s: %s); the model is fine", type(err).__name__, err)
        return None


def write_report(
    options: TrainOptions, data: PairedVolumes, model: Any, val_rows: np.ndarray, train_rows: np.ndarray,
    scaling: IntensityScaling, result: TrainResult, device: Any,
) -> Path:
    """``OUTPUT_DIR/group.html``: summary, loss curves, metrics table, validation montages."""
    import torch

    from dualglow_app.report import HtmlReport, MontageRow, line_figure, orthogonal_montage

    demo = is_phantom_cohort(options.bids_dir)
    report = HtmlReport(
        f"dualglow group level: {options.model_name}",
        banner="DEMONSTRATION: trained on the synthetic dualglow phantom cohort, not on people" if demo else None,
    )
    report.add_table(["fact", "value"], [
        ["training scans", len(result.train_labels)], ["validation scans", ", ".join(result.val_labels) or "none"],
        ["skipped scans", ", ".join(f"{k} ({v})" for k, v in data.skipped.items()) or "none"],
        ["grid", f"{data.grid.voxel_size} mm {data.grid.shape}"], ["epochs / steps", f"{result.epochs} / {result.steps}"],
        ["non-finite steps skipped", result.skipped_steps], ["device", f"{result.device} x {result.world_size}"],
        ["wall time", f"{result.wall_time_s:.0f} s"], ["model", str(result.model_path)],
    ])  # fmt: skip
    history = result.history
    if history:
        epochs = [float(h["epoch"]) for h in history]
        curves = {"train bpd(PET|MRI)": [h["train_bpd_pet_given_mri"] for h in history]}
        if "val_bpd_pet_given_mri" in history[0]:
            curves["validation bpd(PET|MRI)"] = [h["val_bpd_pet_given_mri"] for h in history]
        report.add_heading("Loss curves")
        report.add_figure(line_figure(epochs, curves, "epoch", "bits per voxel"), "-log p(PET | MRI) in bits per voxel (eq. 12)")
        if "val_mae_suvr" in history[0]:
            report.add_figure(line_figure(epochs, {"MAE (SUVR)": [h["val_mae_suvr"] for h in history]}, "epoch", "SUVR"),
                              "validation mean absolute error inside the brain")  # fmt: skip
        report.add_heading("Metrics per epoch")
        columns = [c for c in METRIC_COLUMNS if c in history[0]]
        report.add_table(columns, [[h.get(c) for c in columns] for h in history[-20:]])
    shown = val_rows[:2] if len(val_rows) else train_rows[:1]
    model.eval()
    rows = []
    with torch.no_grad():
        for row in shown:
            mri, _, side = _batch(data, np.array([row]), scaling, options, device)
            synth = scaling.pet_from_model(model.sample(mri, side, temperature=0.0)[0, 0, 0].float().cpu().numpy())
            synth = synth * np.asarray(data.mask[row])
            top = float(np.percentile(data.pet[row][data.mask[row] > 0], 99.5)) if data.mask[row].any() else 2.0
            label = data.labels[row]
            rows += [
                MontageRow(f"{label} T1w", np.asarray(data.mri[row])),
                MontageRow(f"{label} true PET", np.asarray(data.pet[row]), cmap="hot", vmin=0, vmax=top, colorbar_label="SUVR"),
                MontageRow(f"{label} synthetic PET (T=0)", synth, cmap="hot", vmin=0, vmax=top, colorbar_label="SUVR"),
            ]  # fmt: skip
    if rows:
        report.add_heading("Validation montages" if len(val_rows) else "Training montage (no validation split)")
        report.add_figure(orthogonal_montage(rows), "T1w, true PET and synthetic PET (conditional mode), SUVR")
    return report.write(options.output_dir / "group.html")


__all__ = [
    "Distributed",
    "PairedVolumes",
    "TrainOptions",
    "TrainResult",
    "TrainingError",
    "build_config",
    "distributed_from_env",
    "evaluate",
    "image_metrics",
    "is_phantom_cohort",
    "prepare_dataset",
    "resolve_grid",
    "split_subjects",
    "train",
    "write_metrics_tsv",
]
