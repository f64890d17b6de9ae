"""The anatomy-reading benches: the voxelwise least squares recovers planted maps, and the
tissue agreement tells a reading of the subject from a reading of the population."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_tissue_measurement import agreement  # noqa: E402
from perfkit import voxelwise_least_squares as fit  # noqa: E402


def test_fit_recovers_each_voxels_coefficients() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 5, 3))
    x[..., 0] = 1.0
    coef = rng.standard_normal((5, 3))
    y = np.einsum("nvp,vp->nv", x, coef)
    np.testing.assert_allclose(fit(x, y), coef, atol=1e-10)


def test_a_reading_of_the_population_mean_follows_no_subject() -> None:
    rng = np.random.default_rng(1)
    common = rng.random((6, 6, 6))
    truth = common + 0.1 * rng.standard_normal((8, 6, 6, 6))
    mask = np.ones((6, 6, 6), np.uint8)
    exact = agreement(truth, truth, mask)
    assert exact["r"] > 0.999 and exact["departure_r"] > 0.999
    population = agreement(np.broadcast_to(common, truth.shape) + 0.01 * rng.standard_normal(truth.shape), truth, mask)
    assert population["r"] > 0.9 and abs(population["departure_r"]) < 0.2


def test_the_design_has_the_intercept_the_covariates_and_the_features_inside_the_brain_only() -> None:
    from bench_interaction import design_matrix as design

    rng = np.random.default_rng(2)
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    inside = mask.reshape(-1)
    features = rng.random((12, 3, 4, 4, 4))
    covariates = rng.standard_normal((12, 1))
    x = design(features, covariates, inside)
    assert x.shape == (12, 8, 5) and np.all(x[..., 0] == 1.0)
    assert np.array_equal(x[3, :, 1], np.full(8, covariates[3, 0]))
    assert np.array_equal(x[3, :, 2:], features[3].reshape(3, -1)[:, inside].T)
    coef = rng.standard_normal((8, 5))
    np.testing.assert_allclose(fit(x, np.einsum("nvp,vp->nv", x, coef)), coef, atol=1e-8)


def _collider_cohort(subjects: int = 200, seed: int = 3) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Two sessions a subject; PET = grey matter x uptake + age's own effect (-0.5 a decade),
    where the grey matter shrinks with age (at the subject's own rate) and with a constitution
    that also sets the uptake:
    the MRI is a collider of age and the constitution. Design: (1, age, grey matter)."""
    rng = np.random.default_rng(seed)
    rows_x, rows_y, names, diagnoses = [], [], [], []
    for s in range(subjects):
        constitution = rng.normal(0.0, 1.0, 2)  # two voxels
        first, rate = rng.uniform(-1.0, 1.0), rng.uniform(0.5, 1.5)
        for age in (first, first + rng.uniform(0.1, 0.2)):
            grey = 1.0 - 0.3 * rate * age + 0.3 * constitution
            pet = grey * (1.0 + 0.2 * constitution) - 0.5 * age
            rows_x.append(np.stack([np.ones(2), np.full(2, age), grey], axis=1))
            rows_y.append(pet)
            names.append(f"{s:03d}")
            diagnoses.append("CN" if s % 2 else "AD")
    return np.array(rows_x), np.array(rows_y), names, diagnoses


def test_the_within_subject_age_map_is_age_s_own_effect_where_the_cross_sectional_one_is_not() -> None:
    """Holding the grey matter fixed, an older brain of the same grey matter is a thicker
    constitution with more uptake: the cross-sectional age coefficient is pulled off -0.5. The
    change between a subject's own sessions holds the constitution still and finds -0.5."""
    from bench_interaction import ESTIMATORS, estimate_template

    x, y, names, diagnoses = _collider_cohort()
    cross = estimate_template(x, y, "cross-sectional", names, diagnoses, [1], [1, 2])
    assert np.all(np.abs(cross[:, 1] + 0.5) > 0.05)
    for estimator in ("within-age", "within-age-cn", "within-age-coarse", "within-age-progression",
                      "within-age-progression-coarse"):
        within = estimate_template(x, y, estimator, names, diagnoses, [1], [1, 2], coarse_columns=[2])
        np.testing.assert_allclose(within[:, 1], -0.5, atol=0.03)
        # the other maps are the least squares of what the fixed age map leaves
        rest = fit(x[:, :, [0, 2]], y - x[:, :, 1] * within[:, 1])
        np.testing.assert_allclose(within[:, [0, 2]], rest, atol=1e-10)
    assert set(ESTIMATORS) >= {"cross-sectional", "within-age", "within-all"}


