"""The participant level's HTML report, one per subject: ``OUTPUT_DIR/sub-X.html``.

Built from the files on disk (so a rerun that skips finished scans still reports them): per
scan the inputs, settings and covariates used (value and source) from the sidecar, how far the
T1w was from the training data, a registration check (the template's brain edge over the
preprocessed T1w, as fMRIPrep shows it), an orthogonal montage of the preprocessed T1w, the
synthetic PET, its departure from the model's mean training PET and the uncertainty map, and
for each sweep its difference maps (e.g. age 85 minus age 65, AD minus CN; the measured PET's
counterfactuals too) and its regional curves (continuous) or table (categorical). A failed
report is logged and never fails the subject (as in fMRIPrep's reports).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualglow_app.bids import Scan, sidecar_path
from dualglow_app.derivatives import (
    DEMONSTRATION_WARNING,
    SYNTHETIC_WARNING,
    SweepPlan,
    planned_outputs,
    sweep_plans,
)
from dualglow_app.grid import SPACE as MNI
from dualglow_app.imaging import load_nifti
from dualglow_app.inference import CLIPPED_WARNING, LATENT_WARNING
from dualglow_app.log import get_logger
from dualglow_app.options import ParticipantOptions

if TYPE_CHECKING:
    from dualglow_app.weights import LoadedModel

log = get_logger(__name__)


def write_subject_report(
    options: ParticipantOptions, model: LoadedModel, subject: str, scans: Sequence[Scan],
    plans: Sequence[SweepPlan] | None = None,
) -> Path | None:  # fmt: skip
    """``OUTPUT_DIR/sub-X.html`` from the files on disk; a failure is logged, never raised.
    ``plans``: the run's sweeps (None: :func:`dualglow_app.derivatives.sweep_plans`)."""
    path = options.output_dir / f"sub-{subject}.html"
    try:
        from dualglow_app.report import HtmlReport

        plans = sweep_plans(options, model) if plans is None else plans
        banner = SYNTHETIC_WARNING + (" " + DEMONSTRATION_WARNING if model.demonstration else "")
        report = HtmlReport(f"sub-{subject}: synthetic FDG-PET", banner=banner)
        shown = 0
        for scan in scans:
            shown += _report_scan(report, scan, options, model, plans)
        if not shown:
            return None
        return report.write(path)
    except Exception as err:  # a figure must never fail the subject (fMRIPrep reports/core.py)
        log.error("sub-%s: report %s not written: %s", subject, path.name, err)
        log.debug("report traceback", exc_info=True)
        return None


def population_mean_pet(model: LoadedModel, like: Any) -> np.ndarray | None:
    """The model's mean training PET (SUVR; :meth:`LoadedModel.mean_training_pet`) on the grid
    of the image ``like``, or None for a model without templates."""
    import nibabel as nib

    from dualglow_app.imaging import resample_to

    suvr = model.mean_training_pet()
    if suvr is None:
        return None
    return resample_to(nib.Nifti1Image(suvr, model.grid.affine), like.affine, like.shape, order=1)


def scan_montage(planned: dict[str, Path], model: LoadedModel | None = None) -> Any:
    """Orthogonal montage of a scan's outputs (``planned_outputs``): the preprocessed T1w, the
    synthetic PET, how it departs from the model's mean training PET (what the MRI and the
    covariates changed) and, with several samples, the uncertainty map; a matplotlib figure."""
    from dualglow_app.report import MontageRow, orthogonal_montage

    image = load_nifti(planned["mean"])
    mean = np.asarray(image.dataobj, dtype=np.float32)
    t1w = np.asarray(load_nifti(planned["t1w"]).dataobj, dtype=np.float32)
    brain = mean > 0
    vmax = float(np.percentile(mean[brain], 99.5)) if brain.any() else 1.0
    montage = [
        MontageRow("T1w (preprocessed, MNI)", t1w, vmin=0.0, vmax=1.0),
        MontageRow("synthetic FDG-PET", mean, cmap="magma", vmin=0.0, vmax=vmax, colorbar_label="SUVR"),
    ]
    population = None if model is None else population_mean_pet(model, image)
    if population is not None and brain.any():
        departure = np.where(brain, mean - population, 0.0).astype(np.float32)
        limit = max(float(np.percentile(np.abs(departure[brain]), 99.5)), 1e-3)
        montage.append(MontageRow("synthetic minus the mean training PET", departure, cmap="RdBu_r", vmin=-limit,
                                  vmax=limit, colorbar_label="SUVR"))  # fmt: skip
    if "sd" in planned and planned["sd"].is_file():
        sd = np.asarray(load_nifti(planned["sd"]).dataobj, dtype=np.float32)
        montage.append(MontageRow("uncertainty (SD of samples)", sd, cmap="viridis", vmin=0.0, colorbar_label="SD (SUVR)"))
    return orthogonal_montage(montage)


