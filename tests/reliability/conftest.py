"""Fixtures of the fault-injection tests: the fast cohort and model of :mod:`harness`, the
offline environment child processes need, and CLI runs in this process or in a child."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402

HARNESS = Path(__file__).parent / "harness.py"


@pytest.fixture(scope="session")
def offline_env(tmp_path_factory: pytest.TempPathFactory, template_cache: Path) -> Iterator[dict[str, str]]:
    """conftest's offline template settings for session fixtures and child processes."""
    settings = {
        "DUALGLOW_TEMPLATEFLOW_OFFLINE": "1",
        "DUALGLOW_TEMPLATE_CACHE": str(template_cache),
        "TEMPLATEFLOW_HOME": str(tmp_path_factory.getbasetemp() / "empty-tf-home"),
        "DUALGLOW_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in settings.items():
            patch.setenv(key, value)
        yield settings


@pytest.fixture
def fast_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    harness.patch_registration(monkeypatch.setattr)


@pytest.fixture(scope="session")
def cohort(offline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic heads with FDG-PET and ages 60, 65, 70."""
    return harness.build_cohort(tmp_path_factory.mktemp("reliability") / "bids", subjects=3)


@pytest.fixture(scope="session")
def model(offline_env: dict[str, str], cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny age-conditioned model on the tiny8mm grid (see :func:`harness.participant_model`)."""
    folder = tmp_path_factory.mktemp("reliability-model")
    with pytest.MonkeyPatch.context() as patch:
        harness.patch_registration(patch.setattr)
        return harness.participant_model(folder / "tiny", cohort, folder / "work")


def invoke(*args: object, command: object = None) -> Result:
    """A CLI run in this process (the caller installs the fast registration)."""
    from dualglow_app.cli import main

    return CliRunner().invoke(command or main, [str(a) for a in args])  # type: ignore[arg-type]


def run_child(env: dict[str, str], *args: object, kill: str | None = None, count: Path | None = None,
              entry: str = "dualglow", timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """A CLI run in a child process with the fast registration, optionally killing itself
    (``kill="TERM:7"``: SIGTERM just before the 7th rename of an atomic write) or counting
    its renames into the file ``count``."""
    own = ["--entry", entry] + (["--kill", kill] if kill else []) + (["--count-replaces", str(count)] if count else [])
    return subprocess.run(
        [sys.executable, str(HARNESS), *own, "--", *(str(a) for a in args)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture
def child(offline_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run_child(offline_env, *args, **kwargs)  # type: ignore[arg-type]

    return run
