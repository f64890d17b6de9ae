"""Which measures of atrophy, as extra MRI terms of the PET template's linear start, take it out of the age slopes?

    python benchmarks/bench_atrophy_terms.py phantom200_v2 -w WORK --train-of models/dualglow-phantom-demo.json \
        --test 049-060 --side-info age diagnosis --phantom-seed 0 --phantom-version 2 [--json OUT]

The anatomy template's least-squares start (:meth:`DualGlow.fit_pet_template`: per voxel, the
PET on 1, the covariates and the grey matter at 0, 8 and 24 mm) overshoots the phantom's age
slopes (the median region 1.2x the swept truth): whatever atrophy the grey-matter probability
misses is taken as age. This bench adds candidate measures of atrophy as further columns of
that per-voxel regression, fitted in numpy on the same training scans, and scores each
variant's held-out predictions and age sweep as ``bench_linear_anatomy.py`` does:

- ``csf``: the mixture's CSF posterior at 0, 8 and 24 mm (``tissue.GreyMatterModel``; what
  ``--side-template-anatomy gm+csf`` gives the model);
- ``jacobian``: the log-determinant of the Jacobian of the T1w's SyN warp to MNI (local volume
  change, the deformable part only), read from the preprocessing's cached transforms
  (``WORK/cache/t1w-*``), anti-aliased to the model grid, at 0, 8 and 24 mm, with
  ``--jacobian-fwhm``;
- ``global``: each scan's mean grey-matter and CSF probability in the brain (whole-brain
  atrophy, a covariate measured without the voxel's noise).

No training; about a minute per variant on one core after the Jacobians (a second per scan).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from dualglow_app.data import IntensityScaling
from dualglow_app.dataset import DatasetSpec, model_batch, prepare_dataset
from dualglow_app.evaluate.statistics import explainable_truth
from dualglow_app.grid import resolve_grid
from dualglow_app.imaging import FWHM_TO_SIGMA
from dualglow_app.log import progress, setup_logging
from dualglow_app.metrics import deviation_correlation, mean_pairwise_correlation
from dualglow_app.phantom.cohort import subject_index
from dualglow_app.tissue import GreyMatterModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dualglow_targets import SWEEP_AGES, sweep_agreement, true_age_sweeps  # noqa: E402
from bench_linear_anatomy import encoded_covariates, linear_model  # noqa: E402
from perfkit import labels  # noqa: E402

#: The variants scored, each a set of extra terms beside the grey matter's.
VARIANTS = ((), ("csf",), ("jacobian",), ("global",), ("csf", "jacobian"), ("csf", "jacobian", "global"))


def log_jacobians(data: Any, bids_dir: Path, work_dir: Path, grid: Any) -> np.ndarray:
    """(scans, *grid.shape): the log-Jacobian determinant of each T1w's cached SyN warp to MNI
    (the deformable part), anti-aliased and resampled onto the model grid, 0 outside the brain."""
    import ants

    from dualglow_app.preprocess import _anti_alias, grid_reference

    by_source = {json.loads(meta.read_text())["source"]: meta.parent for meta in work_dir.glob("cache/t1w-*/meta.json")}
    target = grid_reference(grid.affine, grid.shape)
    out = np.zeros((len(data), *grid.shape), np.float32)
    for row, label in enumerate(progress(data.labels, "log-Jacobians")):
        source = str(bids_dir.resolve() / label / "anat" / f"{label}_T1w.nii.gz")
        if source not in by_source:
            sys.exit(f"{source}: no cached T1w registration in {work_dir}/cache; run the group level's preprocessing first")
        warp = str(by_source[source] / "t1w2mni_1Warp.nii.gz")
        domain = ants.split_channels(ants.image_read(warp))[0]
        logjac = ants.create_jacobian_determinant_image(domain, warp, do_log=True)
        out[row] = ants.resample_image_to_target(_anti_alias(logjac, grid.voxel_size), target, interp_type="linear").numpy()
    return out * (np.asarray(data.mask) > 0)


def blurred(volume: np.ndarray, fwhms: list[float], voxel_mm: float) -> np.ndarray:
    """(len(fwhms), *volume.shape): the volume at each FWHM in mm (0: itself), zeros beyond it."""
    return np.stack([volume if f == 0 else gaussian_filter(volume, f * FWHM_TO_SIGMA / voxel_mm, mode="constant")
                     for f in fwhms])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("-w", "--work-dir", type=Path, required=True)
    parser.add_argument("--train-of", type=Path, required=True, metavar="MODEL_JSON", help="a model's training subjects")
    parser.add_argument("--test", required=True, help="held-out subject ranges, e.g. 049-060")
    parser.add_argument("--side-info", nargs="*", default=["age"])
    parser.add_argument("--fwhm", default="0,8,24", help="FWHMs in mm of the grey-matter and CSF terms")
    parser.add_argument("--jacobian-fwhm", default="0,8,24", help="FWHMs in mm of the log-Jacobian terms")
    parser.add_argument("--grid", default="cpu4mm")
    parser.add_argument("--phantom-seed", type=int, required=True)
    parser.add_argument("--phantom-version", type=int, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if "age" not in args.side_info:
        parser.error("--side-info must include age (the bench scores the age sweep)")
    setup_logging(0)
    torch.set_num_threads(1)

    grid = resolve_grid(args.grid)
    trained = [label.removeprefix("sub-") for label in json.loads(args.train_of.read_text())["metadata"]["training"]["subjects"]]
    tested = labels(args.test)
    data = prepare_dataset(DatasetSpec(args.bids_dir, args.work_dir, grid, participant_labels=tuple(trained + tested),
                                       side_info=tuple(args.side_info)))  # fmt: skip
    train_rows = np.array([data.labels.index(f"sub-{label}") for label in trained])
    test_rows = np.array([data.labels.index(f"sub-{label}") for label in tested])
    fwhms = [float(v) for v in args.fwhm.split(",")]
    jacobian_fwhms = [float(v) for v in args.jacobian_fwhm.split(",")]
    scaling = IntensityScaling()
    masks = np.asarray(data.mask) > 0
    rows = np.concatenate([train_rows, test_rows])

    # The grey-matter start as the product fits it: its encoded covariates and grey-matter terms.
    base = linear_model(data, train_rows, list(args.side_info), "gm", fwhms)
    tissues = GreyMatterModel.fit((scaling.mri_to_model(np.asarray(data.mri[r])) for r in train_rows),
                                  (masks[r] for r in train_rows), seed=0)  # fmt: skip
    jacobian = log_jacobians(data, args.bids_dir, args.work_dir, grid)
    batches, encoded, terms = {}, {}, {}
    for row in rows:
        batches[row] = batch = model_batch(data, np.array([row]), scaling, torch.device("cpu"), args.side_info)
        with torch.no_grad():
            grey = base.anatomy_features(batch.mri.double()).numpy().reshape(-1, *grid.shape)
        mri = scaling.mri_to_model(np.asarray(data.mri[row]))
        csf = tissues.probability(mri, "csf") * masks[row]
        terms[row] = {"gm": grey, "csf": blurred(csf, fwhms, grid.voxel_size),
                      "jacobian": blurred(jacobian[row], jacobian_fwhms, grid.voxel_size),
                      "global": np.array([grey[0][masks[row]].mean(), csf[masks[row]].mean()])}  # fmt: skip

    def covariates(row: int, age: float | None = None) -> np.ndarray:
        """The scan's encoded covariates as the model encodes them, at ``age`` if given."""
        key = (row, age)
        if key not in encoded:
            c = encoded_covariates(base, batches[row], age)
            assert c is not None  # --side-info includes age
            encoded[key] = c[0].numpy()
        return encoded[key]

    def design(row: int, extra: tuple[str, ...], age: float | None = None) -> np.ndarray:
        """(voxels, parameters): 1, the covariates, the grey matter's terms, the extra terms."""
        c = covariates(row, age)
        parts = [np.ones((1, *grid.shape)), np.broadcast_to(c[:, None, None, None], (len(c), *grid.shape)), terms[row]["gm"]]
        for name in extra:
            value = terms[row][name]
            parts.append(np.broadcast_to(value[:, None, None, None], (len(value), *grid.shape)) if name == "global" else value)
        return np.concatenate(parts).reshape(len(np.concatenate(parts)), -1).T

    origin = (args.phantom_seed, args.phantom_version)
    indices = np.array([subject_index(data.labels[r]) for r in test_rows])
    swept = true_age_sweeps(origin, data, test_rows, SWEEP_AGES, args.work_dir / "age_truth", indices=indices)
    explainable = explainable_truth(origin, indices.tolist(), grid, cache=args.work_dir / "explainable_truth")
    reference = np.asarray(data.pet[train_rows]).mean(0)
    results: dict[str, Any] = {"train": len(train_rows), "test": [data.labels[r] for r in test_rows], "side_info": args.side_info,
                               "fwhm_mm": fwhms, "jacobian_fwhm_mm": jacobian_fwhms, "rows": {}}  # fmt: skip
    print(f"{len(train_rows)} training, {len(test_rows)} held-out scans; covariates {args.side_info}; grey matter at {args.fwhm} mm")
    print(f"{'terms beside the grey matter':32s} {'MAE':>7s} {'dev r':>6s} {'expl.':>6s} {'pairw.':>6s}   age vs swept truth: r / sign / ratio / within")
    for extra in VARIANTS:
        gram, moments = None, None
        for row in train_rows:
            x = design(row, extra)
            y = scaling.pet_to_model(np.asarray(data.pet[row], np.float64)).reshape(-1)
            gram = np.einsum("vp,vq->vpq", x, x) + (0 if gram is None else gram)
            moments = x * y[:, None] + (0 if moments is None else moments)
        coef = np.einsum("vpq,vq->vp", np.linalg.pinv(gram), moments)

        def predict(row: int, age: float | None = None, extra: tuple[str, ...] = extra, coef: np.ndarray = coef) -> np.ndarray:
            centre = np.einsum("vp,vp->v", design(row, extra, age), coef).reshape(grid.shape)
            return scaling.pet_from_model(np.clip(centre, 0.0, 1.0)) * masks[row]

        predictions = np.stack([predict(row) for row in test_rows])
        truths = [np.asarray(data.pet[row]) for row in test_rows]
        score = {
            "mae_suvr": float(np.mean([np.abs(p - t)[masks[r]].mean() for p, t, r in zip(predictions, truths, test_rows, strict=True)])),
            "deviation_r": float(np.mean([deviation_correlation(p, t, reference, masks[r])
                                          for p, t, r in zip(predictions, truths, test_rows, strict=True)])),
            "deviation_r_explainable": float(np.mean([deviation_correlation(p, explainable[k], reference, masks[r])
                                                      for k, (p, r) in enumerate(zip(predictions, test_rows, strict=True))])),
            "pairwise_r": mean_pairwise_correlation(predictions, masks[test_rows]),
        }  # fmt: skip
        age = sweep_agreement(lambda row, predict=predict: np.stack([predict(row, a) for a in SWEEP_AGES]), data, test_rows,
                              SWEEP_AGES, np.asarray(data.age)[train_rows], swept)  # fmt: skip
        score["age"] = age
        name = "+".join(extra) or "(grey matter alone)"
        results["rows"][name] = score
        m = age["measured"]
        print(f"{name:32s} {score['mae_suvr']:7.4f} {score['deviation_r']:6.3f} {score['deviation_r_explainable']:6.3f} "
              f"{score['pairwise_r']:6.3f}   {m['pearson_r']:.2f} / {m['sign_agreement']:.2f} / {m['median_ratio']:.2f} / "
              f"{m['within_25_percent']:.2f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
