"""Does the age effect need the subject's anatomy? An oracle of the anatomy template's form.

    python benchmarks/bench_interaction.py STACK --weights MODEL.safetensors [--true-tissues] [--bootstrap B] [--json OUT]

The anatomy template is additive: PET(v) = T(v) + B(v) c + sum_s A_s(v) f_s(v), with f_s the
MRI's tissue maps around voxel v. FDG uptake is grey matter times its metabolism, and the
metabolism falls with age, so a voxel with more grey matter should lose more uptake per decade:
a product of age and anatomy, which the additive form cannot express. This fits the voxelwise
least squares of the template's start with and without the products (age x f_s) on an MNI stack
(``dualglow-phantom --mni-stack``; the training / validation split of
``bench_capacity.py``'s recipe), with ``MODEL``'s tissue model and covariate encoding, and
scores each fit's prediction on the validation scans as ``bench_capacity.py score`` scores a
model's mode: MAE, SSIM, deviation r (against the truth and the explainable PET), input
specificity, and the age sweep against the phantom's swept truth. ``--true-tissues`` fits the
same forms on the phantom's own grey matter and CSF instead of the tissue model's reading of
the T1w (what a perfect segmentation would give: the measurement's share of the misses), and
on a Gaussian mixture's posteriors of each phantom's noisy 2 mm T1w averaged down to the grid
(what segmenting before the downsampling would give), and on the phantom's grey matter times
what sets its metabolism apart from its age (the uptake its grey-matter trait sets; with the
disease's hypometabolism): the causes of atrophy an MRI cannot tell apart (lab book, finding 29).
A model's own reading: the stack's native tissue maps for a model that reads them
(a native ``anatomy_reading``: the stack holds posteriors, "native"'s), else the tissue model's reading of the grid T1w. No
flows: a measurement of the template's form alone (the flows leave the mode where this start puts it: lab book,
finding 25).

On a longitudinal stack (``dualglow-phantom --mni-stack --sessions 2`` or more) ``--estimators`` also
estimates the age map from the change within each subject, where the causes of atrophy the
MRI cannot tell apart hold still (:data:`ESTIMATORS`; lab book, finding 30), and
``--change-agreement`` measures how well each reading of the grey matter (each session on its
own, or a subject's sessions read together) follows its true change between sessions.

``--bootstrap B`` refits each fit on B resamples of the training subjects (each drawn with all
its training sessions) and reports how far the sample alone moves each region's age slope
(``bench_dualglow_targets.resampled_sweep_slopes``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_capacity import RECIPE  # noqa: E402
from bench_dualglow_targets import (  # noqa: E402
    SWEEP_AGES,
    phantom_origin,
    regions_outside,
    resampled_sweep_slopes,
    sweep_agreement,
    true_age_sweeps,
)
from bench_learning_curves import cpu_description  # noqa: E402
from perfkit import voxelwise_least_squares  # noqa: E402

#: Each variant: its tissue maps ("mri": the model's reading: the stack's native maps, or of
#: the T1w on the grid; "true": the phantom's own grey matter and CSF; "uptake", "metabolic",
#: "metabolic+gm", "pet73": that grey matter times what else sets its metabolism, and the
#: oracle of it all, :func:`_subject_tissues`; "fine": posteriors of its 2 mm T1w averaged to
#: the grid, "fine-linear" its partial-volume fractions; "joint", "joint-linear", "joint-shift",
#: "joint-sided-shift": a subject's
#: sessions read together, :func:`_joint_tissues`),
#: which covariates multiply them, whether the least squares is fitted to the PET or to its
#: logarithm (a template multiplicative in the covariates, as the phantom's metabolism is:
#: uptake = grey matter x age factor x ..., so the log is additive in age),
#: and which of the model's scales (FWHM in mm) the tissue maps enter at (None: all of them).
VARIANTS = {"additive (the template's form)": ("mri", (), "pet", None), "+ age x tissue maps": ("mri", ("age",), "pet", None),
            "+ (age, diagnosis) x tissue maps": ("mri", ("age", "diagnosis"), "pet", None),
            "log-linear (the template's terms, fitted to log PET)": ("mri", (), "log", None),
            "additive, the phantom's true GM and CSF": ("true", (), "pet", None),
            "+ age x true tissue maps": ("true", ("age",), "pet", None),
            "log-linear, the phantom's true GM and CSF": ("true", (), "log", None),
            "additive, the true GM and CSF at the voxel only": ("true", (), "pet", (0.0,)),
            "additive, the true GM and CSF at 0 and 8 mm": ("true", (), "pet", (0.0, 8.0)),
            "additive, the true GM and CSF at 0 and 24 mm": ("true", (), "pet", (0.0, 24.0)),
            "additive, the true GM times its uptake factor, and CSF": ("uptake", (), "pet", None),
            "additive, the true GM times its uptake factor, and CSF, at 0 and 8 mm": ("uptake", (), "pet", (0.0, 8.0)),
            "+ age x (the true GM times its uptake factor, and CSF)": ("uptake", ("age",), "pet", None),
            "log-linear, the true GM times its uptake factor, and CSF": ("uptake", (), "log", None),
            "additive, the true GM times its uptake and disease factors, and CSF": ("metabolic", (), "pet", None),
            "additive, the true GM times its uptake and disease factors, and CSF, at 0 and 8 mm": ("metabolic", (), "pet", (0.0, 8.0)),
            "additive, the true GM times its uptake and disease factors, CSF and GM": ("metabolic+gm", (), "pet", None),
            "additive, the subject's explainable PET at 73": ("pet73", (), "pet", None),
            "additive, GM and CSF posteriors of the 2 mm T1w averaged down": ("fine", (), "pet", None),
            "additive, a subject's sessions read together (bias-matched, one mixture)": ("joint", (), "pet", None),
            "additive, sessions read together, at 0, 8, 24 and 48 mm": ("joint", (), "pet", (0.0, 8.0, 24.0, 48.0)),
            "additive, sessions read together as partial-volume fractions": ("joint-linear", (), "pet", None),
            "additive, sessions read together, the first's fractions shifted by the later ones' darkening": ("joint-shift", (), "pet", None),
            "additive, sessions read together, the darkening read by the side of the grey-white midpoint": ("joint-sided-shift", (), "pet", None),
            "additive, partial-volume fractions of each 2 mm T1w averaged down": ("fine-linear", (), "pet", None),
            "additive, partial-volume fractions of the 4 mm T1w": ("pv", (), "pet", None)}  # fmt: skip
#: The smallest SUVR the log-linear fits take the logarithm of (brain voxels are far above it).
LOG_FLOOR_SUVR = 1e-3
#: How the template's coefficients are estimated: (whose changes, what the within-subject fit
#: holds beside age, which maps it keeps). "cross-sectional": one least squares over every
#: training scan (the group level's). The within ones take the age map from the changes
#: between each subject's own sessions (each subject's scans centred on its own mean), then fit
#: the other terms cross-sectionally with it fixed: "within-age" beside the anatomy terms (the
#: age map is the change the anatomy's change does not explain); "-cn" from the cognitively
#: normal subjects only (a patient's disease progresses between sessions, and the swept truth
#: holds it); "-given-anatomy": the change the cross-sectional fit's anatomy maps do not
#: explain (the anatomy's change between two sessions is small beside its measurement noise);
#: "-coarse": beside the anatomy terms at the coarsest scale only (where the blur has averaged
#: the two scans' noise away); "-instrumented": beside the anatomy terms, their change
#: instrumented by the time between sessions times the subject's mean anatomy (grey matter is
#: lost in proportion to what there is; the two readings' noise does not know the interval),
#: the errors-in-variables remedy for a noisy change; "-known-noise" (a diagnostic; needs
#: ``--true-tissues``): the within fit's moments corrected by the reading's own error against
#: the phantom's anatomy, what a perfect errors-in-variables correction would give;
#: "within-all" keeps the anatomy terms' within maps too; "-progression": beside the anatomy
#: terms and, for each impaired diagnosis, age's change times that diagnosis (its own map): a
#: patient's disease progresses with the time between sessions, which the swept truth holds
#: still, so the age map is the change the CN subjects' sessions show while the anatomy maps
#: learn from every subject; "-iv" (with ``--training-sessions`` a subject's first and last of
#: four or more): the same, each anatomy term's change between those two sessions instrumented
#: by its change between the two sessions inside them, a second reading whose errors are the
#: other scans' (the errors-in-variables remedy a study of four or more sessions has). The
#: "-known-noise" correction assumes a reading error independent of the change it reads.
ESTIMATORS = {"cross-sectional": None, "within-age": ("all", "anatomy", "age"), "within-age-cn": ("CN", "anatomy", "age"),
              "within-age-progression": ("all", "anatomy + progression", "age"),
              "within-age-progression-iv": ("all", "anatomy + progression", "age"),
              "within-age-progression-known-noise": ("all", "anatomy + progression", "age"),
              "within-age-progression-coarse": ("all", "coarse anatomy + progression", "age"),
              "within-all": ("all", "anatomy", "all"), "within-age-given-anatomy": ("all", "cross-sectional", "age"),
              "within-age-cn-given-anatomy": ("CN", "cross-sectional", "age"),
              "within-age-coarse": ("all", "coarse anatomy", "age"), "within-age-cn-coarse": ("CN", "coarse anatomy", "age"),
              "within-age-instrumented": ("all", "instrumented anatomy", "age"),
              "within-age-cn-instrumented": ("CN", "instrumented anatomy", "age"),
              "within-age-cn-coarse-known-noise": ("CN", "coarse anatomy", "age")}  # fmt: skip


def within_subject_coefficients(x: np.ndarray, y: np.ndarray, subjects: Sequence[str], columns: Sequence[int],
                                instrumented: Sequence[int] = (), noise: np.ndarray | None = None,
                                second_reading: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(voxels, len(columns)): the least squares of ``y`` (scans, voxels) on ``x[:, :,
    columns]`` (scans, voxels, terms) after centring each subject's scans on its own mean: the
    fixed-effects (within) estimator, which only the changes within a subject inform; subjects
    with one scan add nothing. ``instrumented`` (the first of ``columns`` is age): those
    columns' changes are instrumented by age's change times the subject's mean of each (a
    just-identified instrumental-variables fit instead of the least squares). ``noise``: the
    error of ``x``'s reading (as ``x``): its within-subject Gram is taken off the design's,
    the errors-in-variables correction with the error known. ``second_reading`` (as ``x``): the
    instruments, row for row; their within-subject changes instrument ``x``'s (the terms read
    without error, age, stand in it as they are in ``x``)."""
    x_within, y_within = x[:, :, list(columns)].copy(), y.copy()
    error = None if noise is None else noise[:, :, list(columns)].copy()
    second = None if second_reading is None else second_reading[:, :, list(columns)].copy()
    means = np.zeros_like(x_within)
    names = np.asarray(subjects)
    for name in np.unique(names):
        rows = np.flatnonzero(names == name)
        means[rows] = x_within[rows].mean(0)
        x_within[rows] -= means[rows]
        y_within[rows] -= y_within[rows].mean(0)
        if error is not None:
            error[rows] -= error[rows].mean(0)
        if second is not None:
            second[rows] -= second[rows].mean(0)
    if error is not None:
        gram = np.einsum("nvp,nvq->vpq", x_within, x_within) - np.einsum("nvp,nvq->vpq", error, error)
        return np.einsum("vpq,vq->vp", np.linalg.pinv(gram), np.einsum("nvp,nv->vp", x_within, y_within))
    if second is not None:
        instruments = second
    elif not instrumented:
        return voxelwise_least_squares(x_within, y_within)
    else:
        positions = [list(columns).index(c) for c in instrumented]
        instruments = x_within.copy()
        instruments[:, :, positions] = x_within[:, :, :1] * means[:, :, positions]
    cross = np.einsum("nvp,nvq->vpq", instruments, x_within)
    return np.einsum("vpq,vq->vp", np.linalg.pinv(cross), np.einsum("nvp,nv->vp", instruments, y_within))


