"""FDG-PET of a phantom: regional activity, calibration through the PSF, ageing, AD, variation.

Facts (docs/DESIGN.md "Data facts"):

- Target pattern: regional SUVR of cognitively normal adults (pons-normalised, N=537
  ADNI/FTLDNI, FastSurfer regions, data of the PyPI package fdg-neurosegmenter), the
  ``REGION_TARGETS`` table below. They are MEASURED values (after the scanner's blur), so
  activities are calibrated: activity <- activity * target / measured after the 8 mm PSF,
  a few passes (the Brain-VISET idea), until the blurred phantom reproduces the table.
  Regions of the Desikan-Killiany atlas that the table does not list get an ASSUMED target
  (``ASSUMED_TARGETS``), close to their anatomical neighbours.
- Grey:white true activity about 4:1 (BrainWeb FDG model 128:32; Hoffman phantom 5:1), CSF 0.
- Ageing: whole-brain metabolism about -8 %/decade, strongest in frontal, anterior cingulate
  and insula (``AGE_SLOPE``; normalised so the grey-matter-weighted mean is exactly 8 %).
  The table describes ADNI controls, whose mean age is about 73 (``REFERENCE_AGE``).
- AD vs CN (cerebellum SUVR, Bailly 2015): precuneus -19 %, posterior cingulate -21 %,
  temporoparietal cortex and hippocampus also lower (``AD_PATTERN`` at severity 1); MCI about
  -13 % (severity ~0.65). Cerebellum and pons are spared, as the reference regions assume.
- Subject-specific variation NOT visible in the MRI: a global scale (dose, weight, glucose),
  per-parcel factors and a smooth spatial field. Between-subject SUVR SD in the table's data
  is 0.13-0.18; part of that is the reference region, so per-parcel SD is 5 % in phantom
  version 1 (``REGIONAL_SD``), with a 3 % smooth field.
- Phantom version 2 (anatomy.py "phantom version 2"): each cortical region has a GM
  thickness/density factor ``g`` that the MRI shows. The PET follows it twice: through the
  subject's own GM (``activity_map``: less GM, less activity in the voxel) and through the
  uptake per unit GM, ``g ** GM_UPTAKE_EXPONENT`` (k = 1): thinner cortex also metabolises
  less per millilitre of GM (an ASSUMPTION of the phantom, in the direction of the AD
  literature, where partial-volume-corrected FDG stays low in atrophic cortex, Ibanez 1998,
  Neurology 50:1585). The MRI-invisible part shrinks so that the MRI-explainable part
  dominates: per-parcel SD 3 % (``REGIONAL_SD_V2``, was 5 %) and a 2 % smooth field
  (``SMOOTH_FIELD_SD_V2``, was 3 %). Why these numbers: with the GM factor's first-draft 12 % SD and
  k = 1 the regional SUVR of CN subjects varied with a median SD of 0.13 (cerebellum
  reference), the low end of the table's data (0.13-0.18); the shipped 8 % gives 0.097;
  keeping version 1's 5 % on top would push it up while adding only MRI-invisible variance.
  The PET also follows version 2's local GM pattern (GM moved within a region) through
  ``activity_map``. Measured (benchmarks/results/phantom_v2_mri_information.json): the
  explainable PET accounts for about 95 % of the between-subject PET variance in version 2
  (version 1: 45-60 %, age and diagnosis only).
- Resolution: ADNI PET is smoothed to a uniform 8 mm FWHM.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import spearmanr

from dualglow_app.imaging import FWHM_TO_SIGMA
from dualglow_app.log import get_logger
from dualglow_app.phantom.anatomy import AtrophyParams, atrophied_tissues, upsample_linear
from dualglow_app.phantom.template import CORTEX_MIN_LABEL, Template, dk_label_names, load_template

log = get_logger(__name__)

PSF_FWHM_MM = 8.0
REFERENCE_AGE = 73.0
GREY_WHITE_RATIO = 4.0
CALIBRATION_PASSES = 4
#: Pons as the part of the FreeSurfer "Brain-Stem" label between these MNI z (mm).
PONS_Z_MM = (-42.0, -18.0)

#: Measured CN SUVR (docs/DESIGN.md table) and the Desikan-Killiany labels that form each region.
REGION_TARGETS: dict[str, tuple[float, tuple[str, ...]]] = {
    "pericalcarine": (1.60, ("pericalcarine",)),
    "putamen": (1.50, ("Putamen",)),
    "precuneus": (1.49, ("precuneus",)),
    "cuneus": (1.45, ("cuneus",)),
    "lingual": (1.43, ("lingual",)),
    "posterior_cingulate": (1.40, ("posteriorcingulate", "isthmuscingulate")),
    "dorsolateral_frontal": (1.38, ("rostralmiddlefrontal", "caudalmiddlefrontal")),
    "superior_frontal": (1.32, ("superiorfrontal",)),
    "lateral_parietal": (1.29, ("superiorparietal", "inferiorparietal", "supramarginal")),
    "orbitofrontal": (1.27, ("lateralorbitofrontal", "medialorbitofrontal")),
    "insula": (1.20, ("insula",)),
    "lateral_temporal": (1.18, ("superiortemporal", "middletemporal", "inferiortemporal", "bankssts")),
    "anterior_cingulate": (1.17, ("rostralanteriorcingulate", "caudalanteriorcingulate")),
    "thalamus": (1.17, ("Thalamus-Proper",)),
    "cerebellar_cortex": (1.15, ("Cerebellum-Cortex",)),
    "mesial_temporal": (1.14, ("entorhinal", "parahippocampal")),
    "caudate": (1.06, ("Caudate",)),
    "hippocampus": (0.96, ("Hippocampus",)),
    "amygdala": (0.94, ("Amygdala",)),
    "pons": (0.93, ("Brain-Stem",)),
}
#: ASSUMED targets for parcels the table lacks (not data: neighbours' values).
ASSUMED_TARGETS: dict[str, tuple[float, tuple[str, ...]]] = {
    "sensorimotor": (1.30, ("precentral", "postcentral", "paracentral")),
    "inferior_frontal": (1.33, ("parsopercularis", "parstriangularis", "parsorbitalis")),
    "frontal_pole": (1.25, ("frontalpole",)),
    "lateral_occipital": (1.40, ("lateraloccipital",)),
    "fusiform": (1.22, ("fusiform",)),
    "temporal_pole": (1.02, ("temporalpole",)),
    "transverse_temporal": (1.28, ("transversetemporal",)),
    "pallidum": (1.00, ("Pallidum",)),
    "accumbens": (1.10, ("Accumbens-area",)),
    "ventral_dc": (1.00, ("VentralDC",)),
}
#: Regions whose tissue maps split a grey nucleus into GM and WM: all their tissue is active.
DEEP_REGIONS = ("putamen", "thalamus", "caudate", "pallidum", "accumbens", "ventral_dc", "pons")

#: Relative age slope (per decade, before normalisation): frontal, ACC and insula strongest.
AGE_SLOPE_WEIGHT: dict[str, float] = {
    "dorsolateral_frontal": 1.4, "superior_frontal": 1.4, "orbitofrontal": 1.4,
    "inferior_frontal": 1.4, "frontal_pole": 1.4, "anterior_cingulate": 1.5, "insula": 1.4,
    "pericalcarine": 0.6, "cuneus": 0.6, "lingual": 0.6, "cerebellar_cortex": 0.5,
    "thalamus": 0.7, "putamen": 0.8, "pons": 0.4, "sensorimotor": 0.8,
}
WHOLE_BRAIN_DECLINE_PER_DECADE = 0.08

#: Fractional hypometabolism at AD severity 1 (Bailly 2015 for precuneus / PCC; the rest
#: follows the classical temporoparietal + mesial temporal pattern).
AD_PATTERN: dict[str, float] = {
    "precuneus": 0.19, "posterior_cingulate": 0.21, "lateral_parietal": 0.14,
    "lateral_temporal": 0.11, "hippocampus": 0.12, "mesial_temporal": 0.12, "amygdala": 0.08,
    "dorsolateral_frontal": 0.05, "superior_frontal": 0.04, "fusiform": 0.06,
    "temporal_pole": 0.06,
}
#: Mean severity by diagnosis (MCI about -13 % in PCC/precuneus = 0.65 of AD).
SEVERITY = {"CN": 0.0, "SMC": 0.0, "EMCI": 0.45, "MCI": 0.65, "LMCI": 0.8, "AD": 1.0}

REGIONAL_SD = 0.05
SMOOTH_FIELD_SD = 0.03
#: Version 2: the MRI-invisible variation, smaller than the MRI-explainable one (docstring).
REGIONAL_SD_V2 = 0.03
SMOOTH_FIELD_SD_V2 = 0.02
#: Version 2: uptake per unit GM = gm_factor ** GM_UPTAKE_EXPONENT (docstring; assumed).
GM_UPTAKE_EXPONENT = 1.0
SMOOTH_FIELD_MM = 25.0
GLOBAL_SCALE_SD = 0.12
#: Bq/mL of one SUVR unit (about 5 kBq/mL for a 185 MBq, 70 kg FDG scan at 30-60 min).
BQML_PER_SUVR = 5000.0
#: Small uptake (SUVR units) of scalp muscle, fat and skull marrow: PET shows a head outline.
HEAD_ACTIVITY = {"muscle": 0.12, "skin": 0.12, "fat": 0.06, "marrow": 0.06}


def all_regions() -> dict[str, tuple[float, tuple[str, ...]]]:
    return {**REGION_TARGETS, **ASSUMED_TARGETS}


@functools.lru_cache(maxsize=1)
def cortical_regions() -> np.ndarray:
    """Bool per region of :func:`all_regions`: made of cortical (aparc ``ctx-``) parcels only,
    i.e. where phantom version 2 draws a GM factor (not the cerebellum, the reference region)."""
    tpl_names = dk_label_names()
    out = []
    for _, parcels in all_regions().values():
        ids = [i for p in parcels for i in _label_ids_in(tpl_names, p)]
        out.append(all(i > CORTEX_MIN_LABEL for i in ids))
    return np.array(out)


@dataclass(frozen=True)
class RegionMaps:
    """Per-voxel region index of the work grid (-1: none) and each region's measurement mask."""

    names: tuple[str, ...]
    index: np.ndarray  # int16 region index per voxel
    measure: dict[str, np.ndarray]  # flat voxel indices where a region is measured
    deep: np.ndarray  # bool per region: all tissue active (deep grey nuclei)


