"""Every stage's settings as plain dataclasses: what the CLI fills in, what Python callers pass.

- :class:`ParticipantOptions` - the participant level (:mod:`dualglow_app.synthesize`);
- :class:`TrainOptions` - the group level (:mod:`dualglow_app.train`).

The CLI maps its options one to one onto these fields, and refuses an option that the chosen
level's dataclass does not have (``participant --epochs 5`` exits 2). Each dataclass checks its
values when built and names every problem in one message. The evaluation's options live with
the evaluation (:class:`dualglow_app.evaluate.EvaluateOptions`).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dualglow_app.bids import AGE
from dualglow_app.covariates import Sweep, name_problem
from dualglow_app.dataset import DatasetSpec
from dualglow_app.grid import SPACE as MNI
from dualglow_app.grid import ModelGrid, resolve_grid
from dualglow_app.io import writable_dir
from dualglow_app.log import get_logger
from dualglow_app.runtime import DEVICES, cpu_threads
from dualglow_app.tissue import (
    ANATOMY_READINGS,
    DEFAULT_ANATOMY_READING,
    NATIVE_READINGS,
    SIDE_TEMPLATE_ANATOMY,
    tissue_reading,
)

log = get_logger(__name__)

T1W = "T1w"
OUTPUT_SPACES = (MNI, T1W)
#: Model files written with torch.save / pickle: never loaded (unpickling runs code).
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")
WORK_DIR_NAME = "dualglow-work"
#: What TrainOptions.select_on can name: the validation history's key and how the log names it.
VALIDATION_SELECTION = {"bpd": ("val_bpd_pet_given_mri", "validation bpd(PET|MRI)"),
                        "mae": ("val_mae_suvr", "validation MAE (SUVR)")}


def default_work_dir(output_dir: Path | str) -> Path:
    """The work directory when none is given: ``OUTPUT_DIR/../dualglow-work`` where that can be
    written (so existing caches keep working), else ``$TMPDIR/dualglow-work`` (e.g. in a
    container whose ``/`` is read-only, where OUTPUT_DIR is ``/out``), said in an INFO line."""
    beside = Path(output_dir).resolve().parent / WORK_DIR_NAME
    if writable_dir(beside):
        return beside
    fallback = Path(tempfile.gettempdir()) / WORK_DIR_NAME
    log.info("%s cannot be written; the work directory is %s (pass -w/--work-dir to keep the cache elsewhere)",
             beside, fallback)  # fmt: skip
    return fallback


class ParticipantUsageError(ValueError):
    """Options or inputs that make the whole participant run impossible (the CLI exits with status 2)."""


def side_template_fixed_choice(values: Sequence[str]) -> tuple[str, ...] | None:
    """``--side-template-fixed`` as typed -> the options' value: nothing given -> None (the
    default: age when conditioned on it), ``none`` -> () (every map trains), else the names.

    >>> side_template_fixed_choice([]), side_template_fixed_choice(["none"]), side_template_fixed_choice(["age"])
    (None, (), ('age',))
    """
    if not values:
        return None
    return () if tuple(values) == ("none",) else tuple(values)


def covariate_assignments(texts: Sequence[str]) -> dict[str, str]:
    """``--covariate NAME=VALUE`` texts by name, values as typed (the model checks them).

    >>> covariate_assignments(["diagnosis=CN", " age = 70 "])
    {'diagnosis': 'CN', 'age': '70'}
    """
    values: dict[str, str] = {}
    for text in texts:
        name, sep, value = str(text).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(f"--covariate {text}: write NAME=VALUE, e.g. --covariate diagnosis=CN")
        if name in values:
            raise ValueError(f"--covariate {name} given twice")
        values[name] = value
    return values


@dataclass
class ParticipantOptions:
    """Everything the participant level needs; the CLI fills it from its arguments.

    ``weights``: a model path or a name (see :func:`dualglow_app.weights.resolve_weights`).
    ``samples`` draws at ``temperature`` (0 = the conditional mode; more than one sample needs
    a temperature above 0, or all samples are equal). ``age`` is used only for scans without
    an age in ``sessions.tsv`` / ``participants.tsv``. ``age_sweep``: ages (years) to
    synthesize every scan at, besides its own; both within :data:`dualglow_app.bids.AGE`'s
    range. ``sweeps``: ``NAME=VALUES`` (``age=50:100:10``, ``diagnosis=CN,MCI,AD``, ``NAME=all``
    for every class of a categorical covariate; :class:`dualglow_app.covariates.Sweep`), each
    a series of counterfactual synthetic PETs of the scan's MRI with that covariate changed
    (``age_sweep`` is ``age=...``). ``covariates``: ``NAME=VALUE`` for scans without a value of
    that covariate in the TSVs (as ``age`` is for age); ``impute_covariates``: give a scan
    without a value the training's typical one (mean, or most frequent class; recorded in the
    sidecar) instead of failing it. ``counterfactual_pet``: where a scan has a measured FDG-PET,
    also move it to each sweep value (:meth:`DualGlow.counterfactual`). ``output_res``: mm of
    the MNI output grid (TemplateFlow ``res-XX``). ``work_dir`` defaults to
    :func:`default_work_dir`.

    Example::

        >>> ParticipantOptions("bids", "out", samples=4, temperature=0.7).samples
        4
    """

    bids_dir: Path
    output_dir: Path
    weights: str | Path | None = None
    participant_labels: Sequence[str] = ()
    session_labels: Sequence[str] = ()
    work_dir: Path | None = None
    device: str = "auto"
    nprocs: int | None = None
    samples: int = 1
    temperature: float = 0.0
    seed: int = 0
    age: float | None = None
    age_sweep: Sequence[float] = ()
    sweeps: Sequence[str] = ()
    covariates: Sequence[str] = ()
    impute_covariates: bool = False
    counterfactual_pet: bool = False
    output_spaces: Sequence[str] = (MNI,)
    output_res: int = 2
    skip_bids_validation: bool = False
    overwrite: bool = False
    report: bool = True
    # Where a scan has a measured FDG-PET, score the synthetic one against it (sidecar, report).
    compare_measured_pet: bool = True

    def __post_init__(self) -> None:
        self.bids_dir = Path(self.bids_dir)
        self.output_dir = Path(self.output_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir is not None else default_work_dir(self.output_dir)
        self.participant_labels = tuple(self.participant_labels)
        self.session_labels = tuple(self.session_labels)
        self.age_sweep = tuple(sorted({float(a) for a in self.age_sweep}))
        self.output_spaces = tuple(dict.fromkeys(self.output_spaces))
        self.sweeps = tuple(self.sweeps)
        self.covariates = tuple(self.covariates)
        problems = []
        try:
            self.parsed_sweeps()
        except ValueError as err:
            problems.append(str(err))
        try:
            self.covariate_fallbacks()
        except ValueError as err:
            problems.append(str(err))
        if self.counterfactual_pet and not self.all_sweeps_given:
            problems.append("--counterfactual-pet moves a measured PET to each sweep value: pass --sweep NAME=VALUES too")
        if self.samples < 1:
            problems.append(f"--samples {self.samples}: draw at least 1 sample")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"--temperature {self.temperature}: use a value >= 0 (0 = mode, 1 = the model's spread)")
        elif self.samples > 1 and self.temperature == 0:
            problems.append(
                f"--samples {self.samples} at --temperature 0 gives {self.samples} identical samples; "
                "pass --temperature > 0 (e.g. 0.7) or --samples 1"
            )
        unknown = [s for s in self.output_spaces if s not in OUTPUT_SPACES]
        if unknown or not self.output_spaces:
            problems.append(f"--output-spaces {' '.join(unknown)}: choose from {' '.join(OUTPUT_SPACES)}")
        if not 1 <= self.output_res <= 8:
            problems.append(f"--output-res {self.output_res}: use 1 to 8 mm")
        if self.device not in DEVICES:
            problems.append(f"--device {self.device}: choose one of {', '.join(DEVICES)}")
        for flag, ages in (("--age", [self.age] if self.age is not None else []), ("--age-sweep", self.age_sweep)):
            problems += [f"{flag} {age:g}: {problem}" for age in ages if (problem := AGE.range_problem(age))]
        if self.weights is not None and Path(str(self.weights)).suffix.lower() in PICKLE_SUFFIXES:
            problems.append(
                f"--weights {self.weights}: pickle files (torch.save) are not accepted, loading one runs code; "
                "pass the NAME.safetensors (+ NAME.json) a dualglow group level wrote"
            )
        if problems:
            raise ParticipantUsageError("; ".join(problems) + ".")

    @property
    def resolved_work_dir(self) -> Path:
        """The work directory (``work_dir``, filled by :func:`default_work_dir` when not given)."""
        assert self.work_dir is not None
        return self.work_dir

    @property
    def all_sweeps_given(self) -> bool:
        return bool(self.sweeps or self.age_sweep)

    def parsed_sweeps(self) -> list[Sweep]:
        """``sweeps`` parsed (``age_sweep`` as ``age=...``); a covariate swept twice, or a
        malformed one, raises ``ValueError`` (the model's own check comes when it is loaded)."""
        parsed = [Sweep.parse(text) for text in self.sweeps]
        if self.age_sweep:
            parsed.append(Sweep("age", tuple(f"{a:g}" for a in self.age_sweep)))
        names = [sweep.name for sweep in parsed]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"--sweep: {', '.join(twice)} swept twice (with --age-sweep too?): give each covariate once")
        return parsed

    def covariate_fallbacks(self) -> dict[str, str]:
        """``covariates`` (``NAME=VALUE``) by name, as typed; the model checks the values."""
        fallbacks = covariate_assignments(self.covariates)
        if self.age is not None:
            if "age" in fallbacks:
                raise ValueError("--covariate age=... and --age: give the fallback age once")
            fallbacks["age"] = f"{self.age:g}"
        return fallbacks

    @property
    def threads(self) -> int:
        """CPU threads: ``nprocs``, else the cores this process may use."""
        return cpu_threads(self.nprocs)



