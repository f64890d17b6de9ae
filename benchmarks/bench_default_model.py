"""Held-out figures of a trained model for its model card: DUAL-GLOW vs the mean training PET.

The reference "mean training PET in MNI space" ignores the MRI; a model that uses the MRI
must beat it. Both are scored with dualglow_app.metrics (SUVR, inside the brain mask).

    python benchmarks/bench_default_model.py BIDS_DIR --weights models/NAME.safetensors \
        --train 001-048 --test 049-060 -w WORK_DIR [--phantom-seed 0 --phantom-version 2] [--json out.json]

Prints the mean of each metric per method and on how many held-out scans DUAL-GLOW is the
better of the two (paired, with the two-sided Wilcoxon signed-rank p-value from SciPy), and
the model issue's targets as ``bench_dualglow_targets.py`` scores them (deviation r, input
specificity, the age sweep); with ``--phantom-seed``/``--phantom-version`` (a phantom cohort
made with them) the age sweep is also compared with the swept truth, the same subjects' true
PETs at other ages with their anatomy fixed, and the deviation r is also measured against each
subject's explainable PET (the phantom's PET without its MRI-invisible factors, regenerated on
the model grid by :func:`dualglow_app.phantom.mni.simulate_subject`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import wilcoxon

from dualglow_app.dataset import DatasetSpec, prepare_dataset
from dualglow_app.evaluate.statistics import explainable_truth
from dualglow_app.inference import predict
from dualglow_app.log import setup_logging
from dualglow_app.metrics import METRICS, image_metrics
from dualglow_app.phantom.cohort import subject_index
from dualglow_app.weights import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dualglow_targets import SWEEP_AGES, scan_covariates, score, true_age_sweeps  # noqa: E402
from perfkit import labels  # noqa: E402


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The cohort, the model and its training / held-out subjects (for :func:`split_data`)."""
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--train", required=True, help="training subject ranges, e.g. 001-048 or 001-048,061-200")
    parser.add_argument("--test", required=True, help="held-out subject range, e.g. 049-053")
    parser.add_argument("-w", "--work-dir", type=Path, required=True)


