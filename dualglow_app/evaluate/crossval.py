"""K-fold cross-validation of DUAL-GLOW against the baselines (Sun et al. 2019, sec. 4).

1. :func:`make_splits` - folds grouped by subject (sessions of one person never straddle
   folds), stratified by impaired / not / unknown diagnosis, shuffled with the run's seed.
2. Each (fold, method): trained on the fold's training scans, seeded ``seed + fold``; its
   predictions of every scan (held-out volumes, AAL2 means of all scans, and the age sweep of
   the held-out ones) are saved under ``WORK_DIR/evaluate/<run key>/fold<k>/<method>-<method
   key>.npz`` as soon as they exist (:func:`_cached_run`), so a re-run of the same command
   resumes, and a re-run that changes one method's settings retrains that method only.
   The baselines train first, DUAL-GLOW last. Each entry is computed under a lock
   (:func:`dualglow_app.io.entry_lock`), so several runs of one command on one work dir
   (a SLURM array, two terminals) share the folds and methods instead of repeating them.
   DUAL-GLOW's prediction is :func:`dualglow_app.inference.predict` at temperature 0 (its
   conditional mode: one deterministic sample, clipped to the model's range, masked).
3. :func:`evaluate_cohort` scores the held-out scans and hands the statistics
   (:mod:`dualglow_app.evaluate.statistics`) to the outputs
   (:mod:`dualglow_app.evaluate.report`); :func:`evaluate` is its BIDS front end
   (:func:`load_cohort`: the group level's preprocessing and work-dir cache).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualglow_app import __version__
from dualglow_app.data import IntensityScaling
from dualglow_app.evaluate.atlases import EvaluationAtlases, evaluation_atlases
from dualglow_app.evaluate.options import (
    BASELINE_INPUTS,
    DUALGLOW,
    DUALGLOW_REVISION,
    IMPAIRED,
    NOT_IMPAIRED,
    RUN_CACHE_VERSION,
    Cohort,
    EvaluateOptions,
    EvaluationError,
    EvaluationResult,
)
from dualglow_app.evaluate.report import build_summary, write_outputs
from dualglow_app.evaluate.statistics import (
    age_trends,
    classification,
    explainable_scores,
    explainable_truth,
    impairment_classes,
    paired_tests,
    phantom_true_slopes,
    subject_level,
    summarise,
    swept_slope_agreement,
    swept_truth,
)
from dualglow_app.io import atomic_path, entry_lock
from dualglow_app.log import get_logger
from dualglow_app.metrics import image_metrics
from dualglow_app.preprocess import CACHE_VERSION, GRID_VERSION
from dualglow_app.tissue import NATIVE_READINGS, tissue_reading

log = get_logger(__name__)

#: One fold's stored result of one method: arrays by name (see :func:`_run_method`).
Run = dict[str, np.ndarray]


# --------------------------------------------------------------------------- splits


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


# --------------------------------------------------------------------------- one fold, one method


def _inner_split(cohort: Cohort, train_rows: np.ndarray, fold: int, options: EvaluateOptions) -> tuple[np.ndarray, np.ndarray]:
    """The fold's training rows split by subject into (inner training, validation) rows: the
    same split DUAL-GLOW's :func:`dualglow_app.train.train` makes (seed + fold), so every
    method stops on the same validation scans. Without early stopping: all rows, none."""
    from dualglow_app.dataset import split_subjects

    if options.patience is None:
        return train_rows, train_rows[:0]
    inner, val = split_subjects([cohort.data.subjects[i] for i in train_rows], options.inner_val_fraction,
                                options.seed + fold)  # fmt: skip
    return train_rows[inner], train_rows[val]


def _fit_dualglow(cohort: Cohort, train_rows: np.ndarray, fold: int, options: EvaluateOptions,
                  method_dir: Path) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """DUAL-GLOW trained on ``train_rows`` (the group level's :func:`dualglow_app.train.train`,
    with its inner validation split and early stopping): its TrainResult and what the training did."""
    from dualglow_app.options import TrainOptions
    from dualglow_app.train import train

    validating = options.patience is not None
    train_options = TrainOptions(
        bids_dir=cohort.phantom_dir or options.bids_dir or options.output_dir,
        output_dir=method_dir, work_dir=method_dir, model_name=f"fold{fold}",
        grid=options.grid, depth=options.depth, hidden=options.hidden, relation_hidden=options.relation_hidden,
        relation_layers=options.relation_layers,
        top_prior=options.top_prior, top_mri_side=options.top_mri_side, lambda_mri=options.lambda_mri,
        side_levels=options.side_levels, side_template_mri_fwhm=options.side_template_mri_fwhm,
        side_template_anatomy=options.side_template_anatomy, side_template_fixed=options.side_template_fixed,
        anatomy_template=options.anatomy_template, anatomy_reading=options.anatomy_reading,
        side_info=options.side_info, epochs=options.epochs, batch_size=options.batch_size, lr=options.lr,
        warmup_steps=options.warmup_steps, val_fraction=options.inner_val_fraction if validating else 0.0,
        patience=options.patience, min_delta=options.min_delta if validating else 0.0, keep="best",
        select_on=options.dualglow_select_on, min_epochs=options.dualglow_min_epochs if validating else 0,
        seed=options.seed + fold, device=options.device, resume=True, nprocs=options.nprocs,
        skip_bids_validation=True, report=False,
    )  # fmt: skip
    # Nothing is selected on held-out data: the inner validation scans come from the fold's
    # training scans, the same ones the baselines stop on.
    result = train(train_options, data=cohort.data.subset(train_rows))
    record = {
        "epochs_run": result.epochs, "best_epoch": result.selected_epoch, "stopped_early": result.stopped_early,
        "val_curve": [h.get("val_mae_suvr", float("nan")) for h in result.history],
        "val_deviation_curve": [h.get("val_deviation_r", float("nan")) for h in result.history],
    }  # fmt: skip
    return result, record


def table2_withheld(options: EvaluateOptions, specs: dict[str, Any]) -> list[str]:
    """The covariates kept from the synthetic PETs that Table 2 classifies: ``table2_withhold``
    when given, else every categorical covariate whose classes are Table 2's diagnoses (fed the
    diagnosis, a generator would hand the classifier the answer)."""
    if options.table2_withhold is not None:
        return list(options.table2_withhold)
    labels = set(IMPAIRED) | set(NOT_IMPAIRED)
    return [name for name, spec in specs.items() if spec.is_categorical and set(spec.levels) & labels]


def _dualglow_predictions(
    trained: Any, cohort: Cohort, train_rows: np.ndarray, test_rows: np.ndarray, options: EvaluateOptions,
    atlases: EvaluationAtlases,
) -> tuple[np.ndarray, Run]:  # fmt: skip
    """Every scan's conditional mode (T = 0) at its own covariates; with a covariate Table 2
    must not see (:func:`table2_withheld`), every scan's mode with it withheld (averaged over
    its classes, weighted by their share of the fold's training scans; a continuous one at
    the training mean) as AAL2 means (``aal_table2``); and the regional means of each
    held-out scan synthesised at every sweep age (age-conditioned models only)."""
    from dualglow_app.inference import predict

    data, model, scaling = cohort.data, trained.model, trained.scaling
    age_conditioned = "age" in options.side_info
    # The encoding the fold's model learnt: train() learnt it from exactly these rows.
    specs = data.covariate_specs(options.side_info, train_rows) if options.side_info else {}
    values = {name: data.covariate_values(name) for name in options.side_info}

    def marginal_choices(name: str) -> list[tuple[float, float]]:
        spec = specs[name]
        if spec.is_categorical:
            return [(spec.encode(level), spec.counts[level] / spec.n) for level in spec.levels]
        return [(float(spec.centre or 0.0), 1.0)]

    def own(row: int) -> tuple[dict[str, float], list[str]]:
        """The row's covariates as the fold's model takes them, and those it cannot take (a
        class none of the fold's training scans had): those are averaged over, like withheld ones."""
        side, unknown = {}, []
        for name, spec in specs.items():
            value = values[name][row]
            if value is None:
                raise EvaluationError(f"{data.labels[row]}: no {name}; add it to participants.tsv or drop it")
            if spec.problem(value) is not None:
                unknown.append(name)
                continue
            side[name] = spec.encode(value)
        return side, unknown

    def mode(row: int, side: dict[str, float], average_over: Sequence[str] = ()) -> np.ndarray:
        """The conditional mode, averaged over the classes of ``average_over`` (weighted by the
        fold's training shares; a continuous covariate at the training mean)."""
        combinations: list[tuple[dict[str, float], float]] = [({}, 1.0)]
        for name in average_over:
            combinations = [({**c, name: v}, w * cw) for c, cw in combinations for v, w in marginal_choices(name)]
        t1w, mask = np.asarray(data.mri[row]), np.asarray(data.mask[row])
        tissue_maps = data.row_tissue_maps(row)
        return sum(weight * predict(model, scaling, t1w, mask, {**side, **fixed} or None, tissue_maps=tissue_maps).mean
                   for fixed, weight in combinations)  # type: ignore[return-value]

    def mode_own(row: int, **override: float) -> np.ndarray:
        side, unknown = own(row)
        if unknown:
            log.warning("%s: %s of a class the fold's training scans never had; averaged over the classes they had",
                        data.labels[row], ", ".join(f"{n} = {values[n][row]}" for n in unknown))  # fmt: skip
        return mode(row, {**side, **override}, [n for n in unknown if n not in override])

    every = np.stack([mode_own(i) for i in range(len(data))])
    extra: Run = {}
    withheld = table2_withheld(options, specs)
    if withheld:
        marginal = []
        for i in range(len(data)):
            side, unknown = own(i)
            kept = {n: v for n, v in side.items() if n not in withheld}
            marginal.append(mode(i, kept, [*withheld, *(n for n in unknown if n not in withheld)]))
        masks = np.asarray(data.mask)
        extra["aal_table2"] = atlases.aal.means(np.stack(marginal) * masks, masks)
    if not age_conditioned:
        return every, extra
    maps = {f"sweep_{name}": m for name, m in (("aal", atlases.aal), ("phantom", atlases.phantom)) if m is not None}
    sweeps = {key: np.empty((len(test_rows), len(options.ages), len(m.regions))) for key, m in maps.items()}
    for k, row in enumerate(test_rows):
        swept = np.stack([mode_own(int(row), age=age) for age in options.ages])  # (ages, X, Y, Z)
        for key, region_map in maps.items():
            sweeps[key][k] = region_map.means(swept, np.asarray(data.mask[row]))  # (ages, regions)
    return every, {**sweeps, **extra}


def _baseline_checkpoint(method_dir: Path, fold: int) -> Path:
    """Where a baseline's fit of ``fold`` checkpoints every epoch (removed once the fold's result is stored)."""
    return method_dir / f"fold{fold}-checkpoint.pt"


def _baseline_predictions(method: str, cohort: Cohort, train_rows: np.ndarray, fold: int,
                          options: EvaluateOptions, device: Any, method_dir: Path) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """Every scan predicted by baseline ``method`` trained on ``train_rows`` (SUVR, unmasked),
    early-stopped on the fold's inner validation scans, and what its training did. The fit
    checkpoints every epoch under ``method_dir``: an interrupted evaluation resumes it."""
    from dualglow_app.baselines import BaselineOptions, make_baseline

    data, scaling = cohort.data, IntensityScaling()
    # The mean PET has nothing to stop: it averages all the fold's training scans (the
    # reference of the deviation correlation is the same mean).
    inner, val = (train_rows, train_rows[:0]) if method == "meanpet" else _inner_split(cohort, train_rows, fold, options)
    baseline = make_baseline(method, BaselineOptions(
        epochs=options.epochs, max_epochs=options.epochs, patience=options.patience or 1,
        min_delta=options.min_delta, batch_size=options.batch_size, width=options.baseline_width,
        seed=options.seed + fold, device=str(device), input_channels=BASELINE_INPUTS[options.baseline_inputs],
    ))  # fmt: skip
    # Every scan's inputs once: the fit reads the fold's rows of them, the prediction all.
    every_input = baseline_inputs(data, np.arange(len(data.mri)), options.baseline_inputs)
    model_scale = {"train": every_input[inner], "val": every_input[val]}
    checkpoint = _baseline_checkpoint(method_dir, fold)
    if len(val):
        baseline.fit(model_scale["train"], scaling.pet_to_model(np.asarray(data.pet[inner])), model_scale["val"],
                     scaling.pet_to_model(np.asarray(data.pet[val])), val_mask=np.asarray(data.mask[val]) > 0,
                     checkpoint=checkpoint)  # fmt: skip
    else:
        baseline.fit(model_scale["train"], scaling.pet_to_model(np.asarray(data.pet[inner])), checkpoint=checkpoint)
    record = {
        "epochs_run": int(getattr(baseline, "epochs_run", options.epochs)), "best_epoch": int(getattr(baseline, "best_epoch", 0)),
        "stopped_early": bool(getattr(baseline, "stopped_early", False)),
        # Validation MAE in SUVR (the baselines measure it on the model's [0, 1] scale).
        "val_curve": [float(h["val_mae"]) * scaling.pet_suvr_max for h in baseline.history if "val_mae" in h],
        "val_deviation_curve": [],
    }  # fmt: skip
    return scaling.pet_from_model(baseline.predict(every_input)), record


def baseline_inputs(data: Any, rows: np.ndarray, inputs: str) -> np.ndarray:
    """What the baselines read of ``rows`` of ``data`` (:class:`~dualglow_app.dataset.PairedVolumes`)
    on the model scale, for ``inputs`` of :data:`BASELINE_INPUTS`: the T1w, (N, X, Y, Z), or
    the T1w and its tissue maps, (N, 3, X, Y, Z)."""
    t1w = IntensityScaling().mri_to_model(np.asarray(data.mri[rows]))
    if BASELINE_INPUTS[inputs] == 1:
        return t1w
    if data.tissue_maps is None:
        raise EvaluationError("--baseline-inputs t1w+tissue-maps: the stacked data hold no tissue maps")
    return np.concatenate([t1w[:, None], np.asarray(data.tissue_maps[rows], np.float32)], axis=1)


def _run_method(
    method: str, cohort: Cohort, train_rows: np.ndarray, test_rows: np.ndarray, fold: int,
    options: EvaluateOptions, method_dir: Path, atlases: EvaluationAtlases, device: Any,
) -> Run:  # fmt: skip
    """Train ``method`` on ``train_rows`` (checkpoints under ``method_dir``); predict: held-out volumes, AAL2 means of every scan,
    and (DUAL-GLOW with age) the age sweep's regional means of the held-out scans."""
    data = cohort.data
    start = time.perf_counter()
    sweeps: Run = {}
    if method == DUALGLOW:
        trained, record = _fit_dualglow(cohort, train_rows, fold, options, method_dir)
        fit_s = time.perf_counter() - start
        all_pred, sweeps = _dualglow_predictions(trained, cohort, train_rows, test_rows, options, atlases)
    else:
        all_pred, record = _baseline_predictions(method, cohort, train_rows, fold, options, device, method_dir)
        fit_s = time.perf_counter() - start
    masks = np.asarray(data.mask)
    all_pred = all_pred * masks  # the brain is what is scored; background is set to 0 for every method
    return {
        "test_rows": np.asarray(test_rows),
        "test_pred": all_pred[test_rows].astype(np.float32),
        "aal_all": atlases.aal.means(all_pred, masks),
        "fit_seconds": np.array(fit_s),
        "seconds": np.array(time.perf_counter() - start),
        "epochs_run": np.array(record["epochs_run"]),
        "best_epoch": np.array(record["best_epoch"]),
        "stopped_early": np.array(record["stopped_early"]),
        "val_curve": np.asarray(record["val_curve"], dtype=np.float64),
        "val_deviation_curve": np.asarray(record["val_deviation_curve"], dtype=np.float64),
        **sweeps,
    }


#: Settings every method's result depends on: the cohort's folds and the shared training budget.
_SHARED_SETTINGS = ("folds", "seed", "epochs", "patience", "min_delta", "inner_val_fraction", "batch_size",
                    "participant_labels")  # fmt: skip
#: Settings only DUAL-GLOW's result depends on (with :data:`DUALGLOW_REVISION`); the baselines' own.
_METHOD_SETTINGS = {
    DUALGLOW: ("depth", "hidden", "relation_hidden", "relation_layers", "lr", "warmup_steps", "side_info", "ages",
               "top_prior", "top_mri_side", "lambda_mri", "table2_withhold", "side_levels", "side_template_mri_fwhm",
               "side_template_fixed", "side_template_anatomy", "dualglow_select_on", "dualglow_min_epochs",
               "anatomy_template", "anatomy_reading"),
    "baselines": ("baseline_width", "baseline_inputs"),
}


#: Settings added after results were cached: at these values they stay out of the method key.
_KEY_DEFAULTS: dict[str, Any] = {"table2_withhold": None, "side_template_anatomy": "t1w", "dualglow_select_on": "bpd",
                                  "dualglow_min_epochs": 0, "anatomy_template": False, "anatomy_reading": "posterior",
                                  "baseline_inputs": "t1w"}


def _run_key(cohort: Cohort, options: EvaluateOptions) -> str:
    """Same cohort + same folds and budget -> same folder, so a re-run resumes."""
    shared = {k: v for k, v in options.to_dict().items() if k in _SHARED_SETTINGS}
    # The preprocessing's versions too: results on differently preprocessed data are not reused.
    parts = [RUN_CACHE_VERSION, CACHE_VERSION, GRID_VERSION, __version__, shared, list(cohort.data.labels), cohort.data.grid.to_dict()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _method_key(method: str, options: EvaluateOptions) -> str:
    """What one method's cached result depends on beyond the run key: changing DUAL-GLOW's
    settings (or its code revision) retrains DUAL-GLOW only, and a baseline's width only the baselines."""
    names = _METHOD_SETTINGS[DUALGLOW if method == DUALGLOW else "baselines"]
    # Settings left at the default they had before they existed keep the keys of results cached then.
    settings = {k: v for k, v in options.to_dict().items() if k in names and _KEY_DEFAULTS.get(k, object()) != v}
    if method != DUALGLOW:
        # Baselines given tissue maps read DUAL-GLOW's native reading; "native", the only one
        # before the reading had a choice, keeps the keys of results cached then.
        maps = evaluation_tissue_maps(options) if BASELINE_INPUTS[options.baseline_inputs] > 1 else None
        if maps not in (None, "native"):
            settings["tissue_maps"] = maps
    parts = [method, settings, DUALGLOW_REVISION if method == DUALGLOW else None]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _cached_run(path: Path, compute: Callable[[], Run]) -> Run:
    """The stored result at ``path``, or ``compute()``'s, saved there atomically."""
    if path.is_file():
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    result = compute()
    arrays: dict[str, Any] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return result


#: Seconds between looks at the (fold, method) results that other evaluations are computing.
SHARED_WORK_POLL_S = 30.0


def _run_folds(
    cohort: Cohort, options: EvaluateOptions, splits: Sequence[tuple[np.ndarray, np.ndarray]],
    run_dir: Path, atlases: EvaluationAtlases, device: Any,
) -> dict[str, list[Run]]:  # fmt: skip
    """Every (fold, method), from the cache where it is there: {method: [run of fold k]}.

    Each (fold, method) is computed under its entry's lock, and one that another process holds
    is passed over and collected once it is there: several evaluations of the same command on
    one work dir (two terminals, a SLURM array) share the work instead of repeating it.
    """
    data = cohort.data
    # The baselines first: they are cheap next to DUAL-GLOW, and their results stay valid
    # when only DUAL-GLOW changes (:func:`_method_key`).
    pending = [(method, fold) for method in (*options.baselines, DUALGLOW) for fold in range(len(splits))]
    keys = {method: _method_key(method, options) for method in options.methods}
    total, found = len(pending), {}
    announced_wait = False
    while pending:
        elsewhere = []
        for method, fold in pending:
            path = run_dir / f"fold{fold}" / f"{method}-{keys[method]}.npz"
            with entry_lock(path, wait=False) as held:
                if not held:
                    elsewhere.append((method, fold))
                    continue
                cached = path.is_file()
                train_rows, test_rows = splits[fold]
                method_dir = run_dir / f"{method}-{keys[method]}"
                result = _cached_run(path, functools.partial(
                    _run_method, method, cohort, train_rows, test_rows, fold, options, method_dir, atlases, device))  # fmt: skip
                _baseline_checkpoint(method_dir, fold).unlink(missing_ok=True)  # the stored result replaces it
            found[method, fold] = result
            mae = np.mean([image_metrics(data.pet[r], p, data.mask[r])["mae_suvr"]
                           for r, p in zip(result["test_rows"], result["test_pred"], strict=True)])  # fmt: skip
            log.info("[%d/%d] fold %d/%d %-8s %s in %.0f s; held-out MAE %.4f SUVR", len(found), total, fold + 1,
                     len(splits), method, "reused" if cached else "trained", float(result["seconds"]), mae)  # fmt: skip
        if elsewhere and not announced_wait:
            log.info("waiting for %s, which another evaluation on this work dir is computing",
                     ", ".join(f"{m} fold {k + 1}" for m, k in elsewhere))  # fmt: skip
            announced_wait = True
        if elsewhere and len(elsewhere) == len(pending):
            time.sleep(SHARED_WORK_POLL_S)
        pending = elsewhere
    return {method: [found[method, fold] for fold in range(len(splits))] for method in options.methods}


# --------------------------------------------------------------------------- the core


def _fold_references(cohort: Cohort, splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Each fold's mean training PET (what ``meanpet`` predicts): the deviation correlation's reference."""
    from dualglow_app.validation import reference_pet

    return [reference_pet(cohort.data, train_rows, IntensityScaling()) for train_rows, _ in splits]


def _scan_rows(cohort: Cohort, options: EvaluateOptions, references: Sequence[np.ndarray],
               results: dict[str, list[Run]]) -> list[dict[str, Any]]:  # fmt: skip
    """Table 1's raw material: one row per held-out scan, fold and method, with its metrics;
    the deviation correlation against the fold's mean training PET (``references[fold]``,
    :func:`_fold_references`: what ``meanpet`` predicts)."""
    data = cohort.data
    rows: list[dict[str, Any]] = []
    for method in options.methods:
        for fold, result in enumerate(results[method]):
            for row, pred in zip(result["test_rows"], result["test_pred"], strict=True):
                scores = image_metrics(np.asarray(data.pet[row]), pred, np.asarray(data.mask[row]),
                                       reference=references[fold])  # fmt: skip
                rows.append({"label": data.labels[row], "subject": data.subjects[row], "fold": fold, "method": method,
                             "age": float(data.age[row]), "diagnosis": cohort.diagnosis[row] or "n/a", **scores})  # fmt: skip
    return rows


def _table2(cohort: Cohort, options: EvaluateOptions, splits: Sequence[tuple[np.ndarray, np.ndarray]],
            atlases: EvaluationAtlases, results: dict[str, list[Run]]) -> dict[str, Any]:  # fmt: skip
    """Table 2 on AAL2 means: true PET, each method's synthetic PET of fold k in fold k, and
    the references: the T1w's regional means with the age (the information ceiling of anything
    computed from the MRI and age) and the age alone."""
    data = cohort.data
    true_aal = atlases.aal.means(np.asarray(data.pet), np.asarray(data.mask))
    mri_aal = atlases.aal.means(np.asarray(data.mri), np.asarray(data.mask))
    age = np.nan_to_num(np.asarray(data.age, dtype=np.float64), nan=float(np.nanmean(data.age)))[:, None]
    features = {"true PET": [true_aal] * len(splits), "MRI (T1w regional means) + age": [np.hstack([mri_aal, age])] * len(splits),
                "age alone": [age] * len(splits)}  # fmt: skip
    for method in options.methods:
        # DUAL-GLOW conditioned on the diagnosis: the PETs made with it withheld (aal_table2).
        features[f"synthetic PET ({method})"] = [r["aal_table2"] if "aal_table2" in r else r["aal_all"]
                                                  for r in results[method]]  # fmt: skip
    table = classification(features, cohort.diagnosis, splits, options.seed)
    table["dualglow_covariates"] = _table2_covariates(cohort, options)
    return table


def _table2_covariates(cohort: Cohort, options: EvaluateOptions) -> dict[str, Any]:
    """What DUAL-GLOW's Table 2 PETs were conditioned on: the covariates fed, those withheld and
    how, and any fed covariate that follows the impairment closely (|r| >= 0.5), which the
    classifier may read through the synthetic PET (e.g. a cognitive score)."""
    if not options.side_info:
        return {"fed": [], "withheld": [], "how": "no covariates"}
    data = cohort.data
    specs = data.covariate_specs(options.side_info)
    withheld = table2_withheld(options, specs)
    fed = [name for name in options.side_info if name not in withheld]
    classes = impairment_classes(cohort.diagnosis)
    close: dict[str, float] = {}
    for name in fed:
        if specs[name].is_categorical:
            continue
        pairs = [(float(v), c) for v, c in zip(data.covariate_values(name), classes, strict=True) if v is not None and c >= 0]
        if len(pairs) > 2 and len({c for _, c in pairs}) == 2 and len({v for v, _ in pairs}) > 1:
            r = float(np.corrcoef(np.array(pairs).T)[0, 1])
            if abs(r) >= 0.5:
                close[name] = round(r, 3)
                log.warning("Table 2: DUAL-GLOW's synthetic PETs were fed %s, which follows the impairment "
                            "(r = %.2f); withhold it with --table2-withhold %s", name, r, name)  # fmt: skip
    how = ("each scan's synthetic PET averaged over every class of the withheld covariate, weighted by its share "
           "of the fold's training scans (a continuous one at the training mean): the diagnosis never reaches the "
           "classifier through the generator") if withheld else "nothing withheld"  # fmt: skip
    return {"fed": fed, "withheld": withheld, "how": how, "fed_following_impairment": close}


def _training_record(run: Run) -> dict[str, Any]:
    """What one (fold, method) training did: epochs, kept epoch, early stop, time, curves."""
    return {
        "epochs_run": int(run["epochs_run"]), "best_epoch": int(run["best_epoch"]),
        "stopped_early": bool(run["stopped_early"]), "seconds": float(run["seconds"]),
        "val_mae_curve": [float(v) for v in run["val_curve"]],
        "val_deviation_curve": [float(v) for v in run["val_deviation_curve"]],
    }  # fmt: skip


def _subject_level(cohort: Cohort, options: EvaluateOptions, references: Sequence[np.ndarray],
                   atlases: EvaluationAtlases, results: dict[str, list[Run]]) -> dict[str, Any]:  # fmt: skip
    """Input specificity and regional agreement of every method on its held-out scans; on a
    phantom cohort also every method against the explainable truth."""
    data = cohort.data
    masks = np.asarray(data.mask)
    true_aal = atlases.aal.means(np.asarray(data.pet), masks)
    held_out = {method: [(r["test_rows"], r["test_pred"], r["aal_all"][r["test_rows"]]) for r in runs]
                for method, runs in results.items()}  # fmt: skip
    out = subject_level(np.asarray(data.pet), masks, true_aal, held_out)
    origin = _phantom_origin(cohort, np.arange(len(data)))
    if origin is not None:
        assert options.work_dir is not None
        explainable = explainable_truth(origin[:2], origin[2], data.grid, cache=options.work_dir / "explainable_truth")
        out["explainable_truth"] = explainable_scores(
            explainable, np.asarray(data.pet), masks, references,
            {method: [(rows, predictions) for rows, predictions, _ in folds] for method, folds in held_out.items()},
        )  # fmt: skip
    return out


def _phantom_origin(cohort: Cohort, rows: np.ndarray) -> tuple[int, int, list[int]] | None:
    """(seed, version, phantom subject index of each of ``rows``) when the cohort is a phantom
    that records its seed and every scan is its own single-session subject; else None (no
    regenerated truth: swept ages, explainable PET)."""
    from dualglow_app.phantom import phantom_seed, phantom_version
    from dualglow_app.phantom.cohort import subject_index

    if cohort.phantom_dir is None:
        return None
    data = cohort.data
    seed, version = phantom_seed(cohort.phantom_dir), phantom_version(cohort.phantom_dir)
    labels = [data.labels[i] for i in rows]
    if seed is None or version is None or len(set(data.subjects)) != len(data) or \
            not all(re.fullmatch(r"sub-\d+", label) for label in labels):  # fmt: skip
        log.info("no regenerated phantom truth (the phantom's seed is not recorded, or scans are not one per subject)")
        return None
    return seed, version, [subject_index(label) for label in labels]


def _age_experiment(cohort: Cohort, options: EvaluateOptions, atlases: EvaluationAtlases,
                    runs: list[Run]) -> dict[str, Any]:  # fmt: skip
    """Fig. 7 from DUAL-GLOW's per-fold sweeps (``runs``), with the phantom's truth if any."""
    order = np.concatenate([r["test_rows"] for r in runs])
    sweeps = {"aal": np.concatenate([r["sweep_aal"] for r in runs])}
    names = {"aal": atlases.aal.names}
    truth = None
    if atlases.phantom is not None and cohort.phantom_dir is not None:
        sweeps["phantom"] = np.concatenate([r["sweep_phantom"] for r in runs])
        names["phantom"] = atlases.phantom.names
        truth = phantom_true_slopes(cohort.phantom_dir, atlases.phantom.names)
    trends = age_trends(sweeps, names, options.ages, truth)
    trends["scans"] = [cohort.data.labels[i] for i in order]
    if "phantom_comparison" in trends:
        synthetic = np.array(trends["phantom_comparison"]["synthetic_relative_per_decade"])
        swept = _swept_truth_comparison(cohort, options, order, synthetic)
        if swept is not None:
            trends["phantom_comparison"]["swept_truth"] = swept
    return trends


def _swept_truth_comparison(cohort: Cohort, options: EvaluateOptions, rows: np.ndarray,
                            synthetic: np.ndarray) -> dict[str, Any] | None:  # fmt: skip
    """The synthetic regional age slopes against the same subjects' true PETs swept over the
    same ages with their own anatomy (:func:`statistics.swept_truth`): the issue's age targets.
    The phantom calibration's slopes (``phantom_comparison`` itself) are the activity's before
    the PET's blur mixes neighbouring regions; this truth went through the same blur, grid and
    regions as the synthetic sweep. None unless every scan is its own single-session phantom."""
    origin = _phantom_origin(cohort, rows)
    if origin is None:
        return None
    seed, version, indices = origin
    assert options.work_dir is not None
    sweep = swept_truth((seed, version), indices, cohort.data.grid, np.asarray(cohort.data.mask[rows]), options.ages,
                        cache=options.work_dir / "age_truth")  # fmt: skip
    return {**swept_slope_agreement(synthetic, sweep, options.ages), "seed": seed, "version": version}


def evaluate_cohort(cohort: Cohort, options: EvaluateOptions) -> EvaluationResult:
    """Cross-validate DUAL-GLOW and the baselines on prepared arrays; write the outputs
    (``metrics.tsv``, ``summary.json``, ``tables.md`` and, with ``options.report``,
    ``evaluation.html``)."""
    import torch

    from dualglow_app.runtime import cpu_threads, resolve_device

    data = cohort.data
    if options.nprocs:
        torch.set_num_threads(cpu_threads(options.nprocs))
    age_conditioned = "age" in options.side_info
    if age_conditioned and not np.all(np.isfinite(np.asarray(data.age))):
        raise EvaluationError("--side-info age: some scans have no age; add it to participants.tsv or drop --side-info")
    for name in options.side_info:
        if any(v is None for v in data.covariate_values(name)):
            raise EvaluationError(f"--side-info {name}: some scans have no {name}; add it to participants.tsv or drop it")
    splits = make_splits(data.subjects, options.folds, options.seed, impairment_classes(cohort.diagnosis))
    device = resolve_device(options.device)
    assert options.work_dir is not None
    run_dir = options.work_dir / "evaluate" / _run_key(cohort, options)
    log.info("evaluation of %d scans (%d subjects), %d folds, methods %s; results cached in %s",
             len(data), len(set(data.subjects)), options.folds, ", ".join(options.methods), run_dir)  # fmt: skip
    atlases = evaluation_atlases(data.grid, phantom=cohort.phantom_dir is not None and age_conditioned)
    results = _run_folds(cohort, options, splits, run_dir, atlases, device)

    # Each fold's mean training PET, the reference of every deviation correlation below.
    references = _fold_references(cohort, splits)
    rows = _scan_rows(cohort, options, references, results)
    evaluation = EvaluationResult(
        rows=rows, table1=summarise(rows, options.methods), wilcoxon=paired_tests(rows, options.methods),
        table2=_table2(cohort, options, splits, atlases, results),
        age_trends=_age_experiment(cohort, options, atlases, results[DUALGLOW]) if age_conditioned else None,
        splits=[{"fold": k, "test": [data.labels[i] for i in te], "n_train": int(len(tr))}
                for k, (tr, te) in enumerate(splits)],
        timing={m: [float(r["seconds"]) for r in results[m]] for m in options.methods},
        training={m: [_training_record(r) for r in results[m]] for m in options.methods},
        subject_level=_subject_level(cohort, options, references, atlases, results),
    )  # fmt: skip
    evaluation.summary = build_summary(cohort, options, evaluation, str(device), run_dir)
    write_outputs(cohort, options, evaluation, results)
    return evaluation


# --------------------------------------------------------------------------- BIDS front end


def evaluation_tissue_maps(options: EvaluateOptions) -> str | None:
    """The native tissue maps (DatasetSpec.tissue_maps) an evaluation stacks: DUAL-GLOW's native
    reading where it reads one; else "native" where the baselines read tissue maps; else none."""
    reading = tissue_reading(options.anatomy_reading, options.side_template_anatomy)
    if reading in NATIVE_READINGS:
        return reading
    return "native" if BASELINE_INPUTS[options.baseline_inputs] > 1 else None


def load_cohort(options: EvaluateOptions) -> Cohort:
    """Preprocess (or reuse the work-dir cache of) every T1w + PET pair, with its diagnosis
    (:func:`dualglow_app.dataset.prepare_dataset`, the group level's own data layer)."""
    from dualglow_app.bids import check_bids_dataset, is_phantom_cohort
    from dualglow_app.dataset import DatasetSpec, prepare_dataset
    from dualglow_app.grid import resolve_grid

    assert options.bids_dir is not None and options.work_dir is not None
    if not options.skip_bids_validation:
        check_bids_dataset(options.bids_dir)
    spec = DatasetSpec(
        options.bids_dir, options.work_dir, resolve_grid(options.grid), participant_labels=tuple(options.participant_labels),
        side_info=tuple(options.side_info), nprocs=options.nprocs,
        tissue_maps=evaluation_tissue_maps(options),
    )  # fmt: skip
    data = prepare_dataset(spec)
    phantom = options.bids_dir if is_phantom_cohort(options.bids_dir) else None
    return Cohort(data=data, diagnosis=list(data.diagnosis), phantom_dir=phantom)


def evaluate(options: EvaluateOptions) -> EvaluationResult:
    """The full evaluation of the paired scans in ``options.bids_dir`` (see the package docstring)."""
    if options.bids_dir is None:
        raise ValueError("evaluate() needs options.bids_dir; use evaluate_cohort() for prepared arrays")
    return evaluate_cohort(load_cohort(options), options)


__all__ = ["evaluate", "evaluate_cohort", "load_cohort", "make_splits"]