def _label_ids(tpl: Template, parcel: str) -> list[int]:
    return _label_ids_in(tpl.label_names, parcel)


def _label_ids_in(label_names: dict[int, str], parcel: str) -> list[int]:
    ids = []
    for label, name in label_names.items():
        base = name.removeprefix("ctx-lh-").removeprefix("ctx-rh-")
        base = base.removeprefix("Left-").removeprefix("Right-")
        if base == parcel:
            ids.append(label)
    if not ids:
        raise KeyError(f"parcel {parcel!r} not in the Desikan-Killiany label list")
    return ids


@functools.lru_cache(maxsize=2)
def region_maps(voxel_mm: float = 1.0) -> RegionMaps:
    tpl = load_template(voxel_mm)
    regions = all_regions()
    names = tuple(regions)
    index = np.full(tpl.shape, -1, dtype=np.int16)
    z = tpl.mm[2][None, None, :]
    pons_band = (z >= PONS_Z_MM[0]) & (z <= PONS_Z_MM[1])
    tissue = (tpl.gm + tpl.wm) > 0.5
    measure = {}
    for r, (_, parcels) in enumerate(regions.values()):
        in_region = np.isin(tpl.labels, [i for p in parcels for i in _label_ids(tpl, p)])
        index[in_region] = r
        if names[r] == "pons":
            in_region = in_region & pons_band
        measure[names[r]] = np.flatnonzero(in_region & tissue)
    deep = np.array([n in DEEP_REGIONS for n in names])
    return RegionMaps(names=names, index=index, measure=measure, deep=deep)


