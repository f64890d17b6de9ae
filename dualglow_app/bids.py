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
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualglow_app import __version__
from dualglow_app.io import write_json
from dualglow_app.log import get_logger

log = get_logger(__name__)

NIFTI_EXTENSIONS = [".nii.gz", ".nii"]
CODE_URL = "https://github.com/dualglow/dualglow"


class BIDSInputError(ValueError):
    """A problem with the input dataset, stated in one line with the file and the fix."""


@dataclass(frozen=True)
class Scan:
    """One subject (and session) of the input dataset, with what dualglow needs from it.

    ``age_source`` names the file the age was read from, so an error about a missing age can
    say which file to fix.
    """

    subject: str
    session: str | None
    t1w: Path
    pet: Path | None = None
    age: float | None = None
    age_source: str | None = None
    sex: str | None = None
    diagnosis: str | None = None

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

    With ``work_dir``, the index database is stored there and reused while the dataset's
    folders are unchanged.
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
    database_path = None
    if work_dir is not None:
        key = hashlib.sha256(
            f"{root}|{sorted(participant_labels or [])}|{_folder_stamp(root)}".encode()
        ).hexdigest()[:16]
        database_path = Path(work_dir) / "pybids" / key
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=False)
    return BIDSLayout(root, validate=False, indexer=indexer, database_path=database_path)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _parse_age(value: str | None, source: Path, row: str) -> float | None:
    if value is None or value.strip() in ("", "n/a"):
        return None
    try:
        return float(value)
    except ValueError:
        raise BIDSInputError(
            f"{source}: age {value!r} for {row} is not a number of years; write a number or n/a."
        ) from None


def read_demographics(bids_dir: Path) -> dict[str, dict[str, str]]:
    """participants.tsv as {subject label: row}, or {} when there is none."""
    path = bids_dir / "participants.tsv"
    if not path.is_file():
        return {}
    rows = _read_tsv(path)
    return {strip_prefix(row.get("participant_id", ""), "sub"): row for row in rows}


def read_age(bids_dir: Path, subject: str, session: str | None) -> tuple[float | None, str | None]:
    """The age in years for a scan: ``sub-X_sessions.tsv`` first, then ``participants.tsv``."""
    sessions_tsv = bids_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if session is not None and sessions_tsv.is_file():
        for row in _read_tsv(sessions_tsv):
            if strip_prefix(row.get("session_id", ""), "ses") == session:
                age = _parse_age(row.get("age"), sessions_tsv, f"ses-{session}")
                if age is not None:
                    return age, str(sessions_tsv)
    participants = bids_dir / "participants.tsv"
    demographics = read_demographics(bids_dir).get(subject)
    if demographics is not None:
        age = _parse_age(demographics.get("age"), participants, f"sub-{subject}")
        if age is not None:
            return age, str(participants)
    return None, None


def find_scans(
    bids_dir: os.PathLike[str] | str,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    tracer: str | None = "FDG",
    require_pet: bool = False,
    work_dir: os.PathLike[str] | str | None = None,
) -> list[Scan]:
    """Every subject/session with a T1w (and, with ``require_pet``, a PET of ``tracer``).

    Unknown participant labels raise :class:`BIDSInputError`. Scans without a T1w, or without
    a PET when one is required, are logged and left out. When a session has several T1w runs
    the first (sorted by name) is used.
    """
    root = Path(bids_dir).resolve()
    subjects = [strip_prefix(label, "sub") for label in participant_labels or []]
    sessions = [strip_prefix(label, "ses") for label in session_labels or []]
    layout = load_layout(root, subjects or None, work_dir)
    present = set(layout.get_subjects())
    missing = [label for label in subjects if label not in present]
    if missing:
        listed = ", ".join(sorted(present)[:10]) or "none"
        raise BIDSInputError(
            f"{root}: no participant(s) {', '.join('sub-' + m for m in missing)}; the dataset has: {listed}."
        )
    demographics = read_demographics(root)
    scans: list[Scan] = []
    for subject in sorted(subjects or present):
        subject_sessions = layout.get_sessions(subject=subject) or [None]
        for session in sorted(subject_sessions, key=lambda s: s or ""):
            if sessions and session not in sessions:
                continue
            query: dict[str, Any] = {"subject": subject, "extension": NIFTI_EXTENSIONS}
            if session is not None:
                query["session"] = session
            t1w_files = sorted(layout.get(suffix="T1w", datatype="anat", return_type="filename", **query))
            pet_query = dict(query, suffix="pet", datatype="pet", return_type="filename")
            if tracer:
                pet_query["tracer"] = tracer
            pet_files = sorted(layout.get(**pet_query))
            where = f"sub-{subject}" + (f" ses-{session}" if session else "")
            if not t1w_files:
                log.warning("%s: no T1w image; skipped", where)
                continue
            if len(t1w_files) > 1:
                log.info("%s: %d T1w images, using %s", where, len(t1w_files), Path(t1w_files[0]).name)
            if require_pet and not pet_files:
                log.info("%s: no %s PET; not used for training", where, tracer or "")
                continue
            age, age_source = read_age(root, subject, session)
            row = demographics.get(subject, {})
            scans.append(
                Scan(
                    subject=subject,
                    session=session,
                    t1w=Path(t1w_files[0]),
                    pet=Path(pet_files[0]) if pet_files else None,
                    age=age,
                    age_source=age_source,
                    sex=row.get("sex") or None,
                    diagnosis=row.get("diagnosis") or row.get("group") or None,
                )
            )
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
