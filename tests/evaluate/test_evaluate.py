"""Evaluation: splits, regions and statistics on known cases, the whole run on tiny arrays, resume, CLI, BIDS."""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synthetic_pairs import paired_volumes

from dualglow_app.cli.evaluate import main
from dualglow_app.evaluate import (
    DUALGLOW,
    FIGURE7_AAL,
    Cohort,
    EvaluateOptions,
    EvaluationError,
    aal_regions,
    age_trends,
    classification,
    evaluate_cohort,
    make_splits,
    paired_tests,
    phantom_true_slopes,
    regional_slopes,
)
from dualglow_app.evaluate.atlases import RegionMap
from dualglow_app.evaluate.report import markdown_tables
from dualglow_app.grid import preset
from dualglow_app.metrics import METRICS

DIAGNOSES = ["CN", "AD", "MCI", "CN", "EMCI", "LMCI"]


def tiny_options(tmp_path: Path, **overrides: object) -> EvaluateOptions:
    settings: dict[str, object] = dict(
        bids_dir=None, output_dir=tmp_path / "out", work_dir=tmp_path / "work", folds=2, epochs=1,
        side_info=("age",), depth=2, hidden=8, relation_hidden=8, warmup_steps=2, baseline_width=4,
        nprocs=1, device="cpu", ages=(50.0, 75.0, 100.0),
    )  # fmt: skip
    settings.update(overrides)
    return EvaluateOptions(**settings)  # type: ignore[arg-type]


def test_splits_keep_subjects_together_and_cover_everyone() -> None:
    subjects = ["a", "a", "b", "c", "c", "d", "e", "f"]
    splits = make_splits(subjects, 3, seed=1, strata=[0, 0, 1, 0, 0, 1, 1, 0])
    tested = np.concatenate([test for _, test in splits])
    assert sorted(tested) == list(range(len(subjects)))
    for train, test in splits:
        assert not {subjects[i] for i in train} & {subjects[i] for i in test}
    assert [t.tolist() for _, t in make_splits(subjects, 3, seed=1)] == [t.tolist() for _, t in make_splits(subjects, 3, seed=1)]
    with pytest.raises(EvaluationError, match="lower --folds"):
        make_splits(["a", "b"], 3, seed=0)


def test_regional_means_and_slopes_on_known_volumes() -> None:
    labels = np.zeros((4, 4, 4), np.int32)
    labels[:2], labels[2:] = 1, 2
    volume = np.where(labels == 1, 1.0, 3.0)[None]
    mask = np.ones((1, 4, 4, 4))
    mask[0, 3] = 0  # half of region 2 outside the brain: still its mean, from what is inside
    regions = RegionMap(labels, [1, 2, 3], ["a", "b", "empty"])
    np.testing.assert_allclose(regions.means(volume, mask), [[1.0, 3.0, np.nan]])
    ages = [50.0, 60.0, 70.0, 80.0]
    # A region losing 0.1 SUVR per decade from 2.0 at 73.
    sweep = np.array([2.0 - 0.01 * (a - 73.0) for a in ages])[None, :, None]
    absolute, relative = regional_slopes(sweep, ages)
    assert absolute[0, 0] == pytest.approx(-0.1)
    assert relative[0, 0] == pytest.approx(-0.05)


def test_figure7_regions_are_aal2_regions_on_the_cpu_grid() -> None:
    aal2 = aal_regions(preset("cpu4mm"))
    assert set(FIGURE7_AAL) <= set(aal2.names)
    assert len(aal2.names) == len(aal2.regions) > 100 and set(np.unique(aal2.labels)) - {0} == set(aal2.regions)


def test_cohort_takes_the_diagnoses_of_its_data() -> None:
    data = paired_volumes(4)
    data.diagnosis = ["CN", "AD", None, "MCI"]
    assert Cohort(data).diagnosis == ["CN", "AD", None, "MCI"]
    assert Cohort(data, ["AD", "AD", "CN", "CN"]).diagnosis == ["AD", "AD", "CN", "CN"]
    with pytest.raises(ValueError, match="3 diagnoses for 4 scans"):
        Cohort(data, ["CN", "AD", "CN"])