def activity_map(
    gm: np.ndarray, wm: np.ndarray, maps: RegionMaps, gm_activity: np.ndarray, wm_activity: float,
    default_gm: float,
) -> np.ndarray:
    """True (unblurred) activity: each region's value on its GM (all tissue in deep nuclei)."""
    lut_gm = np.append(gm_activity, default_gm).astype(np.float32)  # index -1 -> default
    lut_wm = np.append(np.where(maps.deep, gm_activity, wm_activity), wm_activity).astype(np.float32)
    return gm * lut_gm[maps.index] + wm * lut_wm[maps.index]


def blur(volume: np.ndarray, voxel_mm: float, fwhm_mm: float = PSF_FWHM_MM,
         box: tuple[slice, ...] | None = None) -> np.ndarray:
    """The PSF; with ``box``, only there (``volume`` must be zero outside it, or nearly)."""
    sigma = fwhm_mm * FWHM_TO_SIGMA / voxel_mm
    if box is None:
        return ndi.gaussian_filter(volume, sigma, mode="constant")
    out = np.zeros_like(volume)
    out[box] = ndi.gaussian_filter(volume[box], sigma, mode="constant")
    return out


def brain_box(tpl: Template, margin_mm: float = 2 * PSF_FWHM_MM) -> tuple[slice, ...]:
    """Bounding box of the brain plus the PSF kernel's reach (scipy truncates at 4 sigma = 13.6 mm)."""
    margin = int(np.ceil(margin_mm / tpl.voxel_mm))
    nonzero = np.nonzero(tpl.brain > 0)
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in nonzero)