def test_the_progression_estimator_gives_a_patients_progression_its_own_map() -> None:
    """The AD subjects' PET also falls with the time since their first session (their disease
    progressing, which the swept truth holds still): pooled with the CN changes it pulls the
    within map of age off -0.5; given its own map per impaired diagnosis it does not."""
    from bench_interaction import estimate_template

    x, y, names, diagnoses = _collider_cohort()
    age = x[:, 0, 1]
    first = {name: age[names.index(name)] for name in names}
    progressing = np.array([d == "AD" for d in diagnoses])
    y = y - (0.4 * (age - np.array([first[n] for n in names])) * progressing)[:, None]
    pooled = estimate_template(x, y, "within-age", names, diagnoses, [1], [1, 2])
    assert np.all(np.abs(pooled[:, 1] + 0.5) > 0.1)
    held = estimate_template(x, y, "within-age-progression", names, diagnoses, [1], [1, 2])
    np.testing.assert_allclose(held[:, 1], -0.5, atol=0.03)
    # without a progressing diagnosis it is the plain within estimator
    cn = ["CN"] * len(names)
    np.testing.assert_allclose(estimate_template(x, y, "within-age-progression", names, cn, [1], [1, 2]),
                               estimate_template(x, y, "within-age", names, cn, [1], [1, 2]))  # fmt: skip


def test_the_middle_sessions_change_instruments_a_noisily_read_change() -> None:
    """Four sessions a subject, the grey matter read with noise of its own each session: the
    change between the first and last sessions, read so, is attenuated and the within map of
    age takes the unread atrophy's uptake; instrumenting it by the change between the two
    sessions inside them (other scans, other errors) finds age's own -0.5."""
    from bench_interaction import estimate_template

    rng = np.random.default_rng(2)
    rows_x, rows_second, rows_y, names = [], [], [], []
    for s in range(2000):
        constitution = rng.normal(0.0, 1.0, 2)
        first, rate, span = rng.uniform(-1.0, 1.0), rng.uniform(0.2, 1.8), rng.uniform(0.3, 0.6)
        ages = first + span * np.array([0.0, 1 / 3, 2 / 3, 1.0])
        grey = [1.0 - 0.3 * rate * age + 0.3 * constitution for age in ages]
        read = [g + rng.normal(0.0, 0.03, 2) for g in grey]
        for session, inner in ((0, 1), (3, 2)):
            rows_x.append(np.stack([np.ones(2), np.full(2, ages[session]), read[session]], axis=1))
            rows_second.append(np.stack([np.ones(2), np.full(2, ages[inner]), read[inner]], axis=1))
            rows_y.append(grey[session] * (1.0 + 0.2 * constitution) - 0.5 * ages[session])
            names.append(f"{s:04d}")
    x, second, y, cn = np.array(rows_x), np.array(rows_second), np.array(rows_y), ["CN"] * len(names)
    plain = estimate_template(x, y, "within-age-progression", names, cn, [1], [1, 2])
    assert np.all(np.abs(plain[:, 1] + 0.5) > 0.07)
    instrumented = estimate_template(x, y, "within-age-progression-iv", names, cn, [1], [1, 2], second_reading=second)
    np.testing.assert_allclose(instrumented[:, 1], -0.5, atol=0.04)
    with pytest.raises(ValueError, match="instrumenting sessions"):
        estimate_template(x, y, "within-age-progression-iv", names, cn, [1], [1, 2])


def test_within_subject_estimators_need_a_subject_seen_twice() -> None:
    from bench_interaction import estimate_template

    x, y, names, diagnoses = _collider_cohort(subjects=10)
    once = [f"{i}" for i in range(len(names))]
    with pytest.raises(ValueError, match="two training scans"):
        estimate_template(x, y, "within-age", once, diagnoses, [1], [1, 2])
    with pytest.raises(ValueError, match="two training scans"):
        estimate_template(x, y, "within-age-cn", names, ["AD"] * len(names), [1], [1, 2])


