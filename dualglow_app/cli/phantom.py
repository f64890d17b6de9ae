"""The ``dualglow-phantom`` command: arguments in, :func:`make_cohort` (or, with ``--mni-stack``,
:func:`~dualglow_app.phantom.mni.make_mni_stack`) out; no science here. Errors reach the user
through the boundary every entry point shares (:mod:`dualglow_app.cli.errors`)."""

from __future__ import annotations

from pathlib import Path

import click

from dualglow_app import __version__
from dualglow_app.cli.errors import GuardedCommand
from dualglow_app.grid import PRESETS


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]},
               resume_hint=lambda params: "rerun the same command with --overwrite to write the cohort again")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=True))
@click.option("--subjects", "n_subjects", type=int, required=True, help="Number of subjects (>= 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (>= 0).")
@click.option("--sessions", type=int, default=1, show_default=True, help="Sessions per subject, 1-2 years apart.")
@click.option("--phantom-version", type=click.Choice(["1", "2", "3"]), default="3", show_default=True,
              help="3: version 2 whose grey matter's T1w intensity varies by itself, as real grey matter's "
                   "does (the same tissues and PET; the shipped model's); 2: subjects with their own regional "
                   "GM, ventricles and folding, the PET following the GM, plus an explainable-PET truth; 1: the earlier phantoms "
                   "(the template under a warp registration removes), file for file as before.")
@click.option("--overwrite", is_flag=True, help="Replace a previous phantom cohort (or MNI stack) in OUT_DIR.")
@click.option("--preview", is_flag=True, help="Also save derivatives/phantom/preview.png.")
@click.option("--jobs", type=int, default=None, help="Worker processes (default: all cores).")
@click.option("--voxel-mm", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="2 makes coarse phantoms for quick tests; 1 is the real thing.")
@click.option("--mni-stack", is_flag=True,
              help="Fast path for model development: write mri/pet/explainable/mask .npy stacks directly on "
                   "--grid in MNI space (load with dualglow_app.dataset.load_mni_stack). SKIPS the native-space "
                   "simulation AND the preprocessing.")
@click.option("--grid", type=click.Choice(sorted(PRESETS)), default=None,
              help="Model grid of --mni-stack  [default: cpu4mm]")
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
@click.version_option(__version__, "--version", prog_name="dualglow-phantom")
def main(out_dir: Path, n_subjects: int, seed: int, sessions: int, phantom_version: str, overwrite: bool,
         preview: bool, jobs: int | None, voxel_mm: str, mni_stack: bool, grid: str | None, verbose: int) -> None:
    """Write a SYNTHETIC paired T1w + FDG-PET cohort (digital phantoms) as BIDS to OUT_DIR."""
    from dualglow_app.log import setup_logging

    if jobs is not None and jobs < 1:
        raise click.UsageError(f"--jobs must be at least 1, got {jobs}.")
    version = int(phantom_version)
    if mni_stack:
        unused = [name for name, used in (("--preview", preview), ("--voxel-mm", voxel_mm != "1")) if used]
        if unused:
            raise click.UsageError(f"{', '.join(unused)} only apply to a BIDS cohort, not to --mni-stack.")
    elif grid is not None:
        raise click.UsageError("--grid only applies to --mni-stack.")
    setup_logging(verbose)
    if mni_stack:
        from dualglow_app.phantom.mni import make_mni_stack

        try:
            folder = make_mni_stack(out_dir, n_subjects, seed=seed, grid=PRESETS[grid or "cpu4mm"], version=version,
                                    jobs=jobs, overwrite=overwrite, sessions=sessions)
        except (ValueError, FileExistsError) as err:
            raise click.UsageError(str(err)) from None
        click.echo(f"{n_subjects} subjects x {sessions} session(s) (phantom version {version}) written on the "
                   f"{grid or 'cpu4mm'} grid to {folder}; they SKIP native simulation and preprocessing: for model "
                   "development only")
        return

    from dualglow_app.phantom.cohort import make_cohort

    try:
        info = make_cohort(out_dir, n_subjects, seed=seed, sessions=sessions, overwrite=overwrite,
                           preview=preview, jobs=jobs, voxel_mm=float(voxel_mm), version=version)
    except (ValueError, FileExistsError) as err:
        raise click.UsageError(str(err)) from None
    click.echo(f"{len(info.subjects)} subjects (phantom version {info.version}) written to {info.out_dir} "
               f"in {info.seconds:.1f} s")
    if info.preview is not None:
        click.echo(f"preview: {info.preview}")
