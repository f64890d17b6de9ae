"""Covariates: the side information c of eq. 16-17, from ``participants.tsv`` / ``sessions.tsv``
to the model file and back.

A covariate is a column of the input dataset. Its kind comes from the dataset's own
description (BIDS: ``participants.json``, and ``sessions.json`` for ``sub-X_sessions.tsv``):

- ``Levels`` declared: **categorical** (the declared order is kept; the network sees a
  one-hot vector);
- ``Units`` declared, or every value a number: **continuous** (the network sees
  ``(value - centre) / scale``);
- neither, with values that are not numbers: categorical, its levels sorted (with a warning:
  declare ``Levels`` so the order and the allowed values are yours, not inferred).

The group level *learns* each covariate from the scans it trains on
(:func:`learn_covariates`): a continuous one's centre and scale (mean and SD) and range, a
categorical one's classes (the declared levels that occur, in the declared order) and counts.
The result, a :class:`CovariateSpec` per covariate, is stored in the model file's JSON
(:class:`dualglow_app.weights.ModelMetadata`), so the participant level decodes a scan's
values with exactly the training's encoding and refuses values the model never saw.

>>> spec = CovariateSpec("diagnosis", "categorical", levels=("CN", "MCI", "AD"))
>>> spec.parse("AD", Path("participants.tsv"), "sub-01"), spec.encode("AD")
('AD', 2.0)
>>> learn_covariates({"age": [60.0, 70.0, 80.0]}, {"age": AGE_SPEC})["age"].centre
70.0
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dualglow_app.bids import AGE, BIDSInputError, CovariateError, TsvTable
from dualglow_app.log import get_logger

log = get_logger(__name__)

CONTINUOUS = "continuous"
CATEGORICAL = "categorical"
KINDS = (CONTINUOUS, CATEGORICAL)
#: Columns that identify rows; never covariates.
ID_COLUMNS = ("participant_id", "session_id")
#: A covariate name as it may appear in a BIDS TSV header and in this package's options.
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_MISSING = ("", "n/a")

Value = float | str


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a covariate (None when it can)."""
    if name in ID_COLUMNS:
        return f"{name} identifies rows, it is not a covariate"
    if not _NAME.match(name):
        return f"{name!r} is not a column name (letters, digits and _, starting with a letter)"
    return None