def test_a_bootstrap_of_subjects_keeps_each_drawn_subjects_sessions_together_and_apart_from_its_copies() -> None:
    """A subject drawn twice counts as two subjects, each with all its sessions, and the within
    estimator on such a resample still finds age's own effect."""
    from bench_interaction import estimate_template, resampled_rows

    x, y, names, diagnoses = _collider_cohort()
    rows, labels = resampled_rows(names, [names[0], names[2], names[0]])
    own = [r for r, name in enumerate(names) if name == names[0]]
    assert rows.tolist()[: len(own)] == own == rows.tolist()[-len(own):]
    assert len(set(labels)) == 3 and labels[0] != labels[-1] and len(labels) == len(rows)
    drawn = list(dict.fromkeys(names))[::2] * 2  # half the subjects, each twice
    rows, labels = resampled_rows(names, drawn)
    within = estimate_template(x[rows], y[rows], "within-age", labels, [diagnoses[r] for r in rows], [1], [1, 2])
    np.testing.assert_allclose(within[:, 1], -0.5, atol=0.05)


def test_instrumented_or_noise_corrected_change_survives_a_noisy_reading_of_the_anatomy() -> None:
    """Grey matter lost in proportion to what there is, read with noise far larger than a
    session's loss: the plain within fit takes the unread loss as age's; instrumenting the
    change by the interval times the subject's mean grey matter does not, nor does taking the
    reading's known error off the design's Gram."""
    from bench_interaction import estimate_template

    rng = np.random.default_rng(5)
    rows_x, rows_y, names, errors = [], [], [], []
    for s in range(4000):
        base, rate, first = rng.uniform(0.5, 1.5, 1), rng.uniform(0.5, 1.5), rng.uniform(-1.0, 1.0)
        for age in (first, first + rng.uniform(0.1, 0.3)):
            grey = base * np.exp(-0.3 * rate * age)
            error = rng.normal(0.0, 0.02, 1)
            rows_x.append(np.stack([np.ones(1), np.full(1, age), grey + error], axis=1))
            errors.append(np.stack([np.zeros(1), np.zeros(1), error], axis=1))
            rows_y.append(grey - 0.5 * age)
            names.append(f"{s}")
    x, y, diagnoses = np.array(rows_x), np.array(rows_y), ["CN"] * len(names)
    plain = estimate_template(x, y, "within-age", names, diagnoses, [1], [1, 2])
    instrumented = estimate_template(x, y, "within-age-instrumented", names, diagnoses, [1], [1, 2])
    known = estimate_template(x, y, "within-age-cn-coarse-known-noise", names, diagnoses, [1], [1, 2], [2],
                              noise=np.array(errors))  # fmt: skip
    assert plain[0, 1] < -0.55
    np.testing.assert_allclose(instrumented[0, 1], -0.5, atol=0.03)
    np.testing.assert_allclose(known[0, 1], -0.5, atol=0.03)
    with pytest.raises(ValueError, match="noise"):
        estimate_template(x, y, "within-age-cn-coarse-known-noise", names, diagnoses, [1], [1, 2], [2])


def test_change_agreement_tells_a_reading_of_the_change_from_two_independent_readings() -> None:
    """A grey matter that loses 1 % a session, read once with the sessions' noise shared (as
    one mixture and matched bias leave it) and once with each session's own smooth error: the
    first follows the change (r near 1, its mean), the second does not."""
    from bench_interaction import change_agreement

    rng = np.random.default_rng(7)
    subjects, shape = 40, (6, 6, 6)
    level = rng.uniform(0.4, 0.8, (subjects, 1, *shape))
    loss = rng.uniform(0.0, 0.02, (subjects, 1, 1, 1, 1)) * level
    truth = np.stack([level, level - loss], axis=1).reshape(2 * subjects, 1, *shape)
    shared = truth + np.repeat(rng.normal(0, 0.05, (subjects, 1, 1, *shape)), 2, axis=0).reshape(truth.shape)
    own = truth + rng.normal(0.0, 0.05, (2 * subjects, 1, 1, 1, 1))
    mask = np.ones(shape, bool)
    good, bad = change_agreement(shared, truth, mask, 2), change_agreement(own, truth, mask, 2, fwhm_voxels=2.0)
    assert good["median_voxel_r"] > 0.99 and good["read_mean"] == pytest.approx(good["true_mean"], abs=1e-9)
    assert abs(bad["median_voxel_r"]) < 0.5 and bad["read_sd"] > 3 * bad["true_sd"]
    assert good["subjects"] == bad["subjects"] == subjects


