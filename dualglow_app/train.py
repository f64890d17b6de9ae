"""Group level: train DUAL-GLOW on a study's own paired T1w + FDG-PET.

Reads top to bottom, like nanoGPT's train.py:

1. :class:`~dualglow_app.options.TrainOptions` - every setting, a plain dataclass (the CLI fills it in).
2. :func:`train` - the data (:mod:`dualglow_app.dataset`: pairs preprocessed through the
   work-dir cache and stacked once), then AdaMax with warm-up, gradient clipping, a NaN/inf
   guard, a subject-level validation split scored every epoch (bits per voxel; MAE, PSNR,
   SSIM of :func:`dualglow_app.inference.predict`, the same prediction the participant level
   and the evaluation make), an atomic checkpoint every epoch, and at the end the model file,
   ``group.html`` and the metrics TSV (:mod:`dualglow_app.group_outputs`). One process, or
   one per GPU under ``torchrun`` (PyTorch DDP). With ``patience`` the run stops early once
   the validation figure ``select_on`` names (the bpd(PET | MRI) or the MAE) has stopped
   improving (:func:`epochs_without_improvement`).

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

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dualglow_app.bids import check_bids_dataset
from dualglow_app.data import IntensityScaling
from dualglow_app.dataset import (
    PairedVolumes,
    mean_images,
    model_batch,
    model_batches,
    prepare_dataset,
    split_subjects,
)
from dualglow_app.grid import ModelGrid
from dualglow_app.imaging import FWHM_TO_SIGMA
from dualglow_app.log import get_logger, progress_enabled
from dualglow_app.options import VALIDATION_SELECTION, TrainOptions
from dualglow_app.runtime import (
    Distributed,
    cpu_threads,
    distributed_from_env,
    native_bf16,
    resolve_device,
)
from dualglow_app.validation import reference_pet, validate

log = get_logger(__name__)

# Consecutive skipped (non-finite) steps after which training stops: the run has diverged.
MAX_CONSECUTIVE_BAD_STEPS = 20


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, an incompatible or unreadable checkpoint)."""


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
    # The intensity scale the model was trained with (and that predictions must use).
    scaling: IntensityScaling = field(default_factory=IntensityScaling)
    # True when ``patience`` ended the run before its budget (``epochs`` / ``max_steps``).
    stopped_early: bool = False
    # True when ``time_limit`` ended the run before its budget (resume to continue).
    time_limited: bool = False


#: The anatomy template's voxelwise least squares needs this many training subjects per
#: parameter (intercept, encoded covariates, MRI terms): with about as many subjects as
#: parameters the fit reproduces the training PETs, the flows learn a residual of nearly zero
#: and any other brain lies far outside it (a validation bpd of 1e11 on 4 subjects).
MIN_SUBJECTS_PER_TEMPLATE_PARAMETER = 4


def template_fit_parameters(config: Any) -> int:
    """Parameters per voxel of the PET template's least-squares fit (:meth:`DualGlow.fit_pet_template`):
    the intercept, the encoded covariates of the side template, the MRI terms."""
    return 1 + (config.n_side if config.side_template else 0) + config.anatomy_terms


def build_config(options: TrainOptions, grid: ModelGrid, covariates: dict[str, Any] | None = None) -> Any:
    """The :class:`DualGlowConfig` for these options on ``grid``; ``covariates``: the learnt
    :class:`~dualglow_app.covariates.CovariateSpec` of each of ``options.side_info`` (None: age
    alone, scaled (70, 10) as dualglow <= 0.1 did)."""
    from dualglow_app.covariates import side_config
    from dualglow_app.model import DualGlowConfig

    return DualGlowConfig(
        ndim=3,
        levels=options.levels or grid.levels,
        depth=options.depth,
        hidden=options.hidden,
        relation_hidden=options.relation_hidden,
        relation_layers=options.relation_layers,
        top_prior=options.top_prior,
        top_mri_side=options.top_mri_side,
        side_loss_weight=options.side_loss_weight,
        side_levels=options.side_levels,
        side_template=options.side_template,
        anatomy_template=options.anatomy_template and options.template_centring,
        anatomy_sigmas=[fwhm * FWHM_TO_SIGMA / grid.voxel_size for fwhm in options.side_template_mri_fwhm],
        # An ablated MRI (zeros) has no tissue to classify.
        anatomy_tissue=options.side_template_anatomy if options.mri_input else "t1w",
        anatomy_reading=options.tissue_reading,
        lambda_mri=options.lambda_mri,
        **side_config(options.side_info, covariates),
        template_shape=list(grid.shape) if options.template_centring else None,
    )


