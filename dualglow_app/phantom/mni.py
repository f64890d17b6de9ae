"""The fast path for model development: phantom subjects written straight onto a model grid.

    from dualglow_app.grid import preset
    from dualglow_app.phantom.mni import make_mni_stack
    make_mni_stack("stack", n_subjects=200, seed=0, grid=preset("cpu4mm"))
    # dualglow-phantom stack/ --mni-stack --grid cpu4mm --subjects 200

    from dualglow_app.dataset import load_mni_stack
    data = load_mni_stack("stack")          # PairedVolumes, memory-mapped

It SKIPS the native-space simulation (head, pose, scanner matrix, native noise) AND the
preprocessing (skull strip, N4, registration, resampling through the transforms): each
subject's MNI-space truth, the same as :func:`~dualglow_app.phantom.cohort.make_subject`'s
for the same seed and index (same traits, same anatomy, same PET), is made on the 2 mm work
grid and put onto the model grid the way the preprocessing leaves a perfectly registered scan:

- ``mri.npy``: the brain T1w (noise-free tissue contrast, WM = 1) with Rician noise of the
  native T1w's level averaged into 2 mm voxels (``MRI_NOISE_SD`` / sqrt(8)) and a mild smooth
  residual bias (``RESIDUAL_BIAS``: N4 leaves a few per cent, an assumption), anti-aliased
  (FWHM sqrt(grid^2 - 2^2) mm, as ``preprocess._anti_alias``), resampled with
  :func:`dualglow_app.imaging.resample_to`, scaled so the brain's
  ``preprocess.T1wOptions().percentiles`` map to 0 and 1, clipped, 0 outside the brain;
- ``pet.npy``: the noise-free PET (after the 8 mm PSF), anti-aliased and resampled the same
  way, divided by its mean in the preprocessing's default reference region
  (``preprocess.PETOptions().reference_region`` via
  :func:`dualglow_app.templates.reference_region`), 0 outside the brain (SUVR);
- ``explainable.npy``: the explainable PET (cohort.py, ``desc-explainable``), scaled the same
  way by its own reference-region mean;
- ``tissue_maps.npy``: (N, 2, X, Y, Z) the grey matter's and the CSF's posteriors of a
  3-class mixture fitted to each subject's own 2 mm T1w, averaged down to the grid as the
  T1w is: the stack's counterpart of the native tissue maps
  (:func:`dualglow_app.preprocess.tissue_maps_on_grid`, ``--anatomy-reading native``);
- ``mask.npy``: the brain (> 0.5 on the grid); ``index.json``: labels, subjects, ages, sexes, diagnoses, (version 2)
  MMSE-like scores, their BIDS column descriptions (``columns``), the grid, the phantom
  version, the seed, the sessions per subject and a note saying all this.

With ``sessions`` > 1 (``--sessions``) each of a subject's sessions is a row, subject-major,
labelled ``sub-<i>_ses-<k>`` with its own age, MMSE and scan noise: the same brain and
metabolism 1-2 years older, as the BIDS cohort's sessions are.

Real scans differ from this by everything it skips (registration error, skull-strip and N4
residuals, native noise, the PET's own noise and rigid misalignment), so a model trained here
is for development only: check it on a BIDS cohort (``make_cohort``) through the real
preprocessing before drawing any conclusion. About 0.5 s per subject at cpu4mm on one core.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from dualglow_app import __version__
from dualglow_app.grid import ModelGrid
from dualglow_app.imaging import load_nifti, resample_to
from dualglow_app.io import write_json
from dualglow_app.log import get_logger, progress
from dualglow_app.phantom import anatomy as an
from dualglow_app.phantom import cohort
from dualglow_app.phantom import pet as pt
from dualglow_app.phantom.subjects import Demographics
from dualglow_app.phantom.template import Template, load_template
from dualglow_app.runtime import cpu_threads
from dualglow_app.tissue import NATIVE_TISSUE_CHANNELS, own_tissue_maps

log = get_logger(__name__)

#: The work grid the fast path simulates on (mm).
WORK_VOXEL_MM = 2.0
#: The native T1w's Rician sigma (relative to WM), as cohort.py draws it; averaged into 2 mm.
MRI_NOISE_SD = (0.015, 0.035)
#: Peak of the smooth residual bias after N4 (log units): an assumption, N4 leaves a few %.
RESIDUAL_BIAS = (0.01, 0.04)
#: Stream of the fast path's own noise and bias: ``SeedSequence(seed, spawn_key=(i, 1, 99))``.
NOISE_STREAM = 99
STACK_FILES = ("mri", "pet", "explainable", "mask", "tissue_maps")
NOTE = (
    "SYNTHETIC phantom subjects written directly on the model grid in MNI space by dualglow-phantom "
    "--mni-stack. This SKIPS the native-space simulation (head, pose, scanner matrix, native noise) AND "
    "the preprocessing (skull strip, N4, registration): it is for model development only; check any "
    "model on a BIDS phantom cohort through the real preprocessing."
)


@dataclass(frozen=True)
class MNISubject:
    """One subject on the model grid: MRI [0, 1], PET and explainable PET in SUVR, brain mask,
    and (where asked for) its tissue maps (2, X, Y, Z), grey matter and CSF."""

    label: str
    demographics: Demographics  # the subject's, at its first session
    mri: np.ndarray
    pet: np.ndarray
    explainable: np.ndarray
    mask: np.ndarray
    tissue_maps: np.ndarray | None = None
    age: float | None = None  # at this session (None: the first session's, demographics.age)
    session: int = 0
    mmse: int | None = None  # this session's MMSE-like score (phantom versions with one)


@dataclass(frozen=True)
class _GridRefs:
    mask: np.ndarray
    reference: np.ndarray
    percentiles: tuple[float, float]
    reference_region: str


@functools.lru_cache(maxsize=4)
def _grid_refs(grid: ModelGrid) -> _GridRefs:
    """The brain mask and the SUVR reference region on ``grid`` (as the preprocessing makes them)."""
    from dualglow_app.preprocess import PETOptions, T1wOptions
    from dualglow_app.templates import reference_region

    tpl = load_template(WORK_VOXEL_MM)
    mask = _to_grid(tpl.brain, tpl.affine, grid, anti_alias=False) > 0.5
    name = PETOptions().reference_region
    path = reference_region(name, 1 if grid.voxel_size < 2 else 2)
    region = (resample_to(load_nifti(path), grid.affine, grid.shape, order=1) > 0.5) & mask
    if region.sum() < 3:
        raise ValueError(f"the {name} reference region is (almost) outside the grid {grid.shape}")
    return _GridRefs(mask, region, tuple(T1wOptions().percentiles), name)  # type: ignore[arg-type]


def _to_grid(volume: np.ndarray, affine: np.ndarray, grid: ModelGrid, anti_alias: bool = True) -> np.ndarray:
    """Work-grid ``volume`` (axis-aligned ``affine``) onto ``grid``: Gaussian pre-filter (FWHM
    sqrt(target^2 - source^2)), then linear; only the part of the volume the grid needs."""
    source = float(abs(affine[0, 0]))
    sigma = float(np.sqrt(grid.voxel_size**2 - source**2)) / 2.3548 / source if grid.voxel_size > source else 0.0
    low, high = (np.array(c) for c in grid.bounding_box)
    inv = np.linalg.inv(affine)
    corners = inv[:3, :3] @ np.stack([low, high], axis=1) + inv[:3, 3:4]
    margin = int(np.ceil(4 * sigma)) + 2
    start = np.maximum(np.floor(corners.min(1)).astype(int) - margin, 0)
    stop = np.minimum(np.ceil(corners.max(1)).astype(int) + margin + 1, volume.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    part = np.asarray(volume[box], dtype=np.float32)
    if anti_alias and sigma > 0:
        part = ndi.gaussian_filter(part, sigma, mode="constant")
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return resample_to(nib.Nifti1Image(part, shifted), grid.affine, grid.shape, order=1)


def simulate_subject(seed: int, index: int, grid: ModelGrid, version: int = cohort.DEFAULT_VERSION,
                     age: float | None = None, diagnosis: str | None = None,
                     metabolic_age: float | None = None, tissue_maps: bool = False,
                     sessions: int = 1, session: int = 0) -> MNISubject:  # fmt: skip
    """Session ``session`` (of ``sessions``, 1-2 years apart) of subject ``index`` of ``seed`` on
    ``grid``; see the module docstring. ``metabolic_age`` ages its metabolism alone
    (:func:`~dualglow_app.phantom.cohort.session_truth`); ``tissue_maps`` also reads its tissue
    maps (``tissue_maps.npy`` of the module docstring)."""
    refs = _grid_refs(grid)
    tpl, traits, truth = work_truth(seed, index, version, age, diagnosis, metabolic_age, sessions=sessions,
                                    session=session)  # fmt: skip
    assert truth.explainable is not None
    t1 = work_t1(truth, seed, index, session)
    mask = _to_grid(truth.brain, tpl.affine, grid, anti_alias=False) > 0.5
    mri = _to_grid(t1, tpl.affine, grid)
    low, high = (float(v) for v in np.percentile(mri[mask], refs.percentiles))
    mri = np.clip((mri - low) / max(high - low, 1e-6), 0.0, 1.0) * mask

    def suvr(pet: np.ndarray) -> np.ndarray:
        on_grid = _to_grid(pet, tpl.affine, grid)
        return on_grid / float(on_grid[refs.reference].mean()) * mask

    maps = None
    if tissue_maps:
        posteriors, _ = own_tissue_maps(t1, truth.brain > 0.5)
        maps = np.stack([_to_grid(p, tpl.affine, grid) * mask for p in posteriors]).astype(np.float32)
    label = f"sub-{cohort.participant_label(index)}" + (f"_ses-{session + 1:02d}" if sessions > 1 else "")
    mmse = (cohort.mmse_scores(seed, index, traits.demographics, traits.ages)[session]
            if version in cohort.MMSE_VERSIONS else None)  # fmt: skip
    return MNISubject(label, traits.demographics, mri.astype(np.float32), suvr(truth.pet).astype(np.float32),
                      suvr(truth.explainable).astype(np.float32), mask.astype(np.uint8), maps,
                      float(traits.ages[session]), session, mmse)


def work_truth(seed: int, index: int, version: int = cohort.DEFAULT_VERSION, age: float | None = None,
               diagnosis: str | None = None, metabolic_age: float | None = None, explainable: bool = True,
               sessions: int = 1, session: int = 0) -> tuple[Template, cohort.SubjectTraits, cohort.SessionTruth]:
    """Subject ``index``'s template, traits and session ``session``'s MNI truth on the 2 mm work
    grid (the BIDS cohort's subject ``index`` for the same seed, version and sessions: the
    number of sessions moves the first age, which leaves room for the follow-ups), as
    :func:`simulate_subject` puts them on a model grid."""
    if not 0 <= session < sessions:
        raise ValueError(f"session {session} of {sessions}: sessions count from 0")
    tpl = load_template(WORK_VOXEL_MM)
    traits = cohort.subject_traits(seed, index, sessions, tpl, age, diagnosis, version, native=False)
    _, head_pet = an.head_images(tpl, traits.head, cohort._head_shell(WORK_VOXEL_MM), pt.HEAD_ACTIVITY)
    truth = cohort.session_truth(tpl, pt.calibrate(WORK_VOXEL_MM), traits, session, head_pet, cohort.subject_maps(tpl, traits),
                                 explainable=explainable, metabolic_age=metabolic_age)  # fmt: skip
    return tpl, traits, truth


def work_t1(truth: cohort.SessionTruth, seed: int, index: int, session: int = 0) -> np.ndarray:
    """Subject ``index``'s brain T1w at ``session`` on the work grid as the stack sees it before the
    model grid: Rician noise of a 1 mm scan averaged into the work voxel, and a residual bias
    field (each session its own, as the BIDS cohort's sessions draw their own)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 1 + session, NOISE_STREAM)))
    sigma = np.float32(rng.uniform(*MRI_NOISE_SD) / np.sqrt(WORK_VOXEL_MM**3))  # 8 1 mm voxels in one
    t1 = truth.brain_t1 * (truth.brain > 0.05)
    n1 = rng.standard_normal(t1.shape, dtype=np.float32)
    n2 = rng.standard_normal(t1.shape, dtype=np.float32)
    t1 = np.sqrt((t1 + sigma * n1) ** 2 + (sigma * n2) ** 2) * (truth.brain > 0.05)
    return t1 * an.bias_field(t1.shape, rng, RESIDUAL_BIAS)


def age_sweep_truth(seed: int, index: int, grid: ModelGrid, ages: Sequence[float],
                    version: int = cohort.DEFAULT_VERSION, sessions: int = 1, session: int = 0) -> np.ndarray:
    """Subject ``index``'s true PET (SUVR on ``grid``) at each of ``ages`` with its own anatomy
    (that of ``session`` of ``sessions``):
    its MRI stays the stack's, only the metabolism ages. What a model's age sweep of that MRI
    should reproduce; measured through the same PSF, grid and regions as the synthetic sweep
    (the calibration's regional slopes are the activity's, before the 8 mm PSF mixes
    neighbouring regions). ``(len(ages), *grid.shape)``, float32."""
    return np.stack([simulate_subject(seed, index, grid, version, metabolic_age=float(a), sessions=sessions,
                                      session=session).pet for a in ages])  # fmt: skip


def _worker(args: tuple[int, int, ModelGrid, int, int, int]) -> MNISubject:
    seed, index, grid, version, sessions, session = args
    return simulate_subject(seed, index, grid, version, tissue_maps=True, sessions=sessions, session=session)


def make_mni_stack(out_dir: Path | str, n_subjects: int, seed: int = 0, grid: ModelGrid | None = None,
                   version: int = cohort.DEFAULT_VERSION, jobs: int | None = None,
                   overwrite: bool = False, sessions: int = 1) -> Path:
    """Write ``n_subjects`` phantoms directly on ``grid`` (default cpu4mm) as ``.npy`` stacks.

    Subject ``i`` has the MNI-space truth of the BIDS cohort's subject ``i`` for the same seed,
    version and sessions; with ``sessions`` > 1 each session is a row (subject-major, labels
    ``sub-<i>_ses-<k>``, each row its session's age and MMSE). Returns ``out_dir``; load it
    with :func:`dualglow_app.dataset.load_mni_stack`.
    SKIPS native simulation and preprocessing: for model development only (module docstring).

    Example::

        make_mni_stack("stack", 100, seed=0, grid=preset("cpu4mm"))   # ~1 min on one core
    """
    from dualglow_app.grid import preset

    grid = grid or preset("cpu4mm")
    out_dir = Path(out_dir)
    cohort.check_version(version)
    if n_subjects < 1:
        raise ValueError(f"--subjects must be at least 1, got {n_subjects}.")
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}.")
    if not 1 <= sessions <= cohort.MAX_SESSIONS:
        raise ValueError(f"--sessions must be between 1 and {cohort.MAX_SESSIONS}, got {sessions}.")
    cohort.check_out_dir(out_dir, overwrite)
    start = time.perf_counter()
    # Template, calibration, head shell and grid references once, before forking.
    load_template(WORK_VOXEL_MM)
    pt.calibrate(WORK_VOXEL_MM)
    cohort._head_shell(WORK_VOXEL_MM)
    _grid_refs(grid)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rows = n_subjects * sessions
        shapes: dict[str, tuple[int, ...]] = {name: (rows, *grid.shape) for name in STACK_FILES}
        shapes["tissue_maps"] = (rows, len(NATIVE_TISSUE_CHANNELS), *grid.shape)
        arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", np.uint8 if name == "mask" else np.float32,
                                                  shapes[name]) for name in STACK_FILES}
        jobs = max(1, min(cpu_threads(jobs), rows))
        tasks = [(seed, i, grid, version, sessions, k) for i in range(n_subjects) for k in range(sessions)]
        subjects: list[MNISubject] = []
        if jobs == 1:
            results = progress(map(_worker, tasks), "MNI phantoms", total=rows)
            for row, subject in enumerate(results):
                _store(arrays, row, subject)
                subjects.append(_meta_only(subject))
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(jobs, mp_context=context) as pool:
                for row, subject in enumerate(progress(pool.map(_worker, tasks), "MNI phantoms", total=rows)):
                    _store(arrays, row, subject)
                    subjects.append(_meta_only(subject))
        for array in arrays.values():
            array.flush()
        del arrays
        write_json(tmp / "index.json", _index(subjects, grid, seed, version, sessions))
        if out_dir.exists():
            out_dir.rmdir()  # check_out_dir left it absent or empty
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%d MNI-grid phantoms x %d session(s) (version %d) written to %s in %.1f s", n_subjects, sessions,
             version, out_dir, time.perf_counter() - start)
    return out_dir


