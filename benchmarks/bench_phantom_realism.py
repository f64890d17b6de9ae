"""Does the phantom's MRI carry its PET's story? Phantom version 1 vs 2.

    python benchmarks/bench_phantom_realism.py --fast-subjects 20 --real-subjects 5 \\
        --work /tmp/realism --out benchmarks/results/phantom_v2_mri_information.json

Per phantom version, on the model grid (default cpu4mm), inside the brain (the voxels every
subject's brain mask holds):

(a) mean pairwise Pearson r between different subjects' preprocessed T1w. docs/DESIGN.md:
    version 1 phantoms correlate 0.997-0.998 after the real preprocessing, two real brains
    0.874; a realistic phantom lands near ~0.85-0.93.
(b) the same for their true PETs (noise-free, SUVR), and for the PET as preprocessed.
(c) the share of the between-subject PET variance (voxelwise, SUVR) that the explainable PET
    (no MRI-invisible factors) accounts for: 1 - sum (pet - explainable)^2 / sum (pet - mean pet)^2.
(d) plausibility: the regional SUVR SD across CN subjects (cerebellum-normalised, the
    DESIGN.md table's regions on the 2 mm work grid; real data 0.13-0.18) and, in version 2,
    the range of ventricle volumes (real: about 10-80 ml at 55-90).

Two paths: the fast path (``make_mni_stack``, N subjects each, no registration) and the real
one: ``make_cohort(voxel_mm=1)`` then ``preprocess.preprocess_t1w`` / ``preprocess_pet`` on a
few subjects (about 40 s each on 2 cores; cached in --work, so a rerun is quick). Prints a
table and writes JSON (with the CPU model from lscpu).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualglow_app import __version__  # noqa: E402
from dualglow_app.grid import ModelGrid, preset  # noqa: E402
from dualglow_app.log import get_logger, setup_logging  # noqa: E402

LOG = get_logger("dualglow.bench")
DESIGN_REAL_BRAINS_R = 0.874
DESIGN_TARGET = (0.85, 0.93)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def mean_pairwise_r(rows: np.ndarray) -> float:
    c = np.corrcoef(rows)
    return float(c[np.triu_indices(len(rows), 1)].mean())


def explained_share(pet: np.ndarray, explainable: np.ndarray) -> float:
    residual = ((pet - explainable) ** 2).sum()
    between = ((pet - pet.mean(0)) ** 2).sum()
    return float(1.0 - residual / between)


def regional_plausibility(seed: int, n: int, version: int) -> dict[str, Any]:
    """Regional SUVR SD across the CN subjects among the first ``n`` (2 mm work grid) and, in
    version 2, their ventricle volumes."""
    from dualglow_app.phantom import anatomy as an
    from dualglow_app.phantom import cohort
    from dualglow_app.phantom import pet as pt
    from dualglow_app.phantom.template import load_template

    tpl = load_template(2.0)
    cal = pt.calibrate(2.0)
    maps = pt.region_maps(2.0)
    table = [i for i, name in enumerate(maps.names) if name in pt.REGION_TARGETS and name != "cerebellar_cortex"]
    reference = maps.names.index("cerebellar_cortex")
    suvr, ventricles = [], []
    for i in range(n):
        traits = cohort.subject_traits(seed, i, 1, tpl, version=version, native=False)
        _, head_pet = an.head_images(tpl, traits.head, cohort._head_shell(2.0), pt.HEAD_ACTIVITY)
        truth = cohort.session_truth(tpl, cal, traits, 0, head_pet, cohort.subject_maps(tpl, traits), False)
        ventricles.append(an.ventricle_target_ml(tpl, truth.atrophy))
        if traits.demographics.diagnosis == "CN":
            regions = pt.measure_regions(truth.pet, maps)
            suvr.append(regions / regions[reference] * pt.REGION_TARGETS["cerebellar_cortex"][0])
    sd = np.array(suvr).std(0)[table] if len(suvr) > 1 else np.full(len(table), np.nan)
    return {"cn_subjects": len(suvr), "regional_suvr_sd_median": round(float(np.median(sd)), 3),
            "regional_suvr_sd_range": [round(float(sd.min()), 3), round(float(sd.max()), 3)],
            "ventricles_ml_range": [round(min(ventricles), 1), round(max(ventricles), 1)],
            "ventricles_ml_p5_p95": [round(float(np.percentile(ventricles, 5)), 1),
                                     round(float(np.percentile(ventricles, 95)), 1)],
            "ventricles_ml_median": round(float(np.median(ventricles)), 1)}


def fast_path(version: int, n: int, seed: int, grid: ModelGrid, work: Path, jobs: int | None) -> dict[str, Any]:
    from dualglow_app.dataset import load_mni_stack
    from dualglow_app.phantom.mni import make_mni_stack

    folder = work / f"mni-stack-v{version}-s{seed}-n{n}-{grid.voxel_size:g}mm"
    start = time.perf_counter()
    make_mni_stack(folder, n, seed=seed, grid=grid, version=version, jobs=jobs, overwrite=True)
    seconds = time.perf_counter() - start
    data = load_mni_stack(folder)
    explainable = np.load(folder / "explainable.npy", mmap_mode="r")
    brain = np.all(np.asarray(data.mask) > 0, axis=0)
    mri, pet, expl = (np.asarray(a)[:, brain] for a in (data.mri, data.pet, explainable))
    return {"subjects": n, "seconds": round(seconds, 1), "s_per_subject_all_jobs": round(seconds / n, 2),
            "mri_pairwise_r": round(mean_pairwise_r(mri), 4), "true_pet_pairwise_r": round(mean_pairwise_r(pet), 4),
            "explainable_pairwise_r": round(mean_pairwise_r(expl), 4),
            "explained_share": round(explained_share(pet, expl), 3), "brain_voxels": int(brain.sum())}


def real_path(version: int, n: int, seed: int, grid: ModelGrid, work: Path, nprocs: int) -> dict[str, Any]:
    from dualglow_app.phantom import anatomy as an
    from dualglow_app.phantom import cohort
    from dualglow_app.phantom import pet as pt
    from dualglow_app.phantom.mni import _grid_refs, _to_grid
    from dualglow_app.phantom.template import load_template
    from dualglow_app.preprocess import preprocess_pet, preprocess_t1w

    bids = work / f"bids-v{version}-s{seed}-n{n}"
    if not (bids / "participants.tsv").is_file():
        cohort.make_cohort(bids, n, seed=seed, voxel_mm=1.0, version=version, overwrite=True, jobs=1)
    tpl = load_template(1.0)
    cal = pt.calibrate(1.0)
    refs = _grid_refs(grid)
    mri: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    pet_pre: list[np.ndarray] = []
    pet_true: list[np.ndarray] = []
    expl: list[np.ndarray] = []
    timings, cached = [], 0
    for i in range(n):
        label = f"sub-{cohort.participant_label(i)}"
        start = time.perf_counter()
        t1 = preprocess_t1w(bids / label / "anat" / f"{label}_T1w.nii.gz", grid, work / "preproc", nprocs)
        suvr = preprocess_pet(bids / label / "pet" / f"{label}_trc-FDG_pet.nii.gz", t1, work / "preproc", nprocs)
        timings.append(time.perf_counter() - start)
        cached += int(t1.from_cache)
        LOG.info("v%d %s preprocessed in %.0f s (cached: %s)", version, label, timings[-1], t1.from_cache)
        mri.append(np.asarray(t1.image.dataobj, dtype=np.float32))
        masks.append(np.asarray(t1.brain_mask.dataobj) > 0)
        pet_pre.append(np.asarray(suvr.image.dataobj, dtype=np.float32))
        # The true PETs of this subject in MNI space, recomputed exactly as make_subject made them.
        traits = cohort.subject_traits(seed, i, 1, tpl, version=version, native=False)
        _, head_pet = an.head_images(tpl, traits.head, cohort._head_shell(1.0), pt.HEAD_ACTIVITY)
        truth = cohort.session_truth(tpl, cal, traits, 0, head_pet, cohort.subject_maps(tpl, traits), True)
        assert truth.explainable is not None
        for out, image in ((pet_true, truth.pet), (expl, truth.explainable)):
            on_grid = _to_grid(image, tpl.affine, grid)
            out.append(on_grid / float(on_grid[refs.reference].mean()))
    brain = np.all(masks, axis=0)
    rows = {name: np.array([a[brain] for a in arrays]) for name, arrays in
            (("mri", mri), ("pet_pre", pet_pre), ("pet_true", pet_true), ("expl", expl))}
    return {"subjects": n, "preprocess_seconds_mean": round(float(np.mean(timings)), 1), "from_cache": cached,
            "mri_pairwise_r": round(mean_pairwise_r(rows["mri"]), 4),
            "true_pet_pairwise_r": round(mean_pairwise_r(rows["pet_true"]), 4),
            "preprocessed_pet_pairwise_r": round(mean_pairwise_r(rows["pet_pre"]), 4),
            "explained_share": round(explained_share(rows["pet_true"], rows["expl"]), 3),
            "brain_voxels": int(brain.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast-subjects", type=int, default=20, help="subjects per version on the fast path")
    parser.add_argument("--real-subjects", type=int, default=5,
                        help="1 mm BIDS subjects per version through the real preprocessing (0: skip)")
    parser.add_argument("--plausibility-subjects", type=int, default=60, help="subjects for (d)")
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--grid", default="cpu4mm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="fast-path worker processes")
    parser.add_argument("--nprocs", type=int, default=2, help="preprocessing threads")
    parser.add_argument("--work", type=Path, default=Path("realism-work"), help="cohorts, stacks, preprocessing cache")
    parser.add_argument("--out", type=Path, default=Path("phantom_v2_mri_information.json"))
    args = parser.parse_args()
    setup_logging(0)
    grid = preset(args.grid)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    for version in args.versions:
        row: dict[str, Any] = {"fast": fast_path(version, args.fast_subjects, args.seed, grid, args.work, args.jobs)}
        if args.plausibility_subjects:
            row["plausibility"] = regional_plausibility(args.seed, args.plausibility_subjects, version)
        if args.real_subjects:
            row["real"] = real_path(version, args.real_subjects, args.seed, grid, args.work, args.nprocs)
        results[version] = row

    lines = [f"{'version':>7} {'path':>5} {'n':>3} {'MRI r':>7} {'PET r':>7} {'PET r pre':>9} {'explained':>9}  extra"]
    for version, row in results.items():
        for path in ("fast", "real"):
            if path not in row:
                continue
            r = row[path]
            extra = (f"{r['s_per_subject_all_jobs']:.2f} s/subject ({args.jobs} job(s))" if path == "fast"
                     else f"preprocessing {r['preprocess_seconds_mean']:.0f} s/subject ({r['from_cache']} from cache)")
            lines.append(f"{version:>7} {path:>5} {r['subjects']:>3} {r['mri_pairwise_r']:>7.4f} "
                         f"{r['true_pet_pairwise_r']:>7.4f} {r.get('preprocessed_pet_pairwise_r', float('nan')):>9.4f} "
                         f"{r['explained_share']:>9.3f}  {extra}")
        if "plausibility" in row:
            p = row["plausibility"]
            lines.append(f"{version:>7} regional SUVR SD in {p['cn_subjects']} CN: median {p['regional_suvr_sd_median']}"
                         f" (range {p['regional_suvr_sd_range']}; real 0.13-0.18); ventricles "
                         f"{p['ventricles_ml_range']} ml (5-95 % {p['ventricles_ml_p5_p95']}), median "
                         f"{p['ventricles_ml_median']}")
    lines.append(f"(DESIGN.md: two real brains correlate {DESIGN_REAL_BRAINS_R}; target ~{DESIGN_TARGET[0]}-"
                 f"{DESIGN_TARGET[1]}; version 1 after the real preprocessing 0.997-0.998)")
    sys.stdout.write("\n".join(lines) + "\n")
    out = {
        "benchmark": "phantom_realism", "dualglow_version": __version__, "grid": args.grid, "seed": args.seed,
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
        "definitions": {
            "mri_pairwise_r": "mean Pearson r between different subjects' preprocessed T1w (fast path: mri.npy) "
                              "on the model grid, inside every subject's brain mask",
            "true_pet_pairwise_r": "the same for the noise-free PET (SUVR, cerebellum)",
            "preprocessed_pet_pairwise_r": "the same for the raw PET through preprocess_pet (noise included)",
            "explained_share": "1 - sum (pet - explainable)^2 / sum (pet - mean pet)^2 over subjects and brain voxels",
            "regional_suvr_sd": "SD across CN subjects of the noise-free PET's regional means (2 mm work grid, "
                                "DESIGN.md table regions but the reference, cerebellar cortex = 1.15)",
        },
        "reference": {"real_brains_r": DESIGN_REAL_BRAINS_R, "target_r": list(DESIGN_TARGET),
                      "version1_after_preprocessing_r": [0.997, 0.998], "real_regional_suvr_sd": [0.13, 0.18]},
        "results": {f"version{v}": r for v, r in results.items()},
        "table": lines,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