def test_change_agreement_spans_a_subjects_first_to_last_session() -> None:
    """With three sessions a subject, the change read is the whole follow-up's (first to last):
    a reading whose middle session is wrong changes nothing; one whose last session is wrong does."""
    from bench_interaction import change_agreement

    rng = np.random.default_rng(3)
    subjects, shape = 30, (4, 4, 4)
    level = rng.uniform(0.4, 0.8, (subjects, 1, 1, *shape))
    loss = rng.uniform(0.0, 0.02, (subjects, 1, 1, 1, 1, 1)) * level
    truth = np.concatenate([level, level - loss, level - 2 * loss], axis=1).reshape(3 * subjects, 1, *shape)
    mask = np.ones(shape, bool)
    middle_wrong, last_wrong = truth.copy(), truth.copy()
    middle_wrong[1::3] += rng.normal(0.0, 0.5, middle_wrong[1::3].shape)
    last_wrong[2::3] += rng.normal(0.0, 0.5, last_wrong[2::3].shape)
    exact = change_agreement(middle_wrong, truth, mask, 3)
    assert exact["median_voxel_r"] > 0.999 and exact["true_mean"] == pytest.approx(-2 * float(loss.mean()), rel=0.05)
    assert abs(change_agreement(last_wrong, truth, mask, 3)["median_voxel_r"]) < 0.5


def test_the_shift_reading_sees_grey_matter_lost_where_the_fractions_read_a_gain() -> None:
    """Two sessions of a brain whose grey matter loses a tenth of itself to CSF: a voxel half
    grey, half white matter darkens, which the partial-volume fractions read as more grey
    matter (it moved towards the grey matter's mean); the shift reading reads the loss."""
    from bench_interaction import mixture_reading

    rng = np.random.default_rng(5)
    shape = (24, 24, 24)
    csf, gm, wm = 0.2, 0.5, 0.9
    labels = rng.choice(4, size=shape, p=[0.2, 0.3, 0.3, 0.2])  # CSF, GM, WM, half GM + half WM
    grey = np.select([labels == 1, labels == 3], [1.0, 0.5], 0.0)
    white = np.select([labels == 2, labels == 3], [1.0, 0.5], 0.0)

    def scan(lost: float) -> np.ndarray:
        kept = grey * (1 - lost)
        image = kept * gm + white * wm + (1 - kept - white) * csf
        return (image + rng.normal(0.0, 0.01, shape)).astype(np.float32)

    images, brains = [scan(0.0), scan(0.1)], [np.ones(shape, bool)] * 2
    mixed = labels == 3
    fractions = mixture_reading(images, brains, "fractions")
    shifted = mixture_reading(images, brains, "shift")
    np.testing.assert_array_equal(shifted[0], fractions[0])
    assert (fractions[1][0] - fractions[0][0])[mixed].mean() > 0.02
    np.testing.assert_allclose((shifted[1][0] - shifted[0][0])[mixed].mean(), -0.05, atol=0.01)
    np.testing.assert_allclose((shifted[1][0] - shifted[0][0])[labels == 1].mean(), -0.1, atol=0.015)
    np.testing.assert_allclose(shifted[1].sum(0), shifted[0].sum(0), atol=1e-5)


def test_the_sided_shift_reads_white_matter_lost_to_csf_as_no_grey_matter_change() -> None:
    """Ventricles that grow into the white matter: a white voxel turning half to CSF darkens;
    the shift reading takes it for grey matter lost, the sided shift for white matter (its grey
    matter unchanged, its CSF up by the half), and both agree on the grey voxels' loss."""
    from bench_interaction import mixture_reading

    rng = np.random.default_rng(6)
    shape = (24, 24, 24)
    labels = rng.choice(3, size=shape, p=[0.25, 0.4, 0.35])  # CSF, GM, WM
    grown = (labels == 2) & (rng.random(shape) < 0.2)
    means = np.array([0.2, 0.5, 0.9])

    def scan(later: bool) -> np.ndarray:
        image = means[labels].copy()
        if later:
            image[labels == 1] -= 0.1 * (means[1] - means[0])
            image[grown] = 0.5 * (means[2] + means[0])
        return (image + rng.normal(0.0, 0.01, shape)).astype(np.float32)

    images, brains = [scan(False), scan(True)], [np.ones(shape, bool)] * 2
    plain, sided = mixture_reading(images, brains, "shift"), mixture_reading(images, brains, "sided-shift")
    assert (plain[1][0] - plain[0][0])[grown].mean() < -0.5
    assert abs((sided[1][0] - sided[0][0])[grown].mean()) < 0.02
    np.testing.assert_allclose((sided[1][1] - sided[0][1])[grown].mean(), 0.5, atol=0.05)
    np.testing.assert_allclose((sided[1][0] - sided[0][0])[labels == 1].mean(), -0.1, atol=0.015)
