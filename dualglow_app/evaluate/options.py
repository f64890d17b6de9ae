"""What an evaluation is asked and what it returns: its options, its input, its result.

:class:`EvaluateOptions` holds every setting (``dualglow-evaluate`` maps its options onto it),
:class:`Cohort` the prepared paired arrays the cross-validation runs on, and
:class:`EvaluationResult` what it measured and wrote. The constants name the methods, the
diagnostic groups of Table 2 and the ages of the Fig. 7 sweep (Sun et al. 2019, sec. 4).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dualglow_app.covariates import name_problem
from dualglow_app.options import VALIDATION_SELECTION, default_work_dir
from dualglow_app.tissue import ANATOMY_READINGS, DEFAULT_ANATOMY_READING, SIDE_TEMPLATE_ANATOMY

if TYPE_CHECKING:
    from dualglow_app.dataset import PairedVolumes

DUALGLOW = "dualglow"
BASELINE_NAMES = ("unet", "pix2pix", "cgan", "cvae", "meanpet")
#: What the baselines read, and how many input channels that is: the T1w alone (the paper's),
#: or the T1w and its native tissue maps (grey matter, CSF), read as DUAL-GLOW's anatomy
#: template reads them where its reading is native (crossval.evaluation_tissue_maps).
BASELINE_INPUTS = {"t1w": 1, "t1w+tissue-maps": 3}
#: Table 2's classes (sec. 4): impaired vs not.
IMPAIRED = ("MCI", "LMCI", "AD")
NOT_IMPAIRED = ("CN", "SMC", "EMCI")
#: Ages every held-out scan is synthesised at for the age trends (sec. 4, Fig. 7).
SWEEP_AGES = (50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
#: Age at which relative slopes are expressed (the phantom's factors are 1 at this age).
REFERENCE_AGE = 73.0
#: The phantom region that the default SUVR reference (cerebellar hemispheres) corresponds to.
PHANTOM_REFERENCE_REGION = "cerebellar_cortex"
#: AAL2 regions of Fig. 7: ageing-sensitive (frontal, anterior cingulate, insula) and AD-sensitive ones.
FIGURE7_AAL = ("Frontal_Sup_2_L", "Cingulate_Ant_L", "Insula_L", "Precuneus_L", "Cingulate_Post_L", "Hippocampus_L")
#: Part of every run key: bumped when a cached (fold, method) result would no longer be valid
#: (2: AAL2 regional means from :mod:`dualglow_app.regions`; predictions from
#: :func:`dualglow_app.inference.predict`; 3: inner validation split and early stopping;
#: 4: every baseline's output 0 outside the brain; 5: one cache key per method).
RUN_CACHE_VERSION = 5
#: Part of DUAL-GLOW's own cache key: bumped when a change to the model or its training makes
#: cached DUAL-GLOW results stale (the baselines' stay valid). 2: the paper's top-level prior
#: (eq. 16: p(zp_top | c), without the top MRI latent); 3: the side template (fitted with the
#: anatomy held fixed), covariate scaling learnt from the data, the top prior on (zm_top, c) by default;
#: 4: the side template's fit holds the MRI around each voxel fixed too (TrainOptions.side_template_mri_fwhm)
#: and its age map stays at that fit (TrainOptions.side_template_fixed); 5: the anatomy template's
#: term held to its training range at synthesis (DualGlow.anatomy_term; the reference run's
#: anatomy-template row of docs/RESULTS.md was computed before it); 6: that range is set with the
#: template's fit and holds the term in the likelihood too (DualGlow.set_anatomy_term_range).
DUALGLOW_REVISION = 6


class EvaluationError(RuntimeError):
    """The evaluation cannot run as asked (too few subjects for the folds, unknown baselines)."""


@dataclass
class EvaluateOptions:
    """Every setting of an evaluation run; ``dualglow-evaluate`` maps its options onto these.

    DUAL-GLOW's architecture (``depth``, ``hidden``, ``relation_hidden``) and optimiser
    (``lr``, ``warmup_steps``) default to the group level's; ``baseline_width`` is the first
    layer's channel count of every baseline network and ``baseline_inputs`` what they read
    (:data:`BASELINE_INPUTS`: the T1w, as the paper's baselines, or the T1w and its native
    tissue maps, what DUAL-GLOW's anatomy template reads by default). ``batch_size`` is shared.

    Training budget, the same for every method: each fold's training scans are split by
    subject into an inner training and validation part (``inner_val_fraction``); every method
    trains up to ``epochs`` epochs and stops once its validation score has not improved by
    ``min_delta`` (relative) for ``patience`` epochs, keeping its best epoch. The baselines
    follow the validation MAE; DUAL-GLOW the figure ``dualglow_select_on`` names, by default
    the same MAE (``"bpd"``: its validation bpd(PET | MRI), the group level's default, which
    bottoms out before the subject is followed), and not before ``dualglow_min_epochs``.
    ``patience=None`` trains
    every method for exactly ``epochs`` epochs without a validation split (the paper-style
    fixed budget).
    """

    bids_dir: Path | None
    output_dir: Path
    work_dir: Path | None = None
    folds: int = 5
    baselines: Sequence[str] = BASELINE_NAMES
    epochs: int = 200
    patience: int | None = 10
    min_delta: float = 1e-3
    dualglow_select_on: str = "mae"
    # DUAL-GLOW's early stopping waits this many epochs: its mode's MAE sits on a plateau while
    # the flows learn the density, longer than ``patience`` epochs on a small fold (finding 23).
    dualglow_min_epochs: int = 0
    inner_val_fraction: float = 0.2
    side_info: Sequence[str] = ()
    # Covariates withheld from the synthetic PETs Table 2 classifies (None: every categorical
    # covariate whose classes are Table 2's diagnoses; see crossval.table2_withheld).
    table2_withhold: Sequence[str] | None = None
    seed: int = 0
    device: str = "auto"
    grid: str = "cpu4mm"
    batch_size: int = 2
    depth: int = 8
    hidden: int = 128
    relation_hidden: int = 64
    relation_layers: int = 2
    top_prior: str = "mri+side"
    top_mri_side: str = "keep"
    lambda_mri: float = 0.01
    # As the group level's (TrainOptions): which relation networks take c, the side template's
    # MRI adjustment (FWHMs in mm; T1w or grey-matter probability) and the covariates whose
    # maps stay at their start (None: age when conditioned on it).
    side_levels: str = "none"
    side_template_mri_fwhm: Sequence[float] = (0.0, 8.0, 24.0)
    anatomy_template: bool = True
    side_template_anatomy: str = "gm+csf"
    anatomy_reading: str = DEFAULT_ANATOMY_READING
    side_template_fixed: Sequence[str] | None = None
    lr: float = 1e-3
    warmup_steps: int = 100
    baseline_width: int = 16
    baseline_inputs: str = "t1w"
    ages: Sequence[float] = SWEEP_AGES
    participant_labels: Sequence[str] = ()
    nprocs: int | None = None
    skip_bids_validation: bool = False
    report: bool = True

    def __post_init__(self) -> None:
        self.bids_dir = Path(self.bids_dir) if self.bids_dir is not None else None
        self.output_dir = Path(self.output_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir else default_work_dir(self.output_dir)
        self.baselines = tuple(self.baselines)
        self.side_info = tuple(self.side_info)
        self.ages = tuple(float(a) for a in self.ages)
        self.participant_labels = tuple(self.participant_labels)
        self.side_template_mri_fwhm = tuple(float(v) for v in self.side_template_mri_fwhm)
        if self.side_template_fixed is not None:
            self.side_template_fixed = tuple(self.side_template_fixed)
        problems = []
        unknown = sorted(set(self.baselines) - set(BASELINE_NAMES))
        if unknown:
            problems.append(f"baselines {unknown}: choose from {list(BASELINE_NAMES)}")
        if self.dualglow_select_on not in VALIDATION_SELECTION:
            problems.append(f"dualglow_select_on={self.dualglow_select_on!r} (choose from {list(VALIDATION_SELECTION)})")
        if not 0 <= self.dualglow_min_epochs <= self.epochs:
            problems.append(f"dualglow_min_epochs={self.dualglow_min_epochs} (0 <= N <= epochs={self.epochs})")
        if self.folds < 2:
            problems.append(f"folds={self.folds} (cross-validation needs at least 2)")
        if self.patience is not None and (self.patience < 1 or not 0.0 < self.inner_val_fraction < 1.0):
            problems.append(f"patience={self.patience} with inner_val_fraction={self.inner_val_fraction} "
                            "(patience >= 1 needs 0 < inner_val_fraction < 1)")  # fmt: skip
        for name in ("epochs", "batch_size", "depth", "hidden", "relation_hidden", "relation_layers", "baseline_width"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        problems += [f"side_info: {problem}" for name in self.side_info if (problem := name_problem(name))]
        if self.table2_withhold is not None:
            self.table2_withhold = tuple(self.table2_withhold)
            stray = sorted(set(self.table2_withhold) - set(self.side_info))
            if stray:
                problems.append(f"table2_withhold {stray}: not among the covariates (side_info {list(self.side_info)})")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r} (auto, cpu or cuda)")
        if self.side_template_anatomy not in SIDE_TEMPLATE_ANATOMY:
            problems.append(f"side_template_anatomy={self.side_template_anatomy!r} (choose from {list(SIDE_TEMPLATE_ANATOMY)})")
        if self.anatomy_reading not in ANATOMY_READINGS:
            problems.append(f"anatomy_reading={self.anatomy_reading!r} (choose from {list(ANATOMY_READINGS)})")
        if self.baseline_inputs not in BASELINE_INPUTS:
            problems.append(f"baseline_inputs={self.baseline_inputs!r} (choose from {list(BASELINE_INPUTS)})")
        if problems:
            raise ValueError("invalid evaluation options: " + "; ".join(problems) + ".")

    @property
    def methods(self) -> tuple[str, ...]:
        """DUAL-GLOW first, then the baselines, in the order of every table."""
        return (DUALGLOW, *self.baselines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (paths as strings), stored in ``summary.json``."""
        return json.loads(json.dumps(asdict(self), default=str))


@dataclass
class Cohort:
    """Prepared arrays for :func:`~dualglow_app.evaluate.evaluate_cohort`: the stacked pairs
    and what the tables need.

    ``data`` holds volumes, masks, ages, scan labels and subject ids
    (:class:`dualglow_app.dataset.PairedVolumes`); ``diagnosis`` is one entry per scan (None
    where unknown; left empty, the data's own ``data.diagnosis``); ``phantom_dir`` is the BIDS
    root of a dualglow-phantom cohort, whose ground truth the age trends are compared with
    (None for real data).
    """

    data: PairedVolumes
    diagnosis: list[str | None] = field(default_factory=list)
    phantom_dir: Path | None = None

    def __post_init__(self) -> None:
        self.diagnosis = list(self.diagnosis) if self.diagnosis else list(self.data.diagnosis)
        if len(self.diagnosis) != len(self.data):
            raise ValueError(f"Cohort: {len(self.diagnosis)} diagnoses for {len(self.data)} scans")


@dataclass
class EvaluationResult:
    """What :func:`~dualglow_app.evaluate.evaluate_cohort` measured and wrote."""

    rows: list[dict[str, Any]]
    table1: dict[str, dict[str, dict[str, float]]]
    wilcoxon: dict[str, dict[str, dict[str, Any]]]
    table2: dict[str, Any]
    age_trends: dict[str, Any] | None
    splits: list[dict[str, Any]]
    timing: dict[str, list[float]]
    # Input specificity and regional agreement (statistics.subject_level) on held-out scans.
    subject_level: dict[str, Any] = field(default_factory=dict)
    # Per method and fold: epochs run, the kept epoch, early stop, seconds, validation curves.
    training: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics_path: Path | None = None
    summary_path: Path | None = None
    report_path: Path | None = None
