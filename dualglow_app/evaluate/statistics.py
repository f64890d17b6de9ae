"""The statistics of the evaluation (Sun et al. 2019, sec. 4), as plain functions of arrays.

- Table 1: :func:`summarise` (mean +- SD per method and metric) and :func:`paired_tests`
  (two-sided paired Wilcoxon signed-rank, DUAL-GLOW vs each baseline; scipy).
- Table 2: :func:`classification` - impaired (MCI, LMCI, AD) vs not (CN, SMC, EMCI) from
  regional SUVR, standardised, an RBF-kernel SVM (scikit-learn, C = 1, gamma = "scale"; fixed,
  never tuned) on the evaluation's folds; accuracy, false-negative rate FN / (FN + TP) and
  false-positive rate FP / (FP + TN), pooled over the folds.
- Subject-level metrics (docs/DESIGN.md, "What works means"): :func:`subject_level` - input
  specificity of each method next to the true PETs' and regional agreement (ICC(2,1),
  Bland-Altman) of held-out scans; the per-scan deviation correlation is a Table 1 column. On
  a phantom cohort: :func:`explainable_scores` against each subject's explainable PET
  (:func:`explainable_truth`).
- Fig. 7: :func:`age_trends` - regional means vs age with 95 % confidence bands of the mean
  over scans, per-region slopes (:func:`regional_slopes`), and on a phantom cohort the
  comparison with its true slopes (:func:`phantom_true_slopes`).
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualglow_app.evaluate.options import (
    DUALGLOW,
    IMPAIRED,
    NOT_IMPAIRED,
    PHANTOM_REFERENCE_REGION,
    REFERENCE_AGE,
)
from dualglow_app.log import get_logger
from dualglow_app.metrics import HIGHER_IS_BETTER, METRICS

log = get_logger(__name__)


def impairment_classes(diagnosis: Sequence[str | None]) -> np.ndarray:
    """1 impaired (MCI, LMCI, AD), 0 not (CN, SMC, EMCI), -1 unknown or other."""
    return np.array([1 if d in IMPAIRED else 0 if d in NOT_IMPAIRED else -1 for d in diagnosis], dtype=int)


def summarise(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Table 1: {method: {metric: {mean, std, n}}} over held-out scans (std with ddof = 1)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        table[method] = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in rows if r["method"] == method], dtype=float)
            values = values[np.isfinite(values)]
            table[method][metric] = {
                "mean": float(values.mean()) if values.size else float("nan"),
                "std": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                "n": int(values.size),
            }
    return table


def paired_tests(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Two-sided paired Wilcoxon signed-rank test, DUAL-GLOW vs each baseline, per metric.

    ``median_diff`` is median(DUAL-GLOW - baseline); ``better`` names the method with the
    better median paired difference (MAE: lower; the rest: higher), whatever the p-value.
    """
    from scipy.stats import wilcoxon

    by_key = {(r["method"], r["label"]): r for r in rows}
    labels = sorted({r["label"] for r in rows if r["method"] == DUALGLOW})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        if method == DUALGLOW:
            continue
        out[method] = {}
        for metric in METRICS:
            pairs = [(by_key[(DUALGLOW, lab)][metric], by_key[(method, lab)][metric])
                     for lab in labels if (method, lab) in by_key]  # fmt: skip
            diff = np.array([a - b for a, b in pairs if np.isfinite(a) and np.isfinite(b)])
            stat, p = float("nan"), float("nan")
            if diff.size >= 2 and np.any(diff != 0):
                test = wilcoxon(diff)
                stat, p = float(test.statistic), float(test.pvalue)
            median = float(np.median(diff)) if diff.size else float("nan")
            dualglow_better = median < 0 if not HIGHER_IS_BETTER[metric] else median > 0
            out[method][metric] = {
                "n": int(diff.size), "statistic": stat, "p_value": p, "median_diff": median,
                "better": "tie" if not diff.size or median == 0 else (DUALGLOW if dualglow_better else method),
            }  # fmt: skip
    return out


