"""The ``dualglow`` command: BIDS-App arguments in, calls to the stages out; no science here.

    dualglow BIDS_DIR OUTPUT_DIR participant [options]   -> dualglow_app.synthesize
    dualglow BIDS_DIR OUTPUT_DIR group [options]         -> dualglow_app.train

Each level's options are the fields of its dataclass (:mod:`dualglow_app.options`); an option
given on the command line that the chosen level does not use is refused (exit 2), never
silently dropped. Exit codes: 0 all went well, 1 a participant (or the training) failed,
2 usage errors and folders that cannot be written, 130/143 interrupted (Ctrl-C/SIGTERM; see
:mod:`dualglow_app.cli.errors`, the boundary every entry point shares). Heavy imports
(torch, ants, pybids) happen inside the level functions so ``--help`` is instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from dualglow_app import __version__
from dualglow_app.bids import AGE
from dualglow_app.cli.errors import GuardedCommand, RunError, check_writable_folders
from dualglow_app.covariates import is_number
from dualglow_app.io import remove_stale_temporaries
from dualglow_app.options import VALIDATION_SELECTION, side_template_fixed_choice
from dualglow_app.runtime import in_container
from dualglow_app.tissue import ANATOMY_READINGS, DEFAULT_ANATOMY_READING, SIDE_TEMPLATE_ANATOMY

LEVELS = ("participant", "group")
# Options that take several values after one flag, as BIDS-Apps write them (argparse nargs="+")
MULTI_VALUE_OPTIONS = ("--participant-label", "--session-label", "--age-sweep", "--output-spaces", "--side-info",
                       "--sweep", "--covariate", "--side-template-mri-fwhm",
                       "--side-template-fixed")


def expand_multi_value_options(args: list[str]) -> list[str]:
    """``--participant-label 01 02`` -> ``--participant-label 01 --participant-label 02``.

    Values are taken up to the next token that starts with ``--`` or is a single-dash flag;
    negative numbers count as values.
    """
    expanded: list[str] = []
    current: str | None = None
    for token in args:
        if token.startswith("-") and not is_number(token):
            current = token if token in MULTI_VALUE_OPTIONS else None
            if current is None:
                expanded.append(token)
            continue
        if current is not None:
            expanded.extend([current, token])
        else:
            expanded.append(token)
    return expanded


def resume_hint(params: dict[str, Any]) -> str:
    """How to continue an interrupted run of the level in ``params``."""
    if params.get("analysis_level") != "group":
        return "rerun the same command to continue: finished scans are skipped"
    if params.get("preprocess_only"):
        return "rerun the same command to continue: what was preprocessed is cached in the work dir"
    return ("rerun the same command with --resume to continue after the last finished epoch "
            "(what was preprocessed is cached in the work dir)")  # fmt: skip


class BIDSAppCommand(GuardedCommand):
    """A guarded click command that accepts space-separated values after the multi-value options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, resume_hint=resume_hint, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value_options(list(args)))


def check_directories(bids_dir: Path, output_dir: Path, work_dir: Path | None = None) -> None:
    """Early checks on the positional folders and the work dir, with hints that fit the environment."""
    if not bids_dir.is_dir():
        hint = {
            "docker": " Inside Docker, mount it with -v /host/path:/data:ro and pass /data.",
            "apptainer": " Inside Apptainer, bind it with -B /host/path:/data and pass /data.",
        }.get(in_container() or "", "")
        raise click.UsageError(f"BIDS_DIR {bids_dir} is not a directory.{hint}")
    if not (bids_dir / "dataset_description.json").is_file():
        raise click.UsageError(
            f"BIDS_DIR {bids_dir} has no dataset_description.json: pass the root of a BIDS dataset."
        )
    if bids_dir.resolve() == output_dir.resolve():
        raise click.UsageError(
            f"OUTPUT_DIR {output_dir} is BIDS_DIR: write derivatives elsewhere, "
            f"e.g. {bids_dir}/derivatives/dualglow."
        )
    check_writable_folders(output_dir, work_dir)