def measure_regions(pet: np.ndarray, maps: RegionMaps) -> np.ndarray:
    """Mean of ``pet`` in each region's measurement mask (label and GM + WM > 0.5)."""
    flat = pet.reshape(-1)
    return np.array([flat[maps.measure[n]].mean() for n in maps.names])


@dataclass(frozen=True)
class Calibration:
    """Calibrated true activities (SUVR units) for the reference subject (CN, age 73).

    ``ad_activity_factor`` is the true-activity factor per region that MEASURES as the AD
    pattern (1 - ``AD_PATTERN``) after the PSF: the blur dilutes a regional reduction, and
    Bailly 2015's -19/-21 % are measured values, so they are calibrated like the CN table.
    """

    names: tuple[str, ...]
    targets: np.ndarray
    gm_activity: np.ndarray
    wm_activity: float
    default_gm: float
    measured: np.ndarray
    spearman: float
    age_slope: np.ndarray  # fractional decline per decade, per region
    ad_activity_factor: np.ndarray
    ad_measured_ratio: np.ndarray
    gm_volume: np.ndarray  # ml of GM per region in the reference anatomy

    def table(self) -> list[dict[str, object]]:
        assumed = set(ASSUMED_TARGETS)
        return [
            {
                "region": n, "target_suvr": float(t), "source": "assumed" if n in assumed else "DESIGN.md",
                "activity": float(a), "measured_suvr": float(m), "age_decline_per_decade": float(s),
                "ad_activity_factor": float(f), "ad_measured_ratio": float(r),
            }
            for n, t, a, m, s, f, r in zip(self.names, self.targets, self.gm_activity, self.measured,
                                           self.age_slope, self.ad_activity_factor, self.ad_measured_ratio, strict=True)
        ]

    def mean_gm_factor(self, factor: np.ndarray) -> float:
        """GM-volume-weighted mean of a regional factor (applied to WM activity too)."""
        return float((factor * self.gm_volume).sum() / self.gm_volume.sum())