def classification(
    features: dict[str, list[np.ndarray]], diagnosis: Sequence[str | None],
    splits: Sequence[tuple[np.ndarray, np.ndarray]], seed: int,
) -> dict[str, Any]:
    """Table 2: impaired vs not from regional SUVR, an RBF SVM, the evaluation's folds.

    ``features[source][k]`` is the (N, features) matrix used in fold ``k`` (true PET and the
    MRI reference rows: the same every fold). Features not finite in every scan of the true
    PET's matrix are dropped for every source with the same columns (coarse grids lose small
    regions); a source with other columns (the MRI + age row) drops its own non-finite ones.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    y = impairment_classes(diagnosis)
    known = y >= 0
    counts = {"impaired": int((y == 1).sum()), "not_impaired": int((y == 0).sum()), "unknown": int((~known).sum())}
    if counts["impaired"] < 2 or counts["not_impaired"] < 2:
        return {"skipped": f"needs >= 2 impaired and >= 2 unimpaired scans with a diagnosis; have {counts}", "counts": counts}
    true_features = features["true PET"][0]
    usable = np.all(np.isfinite(true_features), axis=0)
    table: dict[str, Any] = {"counts": counts, "regions_used": int(usable.sum()), "sources": {}}
    for source, per_fold in features.items():
        columns = usable if per_fold[0].shape[1] == usable.size else np.all(np.isfinite(per_fold[0]), axis=0)
        predicted = np.full(len(y), -1)
        for k, (train, test) in enumerate(splits):
            x = per_fold[k][:, columns]
            train, test = train[known[train]], test[known[test]]
            if len(test) == 0 or len(set(y[train])) < 2:
                continue
            model = make_pipeline(StandardScaler(), SVC(kernel="rbf", C=1.0, gamma="scale", random_state=seed))
            model.fit(np.nan_to_num(x[train]), y[train])
            predicted[test] = model.predict(np.nan_to_num(x[test]))
        scored = known & (predicted >= 0)
        tp = int(((predicted == 1) & (y == 1) & scored).sum())
        tn = int(((predicted == 0) & (y == 0) & scored).sum())
        fp = int(((predicted == 1) & (y == 0) & scored).sum())
        fn = int(((predicted == 0) & (y == 1) & scored).sum())
        n = tp + tn + fp + fn
        table["sources"][source] = {
            "accuracy": (tp + tn) / n if n else float("nan"),
            "fnr": fn / (fn + tp) if fn + tp else float("nan"),
            "fpr": fp / (fp + tn) if fp + tn else float("nan"),
            "n": n, "tp": tp, "tn": tn, "fp": fp, "fn": fn,
        }  # fmt: skip
    return table


def subject_level(
    true_pet: np.ndarray, masks: np.ndarray, true_regions: np.ndarray,
    held_out: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
) -> dict[str, Any]:
    """Input specificity and regional agreement of each method on its held-out scans.

    ``held_out[method]`` lists per fold (test rows, their predictions (n, X, Y, Z), their
    regional means (n, regions)). Input specificity: the mean pairwise Pearson r between the
    synthetic PETs of different held-out scans (pooled over folds), next to the same figure
    for their true PETs; a model that ignores the MRI has the higher one. Regional agreement:
    per region, ICC(2,1) and Bland-Altman of synthetic vs true mean SUVR over held-out scans.
    """
    from dualglow_app.metrics import mean_pairwise_correlation, regional_agreement

    out: dict[str, Any] = {"input_specificity": {}, "regional_agreement": {}}
    rows = None
    for method, folds in held_out.items():
        order = np.concatenate([f[0] for f in folds])
        predictions = np.concatenate([f[1] for f in folds])
        if rows is None:
            rows = order
            out["input_specificity"]["true PET"] = mean_pairwise_correlation(true_pet[order], masks[order])
        out["input_specificity"][method] = mean_pairwise_correlation(predictions, masks[order])
        agreement = regional_agreement(np.concatenate([f[2] for f in folds]), true_regions[order])
        out["regional_agreement"][method] = agreement
    return out


def _ci95(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95 % confidence interval of the mean (Student t) along ``axis``, NaN-aware."""
    from scipy.stats import t as student

    n = np.sum(np.isfinite(values), axis=axis)
    mean = np.nanmean(values, axis=axis)
    sem = np.nanstd(values, axis=axis, ddof=1) / np.sqrt(np.maximum(n, 1)) if values.shape[axis] > 1 else np.zeros_like(mean)
    half = student.ppf(0.975, np.maximum(n - 1, 1)) * np.nan_to_num(sem)
    return mean, mean - half, mean + half