@dataclass(frozen=True)
class CovariateSpec:
    """One covariate: its kind and, once learnt at the group level, its encoding.

    Continuous: ``centre`` and ``scale`` (the network sees ``(value - centre) / scale``),
    the training range ``low``-``high``. Categorical: ``levels`` are the classes in index
    order (declared, or after learning the training's), ``counts`` how many training scans
    had each. ``learnt`` tells a group-level result (stored in a model) from a dataset's
    declaration. :meth:`parse` reads a TSV cell, :meth:`encode` gives the model's number.
    """

    name: str
    kind: str
    units: str | None = None
    description: str | None = None
    levels: tuple[str, ...] = ()
    level_descriptions: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    centre: float | None = None
    scale: float | None = None
    low: float | None = None
    high: float | None = None
    counts: dict[str, int] = field(default_factory=dict, hash=False, compare=False)
    n: int = 0
    learnt: bool = False
    # Where the kind came from: "participants.json", "sessions.json", "values" (inferred) or "model".
    declared_in: str = "values"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"covariate {self.name}: kind {self.kind!r}, expected one of {KINDS}")
        object.__setattr__(self, "levels", tuple(str(level) for level in self.levels))

    @property
    def column(self) -> str:
        """The TSV column (:func:`dualglow_app.bids.read_covariate` reads any spec by it)."""
        return self.name

    @property
    def is_categorical(self) -> bool:
        return self.kind == CATEGORICAL

    # -- values ----------------------------------------------------------------------------

    def problem(self, value: Value) -> str | None:
        """Why ``value`` (natural units, or a level) cannot be given to this covariate."""
        if self.is_categorical:
            if str(value) in self.levels:
                return None
            whose = "the categories the model was trained with" if self.learnt else "its declared levels"
            return f"{str(value)!r} is not one of {whose} ({', '.join(self.levels)})"
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"{str(value)!r} is not a number" + (f" of {self.units}" if self.units else "")
        if self.name == AGE.column:
            return AGE.range_problem(number)
        if not math.isfinite(number):
            return f"{number} is not a finite number"
        return None

    def value(self, value: Value) -> Value:
        """``value`` checked and typed (a float, or a level string); raises ``ValueError``."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{self.name}: {problem}")
        return str(value) if self.is_categorical else float(value)

    def parse(self, text: str | None, source: Path | str, row: str) -> Value | None:
        """One TSV cell: None for ``n/a`` or empty, else the checked value; a bad cell raises
        :class:`~dualglow_app.bids.CovariateError` naming the file, the row and the fix."""
        if text is None or text.strip() in _MISSING:
            return None
        try:
            return self.value(text.strip())
        except ValueError as err:
            problem = str(err).removeprefix(f"{self.name}: ")
        raise CovariateError(
            f"{source}, row {row}, column {self.name}: {problem}; correct it, or write n/a if it is unknown."
        )

    def encode(self, value: Value) -> float:
        """The number the model takes: natural units (continuous) or the class index."""
        checked = self.value(value)
        return float(self.levels.index(str(checked))) if self.is_categorical else float(checked)

    @property
    def typical(self) -> Value:
        """The training's typical value (imputation): the mean, or the most frequent class."""
        if not self.learnt:
            raise ValueError(f"covariate {self.name} was not learnt from training data; it has no typical value")
        if self.is_categorical:
            return max(self.levels, key=lambda level: self.counts.get(level, 0))
        assert self.centre is not None
        return self.centre

    def describe(self, value: Value) -> str:
        """``"72 years"``, ``"AD"``."""
        if self.is_categorical:
            return str(value)
        unit = {"year": "years", "years": "years"}.get(self.units or "", self.units or "")
        return f"{float(value):g}" + (f" {unit}" if unit else "")

    def summary(self) -> str:
        """One line for logs and reports: the encoding the model uses."""
        if self.is_categorical:
            counts = ", ".join(f"{level} {self.counts[level]}" for level in self.levels if level in self.counts)
            return f"{self.name}: categorical, levels {', '.join(self.levels)}" + (f" (training scans: {counts})" if counts else "")
        text = f"{self.name}: continuous" + (f" ({self.units})" if self.units else "")
        if self.centre is not None and self.scale is not None:
            text += f", centre {self.centre:g}, scale {self.scale:g}"
        if self.low is not None and self.high is not None:
            text += f", training range {self.low:g}-{self.high:g}"
        return text

    # -- files -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (the model file's ``metadata.covariates[name]``)."""
        data = asdict(self)
        data["levels"] = list(self.levels)
        return {key: value for key, value in data.items() if value not in (None, {}, [], "")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CovariateSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"covariate {data.get('name')!r}: unknown keys {unknown} (written by a newer dualglow?)")
        values = dict(data)
        values["levels"] = tuple(values.get("levels") or ())
        return cls(**values)


#: Age as the participant level knew it before covariates were learnt: continuous, years.
AGE_SPEC = CovariateSpec(AGE.column, CONTINUOUS, units="year", description="Age", declared_in="dualglow")


# --------------------------------------------------------------------------- the dataset's declarations


