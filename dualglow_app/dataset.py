"""The paired data layer: T1w + PET pairs found, preprocessed, stacked, split and batched.

One module for the group level, the evaluation and the benchmarks, keyed on a small value
object, :class:`DatasetSpec` (BIDS dir, labels, tracer, grid, side information, work dir):

1. :func:`find_pairs` - every scan with a T1w and a PET of the tracer (and a value of every
   covariate the model is conditioned on, typed by :mod:`dualglow_app.covariates`);
2. :func:`prepare_dataset` - each pair preprocessed through the per-subject cache of
   :mod:`dualglow_app.preprocess`, then stacked once into ``.npy`` files in the work dir, so
   epochs read a memory map, never NIfTI (see docs/ARCHITECTURE.md, "Work directory"); the
   stack is built in a temporary folder under a lock, so a killed run leaves nothing a later
   one would reuse, and two runs never stack the same data at once;
3. :func:`split_subjects` - train / validation rows, never splitting a subject's sessions;
4. :func:`model_batch` / :func:`model_batches` / :func:`mean_images` - rows of the stack as
   tensors on the model's [0, 1] scale (:class:`dualglow_app.data.IntensityScaling`).

Example::

    >>> spec = DatasetSpec("bids/", "work/", grid=preset("cpu4mm"))   # doctest: +SKIP
    >>> data = prepare_dataset(spec)                                  # doctest: +SKIP
    >>> train_rows, val_rows = split_subjects(data.subjects, 0.2, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dualglow_app import __version__
from dualglow_app.bids import Scan, find_scans
from dualglow_app.covariates import (
    AGE_SPEC,
    CovariateSpec,
    Value,
    declare_covariate,
    declare_covariates,
    learn_covariates,
    name_problem,
)
from dualglow_app.data import IntensityScaling
from dualglow_app.grid import ModelGrid, preset
from dualglow_app.io import (
    atomic_dir,
    atomic_path,
    entry_lock,
    remove_stale_work_temporaries,
    write_json,
)
from dualglow_app.log import add_note, describe_error, get_logger, progress
from dualglow_app.runtime import cpu_threads

log = get_logger(__name__)

DATASET_CACHE_VERSION = 1
#: The stack's native tissue maps (DatasetSpec.tissue_maps), added beside it when first asked for;
#: another native reading's beside it under tissue_maps_file's name.
TISSUE_MAPS_FILE = "tissue_maps.npy"


def tissue_maps_file(reading: str = "native") -> str:
    """The stack's file of the native tissue maps read the way ``reading`` (one of
    :data:`~dualglow_app.tissue.NATIVE_READINGS`) reads them (``native``'s: TISSUE_MAPS_FILE)."""
    from dualglow_app.tissue import reading_key

    return "_".join(["tissue_maps", *reading_key(reading)]) + ".npy"


class DatasetError(RuntimeError):
    """The paired data cannot be used as asked (fewer than 2 usable pairs, named)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Which paired scans, on which grid, cached where: the key of a stacked dataset.

    ``side_info`` lists the covariates (columns of ``participants.tsv`` / ``sessions.tsv``)
    every usable scan must have (a scan without one is left out, with a warning). ``nprocs``
    only sets preprocessing threads (not part of the key). ``tissue_maps``, a native reading
    (:data:`~dualglow_app.tissue.NATIVE_READINGS`; for a model with ``--anatomy-reading`` of it),
    also stacks each T1w's native tissue maps read that way
    (:func:`dualglow_app.preprocess.tissue_maps_on_grid`), beside a stack that may already exist.
    """

    bids_dir: Path
    work_dir: Path
    grid: ModelGrid = field(default_factory=lambda: preset("cpu4mm"))
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    tracer: str = "FDG"
    side_info: tuple[str, ...] = ()
    nprocs: int | None = None
    tissue_maps: str | None = None

    def __post_init__(self) -> None:
        from dualglow_app.tissue import NATIVE_READINGS

        if self.tissue_maps is not None and self.tissue_maps not in NATIVE_READINGS:
            raise ValueError(f"tissue_maps={self.tissue_maps!r} (a native reading: {list(NATIVE_READINGS)}, or None)")
        object.__setattr__(self, "bids_dir", Path(self.bids_dir))
        object.__setattr__(self, "work_dir", Path(self.work_dir))
        for name in ("participant_labels", "session_labels", "side_info"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = [problem for name in self.side_info if (problem := name_problem(name))]
        if problems:
            raise ValueError(f"side_info: {'; '.join(problems)}")


@dataclass
class PairedVolumes:
    """The stacked data: one row per usable T1w + PET pair, on one model grid.

    ``mri`` is the preprocessed T1w ([0, 1], 0 outside the brain), ``pet`` the PET in SUVR,
    ``mask`` the brain mask; all (N, X, Y, Z), memory-mapped from the work-dir cache.
    ``labels`` are ``sub-<l>[_ses-<l>]``, ``subjects`` the subject label of each row (splits
    keep a subject's sessions together), ``age`` NaN where unknown, ``diagnosis`` None where
    unknown. ``covariates`` holds other covariates by name, one value per row (a number, a
    level, or None where unknown), ``covariate_declarations`` their kinds as the dataset
    declares them (:func:`dualglow_app.covariates.declare_covariates`); age needs neither.
    :meth:`covariate_specs` learns the encoding the model is built with. ``tissue_maps``, where
    stacked, (N, 2, X, Y, Z): each T1w's grey-matter and CSF maps read at its native resolution,
    the way the native reading ``tissue_maps_reading`` reads them.
    """

    labels: list[str]
    subjects: list[str]
    mri: np.ndarray
    pet: np.ndarray
    mask: np.ndarray
    age: np.ndarray
    grid: ModelGrid
    skipped: dict[str, str] = field(default_factory=dict)
    diagnosis: list[str | None] = field(default_factory=list)
    covariates: dict[str, list[Value | None]] = field(default_factory=dict)
    covariate_declarations: dict[str, CovariateSpec] = field(default_factory=dict)
    tissue_maps: np.ndarray | None = None
    tissue_maps_reading: str = "native"

    def __post_init__(self) -> None:
        if not self.diagnosis:
            self.diagnosis = [None] * len(self.labels)
        self._learnt: dict[tuple[str, ...], dict[str, CovariateSpec]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def row_tissue_maps(self, row: int) -> np.ndarray | None:
        """Row ``row``'s native tissue maps, (2, X, Y, Z), or None where none are stacked."""
        return None if self.tissue_maps is None else np.asarray(self.tissue_maps[row])

    def subset(self, rows: Sequence[int] | np.ndarray) -> PairedVolumes:
        """These rows only, read into memory (a fold's training scans)."""
        rows = np.asarray(rows)
        return PairedVolumes(
            labels=[self.labels[i] for i in rows], subjects=[self.subjects[i] for i in rows],
            mri=np.asarray(self.mri[rows]), pet=np.asarray(self.pet[rows]), mask=np.asarray(self.mask[rows]),
            age=np.asarray(self.age[rows]), grid=self.grid, diagnosis=[self.diagnosis[i] for i in rows],
            covariates={name: [values[i] for i in rows] for name, values in self.covariates.items()},
            covariate_declarations=dict(self.covariate_declarations),
            tissue_maps=None if self.tissue_maps is None else np.asarray(self.tissue_maps[rows]),
            tissue_maps_reading=self.tissue_maps_reading,
        )  # fmt: skip

    def covariate_values(self, name: str) -> list[Value | None]:
        """One value per row of covariate ``name`` (None where unknown); raises ``KeyError``
        naming the covariates there are."""
        if name in self.covariates:
            return self.covariates[name]
        if name == AGE_SPEC.name:
            return [None if np.isnan(a) else float(a) for a in np.asarray(self.age, dtype=np.float64)]
        raise KeyError(f"covariate {name!r} is not in this data (it has: {', '.join(['age', *self.covariates])})")

    def covariate_specs(self, names: Sequence[str], rows: Sequence[int] | np.ndarray | None = None) -> dict[str, CovariateSpec]:
        """The covariates ``names`` learnt from every row (:func:`~dualglow_app.covariates.learn_covariates`):
        the encoding a model trained on these rows is built with (``DualGlowConfig``) and stores.
        ``rows``: learnt from those rows only (what a model trained on ``subset(rows)`` learnt)."""
        if rows is not None:
            picked = [int(r) for r in np.asarray(rows).tolist()]
            values = {n: [self.covariate_values(n)[r] for r in picked] for n in names}
            return learn_covariates(values, self._declarations(names))
        key = tuple(names)
        if key not in self._learnt:
            values = {name: self.covariate_values(name) for name in names}
            self._learnt[key] = learn_covariates(values, self._declarations(names))
        return self._learnt[key]

    def _declarations(self, names: Sequence[str]) -> dict[str, CovariateSpec]:
        declared = {}
        for name in names:
            spec = self.covariate_declarations.get(name, AGE_SPEC if name == AGE_SPEC.name else None)
            if spec is None:
                raise KeyError(f"covariate {name!r} has no declaration in this data (it has: "
                               f"{', '.join(['age', *self.covariate_declarations])})")  # fmt: skip
            declared[name] = spec
        return declared


# --------------------------------------------------------------------------- finding and stacking


def find_pairs(spec: DatasetSpec, declared: dict[str, CovariateSpec] | None = None) -> list[Scan]:
    """Every scan with a T1w and a PET of ``spec.tracer`` and a usable value of every covariate
    in ``spec.side_info`` (``declared``: their kinds, by default read from the dataset). A scan
    without one, or with a value that is not usable, is left out with one warning line naming
    the file and row; the other scans go on. Imputation is never done here: training on a
    guessed covariate would teach the model the guess."""
    if declared is None:
        declared = declare_covariates(spec.bids_dir, spec.side_info) if spec.side_info else {}
    scans = find_scans(
        spec.bids_dir, spec.participant_labels, spec.session_labels,
        tracer=spec.tracer, require_pet=True, work_dir=spec.work_dir, covariates=list(declared.values()),
    )  # fmt: skip
    usable = []
    for scan in scans:
        for name, problem in scan.covariate_problems.items():
            used = f"not used (--side-info {name} needs one)" if name in spec.side_info else f"{name} left unknown"
            log.warning("%s: %s; %s", scan.prefix, problem, used)
        missing = [name for name in spec.side_info if name not in scan.covariates]
        for name in (n for n in missing if n not in scan.covariate_problems):
            log.warning("%s: no %s in participants.tsv or sessions.tsv; not used (--side-info %s needs one)",
                        scan.prefix, name, name)  # fmt: skip
        if not missing:
            usable.append(scan)
    return usable


def _too_few(spec: DatasetSpec, usable: Sequence[str], skipped: dict[str, str]) -> DatasetError:
    details = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return DatasetError(
        f"{spec.bids_dir}: {len(usable)} usable T1w + {spec.tracer} PET pair(s)"
        f" ({', '.join(usable) or 'none'}); training needs at least 2."
        + (f" Skipped: {details}." if details else "")
        + f" Add paired subjects (anat/*_T1w + pet/*_trc-{spec.tracer}_pet) or check --participant-label / --tracer."
    )


def _cache_key(scans: Sequence[Scan], grid: ModelGrid) -> str:
    """The stack's key: the inputs (path, size, mtime), the grid and the preprocessing settings."""
    from dualglow_app import preprocess

    parts: list[Any] = [DATASET_CACHE_VERSION, preprocess.CACHE_VERSION, preprocess.GRID_VERSION, grid.to_dict()]
    parts.append([asdict(preprocess.T1wOptions()), asdict(preprocess.PETOptions())])
    for scan in scans:
        for path in (scan.t1w, scan.pet):
            stat = Path(str(path)).stat()
            parts.append([scan.prefix, str(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _load_stack(folder: Path, scans: Sequence[Scan], grid: ModelGrid,
                declared: dict[str, CovariateSpec] | None = None, reading: str = "native") -> PairedVolumes:
    """The stack in ``folder``, with its native tissue maps read the way ``reading`` reads them
    where they are stacked."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    n = len(index["labels"])
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r")[:n] for name in ("mri", "pet", "mask")}
    tissue_maps = folder / tissue_maps_file(reading)
    by_label = {s.prefix: s for s in scans}
    rows = [by_label[k] for k in index["labels"]]
    # Covariates are read from the TSVs on every run, so editing participants.tsv needs no
    # re-preprocessing.
    age = np.array([s.age if s.age is not None else np.nan for s in rows], dtype=np.float32)
    declared = declared or {}
    return PairedVolumes(
        labels=list(index["labels"]), subjects=[s.subject for s in rows], age=age, grid=grid,
        skipped=dict(index["skipped"]), diagnosis=[s.diagnosis for s in rows],
        covariates={name: [s.covariates.get(name) for s in rows] for name in declared},
        covariate_declarations=dict(declared), **arrays,
        tissue_maps=np.load(tissue_maps, mmap_mode="r")[:n] if tissue_maps.is_file() else None,
        tissue_maps_reading=reading,
    )  # fmt: skip


def _stack_tissue_maps(spec: DatasetSpec, scans: Sequence[Scan], folder: Path) -> None:
    """Add the stacked T1ws' native tissue maps to the stack ``folder`` (written whole under a
    temporary name, then renamed; the T1ws' transforms come from the preprocessing cache, the
    maps from theirs)."""
    from dualglow_app.preprocess import preprocess_t1w, tissue_maps_on_grid
    from dualglow_app.tissue import NATIVE_TISSUE_CHANNELS

    assert spec.tissue_maps is not None
    labels = json.loads((folder / "index.json").read_text(encoding="utf-8"))["labels"]
    by_label = {s.prefix: s for s in scans}
    nprocs = cpu_threads(spec.nprocs)
    with atomic_path(folder / tissue_maps_file(spec.tissue_maps)) as partial:
        shape = (len(labels), len(NATIVE_TISSUE_CHANNELS), *spec.grid.shape)
        maps = np.lib.format.open_memmap(partial, "w+", np.float32, shape)
        for row, label in enumerate(progress(labels, "native tissue maps", total=len(labels))):
            try:
                t1w = preprocess_t1w(by_label[label].t1w, spec.grid, spec.work_dir, nprocs)
                maps[row] = tissue_maps_on_grid(t1w, nprocs, spec.tissue_maps)
            except KeyboardInterrupt as interrupt:
                add_note(interrupt, f"while reading the native tissue maps of {label} ({row} of {len(labels)} done)")
                raise
        maps.flush()
        del maps


def _stack(spec: DatasetSpec, scans: Sequence[Scan], folder: Path) -> None:
    """Preprocess every pair into ``folder`` (built under a temporary name, then renamed), with
    the T1ws' native tissue maps when ``spec`` asks for them."""
    from dualglow_app.preprocess import preprocess_pet, preprocess_t1w, tissue_maps_on_grid
    from dualglow_app.tissue import NATIVE_TISSUE_CHANNELS

    nprocs = cpu_threads(spec.nprocs)
    with atomic_dir(folder) as tmp:
        shape = (len(scans), *spec.grid.shape)
        mri = np.lib.format.open_memmap(tmp / "mri.npy", "w+", np.float32, shape)
        pet = np.lib.format.open_memmap(tmp / "pet.npy", "w+", np.float32, shape)
        mask = np.lib.format.open_memmap(tmp / "mask.npy", "w+", np.uint8, shape)
        maps = np.lib.format.open_memmap(tmp / tissue_maps_file(spec.tissue_maps), "w+", np.float32,
                                         (len(scans), len(NATIVE_TISSUE_CHANNELS), *spec.grid.shape)) if spec.tissue_maps else None  # fmt: skip
        labels: list[str] = []
        skipped: dict[str, str] = {}
        for scan in progress(scans, "preprocessing T1w + PET pairs", total=len(scans)):
            try:
                t1 = preprocess_t1w(scan.t1w, spec.grid, spec.work_dir, nprocs)
                suvr = preprocess_pet(scan.pet, t1, spec.work_dir, nprocs)  # type: ignore[arg-type]
                tissue_maps = tissue_maps_on_grid(t1, nprocs, spec.tissue_maps) if spec.tissue_maps else None
            except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM through the CLI
                add_note(interrupt, f"while preprocessing {scan.prefix} ({len(labels) + len(skipped)} of {len(scans)} "
                                   "pairs done)")  # fmt: skip
                raise
            except Exception as err:  # noqa: BLE001 - one bad subject must not stop the cohort
                reason = describe_error(err)
                log.error("%s: preprocessing failed (%s); skipped", scan.prefix, reason)
                skipped[scan.prefix] = reason
                continue
            row = len(labels)
            mri[row] = np.asarray(t1.image.dataobj, dtype=np.float32)
            pet[row] = np.asarray(suvr.image.dataobj, dtype=np.float32)
            mask[row] = np.asarray(t1.brain_mask.dataobj, dtype=np.uint8)
            if maps is not None:
                maps[row] = tissue_maps
            labels.append(scan.prefix)
        for array in (mri, pet, mask, maps):
            if array is not None:
                array.flush()
        del mri, pet, mask, maps
        if len(labels) < 2:
            raise _too_few(spec, labels, skipped)
        write_json(tmp / "index.json", {"labels": labels, "skipped": skipped, "grid": spec.grid.to_dict(),
                                        "version": __version__})  # fmt: skip


def prepare_dataset(spec: DatasetSpec, rank: int = 0) -> PairedVolumes:
    """Find the pairs, preprocess them (a failing subject is logged and skipped) and stack them.

    The stack is written once to ``WORK_DIR/train-data/<key>/{mri,pet,mask}.npy`` and
    memory-mapped on later runs. Under torchrun only rank 0 preprocesses; the other ranks wait
    for the cache, so no collective times out during hours of preprocessing
    (``group --preprocess-only`` fills it beforehand). Raises :class:`DatasetError` when
    fewer than 2 pairs are usable, naming them.
    """
    if rank == 0:
        remove_stale_work_temporaries(spec.work_dir)
    declared = declare_covariates(spec.bids_dir, spec.side_info) if spec.side_info else {}
    for covariate in declared.values():
        log.info("covariate %s (declared in %s)", covariate.summary(), covariate.declared_in)
    scans = find_pairs(spec, declared)
    if len(scans) < 2:
        raise _too_few(spec, [s.prefix for s in scans], {})
    folder = spec.work_dir / "train-data" / _cache_key(scans, spec.grid)
    if (folder / "index.json").is_file():
        log.info("reusing the stacked training data in %s", folder)
    elif rank != 0:
        waited = 0.0
        while not (folder / "index.json").is_file():
            if waited % 300 == 0:
                log.info("rank %d: waiting for rank 0 to preprocess into %s", rank, folder)
            time.sleep(5.0)
            waited += 5.0
    else:
        with entry_lock(folder):  # a concurrent run stacking the same data: wait, then reuse it
            if not (folder / "index.json").is_file():
                _stack(spec, scans, folder)
    # Without a reading asked for, the "native" maps come along where stacked (baselines read them).
    reading = spec.tissue_maps or "native"
    maps_file = folder / tissue_maps_file(reading)
    if spec.tissue_maps and not maps_file.is_file():
        if rank != 0:
            while not maps_file.is_file():
                time.sleep(5.0)
        else:
            with entry_lock(maps_file):
                if not maps_file.is_file():
                    _stack_tissue_maps(spec, scans, folder)
    data = _load_stack(folder, scans, spec.grid, declared, reading)
    for label, reason in data.skipped.items():
        log.warning("%s: not used for training (%s)", label, reason)
    log.info("%d paired scans on the %s mm grid %s", len(data), spec.grid.voxel_size, spec.grid.shape)
    return data


def load_mni_stack(folder: str | os.PathLike[str]) -> PairedVolumes:
    """A stack written by ``dualglow-phantom OUT --mni-stack`` (:func:`dualglow_app.phantom.mni.make_mni_stack`)
    as :class:`PairedVolumes`, memory-mapped, with age and diagnosis filled.

    Those phantoms SKIP the native-space simulation and the preprocessing (they are made on the
    model grid directly): for model development only. The explainable PET (same SUVR scaling,
    row for row) rides along as the extra attribute ``explainable`` (memory-mapped; it is not a
    :class:`PairedVolumes` field, so ``subset`` drops it), also
    ``np.load(folder / "explainable.npy", mmap_mode="r")``.

    Example::

        >>> data = load_mni_stack("stack")      # doctest: +SKIP
        >>> data.mri.shape                      # doctest: +SKIP
        (200, 40, 48, 40)
    """
    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise DatasetError(f"{folder}: no index.json; make the stack with dualglow-phantom OUT --mni-stack")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("Kind") != "mni-stack":
        raise DatasetError(f"{folder}: index.json is not a dualglow-phantom --mni-stack index")
    n = len(index["labels"])
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("mri", "pet", "mask")}
    grid = ModelGrid.from_dict(index["grid"])
    for name, array in arrays.items():
        if array.shape != (n, *grid.shape):
            raise DatasetError(f"{folder}/{name}.npy has shape {array.shape}; index.json says {(n, *grid.shape)}")
    log.warning("%s: %d phantoms made directly on the model grid (no native simulation, no preprocessing): "
                "for model development only", folder, n)
    columns = index.get("columns")
    if columns is None:  # a stack written before index.json described its columns
        from dualglow_app.phantom.cohort import PARTICIPANT_COLUMNS

        columns = PARTICIPANT_COLUMNS
    names = [name for name in columns if name != AGE_SPEC.name and name in index]
    declared = {name: declare_covariate(name, columns[name], [], "index.json", str(index_path)) for name in names}
    data = PairedVolumes(
        labels=list(index["labels"]), subjects=list(index["subjects"]), grid=grid,
        age=np.asarray(index["age"], dtype=np.float32), diagnosis=list(index["diagnosis"]),
        covariates={name: [None if v is None else declared[name].value(v) for v in index[name]] for name in names},
        covariate_declarations=declared, **arrays,
    )  # fmt: skip
    if (folder / TISSUE_MAPS_FILE).is_file():
        data.tissue_maps = np.load(folder / TISSUE_MAPS_FILE, mmap_mode="r")
    explainable = folder / "explainable.npy"
    if explainable.is_file():
        setattr(data, "explainable", np.load(explainable, mmap_mode="r"))  # noqa: B010 - not a field
    return data


# --------------------------------------------------------------------------- splitting and batching


def split_subjects(subjects: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), split by subject so no subject is on both sides.

    At least one subject stays in training; with ``val_fraction`` > 0 at least one goes to
    validation (2 subjects: 1 + 1).

    >>> split_subjects(["a", "a", "b", "c"], 0.34, seed=0)[1].size > 0
    True
    """
    unique = sorted(set(subjects))
    n_val = 0 if val_fraction <= 0 else min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    val_subjects = {unique[i] for i in order[:n_val]}
    rows = np.arange(len(subjects))
    is_val = np.array([s in val_subjects for s in subjects], dtype=bool)
    return rows[~is_val], rows[is_val]


class ModelBatch(NamedTuple):
    """Rows of the stack as model inputs: MRI and PET ``(B, 1, X, Y, Z)`` on [0, 1], the side
    information (None without) and the native tissue maps ``(B, 2, X, Y, Z)`` (None where the
    stack has none): in the order :meth:`DualGlow.nll` takes them."""

    mri: Any
    pet: Any
    side: dict[str, Any] | None
    tissue_maps: Any = None


def side_information(data: PairedVolumes, rows: np.ndarray, side_info: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The covariates ``side_info`` of ``rows`` as the model takes them (:meth:`CovariateSpec.encode`:
    continuous in natural units, e.g. age in years; categorical as the index of the class
    among those :meth:`PairedVolumes.covariate_specs` learnt), or None without any."""
    if not side_info:
        return None
    specs = data.covariate_specs(side_info)
    side = {}
    for name in side_info:
        values, spec = data.covariate_values(name), specs[name]
        encoded = []
        for row in np.asarray(rows).tolist():
            value = values[row]
            if value is None or (isinstance(value, float) and np.isnan(value)):
                raise DatasetError(f"{data.labels[row]}: no {name}, which the model is conditioned on; "
                                   "leave the scan out or give it a value")  # fmt: skip
            encoded.append(spec.encode(value))
        side[name] = np.asarray(encoded, dtype=np.float32)
    return side


def model_batch(
    data: PairedVolumes, rows: np.ndarray, scaling: IntensityScaling, device: Any,
    side_info: Sequence[str] = (), mri_input: bool = True,
) -> ModelBatch:  # fmt: skip
    """Rows of the memmap -> tensors on ``device``, on the model's [0, 1] scale.

    ``mri_input=False`` zeroes the MRI (the unconditional baseline of the MRI-information check).
    """
    import torch

    rows = np.sort(rows)  # memmaps read faster in order; the order in a batch does not matter
    mri = torch.from_numpy(scaling.mri_to_model(data.mri[rows]))[:, None].to(device)
    pet = torch.from_numpy(scaling.pet_to_model(data.pet[rows]))[:, None].to(device)
    if not mri_input:
        mri = torch.zeros_like(mri)
    side = side_information(data, rows, side_info)
    tissue_maps = None if data.tissue_maps is None else torch.from_numpy(np.asarray(data.tissue_maps[rows])).to(device)
    return ModelBatch(mri, pet, None if side is None else {k: torch.from_numpy(v).to(device) for k, v in side.items()},
                      tissue_maps)  # fmt: skip


def model_batches(
    data: PairedVolumes, rows: np.ndarray, scaling: IntensityScaling, device: Any, size: int,
    side_info: Sequence[str] = (), mri_input: bool = True,
) -> Iterator[ModelBatch]:  # fmt: skip
    """:func:`model_batch` over ``rows``, ``size`` at a time."""
    for first in range(0, len(rows), size):
        yield model_batch(data, rows[first : first + size], scaling, device, side_info, mri_input)


def mean_images(data: PairedVolumes, rows: np.ndarray, scaling: IntensityScaling, mri_input: bool = True) -> tuple[Any, Any]:
    """Voxel-wise means of the model-scale MRI and PET over ``rows``: the centring templates."""
    import torch

    sums = None
    for mri, pet, *_ in model_batches(data, rows, scaling, torch.device("cpu"), 8, mri_input=mri_input):
        batch_sums = (mri.double().sum(0), pet.double().sum(0))
        sums = batch_sums if sums is None else (sums[0] + batch_sums[0], sums[1] + batch_sums[1])
    assert sums is not None, "mean_images needs at least one row"
    return (sums[0] / len(rows)).float(), (sums[1] / len(rows)).float()


__all__ = [
    "DatasetError",
    "DatasetSpec",
    "ModelBatch",
    "PairedVolumes",
    "find_pairs",
    "load_mni_stack",
    "mean_images",
    "model_batch",
    "model_batches",
    "prepare_dataset",
    "side_information",
    "split_subjects",
]
