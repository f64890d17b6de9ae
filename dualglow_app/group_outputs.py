"""What the group level writes: the model file with its metadata, the metrics TSV, ``group.html``.

Called by :func:`dualglow_app.train.train` on rank 0 once training has finished:

- ``OUTPUT_DIR/models/NAME.safetensors`` + ``NAME.json`` (:mod:`dualglow_app.weights`), with a
  :class:`~dualglow_app.weights.ModelMetadata` naming the grid, intensity scale, covariates,
  whether the cohort was the synthetic phantom, and the training facts;
- ``OUTPUT_DIR/models/NAME_metrics.tsv``: one row per epoch (:data:`METRIC_COLUMNS`);
- ``OUTPUT_DIR/group.html``: summary, loss curves, metrics table, validation montages. A
  failed report is logged and never fails the training.
"""

from __future__ import annotations

import csv
import io
import platform
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualglow_app import __version__
from dualglow_app.bids import is_phantom_cohort
from dualglow_app.data import IntensityScaling
from dualglow_app.dataset import PairedVolumes, side_information
from dualglow_app.inference import predict
from dualglow_app.io import write_text
from dualglow_app.log import get_logger

if TYPE_CHECKING:
    from dualglow_app.train import TrainOptions, TrainResult
    from dualglow_app.weights import ModelMetadata

log = get_logger(__name__)

METRIC_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_bpd_pet_given_mri", "train_bpd_mri",
    "val_bpd_pet_given_mri", "val_bpd_mri", "val_mae_suvr", "val_psnr_db", "val_ssim", "val_deviation_r",
    "skipped_steps", "samples_per_s", "epoch_seconds",
)  # fmt: skip
DEMONSTRATION_BANNER = "DEMONSTRATION: trained on the synthetic dualglow phantom cohort, not on people"


def write_group_outputs(
    options: TrainOptions, data: PairedVolumes, result: TrainResult, train_rows: np.ndarray,
    val_rows: np.ndarray, scaling: IntensityScaling,
) -> None:  # fmt: skip
    """Write the model, the metrics TSV and (with ``options.report``) the report; fills in
    ``result``'s paths."""
    from dualglow_app.weights import save_model

    models = options.output_dir / "models"
    metadata = model_metadata(options, data, result, scaling)
    result.model_path = save_model(result.model, models / options.model_name, metadata)
    result.metrics_path = write_metrics_tsv(models / f"{options.model_name}_metrics.tsv", result.history)
    if options.report:
        try:
            result.report_path = write_report(options, data, result, train_rows, val_rows, scaling)
        except Exception as err:  # noqa: BLE001 - a failed figure never fails the training
            log.error("group report could not be written (%s: %s); the model is fine", type(err).__name__, err)
    log.info("model written to %s (%d epochs, %d steps, %.0f s)", result.model_path, result.epochs, result.steps,
             result.wall_time_s)  # fmt: skip


def model_metadata(
    options: TrainOptions, data: PairedVolumes, result: TrainResult, scaling: IntensityScaling
) -> ModelMetadata:
    """The model file's :class:`~dualglow_app.weights.ModelMetadata` for this run."""
    import torch

    from dualglow_app.preprocess import preprocessing_versions
    from dualglow_app.weights import ModelMetadata

    training = {
        "subjects": result.train_labels,
        "validation_subjects": result.val_labels,
        "skipped_subjects": data.skipped,
        "epochs": result.epochs,
        "selected_epoch": result.selected_epoch,
        "keep": options.keep,
        "patience": options.patience,
        "min_epochs": options.min_epochs,
        "select_on": options.select_on,
        "stopped_early": result.stopped_early,
        "time_limited": result.time_limited,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "seed": options.seed,
        "batch_size_per_process": options.batch_size,
        "world_size": result.world_size,
        "lr": options.lr,
        "tracer": options.tracer,
        "mri_input": options.mri_input,
        "validation": result.final_metrics,
        "wall_time_s": round(result.wall_time_s, 1),  # of this invocation (a resumed run: since the resume)
        "epoch_seconds_total": round(sum(h.get("epoch_seconds", 0.0) for h in result.history), 1),  # all epochs
        "device": result.device,
        "versions": {"dualglow": __version__, "torch": torch.__version__, "python": platform.python_version()},
        # The participant level warns when it preprocesses differently from these scans.
        "preprocessing": preprocessing_versions(),
        "options": options.to_dict(),
    }
    # How each covariate was learnt, so the participant level encodes a scan as training did;
    # a continuous one's centre and scale are those the network was built with.
    config = result.model.config
    covariates = {
        name: (replace(spec, centre=config.continuous[name][0], scale=config.continuous[name][1])
               if name in config.continuous else spec).to_dict()
        for name, spec in data.covariate_specs(options.side_info).items()
    }  # fmt: skip
    return ModelMetadata(
        grid=data.grid, intensity=scaling, side_info=list(options.side_info),
        demonstration=is_phantom_cohort(options.bids_dir), training=training, covariates=covariates,
    )  # fmt: skip