def _store(arrays: dict[str, np.ndarray], row: int, subject: MNISubject) -> None:
    for name in STACK_FILES:
        arrays[name][row] = getattr(subject, name)


def _meta_only(subject: MNISubject) -> MNISubject:
    empty = np.empty(0, dtype=np.float32)
    return MNISubject(subject.label, subject.demographics, empty, empty, empty, empty, empty, subject.age,
                      subject.session, subject.mmse)


def _index(subjects: list[MNISubject], grid: ModelGrid, seed: int, version: int, sessions: int = 1) -> dict:
    from dualglow_app.preprocess import PETOptions, T1wOptions

    return {
        "Generator": cohort.GENERATOR,
        "Kind": "mni-stack",
        "Note": NOTE,
        "labels": [s.label for s in subjects],
        "subjects": [s.label.removeprefix("sub-").split("_")[0] for s in subjects],
        "age": [s.demographics.age if s.age is None else s.age for s in subjects],
        "sex": [s.demographics.sex for s in subjects],
        "diagnosis": [s.demographics.diagnosis for s in subjects],
        "diagnosis_detail": [s.demographics.diagnosis_detail for s in subjects],
        **({"mmse": [s.mmse for s in subjects]} if version in cohort.MMSE_VERSIONS else {}),
        # The covariates above as participants.json declares them (dataset.load_mni_stack types them by it).
        "columns": {**cohort.PARTICIPANT_COLUMNS, **(cohort.MMSE_COLUMN if version in cohort.MMSE_VERSIONS else {})},
        "grid": grid.to_dict(),
        "version": version,
        "sessions": sessions,
        "session": [s.session for s in subjects],
        "version_note": cohort.VERSION_NOTES[version],
        "seed": seed,
        "files": {
            "mri.npy": f"brain T1w on the grid, float32, scaled by the brain's {list(T1wOptions().percentiles)} "
                       "percentiles to [0, 1], 0 outside the brain",
            "pet.npy": f"noise-free FDG-PET (8 mm PSF), float32 SUVR ({PETOptions().reference_region} reference), "
                       "0 outside the brain",
            "explainable.npy": "explainable PET (no MRI-invisible factors), SUVR by its own reference mean",
            "mask.npy": "brain mask, uint8",
            "tissue_maps.npy": "grey-matter and CSF posteriors of a 3-class mixture of each subject's 2 mm T1w, "
                               "averaged down to the grid, float32 (N, 2, X, Y, Z), 0 outside the brain",
        },
        "reference_region": PETOptions().reference_region,
        "work_voxel_mm": WORK_VOXEL_MM,
        "dualglow_version": __version__,
    }
