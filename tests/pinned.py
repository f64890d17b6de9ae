"""Comparing outputs with values pinned in tests/data: nested dicts and lists, floats to a tolerance."""

from __future__ import annotations

import pytest


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
