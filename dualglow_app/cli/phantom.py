"""The ``dualglow-phantom`` command: arguments in, :func:`make_cohort` out; no science here."""

from __future__ import annotations

from pathlib import Path

import click

from dualglow_app import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=True))
@click.option("--subjects", "n_subjects", type=int, required=True, help="Number of subjects (>= 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (>= 0).")
@click.option("--sessions", type=int, default=1, show_default=True, help="Sessions per subject, 1-2 years apart.")
@click.option("--overwrite", is_flag=True, help="Replace a previous phantom cohort in OUT_DIR.")
@click.option("--preview", is_flag=True, help="Also save derivatives/phantom/preview.png.")
@click.option("--jobs", type=int, default=None, help="Worker processes (default: all cores).")
@click.option("--voxel-mm", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="2 makes coarse phantoms for quick tests; 1 is the real thing.")
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
@click.version_option(__version__, "--version", prog_name="dualglow-phantom")
def main(out_dir: Path, n_subjects: int, seed: int, sessions: int, overwrite: bool, preview: bool,
         jobs: int | None, voxel_mm: str, verbose: int) -> None:
    """Write a SYNTHETIC paired T1w + FDG-PET cohort (digital phantoms) as BIDS to OUT_DIR."""
    from dualglow_app.log import setup_logging
    from dualglow_app.phantom.cohort import make_cohort

    if jobs is not None and jobs < 1:
        raise click.UsageError(f"--jobs must be at least 1, got {jobs}.")
    setup_logging(verbose)
    try:
        info = make_cohort(out_dir, n_subjects, seed=seed, sessions=sessions, overwrite=overwrite,
                           preview=preview, jobs=jobs, voxel_mm=float(voxel_mm))
    except (ValueError, FileExistsError) as err:
        raise click.UsageError(str(err)) from None
    click.echo(f"{len(info.subjects)} subjects written to {info.out_dir} in {info.seconds:.1f} s")
    if info.preview is not None:
        click.echo(f"preview: {info.preview}")
