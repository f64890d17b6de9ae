"""benchmarks/gpu_check.sh and its wheel fetcher: they parse, and the CPU dry run passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "benchmarks" / "gpu_check.sh", ROOT / "benchmarks" / "fetch_gpu_wheels.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_script_parses(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_unknown_argument_is_refused_with_exit_2() -> None:
    done = subprocess.run(["bash", str(SCRIPTS[0]), "--gpu-please"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument '--gpu-please'" in done.stderr


def test_the_wheel_folder_is_ignored_by_git() -> None:
    done = subprocess.run(["git", "check-ignore", "-q", ".gpu_wheels/x.whl"], cwd=ROOT)
    assert done.returncode == 0, ".gpu_wheels/ must never be committed"


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_stage(tmp_path: Path) -> None:
    # .ci/run runs the same dry run on every submission; this is for `make test-all`.
    env = dict(os.environ, OUT=str(tmp_path))
    done = subprocess.run(["bash", str(SCRIPTS[0]), "--cpu-dry-run", "--python", sys.executable],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["tests", "memory", "freia", "train", "paper"]
    assert summary["passed"] and summary["dry_run"]
    train = json.loads((tmp_path / "train_bf16.json").read_text())["timing"]
    assert train["bf16"] and train["levels"] == 2 and all(b == b for b in train["bpd"])
    paper = json.loads((tmp_path / "paper_size.json").read_text())["timing"]
    assert paper["memory_saving"] and set(paper["reconstruction_errors"]) == {"mri", "pet"}
    assert (tmp_path / "memory_cpu.json").is_file() and (tmp_path / "vs_freia_cpu_h8_b1.json").is_file()


@pytest.mark.slow
def test_the_cpu_dry_run_trains_the_capacity_variants_side_by_side(tmp_path: Path) -> None:
    # The capacity stage as it travels to a GPU machine: a packed stack, variants in parallel,
    # what comes back collected (tiny models, a few steps each).
    from dualglow_app.phantom.mni import make_mni_stack

    make_mni_stack(tmp_path / "stack", 30, seed=0, jobs=1)
    packed = tmp_path / "stack.npz"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_capacity.py"), "pack", str(tmp_path / "stack"),
                    str(packed)], check=True, capture_output=True)  # fmt: skip
    tiny = "depth=1,hidden=8,relation_hidden=8,max_steps=2"
    env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", str(SCRIPTS[0]), "--cpu-dry-run", "--python", sys.executable, "--capacity",
                           str(packed), "--capacity-seconds", "60", "--capacity-variants", f"a:{tiny} b:{tiny},amp=false"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"][0] == {**summary["stages"][0], "stage": "capacity", "exit": 0}
    manifest = json.loads((tmp_path / "out" / "capacity" / "manifest.json").read_text())
    assert sorted(manifest["models"]) == ["a", "b"]
    history = json.loads((tmp_path / "out" / "capacity" / "b.history.json").read_text())
    assert history["settings"]["amp"] is False and history["steps"] == 2
