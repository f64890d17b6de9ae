"""What the default model's benchmark scores: the mode by default, the mean of several draws,
or one draw at a temperature (single samples' input specificity)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_default_model import synthesis_choice  # noqa: E402


@pytest.mark.parametrize(("samples", "temperature", "expected"), [
    (1, None, (0.0, "DUAL-GLOW (T=0)")),
    (32, None, (1.0, "DUAL-GLOW (mean of 32, T=1)")),
    (1, 1.0, (1.0, "DUAL-GLOW (one draw, T=1)")),
    (8, 0.5, (0.5, "DUAL-GLOW (mean of 8, T=0.5)")),
    (8, 0.0, (0.0, "DUAL-GLOW (T=0)")),
])  # fmt: skip
def test_the_mode_unless_told_to_draw(samples: int, temperature: float | None, expected: tuple[float, str]) -> None:
    assert synthesis_choice(samples, temperature) == expected
