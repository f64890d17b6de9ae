"""Who a phantom subject is: the records :mod:`~dualglow_app.phantom.cohort` writes and
:mod:`~dualglow_app.phantom.preview` reads (kept apart so neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Demographics:
    age: float  # at the first session
    sex: str
    diagnosis: str  # CN / MCI / AD
    diagnosis_detail: str  # CN / SMC / EMCI / MCI / LMCI / AD
    disease_years: float  # years since onset at the first session (MCI/AD)
    severity: float  # AD hypometabolism severity at the first session (0 = none, 1 = typical AD)
    atrophy_rate: float  # the subject's ageing speed relative to the population


@dataclass
class SubjectInfo:
    participant_id: str
    demographics: Demographics
    session_ages: list[float]
    files: list[Path] = field(default_factory=list)