def split_data(args: argparse.Namespace, loaded: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """One stack of the training and held-out scans on the model's grid, with the model's
    covariates (the preprocessing is the group level's, cached in the work dir), and the rows
    of each."""
    data = prepare_dataset(DatasetSpec(args.bids_dir, args.work_dir, loaded.grid,
                                       participant_labels=tuple(labels(args.train) + labels(args.test)),
                                       side_info=tuple(loaded.covariates),
                                       tissue_maps=loaded.model.native_reading))  # fmt: skip
    train_rows = np.array([data.labels.index(f"sub-{label}") for label in labels(args.train)])
    test_rows = np.array([data.labels.index(f"sub-{label}") for label in labels(args.test)])
    return data, train_rows, test_rows


def synthesis_choice(samples: int, temperature: float | None) -> tuple[float, str]:
    """The temperature to score at and the row's label: the T = 0 mode by default, the mean of
    ``samples`` draws at T = 1 unless told otherwise, or one draw at ``temperature``."""
    if temperature is None:
        temperature = 1.0 if samples > 1 else 0.0
    if temperature == 0:
        return 0.0, "DUAL-GLOW (T=0)"
    if samples == 1:
        return temperature, f"DUAL-GLOW (one draw, T={temperature:g})"
    return temperature, f"DUAL-GLOW (mean of {samples}, T={temperature:g})"


def age_slope_figure(age: dict, path: Path, model: str) -> None:
    """Each region's age slope of the held-out scans' synthetic PETs (mean per decade, relative
    to the scan's SUVR) against the truth's: the swept truth where there is one, else the
    phantom's calibration; the identity line and the issue's +-25 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = age.get("measured")
    truth = np.array(measured["true_per_decade"] if measured else age["true_per_decade"]) * 100
    synthetic = np.array(age["synthetic_per_decade"]) * 100
    agreement = measured or age
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    low, high = min(truth.min(), synthetic.min(), 0) * 1.15, max(truth.max(), synthetic.max(), 0) * 1.15 + 0.1
    line = np.linspace(low, high, 2)
    ax.fill_between(line, line * 0.75, line * 1.25, color="0.85", label="within +-25 %")
    ax.plot(line, line, color="0.4", lw=1, label="identity")
    ax.scatter(truth, synthetic, s=22, color="tab:blue", zorder=3, label="regions")
    ax.set_xlabel(f"true slope, % per decade ({'swept truth' if measured else 'phantom calibration'})")
    ax.set_ylabel("synthetic slope, % per decade (T = 0 mode)")
    ax.set_title(f"age sweep {age['ages'][0]:g}-{age['ages'][-1]:g} y, held-out scans, model {model}\n"
                 f"r {agreement['pearson_r']:.2f}, sign {agreement['sign_agreement']:.2f}, median ratio "
                 f"{agreement['median_ratio']:.2f}, within +-25 % {agreement['within_25_percent']:.2f}", fontsize=8)  # fmt: skip
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curves_figure(metrics: Path, path: Path, model: str) -> None:
    """The group level's per-epoch figures of a model (its ``NAME_metrics.tsv``) in one figure:
    training and validation bpd(PET | MRI), validation MAE, validation deviation r."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with metrics.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    epoch = [int(r["epoch"]) for r in rows]

    def column(name: str) -> list[float]:
        return [float(r[name]) for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(epoch, column("train_bpd_pet_given_mri"), label="training")
    axes[0].plot(epoch, column("val_bpd_pet_given_mri"), label="validation")
    axes[0].set_ylabel("bpd(PET | MRI)")
    axes[0].legend(fontsize=8)
    axes[1].plot(epoch, column("val_mae_suvr"), color="tab:orange")
    axes[1].set_ylabel("validation MAE (SUVR)")
    axes[2].plot(epoch, column("val_deviation_r"), color="tab:green")
    axes[2].set_ylabel("validation deviation r")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"learning curves of model {model} ({metrics.name})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_arguments(parser)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--phantom-seed", type=int, default=None, help="the phantom cohort's seed (swept truth)")
    parser.add_argument("--phantom-version", type=int, default=None, help="the phantom cohort's version (swept truth)")
    parser.add_argument("--samples", type=int, default=1,
                        help="score the mean of this many samples at --temperature instead of the T = 0 mode "
                             "(the age sweep stays the mode's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="of the samples (default 1 with --samples > 1); with --samples 1, score one draw at "
                             "this temperature instead of the mode (are single samples as unlike each other as "
                             "the true PETs?)")
    parser.add_argument("--png", type=Path, default=None, help="figure: regional age slopes, synthetic vs the truth")
    parser.add_argument("--curves", type=Path, default=None,
                        help="figure: the model's learning curves (its NAME_metrics.tsv: bpd, validation MAE and deviation r)")
    args = parser.parse_args()
    setup_logging(-1)
    torch.set_num_threads(args.threads)

    loaded = open_model(args.weights, "cpu")
    model, scaling, grid, specs = loaded.model, loaded.scaling, loaded.grid, loaded.covariates

    data, train_rows, test_rows = split_data(args, loaded)
    test_labels = [data.labels[row] for row in test_rows]

    def covariates(row: int) -> dict[str, float]:
        return scan_covariates(data, specs, row)

    # The targets (T = 0 at each scan's own covariates; the age sweep vs the truth).
    origin = (args.phantom_seed, args.phantom_version) if args.phantom_seed is not None else None
    indices = np.array([subject_index(label) for label in test_labels])
    swept = true_age_sweeps(origin, data, test_rows, SWEEP_AGES, args.work_dir / "age_truth", indices=indices)
    explainable = None
    if origin is not None:
        # The explainable PET (no MRI-invisible factors, noise-free) of each held-out phantom on
        # the model grid, for the deviation-r target against it.
        explainable = np.zeros((len(data.labels), *grid.shape), dtype=np.float32)
        explainable[test_rows] = explainable_truth(origin, indices, grid, cache=args.work_dir / "explainable_truth")
    samples = args.samples
    temperature, synthetic_label = synthesis_choice(samples, args.temperature)
    targets = score(model, scaling, data, test_rows, train_rows, SWEEP_AGES, explainable, samples, temperature,
                    truth_sweep=swept, covariates_of=covariates)  # fmt: skip
    mean_pet = np.asarray(data.pet[train_rows]).mean(axis=0)
    # The participant level's prediction: the conditional mode (T = 0), clipped to the model's range.
    # (With --samples or --temperature, the mean of the draws, seeded by row as score() seeds them.)
    predictions = [predict(model, scaling, np.asarray(data.mri[row]), np.asarray(data.mask[row]), covariates(row),
                           samples, temperature, seed=int(row), tissue_maps=data.row_tissue_maps(row))
                   for row in test_rows]  # fmt: skip
    # How many of each held-out scan's MRI latents the conditioning range clamped (0 without one).
    outside = [p.latents_outside or 0.0 for p in predictions]
    rows = []
    for row, label, prediction in zip(test_rows, test_labels, predictions, strict=True):
        mask = np.asarray(data.mask[row]) > 0
        for method, image in ((synthetic_label, prediction.mean), ("mean training PET", mean_pet)):
            scores = image_metrics(np.asarray(data.pet[row]), image, mask, reference=mean_pet)
            rows.append({"subject": label, "method": method, **scores})
    methods = [synthetic_label, "mean training PET"]
    summary = {m: {k: float(np.mean([r[k] for r in rows if r["method"] == m])) for k in METRICS} for m in methods}
    summary["input specificity"] = {"synthetic": targets["specificity_synthetic"], "true PET": targets["specificity_true"]}
    paired = {}
    for key in ("mae_suvr", "pearson_r", "psnr_db", "ssim"):
        ours, ref = (np.array([r[key] for r in rows if r["method"] == m]) for m in methods)
        better = ours < ref if key == "mae_suvr" else ours > ref
        paired[key] = {"dualglow_better": int(better.sum()), "n": len(ours),
                       "wilcoxon_p": float(wilcoxon(ours, ref).pvalue)}  # fmt: skip
    print(f"held-out subjects: {', '.join(test_labels)} (trained on {len(train_rows)} scans)")
    print(f"{'method':<22}{'MAE (SUVR)':>12}{'r':>8}{'PSNR (dB)':>11}{'SSIM':>8}{'deviation r':>13}")
    for method in methods:
        s = summary[method]
        print(f"{method:<22}{s['mae_suvr']:>12.4f}{s['pearson_r']:>8.3f}{s['psnr_db']:>11.2f}{s['ssim']:>8.3f}"
              f"{s['deviation_r']:>13.3f}")  # fmt: skip
    specificity = summary["input specificity"]
    print(f"input specificity (mean pairwise r): synthetic {specificity['synthetic']:.3f}, "
          f"true PET {specificity['true PET']:.3f}"
          + (f", explainable PET {targets['specificity_explainable']:.3f}" if explainable is not None else ""))
    print(f"deviation amplitude (SD of synthetic - mean PET over the truth's): {targets['deviation_amplitude']:.2f}")
    wins = [f"{paired[k]['dualglow_better']}/{paired[k]['n']} (p {paired[k]['wilcoxon_p']:.2g})"
            for k in ("mae_suvr", "pearson_r", "psnr_db", "ssim")]  # fmt: skip
    print(f"{'DUAL-GLOW better on':<22}{wins[0]:>12}  {wins[1]}  {wins[2]}  {wins[3]}")
    print(f"MRI latents outside the training range: mean {100 * np.mean(outside):.3f} %, "
          f"max {100 * np.max(outside):.3f} % of a scan's")
    if explainable is not None:
        # For scale: how far the measured (preprocessed) PET itself departs from its explainable part.
        from dualglow_app.metrics import deviation_correlation

        targets["true_vs_explainable_deviation_r"] = float(np.mean([deviation_correlation(
            np.asarray(data.pet[row]), explainable[row], mean_pet, np.asarray(data.mask[row])) for row in test_rows]))  # fmt: skip
        print(f"deviation r against the explainable PET (no MRI-invisible factors): {targets['deviation_r_explainable']:.3f} "
              f"(the measured PET's own: {targets['true_vs_explainable_deviation_r']:.3f})")  # fmt: skip
    print(f"deviation r {targets['deviation_r']:.3f}; input specificity: synthetic {targets['specificity_synthetic']:.3f}, "
          f"true {targets['specificity_true']:.3f}; clipped {100 * targets['clipped_fraction']:.2f} %")
    age = targets.get("age")
    if age:
        for name, agreement in (("the calibration", age), ("the swept truth", age.get("measured"))):
            if agreement:
                print(f"age sweep {SWEEP_AGES[0]:g}-{SWEEP_AGES[-1]:g} vs {name}: r {agreement['pearson_r']:.2f}, sign "
                      f"{agreement['sign_agreement']:.2f}, median ratio {agreement['median_ratio']:.2f}, within +-25 % "
                      f"{agreement['within_25_percent']:.2f}")  # fmt: skip
        if "beyond_over_inside" in age:
            print(f"slope beyond the training ages / inside them: {age['beyond_over_inside']:.2f}")
    if args.curves:
        learning_curves_figure(args.weights.with_name(args.weights.name.removesuffix(".safetensors") + "_metrics.tsv"),
                               args.curves, loaded.sha256[:12])  # fmt: skip
    if args.png and age:
        age_slope_figure(age, args.png, loaded.sha256[:12])
    if args.json:
        args.json.write_text(json.dumps({"model_sha256": loaded.sha256, "test": test_labels, "summary": summary,
                                         "paired": paired, "targets": targets, "rows": rows, "latents_outside": dict(zip(test_labels, outside, strict=True))},
                                        indent=1, default=float))  # fmt: skip


if __name__ == "__main__":
    main()
