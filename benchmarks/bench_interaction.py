"""Does the age effect need the subject's anatomy? An oracle of the anatomy template's form.

    python benchmarks/bench_interaction.py STACK --weights MODEL.safetensors [--true-tissues] [--json OUT]

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
(``anatomy_reading="native"``), else the tissue model's reading of the grid T1w. No
flows: a measurement of the template's form alone (the flows leave the mode where this start puts it: lab book,
finding 25).
"""

from __future__ import annotations

import argparse
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
from bench_dualglow_targets import SWEEP_AGES, phantom_origin, sweep_agreement, true_age_sweeps  # noqa: E402
from bench_learning_curves import cpu_description  # noqa: E402
from perfkit import voxelwise_least_squares  # noqa: E402

#: Each variant: its tissue maps ("mri": the model's reading: the stack's native maps, or of
#: the T1w on the grid; "true": the phantom's own grey matter and CSF; "uptake", "metabolic",
#: "metabolic+gm", "pet73": that grey matter times what else sets its metabolism, and the
#: oracle of it all, :func:`_subject_tissues`; "fine": posteriors of its 2 mm T1w averaged to
#: the grid),
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
            "additive, partial-volume fractions of the 4 mm T1w": ("pv", (), "pet", None)}  # fmt: skip
#: The smallest SUVR the log-linear fits take the logarithm of (brain voxels are far above it).
LOG_FLOOR_SUVR = 1e-3


def partial_volume_fractions(model: Any, mri: np.ndarray, support: np.ndarray) -> np.ndarray:
    """(scans, 2, *grid): the GM and CSF fractions of ``anatomy_reading="fractions"``
    (:func:`dualglow_app.model.dualglow._tissue_fractions`) of each grid MRI, inside ``support``."""
    from dualglow_app.model.dualglow import _tissue_fractions
    from dualglow_app.tissue import MIXTURE_CLASSES

    fractions = _tissue_fractions(torch.as_tensor(np.asarray(mri, np.float64)), model.get_buffer("tissue_mixture").double(),
                                  torch.as_tensor(np.asarray(support) > 0))  # fmt: skip
    return fractions[[MIXTURE_CLASSES.index("gm"), MIXTURE_CLASSES.index("csf")]].transpose(0, 1).numpy().astype(np.float32)


def _subject_tissues(task: tuple[int, int, int, Any, str]) -> np.ndarray:
    """(maps, *grid): one phantom's tissue maps on ``grid``. Its grey matter and CSF: "true" (its
    own fractions), "uptake" (the grey matter times the uptake per unit grey matter its regional
    GM trait sets, version 2's ``gm_uptake``), "metabolic" (that times its disease's
    hypometabolism, the ``diagnosis_factor`` its severity sets: the grey matter as everything
    but age makes it metabolise), "metabolic+gm" (those and its plain grey matter, a third map:
    with the CSF, what the white matter's share needs) or "fine" (a 3-class Gaussian mixture's
    posteriors of its noisy 2 mm T1w, averaged down); "pet73": one map, its explainable PET
    with its metabolism at 73 (everything its MRI and diagnosis could tell, its age held: the
    oracle of every cause at once)."""
    from dualglow_app.phantom import pet as pt
    from dualglow_app.phantom.mni import _to_grid, simulate_subject, work_t1, work_truth
    from dualglow_app.tissue import own_tissue_posteriors

    seed, i, version, grid, source = task
    if source == "pet73":
        return simulate_subject(seed, i, grid, version, metabolic_age=pt.REFERENCE_AGE).explainable[None]
    tpl, _, truth = work_truth(seed, i, version, explainable=False)
    gm, _, csf = truth.tissues
    plain_gm = gm
    if source in ("uptake", "metabolic", "metabolic+gm"):
        factor = np.ones(len(truth.state.age_factor)) if truth.state.gm_uptake is None else truth.state.gm_uptake
        if source != "uptake":
            factor = factor * truth.state.diagnosis_factor
        gm = gm * np.append(factor, 1.0).astype(np.float32)[pt.region_maps(tpl.voxel_mm).index]
    if source == "fine":
        gm, csf = own_tissue_posteriors(work_t1(truth, seed, i), truth.brain > 0.5)[0]  # NATIVE_TISSUE_CHANNELS
    maps = [gm, csf] + ([plain_gm] if source == "metabolic+gm" else [])
    return np.stack([_to_grid(m, tpl.affine, grid) for m in maps])


def subject_tissues(stack: Path, rows: int, grid: Any, source: str) -> np.ndarray:
    """(rows, 2 or 3, *grid): each phantom's tissue maps on ``grid`` (:func:`_subject_tissues`;
    the stack's seed and version; cached beside the stack)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cache = stack / f"{source}_gm_csf.npy"
    if cache.is_file():
        return np.load(cache)
    index = json.loads((stack / "index.json").read_text())
    tasks = [(int(index["seed"]), i, int(index["version"]), grid, source) for i in range(rows)]
    # spawn: a forked child of this torch process deadlocked in its BLAS threads.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        out = np.stack(list(pool.map(_subject_tissues, tasks))).astype(np.float32)
    np.save(cache, out)
    return out


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
                        help="only the variants whose label contains one of these texts")
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
    results: dict[str, Any] = {}
    # A model that reads the native tissue maps takes the stack's (the preprocessing's counterpart).
    native = model.config.anatomy_reading == "native"
    available = {"mri", *(["true", "uptake", "metabolic", "metabolic+gm", "pet73", "fine"] if args.true_tissues else []),
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
    for label, (source, products, space, scales) in chosen.items():
        sigmas = None if scales is None else [fwhm * FWHM_TO_SIGMA / data.grid.voxel_size for fwhm in scales]
        tissues = sources[source]

        def of(rows: np.ndarray) -> np.ndarray | None:
            return None if tissues is None else tissues[rows]

        target = pet[train_rows].reshape(len(train_rows), -1)[:, inside]
        if space == "log":
            target = np.log(np.maximum(target, LOG_FLOOR_SUVR))
        coef = voxelwise_least_squares(design(model, mri[train_rows], side_of(train_rows), products, inside, of(train_rows),
                                              sigmas), target)  # fmt: skip

        def predict(rows: np.ndarray, age: float | None = None, space: str = space) -> np.ndarray:
            x = design(model, mri[rows], side_of(rows, age), products, inside, of(rows), sigmas)
            out = np.zeros((len(rows), inside.size))
            fitted = np.einsum("nvp,vp->nv", x, coef)
            out[:, inside] = np.exp(fitted) if space == "log" else fitted
            return out.reshape(len(rows), *data.grid.shape)

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
        results[label] = entry
        measured = entry["age"].get("measured", {})
        print(f"{label:36s} terms {entry['terms']:2d}  MAE {entry['mae_suvr']:.4f}  SSIM {entry['ssim']:.4f}  "
              f"dev r {entry['deviation_r']:.3f}  pairwise {entry['specificity_synthetic']:.3f} "
              f"(true {entry['specificity_true']:.3f})  age r {measured.get('pearson_r', float('nan')):.3f}  "
              f"ratio {measured.get('median_ratio', float('nan')):.3f}  "
              f"within 25 % {measured.get('within_25_percent', float('nan')):.3f}", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"stack": str(args.stack), "weights": str(args.weights),
                                         "machine": cpu_description(), "split": {"train": len(train_rows),
                                         "val": len(val_rows)}, "variants": results}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