def epochs_without_improvement(history: list[dict[str, Any]], min_delta: float = 0.0,
                               key: str = "val_bpd_pet_given_mri") -> int:  # fmt: skip
    """Epochs at the end of ``history`` since ``key`` last fell below ``best - min_delta * |best|``.

    A pure function of the history (which every checkpoint stores), so a resumed run decides
    to stop at the same epoch as an uninterrupted one. Epochs without a finite value count as
    not improving.

    >>> epochs_without_improvement([{"v": 3.0}, {"v": 2.0}, {"v": 2.5}, {"v": 2.1}], key="v")
    2
    """
    best: float | None = None
    since = 0
    for row in history:
        value = row.get(key)
        if value is not None and math.isfinite(value) and (best is None or value < best - min_delta * abs(best)):
            best, since = float(value), 0
        else:
            since += 1
    return since


def _stored_best(best: dict[str, Any] | None, select_on: str) -> dict[str, Any] | None:
    """A checkpoint's best epoch, if it was chosen on ``select_on``. Checkpoints written before
    ``select_on`` existed chose on the bpd and stored it as "val_bpd"."""
    if best is None:
        return None
    if "val_bpd" in best:
        best = {"epoch": best["epoch"], "select_on": "bpd", "value": best["val_bpd"], "model": best["model"]}
    if best["select_on"] != select_on:
        log.warning("the checkpoint's best epoch (%d) was chosen on the %s, this run selects on the %s: "
                    "the kept weights come from the epochs after the resume", best["epoch"],
                    VALIDATION_SELECTION[best["select_on"]][1], VALIDATION_SELECTION[select_on][1])  # fmt: skip
        return None
    return best


# --------------------------------------------------------------------------- training


def fit_pet_template(model: Any, data: PairedVolumes, train_rows: np.ndarray, side_info: Sequence[str],
                     mri_input: bool = True, seed: int = 0, fixed: Sequence[str] = ()) -> None:  # fmt: skip
    """Start a template-centred model's side and anatomy templates from the training pairs
    (:meth:`DualGlow.fit_pet_template`), after fitting the grey-matter mixture its MRI terms
    need (``anatomy_tissue`` "gm" or "gm+csf": :mod:`dualglow_app.tissue`, on the training brains), and fix
    the side-template maps of the covariates ``fixed`` names (``TrainOptions.side_template_fixed``)."""
    import torch

    from dualglow_app.tissue import GreyMatterModel

    if model.pet_side_template is None and not model.config.anatomy_template:
        return
    scaling = IntensityScaling()
    if model.uses_tissue_mixture:
        grey_matter = GreyMatterModel.fit((scaling.mri_to_model(np.asarray(data.mri[row])) for row in train_rows),
                                          (np.asarray(data.mask[row]) for row in train_rows), seed=seed)  # fmt: skip
        model.set_tissue_mixture(*grey_matter.mixture_parameters())
    reading = model.config.anatomy_reading
    if model.reads_tissue_maps and data.tissue_maps is None:
        raise ValueError(f"--anatomy-reading {reading} needs the scans' native tissue maps, and these data have none "
                         "(an MNI stack written before it held them, or data prepared without DatasetSpec(tissue_maps=<the reading>))")  # fmt: skip
    if model.reads_tissue_maps and data.tissue_maps_reading != reading:
        raise ValueError(f"--anatomy-reading {reading}: these data's native tissue maps are read as "
                         f"{data.tissue_maps_reading!r} (prepare them with DatasetSpec(tissue_maps={reading!r}))")
    model.fit_pet_template(model_batches(data, train_rows, scaling, torch.device("cpu"), 8, side_info, mri_input))
    set_anatomy_term_range(model, data, train_rows, mri_input)
    model.fix_side_template(fixed)


