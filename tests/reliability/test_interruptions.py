"""Kill runs at random points, rerun them, and get what an uninterrupted run writes.

A child process runs the CLI (:mod:`harness`: real everything but registration) and sends
itself SIGTERM or SIGKILL just before a rename drawn at random among those an uninterrupted
run makes - every atomic output, cache entry, pybids index, stacked dataset, checkpoint and
model file is one. Then:

- SIGTERM: exit 143 with a line naming what was interrupted, and no temporary anywhere;
- SIGKILL: whatever the kernel left; the rerun (the same command, ``--resume`` for the group
  level) removes the killed run's temporaries, reuses what was finished, and writes outputs
  identical to the uninterrupted run's.

Every run compared runs in a fresh child process: ITK fixes its thread count at first use in a
process and N4's result depends on it, so a run inside the test process (whose earlier tests
may have started ITK with more threads) is not comparable bit for bit. The default runs draw one point per level and
signal (SIGKILL by default, SIGTERM too with ``-m slow``); ``-m slow`` also runs six more
points each.
"""

from __future__ import annotations

import csv
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_child
from harness import snapshot, temporaries

GROUP = ["--grid", "tiny8mm", "--depth", "1", "--hidden", "8", "--relation-hidden", "8", "--epochs", "2",
         "--warmup-steps", "1", "--val-fraction", "0.34", "--side-info", "age", "--skip-bids-validation",
         "--nprocs", "1"]  # fmt: skip


def participant_args(bids: Path, out: Path, work: Path, model: Path) -> list[object]:
    return [bids, out, "participant", "--weights", model, "-w", work, "--skip-bids-validation", "--nprocs", "1",
            "--output-res", "4"]  # fmt: skip


def group_snapshot(out: Path) -> dict[str, Any]:
    """The group level's outputs minus what measures time: the weights, their description,
    and every epoch's metrics."""
    import json

    described = json.loads((out / "models" / "dualglow.json").read_text())
    training = described["metadata"]["training"]
    with (out / "models" / "dualglow_metrics.tsv").open() as handle:
        epochs = [{k: v for k, v in row.items() if k not in ("samples_per_s", "epoch_seconds")}
                  for row in csv.DictReader(handle, delimiter="\t")]  # fmt: skip
    return {
        "sha256": described["sha256"], "config": described["config"], "epochs": epochs,
        "grid": described["metadata"]["grid"], "side_info": described["metadata"]["side_info"],
        "subjects": training["subjects"], "selected_epoch": training["selected_epoch"],
    }  # fmt: skip


@pytest.fixture(scope="module")
def reference(cohort: Path, model: Path, offline_env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # fmt: skip
    """Uninterrupted participant and group runs: their outputs and how many renames each made."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    got = {}
    for level in ("participant", "group"):
        counted = folder / f"{level}-renames.txt"
        done = run_child(offline_env, *level_args(level, cohort, model, folder / level), count=counted)
        assert done.returncode == 0, done.stderr[-3000:]
        out = folder / level / "out"
        got[level] = (snapshot(out) if level == "participant" else group_snapshot(out), int(counted.read_text()))
    return got


def level_args(level: str, cohort: Path, model: Path, folder: Path) -> list[object]:
    out, work = folder / "out", folder / "work"
    return participant_args(cohort, out, work, model) if level == "participant" else [cohort, out, "group", "-w", work, *GROUP]


def _kill_then_rerun(level: str, signal_name: str, at: int, cohort: Path, model: Path, folder: Path,
                     child: Callable[..., Any]) -> Any:  # fmt: skip
    """Kill a run of ``level`` at the ``at``-th rename, check what it left, rerun; the rerun's snapshot."""
    out, work = folder / "out", folder / "work"
    args = level_args(level, cohort, model, folder)
    killed = child(*args, kill=f"{signal_name}:{at}")
    if signal_name == "TERM":
        assert killed.returncode == 143, killed.stderr[-3000:]
        assert "Error: interrupted by SIGTERM" in killed.stderr and "no half-written file was kept" in killed.stderr
        assert temporaries(out, work) == [], "SIGTERM must leave no temporary"
    else:
        assert killed.returncode == -9, killed.stderr[-3000:]
    rerun = child(*args, *(["--resume"] if level == "group" else []))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert temporaries(out, work) == [], "the rerun removes what the killed run left"
    return snapshot(out) if level == "participant" else group_snapshot(out)


# SIGTERM at a random point is slow-only (three child processes of ~10 s each): the fast
# probes of test_probes.py send SIGTERM to both levels in this process.
@pytest.mark.parametrize("level", ["participant", "group"])
@pytest.mark.parametrize("signal_name", [pytest.param("TERM", marks=pytest.mark.slow), "KILL"])
def test_a_run_killed_at_a_random_point_reruns_to_identical_outputs(
    level: str, signal_name: str, reference: dict[str, Any], cohort: Path, model: Path, tmp_path: Path,
    child: Callable[..., Any],
) -> None:  # fmt: skip
    expected, renames = reference[level]
    at = random.Random(f"{level}-{signal_name}").randint(1, renames)
    assert _kill_then_rerun(level, signal_name, at, cohort, model, tmp_path, child) == expected, (
        f"killed with SIG{signal_name} before rename {at} of {renames}"
    )


@pytest.mark.slow  # ~6 child processes of ~10 s per level and signal on 2 cores
@pytest.mark.parametrize("level", ["participant", "group"])
@pytest.mark.parametrize("signal_name", ["TERM", "KILL"])
def test_many_random_kill_points(
    level: str, signal_name: str, reference: dict[str, Any], cohort: Path, model: Path, tmp_path: Path,
    child: Callable[..., Any],
) -> None:  # fmt: skip
    expected, renames = reference[level]
    for at in sorted(random.Random(f"many-{level}-{signal_name}").sample(range(1, renames + 1), min(6, renames))):
        folder = tmp_path / f"at{at}"
        got = _kill_then_rerun(level, signal_name, at, cohort, model, folder, child)
        assert got == expected, f"killed with SIG{signal_name} before rename {at} of {renames}"
        shutil.rmtree(folder)


def test_two_runs_sharing_a_work_dir_register_each_image_once(
    cohort: Path, model: Path, tmp_path: Path, offline_env: dict[str, str]
) -> None:
    """Two participant runs started together on one work dir (a SLURM array sharing a cache):
    each T1w and PET is registered once - a run that wants an entry the other is building
    waits on the entry's lock, then reuses it. Each registration takes 2 s here, so the runs
    overlap (without the lock, both registered sub-01)."""
    import os
    import subprocess
    import sys

    from conftest import HARNESS

    count = tmp_path / "registrations.txt"
    env = {**os.environ, **offline_env, "RELIABILITY_REGISTRATION_LOG": str(count)}
    runs = [subprocess.Popen([sys.executable, str(HARNESS), "--", *map(str, participant_args(
                cohort, tmp_path / f"out{k}", tmp_path / "work", model))],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(2)]  # fmt: skip
    logs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    assert sorted(count.read_text().split()) == ["Affine"] * 3 + ["Rigid"] * 3 + ["SyNOnly"] * 3
    assert snapshot(tmp_path / "out0") == snapshot(tmp_path / "out1")
