"""Comparing outputs with values pinned in tests/data: nested dicts and lists, floats to a tolerance.

A pin guards against outputs changing by accident (a refactor of the inference path). When
they change on purpose (a new shipped model), re-pin: ``DUALGLOW_REPIN=1 python -m pytest
tests/test_inference.py tests/test_synthesize.py -k pinned`` rewrites the files and skips, then
review the diff of tests/data and commit it with the change that caused it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

#: The version string the pins are written with (outputs name the running dualglow version).
PINNED_VERSION = "0.1.0"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def assert_close(got: object, want: object, where: str, tol: float, numeric_strings: bool = False) -> None:
    """``got`` equals ``want`` key for key and item for item, floats within ``tol`` (relative and
    absolute), and with ``numeric_strings`` also strings that read as numbers (TSV cells)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}", tol, numeric_strings)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]", tol, numeric_strings)
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=tol, abs=tol), where
    elif numeric_strings and isinstance(want, str) and isinstance(got, str) and _number(want) is not None:
        assert _number(got) == pytest.approx(_number(want), rel=tol, abs=tol), where
    else:
        assert got == want, where


def check_pinned(got: object, path: Path, tol: float, numeric_strings: bool = False, version: str | None = None) -> None:
    """``got`` against the pin in ``path`` (:func:`assert_close`), or, with ``DUALGLOW_REPIN=1``,
    write ``got`` as the new pin and skip. ``version``: the running dualglow version, which the
    pin stores as :data:`PINNED_VERSION` so that a release does not change it."""
    if os.environ.get("DUALGLOW_REPIN") == "1":
        text = json.dumps(got, indent=1, sort_keys=True)
        if version is not None:
            text = text.replace(json.dumps(version), json.dumps(PINNED_VERSION)).replace(
                f"dualglow {version}.", f"dualglow {PINNED_VERSION}.")
        path.write_text(text + "\n")
        pytest.skip(f"DUALGLOW_REPIN=1: wrote {path.name}; review and commit its diff")
    text = path.read_text()
    if version is not None:
        text = text.replace(json.dumps(PINNED_VERSION), json.dumps(version)).replace(
            f"dualglow {PINNED_VERSION}.", f"dualglow {version}.")
    assert_close(got, json.loads(text), path.stem, tol=tol, numeric_strings=numeric_strings)


def mean_tissue_maps(model: object) -> np.ndarray | None:
    """A model's own mean training tissue maps, (2, *grid) grey matter and CSF (its anatomy
    template's mean features at sigma 0), for the pins of a model that reads native tissue
    maps: the fixed input beside its mean training T1w; None for a model that does not."""
    if not model.synthesis_reads_tissue_maps:  # type: ignore[attr-defined]
        return None
    config = model.config  # type: ignore[attr-defined]
    assert config.anatomy_sigmas[0] == 0.0 and config.anatomy_tissue == "gm+csf"
    mean = model.get_buffer("anatomy_mean")[:, 0].numpy()  # type: ignore[attr-defined]
    per_tissue = len(config.anatomy_sigmas)
    return np.stack([mean[0], mean[per_tissue]]).astype(np.float32)
