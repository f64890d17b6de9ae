"""BIDS in and out: find each subject/session's T1w (and PET), its age, and name derivatives.

Inputs are indexed with pybids without a validation pass, skipping subjects that were not
asked for, and the index is cached in the work directory (keyed by the dataset's folder
modification times, so adding a file re-indexes). Outputs follow BIDS-Derivatives:

    sub-<l>[/ses-<l>]/pet/sub-<l>[_ses-<l>]_trc-FDG_space-<space>[_res-<l>]_desc-<l>_pet.nii.gz

>>> scans = find_scans("bids/", participant_labels=["01"])  # doctest: +SKIP
>>> derivative_path("out/", scans[0], desc="synthetic")    # doctest: +SKIP
PosixPath('out/sub-01/pet/sub-01_trc-FDG_space-MNI152NLin2009cAsym_desc-synthetic_pet.nii.gz')
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualglow_app import __version__
from dualglow_app.io import atomic_dir, entry_lock, write_json
from dualglow_app.log import get_logger

log = get_logger(__name__)

NIFTI_EXTENSIONS = [".nii.gz", ".nii"]
CODE_URL = "https://github.com/dualglow/dualglow"


class BIDSInputError(ValueError):
    """A problem with the input dataset, stated in one line with the file and the fix."""


class CovariateError(BIDSInputError):
    """A covariate cell that is not a usable value (the file, the row, the value and the fix)."""


@dataclass(frozen=True)
class Scan:
    """One subject (and session) of the input dataset, with what dualglow needs from it.

    ``age_source`` names the file the age was read from, so an error about a missing age can
    say which file to fix; ``covariates`` / ``covariate_sources`` do the same for the
    covariates :func:`find_scans` was asked for. ``covariate_problems`` holds, by covariate name, why a value in
    ``participants.tsv`` / ``sessions.tsv`` could not be used (the value is then None): a stage
    that needs that covariate fails this scan with the message, the others go on.
    """

    subject: str
    session: str | None
    t1w: Path
    pet: Path | None = None
    age: float | None = None
    age_source: str | None = None
    sex: str | None = None
    diagnosis: str | None = None
    covariate_problems: Mapping[str, str] = field(default_factory=dict, hash=False)
    # The covariates asked of find_scans (``covariates=``), by name: the value (a number, or a
    # level) and the file it came from; a scan without a value has no entry.
    covariates: Mapping[str, float | str] = field(default_factory=dict, hash=False)
    covariate_sources: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def prefix(self) -> str:
        """``sub-<l>[_ses-<l>]``, the start of every file name for this scan."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def folder(self) -> Path:
        """``sub-<l>[/ses-<l>]``, the scan's folder relative to a dataset root."""
        return Path(f"sub-{self.subject}") / (f"ses-{self.session}" if self.session else "")


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` -> ``01`` (BIDS-Apps accept labels with or without the prefix)."""
    return label[len(prefix) + 1 :] if label.startswith(f"{prefix}-") else label


#: Part of the index key: 2 = indexes written atomically (earlier ones may be partial).
INDEX_VERSION = 2


def _folder_stamp(bids_dir: Path) -> str:
    """A cheap fingerprint of the dataset layout: modification times of the top two levels."""
    parts = []
    for path in [bids_dir, *sorted(bids_dir.glob("sub-*")), *sorted(bids_dir.glob("sub-*/*"))]:
        with_stat = path.stat()
        parts.append(f"{path.name}:{with_stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_layout(
    bids_dir: os.PathLike[str] | str,
    participant_labels: Sequence[str] | None = None,
    work_dir: os.PathLike[str] | str | None = None,
) -> Any:
    """Index ``bids_dir`` with pybids (no validation, only the subjects asked for).

    With ``work_dir``, the index is stored in ``WORK/pybids/<key>/`` and reused while the
    dataset's folders are unchanged. It is built in memory and written whole (a killed run
    leaves no partial index behind), once: a concurrent run waits for it.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    root = Path(bids_dir).resolve()
    if not (root / "dataset_description.json").is_file():
        raise BIDSInputError(
            f"{root}: no dataset_description.json, so this is not a BIDS dataset; point BIDS_DIR at the dataset root."
        )
    ignore: list[Any] = ["code", "derivatives", "sourcedata", "stimuli", re.compile(r"(/\.)")]
    if participant_labels:
        wanted = "|".join(re.escape(label) for label in participant_labels)
        # pybids matches regexes against the path relative to the root, with a leading "/"
        ignore.append(re.compile(rf"^/sub-(?!(?:{wanted})(?:/|$))[^/]+"))

    def index() -> Any:
        indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=False)
        return BIDSLayout(root, validate=False, indexer=indexer)

    if work_dir is None:
        return index()
    key = hashlib.sha256(
        f"{INDEX_VERSION}|{root}|{sorted(participant_labels or [])}|{_folder_stamp(root)}".encode()
    ).hexdigest()[:16]
    folder = Path(work_dir) / "pybids" / key
    if not (folder / "layout_index.sqlite").is_file():
        with entry_lock(folder):
            if not (folder / "layout_index.sqlite").is_file():
                layout = index()
                with atomic_dir(folder) as tmp:
                    layout.save(tmp, replace_connection=False)
                return layout
    return BIDSLayout(root, validate=False, database_path=folder)


# --------------------------------------------------------------------------- covariates


@dataclass(frozen=True)
class Covariate:
    """A numeric column of ``participants.tsv`` / ``sub-X_sessions.tsv`` and its plausible range.

    :meth:`parse` reads one cell: ``n/a`` or empty is unknown (None); anything else must be a
    finite number within ``[low, high]``, or it is refused with the file, the row and the fix.

    >>> AGE.parse("71.5", Path("participants.tsv"), "sub-01")
    71.5
    >>> AGE.parse("-5", Path("participants.tsv"), "sub-01")
    Traceback (most recent call last):
    dualglow_app.bids.CovariateError: participants.tsv, row sub-01, column age: -5 is outside 18-110 years; correct it, or write n/a if it is unknown.
    """

    column: str
    unit: str
    low: float
    high: float

    def range_problem(self, value: float) -> str | None:
        """Why ``value`` is not plausible (None when it is)."""
        if not math.isfinite(value):
            return f"{value} is not a number of {self.unit}"
        if not self.low <= value <= self.high:
            return f"{value:g} is outside {self.low:g}-{self.high:g} {self.unit}"
        return None

    def parse(self, text: str | None, source: Path, row: str) -> float | None:
        """The value of one cell; raises :class:`CovariateError` naming ``source`` and ``row``."""
        if text is None or text.strip() in ("", "n/a"):
            return None
        try:
            value = float(text)
        except ValueError:
            problem: str | None = f"{text.strip()!r} is not a number of {self.unit}"
        else:
            problem = self.range_problem(value)
        if problem is None:
            return value
        raise CovariateError(
            f"{source}, row {row}, column {self.column}: {problem}; correct it, or write n/a if it is unknown."
        )


#: Age, the covariate dualglow reads today (eq. 16-17's side information): the adults the
#: method is meant for; 0, negative or 300 are typing errors.
AGE = Covariate("age", "years", 18.0, 110.0)


@dataclass(frozen=True)
class TsvTable:
    """A BIDS TSV (``participants.tsv``, ``sub-X_sessions.tsv``) read once: its path and its
    rows by label (``participant_id`` / ``session_id`` without the ``sub-`` / ``ses-`` prefix)."""

    path: Path
    rows: dict[str, dict[str, str]]

    @classmethod
    def read(cls, path: Path, id_column: str, prefix: str) -> TsvTable | None:
        """The table at ``path`` (None when there is none); an unreadable one, or one without
        ``id_column``, raises :class:`BIDSInputError`."""
        if not path.is_file():
            return None
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t"))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise BIDSInputError(f"{path}: unreadable ({err}); save it as UTF-8 tab-separated text.") from None
        if rows and id_column not in rows[0]:
            raise BIDSInputError(f"{path}: no {id_column} column; its first column must be {id_column}.")
        return cls(path, {strip_prefix(row.get(id_column) or "", prefix): row for row in rows})


def read_covariate(
    covariate: Any, subject: str, session: str | None, participants: TsvTable | None, sessions: TsvTable | None
) -> tuple[Any, str | None]:
    """A scan's value of ``covariate`` and the file it came from: its row of ``sub-X_sessions.tsv``
    first, then its row of ``participants.tsv``; ``(None, None)`` when neither has one.
    ``covariate`` is a :class:`Covariate` or any object with a ``column`` and a ``parse`` of
    the same signature (:class:`dualglow_app.covariates.CovariateSpec`).

    A cell that is present but unusable raises :class:`CovariateError` (it is not skipped in
    favour of the other file: the user wrote something, and it is wrong).
    """
    places = []
    if session is not None and sessions is not None:
        places.append((sessions, session, f"ses-{session}"))
    if participants is not None:
        places.append((participants, subject, f"sub-{subject}"))
    for table, label, row_name in places:
        row = table.rows.get(label)
        if row is not None:
            value = covariate.parse(row.get(covariate.column), table.path, row_name)
            if value is not None:
                return value, str(table.path)
    return None, None


# --------------------------------------------------------------------------- finding scans

_SCAN_ENTITIES = re.compile(r"^sub-(?P<subject>[A-Za-z0-9]+)(?:_ses-(?P<session>[A-Za-z0-9]+))?_")


def _subjects_on_disk(root: Path) -> list[str]:
    return sorted(path.name[4:] for path in root.glob("sub-*") if path.is_dir())


def _by_scan(files: Iterable[str]) -> dict[tuple[str, str | None], list[Path]]:
    """Files grouped by (subject, session) read from their names, each group sorted."""
    groups: dict[tuple[str, str | None], list[Path]] = {}
    for name in files:
        match = _SCAN_ENTITIES.match(Path(name).name)
        if match:
            groups.setdefault((match["subject"], match["session"]), []).append(Path(name))
    return {key: sorted(paths) for key, paths in groups.items()}


def find_scans(
    bids_dir: os.PathLike[str] | str,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    tracer: str | None = "FDG",
    require_pet: bool = False,
    work_dir: os.PathLike[str] | str | None = None,
    covariates: Sequence[Any] = (),
) -> list[Scan]:
    """Every subject/session with a T1w (and, with ``require_pet``, a PET of ``tracer``).

    Unknown participant labels raise :class:`BIDSInputError`. Scans without a T1w, or without
    a PET when one is required, are logged and left out. When a session has several T1w runs
    the first (sorted by name) is used. The index is queried twice in all (T1w, PET) and each
    TSV read once, so 1,000 subjects take seconds (``benchmarks/bench_indexing.py``). An
    unusable age leaves the scan's ``age`` None with the reason in ``covariate_problems``.
    ``covariates`` (:class:`dualglow_app.covariates.CovariateSpec` or :class:`Covariate`) are
    read the same way into ``Scan.covariates`` (``sub-X_sessions.tsv`` first), an unusable
    cell leaving the reason in ``covariate_problems`` under the covariate's name.
    """
    root = Path(bids_dir).resolve()
    subjects = [strip_prefix(label, "sub") for label in participant_labels or []]
    sessions = [strip_prefix(label, "ses") for label in session_labels or []]
    layout = load_layout(root, subjects or None, work_dir)
    on_disk = _subjects_on_disk(root)
    missing = [label for label in subjects if label not in on_disk]
    if missing:
        listed = ", ".join(f"sub-{s}" for s in on_disk[:10]) + (f" ... ({len(on_disk)} in all)" if len(on_disk) > 10 else "")
        raise BIDSInputError(
            f"{root}: no participant(s) {', '.join('sub-' + m for m in missing)}; the dataset has: {listed or 'none'}."
        )
    query: dict[str, Any] = {"extension": NIFTI_EXTENSIONS, "return_type": "filename"}
    if subjects:
        query["subject"] = subjects
    t1w_files = _by_scan(layout.get(suffix="T1w", datatype="anat", **query))
    pet_query = dict(query, suffix="pet", datatype="pet")
    if tracer:
        pet_query["tracer"] = tracer
    pet_files = _by_scan(layout.get(**pet_query))
    keys = set(t1w_files) | set(pet_files)
    with_files = {subject for subject, _ in keys}
    keys |= {(s, None) for s in (subjects or on_disk) if s not in with_files}  # logged below: no T1w
    participants = TsvTable.read(root / "participants.tsv", "participant_id", "sub")
    session_tables: dict[str, TsvTable | None] = {}
    unreadable_sessions: dict[str, str] = {}  # a broken sub-X_sessions.tsv fails that subject's scans only
    scans: list[Scan] = []
    for subject, session in sorted(keys, key=lambda k: (k[0], k[1] or "")):
        if sessions and session not in sessions:
            continue
        where = f"sub-{subject}" + (f" ses-{session}" if session else "")
        t1w, pet = t1w_files.get((subject, session), []), pet_files.get((subject, session), [])
        if not t1w:
            log.warning("%s: no T1w image; skipped", where)
            continue
        if len(t1w) > 1:
            log.info("%s: %d T1w images, using %s", where, len(t1w), t1w[0].name)
        if require_pet and not pet:
            log.info("%s: no %s PET; not used for training", where, tracer or "")
            continue
        if session is not None and subject not in session_tables:
            try:
                session_tables[subject] = TsvTable.read(
                    root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv", "session_id", "ses"
                )
            except BIDSInputError as err:
                session_tables[subject], unreadable_sessions[subject] = None, str(err)
        problems: dict[str, str] = {}
        try:
            if subject in unreadable_sessions:
                raise CovariateError(unreadable_sessions[subject])
            age, age_source = read_covariate(AGE, subject, session, participants, session_tables.get(subject))
        except CovariateError as err:
            age, age_source, problems["age"] = None, None, str(err)
        values: dict[str, float | str] = {}
        sources: dict[str, str] = {}
        for covariate in covariates:
            try:
                if subject in unreadable_sessions:
                    raise CovariateError(unreadable_sessions[subject])
                value, source = read_covariate(covariate, subject, session, participants, session_tables.get(subject))
            except CovariateError as err:
                problems[covariate.column] = str(err)
                continue
            if value is not None and source is not None:
                values[covariate.column], sources[covariate.column] = value, source
        row = participants.rows.get(subject, {}) if participants else {}
        scans.append(Scan(
            subject=subject, session=session, t1w=t1w[0], pet=pet[0] if pet else None, age=age,
            age_source=age_source, sex=row.get("sex") or None,
            diagnosis=row.get("diagnosis") or row.get("group") or None, covariate_problems=problems,
            covariates=values, covariate_sources=sources,
        ))  # fmt: skip
    if sessions and not scans:
        raise BIDSInputError(f"{root}: no T1w in session(s) {', '.join(sessions)}; check --session-label.")
    return scans


def derivative_path(
    out_dir: os.PathLike[str] | str,
    scan: Scan,
    *,
    desc: str,
    space: str | None = "MNI152NLin2009cAsym",
    res: str | None = None,
    tracer: str | None = "FDG",
    suffix: str = "pet",
    datatype: str = "pet",
    extension: str = ".nii.gz",
) -> Path:
    """The BIDS-Derivatives path of one output of ``scan`` (entity order of the spec)."""
    entities = [scan.prefix]
    if tracer:
        entities.append(f"trc-{tracer}")
    if space:
        entities.append(f"space-{space}")
    if res:
        entities.append(f"res-{res}")
    entities.append(f"desc-{desc}")
    name = "_".join(entities) + f"_{suffix}{extension}"
    return Path(out_dir) / scan.folder / datatype / name


def bids_uri(bids_dir: os.PathLike[str] | str, path: os.PathLike[str] | str, dataset: str = "raw") -> str:
    """``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``: a path relative to a dataset in DatasetLinks."""
    relative = Path(path).resolve().relative_to(Path(bids_dir).resolve())
    return f"bids:{dataset}:{relative.as_posix()}"


def write_dataset_description(
    out_dir: os.PathLike[str] | str,
    raw_dir: os.PathLike[str] | str,
    description: str,
    container: dict[str, str] | None = None,
) -> Path:
    """Write the derivative dataset's ``dataset_description.json`` (DatasetType derivative)."""
    generated_by: dict[str, Any] = {"Name": "dualglow", "Version": __version__, "CodeURL": CODE_URL, "Description": description}
    if container:
        generated_by["Container"] = container
    data = {
        "Name": "dualglow synthetic FDG-PET derivatives",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "DatasetLinks": {"raw": Path(raw_dir).resolve().as_uri()},
    }
    return write_json(Path(out_dir) / "dataset_description.json", data)


@dataclass(frozen=True)
class ValidationResult:
    """What the BIDS validator said: error and warning codes (empty errors == valid)."""

    errors: list[str]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors


def validator_executable() -> str | None:
    """The ``bids-validator-deno`` executable, on PATH or beside the running Python."""
    found = shutil.which("bids-validator-deno")
    if found:
        return found
    beside = Path(sys.executable).with_name("bids-validator-deno")
    return str(beside) if beside.exists() else None


def validate_dataset(dataset_dir: os.PathLike[str] | str, extra_args: Iterable[str] = ()) -> ValidationResult:
    """Run the official BIDS validator (``bids-validator-deno``) and collect its issues.

    Raises ``FileNotFoundError`` when the validator is not installed.
    """
    executable = validator_executable()
    if executable is None:
        raise FileNotFoundError("bids-validator-deno is not installed (pip install bids-validator-deno)")
    result = subprocess.run(
        [executable, "--format", "json", *extra_args, str(dataset_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"bids-validator-deno gave no JSON report: {result.stderr.strip()[-300:]}") from None
    issues = report.get("issues", {}).get("issues", [])
    def describe(issue: dict[str, Any]) -> str:
        return f"{issue.get('code')}: {issue.get('location', '')}".rstrip(": ")
    errors = [describe(i) for i in issues if i.get("severity") == "error"]
    warnings = [describe(i) for i in issues if i.get("severity") == "warning"]
    return ValidationResult(errors=errors, warnings=warnings)


def check_bids_dataset(bids_dir: os.PathLike[str] | str) -> None:
    """Run bids-validator-deno on ``bids_dir``; errors raise :class:`BIDSInputError` (one line,
    the first three and the fix). Without the validator installed: a warning, no check."""
    try:
        result = validate_dataset(bids_dir)
    except FileNotFoundError:
        log.warning("bids-validator-deno is not installed; the input was not validated")
        return
    for warning in sorted(set(result.warnings))[:10]:
        log.debug("BIDS validator warning: %s", warning)
    if not result.ok:
        errors = sorted(set(result.errors))
        shown = "; ".join(errors[:3]) + (" ..." if len(errors) > 3 else "")
        raise BIDSInputError(
            f"{bids_dir}: bids-validator-deno found {len(errors)} error(s) ({shown}); "
            "fix them, or pass --skip-bids-validation"
        )


def is_phantom_cohort(bids_dir: os.PathLike[str] | str) -> bool:
    """Whether ``bids_dir`` is the synthetic cohort of ``dualglow-phantom`` (a demonstration)."""
    bids_dir = Path(bids_dir)
    try:
        data = json.loads((bids_dir / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    generators = [g.get("Name", "") for g in data.get("GeneratedBy", []) if isinstance(g, dict)]
    if "dualglow-phantom" in generators:
        return True
    text = str(data.get("Name", ""))
    readme = next((p for p in bids_dir.glob("README*") if p.is_file()), None)
    if readme is not None:
        text += readme.read_text(encoding="utf-8", errors="replace")[:5000]
    return "dualglow-phantom" in text or "dualglow phantom" in text.lower()


def sidecar_path(image_path: os.PathLike[str] | str) -> Path:
    """The JSON sidecar beside a derivative image (``..._pet.nii.gz`` -> ``..._pet.json``)."""
    path = Path(image_path)
    name = path.name
    for extension in (".nii.gz", ".nii", ".tsv"):
        if name.endswith(extension):
            return path.with_name(name[: -len(extension)] + ".json")
    return path.with_suffix(".json")


def template_uri(space: str, resolution: int) -> str:
    """TemplateFlow URL of a template's T1w at ``res-XX``, for a sidecar's SpatialReference."""
    return (
        f"https://templateflow.s3.amazonaws.com/tpl-{space}/tpl-{space}_res-{resolution:02d}_T1w.nii.gz"
    )


def write_bidsignore(out_dir: os.PathLike[str] | str, patterns: Sequence[str]) -> Path:
    """Add ``patterns`` to ``out_dir/.bidsignore`` (files the BIDS specification has no name for).

    Patterns already there are kept, so several tools can share one derivatives folder.
    """
    from dualglow_app.io import write_text

    path = Path(out_dir) / ".bidsignore"
    existing = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    lines = existing + [p for p in patterns if p not in existing]
    if lines != existing or not path.is_file():
        write_text(path, "\n".join(lines) + "\n")
    return path
