"""The ``dualglow-evaluate`` command: arguments in, :func:`dualglow_app.evaluate.evaluate` out.

It parses, builds :class:`~dualglow_app.evaluate.EvaluateOptions`, runs the evaluation
(the paper's Tables 1-2 and Figs. 4 and 7, Sun et al. 2019, sec. 4) and prints Table 1;
the science is in :mod:`dualglow_app.evaluate`. Usage problems and folders that cannot be
written exit with 2, a failed preprocessing or training with 1, an interruption with 130/143
(:mod:`dualglow_app.cli.errors`); a rerun of the same command resumes.
"""

from __future__ import annotations

from pathlib import Path

import click

from dualglow_app import __version__
from dualglow_app.cli.errors import GuardedCommand, RunError, check_writable_folders
from dualglow_app.evaluate.options import BASELINE_INPUTS, BASELINE_NAMES
from dualglow_app.io import remove_stale_temporaries
from dualglow_app.options import VALIDATION_SELECTION
from dualglow_app.tissue import ANATOMY_READINGS, DEFAULT_ANATOMY_READING, SIDE_TEMPLATE_ANATOMY


def _parse_baselines(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    unknown = sorted(set(names) - set(BASELINE_NAMES))
    if unknown:
        raise click.BadParameter(f"unknown baseline(s) {', '.join(unknown)}; choose from {','.join(BASELINE_NAMES)} or none")
    return names


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]},
               resume_hint=lambda params: "rerun the same command to continue: finished folds and methods are reused")
