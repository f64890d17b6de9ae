"""Shared fixtures: an isolated template cache, offline TemplateFlow, synthetic subjects."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def template_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("templateflow-cache")


@pytest.fixture(autouse=True)
def offline_templates(monkeypatch: pytest.MonkeyPatch, template_cache: Path, tmp_path_factory) -> None:
    # Tests must never touch the network or the developer's real caches.
    monkeypatch.setenv("DUALGLOW_TEMPLATEFLOW_OFFLINE", "1")
    monkeypatch.setenv("DUALGLOW_TEMPLATE_CACHE", str(template_cache))
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path_factory.getbasetemp() / "empty-tf-home"))