def regional_slopes(sweep: np.ndarray, ages: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per scan and region: (SUVR per decade, relative change per decade at :data:`REFERENCE_AGE`).

    ``sweep`` is (scans, ages, regions); least squares over the ages of each scan.
    """
    a = np.asarray(ages, dtype=float)
    centred = a - a.mean()
    slope_per_year = np.einsum("a,nar->nr", centred, sweep - sweep.mean(axis=1, keepdims=True)) / np.sum(centred**2)
    at_reference = sweep.mean(axis=1) + slope_per_year * (REFERENCE_AGE - a.mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = 10.0 * slope_per_year / at_reference
    return 10.0 * slope_per_year, relative


def phantom_true_slopes(bids_dir: Path, names: Sequence[str]) -> dict[str, Any] | None:
    """True relative FDG change per decade of each phantom region, from its ground truth.

    Each subject's ``desc-regions_factors.tsv`` lists the regional ``age_factor`` (1 at 73) and
    its JSON the age; a least-squares line through all of them gives each region's true
    relative activity slope. Preprocessing divides by a cerebellar reference that ages too, so
    the true SUVR slope is, to first order at 73, the region's minus the cerebellum's.
    """
    truth = Path(bids_dir) / "derivatives" / "phantom"
    ages, factors = [], []
    for path in sorted(truth.rglob("*_desc-regions_factors.tsv")):
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            continue
        with open(path, encoding="utf-8") as handle:
            table = {row["region"]: float(row["age_factor"]) for row in csv.DictReader(handle, delimiter="\t")}
        ages.append(float(json.loads(sidecar.read_text(encoding="utf-8"))["Age"]))
        factors.append([table.get(n, np.nan) for n in names])
    if len(set(ages)) < 2:
        log.warning("%s: fewer than two distinct ages in the phantom ground truth; no true slopes", truth)
        return None
    a = np.array(ages) - REFERENCE_AGE
    f = np.array(factors)
    activity = 10.0 * np.array([np.polyfit(a, f[:, r], 1)[0] if np.all(np.isfinite(f[:, r])) else np.nan
                                for r in range(len(names))])  # fmt: skip
    reference = activity[list(names).index(PHANTOM_REFERENCE_REGION)] if PHANTOM_REFERENCE_REGION in names else 0.0
    return {"regions": list(names), "activity_per_decade": activity.tolist(),
            "suvr_per_decade": (activity - reference).tolist(), "n_files": len(ages)}  # fmt: skip


#: Issue 17's tolerance on a region's age slope (ratio synthetic / true within 1 +- this), and
#: the smallest true slope (relative, per decade) whose ratio is counted: below it, noise.
SLOPE_TOLERANCE, MIN_COUNTED_SLOPE = 0.25, 1e-3


def slope_ratios(synthetic: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each region's slope ratio synthetic / true, NaN where it is not counted (either slope
    not finite, or the true one below :data:`MIN_COUNTED_SLOPE`)."""
    synthetic, truth = np.asarray(synthetic, float), np.asarray(truth, float)
    counted = np.isfinite(synthetic) & np.isfinite(truth) & (np.abs(truth) > MIN_COUNTED_SLOPE)
    return np.divide(synthetic, truth, out=np.full(truth.shape, np.nan), where=counted)


def slope_agreement(synthetic: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Regional slopes against the truth's (issue 17's age targets): Pearson r, the share of
    regions with the truth's sign, the median ratio synthetic / true and the share of regions
    within +-25 % of the truth (the regions :func:`slope_ratios` counts, in all four)."""
    ratios = slope_ratios(synthetic, truth)
    ok = np.isfinite(ratios)
    if ok.sum() < 3:
        return dict.fromkeys(("pearson_r", "sign_agreement", "median_ratio", "within_25_percent"), float("nan"))
    synthetic, truth, ratio = np.asarray(synthetic)[ok], np.asarray(truth)[ok], ratios[ok]
    return {
        "pearson_r": float(np.corrcoef(truth, synthetic)[0, 1]) if np.ptp(synthetic) > 0 else float("nan"),
        "sign_agreement": float(np.mean(np.sign(synthetic) == np.sign(truth))),
        "median_ratio": float(np.median(ratio)), "within_25_percent": float(np.mean(np.abs(ratio - 1) <= SLOPE_TOLERANCE)),
    }  # fmt: skip


#: The training-set sizes, as multiples of the one resampled, that :func:`slope_resampling`
#: projects the age target to.
PROJECTED_SCALES = (1, 2, 4, 10, 30, 100)
#: The most training subjects (as a multiple) :func:`slope_resampling` looks for even odds at.
MAX_PROJECTED_SCALE = 2**13


def slope_resampling(replicates: np.ndarray, estimate: np.ndarray, truth: np.ndarray,
                     tolerance: float = SLOPE_TOLERANCE, scales: Sequence[float] = PROJECTED_SCALES) -> dict[str, Any]:  # fmt: skip
    """How much of the regional age slopes' miss the training sample explains.

    ``replicates`` (B, regions) are the slopes of fits on B bootstrap resamples of the training
    subjects, ``estimate`` the fit on the subjects themselves, ``truth`` the swept truth's. Per
    region :func:`slope_ratios` counts: the bootstrap SE of the slope, z = (estimate - truth) / SE
    and the share of the replicates within +-``tolerance``. Over the regions: the replicates'
    count within (mean and 5 / 50 / 95 % quantiles), the share with every region within, and
    the misses' squared Mahalanobis distance under the replicates' covariance (the regions share
    much of their noise; the independent SEs with fewer replicates than regions + 3) against
    chi-square on the regions' count: ``chi2_p`` near 0 says the misses are larger than the
    sample's noise (a bias of the fit), a larger one that noise explains them. Then, were the
    miss the sample's noise alone (an unbiased fit whose SE falls as 1 / sqrt(k) with k times
    the training subjects), the expected count within and the chance that every region is, for
    each k in ``scales``; ``subjects_for_all_within`` is the smallest k (in quarter powers of
    two, up to :data:`MAX_PROJECTED_SCALE`) at which that chance reaches one half, None beyond."""
    from scipy.stats import chi2, norm

    replicates, estimate, truth = (np.asarray(a, float) for a in (replicates, estimate, truth))
    counted = np.isfinite(slope_ratios(estimate, truth))
    se = replicates.std(axis=0, ddof=1)
    z = np.divide(estimate - truth, se, out=np.full(truth.shape, np.nan), where=counted & (se > 0))
    within = np.abs(slope_ratios(replicates, np.broadcast_to(truth, replicates.shape)) - 1) <= tolerance
    count = within[:, counted].sum(axis=1)
    n = int(counted.sum())
    margin = tolerance * np.abs(truth[counted]) / se[counted]  # the tolerance in SEs

    def projected(k: float) -> tuple[float, float]:
        chance = 2 * norm.cdf(margin * np.sqrt(k)) - 1
        return float(chance.sum()), float(np.prod(chance))

    steps = 2.0 ** (np.arange(0, 4 * np.log2(MAX_PROJECTED_SCALE) + 1) / 4)
    enough = next((float(k) for k in steps if projected(k)[1] >= 0.5), None)
    miss, b = (estimate - truth)[counted], len(replicates)
    if b > n + 2:
        # The inverse of a sample covariance overshoots the precision by (b - 1) / (b - n - 2)
        # (inverse Wishart; Hartlap et al. 2007): 1.48 for 100 replicates of 30 regions.
        precision = np.linalg.pinv(np.cov(replicates[:, counted], rowvar=False)) * (b - n - 2) / (b - 1)
    else:  # too few replicates for the covariance: the regions taken as independent
        precision = np.diag(1 / se[counted] ** 2)
    chi_square = float(miss @ precision @ miss)
    return {
        "replicates": b, "regions_counted": n,
        "se_per_decade": se.tolist(), "z": z.tolist(), "share_within": within.mean(axis=0).tolist(),
        "count_within": {"mean": float(count.mean()), **{f"q{q}": float(np.quantile(count, q / 100)) for q in (5, 50, 95)}},
        "share_all_within": float(np.mean(count == n)),
        "chi2": chi_square, "chi2_p": float(chi2.sf(chi_square, n)),
        "projected": [{"subjects_times": float(k), "expected_within": projected(k)[0], "all_within": projected(k)[1]}
                      for k in scales],
        "subjects_for_all_within": enough,
    }  # fmt: skip


def swept_slope_agreement(synthetic: np.ndarray, sweep: np.ndarray, ages: Sequence[float]) -> dict[str, Any]:
    """:func:`slope_agreement` of ``synthetic`` regional slopes (relative, per decade) against
    those of a swept truth (:func:`swept_truth`'s (scans, ages, regions), averaged over scans),
    with the true slopes (``true_per_decade``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # regions outside every mask: NaN
        measured = np.nanmean(regional_slopes(sweep, ages)[1], axis=0)
    return {**slope_agreement(synthetic, measured), "true_per_decade": measured.tolist()}


def _cached_array(cache: Path | None, key: str, compute: Any) -> np.ndarray:
    """``compute()``, stored once in ``cache`` under a hash of ``key`` (None: not stored)."""
    import hashlib

    path = None if cache is None else Path(cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path is not None and path.is_file():
        return np.load(path)
    out = compute()
    if path is not None:
        from dualglow_app.io import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, out)
    return out


def swept_truth(origin: tuple[int, ...], indices: Sequence[int | tuple[int, int]], grid: Any, masks: np.ndarray,
                ages: Sequence[float], cache: Path | None = None) -> np.ndarray:  # fmt: skip
    """(scans, ages, phantom regions): each phantom subject's true PET at each age with its own
    anatomy (:func:`dualglow_app.phantom.mni.age_sweep_truth`: only the metabolism ages), as
    regional means over the scan's mask; what a model's age sweep of that MRI should give.
    ``origin``: the cohort's (seed, version) or (seed, version, sessions per subject);
    ``indices``: each scan's phantom subject index (``sub-001`` is 0), or (index, session from
    0) of a longitudinal cohort; ``masks``: (scans, *grid.shape). Cached in ``cache`` by all of
    these."""
    import hashlib

    from dualglow_app.evaluate.atlases import phantom_regions
    from dualglow_app.log import progress
    from dualglow_app.phantom.mni import age_sweep_truth
    from dualglow_app.regions import regional_mean_matrix

    seed, version, sessions = (*origin, 1)[:3]
    scans = [(int(i[0]), int(i[1])) if isinstance(i, tuple | list) else (int(i), 0) for i in indices]
    masks = np.asarray(masks)
    rows = "_".join(str(i) if k == 0 else f"{i}s{k}" for i, k in scans)
    key = (f"seed{seed}-v{version}{f'-sessions{sessions}' if sessions > 1 else ''}-rows{rows}"
           f"-ages{'_'.join(f'{a:g}' for a in ages)}"
           f"-mask{hashlib.sha256(np.packbits(masks.reshape(len(masks), -1) > 0).tobytes()).hexdigest()[:8]}")

    def compute() -> np.ndarray:
        labels, names = phantom_regions(grid)
        regions = list(range(1, len(names) + 1))
        return np.stack([
            regional_mean_matrix(age_sweep_truth(seed, index, grid, tuple(ages), version, sessions, session), labels,
                                 regions, masks=mask)
            for (index, session), mask in progress(zip(scans, masks, strict=True), "swept truth", total=len(masks))
        ])  # fmt: skip

    return _cached_array(cache, key, compute)


def explainable_truth(origin: tuple[int, int], indices: Sequence[int], grid: Any,
                      cache: Path | None = None) -> np.ndarray:  # fmt: skip
    """(scans, *grid.shape): each phantom subject's explainable PET on ``grid`` in SUVR (its PET
    without the factors its MRI cannot show, noise-free: :func:`dualglow_app.phantom.mni.simulate_subject`),
    the ceiling of anything computed from the MRI. ``origin``: the cohort's (seed, version);
    ``indices``: each scan's phantom subject index. Cached in ``cache`` by these and the grid."""
    import hashlib

    from dualglow_app.log import progress
    from dualglow_app.phantom.mni import simulate_subject

    seed, version = origin
    grid_id = hashlib.sha256(np.asarray(grid.affine, np.float64).tobytes() + str(grid.shape).encode()).hexdigest()[:8]
    key = f"explainable-seed{seed}-v{version}-rows{'_'.join(map(str, indices))}-grid{grid_id}"
    return _cached_array(cache, key, lambda: np.stack([
        simulate_subject(seed, int(index), grid, version).explainable
        for index in progress(indices, "explainable truth", total=len(indices))
    ]).astype(np.float32))  # fmt: skip


def explainable_scores(explainable: np.ndarray, true_pet: np.ndarray, masks: np.ndarray,
                       references: Sequence[np.ndarray],
                       held_out: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, Any]:  # fmt: skip
    """Each method's held-out predictions scored against the explainable truth instead of the
    measured PET: the deviation r (against fold k's mean training PET, ``references[k]``) and
    the MAE, mean over scans. ``held_out[method]`` lists per fold (test rows, predictions);
    ``explainable``, ``true_pet`` and ``masks`` are indexed by row. For scale, the measured PET
    is scored too (how far the MRI-invisible factors and the noise take it from its
    explainable part), and the explainable PETs' input specificity is given:
    the lowest a synthesis that is exactly right about everything the MRI shows can reach
    (the true PETs' is lower by the MRI-invisible factors and the noise)."""
    from dualglow_app.metrics import deviation_correlation, mean_pairwise_correlation

    def scores(folds: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        dev, mae = [], []
        for fold, (rows, predictions) in enumerate(folds):
            for row, pred in zip(rows, predictions, strict=True):
                inside = np.asarray(masks[row]) > 0
                dev.append(deviation_correlation(pred, explainable[row], references[fold], inside))
                mae.append(float(np.abs(np.asarray(pred, np.float64) - explainable[row])[inside].mean()))
        return {"deviation_r": float(np.nanmean(dev)), "mae_suvr": float(np.mean(mae)), "n": len(dev)}

    folds = next(iter(held_out.values()))  # every method has the same held-out rows
    order = np.concatenate([rows for rows, _ in folds])
    methods = {"true PET": scores([(rows, true_pet[rows]) for rows, _ in folds]),
               **{method: scores(method_folds) for method, method_folds in held_out.items()}}  # fmt: skip
    return {"methods": methods,
            "input_specificity": {"explainable PET": mean_pairwise_correlation(explainable[order], masks[order])}}


def phantom_calibrated_slopes(names: Sequence[str]) -> np.ndarray:
    """The phantom's true relative SUVR change per decade by region, from its calibration
    (:func:`dualglow_app.phantom.pet.calibrate`'s age slopes minus the cerebellar reference's):
    what :func:`phantom_true_slopes` fits from a BIDS cohort's factor tables, for data that has
    none (the MNI fast path)."""
    from dualglow_app.phantom.pet import calibrate

    cal = calibrate(2.0)
    activity = -np.array([cal.age_slope[cal.names.index(n)] for n in names])
    return activity - activity[list(names).index(PHANTOM_REFERENCE_REGION)]


def age_trends(
    sweeps: dict[str, np.ndarray], names: dict[str, list[str]], ages: Sequence[float], truth: dict[str, Any] | None,
) -> dict[str, Any]:
    """Regional means vs age (mean, 95 % CI), per-region slopes, and the comparison with the truth."""
    out: dict[str, Any] = {"ages": list(ages), "reference_age": REFERENCE_AGE, "atlases": {}}
    for atlas, sweep in sweeps.items():
        with warnings.catch_warnings():
            # Regions that no scan's mask reaches (coarse grids) are all-NaN: NaN is the answer.
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, low, high = _ci95(sweep, axis=0)  # (ages, regions)
            absolute, relative = regional_slopes(sweep, ages)
            s_mean, s_low, s_high = _ci95(relative, axis=0)
            absolute_mean = np.nanmean(absolute, axis=0)
        out["atlases"][atlas] = {
            "regions": names[atlas], "n_scans": int(sweep.shape[0]),
            "mean": mean.T.tolist(), "ci_low": low.T.tolist(), "ci_high": high.T.tolist(),
            "slope_suvr_per_decade": absolute_mean.tolist(),
            "relative_slope_per_decade": s_mean.tolist(), "relative_slope_ci": [s_low.tolist(), s_high.tolist()],
        }  # fmt: skip
    if truth is not None and "phantom" in out["atlases"]:
        synthetic = np.array(out["atlases"]["phantom"]["relative_slope_per_decade"])
        true = np.array(truth["suvr_per_decade"])
        ok = np.isfinite(synthetic) & np.isfinite(true)
        r = float(np.corrcoef(true[ok], synthetic[ok])[0, 1]) if ok.sum() > 2 and np.ptp(synthetic[ok]) > 0 else float("nan")
        direction = np.where(np.isfinite(synthetic), np.sign(synthetic), np.nan)
        out["phantom_comparison"] = {
            **truth,
            "synthetic_relative_per_decade": synthetic.tolist(),
            # The sweep's direction per region (-1 falls with age, +1 rises) and whether it is the truth's.
            "synthetic_direction": direction.tolist(),
            "direction_agrees": (np.sign(synthetic) == np.sign(true)).tolist(),
            "pearson_r": r,
            "mae_per_decade": float(np.mean(np.abs(true[ok] - synthetic[ok]))) if ok.any() else float("nan"),
            "sign_agreement": float(np.mean(np.sign(true[ok]) == np.sign(synthetic[ok]))) if ok.any() else float("nan"),
            "mean_true": float(np.mean(true[ok])) if ok.any() else float("nan"),
            "mean_synthetic": float(np.mean(synthetic[ok])) if ok.any() else float("nan"),
        }  # fmt: skip
    return out


__all__ = [
    "age_trends", "classification", "explainable_scores", "explainable_truth", "impairment_classes", "paired_tests",
    "phantom_calibrated_slopes", "phantom_true_slopes", "regional_slopes", "slope_agreement", "slope_resampling",
    "subject_level", "summarise", "swept_slope_agreement", "swept_truth",
]  # fmt: skip