@click.command(cls=BIDSAppCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level", type=click.Choice(LEVELS))
@click.option(
    "--participant-label",
    "participant_labels",
    multiple=True,
    help="Subject label(s), with or without 'sub-' (repeat or space-separate). Default: all.",
)
@click.option("--session-label", "session_labels", multiple=True, help="Session label(s) to process. Default: all.")
@click.option("-w", "--work-dir", type=click.Path(path_type=Path), default=None,
              help="Work directory (preprocessing cache, pybids index). Default: OUTPUT_DIR/../dualglow-work "
                   "where it can be written, else $TMPDIR/dualglow-work.")
@click.option("--nprocs", type=click.IntRange(min=1), default=None, help="CPU threads. Default: all available.")
@click.option("--skip-bids-validation", is_flag=True, help="Do not run bids-validator-deno on BIDS_DIR.")
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
# --- both levels
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs (auto: CUDA when present).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same output).")
# --- participant level (dualglow_app.synthesize)
@click.option("--weights", default=None, metavar="NAME_OR_PATH",
              help="Model: NAME.safetensors path, or a name looked up in $DUALGLOW_MODELS_DIR and models/.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per scan; their mean is the output, their SD the uncertainty map (needs > 1).")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Sampling temperature; 0 with one sample gives the conditional mode.")
@click.option("--age", type=float, default=None,
              help=f"Age in years ({AGE.low:g}-{AGE.high:g}) for scans with none (n/a) in sessions.tsv / "
                   "participants.tsv.")
@click.option("--age-sweep", type=float, multiple=True, metavar="A1 A2 ...",
              help="Also synthesize each scan at these ages (years), with regional means per age.")
@click.option("--sweep", "sweeps", multiple=True, metavar="NAME=VALUES",
              help="Also synthesize each scan with covariate NAME set to each value, the rest its own: "
                   "age=50:100:10 (start:stop:step), age=60,70,80, diagnosis=CN,MCI,AD or diagnosis=all; "
                   "images desc-<name><value>, AAL2 regional means, report curves and difference maps.")
@click.option("--covariate", "covariates", multiple=True, metavar="NAME=VALUE",
              help="Value of a covariate for scans with none (n/a) in sessions.tsv / participants.tsv, "
                   "e.g. --covariate diagnosis=CN (for age, --age).")
@click.option("--impute-covariates", is_flag=True,
              help="Give a scan without a covariate value the training's typical one (mean, or most frequent "
                   "class; recorded in the sidecar) instead of failing it.")
@click.option("--counterfactual-pet", is_flag=True,
              help="Where a scan has a measured FDG-PET, also move it to each --sweep value "
                   "(this subject's PET at age 85): desc-measured<Name><value>.")
@click.option("--output-spaces", type=click.Choice(["MNI152NLin2009cAsym", "T1w"]), multiple=True,
              default=("MNI152NLin2009cAsym",), show_default=True, help="Spaces of the synthetic PET.")
@click.option("--output-res", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Voxel size (mm) of the MNI outputs (TemplateFlow res-XX grid).")
@click.option("--overwrite", is_flag=True, help="Redo scans whose outputs exist (default: skip them).")
@click.option("--compare-measured-pet/--no-compare-measured-pet", default=True, show_default=True,
              help="Where a scan also has an FDG-PET, score the synthetic PET against it (sidecar and report).")
# --- group level (dualglow_app.train)
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True,
              help="group: training epochs (with --patience: the most epochs).")
@click.option("--patience", type=click.IntRange(min=1), default=None,
              help="group: stop once the validation figure of --select-on has not improved for N epochs. Default: never.")
