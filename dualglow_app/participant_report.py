"""The participant level's HTML report, one per subject: ``OUTPUT_DIR/sub-X.html``.

Built from the files on disk (so a rerun that skips finished scans still reports them): per
scan the inputs and settings from the sidecar, how far the T1w was from the training data,
an orthogonal montage of the preprocessed T1w, the synthetic PET, its departure from the
model's mean training PET and the uncertainty map,
and the age sweep's regional curves. A failed report is logged and never fails the subject
(as in fMRIPrep's reports).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualglow_app.bids import Scan, sidecar_path
from dualglow_app.derivatives import DEMONSTRATION_WARNING, SYNTHETIC_WARNING, planned_outputs
from dualglow_app.grid import SPACE as MNI
from dualglow_app.imaging import load_nifti
from dualglow_app.inference import CLIPPED_WARNING, LATENT_WARNING
from dualglow_app.log import get_logger
from dualglow_app.options import ParticipantOptions

if TYPE_CHECKING:
    from dualglow_app.weights import LoadedModel

log = get_logger(__name__)


def write_subject_report(
    options: ParticipantOptions, model: LoadedModel, subject: str, scans: Sequence[Scan]
) -> Path | None:
    """``OUTPUT_DIR/sub-X.html`` from the files on disk; a failure is logged, never raised."""
    path = options.output_dir / f"sub-{subject}.html"
    try:
        from dualglow_app.report import HtmlReport

        banner = SYNTHETIC_WARNING + (" " + DEMONSTRATION_WARNING if model.demonstration else "")
        report = HtmlReport(f"sub-{subject}: synthetic FDG-PET", banner=banner)
        shown = 0
        for scan in scans:
            shown += _report_scan(report, scan, options, model)
        if not shown:
            return None
        return report.write(path)
    except Exception as err:  # a figure must never fail the subject (fMRIPrep reports/core.py)
        log.error("sub-%s: report %s not written: %s", subject, path.name, err)
        log.debug("report traceback", exc_info=True)
        return None


def population_mean_pet(model: LoadedModel, like: Any) -> np.ndarray | None:
    """The model's mean training PET (SUVR; its PET template) on the grid of the image ``like``,
    or None for a model without templates."""
    import nibabel as nib

    from dualglow_app.imaging import resample_to

    template = getattr(model.model, "pet_template", None)
    if template is None:
        return None
    suvr = model.scaling.pet_from_model(template[0, 0].detach().cpu().numpy().astype(np.float32))
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


def _report_scan(report: Any, scan: Scan, options: ParticipantOptions, model: LoadedModel) -> int:
    from dualglow_app.report import line_figure

    planned = planned_outputs(scan, options)
    if not planned["mean"].is_file():
        return 0
    if scan.session:
        report.add_heading(f"Session {scan.session}")
    sidecar = json.loads(sidecar_path(planned["mean"]).read_text(encoding="utf-8"))
    age = sidecar.get("Age")
    rows = [
        ["T1w", scan.t1w.name],
        ["model", f"{sidecar.get('ModelName')} (sha256 {str(sidecar.get('ModelSHA256'))[:12]})"],
        ["age", "not used" if age is None else f"{age:g} years (from {sidecar.get('AgeSource')})"],
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
    report.add_figure(
        scan_montage(planned, model),
        f"{scan.prefix}: axial, coronal and sagittal slices in {MNI} (res-{options.output_res}). The row "
        "'synthetic minus the mean training PET' is how this subject's synthetic PET departs from the population the model learnt (its mean training PET): "
        "a model that ignored the MRI would show only noise there.",
    )
    table = planned.get("sweep_table")
    if table is not None and table.is_file():
        series: dict[str, dict[float, list[float]]] = {}
        focus = ("whole_brain", "Precuneus", "Cingulate_Post", "Frontal_Sup_2", "Hippocampus")
        for line in table.read_text(encoding="utf-8").splitlines()[1:]:
            age_text, region, value = line.split("\t")
            name = region.removesuffix("_L").removesuffix("_R")
            if name in focus:
                series.setdefault(name, {}).setdefault(float(age_text), []).append(float(value))
        ages = list(options.age_sweep)
        curves = {n: [float(np.mean(series[n][a])) for a in ages] for n in focus if n in series}
        report.add_figure(
            line_figure(ages, curves, "age (years)", "mean synthetic SUVR", "Age sweep (AAL2 regions, L+R)"),
            "Regional means of the age-sweep images; the same noise at every age, so only the age differs.",
        )
    return 1


__all__ = ["population_mean_pet", "scan_montage", "write_subject_report"]