def _measure(gm: np.ndarray, wm: np.ndarray, maps: RegionMaps, activity: np.ndarray, wm_activity: float,
             default_gm: float, voxel_mm: float, box: tuple[slice, ...]) -> np.ndarray:
    """Regional means after the PSF; the brain-only activity lets the blur skip the empty grid."""
    act = activity_map(gm, wm, maps, activity, wm_activity, default_gm)
    return measure_regions(blur(act, voxel_mm, box=box), maps)


@functools.lru_cache(maxsize=2)
def calibrate(voxel_mm: float = 1.0) -> Calibration:
    """Iterate activity <- activity * target / measured through the 8 mm PSF (cached).

    The reference anatomy is the template with the atrophy of a CN subject at REFERENCE_AGE,
    the age the table's controls have on average. The AD pattern is then calibrated the same
    way, as a ratio of measured AD to measured CN uptake.
    """
    tpl = load_template(voxel_mm)
    maps = region_maps(voxel_mm)
    regions = all_regions()
    targets = np.array([regions[n][0] for n in maps.names])
    gm, wm, _ = atrophied_tissues(tpl, AtrophyParams.expected(REFERENCE_AGE, "CN"))
    box = brain_box(tpl)

    def wm_and_default(act: np.ndarray) -> tuple[float, float]:
        return float(act[~maps.deep].mean() / GREY_WHITE_RATIO), float(np.median(act[~maps.deep]))

    activity = targets.copy()
    for _ in range(CALIBRATION_PASSES):
        activity = activity * targets / _measure(gm, wm, maps, activity, *wm_and_default(activity), voxel_mm, box)
    wm_activity, default_gm = wm_and_default(activity)
    measured = _measure(gm, wm, maps, activity, wm_activity, default_gm, voxel_mm, box)
    table = [i for i, n in enumerate(maps.names) if n in REGION_TARGETS]
    rho = float(spearmanr(measured[table], targets[table]).statistic)

    # The AD pattern as measured ratios; WM and unlabelled GM keep the CN activity.
    ad_target = 1.0 - np.array([AD_PATTERN.get(n, 0.0) for n in maps.names])
    factor = ad_target.copy()
    for _ in range(CALIBRATION_PASSES + 2):  # neighbours' spill-over converges more slowly here
        ratio = _measure(gm, wm, maps, activity * factor, wm_activity, default_gm, voxel_mm, box) / measured
        factor = np.clip(factor * ad_target / ratio, 0.2, 1.0)
    ad_ratio = _measure(gm, wm, maps, activity * factor, wm_activity, default_gm, voxel_mm, box) / measured

    # Normalise the age weights so the GM-volume-weighted decline is exactly 8 %/decade.
    weight = np.array([AGE_SLOPE_WEIGHT.get(n, 1.0) for n in maps.names])
    inside = maps.index >= 0
    gm_volume = np.bincount(maps.index[inside], weights=gm[inside], minlength=len(maps.names)) * voxel_mm**3 / 1000
    slope = weight * WHOLE_BRAIN_DECLINE_PER_DECADE * gm_volume.sum() / (weight * gm_volume).sum()
    log.info(
        "PET calibrated in %d passes: activities %.2f-%.2f (WM %.2f), max |measured/target - 1| "
        "%.3f, Spearman rho %.3f; AD precuneus measures %.2f with activity factor %.2f",
        CALIBRATION_PASSES, activity.min(), activity.max(), wm_activity, np.abs(measured / targets - 1).max(),
        rho, ad_ratio[maps.names.index("precuneus")], factor[maps.names.index("precuneus")],
    )
    return Calibration(
        names=maps.names, targets=targets, gm_activity=activity, wm_activity=wm_activity,
        default_gm=default_gm, measured=measured, spearman=rho, age_slope=slope,
        ad_activity_factor=factor, ad_measured_ratio=ad_ratio, gm_volume=gm_volume,
    )


