"""The participant level's derivatives: names, JSON sidecars and the dataset's own files.

Every output of a scan has a role (``t1w``, ``mean``, ``sd``, ``mean_t1w``, ``age60``, ...)
and a BIDS-Derivatives path (:func:`planned_outputs`); sidecars say the image is SYNTHETIC,
name the model and its sha256, the age, seed, samples and temperature it was made with
(:func:`provenance`), and how far the T1w was from the training data. Nothing here computes
an image: :mod:`dualglow_app.synthesize` does, then writes through these helpers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dualglow_app import __version__
from dualglow_app.bids import (
    Scan,
    derivative_path,
    sidecar_path,
    template_uri,
    write_bidsignore,
    write_dataset_description,
)
from dualglow_app.covariates import AGE_SPEC, CovariateSpec, Value, desc_label
from dualglow_app.grid import SPACE as MNI
from dualglow_app.io import remove_stale_temporaries, write_text
from dualglow_app.log import get_logger
from dualglow_app.options import T1W, ParticipantOptions

if TYPE_CHECKING:
    from dualglow_app.preprocess import T1wResult
    from dualglow_app.weights import LoadedModel

log = get_logger(__name__)

# Outputs the BIDS specification has no name for: reports, logs, regional tables, and the
# group level's model files when both levels share an output folder ("models/" leaves the
# folder itself flagged by bids-validator-deno; "models" does not).
BIDSIGNORE = ("*.html", "logs/", "*_stats.tsv", "*_stats.json", "models")
ATLAS_ENTITY = "AAL2"
SYNTHETIC_WARNING = (
    "SYNTHETIC FDG-PET generated from the T1w MRI by a model; it is not a measurement "
    "and must not be used for diagnosis."
)
DEMONSTRATION_WARNING = (
    "Demonstration model trained on digital phantoms: the images show what the method does, "
    "not real FDG uptake."
)


def age_label(age: float) -> str:
    """A BIDS-safe ``desc-`` label for an age: 60 -> ``age60``, 72.5 -> ``age72p5``."""
    return desc_label("age", float(age))


#: desc- labels of a scan's other outputs; a sweep label may not take one.
RESERVED_LABELS = ("preproc", "synthetic", "sd")


@dataclass(frozen=True)
class SweepPlan:
    """One ``--sweep``, checked against the model: the covariate, its values as the model
    takes them (numbers, or class names), each value's ``desc-`` label, and whether the
    measured PET is moved too (``counterfactual_pet``)."""

    name: str
    spec: CovariateSpec
    values: tuple[Value, ...]
    labels: tuple[str, ...]
    counterfactual: bool = False

    @property
    def table_desc(self) -> str:
        """``desc-`` of the regional table: ``agesweep``, ``diagnosissweep``."""
        return re.sub(r"[^A-Za-z0-9]", "", self.name) + "sweep"

    @staticmethod
    def measured(label: str) -> str:
        """``desc-`` of the measured PET moved to a sweep value: ``age85`` -> ``measuredAge85``."""
        return "measured" + label[:1].upper() + label[1:]


def sweep_plans(options: ParticipantOptions, model: LoadedModel) -> list[SweepPlan]:
    """The run's sweeps checked against the model's covariates; a covariate the model does not
    take, or a value it cannot take, raises ``ValueError`` with the fix."""
    covariates = model.covariates
    plans = []
    for sweep in options.parsed_sweeps():
        if sweep.name not in covariates:
            taken = ", ".join(covariates) or "none"
            flag = "--age-sweep" if sweep.name == "age" and options.age_sweep else f"--sweep {sweep.name}=..."
            raise ValueError(f"{flag}: model {model.name} is not conditioned on {sweep.name} (its covariates: {taken}); "
                             "drop it or use a model trained with it")  # fmt: skip
        spec = covariates[sweep.name]
        values = tuple(sweep.resolve(spec))
        labels = tuple(desc_label(sweep.name, value, spec) for value in values)
        clash = sorted({label for label in labels if labels.count(label) > 1 or label in RESERVED_LABELS})
        if clash:
            raise ValueError(f"--sweep {sweep.name}: values give the same desc- label(s) {clash}; sweep fewer values")
        plans.append(SweepPlan(sweep.name, spec, values, labels, options.counterfactual_pet))
    return plans


def legacy_sweep_plans(options: ParticipantOptions) -> list[SweepPlan]:
    """``age_sweep`` alone as a plan (callers without a model, e.g. older code paths)."""
    if not options.age_sweep:
        return []
    ages = tuple(float(a) for a in options.age_sweep)
    return [SweepPlan("age", AGE_SPEC, ages, tuple(age_label(a) for a in ages), options.counterfactual_pet)]


def res_label(options: ParticipantOptions) -> str:
    """The ``res-`` label of the MNI outputs (TemplateFlow's, in mm)."""
    return str(options.output_res)


def planned_outputs(scan: Scan, options: ParticipantOptions, plans: Sequence[SweepPlan] | None = None) -> dict[str, Path]:
    """Every image/table this scan will get, by role (``mean``, ``sd``, ``age60``,
    ``diagnosisAD``, ``measuredAge85``, ``agesweep`` (a table), ...); ``plans`` are the run's
    sweeps (:func:`sweep_plans`; None: ``options.age_sweep`` alone)."""
    out, res = options.output_dir, res_label(options)
    planned = {
        "t1w": derivative_path(out, scan, desc="preproc", space=MNI, res=res, tracer=None, suffix="T1w", datatype="anat"),
        "mean": derivative_path(out, scan, desc="synthetic", space=MNI, res=res),
    }
    if options.samples > 1:
        planned["sd"] = derivative_path(out, scan, desc="sd", space=MNI, res=res)
    if T1W in options.output_spaces:
        planned["mean_t1w"] = derivative_path(out, scan, desc="synthetic", space=T1W)
        if options.samples > 1:
            planned["sd_t1w"] = derivative_path(out, scan, desc="sd", space=T1W)
    for plan in legacy_sweep_plans(options) if plans is None else plans:
        for label in plan.labels:
            planned[label] = derivative_path(out, scan, desc=label, space=MNI, res=res)
        planned[plan.table_desc] = sweep_table_path(scan, options, plan.table_desc)
        if plan.counterfactual and scan.pet is not None:
            for label in plan.labels:
                planned[plan.measured(label)] = derivative_path(out, scan, desc=plan.measured(label), space=MNI, res=res)
            measured_table = plan.measured(plan.table_desc)
            planned[measured_table] = sweep_table_path(scan, options, measured_table)
    return planned


def outputs_complete(planned: dict[str, Path]) -> bool:
    """Whether every planned output and its JSON sidecar exist: an image is renamed into place
    before its sidecar, so a run killed between the two leaves an image that is not finished."""
    return all(path.is_file() and sidecar_path(path).is_file() for path in planned.values())


def sweep_table_path(scan: Scan, options: ParticipantOptions, desc: str = "agesweep") -> Path:
    """``..._trc-FDG_space-MNI..._res-2_atlas-AAL2_desc-agesweep_stats.tsv`` (bidsignored)."""
    name = (
        f"{scan.prefix}_trc-FDG_space-{MNI}_res-{res_label(options)}_atlas-{ATLAS_ENTITY}_desc-{desc}_stats.tsv"
    )
    return options.output_dir / scan.folder / "pet" / name


def provenance(model: LoadedModel, options: ParticipantOptions, age: float | None,
               covariates: Mapping[str, Value] | None = None) -> dict[str, Any]:  # fmt: skip
    """The settings that determine an output; a finished output made otherwise is reported.
    A model with covariates besides age also records them all (``Covariates``: name -> value)."""
    fields: dict[str, Any] = {
        "ModelName": model.name,
        "ModelSHA256": model.sha256,
        "Age": age,
        "Seed": options.seed,
        "Samples": options.samples,
        "Temperature": options.temperature,
    }
    if covariates is not None and set(model.side_names) - {"age"}:
        fields["Covariates"] = dict(covariates)
    return fields


def common_sidecar(
    model: LoadedModel,
    options: ParticipantOptions,
    settings: dict[str, Any],
    age_source: str | None,
    source_t1w: str,
) -> dict[str, Any]:
    """Sidecar fields every synthetic PET of a scan shares (tracer, units, SYNTHETIC, provenance)."""
    fields: dict[str, Any] = {
        "TracerName": "FDG",
        "SkullStripped": True,
        "Units": "SUVR",
        "Synthetic": True,
        "Sources": [source_t1w],
        **settings,
        "AgeSource": age_source if settings["Age"] is not None else None,
        "DemonstrationModel": model.demonstration,
        "SoftwareName": "dualglow",
        "SoftwareVersion": __version__,
    }
    reference = model.metadata.training.get("reference_region")
    if reference:
        fields["ReferenceRegion"] = reference
    # Without age conditioning there is no age to report: leave the keys out rather than null.
    return {key: value for key, value in fields.items() if value is not None}


def mni_fields(options: ParticipantOptions) -> dict[str, Any]:
    """SpatialReference and Resolution of an output on TemplateFlow's ``res-XX`` grid."""
    res = options.output_res
    return {
        "SpatialReference": template_uri(MNI, res),
        "Resolution": {res_label(options): f"TemplateFlow res-{res:02d} grid of {MNI} ({res} mm isotropic)"},
    }


def describe(model: LoadedModel, options: ParticipantOptions, age: float | None, kind: str,
             covariates: Mapping[str, Value] | None = None, swept: str | None = None) -> str:  # fmt: skip
    """The sidecar's Description of a ``mean``, ``sd`` or ``sweep`` image: what it is and how
    made (``covariates``: every covariate's value, for a model with more than age; ``swept``:
    the covariate a sweep image changes)."""
    if kind == "sweep" and swept is not None and swept != "age":
        sweep_text = f"mean of the samples with {swept} set by the {swept} sweep (a counterfactual of this MRI)"
    else:
        sweep_text = "mean of the samples at the age of the age sweep"
    what = {
        "mean": "mean of the samples" if options.samples > 1 else (
            "the conditional mode (one sample at temperature 0)" if options.temperature == 0 else "one sample"
        ),
        "sd": "voxelwise standard deviation of the samples (the model's uncertainty)",
        "sweep": sweep_text,
    }[kind]
    conditioned = f" and age {age:g} years" if model.uses_age and age is not None else ""
    if covariates is not None and set(model.side_names) - {"age"}:
        specs = model.covariates
        conditioned = " and " + ", ".join(f"{name} {specs[name].describe(value)}" for name, value in covariates.items())
    text = (
        f"SYNTHETIC FDG-PET (SUVR), not a measurement: {what}; {options.samples} sample(s) at temperature "
        f"{options.temperature:g}, seed {options.seed}, drawn by the DUAL-GLOW model {model.name} "
        f"(sha256 {model.sha256[:12]}) conditioned on the T1w{conditioned}; dualglow {__version__}."
    )
    return text + (" " + DEMONSTRATION_WARNING if model.demonstration else "")


def t1w_sidecar(t1: T1wResult, source_t1w: str) -> dict[str, Any]:
    """Sidecar of the preprocessed T1w (the image the model saw)."""
    return {
        "Description": (
            "The T1w as the model saw it: skull-stripped (deepbet), N4 bias-corrected, registered to "
            f"{MNI} (ANTs affine + SyN), resampled on the model grid, scaled to [0, 1] within the template brain mask and 0 outside it."
        ),
        "SkullStripped": True,
        "Sources": [source_t1w],
        "IntensityRange": list(t1.intensity_range),
        "TemplateBrainCoverage": round(t1.template_coverage, 4),
        "SoftwareName": "dualglow",
        "SoftwareVersion": __version__,
    }


def warn_if_made_otherwise(mean_path: Path, settings: dict[str, Any]) -> None:
    """Warn when a finished output was made with other settings (it is kept without --overwrite)."""
    try:
        existing = json.loads(sidecar_path(mean_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    differ = [key for key, value in settings.items() if existing.get(key) != value]
    if differ:
        log.warning(
            "%s exists, made with other %s; kept (pass --overwrite to replace it)",
            mean_path.name,
            ", ".join(differ),
        )


def prepare_output(options: ParticipantOptions, model: LoadedModel) -> None:
    """dataset_description.json, .bidsignore and README of the derivative dataset (and away
    with the temporaries a killed run left beside them and the reports)."""
    out = options.output_dir
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    description = f"Synthetic FDG-PET from T1w MRI with DUAL-GLOW (model {model.name}, sha256 {model.sha256[:12]})"
    write_dataset_description(out, options.bids_dir, description)
    write_bidsignore(out, BIDSIGNORE)
    readme = out / "README"
    if not readme.exists():
        text = (
            "dualglow synthetic FDG-PET derivatives\n\n"
            f"{SYNTHETIC_WARNING}\n"
            + (f"{DEMONSTRATION_WARNING}\n" if model.demonstration else "")
            + "\nEach image's JSON sidecar names the model (and its sha256), the age, seed, samples and\n"
            "temperature it was made with. Reports: sub-<label>.html.\n"
        )
        write_text(readme, text)


__all__ = [
    "ATLAS_ENTITY", "BIDSIGNORE", "DEMONSTRATION_WARNING", "SYNTHETIC_WARNING", "SweepPlan", "age_label",
    "common_sidecar", "describe", "legacy_sweep_plans", "mni_fields", "outputs_complete", "planned_outputs",
    "prepare_output", "provenance", "res_label", "sweep_plans", "sweep_table_path", "t1w_sidecar",
    "warn_if_made_otherwise",
]