@click.option("--min-delta", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="group: with --patience, the relative fall in that figure that counts as an improvement.")
@click.option("--min-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="group: with --patience, the fewest epochs before early stopping may end the run.")
@click.option("--select-on", type=click.Choice(list(VALIDATION_SELECTION)), default="bpd", show_default=True,
              help="group: the validation figure --patience and --keep best follow: the bpd(PET|MRI) (the flow's "
                   "objective) or the synthetic PET's MAE in SUVR (what the evaluation's baselines stop on).")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="group: scans per step and per process (under torchrun the global batch is this x processes).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="group: AdaMax learning rate after the warm-up.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=100, show_default=True, help="group: linear lr warm-up.")
@click.option("--levels", type=click.IntRange(min=1), default=None, help="group: flow levels. Default: the grid's.")
@click.option("--depth", type=click.IntRange(min=1), default=8, show_default=True, help="group: flow steps per level.")
@click.option("--hidden", type=click.IntRange(min=1), default=128, show_default=True, help="group: coupling channels.")
@click.option("--relation-hidden", type=click.IntRange(min=1), default=64, show_default=True,
              help="group: channels of the relation networks (eq. 10).")
@click.option("--relation-layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="group: hidden convolutions of each relation network.")
@click.option("--top-prior", type=click.Choice(["side", "mri+side"]), default="mri+side", show_default=True,
              help="group: with --side-info, the top PET prior takes the top MRI latent and the covariates "
                   "(mri+side: follows the subject better, docs/MODEL_EXPERIMENTS.md) or the covariates alone "
                   "(side: eq. 16 as the paper writes it).")
@click.option("--side-loss-weight", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="group: weight of the eq. 17 side-information heads in the objective (the paper: 0.01).")
@click.option("--side-levels", type=click.Choice(["top", "all", "none"]), default="none", show_default=True,
              help="group: with --side-info, which relation networks take the covariates: none (they move the side "
                   "template alone: docs/MODEL_EXPERIMENTS.md, finding 17), the top one (eq. 16) or all.")
@click.option("--anatomy-template/--no-anatomy-template", default=True, show_default=True,
              help="group: the PET's centring template also moves with the subject's anatomy (the grey matter "
                   "around each voxel, --side-template-anatomy and --side-template-mri-fwhm), by the maps of a "
                   "voxelwise least-squares fit on the training pairs; the flows model the rest.")
@click.option("--side-template/--no-side-template", default=True, show_default=True,
              help="group: with --side-info, the PET's centring template moves with the covariates "
                   "(a map per covariate, fitted by least squares, then trained).")
@click.option("--side-template-mri-fwhm", type=click.FloatRange(min=0), multiple=True, default=(0.0, 8.0, 24.0),
              show_default=True, metavar="MM",
              help="group: with --side-template, the anatomy its least-squares start holds fixed: the MRI at each "
                   "voxel (0) and blurred to these FWHMs in mm (docs/MODEL_EXPERIMENTS.md, finding 17).")
@click.option("--side-template-anatomy", type=click.Choice(SIDE_TEMPLATE_ANATOMY), default="gm+csf", show_default=True,
              help="group: what that MRI is: the T1w intensity, its grey-matter probability (a 3-class intensity "
                   "mixture fitted on the training brains), which separates atrophy from age better "
                   "(docs/MODEL_EXPERIMENTS.md, finding 21), or the grey-matter and CSF probabilities (finding 24).")
@click.option("--anatomy-reading", type=click.Choice(ANATOMY_READINGS), default=DEFAULT_ANATOMY_READING, show_default=True,
              help="group: read those tissue maps from the grid T1w as the mixture's posteriors or as each voxel's "
                   "fractions of its two neighbouring tissues, or 'native': each subject's own mixture of its "
                   "native-resolution brain, its posteriors warped to the grid (docs/MODEL_EXPERIMENTS.md, finding 25), "
                   "'native-fractions': that mixture's partial-volume fractions (finding 31), or 'native-pve': "
                   "the expected fractions of a mixture with pure and boundary classes (finding 32).")
@click.option("--side-template-fixed", multiple=True, metavar="COLUMN",
              callback=lambda ctx, param, value: side_template_fixed_choice(value),
              help="group: covariates of --side-info whose side-template maps keep their least-squares start "
                   "instead of training with the flows; none: train them all. [default: age, when conditioned "
                   "on age (docs/MODEL_EXPERIMENTS.md, finding 17)]")
@click.option("--lambda-mri", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="group: weight of log p(MRI) in the objective (eq. 12; the paper: 1e-3, which let unseen "
                   "anatomy reach extreme MRI latents: docs/MODEL_EXPERIMENTS.md).")
@click.option("--top-mri-side", type=click.Choice(["keep", "remove"]), default="keep", show_default=True,
              help="group: with --side-info, the eq. 17 head on the top MRI latent keeps the covariates in it "
                   "(keep: the paper) or pushes them out through gradient reversal (remove).")
@click.option("--grid", "grid", type=click.Choice(["tiny8mm", "cpu4mm", "paper2mm"]), default="cpu4mm", show_default=True,
              help="group: model grid preset (MNI152NLin2009cAsym).")
@click.option("--grid-mm", type=click.FloatRange(1, 16), default=None, help="group: voxel size in mm instead of a preset.")
@click.option("--side-info", multiple=True, metavar="COLUMN",
              help="group: condition on these columns of participants.tsv / sessions.tsv (eq. 16-17), e.g. "
                   "age sex diagnosis; categorical where participants.json declares Levels, else continuous.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="group: share of subjects held out for validation.")
@click.option("--keep", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="group: the model's weights: the epoch with the best validation figure (--select-on), or the last.")
@click.option("--memory-saving", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="group: recompute activations by inversion in backward (auto: on from depth 16).")
@click.option("--template-centring/--no-template-centring", default=True, show_default=True,
              help="group: centre each image on its mean training image (the model starts from the "
                   "population mean PET); off = centre on 0.5 as in the paper.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="group: bf16 autocast on CUDA.")
@click.option("--cpu-bf16", is_flag=True,
              help="group: bf16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX): the networks in bf16, the "
                   "flow arithmetic in float32; 0.66x the step time at the same validation bpd (docs/PERFORMANCE.md).")
@click.option("--resume", is_flag=True, help="group: continue from the last checkpoint in the work dir.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="group: stop after this many steps.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="group: start no epoch that would not end within SECONDS of training (judged by the longest "
                   "epoch so far); the checkpoint is written: run again with --resume to continue (a job's wall "
                   "time, a leased GPU).")
@click.option("--model-name", default="dualglow", show_default=True, help="group: writes OUTPUT_DIR/models/NAME.*")
@click.option("--tracer", default="FDG", show_default=True, help="group: PET tracer label (trc-<label>).")
@click.option("--preprocess-only", is_flag=True, help="group: preprocess and stack the pairs, then stop.")
@click.option("--ablate-mri", is_flag=True, hidden=True, help="group: zero the MRI (unconditional baseline).")
@click.version_option(__version__, "--version", prog_name="dualglow")
def main(
    bids_dir: Path,
    output_dir: Path,
    analysis_level: str,
    participant_labels: tuple[str, ...],
    session_labels: tuple[str, ...],
    work_dir: Path | None,
    nprocs: int | None,
    skip_bids_validation: bool,
    verbose: int,
    **level_options: object,
) -> None:
    """Synthesize FDG-PET from T1w MRI (participant) or train DUAL-GLOW (group).

    BIDS_DIR is the raw BIDS dataset, OUTPUT_DIR the derivatives folder.
    """
    check_directories(bids_dir, output_dir, work_dir)
    refuse_other_level_options(click.get_current_context(), analysis_level)
    general = {
        "bids_dir": bids_dir, "output_dir": output_dir, "participant_labels": participant_labels,
        "session_labels": session_labels, "work_dir": work_dir, "nprocs": nprocs,
        "skip_bids_validation": skip_bids_validation,
    }
    run = _run_participant if analysis_level == "participant" else _run_group
    click.get_current_context().exit(run(general, level_options, verbose))


#: Command-line parameters that are not dataclass fields, by the level they belong to.
EXTRA_LEVEL_PARAMETERS = {"group": {"ablate_mri"}}


def level_parameters(level: str) -> set[str]:
    """The parameter names the ``level`` uses: its options dataclass's fields (and extras)."""
    import dataclasses

    from dualglow_app.options import ParticipantOptions, TrainOptions

    options = {"participant": ParticipantOptions, "group": TrainOptions}[level]
    return {f.name for f in dataclasses.fields(options)} | EXTRA_LEVEL_PARAMETERS.get(level, set())


def refuse_other_level_options(ctx: click.Context, level: str) -> None:
    """A usage error for any option given on the command line that ``level`` does not use."""
    from click.core import ParameterSource

    used = level_parameters(level) | {"bids_dir", "output_dir", "analysis_level", "verbose"}
    for param in ctx.command.params:
        name = param.name or ""
        if name in used or ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
            continue
        flag = max(param.opts, key=len) if param.opts else name
        owner = next((other for other in LEVELS if other != level and name in level_parameters(other)), "another")
        raise click.UsageError(
            f"{flag} is a {owner}-level option; the {level} level does not use it: drop it, or run the {owner} level."
        )


def _log_file(output_dir: Path, level: str) -> Path:
    import datetime as dt

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = output_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{level}-{stamp}-{os.getpid()}.log"


def _run_participant(general: dict[str, object], options: dict[str, object], verbose: int) -> int:
    """Build ParticipantOptions, run them, print the summary; usage problems exit with 2."""
    from dualglow_app.bids import BIDSInputError
    from dualglow_app.log import setup_logging
    from dualglow_app.options import ParticipantOptions, ParticipantUsageError
    from dualglow_app.synthesize import run_participant
    from dualglow_app.weights import ModelFileError

    setup_logging(verbose, _log_file(Path(str(general["output_dir"])), "participant"))
    known = level_parameters("participant")
    try:
        participant = ParticipantOptions(**general, **{k: v for k, v in options.items() if k in known})  # type: ignore[arg-type]
        summary = run_participant(participant)
    except (ParticipantUsageError, BIDSInputError, ModelFileError) as err:
        raise click.UsageError(str(err)) from None
    click.echo(summary.describe())
    return summary.exit_code


def _run_group(general: dict[str, object], options: dict[str, object], verbose: int) -> int:
    """Build TrainOptions and train; usage problems exit with 2, a failed training with 1."""
    from dualglow_app.bids import BIDSInputError
    from dualglow_app.dataset import DatasetError
    from dualglow_app.log import describe_error, setup_logging
    from dualglow_app.options import TrainOptions
    from dualglow_app.runtime import DeviceUnavailableError
    from dualglow_app.train import TrainingError, train

    # Under torchrun every rank runs this command; rank 0 alone logs (and to a file).
    main_rank = os.environ.get("RANK", "0") == "0"
    output_dir = Path(str(general["output_dir"]))
    setup_logging(verbose if main_rank else -1, _log_file(output_dir, "group") if main_rank else None)
    group = {k: v for k, v in options.items() if k in level_parameters("group") and k != "ablate_mri"}
    group["mri_input"] = not options.get("ablate_mri", False)
    try:
        training = TrainOptions(**general, **group)  # type: ignore[arg-type]
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if main_rank:  # a killed run's half-written model or report (the work dir: prepare_dataset)
        for folder in (output_dir, output_dir / "models"):
            remove_stale_temporaries(folder)
    try:
        result = train(training)
    except (BIDSInputError, DeviceUnavailableError) as err:
        raise click.UsageError(str(err)) from None
    except (TrainingError, DatasetError) as err:
        raise RunError(describe_error(err), 1) from None
    if main_rank and result.model_path is not None:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in result.final_metrics.items()) or "no validation split"
        click.echo(f"model: {result.model_path}\nreport: {result.report_path}\nvalidation: {scores}")
    elif main_rank:
        click.echo(f"preprocessed {len(result.train_labels)} pairs into the work dir")
    return 0