@click.argument("bids_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("output_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--folds", type=int, default=5, show_default=True, help="K of the K-fold cross-validation (by subject).")
@click.option("--baselines", default=",".join(BASELINE_NAMES), show_default=True,
              help="Comma-separated comparison methods, or 'none'.")
@click.option("--epochs", type=int, default=200, show_default=True,
              help="Training budget: the most epochs any method trains (each stops at its validation plateau).")
@click.option("--patience", type=int, default=10, show_default=True,
              help="Stop a method after this many epochs without a validation improvement; 0 = train all --epochs "
                   "without a validation split.")
@click.option("--dualglow-select-on", type=click.Choice(list(VALIDATION_SELECTION)), default="mae", show_default=True,
              help="The validation figure DUAL-GLOW stops on and keeps its best epoch by: the synthetic PET's MAE "
                   "(what the baselines follow) or its bpd(PET|MRI) (the group level's default).")
@click.option("--dualglow-min-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="DUAL-GLOW's fewest epochs before early stopping may end it (its MAE can sit on a plateau "
                   "while the flows learn the density).")
@click.option("--inner-val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of each fold's training subjects held out for early stopping.")
@click.option("--side-info", multiple=True, metavar="COLUMN",
              help="Condition DUAL-GLOW on these participants.tsv columns (repeatable; age enables the age-trend "
                   "experiment). A diagnosis covariate is withheld from Table 2's synthetic PETs (see --table2-withhold).")
@click.option("--table2-withhold", multiple=True, metavar="COLUMN",
              help="Covariates kept from the synthetic PETs Table 2 classifies (repeatable). Default: every "
                   "categorical covariate whose classes are the diagnoses (CN, SMC, EMCI, MCI, LMCI, AD).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits; fold k trains with seed + k.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("-w", "--work-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Preprocessing cache and resumable per-fold results (default: OUTPUT_DIR/../dualglow-work where "
                   "it can be written, else $TMPDIR/dualglow-work).")
@click.option("--grid", type=click.Choice(["tiny8mm", "cpu4mm", "paper2mm"]), default="cpu4mm", show_default=True)
@click.option("--batch-size", type=int, default=2, show_default=True)
@click.option("--depth", type=int, default=8, show_default=True, help="DUAL-GLOW flow steps per level.")
@click.option("--hidden", type=int, default=128, show_default=True, help="DUAL-GLOW coupling channels.")
@click.option("--relation-hidden", type=int, default=64, show_default=True, help="DUAL-GLOW relation-network channels.")
@click.option("--relation-layers", type=int, default=2, show_default=True, help="DUAL-GLOW relation-network depth.")
@click.option("--top-prior", type=click.Choice(["side", "mri+side"]), default="mri+side", show_default=True,
              help="DUAL-GLOW's top PET prior with --side-info: with the top MRI latent, or the covariates alone (eq. 16).")
@click.option("--top-mri-side", type=click.Choice(["keep", "remove"]), default="keep", show_default=True,
              help="DUAL-GLOW's eq. 17 head on the top MRI latent: keep the covariates in it, or remove them (GRL).")
@click.option("--side-levels", type=click.Choice(["top", "all", "none"]), default="none", show_default=True,
              help="DUAL-GLOW, as the group level's: which relation networks take the covariates.")
@click.option("--side-template-mri-fwhm", type=click.FloatRange(min=0), multiple=True, default=(0.0, 8.0, 24.0),
              show_default=True, metavar="MM", help="DUAL-GLOW, as the group level's (repeatable).")
@click.option("--side-template-anatomy", type=click.Choice(SIDE_TEMPLATE_ANATOMY), default="gm+csf", show_default=True,
              help="DUAL-GLOW, as the group level's: the T1w, its grey-matter probability, or its grey-matter and CSF probabilities.")
@click.option("--anatomy-template/--no-anatomy-template", default=True, show_default=True,
              help="DUAL-GLOW, as the group level's: the PET template moves with the subject's anatomy too.")
@click.option("--anatomy-reading", type=click.Choice(ANATOMY_READINGS), default=DEFAULT_ANATOMY_READING, show_default=True,
              help="DUAL-GLOW, as the group level's: how the tissue maps are read (grid posteriors, fractions, native, native-fractions, native-pve).")
@click.option("--side-template-fixed", multiple=True, metavar="COLUMN",
              help="DUAL-GLOW, as the group level's (repeatable; none: train every map) [default: age, when conditioned on age]")
@click.option("--lambda-mri", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="DUAL-GLOW's weight of log p(MRI) in the objective (eq. 12; the paper: 1e-3).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="DUAL-GLOW's AdaMax learning rate (the baselines keep their own: Adam 1e-3, GANs 2e-4).")
@click.option("--baseline-width", type=int, default=16, show_default=True, help="Baselines' first-layer channels.")
@click.option("--baseline-inputs", type=click.Choice(list(BASELINE_INPUTS)), default="t1w", show_default=True,
              help="What the baselines read: the T1w (the paper's), or the T1w and its native tissue maps, "
                   "read as DUAL-GLOW's anatomy template reads them (its --anatomy-reading, where native).")
@click.option("--participant-label", multiple=True, help="Only these subjects (repeatable).")
@click.option("--nprocs", type=int, default=None, help="CPU threads (default: all).")
@click.option("--skip-bids-validation", is_flag=True)
@click.option("-v", "--verbose", count=True)
@click.version_option(__version__, "--version", prog_name="dualglow-evaluate")
def main(bids_dir: Path, output_dir: Path, folds: int, baselines: str, epochs: int, patience: int,
         dualglow_select_on: str, dualglow_min_epochs: int, inner_val_fraction: float, side_info: tuple[str, ...], table2_withhold: tuple[str, ...],
         seed: int, device: str, work_dir: Path | None, grid: str, batch_size: int, depth: int, hidden: int,
         relation_hidden: int, relation_layers: int, top_prior: str, top_mri_side: str, side_levels: str,
         side_template_mri_fwhm: tuple[float, ...], side_template_anatomy: str, side_template_fixed: tuple[str, ...],
         anatomy_template: bool, anatomy_reading: str,
         lambda_mri: float, lr: float,
         baseline_width: int, baseline_inputs: str, participant_label: tuple[str, ...], nprocs: int | None, skip_bids_validation: bool,
         verbose: int) -> None:  # fmt: skip
    """Cross-validate DUAL-GLOW against baselines on the paired T1w + FDG-PET of BIDS_DIR (the paper's Tables 1-2, Figs. 4 and 7)."""
    from dualglow_app.bids import BIDSInputError
    from dualglow_app.dataset import DatasetError
    from dualglow_app.evaluate import EvaluateOptions, EvaluationError, evaluate, table1_rows
    from dualglow_app.log import describe_error, setup_logging
    from dualglow_app.metrics import LABELS, METRICS
    from dualglow_app.options import default_work_dir, side_template_fixed_choice
    from dualglow_app.runtime import DeviceUnavailableError
    from dualglow_app.train import TrainingError

    if bids_dir.resolve() == output_dir.resolve():
        raise click.UsageError("OUTPUT_DIR must differ from BIDS_DIR (the raw dataset is never written to).")
    check_writable_folders(output_dir, work_dir)
    setup_logging(verbose)
    try:
        options = EvaluateOptions(
            bids_dir=bids_dir, output_dir=output_dir, work_dir=work_dir or default_work_dir(output_dir), folds=folds,
            baselines=_parse_baselines(baselines), epochs=epochs, patience=patience or None,
            dualglow_select_on=dualglow_select_on, dualglow_min_epochs=dualglow_min_epochs,
            inner_val_fraction=inner_val_fraction, side_info=side_info, seed=seed, device=device,
            table2_withhold=table2_withhold or None,
            grid=grid, batch_size=batch_size, depth=depth, hidden=hidden,
            relation_hidden=relation_hidden, relation_layers=relation_layers, top_prior=top_prior,
            top_mri_side=top_mri_side, lambda_mri=lambda_mri, lr=lr, baseline_width=baseline_width, baseline_inputs=baseline_inputs,
            side_levels=side_levels, side_template_mri_fwhm=side_template_mri_fwhm,
            side_template_anatomy=side_template_anatomy, anatomy_template=anatomy_template,
            anatomy_reading=anatomy_reading, side_template_fixed=side_template_fixed_choice(side_template_fixed),
            participant_labels=participant_label, nprocs=nprocs, skip_bids_validation=skip_bids_validation,
        )  # fmt: skip
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    remove_stale_temporaries(output_dir)  # a killed run's half-written report
    try:
        result = evaluate(options)
    except (EvaluationError, BIDSInputError, DeviceUnavailableError) as err:
        raise click.UsageError(str(err)) from None
    except (DatasetError, TrainingError) as err:
        raise RunError(describe_error(err), 1) from None
    lines = ["method      " + "  ".join(f"{LABELS[m]:>18}" for m in METRICS)]
    for cells in table1_rows(result.table1, options.methods):
        lines.append(f"{cells[0]:<10}  " + "  ".join(f"{c:>18}" for c in cells[1:]))
    click.echo("\n".join(lines))
    click.echo(f"results: {result.report_path or result.summary_path}")


if __name__ == "__main__":
    main()