@dataclass(frozen=True)
class MetabolicState:
    """Everything that scales a subject's regional FDG uptake, for the factors.tsv."""

    age_factor: np.ndarray
    diagnosis_factor: np.ndarray
    subject_factor: np.ndarray
    global_scale: float
    severity: float
    smooth_field_coarse: np.ndarray  # low-resolution log-field, upsampled to the grid
    wm_factor: float  # ageing of white matter: the GM-weighted mean age factor
    gm_uptake: np.ndarray | None = None  # version 2: gm_factor ** GM_UPTAKE_EXPONENT per region
    smooth_field_sd: float = SMOOTH_FIELD_SD

    @property
    def total(self) -> np.ndarray:
        total = self.age_factor * self.diagnosis_factor * self.subject_factor
        return total if self.gm_uptake is None else total * self.gm_uptake

    def explainable(self) -> MetabolicState:
        """This state without what the MRI cannot show: no regional subject factor, no smooth
        field, global scale 1 (age, diagnosis and the GM-driven uptake stay)."""
        return dataclasses.replace(self, subject_factor=np.ones_like(self.subject_factor), global_scale=1.0,
                                   smooth_field_sd=0.0)


def draw_subject_variation(rng: np.random.Generator, n_regions: int,
                           regional_sd: float = REGIONAL_SD) -> tuple[np.ndarray, float, np.ndarray]:
    """Per-region factors, global scale and a coarse smooth log-field: the subject's trait."""
    regional = np.exp(rng.normal(0.0, regional_sd, n_regions))
    global_scale = float(np.exp(rng.normal(0.0, GLOBAL_SCALE_SD)))
    coarse = rng.normal(0.0, 1.0, (8, 9, 9))
    return regional, global_scale, coarse


def metabolic_state(
    cal: Calibration, age: float, diagnosis: str, severity: float, regional: np.ndarray,
    global_scale: float, coarse: np.ndarray, gm_factor: np.ndarray | None = None,
    smooth_field_sd: float = SMOOTH_FIELD_SD,
) -> MetabolicState:
    """``gm_factor`` (version 2): the subject's regional GM factors, which set the uptake per
    unit GM (``gm_factor ** GM_UPTAKE_EXPONENT``)."""
    age_factor = np.clip(1.0 - cal.age_slope * (age - REFERENCE_AGE) / 10.0, 0.5, 1.5)
    diagnosis_factor = np.clip(1.0 - severity * (1.0 - cal.ad_activity_factor), 0.1, 1.0)
    uptake = None if gm_factor is None else np.asarray(gm_factor, dtype=float) ** GM_UPTAKE_EXPONENT
    return MetabolicState(age_factor, diagnosis_factor, regional, global_scale, severity, coarse,
                          cal.mean_gm_factor(age_factor), uptake, smooth_field_sd)


def smooth_field(coarse: np.ndarray, shape: tuple[int, int, int], voxel_mm: float,
                 sd: float = SMOOTH_FIELD_SD) -> np.ndarray:
    """exp of a smooth, zero-mean field with SD ``sd`` over the work grid."""
    field = ndi.gaussian_filter(coarse, 1.0, mode="wrap")
    field = (field - field.mean()) / (field.std() + 1e-6) * sd
    positions = [np.linspace(0, n - 1, c) for n, c in zip(shape, field.shape, strict=True)]
    return np.exp(upsample_linear(field, positions, shape))


def subject_pet(
    tpl: Template, gm: np.ndarray, wm: np.ndarray, head_activity: np.ndarray, cal: Calibration,
    state: MetabolicState,
) -> tuple[np.ndarray, np.ndarray]:
    """(true activity, noise-free PET after the PSF), both in Bq/mL on the work grid."""
    maps = region_maps(tpl.voxel_mm)
    gm_act = cal.gm_activity * state.total
    act = activity_map(gm, wm, maps, gm_act, cal.wm_activity * state.wm_factor, cal.default_gm * state.wm_factor)
    if state.smooth_field_sd > 0:
        act *= smooth_field(state.smooth_field_coarse, tpl.shape, tpl.voxel_mm, state.smooth_field_sd)
    act += head_activity
    act *= np.float32(state.global_scale * BQML_PER_SUVR)
    return act, blur(act, tpl.voxel_mm)