@dataclass
class TrainOptions:
    """Everything the group level needs; the CLI maps its options one to one onto these.

    ``grid`` names a preset of :data:`dualglow_app.grid.PRESETS`; ``grid_mm`` instead builds a
    grid of that voxel size over the presets' 160 x 192 x 160 mm box. ``levels`` defaults to
    the grid's. ``side_info`` lists the covariates the model is conditioned on (eq. 16-17):
    columns of ``participants.tsv`` / ``sessions.tsv``, typed by ``participants.json``
    (:mod:`dualglow_app.covariates`).
    ``mri_input=False`` zeroes the MRI: the same architecture then learns an unconditional
    PET model, the baseline that shows the MRI carries information. ``max_steps`` ends the
    run after the epoch in which that many batches were processed (smoke tests, benchmarks).
    ``patience`` (needs a validation split) ends the run once that many epochs in a row have
    not lowered the validation figure ``select_on`` names (the bpd(PET | MRI) or the MAE) below
    ``best - min_delta * |best|`` (``min_delta`` is relative), once ``min_epochs`` have run;
    ``epochs`` is then the budget.
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
    relation_layers: int = 2
    # DualGlowConfig.top_prior: "side" (eq. 16) or "mri+side". The app's default is
    # "mri+side": on phantom v2 it follows the subject far better (docs/MODEL_EXPERIMENTS.md,
    # deviation r 0.59 vs 0.26-0.42); the library's DualGlowConfig keeps the paper's.
    top_prior: str = "mri+side"
    # DualGlowConfig.top_mri_side: "keep" (eq. 17) or "remove".
    top_mri_side: str = "keep"
    # DualGlowConfig.side_loss_weight: the eq. 17 heads' weight in the objective.
    side_loss_weight: float = 0.01
    # DualGlowConfig.side_levels: "top" (eq. 16), "all" or "none". The app's default is "none":
    # with c in the top prior too, the prior added an age effect on top of the side template's
    # least-squares one, which took more atrophy as age; without it the held-out age sweep
    # matched the swept truth better (r 0.78 -> 0.81, median ratio 1.32 -> 1.25) and the
    # subject was followed as well (deviation r 0.636 -> 0.649; docs/MODEL_EXPERIMENTS.md,
    # finding 17). The library's DualGlowConfig keeps the paper's "top".
    side_levels: str = "none"
    # DualGlowConfig.side_template: the PET template moves with the covariates.
    side_template: bool = True
    # DualGlowConfig.anatomy_template: the PET template moves with the subject's anatomy too,
    # by the MRI terms below (their least-squares maps kept, not discarded). On phantom v2
    # (150 training subjects, held-out sub-049..060) deviation r 0.65 -> 0.78, MAE 0.091 ->
    # 0.074, pairwise r 0.92 -> 0.77 (true 0.67), real brains still sane with the term held
    # to its training range at synthesis (docs/MODEL_EXPERIMENTS.md, finding 23).
    anatomy_template: bool = True
    # The side template's least-squares start holds the anatomy fixed through the MRI at each
    # voxel (0) and the MRI blurred to these FWHMs (mm): a PET's resolution (ADNI's PETs are
    # brought to 8 mm) and a region's scale (uptake follows the region's grey matter). With the
    # voxel's MRI alone the fit takes part of atrophy's effect as age (DualGlow.fit_pet_template;
    # docs/MODEL_EXPERIMENTS.md, finding 17). (0,) is the fit of the models trained before it.
    side_template_mri_fwhm: Sequence[float] = (0.0, 8.0, 24.0)
    # (With anatomy_template these terms are also what the template moves with.)
    # What that MRI is: the T1w intensity ("t1w"), its grey-matter probability ("gm", a
    # 3-class intensity mixture fitted on the training brains: dualglow_app.tissue), which
    # separates atrophy from age better (docs/MODEL_EXPERIMENTS.md, finding 21), or the grey
    # matter's and the CSF's ("gm+csf"), which follow the subject better (finding 24).
    side_template_anatomy: str = "gm+csf"
    # DualGlowConfig.anatomy_reading: the tissue maps as mixture posteriors or as fractions of
    # the grid T1w, or natively ("native", "native-fractions", "native-pve"): each subject's
    # own, read at the T1w's native resolution (dualglow_app.preprocess.tissue_maps_on_grid,
    # stacked beside the training data; tissue.DEFAULT_ANATOMY_READING the default:
    # docs/MODEL_EXPERIMENTS.md, findings 26 and 31-35).
    # Irrelevant to side_template_anatomy "t1w".
    anatomy_reading: str = DEFAULT_ANATOMY_READING
    # Covariates whose side-template maps keep their least-squares start (as the templates
    # themselves do) instead of training with the flows. None: age's, when the model is
    # conditioned on age (trained, the age map drifts back towards taking atrophy's effect as
    # age: docs/MODEL_EXPERIMENTS.md, finding 17); () trains every map.
    side_template_fixed: Sequence[str] | None = None
    # DualGlowConfig.lambda_mri: the weight of log p(xm) in eq. 12. The app's default is 10x the
    # paper's 1e-3: at 1e-3 the MRI flow is barely a density model, and an unseen MRI beyond
    # the training anatomy (larger ventricles) reached a top latent of 1340 (training <= 57)
    # and a validation bpd of 1170; at 0.01 training through the real preprocessing is stable
    # and follows the subject better (docs/MODEL_EXPERIMENTS.md, finding 14).
    lambda_mri: float = 0.01
    side_info: Sequence[str] = ()
    epochs: int = 100
    # Early stopping: stop after `patience` epochs without a relative improvement of at least
    # `min_delta` in the validation figure `select_on` names. None: train all `epochs`.
    patience: int | None = None
    min_delta: float = 0.0
    # Early stopping cannot end the run before this many epochs: the mode's MAE can sit on a
    # plateau for the first epochs while the flows learn the density (finding 15).
    min_epochs: int = 0
    # The validation figure that early stopping and keep="best" follow (VALIDATION_SELECTION):
    # "bpd", the flow's own objective, or "mae", the mode's error in SUVR, which the
    # evaluation's baselines stop on; the bpd bottoms out before the subject is followed
    # (docs/MODEL_EXPERIMENTS.md, finding 15).
    select_on: str = "bpd"
    batch_size: int = 2
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 50.0
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    # bf16 autocast on a CPU with native bf16 (AVX512-BF16 / AMX): the networks in bf16, the
    # flow arithmetic in float32; 0.66x the step time at the same validation bpd
    # (docs/PERFORMANCE.md, 2b). Off by default so that a run is the same on every CPU.
    cpu_bf16: bool = False
    resume: bool = False
    max_steps: int | None = None
    # Wall-clock budget of the epochs in seconds (a cluster job's limit, a leased GPU): no epoch
    # starts that would not end within it, judged by the longest epoch so far; the checkpoint
    # is written, so a later run with resume=True continues. None: no limit.
    time_limit: float | None = None
    model_name: str = "dualglow"
    nprocs: int | None = None
    preprocess_only: bool = False
    skip_bids_validation: bool = False
    mri_input: bool = True
    report: bool = True
    # Centre both images on the mean training image (DualGlowConfig.template_shape): the
    # model starts from the population mean PET and learns departures from it.
    template_centring: bool = True
    # Which weights become the model: "best" = the epoch with the lowest validation figure
    # `select_on` names (small cohorts overfit), "last" = the final epoch. Without a validation
    # split, always the last.
    keep: str = "best"
    # Invertible backprop (dualglow_app.model.memory): "auto" turns it on for deep flows
    # (depth >= 16), where stored activations dominate memory; "on"/"off" force it.
    memory_saving: str = "auto"

    def __post_init__(self) -> None:
        self.bids_dir = Path(self.bids_dir)
        self.output_dir = Path(self.output_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir else default_work_dir(self.output_dir)
        self.participant_labels = tuple(self.participant_labels)
        self.session_labels = tuple(self.session_labels)
        self.side_info = tuple(self.side_info)
        self.side_template_mri_fwhm = tuple(float(v) for v in self.side_template_mri_fwhm)
        if self.side_template_fixed is None:
            self.side_template_fixed = ("age",) if "age" in self.side_info else ()
        self.side_template_fixed = tuple(self.side_template_fixed)
        problems = []
        problems += [f"side_info: {problem}" for name in self.side_info if (problem := name_problem(name))]
        if len(set(self.side_info)) != len(self.side_info):
            problems.append(f"side_info {list(self.side_info)}: a covariate named twice")
        if self.time_limit is not None and not self.time_limit > 0:
            problems.append(f"time_limit={self.time_limit} (seconds, above 0)")
        for name in ("epochs", "batch_size", "depth", "hidden", "relation_hidden", "relation_layers"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction={self.val_fraction} (use 0 <= F < 1)")
        from dualglow_app.model.dualglow import TOP_PRIORS  # training needs torch anyway

        if self.top_prior not in TOP_PRIORS:
            problems.append(f"top_prior={self.top_prior!r} (choose from {list(TOP_PRIORS)})")
        if self.patience is not None:
            if self.patience < 1:
                problems.append(f"patience={self.patience} (must be >= 1, or None)")
            if self.val_fraction == 0:
                problems.append(f"patience={self.patience} needs a validation split (val_fraction > 0)")
        if not 0.0 <= self.min_delta < 1.0:
            problems.append(f"min_delta={self.min_delta} (a relative improvement, 0 <= d < 1)")
        if not 0 <= self.min_epochs <= self.epochs:
            problems.append(f"min_epochs={self.min_epochs} (0 <= min_epochs <= epochs={self.epochs})")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if set(self.side_template_fixed) - set(self.side_info):
            problems.append(f"side_template_fixed={list(self.side_template_fixed)} (covariates of side_info only)")
        if self.side_template_anatomy not in SIDE_TEMPLATE_ANATOMY:
            problems.append(f"side_template_anatomy={self.side_template_anatomy!r} (choose from {list(SIDE_TEMPLATE_ANATOMY)})")
        if self.anatomy_reading not in ANATOMY_READINGS:
            problems.append(f"anatomy_reading={self.anatomy_reading!r} (choose from {list(ANATOMY_READINGS)})")
        if not self.side_template_mri_fwhm or any(not v >= 0 for v in self.side_template_mri_fwhm):
            problems.append(f"side_template_mri_fwhm={list(self.side_template_mri_fwhm)} (one or more FWHMs in mm, >= 0)")
        if self.device not in DEVICES:
            problems.append(f"device={self.device!r} (auto, cpu or cuda)")
        if self.keep not in ("best", "last"):
            problems.append(f"keep={self.keep!r} (best or last)")
        if self.select_on not in VALIDATION_SELECTION:
            problems.append(f"select_on={self.select_on!r} (choose from {list(VALIDATION_SELECTION)})")
        if self.memory_saving not in ("auto", "on", "off"):
            problems.append(f"memory_saving={self.memory_saving!r} (auto, on or off)")
        if not self.model_name or any(c in self.model_name for c in "/\\ "):
            problems.append(f"model_name={self.model_name!r} (a file name without '/' or spaces)")
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems) + ".")

    @property
    def model_grid(self) -> ModelGrid:
        """The grid these options train on (:func:`dualglow_app.grid.resolve_grid`)."""
        return resolve_grid(self.grid, self.grid_mm, self.levels)

    @property
    def reads_tissue_maps(self) -> bool:
        """Whether the model these options build reads native tissue maps beside the MRI
        (a native ``anatomy_reading`` of tissue terms, templates of the real MRI)."""
        return self.tissue_reading in NATIVE_READINGS and self.template_centring

    @property
    def tissue_reading(self) -> str:
        """The DualGlowConfig.anatomy_reading these options build: ``anatomy_reading`` where the
        MRI terms are tissue maps of the real MRI, else "posterior" (a T1w-intensity term, or an
        ablated MRI, reads no tissue)."""
        return tissue_reading(self.anatomy_reading, self.side_template_anatomy, self.mri_input)

    @property
    def dataset_spec(self) -> DatasetSpec:
        """The paired data these options train on."""
        assert self.work_dir is not None
        return DatasetSpec(
            self.bids_dir, self.work_dir, self.model_grid, tuple(self.participant_labels),
            tuple(self.session_labels), self.tracer, tuple(self.side_info), self.nprocs,
            self.tissue_reading if self.reads_tissue_maps else None,
        )  # fmt: skip

    @property
    def checkpoint_path(self) -> Path:
        """Where the per-epoch checkpoint lives (work dir: shared by nodes, not a derivative)."""
        assert self.work_dir is not None
        return self.work_dir / "train" / self.model_name / "checkpoint.pt"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (paths as strings), stored in the model metadata and checkpoints."""
        return json.loads(json.dumps(asdict(self), default=str))


__all__ = [
    "OUTPUT_SPACES", "PICKLE_SUFFIXES", "ParticipantOptions", "ParticipantUsageError", "T1W", "TrainOptions",
    "default_work_dir",
]