def write_metrics_tsv(path: Path, history: Sequence[dict[str, float]]) -> Path:
    """One row per epoch; columns :data:`METRIC_COLUMNS` (``n/a`` where not measured)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in history:
        writer.writerow(["n/a" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                         for c in METRIC_COLUMNS])  # fmt: skip
    return write_text(path, buffer.getvalue())


def write_report(
    options: TrainOptions, data: PairedVolumes, result: TrainResult, train_rows: np.ndarray,
    val_rows: np.ndarray, scaling: IntensityScaling,
) -> Path:  # fmt: skip
    """``OUTPUT_DIR/group.html``: summary, loss curves, metrics table, validation montages."""
    from dualglow_app.report import HtmlReport, line_figure, orthogonal_montage

    report = HtmlReport(f"dualglow group level: {options.model_name}",
                        banner=DEMONSTRATION_BANNER if is_phantom_cohort(options.bids_dir) else None)  # fmt: skip
    report.add_table(["fact", "value"], [
        ["training scans", len(result.train_labels)], ["validation scans", ", ".join(result.val_labels) or "none"],
        ["skipped scans", ", ".join(f"{k} ({v})" for k, v in data.skipped.items()) or "none"],
        ["grid", f"{data.grid.voxel_size} mm {data.grid.shape}"], ["epochs / steps", f"{result.epochs} / {result.steps}"],
        ["non-finite steps skipped", result.skipped_steps], ["device", f"{result.device} x {result.world_size}"],
        ["wall time", f"{result.wall_time_s:.0f} s"], ["model", str(result.model_path)],
    ])  # fmt: skip
    if options.side_info:
        report.add_heading("Covariates (side information, eq. 16-17)")
        specs = data.covariate_specs(options.side_info)
        report.add_table(["covariate", "as learnt from the training data (stored in the model file)", "declared in"],
                         [[name, spec.summary().removeprefix(f"{name}: "), spec.declared_in]
                          for name, spec in specs.items()])  # fmt: skip
    history = result.history
    if history:
        epochs = [float(h["epoch"]) for h in history]
        curves = {"train bpd(PET|MRI)": [h["train_bpd_pet_given_mri"] for h in history]}
        if "val_bpd_pet_given_mri" in history[0]:
            curves["validation bpd(PET|MRI)"] = [h["val_bpd_pet_given_mri"] for h in history]
        report.add_heading("Loss curves")
        report.add_figure(line_figure(epochs, curves, "epoch", "bits per voxel"), "-log p(PET | MRI) in bits per voxel (eq. 12)")
        if "val_mae_suvr" in history[0]:
            report.add_figure(line_figure(epochs, {"MAE (SUVR)": [h["val_mae_suvr"] for h in history]}, "epoch", "SUVR"),
                              "validation mean absolute error inside the brain")  # fmt: skip
        if "val_deviation_r" in history[0]:
            report.add_figure(line_figure(epochs, {"deviation r": [h["val_deviation_r"] for h in history]}, "epoch", "r"),
                              "validation deviation correlation: does the synthetic PET depart from the mean training "
                              "PET the way the subject's does? (0 = the mean PET, 1 = perfect)")  # fmt: skip
        report.add_heading("Metrics per epoch")
        columns = [c for c in METRIC_COLUMNS if c in history[0]]
        report.add_table(columns, [[h.get(c) for c in columns] for h in history[-20:]])
    shown = val_rows[:2] if len(val_rows) else train_rows[:1]
    rows = [row for index in shown for row in _montage_rows(result.model, data, int(index), scaling, options)]
    if rows:
        report.add_heading("Validation montages" if len(val_rows) else "Training montage (no validation split)")
        report.add_figure(orthogonal_montage(rows), "T1w, true PET and synthetic PET (conditional mode), SUVR")
    return report.write(options.output_dir / "group.html")


def _montage_rows(model: Any, data: PairedVolumes, row: int, scaling: IntensityScaling, options: TrainOptions) -> list[Any]:
    """T1w, true PET and the prediction of one scan, on one colour scale."""
    from dualglow_app.report import MontageRow

    side = side_information(data, np.array([row]), options.side_info)
    t1w = np.asarray(data.mri[row]) if options.mri_input else np.zeros(data.grid.shape, np.float32)
    synth = predict(model, scaling, t1w, np.asarray(data.mask[row]),
                    None if side is None else {k: float(v[0]) for k, v in side.items()},
                    tissue_maps=data.row_tissue_maps(row)).mean  # fmt: skip
    top = float(np.percentile(data.pet[row][data.mask[row] > 0], 99.5)) if data.mask[row].any() else 2.0
    label = data.labels[row]
    return [
        MontageRow(f"{label} T1w", np.asarray(data.mri[row])),
        MontageRow(f"{label} true PET", np.asarray(data.pet[row]), cmap="hot", vmin=0, vmax=top, colorbar_label="SUVR"),
        MontageRow(f"{label} synthetic PET (T=0)", synth, cmap="hot", vmin=0, vmax=top, colorbar_label="SUVR"),
    ]


class ProgressBar:
    """Rich progress over the whole run: epoch, step, loss, bpd, samples/s and the ETA."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.progress: Any = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=True,
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task("training", total=total, completed=completed, stats="")

    def update(self, epoch: int, epochs: int, step: int, loss: float, bpd: float, samples_per_s: float) -> None:
        if self.progress is None:
            return
        stats = f"loss {loss:.4f}  bpd {bpd:.4f}  {samples_per_s:.2f} samples/s"
        self.progress.update(self.task, completed=step, description=f"epoch {epoch + 1}/{epochs}", stats=stats)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


__all__ = ["METRIC_COLUMNS", "ProgressBar", "model_metadata", "write_group_outputs", "write_metrics_tsv", "write_report"]