def resampled_rows(subjects: Sequence[str], drawn: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The rows (of ``subjects``, one name per row) of each subject ``drawn``, all its scans, and
    their subject names made one per draw: a subject drawn twice counts as two subjects, as a
    bootstrap of subjects needs (the within estimator centres on each name's scans)."""
    names = np.asarray(subjects)
    rows: list[int] = []
    labels: list[str] = []
    for k, name in enumerate(drawn):
        own = np.flatnonzero(names == name).tolist()
        rows += own
        labels += [f"{name}#{k}"] * len(own)
    return np.array(rows, int), labels


def estimate_template(x: np.ndarray, y: np.ndarray, estimator: str, subjects: Sequence[str],
                      diagnoses: Sequence[str | None], age_columns: Sequence[int],
                      varying_columns: Sequence[int], coarse_columns: Sequence[int] = (),
                      noise: np.ndarray | None = None, second_reading: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(voxels, terms): the template's coefficients by ``estimator`` (:data:`ESTIMATORS`).
    ``varying_columns``: the terms that change within a subject (age, the anatomy);
    ``coarse_columns``: the anatomy terms at the coarsest scale; ``noise``: the reading's
    error (as ``x``), for "-known-noise"; ``second_reading``: for "-iv", each row's design
    from its instrumenting session (as ``x``; only its anatomy terms are read)."""
    if ESTIMATORS[estimator] is None:
        return voxelwise_least_squares(x, y)
    whose, beside, keep = ESTIMATORS[estimator]  # type: ignore[misc]
    known_error = estimator.endswith("known-noise")
    if known_error and noise is None:
        raise ValueError(f"{estimator} needs the reading's error (noise=)")
    if estimator.endswith("-iv") and second_reading is None:
        raise ValueError(f"{estimator} needs the instrumenting sessions' designs (second_reading=)")
    rows = np.arange(len(x)) if whose == "all" else np.flatnonzero(np.asarray(diagnoses) == whose)
    if len({subjects[r] for r in rows}) == len(rows):
        raise ValueError(f"{estimator}: no subject has two training scans to change between")
    anatomy = [c for c in varying_columns if c not in age_columns]
    within_columns = {"anatomy": list(varying_columns), "instrumented anatomy": list(varying_columns),
                      "anatomy + progression": list(varying_columns),
                      "coarse anatomy + progression": [*age_columns, *coarse_columns],
                      "coarse anatomy": [*age_columns, *coarse_columns], "cross-sectional": list(age_columns)}[beside]
    second = None
    if second_reading is not None and estimator.endswith("-iv"):
        second = x.copy()
        second[:, :, anatomy] = second_reading[:, :, anatomy]
    within_x = x
    if beside.endswith("+ progression"):
        impaired = sorted({str(d) for d in diagnoses if d not in (None, "CN")})
        which = np.asarray(diagnoses, dtype=object)
        progression = [x[:, :, list(age_columns)] * (which == group)[:, None, None] for group in impaired]
        within_x = np.concatenate([x, *progression], axis=2)
        second = None if second is None else np.concatenate([second, *progression], axis=2)
        if noise is not None:  # age is read without error, and so are its products with a diagnosis
            noise = np.concatenate([noise, np.zeros_like(within_x[:, :, x.shape[2]:])], axis=2)
        within_columns += list(range(x.shape[2], within_x.shape[2]))
    target = y
    if beside == "cross-sectional":  # only this estimator needs the cross-sectional fit's anatomy maps
        cross = voxelwise_least_squares(x, y)
        target = y - np.einsum("nvp,vp->nv", x[:, :, anatomy], cross[:, anatomy])
    within = within_subject_coefficients(within_x[rows], target[rows], [subjects[r] for r in rows], within_columns,
                                         anatomy if beside == "instrumented anatomy" else (),
                                         noise[rows] if known_error and noise is not None else None,
                                         None if second is None else second[rows])  # fmt: skip
    fixed = list(age_columns) if keep == "age" else within_columns
    fixed_coef = within[:, [within_columns.index(c) for c in fixed]]
    rest = [c for c in range(x.shape[2]) if c not in fixed]
    coef = np.zeros((x.shape[1], x.shape[2]))
    coef[:, fixed] = fixed_coef
    coef[:, rest] = voxelwise_least_squares(x[:, :, rest], y - np.einsum("nvp,vp->nv", x[:, :, fixed], fixed_coef))
    return coef


def template_images(x: np.ndarray, coef: np.ndarray, inside: np.ndarray, shape: Sequence[int],
                    space: str = "suvr") -> np.ndarray:  # fmt: skip
    """(scans, *shape): the template's prediction from its design ``x`` (scans, the voxels
    ``inside``, terms) and ``coef`` (voxels, terms); exponentiated for a fit in "log" space."""
    fitted = np.einsum("nvp,vp->nv", x, coef)
    out = np.zeros((len(x), inside.size))
    out[:, inside] = np.exp(fitted) if space == "log" else fitted
    return out.reshape(len(x), *shape)


def partial_volume_fractions(model: Any, mri: np.ndarray, support: np.ndarray) -> np.ndarray:
    """(scans, 2, *grid): the GM and CSF fractions of ``anatomy_reading="fractions"``
    (:func:`dualglow_app.model.dualglow.tissue_fractions`) of each grid MRI, inside ``support``."""
    from dualglow_app.model.dualglow import tissue_fractions
    from dualglow_app.tissue import MIXTURE_CLASSES

    fractions = tissue_fractions(torch.as_tensor(np.asarray(mri, np.float64)), model.get_buffer("tissue_mixture").double(),
                                  torch.as_tensor(np.asarray(support) > 0))  # fmt: skip
    return fractions[[MIXTURE_CLASSES.index("gm"), MIXTURE_CLASSES.index("csf")]].transpose(0, 1).numpy().astype(np.float32)


def _subject_tissues(task: tuple[int, int, int, Any, str, int, int]) -> np.ndarray:
    """(maps, *grid): one phantom's tissue maps on ``grid``. Its grey matter and CSF: "true" (its
    own fractions), "uptake" (the grey matter times the uptake per unit grey matter its regional
    GM trait sets, version 2's ``gm_uptake``), "metabolic" (that times its disease's
    hypometabolism, the ``diagnosis_factor`` its severity sets: the grey matter as everything
    but age makes it metabolise), "metabolic+gm" (those and its plain grey matter, a third map:
    with the CSF, what the white matter's share needs), "fine" (a 3-class Gaussian mixture's
    posteriors of its noisy 2 mm T1w, averaged down) or "fine-linear" (the same mixture's
    partial-volume fractions, :func:`mixture_reading`); "pet73": one map, its explainable PET
    with its metabolism at 73 (everything its MRI and diagnosis could tell, its age held: the
    oracle of every cause at once). The task: (seed, subject index, version, grid, source,
    sessions per subject, session)."""
    from dualglow_app.phantom import pet as pt
    from dualglow_app.phantom.mni import _to_grid, simulate_subject, work_t1, work_truth
    from dualglow_app.tissue import own_tissue_maps

    seed, i, version, grid, source, sessions, session = task
    if source == "pet73":
        return simulate_subject(seed, i, grid, version, metabolic_age=pt.REFERENCE_AGE, sessions=sessions,
                                session=session).explainable[None]  # fmt: skip
    tpl, _, truth = work_truth(seed, i, version, explainable=False, sessions=sessions, session=session)
    gm, _, csf = truth.tissues
    plain_gm = gm
    if source in ("uptake", "metabolic", "metabolic+gm"):
        factor = np.ones(len(truth.state.age_factor)) if truth.state.gm_uptake is None else truth.state.gm_uptake
        if source != "uptake":
            factor = factor * truth.state.diagnosis_factor
        gm = gm * np.append(factor, 1.0).astype(np.float32)[pt.region_maps(tpl.voxel_mm).index]
    if source == "fine":
        gm, csf = own_tissue_maps(work_t1(truth, seed, i, session), truth.brain > 0.5)[0]  # NATIVE_TISSUE_CHANNELS
    if source == "fine-linear":
        gm, csf = own_tissue_maps(work_t1(truth, seed, i, session), truth.brain > 0.5, "native-fractions")[0]
    maps = [gm, csf] + ([plain_gm] if source == "metabolic+gm" else [])
    return np.stack([_to_grid(m, tpl.affine, grid) for m in maps])


#: How :func:`_joint_tissues` reads a subject's bias-matched sessions under their one mixture:
#: each session's "posterior"s, or its partial-volume "fractions" (each voxel a mix of the two
#: classes its intensity lies between), or the first session's fractions "shift"ed by each
#: later session's intensity change read as grey matter turned to CSF (a boundary-shift
#: reading: atrophy only darkens a voxel, while the fractions read a darker voxel between the
#: grey and the white matter's means as MORE grey matter).
#: "sided-shift": the same, but where the first session is brighter than the grey and the white
#: matter's midpoint the darkening is read as white matter turned to CSF (the ventricles grow
#: into the white matter; finding 41).
JOINT_READINGS = {"joint": "posterior", "joint-linear": "fractions", "joint-shift": "shift",
                  "joint-sided-shift": "sided-shift"}


def _joint_tissues(task: tuple[int, int, int, Any, int, str]) -> np.ndarray:
    """(sessions, 2, *grid): one subject's sessions read together, as a longitudinal pipeline
    reads them: each later 2 mm T1w's residual bias matched to the first session's (a quadratic
    in the log ratio over the white matter, where atrophy changes nothing), then one mixture
    fitted to all of them and each read with it, so the change between two readings is the
    anatomy's and not two mixtures' or two bias fields' difference. The task's last item: the
    reading (:data:`JOINT_READINGS`); "fractions" is linear in the intensity, as
    ``anatomy_reading="fractions"`` reads the grid, where the mixture's posteriors saturate,
    so a pure voxel's change reads as none."""
    from dualglow_app.phantom.anatomy import quadratic_terms
    from dualglow_app.phantom.mni import _to_grid, work_t1, work_truth

    seed, i, version, grid, sessions, reading = task
    truths = [work_truth(seed, i, version, explainable=False, sessions=sessions, session=k) for k in range(sessions)]
    tpl = truths[0][0]
    images = [work_t1(truth, seed, i, k) for k, (_, _, truth) in enumerate(truths)]
    brains = [truth.brain > 0.5 for _, _, truth in truths]
    terms = np.stack([np.ones(images[0].shape), *quadratic_terms(*np.meshgrid(
        *[np.linspace(-1, 1, n) for n in images[0].shape], indexing="ij"))], axis=-1)  # fmt: skip
    first_white = brains[0] & (images[0] > 0.85)
    for k in range(1, sessions):
        white = first_white & brains[k] & (images[k] > 0.85)
        coef = np.linalg.lstsq(terms[white], np.log(images[k][white] / images[0][white]), rcond=None)[0]
        images[k] = images[k] / np.exp(terms @ coef).astype(np.float32)
    return np.stack([np.stack([_to_grid(m, tpl.affine, grid) for m in maps]) for maps in mixture_reading(images, brains, reading)])


def mixture_reading(images: Sequence[np.ndarray], brains: Sequence[np.ndarray], reading: str) -> list[np.ndarray]:
    """Each image's (len(NATIVE_TISSUE_CHANNELS), *shape) tissue maps under one three-class
    mixture fitted to all of them (:meth:`~dualglow_app.tissue.GreyMatterModel.tissue_maps`):
    its "posterior"s, its partial-volume "fractions", or the first image's fractions "shift"ed
    by each image's departure from the first, read as grey matter turned to CSF (the intensity
    change over the mixture's grey-to-CSF contrast), or ("sided-shift") as white matter turned
    to CSF where the first image is on the white side of the grey-white midpoint
    (:data:`JOINT_READINGS`)."""
    from dualglow_app.tissue import NATIVE_MIXTURE_STRIDE, NATIVE_TISSUE_CHANNELS, GreyMatterModel

    mixture = GreyMatterModel.fit(images, brains, stride=NATIVE_MIXTURE_STRIDE)
    if reading not in ("shift", "sided-shift"):
        return [mixture.tissue_maps(image, brain, NATIVE_TISSUE_CHANNELS, reading)
                for image, brain in zip(images, brains, strict=True)]  # fmt: skip
    first = mixture.tissue_maps(images[0], brains[0], NATIVE_TISSUE_CHANNELS, "fractions")
    csf_mean, gm_mean, wm_mean = mixture.ordered_parameters()[1]
    white_side = images[0] > (gm_mean + wm_mean) / 2 if reading == "sided-shift" else np.zeros(images[0].shape, bool)
    out = []
    for image, brain in zip(images, brains, strict=True):
        darkening = np.where(brains[0] & brain, image - images[0], 0.0)
        grey = np.where(white_side, 0.0, darkening / (gm_mean - csf_mean))
        csf = np.where(white_side, darkening / (wm_mean - csf_mean), grey)
        out.append(np.stack([first[0] + grey, first[1] - csf]).astype(np.float32))
    return out


def subject_tissues(stack: Path, rows: int, grid: Any, source: str) -> np.ndarray:
    """(rows, 2 or 3, *grid): each phantom's tissue maps on ``grid`` (:func:`_subject_tissues`;
    the stack's seed, version and sessions, its rows subject-major; cached beside the stack)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cache = stack / f"{source}_gm_csf.npy"
    if cache.is_file():
        return np.load(cache)
    index = json.loads((stack / "index.json").read_text())
    sessions = int(index.get("sessions", 1))
    seed, version = int(index["seed"]), int(index["version"])
    # spawn: a forked child of this torch process deadlocked in its BLAS threads.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        if source.startswith("joint"):
            subjects = [(seed, i, version, grid, sessions, JOINT_READINGS[source]) for i in range(rows // sessions)]
            out = np.concatenate(list(pool.map(_joint_tissues, subjects))).astype(np.float32)
        else:
            tasks = [(seed, r // sessions, version, grid, source, sessions, r % sessions) for r in range(rows)]
            out = np.stack(list(pool.map(_subject_tissues, tasks))).astype(np.float32)
    np.save(cache, out)
    return out


def change_agreement(read: np.ndarray, truth: np.ndarray, mask: np.ndarray, sessions: int,
                     fwhm_voxels: float = 0.0) -> dict[str, float]:  # fmt: skip
    """How well a reading of the grey matter (rows subject-major, ``sessions`` a subject; the
    first channel) measures its change from the first session to the last: the true and the
    read change's mean and across-subject SD (averaged over ``mask``'s voxels) and the median
    over voxels of their across-subject correlation, after a Gaussian blur of ``fwhm_voxels``."""
    from scipy import ndimage as ndi

    from dualglow_app.imaging import FWHM_TO_SIGMA

    sigma = fwhm_voxels * FWHM_TO_SIGMA

    def change(maps: np.ndarray) -> np.ndarray:
        out = []
        for first in range(0, len(maps) - sessions + 1, sessions):
            pair = [np.asarray(maps[first + k, 0], np.float64) for k in (0, sessions - 1)]
            if sigma > 0:
                pair = [ndi.gaussian_filter(v, sigma) for v in pair]
            out.append((pair[1] - pair[0])[mask])
        return np.array(out)

    true_change, read_change = change(truth), change(read)
    t, r = true_change - true_change.mean(0), read_change - read_change.mean(0)
    voxel_r = (t * r).sum(0) / np.sqrt((t**2).sum(0) * (r**2).sum(0) + 1e-30)
    return {"true_mean": float(true_change.mean()), "true_sd": float(true_change.std(0).mean()),
            "read_mean": float(read_change.mean()), "read_sd": float(read_change.std(0).mean()),
            "median_voxel_r": float(np.median(voxel_r)), "subjects": len(true_change)}  # fmt: skip


def tissue_features(model: Any, mri: np.ndarray, tissues: np.ndarray | None,
                    sigmas: Sequence[float] | None = None) -> np.ndarray:  # fmt: skip
    """(scans, maps, *grid): the model's anatomy features of the MRIs, or the same blurs of the
    given grey-matter and CSF maps (scans, 2, *grid) in the same order (tissue-major), at the
    model's scales or at ``sigmas`` (in voxels; given maps only)."""
    from dualglow_app.model.dualglow import blurred_tissue_maps

    if tissues is None:
        features = model.anatomy_features(torch.as_tensor(np.asarray(mri, np.float64))[:, None])
    else:
        maps = torch.as_tensor(np.asarray(tissues, np.float64))
        features = blurred_tissue_maps([maps[:, k : k + 1] for k in range(maps.shape[1])],
                                       model.config.anatomy_sigmas if sigmas is None else sigmas)
    return features[:, :, 0].numpy()