def _json_columns(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BIDSInputError(f"{path}: unreadable ({err}); write it as JSON (BIDS column descriptions).") from None
    if not isinstance(data, dict):
        raise BIDSInputError(f"{path}: not a JSON object of column descriptions; see the BIDS participants.json example.")
    return {key: value for key, value in data.items() if isinstance(value, dict)}


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a number (a continuous value, or a negative number on a command line)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def declare_covariate(
    name: str, description: Mapping[str, Any] | None, values: Iterable[str], declared_in: str, where: str
) -> CovariateSpec:
    """A column's kind from its BIDS description (``Levels`` / ``Units``), else from its values."""
    if (problem := name_problem(name)) is not None:
        raise BIDSInputError(f"--side-info {name}: {problem}.")
    description = dict(description or {})
    text = description.get("Description") if isinstance(description.get("Description"), str) else None
    levels = description.get("Levels")
    if isinstance(levels, dict) and levels:
        return CovariateSpec(name, CATEGORICAL, description=text, levels=tuple(str(k) for k in levels),
                             level_descriptions={str(k): str(v) for k, v in levels.items()}, declared_in=declared_in)  # fmt: skip
    units = description.get("Units")
    if units is not None or name == AGE.column:
        return CovariateSpec(name, CONTINUOUS, units=str(units or "year"), description=text,
                             declared_in=declared_in if units is not None else "values")  # fmt: skip
    present = sorted({v.strip() for v in values if v is not None and v.strip() not in _MISSING})
    if present and all(is_number(v) for v in present):
        return CovariateSpec(name, CONTINUOUS, description=text)
    log.warning("%s: column %s has no Levels or Units in its JSON description; treated as categorical with the "
                "levels found (%s). Declare its Levels so the order and the allowed values are yours.",
                where, name, ", ".join(present[:10]) + (" ..." if len(present) > 10 else ""))  # fmt: skip
    return CovariateSpec(name, CATEGORICAL, description=text, levels=tuple(present))


def dataset_tables(bids_dir: Path) -> tuple[TsvTable | None, dict[str, TsvTable]]:
    """``participants.tsv`` and every ``sub-X/sub-X_sessions.tsv`` (by subject label)."""
    participants = TsvTable.read(bids_dir / "participants.tsv", "participant_id", "sub")
    sessions: dict[str, TsvTable] = {}
    for path in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv")):
        table = TsvTable.read(path, "session_id", "ses")
        if table is not None:
            sessions[path.parent.name.removeprefix("sub-")] = table
    return participants, sessions


def _columns(table: TsvTable | None) -> list[str]:
    if table is None or not table.rows:
        return []
    return list(next(iter(table.rows.values())))


def declare_covariates(bids_dir: str | Path, names: Sequence[str]) -> dict[str, CovariateSpec]:
    """Each of ``names`` as the dataset declares it (see the module docstring).

    A name that is no column of ``participants.tsv`` nor of any ``sub-X_sessions.tsv``
    raises :class:`~dualglow_app.bids.BIDSInputError` listing the columns there are.
    """
    root = Path(bids_dir)
    participants, sessions = dataset_tables(root)
    described = {**{k: ("sessions.json", v) for k, v in _json_columns(root / "sessions.json").items()},
                 **{k: ("participants.json", v) for k, v in _json_columns(root / "participants.json").items()}}  # fmt: skip
    available = dict.fromkeys(_columns(participants))
    for table in sessions.values():
        available.update(dict.fromkeys(_columns(table)))
    specs: dict[str, CovariateSpec] = {}
    for name in names:
        if (problem := name_problem(name)) is not None:
            raise BIDSInputError(f"--side-info {name}: {problem}.")
        if name not in available:
            columns = [c for c in available if c not in ID_COLUMNS]
            raise BIDSInputError(
                f"{root / 'participants.tsv'}: no column {name!r} (nor in any sub-*_sessions.tsv); the columns are "
                f"{', '.join(columns) or 'none'}: add {name} there, or drop it from --side-info."
            )
        cells = [row.get(name) or "" for table in [participants, *sessions.values()] if table for row in table.rows.values()]
        declared_in, description = described.get(name, ("values", None))
        specs[name] = declare_covariate(name, description, cells, declared_in, str(root / "participants.tsv"))
    return specs


def dataset_mismatch(bids_dir: str | Path, specs: Mapping[str, CovariateSpec]) -> dict[str, str]:
    """How the dataset at ``bids_dir`` disagrees with a model's covariates ``specs``, by name:
    a column missing from ``participants.tsv`` and every ``sub-X_sessions.tsv`` (the problem
    starts with ``no column``), or declared in ``participants.json`` / ``sessions.json`` as the
    other kind (``Levels`` for a continuous covariate, ``Units`` for a categorical one).
    Values are checked scan by scan (:meth:`CovariateSpec.parse`)."""
    root = Path(bids_dir)
    if not specs:
        return {}
    participants, sessions = dataset_tables(root)
    described = {**_json_columns(root / "sessions.json"), **_json_columns(root / "participants.json")}
    available = set(_columns(participants)).union(*(set(_columns(t)) for t in sessions.values()))
    problems = {}
    for name, spec in specs.items():
        if name not in available:
            problems[name] = f"no column {name!r} in participants.tsv or any sub-*_sessions.tsv"
            continue
        declared = described.get(name, {})
        if spec.is_categorical and "Units" in declared and "Levels" not in declared:
            problems[name] = f"participants.json declares {name} continuous (Units {declared['Units']!r})"
        elif not spec.is_categorical and isinstance(declared.get("Levels"), dict):
            problems[name] = f"participants.json declares {name} categorical (Levels {', '.join(declared['Levels'])})"
    return problems


# --------------------------------------------------------------------------- learning (group level)


def learn_covariates(values: Mapping[str, Sequence[Value | None]], declared: Mapping[str, CovariateSpec]) -> dict[str, CovariateSpec]:
    """Each covariate learnt from the training scans' ``values`` (None: unknown, not used).

    Continuous: centre = mean, scale = SD (4 significant digits), range = min-max.
    Categorical: classes = the declared levels that occur, in the declared order, with counts.
    A covariate that does not vary (one value, or one class) raises ``ValueError``: the model
    could learn nothing from it.
    """
    learnt: dict[str, CovariateSpec] = {}
    for name, spec in declared.items():
        known = [v for v in values[name] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if spec.is_categorical:
            counts = Counter(str(v) for v in known)
            undeclared = sorted(set(counts) - set(spec.levels))
            levels = [level for level in spec.levels if counts[level]] + undeclared
            if len(levels) < 2:
                raise ValueError(f"--side-info {name}: every training scan has {name} = {', '.join(levels) or 'n/a'}; "
                                 "a covariate must vary to be learnt: drop it, or add scans of other classes.")  # fmt: skip
            rare = [level for level in levels if counts[level] < 3]
            if rare:
                log.warning("--side-info %s: only %s training scan(s) of %s; the model learns little about them",
                            name, "/".join(str(counts[r]) for r in rare), ", ".join(rare))  # fmt: skip
            learnt[name] = replace(spec, levels=tuple(levels), counts={level: counts[level] for level in levels},
                                   n=len(known), learnt=True)  # fmt: skip
            continue
        numbers = [float(v) for v in known]
        if len(numbers) < 2:
            raise ValueError(f"--side-info {name}: {len(numbers)} training scan(s) with a value; at least 2 are needed.")
        mean = sum(numbers) / len(numbers)
        sd = math.sqrt(sum((v - mean) ** 2 for v in numbers) / len(numbers))
        if sd <= 1e-6 * max(1.0, abs(mean)):
            raise ValueError(f"--side-info {name}: every training scan has {name} = {numbers[0]:g}; a covariate must "
                             "vary to be learnt: drop it.")  # fmt: skip
        learnt[name] = replace(spec, centre=_round(mean), scale=_round(sd), low=min(numbers), high=max(numbers),
                               n=len(numbers), learnt=True)  # fmt: skip
    return learnt


def _round(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def side_config(names: Sequence[str], specs: Mapping[str, CovariateSpec] | None) -> dict[str, Any]:
    """The :class:`~dualglow_app.model.DualGlowConfig` fields ``continuous`` and ``categorical``
    for the covariates ``names``, from their learnt ``specs`` (None: age alone, scaled as
    dualglow <= 0.1 scaled it, (70, 10))."""
    from dualglow_app.model import AGE_SCALING

    if specs is None:
        unknown = [n for n in names if n != AGE.column]
        if unknown:
            raise ValueError(f"side_config: covariates {unknown} need their learnt specs (learn_covariates)")
        return {"continuous": {AGE.column: AGE_SCALING} if AGE.column in names else {}, "categorical": {}}
    continuous = {n: (specs[n].centre, specs[n].scale) for n in names if not specs[n].is_categorical}
    categorical = {n: len(specs[n].levels) for n in names if specs[n].is_categorical}
    return {"continuous": continuous, "categorical": categorical}


def legacy_specs(continuous: Mapping[str, Sequence[float]], categorical: Mapping[str, int]) -> dict[str, CovariateSpec]:
    """Specs of a model file written before covariates were stored (age alone, in practice):
    the encoding from its config; categorical classes cannot be named (``levels`` empty)."""
    specs = {name: CovariateSpec(name, CONTINUOUS, units="year" if name == AGE.column else None,
                                 centre=float(cs[0]), scale=float(cs[1]), learnt=True, declared_in="model")
             for name, cs in continuous.items()}  # fmt: skip
    specs.update({name: CovariateSpec(name, CATEGORICAL, learnt=True, declared_in="model") for name in categorical})
    return specs


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Sweep:
    """``--sweep NAME=VALUES``: one covariate set to each value in turn (the rest the scan's own).

    ``values`` are as typed: ``50:100:10`` (start:stop:step, stop included), ``60,70,80``,
    ``CN,MCI,AD``, or ``all`` (every class of a categorical covariate). :meth:`resolve`
    checks them against the model's :class:`CovariateSpec`.

    >>> Sweep.parse("age=50:70:10").resolve(AGE_SPEC)
    [50.0, 60.0, 70.0]
    """

    name: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Sweep:
        """``NAME=VALUES``; a malformed one raises ``ValueError`` with an example."""
        name, sep, rest = str(text).partition("=")
        name, rest = name.strip(), rest.strip()
        example = "e.g. --sweep age=50:100:10 or --sweep diagnosis=CN,MCI,AD"
        if not sep or not name or not rest:
            raise ValueError(f"--sweep {text}: write NAME=VALUES ({example})")
        if (problem := name_problem(name)) is not None:
            raise ValueError(f"--sweep {text}: {problem}")
        if rest.count(":") == 2 and "," not in rest:
            try:
                start, stop, step = (float(p) for p in rest.split(":"))
            except ValueError:
                raise ValueError(f"--sweep {text}: START:STOP:STEP must be numbers ({example})") from None
            if not step > 0 or stop < start:
                raise ValueError(f"--sweep {text}: use START <= STOP and STEP > 0 ({example})")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > 100:
                raise ValueError(f"--sweep {text}: {count} values; at most 100")
            return cls(name, tuple(f"{start + k * step:.10g}" for k in range(count)))
        values = tuple(dict.fromkeys(v.strip() for v in rest.split(",") if v.strip()))
        if not values:
            raise ValueError(f"--sweep {text}: no values ({example})")
        return cls(name, values)

    def resolve(self, spec: CovariateSpec) -> list[Value]:
        """The values, typed and checked against ``spec``; raises ``ValueError`` naming the bad one."""
        if self.values == ("all",) and spec.is_categorical:
            return list(spec.levels)
        resolved: list[Value] = []
        for text in self.values:
            problem = spec.problem(text)
            if problem is not None:
                raise ValueError(f"--sweep {self.name}={','.join(self.values)}: {problem}")
            resolved.append(spec.value(text))
        if not spec.is_categorical:
            resolved = sorted(set(resolved), key=float)
        return resolved


def desc_label(name: str, value: Value, spec: CovariateSpec | None = None) -> str:
    """A BIDS ``desc-`` label (letters and digits only) for a covariate set to ``value``:
    ``age`` 60 -> ``age60``, 72.5 -> ``age72p5``; ``diagnosis`` AD -> ``diagnosisAD``.

    >>> desc_label("diagnosis", "AD"), desc_label("age", 72.5), desc_label("apoe_e4", "2")
    ('diagnosisAD', 'age72p5', 'apoee42')
    """
    stem = re.sub(r"[^A-Za-z0-9]", "", name)
    if spec is not None and spec.is_categorical or isinstance(value, str):
        text = re.sub(r"[^A-Za-z0-9]", "", str(value))
        if not text and spec is not None:
            text = f"level{spec.levels.index(str(value))}"
    else:
        text = f"{float(value):g}".replace(".", "p").replace("-", "m").replace("+", "")
    return stem + text


__all__ = [
    "AGE_SPEC", "CATEGORICAL", "CONTINUOUS", "CovariateSpec", "Sweep", "dataset_mismatch", "declare_covariate",
    "declare_covariates",
    "dataset_tables", "desc_label", "learn_covariates", "legacy_specs", "name_problem", "side_config",
]