def set_anatomy_term_range(model: Any, data: PairedVolumes, train_rows: np.ndarray, mri_input: bool = True) -> None:
    """Hold an anatomy-templated model's term to the range the training MRIs give it
    (:meth:`DualGlow.set_anatomy_term_range`); nothing for a model without one."""
    import torch

    if model.config.anatomy_template:
        model.set_anatomy_term_range((batch.mri, batch.tissue_maps) for batch in model_batches(
            data, train_rows, IntensityScaling(), torch.device("cpu"), 8, mri_input=mri_input))  # fmt: skip


def train(
    options: TrainOptions,
    data: PairedVolumes | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train DUAL-GLOW on the paired scans of ``options.bids_dir`` (or on ``data``).

    ``data`` skips :func:`dualglow_app.dataset.prepare_dataset` (tests, notebooks, the
    evaluation's folds); ``on_step(step)`` is called after every batch (tests use it to kill a
    run at a known point). Randomness is a function of (seed, epoch, rank) - every epoch
    reseeds the generators - so a run resumed from an epoch's checkpoint repeats exactly what
    the uninterrupted run did.
    """
    import torch
    import torch.distributed as tdist

    start_time = time.perf_counter()
    dist = distributed_from_env()
    if options.nprocs:
        torch.set_num_threads(cpu_threads(options.nprocs))
    if dist.is_main and not options.skip_bids_validation and data is None:
        check_bids_dataset(options.bids_dir)
    if data is None:
        data = prepare_dataset(options.dataset_spec, rank=dist.rank)
    if options.preprocess_only:
        log.info("--preprocess-only: %d pairs stacked in the work dir; no training", len(data))
        return TrainResult(None, None, None, [], {}, 0, 0, 0, 0, time.perf_counter() - start_time,
                           "none", dist.world_size, list(data.labels), [])  # fmt: skip

    device = resolve_device(options.device, dist.local_rank)
    if dist.enabled:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and options.cpu_bf16 and not native_bf16(device):
        raise TrainingError("--cpu-bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so oneDNN would emulate "
                            "it, slower than float32; drop --cpu-bf16")  # fmt: skip
    use_amp = options.cpu_bf16 if device.type == "cpu" else options.amp and device.type == "cuda" and native_bf16(device)
    try:
        run = _Run.start(options, data, dist, device, use_amp)
        run.fit(on_step)
        return run.finish(start_time)
    finally:
        if dist.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


@dataclass
class _Run:
    """One training run's state: the model, its optimiser and what the epochs have measured."""

    options: TrainOptions
    data: PairedVolumes
    dist: Distributed
    device: Any
    use_amp: bool
    model: Any
    optimizer: Any
    scheduler: Any
    train_rows: np.ndarray
    val_rows: np.ndarray
    fingerprint: dict[str, Any]
    scaling: IntensityScaling = field(default_factory=IntensityScaling)
    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_total: int = 0
    # Non-finite steps in a row, across epochs: MAX_CONSECUTIVE_BAD_STEPS of them end the run.
    consecutive_bad: int = 0
    # The mean training PET (SUVR): validation's deviation correlation is measured against it.
    reference: np.ndarray | None = None
    # The best validation epoch so far: {"epoch", "select_on", "value", "model" (its state dict)}.
    best: dict[str, Any] | None = None
    stopped_early: bool = False
    time_limited: bool = False

    @classmethod
    def start(cls, options: TrainOptions, data: PairedVolumes, dist: Distributed, device: Any, use_amp: bool) -> _Run:
        """A new model (templates set, on ``device``) and optimiser, resumed from the checkpoint if asked."""
        import torch

        from dualglow_app.model import DualGlow
        from dualglow_app.model.memory import MEMORY_SAVING_MODES

        train_rows, val_rows = split_subjects(data.subjects, options.val_fraction, options.seed)
        if dist.is_main:
            log.info("training on %d scans, validating on %d (%s)", len(train_rows), len(val_rows),
                     ", ".join(data.labels[i] for i in val_rows) or "no validation")  # fmt: skip
            if options.patience is not None and len(val_rows) == 0:
                log.warning("--patience %d: no validation scans, so no early stopping", options.patience)
        config = build_config(options, data.grid, data.covariate_specs(options.side_info) if options.side_info else None)
        n_train = len({data.subjects[i] for i in train_rows})
        if config.anatomy_template and n_train < MIN_SUBJECTS_PER_TEMPLATE_PARAMETER * template_fit_parameters(config):
            if dist.is_main:
                log.warning("--anatomy-template is off for this run: %d training subjects, fewer than %d per parameter of "
                            "its voxelwise least squares (%d); the PET template moves with the covariates alone",
                            n_train, MIN_SUBJECTS_PER_TEMPLATE_PARAMETER, template_fit_parameters(config))  # fmt: skip
            config = replace(config, anatomy_template=False)
        torch.manual_seed(options.seed)  # same initial weights on every rank
        model = DualGlow(config)
        if config.template_shape is not None:
            # Every rank sees the same training rows, so every rank sets the same templates.
            model.set_templates(*mean_images(data, train_rows, IntensityScaling(), options.mri_input))
            fit_pet_template(model, data, train_rows, options.side_info, options.mri_input, options.seed,
                             options.side_template_fixed or ())
        model = model.to(device)
        model.set_memory_saving(MEMORY_SAVING_MODES[options.memory_saving])
        log.info("memory-saving invertible backprop: %s", "on" if model.memory_saving else "off")
        optimizer = torch.optim.Adamax(model.parameters(), lr=options.lr)
        # Linear warm-up: Glow's data-dependent actnorm init and small 3D batches make the
        # first steps at full lr unstable.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(options.warmup_steps, 1)))
        fingerprint = {
            "config": config.to_dict(), "grid": data.grid.to_dict(), "train_labels": [data.labels[i] for i in train_rows],
            "mri_input": options.mri_input, "batch_size": options.batch_size,
        }  # what must match for a checkpoint to be resumed  # fmt: skip
        run = cls(options, data, dist, device, use_amp, model, optimizer, scheduler, train_rows, val_rows, fingerprint)
        if options.resume:
            run.resume()
        return run

    def resume(self) -> None:
        """Continue from the checkpoint of the same run, if there is one."""
        from dualglow_app.weights import ModelFileError, load_checkpoint

        path = self.options.checkpoint_path
        if not path.is_file():
            if self.dist.is_main:
                log.info("--resume: no checkpoint at %s yet, starting from scratch", path)
            return
        try:
            checkpoint = load_checkpoint(path, self.device)
        except ModelFileError as err:
            raise TrainingError(str(err)) from None
        from dualglow_app.model import DualGlowConfig

        stored = dict(checkpoint["fingerprint"])
        with contextlib.suppress(TypeError, ValueError):
            # A checkpoint of an older release lacks the config fields added since: read with
            # their values for old files, it resumes when nothing it was built with changed.
            stored["config"] = DualGlowConfig.from_dict(stored["config"]).to_dict()
        if stored != self.fingerprint:
            changed = sorted(k for k in self.fingerprint if stored.get(k) != self.fingerprint[k])
            raise TrainingError(
                f"{path}: checkpoint of a different run (changed: {', '.join(changed)}); "
                "use the same options and subjects, or drop --resume (or the file) to start afresh."
            )
        # A checkpoint written before the anatomy term's range existed (a buffer of fixed maps,
        # not a weight) gets it from the training MRIs, as a fresh fit would.
        missing, unexpected = self.model.load_state_dict(checkpoint["model"], strict=False)
        if unexpected or set(missing) - {"anatomy_term_range"}:
            raise TrainingError(f"{path}: checkpoint weights do not fit this model (missing {sorted(missing)}, "
                                f"unexpected {sorted(unexpected)}); drop --resume (or the file) to start afresh.")
        if missing:
            set_anatomy_term_range(self.model, self.data, self.train_rows, self.options.mri_input)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.start_epoch, self.step = int(checkpoint["epoch"]), int(checkpoint["step"])
        self.history, self.skipped_total = list(checkpoint["history"]), int(checkpoint["skipped_steps"])
        self.best = _stored_best(checkpoint.get("best"), self.options.select_on)
        if self.dist.is_main:
            log.info("resuming from %s after epoch %d (step %d)", path, self.start_epoch, self.step)

    def batch(self, rows: np.ndarray) -> Any:
        return model_batch(self.data, rows, self.scaling, self.device, self.options.side_info, self.options.mri_input)

    def fit(self, on_step: Callable[[int], None] | None) -> None:
        """The epochs: train, validate, keep the best, checkpoint."""
        import torch
        import torch.distributed as tdist
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        from dualglow_app.group_outputs import ProgressBar

        options, dist = self.options, self.dist
        # The sampler only needs len(); it yields positions in train_rows, sharded by rank.
        sampler: DistributedSampler[int] = DistributedSampler(
            range(len(self.train_rows)),  # type: ignore[arg-type]
            num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=options.seed, drop_last=False,
        )  # fmt: skip
        if not self.model.is_initialized:
            self.initialise_actnorm()
        net: Any = self.model
        if dist.enabled:
            net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        steps_per_epoch = math.ceil(len(sampler) / options.batch_size)
        bar = ProgressBar(dist.is_main and progress_enabled(), options.epochs * steps_per_epoch, self.step)
        fit_start, longest_epoch = time.perf_counter(), 0.0
        try:
            for epoch in range(self.start_epoch, options.epochs):
                if options.max_steps is not None and self.step >= options.max_steps:
                    break
                if self.should_stop():
                    self.stopped_early = True
                    if dist.is_main:
                        best = self.best or {"epoch": 0, "value": float("nan")}
                        log.info("early stopping after epoch %d of %d: %s has not improved by %g (relative) "
                                 "for %d epochs; best %.4f at epoch %d", epoch, options.epochs,
                                 VALIDATION_SELECTION[options.select_on][1], options.min_delta, options.patience,
                                 best["value"], best["epoch"])  # fmt: skip
                    break
                if self.out_of_time(fit_start, longest_epoch):
                    self.time_limited = True
                    if dist.is_main:
                        log.info("time limit: %d of %d epochs done in %.0f s; the next would pass --time-limit %g s. "
                                 "Run again with --resume to continue", epoch, options.epochs,
                                 time.perf_counter() - fit_start, options.time_limit)  # fmt: skip
                    break
                torch.manual_seed(options.seed + 1000 * (epoch + 1) + dist.rank)
                sampler.set_epoch(epoch)
                order = self.train_rows[np.fromiter(iter(sampler), dtype=np.int64)]
                epoch_start = time.perf_counter()
                means, skipped = self.train_epoch(net, order, epoch, bar, on_step)
                self.end_epoch(epoch, means, skipped, len(order), time.perf_counter() - epoch_start)
                longest_epoch = max(longest_epoch, time.perf_counter() - epoch_start)
                if dist.enabled:
                    tdist.barrier()
        finally:
            bar.close()

    def out_of_time(self, fit_start: float, longest_epoch: float) -> bool:
        """Whether the next epoch, as long as the longest so far, would end past ``time_limit``
        (the ranks agree: the slowest rank's clock decides)."""
        import torch
        import torch.distributed as tdist

        if self.options.time_limit is None:
            return False
        late = torch.tensor(float(time.perf_counter() - fit_start + longest_epoch > self.options.time_limit),
                            device=self.device)  # fmt: skip
        if self.dist.enabled:
            tdist.all_reduce(late, op=tdist.ReduceOp.MAX)
        return bool(late.item() > 0)

    def should_stop(self) -> bool:
        """Whether ``patience`` epochs have passed without improvement (never without validation)."""
        patience = self.options.patience
        if patience is None or len(self.val_rows) == 0 or len(self.history) < self.options.min_epochs:
            return False
        return epochs_without_improvement(self.history, self.options.min_delta, self.selection_key) >= patience

    @property
    def selection_key(self) -> str:
        """The history's key that early stopping and ``keep="best"`` follow (``select_on``)."""
        return VALIDATION_SELECTION[self.options.select_on][0]

    def initialise_actnorm(self) -> None:
        """ActNorm's data-dependent init (Glow) needs one forward in train mode; DDP then
        broadcasts rank 0's parameters, so every rank starts from rank 0's init."""
        import torch

        seed = self.options.seed + self.dist.rank
        torch.manual_seed(seed)
        rows = self.train_rows[np.random.default_rng(seed).permutation(len(self.train_rows))[:4]]
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.use_amp):
            self.model.nll(*self.batch(rows))

    def train_epoch(self, net: Any, order: np.ndarray, epoch: int, bar: Any,
                    on_step: Callable[[int], None] | None) -> tuple[dict[str, float], int]:  # fmt: skip
        """One pass over ``order``: the per-sample means of the losses and the skipped steps."""
        import torch
        import torch.distributed as tdist

        options, dist = self.options, self.dist
        self.model.train()
        sums = {"loss": 0.0, "bpd_pet_given_mri": 0.0, "bpd_mri": 0.0, "n": 0}
        epoch_start, skipped = time.perf_counter(), 0
        for first in range(0, len(order), options.batch_size):
            batch = self.batch(order[first : first + options.batch_size])
            mri = batch.mri
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.use_amp):
                out = net(*batch)
            loss = out["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), options.grad_clip)
            # NaN/inf guard: DDP has averaged the gradients, but the loss is local, so the
            # ranks agree on skipping through one tiny all-reduce.
            finite = torch.tensor(float(torch.isfinite(loss) and torch.isfinite(grad_norm)), device=self.device)
            if dist.enabled:
                tdist.all_reduce(finite, op=tdist.ReduceOp.MIN)
            self.step += 1
            if finite.item() > 0:
                self.optimizer.step()
                self.scheduler.step()
                self.consecutive_bad = 0
                for key in ("loss", "bpd_pet_given_mri", "bpd_mri"):
                    sums[key] += float(out[key].detach()) * len(mri)
                sums["n"] += len(mri)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                self.consecutive_bad += 1
                log.warning("epoch %d step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped",
                            epoch + 1, self.step, float(loss.detach()), float(grad_norm))  # fmt: skip
                if self.consecutive_bad >= MAX_CONSECUTIVE_BAD_STEPS:
                    raise TrainingError(
                        f"{self.consecutive_bad} consecutive non-finite steps at step {self.step}: training "
                        f"diverged; lower --lr (now {options.lr}) or raise --warmup-steps."
                    )
            samples_per_s = (first + len(mri)) * dist.world_size / max(time.perf_counter() - epoch_start, 1e-9)
            bar.update(epoch, options.epochs, self.step, float(loss.detach()),
                       float(out["bpd_pet_given_mri"].detach()), samples_per_s)  # fmt: skip
            if on_step is not None:
                on_step(self.step)
            if options.max_steps is not None and self.step >= options.max_steps:
                break
        return _all_reduce_means(sums, self.device, dist), skipped

    def end_epoch(self, epoch: int, train_means: dict[str, float], skipped: int, n_scans: int, seconds: float) -> None:
        """Validate, record the epoch's row, keep the best weights and write the checkpoint."""
        from dualglow_app.weights import save_checkpoint

        options = self.options
        self.skipped_total += skipped
        if self.reference is None and len(self.val_rows):
            self.reference = reference_pet(self.data, self.train_rows, self.scaling)
        val = validate(self.model, self.data, self.val_rows, self.scaling, options.side_info, options.mri_input,
                       self.dist, self.reference)  # fmt: skip
        row = {
            "epoch": epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v for k, v in train_means.items()}, **{f"val_{k}": v for k, v in val.items()},
            "skipped_steps": skipped, "samples_per_s": n_scans * self.dist.world_size / max(seconds, 1e-9),
            "epoch_seconds": seconds,
        }  # fmt: skip
        self.history.append(row)
        value = row.get(self.selection_key)
        if value is not None and math.isfinite(value) and (self.best is None or value < self.best["value"]):
            self.best = {"epoch": epoch + 1, "select_on": options.select_on, "value": value,
                         "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}  # fmt: skip
        if not self.dist.is_main:
            return
        log.info("epoch %d/%d  step %d  loss %.4f  bpd(PET|MRI) %.4f  val bpd %s  val MAE %s  val deviation r %s  "
                 "%.2f samples/s", epoch + 1, options.epochs, self.step, row["train_loss"], row["train_bpd_pet_given_mri"],
                 _fmt(val.get("bpd_pet_given_mri")), _fmt(val.get("mae_suvr")), _fmt(val.get("deviation_r")),
                 row["samples_per_s"])  # fmt: skip
        save_checkpoint(options.checkpoint_path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": epoch + 1, "step": self.step,
            "history": self.history, "skipped_steps": self.skipped_total, "fingerprint": self.fingerprint,
            "best": self.best, "options": options.to_dict(), "rng_seed_rule": "seed + 1000 * (epoch + 1) + rank",
            # Early stopping is decided from "history" alone (epochs_without_improvement); this is a record.
            "early_stopping": {"patience": options.patience, "min_delta": options.min_delta, "select_on": options.select_on,
                               "min_epochs": options.min_epochs,
                               "epochs_without_improvement": epochs_without_improvement(
                                   self.history, options.min_delta, self.selection_key)},
        })  # fmt: skip

    def finish(self, start_time: float) -> TrainResult:
        """Select the kept weights, set the conditioning range, write the model and the report."""
        from dualglow_app.group_outputs import write_group_outputs

        options, model = self.options, self.model
        wall = time.perf_counter() - start_time
        selected = len(self.history)
        if options.keep == "best" and self.best is not None:
            selected = int(self.best["epoch"])
            model.load_state_dict(self.best["model"])
            if self.dist.is_main:
                log.info("keeping the weights of epoch %d (lowest %s %.4f; --keep last for the final epoch's)",
                         selected, VALIDATION_SELECTION[options.select_on][1], self.best["value"])  # fmt: skip
        # Bound what conditions the PET flow at synthesis to what the training scans produced
        # (dualglow_app.model.conditioning): a no-op on them, a guard elsewhere.
        model.set_conditioning_range(
            (batch.mri, batch.side) for batch in model_batches(
                self.data, self.train_rows, self.scaling, self.device, options.batch_size,
                options.side_info, options.mri_input)
        )  # fmt: skip
        last = self.history[selected - 1] if self.history else {}
        result = TrainResult(
            model_path=None, report_path=None, metrics_path=None, history=self.history,
            final_metrics={k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")},
            epochs=len(self.history), selected_epoch=selected, steps=self.step, skipped_steps=self.skipped_total,
            wall_time_s=wall, device=str(self.device) + (" (bf16 autocast)" if self.use_amp else ""),
            world_size=self.dist.world_size, train_labels=[self.data.labels[i] for i in self.train_rows],
            val_labels=[self.data.labels[i] for i in self.val_rows], model=model.eval(), scaling=self.scaling,
            stopped_early=self.stopped_early, time_limited=self.time_limited,
        )  # fmt: skip
        if self.dist.is_main:
            write_group_outputs(options, self.data, result, self.train_rows, self.val_rows, self.scaling)
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


__all__ = [
    "TrainResult",
    "TrainingError",
    "build_config",
    "epochs_without_improvement",
    "train",
]
