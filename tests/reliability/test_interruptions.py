"""Kill runs at random points, rerun them, and get what an uninterrupted run writes.

A child process runs the CLI (:mod:`harness`: real everything but registration) and sends
itself SIGTERM or SIGKILL just before a rename drawn at random among those an uninterrupted
run makes - every atomic output, cache entry, pybids index, stacked dataset, checkpoint and
model file is one. Then:

- SIGTERM: exit 143 with a line naming what was interrupted, and no temporary anywhere;
- SIGKILL: whatever the kernel left; the rerun (the same command, ``--resume`` for the group
  level) removes the killed run's temporaries, reuses what was finished, and writes outputs
  identical to the uninterrupted run's.

The default runs draw one point per level and signal; ``-m slow`` runs six more each.
"""

from __future__ import annotations

import csv
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import invoke
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


def replaces(run: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    """How many renames ``run`` makes (the points a kill can be drawn from)."""
    import os

    real, calls = os.replace, {"n": 0}

    def counting(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", counting)
        run()
    return calls["n"]


@pytest.fixture(scope="module")
def reference(cohort: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Uninterrupted participant and group runs: their outputs and how many renames each made."""
    import harness

    folder = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        harness.patch_registration(patch.setattr)
        out, group_out = folder / "out", folder / "group-out"
        n_participant = replaces(lambda: _ok(invoke(*participant_args(cohort, out, folder / "work", model))), patch)
        n_group = replaces(lambda: _ok(invoke(cohort, group_out, "group", "-w", folder / "group-work", *GROUP)), patch)
    return {"participant": (snapshot(out), n_participant), "group": (group_snapshot(group_out), n_group)}


def _ok(result: Any) -> None:
    assert result.exit_code == 0, result.output


def _kill_then_rerun(level: str, signal_name: str, at: int, cohort: Path, model: Path, folder: Path,
                     child: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> Any:  # fmt: skip
    """Kill a run of ``level`` at the ``at``-th rename, check what it left, rerun; the rerun's snapshot."""
    import harness

    out, work = folder / "out", folder / "work"
    args = participant_args(cohort, out, work, model) if level == "participant" else [cohort, out, "group", "-w", work, *GROUP]
    killed = child(*args, kill=f"{signal_name}:{at}")
    if signal_name == "TERM":
        assert killed.returncode == 143, killed.stderr[-3000:]
        assert "Error: interrupted by SIGTERM" in killed.stderr and "no half-written file was kept" in killed.stderr
        assert temporaries(out, work) == [], "SIGTERM must leave no temporary"
    else:
        assert killed.returncode == -9, killed.stderr[-3000:]
    harness.patch_registration(monkeypatch.setattr)
    rerun = invoke(*args, *(["--resume"] if level == "group" else []))
    assert rerun.exit_code == 0, rerun.output
    assert temporaries(out, work) == [], "the rerun removes what the killed run left"
    return snapshot(out) if level == "participant" else group_snapshot(out)


@pytest.mark.parametrize("level", ["participant", "group"])
@pytest.mark.parametrize("signal_name", ["TERM", "KILL"])
def test_a_run_killed_at_a_random_point_reruns_to_identical_outputs(
    level: str, signal_name: str, reference: dict[str, Any], cohort: Path, model: Path, tmp_path: Path,
    child: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    expected, renames = reference[level]
    at = random.Random(f"{level}-{signal_name}").randint(1, renames)
    assert _kill_then_rerun(level, signal_name, at, cohort, model, tmp_path, child, monkeypatch) == expected, (
        f"killed with SIG{signal_name} before rename {at} of {renames}"
    )


@pytest.mark.slow  # ~6 child processes of ~10 s per level and signal on 2 cores
@pytest.mark.parametrize("level", ["participant", "group"])
@pytest.mark.parametrize("signal_name", ["TERM", "KILL"])
def test_many_random_kill_points(
    level: str, signal_name: str, reference: dict[str, Any], cohort: Path, model: Path, tmp_path: Path,
    child: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    expected, renames = reference[level]
    for at in sorted(random.Random(f"many-{level}-{signal_name}").sample(range(1, renames + 1), min(6, renames))):
        folder = tmp_path / f"at{at}"
        got = _kill_then_rerun(level, signal_name, at, cohort, model, folder, child, monkeypatch)
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
    assert sorted(count.read_text().split()) == ["Rigid"] * 3 + ["SyN"] * 3
    assert snapshot(tmp_path / "out0") == snapshot(tmp_path / "out1")