def design_matrix(features: np.ndarray, covariates: np.ndarray, inside: np.ndarray,
                  products: Sequence[int] = ()) -> np.ndarray:  # fmt: skip
    """(scans, brain voxels, terms): 1, the covariates, the features (scans, maps, *grid) at
    each brain voxel, and the covariate columns ``products`` names times each feature."""
    n, voxels = len(features), int(inside.sum())
    flat = features.reshape(n, features.shape[1], -1)[:, :, inside].transpose(0, 2, 1)
    columns = [np.ones((n, voxels, 1)), np.broadcast_to(covariates[:, None, :], (n, voxels, covariates.shape[1])), flat]
    columns += [covariates[:, j, None, None] * flat for j in products]
    return np.concatenate(columns, axis=2)


def design(model: Any, mri: np.ndarray, side: dict[str, np.ndarray], products: tuple[str, ...],
           inside: np.ndarray, tissues: np.ndarray | None = None, sigmas: Sequence[float] | None = None) -> np.ndarray:  # fmt: skip
    """:func:`design_matrix` of the MRIs at the brain voxels ``inside``: the covariates as the
    model encodes them, its tissue features (of the MRI, or of ``tissues``), and the named
    covariates' encoded columns times each feature."""
    x = torch.as_tensor(np.asarray(mri, np.float64))[:, None]
    c = model._encode_side({k: torch.as_tensor(v) for k, v in side.items()}, len(x), x)[0].double().numpy()
    columns = [j for name in products for j in range(model.config.side_channels(name).start,
                                                     model.config.side_channels(name).stop)]  # fmt: skip
    return design_matrix(tissue_features(model, mri, tissues, sigmas), c, inside, columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", type=Path)
    parser.add_argument("--weights", type=Path, required=True, help="a model with the anatomy template (gm+csf)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--true-tissues", action="store_true",
                        help="also fit on the phantom's true GM and CSF, and on posteriors of its 2 mm T1w "
                             "(regenerated once, cached in the stack)")
    parser.add_argument("--train-subjects", type=int, default=None,
                        help="fit on the first N training subjects only (does a miss shrink with data?)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="TEXT",
                        help="only the variants (with --change-agreement: the readings) whose label contains one "
                             "of these texts")
    parser.add_argument("--change-agreement", action="store_true",
                        help="only measure how well the native and the joint readings measure the grey matter's "
                             "change between a subject's first and last sessions (against the phantom's), then stop")
    parser.add_argument("--training-sessions", nargs="+", type=int, default=None, metavar="K",
                        help="fit on these sessions of each training subject only (1 = the first; default all): "
                             "does the within-subject age map gain from a longer follow-up or from more scans?")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="B",
                        help="refit on B resamples of the training subjects: the age slopes' sampling noise")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--estimators", nargs="+", default=["cross-sectional"], choices=list(ESTIMATORS),
                        help="how each variant's coefficients are estimated (the within ones need a stack with "
                             "several sessions per subject)")
    args = parser.parse_args()

    from dualglow_app.dataset import load_mni_stack, split_subjects
    from dualglow_app.imaging import FWHM_TO_SIGMA
    from dualglow_app.log import setup_logging
    from dualglow_app.metrics import deviation_correlation, image_metrics, mean_pairwise_correlation
    from dualglow_app.weights import open_model

    setup_logging(-1)
    loaded = open_model(args.weights, "cpu")
    model = loaded.model.double()
    data = load_mni_stack(args.stack)
    train_rows, val_rows = split_subjects(data.subjects, RECIPE["val_fraction"], RECIPE["seed"])
    if args.train_subjects is not None:
        if not 0 < args.train_subjects <= len(train_rows):
            parser.error(f"--train-subjects must be 1-{len(train_rows)} (the stack's training subjects)")
        train_rows = train_rows[: args.train_subjects]
    sessions = json.loads((args.stack / "index.json").read_text()).get("sessions", 1)
    if sessions < 2 and (set(args.estimators) - {"cross-sectional"} or args.change_agreement):
        parser.error("the within-subject estimators and --change-agreement need a stack with several sessions per "
                     "subject (--sessions 2)")
    if args.training_sessions is not None:
        if not set(args.training_sessions) <= set(range(1, sessions + 1)):
            parser.error(f"--training-sessions must be among 1-{sessions} (the stack's sessions per subject)")
        # Rows are subject-major: row r is session r % sessions + 1 of its subject.
        train_rows = np.array([r for r in train_rows if r % sessions + 1 in args.training_sessions])
    if args.change_agreement:
        truth = subject_tissues(args.stack, len(data.labels), data.grid, "true")
        brain = np.asarray(data.mask[0]) > 0
        reading_sources = {"native (each session its own mixture)": "native", "joint (bias-matched, one mixture)": "joint",
                           "joint, partial-volume fractions": "joint-linear",
                           "joint, the first's fractions shifted by the later ones' darkening": "joint-shift",
                           "joint, the darkening read by the side of the grey-white midpoint": "joint-sided-shift"}  # fmt: skip
        # --variants picks readings here too (the joint ones cost minutes a subject's sessions).
        readings = {name: np.asarray(data.tissue_maps) if source == "native" else
                    subject_tissues(args.stack, len(data.labels), data.grid, source)
                    for name, source in reading_sources.items()
                    if not args.variants or any(text in name for text in args.variants)}  # fmt: skip
        results = {f"{name}, {fwhm:g} mm": change_agreement(maps, truth, brain, sessions, fwhm / data.grid.voxel_size)
                   for name, maps in readings.items() for fwhm in (0.0, 24.0)}  # fmt: skip
        for label, entry in results.items():
            print(f"{label:50s} " + "  ".join(f"{k} {v:.4f}" for k, v in entry.items()), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"stack": str(args.stack), "machine": cpu_description(),
                                             "change_agreement": results}, indent=1))  # fmt: skip
        return
    inside = np.asarray(data.mask[0]).reshape(-1) > 0
    side_names = list(loaded.covariates)

    def side_of(rows: np.ndarray, age: float | None = None) -> dict[str, np.ndarray]:
        out = {name: np.array([spec.encode(data.covariate_values(name)[r]) for r in rows], np.float64)
               for name, spec in loaded.covariates.items()}  # fmt: skip
        if age is not None:
            out["age"] = np.full(len(rows), age)
        return out

    mri, pet = np.asarray(data.mri), np.asarray(data.pet, np.float64)
    reference = pet[train_rows].mean(0)
    explainable = getattr(data, "explainable", None)
    sweep_truth = true_age_sweeps(phantom_origin(args.stack), data, val_rows, SWEEP_AGES, args.stack / "age_truth")
    if args.bootstrap and sweep_truth is None:
        parser.error("--bootstrap scores the age slopes against the swept truth: it needs a phantom stack")
    results: dict[str, Any] = {}
    # A model that reads the native tissue maps takes the stack's (the preprocessing's counterpart).
    native = model.reads_tissue_maps
    available = {"mri", *(["true", "uptake", "metabolic", "metabolic+gm", "pet73", "fine", "fine-linear", "joint",
                           "joint-linear", "joint-shift", "joint-sided-shift"]
                          if args.true_tissues else []),
                 *(["pv"] if model.uses_tissue_mixture and not native else [])}  # fmt: skip
    chosen = {label: variant for label, variant in VARIANTS.items()
              if variant[0] in available and all(name in side_names for name in variant[1])
              and (not args.variants or any(text in label for text in args.variants))}  # fmt: skip
    # Only the sources the chosen variants fit on: each of the phantom's costs minutes.
    sources: dict[str, np.ndarray | None] = {}
    for source in sorted({variant[0] for variant in chosen.values()}):
        if source == "mri":
            sources[source] = np.asarray(data.tissue_maps) if native else None
        elif source == "pv":
            sources[source] = partial_volume_fractions(model, np.asarray(data.mri), np.asarray(data.mask[0]))
        else:
            sources[source] = subject_tissues(args.stack, len(data.labels), data.grid, source)
    covariate_width = max(model.config.side_channels(name).stop for name in model.config.side_names)
    age_columns = [1 + j for j in range(model.config.side_channels("age").start, model.config.side_channels("age").stop)]
    train_subjects = [data.subjects[r] for r in train_rows]
    train_diagnoses = [data.diagnosis[r] for r in train_rows]
    for (label, (source, products, space, scales)), estimator in itertools.product(chosen.items(), args.estimators):
        if estimator != "cross-sectional":
            label = f"{label} [{estimator}]"
        sigmas = None if scales is None else [fwhm * FWHM_TO_SIGMA / data.grid.voxel_size for fwhm in scales]
        tissues = sources[source]

        def of(rows: np.ndarray, tissues: np.ndarray | None = tissues) -> np.ndarray | None:
            return None if tissues is None else tissues[rows]

        target = pet[train_rows].reshape(len(train_rows), -1)[:, inside]
        if space == "log":
            target = np.log(np.maximum(target, LOG_FLOOR_SUVR))
        x_train = design(model, mri[train_rows], side_of(train_rows), products, inside, of(train_rows), sigmas)
        # Age and everything after the covariates (the anatomy, its products) change within a subject.
        varying = age_columns + list(range(1 + covariate_width, x_train.shape[2]))
        n_scales = len(sigmas if sigmas is not None else model.config.anatomy_sigmas)
        coarse = [c for c in varying[len(age_columns):] if (c - 1 - covariate_width) % n_scales == n_scales - 1]
        if "coarse" in estimator and products:
            parser.error(f"{estimator} takes the additive forms only")
        noise = None
        if estimator.endswith("known-noise"):
            if not args.true_tissues:
                parser.error(f"{estimator} needs --true-tissues (the reading's error against the phantom's anatomy)")
            true_maps = subject_tissues(args.stack, len(data.labels), data.grid, "true")
            noise = x_train - design(model, mri[train_rows], side_of(train_rows), products, inside,
                                     true_maps[train_rows], sigmas)  # fmt: skip
        second_reading = None
        if estimator.endswith("-iv"):
            chosen_sessions = sorted(args.training_sessions or [])
            if len(chosen_sessions) != 2 or chosen_sessions[1] - chosen_sessions[0] < 3:
                parser.error(f"{estimator} instruments the change between two sessions by the change between the "
                             "two inside them: give --training-sessions FIRST LAST, 3 or more apart (e.g. 1 4)")
            # Rows are subject-major: the first session's instrument is the row after it, the last's the one before.
            inner = np.array([r + 1 if r % sessions + 1 == chosen_sessions[0] else r - 1 for r in train_rows])
            second_reading = design(model, mri[inner], side_of(inner), products, inside, of(inner), sigmas)
        coef = estimate_template(x_train, target, estimator, train_subjects, train_diagnoses, age_columns, varying,
                                 coarse, noise, second_reading)  # fmt: skip

        def design_of(rows: np.ndarray, age: float | None = None, products: Any = products,
                      sigmas: list[float] | None = sigmas, of: Any = of) -> np.ndarray:
            return design(model, mri[rows], side_of(rows, age), products, inside, of(rows), sigmas)

        def predict(rows: np.ndarray, age: float | None = None, space: str = space, coef: np.ndarray = coef,
                    design_of: Any = design_of) -> np.ndarray:
            return template_images(design_of(rows, age), coef, inside, data.grid.shape, space)

        own = predict(val_rows)
        masks = np.asarray(data.mask[val_rows])
        scores = [image_metrics(pet[r], p, masks[k]) for k, (r, p) in enumerate(zip(val_rows, own, strict=True))]
        entry = {
            "terms": int(coef.shape[1]),
            "mae_suvr": float(np.mean([s["mae_suvr"] for s in scores])),
            "ssim": float(np.mean([s["ssim"] for s in scores])),
            "psnr_db": float(np.mean([s["psnr_db"] for s in scores])),
            "deviation_r": float(np.mean([deviation_correlation(p, pet[r], reference, masks[k])
                                          for k, (r, p) in enumerate(zip(val_rows, own, strict=True))])),
            "specificity_synthetic": mean_pairwise_correlation(own, masks),
            "specificity_true": mean_pairwise_correlation(pet[val_rows], masks),
        }  # fmt: skip
        if explainable is not None:
            entry["deviation_r_explainable"] = float(np.mean([
                deviation_correlation(p, np.asarray(explainable[r]), reference, masks[k])
                for k, (r, p) in enumerate(zip(val_rows, own, strict=True))]))  # fmt: skip

        def swept(row: int) -> np.ndarray:
            return np.concatenate([predict(np.array([row]), a) for a in SWEEP_AGES])

        entry["age"] = sweep_agreement(swept, data, val_rows, SWEEP_AGES, np.asarray(data.age[train_rows]), sweep_truth)
        outside = regions_outside(entry["age"]) if "measured" in entry["age"] else {}
        entry["age_regions_outside_25_percent"] = outside
        if args.bootstrap:
            # (ages, validation scans, voxels, terms): every resample's sweep, but for its coefficients.
            sweep_designs = np.stack([design_of(val_rows, a) for a in SWEEP_AGES])

            def resampled_slopes(drawn: np.ndarray, x_train: np.ndarray = x_train, target: np.ndarray = target,
                                 estimator: str = estimator, varying: list[int] = varying, coarse: list[int] = coarse,
                                 noise: np.ndarray | None = noise, space: str = space,
                                 second_reading: np.ndarray | None = second_reading,
                                 sweep_designs: np.ndarray = sweep_designs) -> list[float]:  # fmt: skip
                rows, names = resampled_rows(train_subjects, drawn)
                coef = estimate_template(x_train[rows], target[rows], estimator, names, [train_diagnoses[r] for r in rows],
                                         age_columns, varying, coarse, None if noise is None else noise[rows],
                                         None if second_reading is None else second_reading[rows])  # fmt: skip

                def swept(row: int) -> np.ndarray:
                    k = int(np.flatnonzero(val_rows == row)[0])
                    return template_images(sweep_designs[:, k], coef, inside, data.grid.shape, space)

                return sweep_agreement(swept, data, val_rows, SWEEP_AGES, np.asarray(data.age[train_rows]),
                                       sweep_truth)["synthetic_per_decade"]  # fmt: skip

            entry["age_resampling"] = resampled_sweep_slopes(resampled_slopes, np.unique(train_subjects), args.bootstrap,
                                                             args.bootstrap_seed, entry["age"])  # fmt: skip
        del x_train, second_reading
        results[label] = entry
        measured = entry["age"].get("measured", {})
        print(f"{label:36s} terms {entry['terms']:2d}  MAE {entry['mae_suvr']:.4f}  SSIM {entry['ssim']:.4f}  "
              f"dev r {entry['deviation_r']:.3f}  pairwise {entry['specificity_synthetic']:.3f} "
              f"(true {entry['specificity_true']:.3f})  age r {measured.get('pearson_r', float('nan')):.3f}  "
              f"ratio {measured.get('median_ratio', float('nan')):.3f}  "
              f"within 25 % {measured.get('within_25_percent', float('nan')):.3f}\n    outside +-25 %: "
              + (", ".join(f"{name} {r:.2f}x" for name, r in outside.items()) or "none"),
              flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"stack": str(args.stack), "weights": str(args.weights),
                                         "machine": cpu_description(), "split": {"train": len(train_rows),
                                         "val": len(val_rows), "training_sessions": args.training_sessions},
                                         "variants": results}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