def test_paired_tests_say_when_a_baseline_wins() -> None:
    rows = []
    for i in range(8):
        rows.append({"label": f"s{i}", "method": DUALGLOW, "mae_suvr": 0.2 + 0.01 * i, "pearson_r": 0.9,
                     "psnr_db": 20.0 + i, "ssim": 0.8, "deviation_r": 0.3 + 0.01 * i})  # fmt: skip
        rows.append({"label": f"s{i}", "method": "unet", "mae_suvr": 0.1 + 0.005 * i, "pearson_r": 0.9,
                     "psnr_db": 19.0 + i, "ssim": 0.8, "deviation_r": 0.5 + 0.02 * i})  # fmt: skip
    tests = paired_tests(rows, [DUALGLOW, "unet"])["unet"]
    assert tests["mae_suvr"]["better"] == "unet" and tests["mae_suvr"]["p_value"] < 0.05
    assert tests["psnr_db"]["better"] == DUALGLOW
    assert tests["ssim"]["better"] == "tie" and np.isnan(tests["ssim"]["p_value"])
    assert tests["deviation_r"]["better"] == "unet"


def test_classification_on_separable_and_on_missing_diagnoses() -> None:
    rng = np.random.default_rng(0)
    diagnosis = ["CN", "AD"] * 10
    y = np.array([d == "AD" for d in diagnosis], float)
    separable = rng.normal(0, 0.1, (20, 5)) + y[:, None]
    noise = rng.normal(0, 1.0, (20, 5))
    splits = make_splits([str(i) for i in range(20)], 4, seed=0, strata=y.astype(int).tolist())
    table = classification({"true PET": [separable] * 4, "synthetic PET (x)": [noise] * 4}, diagnosis, splits, 0)
    assert table["sources"]["true PET"] == pytest.approx(
        {"accuracy": 1.0, "fnr": 0.0, "fpr": 0.0, "n": 20, "tp": 10, "tn": 10, "fp": 0, "fn": 0}
    )
    assert table["sources"]["synthetic PET (x)"]["accuracy"] < 1.0
    skipped = classification({"true PET": [separable] * 4}, [None] * 20, splits, 0)
    assert "skipped" in skipped


def write_phantom_truth(root: Path, ages: list[float], slopes: dict[str, float]) -> None:
    """factors.tsv + json like dualglow-phantom's, with age_factor = 1 - s (age - 73) / 10."""
    for i, age in enumerate(ages):
        folder = root / "derivatives" / "phantom" / f"sub-{i:03d}"
        folder.mkdir(parents=True)
        lines = ["region\tage_factor"] + [f"{r}\t{1 - s * (age - 73) / 10:.6f}" for r, s in slopes.items()]
        (folder / f"sub-{i:03d}_desc-regions_factors.tsv").write_text("\n".join(lines) + "\n")
        (folder / f"sub-{i:03d}_desc-regions_factors.json").write_text(json.dumps({"Age": age}))


def test_phantom_slopes_are_recovered_and_compared(tmp_path: Path) -> None:
    slopes = {"precuneus": 0.06, "insula": 0.12, "cerebellar_cortex": 0.04}
    write_phantom_truth(tmp_path, [60.0, 70.0, 85.0], slopes)
    names = list(slopes)
    truth = phantom_true_slopes(tmp_path, names)
    assert truth is not None
    np.testing.assert_allclose(truth["activity_per_decade"], [-0.06, -0.12, -0.04], atol=1e-5)
    np.testing.assert_allclose(truth["suvr_per_decade"], [-0.02, -0.08, 0.0], atol=1e-5)
    # A synthetic sweep whose relative slopes equal the true SUVR slopes compares perfectly.
    ages = [50.0, 70.0, 90.0]
    rel = np.array(truth["suvr_per_decade"])
    sweep = np.array([[1.5 * (1 + rel * (a - 73) / 10) for a in ages]] * 2)
    trends = age_trends({"phantom": sweep}, {"phantom": names}, ages, truth)
    comparison = trends["phantom_comparison"]
    assert comparison["pearson_r"] == pytest.approx(1.0)
    assert comparison["mae_per_decade"] == pytest.approx(0.0, abs=1e-6)
    assert trends["atlases"]["phantom"]["n_scans"] == 2


def test_slope_agreement_scores_the_age_targets() -> None:
    from dualglow_app.evaluate.statistics import slope_agreement

    truth = np.array([-0.04, -0.02, -0.03, 0.01, -0.0005])  # the last is too flat to take a ratio of
    scores = slope_agreement(truth * np.array([1.0, 1.2, 0.5, -1.0, 9.0]), truth)
    assert scores["sign_agreement"] == pytest.approx(0.75) and scores["within_25_percent"] == pytest.approx(0.5)
    assert scores["median_ratio"] == pytest.approx(0.75)
    assert slope_agreement(truth, truth)["pearson_r"] == pytest.approx(1.0)
    assert np.isnan(slope_agreement(truth[:2], truth[:2])["pearson_r"])  # fewer than 3 regions: no verdict


