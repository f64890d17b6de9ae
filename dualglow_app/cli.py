"""The ``dualglow`` command: BIDS-App arguments in, calls to the stages out; no science here.

Heavy imports (torch, ants) happen inside the level functions so ``dualglow --help`` is instant.
"""

from __future__ import annotations

from pathlib import Path

import click

from dualglow_app import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level", type=click.Choice(["participant", "group"]))
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
@click.version_option(__version__, "--version", prog_name="dualglow")
def main(bids_dir: Path, output_dir: Path, analysis_level: str, verbose: int) -> None:
    """Synthesize FDG-PET from T1w MRI (participant) or train DUAL-GLOW (group).

    BIDS_DIR is the raw BIDS dataset, OUTPUT_DIR the derivatives folder.
    """
    if not bids_dir.is_dir():
        raise click.UsageError(f"BIDS_DIR {bids_dir} is not a directory: pass a BIDS dataset root.")
    if bids_dir.resolve() == output_dir.resolve():
        raise click.UsageError(
            f"OUTPUT_DIR {output_dir} is BIDS_DIR: write derivatives elsewhere, e.g. {bids_dir}/derivatives/dualglow."
        )
    raise click.UsageError(f"the {analysis_level} level is not available in dualglow {__version__} yet.")