def registration_check(planned: dict[str, Path], resolution: int) -> Any:
    """The preprocessed T1w (MNI, ``res-XX``) with the MNI152NLin2009cAsym brain mask's edge
    over it: where the two disagree, registration (or skull stripping) went wrong."""
    import nibabel as nib

    from dualglow_app.imaging import resample_to
    from dualglow_app.report import outline_montage
    from dualglow_app.templates import get_template

    image = load_nifti(planned["t1w"])
    t1w = np.asarray(image.dataobj, dtype=np.float32)
    mask_image = load_nifti(get_template(resolution).mask)
    mask = np.asarray(mask_image.dataobj) > 0
    if mask.shape != t1w.shape or not np.allclose(mask_image.affine, image.affine, atol=1e-3):
        mask = resample_to(nib.Nifti1Image(mask.astype(np.float32), mask_image.affine), image.affine, image.shape,
                           order=0) > 0.5  # fmt: skip
    return outline_montage(t1w, mask, "registration check: template brain edge (red) over the preprocessed T1w")


def sweep_montage(planned: dict[str, Path], plan: SweepPlan) -> tuple[Any, list[str]] | None:
    """Difference maps of one sweep from the files on disk: for a continuous covariate the
    last value minus the first (e.g. age 85 minus age 65), for a categorical one each class
    minus the first (AD minus CN, MCI minus CN); the measured PET's counterfactuals likewise.
    None when the images are not there."""
    from dualglow_app.report import MontageRow, orthogonal_montage

    def image(role: str) -> np.ndarray | None:
        path = planned.get(role)
        return np.asarray(load_nifti(path).dataobj, dtype=np.float32) if path is not None and path.is_file() else None

    spec = plan.spec
    pairs = [(plan.values[-1], plan.labels[-1])] if not spec.is_categorical else list(zip(plan.values[1:], plan.labels[1:], strict=True))
    rows, titles = [], []
    for measured in (False, True):
        role = (lambda label: plan.measured(label)) if measured else (lambda label: label)
        base = image(role(plan.labels[0]))
        if base is None:
            continue
        for value, label in pairs:
            other = image(role(label))
            if other is None:
                continue
            difference = np.where((base > 0) | (other > 0), other - base, 0.0).astype(np.float32)
            title = (f"{'measured PET moved: ' if measured else ''}{plan.name} {spec.describe(value)} minus "
                     f"{spec.describe(plan.values[0])}")  # fmt: skip
            rows.append((title, difference))
            titles.append(title)
    if not rows or len(plan.values) < 2:
        return None
    brain = np.concatenate([np.abs(d[d != 0]) for _, d in rows]) if rows else np.zeros(1)
    limit = max(float(np.percentile(brain, 99.5)) if brain.size else 0.0, 1e-3)
    montage = [MontageRow(title, data, cmap="RdBu_r", vmin=-limit, vmax=limit, colorbar_label="SUVR")
               for title, data in rows]  # fmt: skip
    return orthogonal_montage(montage), titles


FOCUS_REGIONS = ("whole_brain", "Precuneus", "Cingulate_Post", "Frontal_Sup_2", "Hippocampus")