def test_slope_resampling_tells_a_sample_noise_miss_from_a_bias_and_projects_the_subjects_needed() -> None:
    from dualglow_app.evaluate.statistics import slope_resampling

    rng = np.random.default_rng(0)
    truth = np.array([-0.04, -0.02, -0.01, 0.01, -0.0005])  # the last is too flat to count
    se = np.array([0.002, 0.002, 0.004, 0.002, 0.002])
    replicates = truth + se * rng.standard_normal((400, 5))
    noisy = slope_resampling(replicates, truth + se * np.array([0.5, -1.0, 1.0, 0.3, 0.0]), truth)
    assert noisy["regions_counted"] == 4 and noisy["replicates"] == 400
    np.testing.assert_allclose(noisy["se_per_decade"], se, rtol=0.1)
    assert noisy["chi2_p"] > 0.2  # misses of about one SE: the sample's noise
    # -0.01 +- 0.004: within +-25 % only while the draw stays within 0.625 SE, about half the time.
    assert 0.4 < noisy["share_within"][2] < 0.55 and noisy["share_within"][0] > 0.99
    assert noisy["share_all_within"] < 0.6 and noisy["count_within"]["q95"] <= 4
    # Projected: more subjects narrow every slope; the weakest region sets when all fall within.
    chances = [p["all_within"] for p in noisy["projected"]]
    assert chances == sorted(chances) and chances[-1] > 0.99
    k = noisy["subjects_for_all_within"]
    # The two narrowest margins (0.625 and 1.25 SE) reach even odds together at k = 1.6.
    assert k is not None and 1.3 < k < 2.0
    biased = slope_resampling(replicates, truth * 1.5, truth)
    assert biased["chi2_p"] < 1e-6  # misses of 5-10 SEs: not the sample's noise


