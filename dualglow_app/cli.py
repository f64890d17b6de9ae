"""The ``dualglow`` command: BIDS-App arguments in, calls to the stages out; no science here.

    dualglow BIDS_DIR OUTPUT_DIR participant [options]   -> dualglow_app.synthesize
    dualglow BIDS_DIR OUTPUT_DIR group [options]         -> dualglow_app.train

Exit codes: 0 all went well, 1 a participant (or the training) failed, 2 usage errors.
Heavy imports (torch, ants, pybids) happen inside the level functions so ``--help`` is instant.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from dualglow_app import __version__

LEVELS = ("participant", "group")
# Options that take several values after one flag, as BIDS-Apps write them (argparse nargs="+")
MULTI_VALUE_OPTIONS = ("--participant-label", "--session-label", "--age-sweep", "--output-spaces", "--side-info")


def expand_multi_value_options(args: list[str]) -> list[str]:
    """``--participant-label 01 02`` -> ``--participant-label 01 --participant-label 02``.

    Values are taken up to the next token that starts with ``--`` or is a single-dash flag;
    negative numbers count as values.
    """
    expanded: list[str] = []
    current: str | None = None
    for token in args:
        if token.startswith("-") and not _is_number(token):
            current = token if token in MULTI_VALUE_OPTIONS else None
            if current is None:
                expanded.append(token)
            continue
        if current is not None:
            expanded.extend([current, token])
        else:
            expanded.append(token)
    return expanded


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class BIDSAppCommand(click.Command):
    """A click command that accepts space-separated values after the multi-value options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value_options(list(args)))


def in_container() -> str | None:
    """'docker' or 'apptainer' when running inside one (for hints about bind mounts)."""
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return "apptainer"
    if Path("/.dockerenv").exists():
        return "docker"
    return None


def check_directories(bids_dir: Path, output_dir: Path) -> None:
    """Early checks on the two positional folders, with hints that fit the environment."""
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
              help="Work directory (preprocessing cache, pybids index). Default: OUTPUT_DIR/../dualglow-work.")
@click.option("--nprocs", type=click.IntRange(min=1), default=None, help="CPU threads. Default: all available.")
@click.option("--skip-bids-validation", is_flag=True, help="Do not run bids-validator-deno on BIDS_DIR.")
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
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
) -> None:
    """Synthesize FDG-PET from T1w MRI (participant) or train DUAL-GLOW (group).

    BIDS_DIR is the raw BIDS dataset, OUTPUT_DIR the derivatives folder.
    """
    check_directories(bids_dir, output_dir)
    raise click.UsageError(f"the {analysis_level} level is not available in dualglow {__version__} yet.")