def _sweep_table(path: Path) -> dict[str, dict[str, list[float]]]:
    """A sweep TSV as {region (L+R pooled): {value: [means]}} for :data:`FOCUS_REGIONS`."""
    series: dict[str, dict[str, list[float]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        value, region, mean = line.split("\t")
        name = region.removesuffix("_L").removesuffix("_R")
        if name in FOCUS_REGIONS:
            series.setdefault(name, {}).setdefault(value, []).append(float(mean))
    return series


def _report_sweep(report: Any, planned: dict[str, Path], plan: SweepPlan, scan: Scan) -> None:
    from dualglow_app.report import line_figure

    spec = plan.spec
    for measured in (False, True):
        desc = plan.measured(plan.table_desc) if measured else plan.table_desc
        table = planned.get(desc)
        if table is None or not table.is_file():
            continue
        series = _sweep_table(table)
        texts = [f"{float(v):g}" if not spec.is_categorical else str(v) for v in plan.values]
        what = "the measured PET moved to each value" if measured else "the synthetic PET at each value"
        if not spec.is_categorical:
            curves = {n: [float(np.mean(series[n][t])) for t in texts] for n in FOCUS_REGIONS if n in series}
            xlabel = f"{plan.name} ({spec.units})" if spec.units else plan.name
            if plan.name == "age":
                xlabel = "age (years)"
            title = ("Age sweep" if plan.name == "age" else f"{plan.name} sweep") + " (AAL2 regions, L+R)"
            report.add_figure(
                line_figure([float(v) for v in plan.values], curves, xlabel, "mean SUVR", title),
                f"Regional means of {what}; " + (f"the same MRI and noise at every value, so only {plan.name} differs."
                                                  if not measured else "the same measured PET and MRI at every value."),
            )  # fmt: skip
        else:
            first = texts[0]
            rows = []
            for n in FOCUS_REGIONS:
                if n not in series:
                    continue
                means = [float(np.mean(series[n][t])) for t in texts]
                rows.append([n, *[f"{m:.3f}" + ("" if t == first else f" ({100 * (m / means[0] - 1):+.1f} %)")
                                  for t, m in zip(texts, means, strict=True)]])  # fmt: skip
            report.add_paragraph(f"{plan.name} sweep: regional mean SUVR of {what} (AAL2, L+R), change from {first}.")
            report.add_table(["region", *texts], rows)
    montage = sweep_montage(planned, plan)
    if montage is not None:
        figure, titles = montage
        report.add_figure(figure, f"{scan.prefix}: {plan.name} sweep difference maps (SUVR; red higher, blue lower; "
                                  f"the same MRI and noise in every image), top to bottom: {'; '.join(titles)}.")  # fmt: skip


def _covariate_rows(sidecar: dict[str, Any], model: LoadedModel) -> list[list[str]]:
    """The covariates the synthetic PET was conditioned on, with their sources."""
    values = sidecar.get("Covariates")
    if not values:
        age = sidecar.get("Age")
        return [["age", "not used" if age is None else f"{age:g} years (from {sidecar.get('AgeSource')})"]]
    specs = model.covariates
    sources = sidecar.get("CovariateSources") or {}
    return [[name, f"{specs[name].describe(value) if name in specs else value} (from {sources.get(name, '?')})"]
            for name, value in values.items()]  # fmt: skip


def _report_scan(report: Any, scan: Scan, options: ParticipantOptions, model: LoadedModel,
                 plans: Sequence[SweepPlan] = ()) -> int:  # fmt: skip
    planned = planned_outputs(scan, options, plans)
    if not planned["mean"].is_file():
        return 0
    if scan.session:
        report.add_heading(f"Session {scan.session}")
    sidecar = json.loads(sidecar_path(planned["mean"]).read_text(encoding="utf-8"))
    rows = [
        ["T1w", scan.t1w.name],
        ["model", f"{sidecar.get('ModelName')} (sha256 {str(sidecar.get('ModelSHA256'))[:12]})"],
        *_covariate_rows(sidecar, model),
        ["samples / temperature / seed", f"{sidecar.get('Samples')} / {sidecar.get('Temperature')} / {sidecar.get('Seed')}"],
    ]
    clipped = sidecar.get("ClippedFraction")
    if clipped is not None:
        flag = " (high: this T1w may be unlike the training data)" if clipped > CLIPPED_WARNING else ""
        rows.append(["brain values clipped to the model's range", f"{100 * clipped:.2f} %{flag}"])
    measured = sidecar.get("AgreementWithMeasuredPET")
    if measured:
        rows.append(["agreement with the measured FDG-PET",
                     ", ".join(f"{name} {measured[key]:.3f}" for key, name in (
                         ("mae_suvr", "MAE (SUVR)"), ("pearson_r", "r"), ("ssim", "SSIM"), ("deviation_r", "deviation r"))
                         if key in measured)])  # fmt: skip
    outside = sidecar.get("LatentsOutsideTrainingRange")
    if outside is not None:
        flag = " (high: this T1w is unlike the training data)" if outside > LATENT_WARNING else ""
        rows.append(["MRI latents outside the training range", f"{100 * outside:.2f} %{flag}"])
    report.add_table(["", ""], rows)
    try:
        report.add_figure(
            registration_check(planned, options.output_res),
            f"Registration check, {scan.prefix}: the {MNI} brain mask's edge (red) over the preprocessed T1w "
            f"(res-{options.output_res}). "
            "The edge should follow the brain's outer surface; a shifted, rotated or cut brain means registration or "
            "skull stripping failed, and the synthetic PET is then not to be trusted.",
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - a missing template must not lose the rest of the report
        log.warning("%s: no registration check in the report (%s)", scan.prefix, err)
    report.add_figure(
        scan_montage(planned, model),
        f"{scan.prefix}: axial, coronal and sagittal slices in {MNI} (res-{options.output_res}). The row "
        "'synthetic minus the mean training PET' is how this subject's synthetic PET departs from the population the model learnt (its mean training PET): "
        "a model that ignored the MRI would show only noise there.",
    )
    for plan in plans:
        _report_sweep(report, planned, plan, scan)
    return 1


__all__ = ["population_mean_pet", "registration_check", "scan_montage", "sweep_montage", "write_subject_report"]