def test_swept_truth_falls_with_age_and_is_cached(tmp_path: Path) -> None:
    """Two phantom subjects' true PETs at 50 and 90 with their own anatomy: the phantom's FDG
    falls with age in most regions (the cerebellar SUVR reference ages less), and a second call
    reads the cache."""
    from dualglow_app.evaluate.atlases import phantom_regions
    from dualglow_app.evaluate.statistics import swept_truth
    from dualglow_app.templates import brain_mask_on_grid

    grid = preset("tiny8mm")
    masks = np.stack([np.asarray(brain_mask_on_grid(grid))] * 2)
    sweep = swept_truth((0, 2), [0, 1], grid, masks, (50.0, 90.0), cache=tmp_path)
    assert sweep.shape == (2, 2, len(phantom_regions(grid)[1]))
    change = sweep[:, 1] - sweep[:, 0]
    assert np.nanmean(change < 0) > 0.5
    assert len(list(tmp_path.glob("*.npy"))) == 1
    np.testing.assert_array_equal(swept_truth((0, 2), [0, 1], grid, masks, (50.0, 90.0), cache=tmp_path), sweep)
    # A longitudinal cohort's scans are (subject, session): the follow-up's brain, its own cache entry.
    sessions = swept_truth((0, 2, 2), [(0, 0), (0, 1)], grid, masks, (50.0, 90.0), cache=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert not np.array_equal(sessions[0], sessions[1]) and not np.array_equal(sessions[0], sweep[0])
    np.testing.assert_allclose(sessions[1], sessions[0], rtol=0.05)


def test_explainable_truth_is_the_phantoms_and_is_cached(tmp_path: Path) -> None:
    """Each phantom subject's explainable PET on the grid, as the fast path makes it; a second
    call reads the cache."""
    from dualglow_app.evaluate.statistics import explainable_truth
    from dualglow_app.phantom.mni import simulate_subject

    grid = preset("tiny8mm")
    truth = explainable_truth((0, 2), [3, 1], grid, cache=tmp_path)
    assert truth.shape == (2, *grid.shape) and truth.dtype == np.float32
    np.testing.assert_allclose(truth[0], simulate_subject(0, 3, grid, 2).explainable, rtol=1e-6)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    np.testing.assert_array_equal(explainable_truth((0, 2), [3, 1], grid, cache=tmp_path), truth)


def test_explainable_scores_rank_a_method_by_what_the_mri_shows() -> None:
    """A method that predicts the explainable PET scores deviation r 1 and MAE 0 against it, the
    mean PET 0; the measured PET (explainable + invisible factors) in between; the explainable
    PETs' pairwise r is reported for the input specificity."""
    from dualglow_app.evaluate.statistics import explainable_scores

    rng = np.random.default_rng(0)
    mean = 1.0 + rng.random((6, 6, 6))
    explainable = mean + 0.2 * rng.standard_normal((4, 6, 6, 6))
    measured = explainable + 0.2 * rng.standard_normal((4, 6, 6, 6))
    masks = np.ones((4, 6, 6, 6), bool)
    folds = [np.array([0, 1]), np.array([2, 3])]
    held_out = {"oracle": [(rows, explainable[rows]) for rows in folds],
                "meanpet": [(rows, np.stack([mean] * 2)) for rows in folds]}  # fmt: skip
    scores = explainable_scores(explainable, measured, masks, [mean, mean], held_out)
    methods = scores["methods"]
    assert methods["oracle"]["deviation_r"] == pytest.approx(1.0) and methods["oracle"]["mae_suvr"] == pytest.approx(0.0)
    assert methods["meanpet"]["deviation_r"] == 0.0 and methods["meanpet"]["n"] == 4
    assert 0.4 < methods["true PET"]["deviation_r"] < 0.9
    assert -1 < scores["input_specificity"]["explainable PET"] < 1


def test_subject_level_rows_show_the_explainable_truth_when_there_is_one() -> None:
    """The true PET's row gains its deviation r against the explainable PET, a row for the
    explainable PET's own input specificity follows, each method's column is filled."""
    from dualglow_app.evaluate.report import SUBJECT_LEVEL_COLUMNS, subject_level_rows

    table1 = {"unet": {"deviation_r": {"mean": 0.7}}}
    subject = {"input_specificity": {"true PET": 0.68, "unet": 0.78}, "regional_agreement": {}}
    plain = subject_level_rows(table1, subject, ["unet"])
    assert [r[0] for r in plain] == ["true PET", "unet"] and np.isnan(plain[1][2])
    subject["explainable_truth"] = {"methods": {"true PET": {"deviation_r": 0.87}, "unet": {"deviation_r": 0.71}},
                                    "input_specificity": {"explainable PET": 0.71}}  # fmt: skip
    rows = subject_level_rows(table1, subject, ["unet"])
    assert all(len(r) == len(SUBJECT_LEVEL_COLUMNS) for r in rows)
    assert rows[0][2] == 0.87 and rows[1][:4] == ["explainable PET (phantom truth)", 0.87, rows[1][2], 0.71]
    assert rows[2][:4] == ["unet", 0.7, 0.71, 0.78]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[EvaluateOptions, Cohort, object, float]:
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("evaluate")
    cohort = Cohort(paired_volumes(6), DIAGNOSES)
    options = tiny_options(tmp)
    start = time.perf_counter()
    result = evaluate_cohort(cohort, options)
    return options, cohort, result, time.perf_counter() - start


def test_small_run_writes_every_output(tiny_run: tuple) -> None:
    options, cohort, result, _ = tiny_run
    methods = [DUALGLOW, "unet", "pix2pix", "cgan", "cvae", "meanpet"]
    with open(options.output_dir / "metrics.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == 6 * len(methods)
    assert {r["method"] for r in rows} == set(methods)
    # Every scan is held out exactly once, and scored for every method in that fold.
    for method in methods:
        assert sorted(r["label"] for r in rows if r["method"] == method) == sorted(cohort.data.labels)
    assert all(np.isfinite(float(r[m])) for r in rows for m in ("mae_suvr", "psnr_db", "ssim"))
    summary = json.loads((options.output_dir / "summary.json").read_text())
    assert summary["seeds"]["per_fold"][DUALGLOW] == [0, 1]
    assert sorted(label for s in summary["splits"] for label in s["test"]) == sorted(cohort.data.labels)
    assert "7-voxel" in summary["definitions"]["ssim"] and "3.0 SUVR" in summary["definitions"]["psnr"]
    assert set(summary["table1"]) == set(methods) and set(summary["table1"][DUALGLOW]) == set(METRICS)
    assert set(summary["wilcoxon"]) == set(methods) - {DUALGLOW}
    assert summary["table2"]["sources"]["true PET"]["n"] == 6
    assert set(summary["table2"]["sources"]) == {"true PET", "MRI (T1w regional means) + age", "age alone",
                                                 *[f"synthetic PET ({m})" for m in methods]}  # fmt: skip
    # Subject-level metrics: the mean PET does not depart from itself (deviation r 0 exactly).
    assert all(float(r["deviation_r"]) == 0.0 for r in rows if r["method"] == "meanpet")
    specificity = summary["subject_level"]["input_specificity"]
    assert set(specificity) == {"true PET", *methods} and specificity["meanpet"] > specificity["true PET"]
    assert set(summary["subject_level"]["regional_agreement"]) == set(methods)
    assert "explainable_truth" not in summary["subject_level"]  # not a phantom: no explainable truth
    # Every method trained on the fold's inner split within the same budget (1 epoch here) and
    # recorded its validation curve (the mean PET needs no training).
    assert summary["budget"]["patience"] == 10 and summary["budget"]["inner_val_fraction"] == 0.2
    for method in methods:
        for fold in summary["training"][method]:
            assert fold["epochs_run"] == (0 if method == "meanpet" else 1)
            assert len(fold["val_mae_curve"]) == fold["epochs_run"] and fold["seconds"] >= 0
    trends = summary["age_trends"]["atlases"]["aal"]
    aal2 = aal_regions(cohort.data.grid)
    assert trends["regions"] == aal2.names and len(trends["mean"]) == len(aal2.names) and len(trends["mean"][0]) == 3
    assert "AAL2" in summary["definitions"]["classification"] and "AAL-116" not in json.dumps(summary)
    tables = (options.output_dir / "tables.md").read_text()
    assert "### Table 1" in tables and "| meanpet |" in tables and "### Table 2" in tables
    assert "Does the synthesis follow the subject?" in tables and "deviation r" in tables
    assert "### Training (per method, over folds)" in tables and "early stopping after 10 epochs" in tables
    assert "(DUAL-GLOW: its validation MAE too)" in tables  # the default rule, the baselines' own
    assert "The baselines read the T1w alone" in tables
    assert "Age trends vs the phantom" not in tables  # not a phantom cohort: no truth to compare with
    html = (options.output_dir / "evaluation.html").read_text()
    for text in ("Table 1", "Table 2", "Wilcoxon", "Fig. 4", "Fig. 7", "follow the subject", "input specificity",
                 "Training: epochs, early stopping", "early stopping watched", "DUAL-GLOW: its validation MAE too"):
        assert text in html


def test_rerun_resumes_from_the_work_dir(tiny_run: tuple) -> None:
    options, cohort, result, first_seconds = tiny_run
    start = time.perf_counter()
    again = evaluate_cohort(cohort, options)
    assert time.perf_counter() - start < first_seconds
    assert [r["mae_suvr"] for r in again.rows] == [r["mae_suvr"] for r in result.rows]  # type: ignore[attr-defined]


def test_changing_dualglow_settings_retrains_dualglow_only(tiny_run: tuple) -> None:
    options, cohort, result, _ = tiny_run
    deeper = dataclasses.replace(options, depth=options.depth + 1, report=False)
    again = evaluate_cohort(cohort, deeper)
    for method in deeper.baselines:
        assert [r["mae_suvr"] for r in again.rows if r["method"] == method] == \
            [r["mae_suvr"] for r in result.rows if r["method"] == method]  # fmt: skip
    folds = sorted(Path(again.summary["run_cache"]).glob("fold*/dualglow-*.npz"))  # type: ignore[attr-defined]
    assert len(folds) == 2 * options.folds  # one result per fold for each DUAL-GLOW setting


def test_the_side_information_settings_key_dualglow_only(tmp_path: Path) -> None:
    from dualglow_app.evaluate.crossval import _method_key

    base = tiny_options(tmp_path)
    for change in ({"side_levels": "top"}, {"side_template_mri_fwhm": (0.0,)}, {"side_template_fixed": ()},
                   {"side_template_anatomy": "t1w"}, {"dualglow_select_on": "bpd"},
                   {"dualglow_min_epochs": 1}, {"anatomy_template": False}):  # fmt: skip
        other = dataclasses.replace(base, **change)
        assert _method_key(DUALGLOW, other) != _method_key(DUALGLOW, base), change
        assert _method_key("unet", other) == _method_key("unet", base)
    # A setting added later, at the value it had before it existed, leaves the keys of what was
    # cached then: the same key as options that do not know the setting at all.
    later = {"side_template_anatomy": "t1w", "dualglow_select_on": "bpd", "dualglow_min_epochs": 0, "anatomy_template": False,
             "baseline_inputs": "t1w"}

    class Before(type(base)):  # type: ignore[misc]
        def to_dict(self) -> dict:
            return {k: v for k, v in super().to_dict().items() if k not in later}

    old = dataclasses.replace(base, **later)
    before = Before(**{f.name: getattr(old, f.name) for f in dataclasses.fields(old)})
    assert _method_key(DUALGLOW, before) == _method_key(DUALGLOW, old)
    assert _method_key("unet", before) == _method_key("unet", old)
    # What the baselines read keys the baselines only.
    with_maps = dataclasses.replace(base, baseline_inputs="t1w+tissue-maps")
    assert _method_key("unet", with_maps) != _method_key("unet", base)
    assert _method_key(DUALGLOW, with_maps) == _method_key(DUALGLOW, base)
    # ... and so does the reading of the maps they are given, but not of the maps they are not;
    # "native", the only reading before there was a choice, keeps the keys cached then.
    keys = {(inputs, reading): _method_key("unet", dataclasses.replace(
                base, baseline_inputs=inputs, side_template_anatomy="gm+csf", anatomy_reading=reading))
            for inputs in ("t1w", "t1w+tissue-maps") for reading in ("native", "native-fractions")}  # fmt: skip
    assert keys["t1w", "native"] == keys["t1w", "native-fractions"] == _method_key("unet", base)
    assert keys["t1w+tissue-maps", "native"] != keys["t1w+tissue-maps", "native-fractions"]
    assert keys["t1w+tissue-maps", "native-fractions"] == _method_key("unet", with_maps)  # the default reading
    with pytest.raises(ValueError, match="baseline_inputs='maps'"):
        dataclasses.replace(base, baseline_inputs="maps")
    with pytest.raises(ValueError, match="side_template_anatomy='csf'"):
        dataclasses.replace(base, side_template_anatomy="csf")
    with pytest.raises(ValueError, match="dualglow_select_on='ssim'"):
        dataclasses.replace(base, dualglow_select_on="ssim")
    with pytest.raises(ValueError, match="dualglow_min_epochs"):
        dataclasses.replace(base, dualglow_min_epochs=base.epochs + 1)


def test_baselines_can_read_the_tissue_maps_beside_the_t1w(tiny_run: tuple) -> None:
    """--baseline-inputs t1w+tissue-maps trains the baselines on the T1w and its tissue maps:
    another result under its own key, beside the T1w-only one (which it leaves alone), from
    networks that read the maps (a model trained on the T1w alone predicts otherwise)."""
    from dualglow_app.evaluate.crossval import baseline_inputs

    options, cohort, result, _ = tiny_run
    with_maps = dataclasses.replace(options, baselines=("unet",), baseline_inputs="t1w+tissue-maps", report=False)
    inputs = baseline_inputs(cohort.data, np.arange(2), with_maps.baseline_inputs)
    assert inputs.shape == (2, 3, *cohort.data.grid.shape)
    np.testing.assert_array_equal(inputs[:, 1:], cohort.data.tissue_maps[:2])
    again = evaluate_cohort(cohort, with_maps)
    mae = {r["label"]: r["mae_suvr"] for r in again.rows if r["method"] == "unet"}  # type: ignore[attr-defined]
    before = {r["label"]: r["mae_suvr"] for r in result.rows if r["method"] == "unet"}  # type: ignore[attr-defined]
    assert set(mae) == set(before) and all(np.isfinite(list(mae.values())))
    assert mae != before
    assert len(list(Path(again.summary["run_cache"]).glob("fold0/unet-*.npz"))) == 2  # type: ignore[attr-defined]
    assert again.summary["options"]["baseline_inputs"] == "t1w+tissue-maps"  # type: ignore[attr-defined]
    assert "native tissue maps" in markdown_tables(again.summary)  # type: ignore[attr-defined]
    without_maps = dataclasses.replace(cohort.data, tissue_maps=None)
    with pytest.raises(EvaluationError, match="hold no tissue maps"):
        baseline_inputs(without_maps, np.arange(2), with_maps.baseline_inputs)


def test_concurrent_evaluations_share_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A (fold, method) whose entry another process has locked is passed over, then collected:
    here the other process gives up (its lock goes), so this run computes that entry last."""
    import logging
    import threading

    from dualglow_app.evaluate import crossval
    from dualglow_app.io import entry_lock

    monkeypatch.setattr(crossval, "SHARED_WORK_POLL_S", 0.05)
    cohort = Cohort(paired_volumes(4), ["CN", "AD", "CN", "AD"])
    options = tiny_options(tmp_path, side_info=(), baselines=("meanpet",), report=False)
    run_dir = options.work_dir / "evaluate" / crossval._run_key(cohort, options)  # type: ignore[operator]
    busy = run_dir / "fold0" / f"meanpet-{crossval._method_key('meanpet', options)}.npz"
    held, release = threading.Event(), threading.Event()

    def other_evaluation() -> None:
        with entry_lock(busy):
            held.set()
            release.wait(60)

    other = threading.Thread(target=other_evaluation)
    other.start()
    held.wait(10)
    done: list[str] = []

    class ReleaseOnceDualglowIsDone(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            done.append(record.getMessage())
            if sum(" dualglow " in m for m in done) == 2:  # both folds of DUAL-GLOW, while meanpet fold 1 waited
                release.set()

    handler = ReleaseOnceDualglowIsDone()
    caplog.set_level(logging.INFO, logger="dualglow")
    logging.getLogger("dualglow").addHandler(handler)
    try:
        result = evaluate_cohort(cohort, options)
    finally:
        logging.getLogger("dualglow").removeHandler(handler)
        release.set()
        other.join()
    finished = [m for m in done if m.startswith("[")]
    assert any("waiting for meanpet fold 1" in m for m in done)
    assert len(finished) == 4 and "fold 1/2 meanpet  trained" in finished[-1]
    assert busy.is_file() and {r["method"] for r in result.rows} == {DUALGLOW, "meanpet"}


def test_an_evaluation_killed_inside_a_baseline_fit_resumes_that_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """The U-Net's fit checkpoints every epoch: an evaluation stopped in its second epoch resumes
    from the first, and the checkpoint goes once the fold's result is stored."""
    import logging

    from dualglow_app.baselines import UNetL1

    cohort = Cohort(paired_volumes(4), ["CN", "AD", "CN", "AD"])
    options = tiny_options(tmp_path, side_info=(), baselines=("unet",), epochs=2, report=False)
    real_step, steps = UNetL1._step, []

    def step_then_die(self: UNetL1, mri: object, pet: object) -> dict[str, float]:
        steps.append(1)
        if len(steps) > 1:  # one training scan per fold here: the second step is epoch 2's
            raise KeyboardInterrupt
        return real_step(self, mri, pet)  # type: ignore[arg-type]

    monkeypatch.setattr(UNetL1, "_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        evaluate_cohort(cohort, options)
    checkpoints = list((options.work_dir / "evaluate").rglob("fold0-checkpoint.pt"))  # type: ignore[operator]
    assert len(checkpoints) == 1
    monkeypatch.setattr(UNetL1, "_step", real_step)
    caplog.set_level(logging.INFO, logger="dualglow")
    evaluate_cohort(cohort, options)
    assert any("resuming from" in m and "after epoch 1" in m for m in caplog.messages)
    assert not checkpoints[0].exists()


def test_without_age_conditioning_there_are_no_age_trends(tmp_path: Path) -> None:
    cohort = Cohort(paired_volumes(4), ["CN", "AD", "CN", "AD"])
    result = evaluate_cohort(cohort, tiny_options(tmp_path, side_info=(), baselines=("unet",), report=False))
    assert result.age_trends is None
    assert {r["method"] for r in result.rows} == {DUALGLOW, "unet"}
    assert not (tmp_path / "out" / "evaluation.html").exists()


def test_cli_refuses_bad_arguments(tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    runner = CliRunner()
    same = runner.invoke(main, [str(bids), str(bids)])
    assert same.exit_code == 2 and "must differ" in same.output
    bad = runner.invoke(main, [str(bids), str(tmp_path / "out"), "--baselines", "unet,resnet"])
    assert bad.exit_code == 2 and "resnet" in bad.output
    folds = runner.invoke(main, [str(bids), str(tmp_path / "out"), "--folds", "1"])
    assert folds.exit_code == 2 and "folds=1" in folds.output
    inputs = runner.invoke(main, [str(bids), str(tmp_path / "out"), "--baseline-inputs", "t1w+pet"])
    assert inputs.exit_code == 2 and "t1w+tissue-maps" in inputs.output
    assert runner.invoke(main, ["--help"]).exit_code == 0


@pytest.mark.slow
def test_bids_front_end_on_a_phantom_cohort(tmp_path: Path) -> None:
    """Real preprocessing of 4 coarse phantoms, then the whole evaluation with its CLI."""
    from dualglow_app.phantom import make_cohort

    bids = tmp_path / "bids"
    make_cohort(bids, 4, seed=3, voxel_mm=2.0, jobs=1)
    out = tmp_path / "out"
    args = [str(bids), str(out), "-w", str(tmp_path / "work"), "--folds", "2", "--epochs", "1", "--grid", "tiny8mm",
            "--side-info", "age", "--baselines", "unet", "--depth", "2", "--hidden", "8", "--baseline-width", "4",
            "--skip-bids-validation", "--nprocs", "1", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "dualglow" in result.output and "unet" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cohort"]["phantom"] is True and summary["cohort"]["scans"] == 4
    comparison = summary["age_trends"]["phantom_comparison"]
    assert len(comparison["regions"]) == len(comparison["synthetic_relative_per_decade"]) == 30
    # The same subjects' true PETs swept over the same ages (seed 3, version 2): the age targets.
    swept = comparison["swept_truth"]
    assert swept["seed"] == 3 and len(swept["true_per_decade"]) == 30 and 0 <= swept["sign_agreement"] <= 1
    assert "swept over the same ages" in (out / "tables.md").read_text()
    # Every method scored against the phantoms' explainable PETs too; the measured PET departs
    # from its explainable part in the same direction.
    explainable = summary["subject_level"]["explainable_truth"]
    assert set(explainable["methods"]) == {"true PET", "dualglow", "unet"}
    assert explainable["methods"]["true PET"]["deviation_r"] > 0.3 and explainable["methods"]["unet"]["n"] == 4
    assert "| explainable PET (phantom truth) |" in (out / "tables.md").read_text()


def test_inner_split_is_dualglows_and_absent_without_early_stopping(tmp_path: Path) -> None:
    """Every method stops on the same inner validation subjects: those train() holds out."""
    from dualglow_app.dataset import split_subjects
    from dualglow_app.evaluate.crossval import _inner_split

    cohort = Cohort(paired_volumes(10), ["CN", "AD"] * 5)
    train_rows = np.array([0, 2, 3, 5, 6, 8, 9])
    inner, val = _inner_split(cohort, train_rows, fold=1, options=tiny_options(tmp_path))
    expected_inner, expected_val = split_subjects(cohort.data.subset(train_rows).subjects, 0.2, seed=1)
    assert val.tolist() == train_rows[expected_val].tolist() and inner.tolist() == train_rows[expected_inner].tolist()
    assert len(val) >= 1 and not set(val) & set(inner)
    none_inner, none_val = _inner_split(cohort, train_rows, 1, tiny_options(tmp_path, patience=None))
    assert none_val.size == 0 and none_inner.tolist() == train_rows.tolist()


def test_table2_withholds_the_diagnosis_it_predicts(tmp_path: Path) -> None:
    from dualglow_app.covariates import CovariateSpec
    from dualglow_app.evaluate.report import table2_covariates_sentence

    data = paired_volumes(6)
    data.covariates = {"diagnosis": list(DIAGNOSES), "mmse": [29.0, 22.0, 26.0, 30.0, 28.0, 25.0]}
    data.covariate_declarations = {"diagnosis": CovariateSpec("diagnosis", "categorical",
                                                              levels=("CN", "EMCI", "MCI", "LMCI", "AD")),
                                   "mmse": CovariateSpec("mmse", "continuous")}  # fmt: skip
    cohort = Cohort(data, DIAGNOSES)
    options = tiny_options(tmp_path, side_info=("age", "diagnosis", "mmse"), baselines=(), report=False, folds=2)
    result = evaluate_cohort(cohort, options)
    covariates = result.table2["dualglow_covariates"]
    assert covariates["withheld"] == ["diagnosis"] and covariates["fed"] == ["age", "mmse"]
    assert covariates["fed_following_impairment"]["mmse"] < -0.5  # MMSE follows the diagnosis: flagged
    assert "Withheld: diagnosis (each scan's synthetic PET averaged over every class" in table2_covariates_sentence(covariates)
    runs = sorted((tmp_path / "work" / "evaluate").rglob("dualglow-*.npz"))
    with np.load(runs[0]) as stored:
        assert "aal_table2" in stored.files and stored["aal_table2"].shape == stored["aal_all"].shape
        assert not np.allclose(stored["aal_table2"], stored["aal_all"])  # the diagnosis did move the PETs
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert "Withheld: diagnosis" in tables and "Caution: mmse (r = " in tables
    explicit = tiny_options(tmp_path / "b", side_info=("age", "diagnosis", "mmse"), baselines=(), report=False,
                            table2_withhold=("diagnosis", "mmse"))  # fmt: skip
    assert evaluate_cohort(cohort, explicit).table2["dualglow_covariates"]["withheld"] == ["diagnosis", "mmse"]
    with pytest.raises(ValueError, match="table2_withhold \\['sex'\\]: not among the covariates"):
        tiny_options(tmp_path, table2_withhold=("sex",))


def test_the_report_says_which_rule_stopped_dualglow() -> None:
    from dualglow_app.evaluate.report import dualglow_stopping_rule

    assert dualglow_stopping_rule({}) == "its validation bpd(PET | MRI)"  # a summary from before the setting
    assert dualglow_stopping_rule({"dualglow_select_on": "mae", "dualglow_min_epochs": 100}) == \
        "its validation MAE too, not before epoch 100"  # fmt: skip
