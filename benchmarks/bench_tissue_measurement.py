"""How well does the preprocessing measure each subject's grey matter and CSF on the model grid?

    python benchmarks/bench_tissue_measurement.py BIDS_DIR -w WORK_DIR --weights MODEL.safetensors \\
        --phantom-seed 0 --phantom-version 2 [--participant-label 001 002 ...] [--json OUT]

BIDS_DIR is a phantom cohort (``dualglow-phantom`` with that seed and version), so each subject's true grey-matter and CSF fractions on the grid
are known (``bench_interaction.py``'s :func:`subject_tissues`, the MNI-space truth of the same
subject). Measurements of them through the real preprocessing (skull strip, N4, SyN):

- *grid*: what the anatomy template read before the native reading (``--anatomy-reading
  posterior``), the model's tissue mixture's posteriors of the T1w on the grid;
- *grid, partial volume*: the fractions read linearly from the grid T1w's intensity between
  the same mixture's means (``bench_interaction.partial_volume_fractions``);
- *native*: a 3-class Gaussian mixture fitted to each subject's N4-corrected native brain
  (:class:`dualglow_app.tissue.GreyMatterModel`), its posteriors warped to the grid as the
  T1w is (anti-aliased, the same transforms): fractions of the 1 mm voxels in each grid voxel
  (:func:`dualglow_app.preprocess.tissue_maps_on_grid`, ``--anatomy-reading native``);
- *native-fractions*: the same mixture, each native voxel read as partial-volume fractions of
  the two classes its intensity lies between (``--anatomy-reading native-fractions``).

For each, inside the template brain mask: the voxelwise Pearson r with the truth, and the r of
the subject's departure from the cohort's mean (measurement minus the mean measurement against
truth minus the mean truth), which is what following the subject needs. Per region (the
phantom's regions on the grid): the r across subjects of the measured and the true regional
mean grey matter, and the true grey matter's age slope (% of its mean per decade), to see
where atrophy the reading misses could leak into a model's age map. ``bench_interaction.py
--true-tissues`` showed on the MNI stack that the truth itself would take the anatomy
template's deviation r from 0.874 to 0.979 (lab book, finding 25).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_interaction import _subject_tissues, partial_volume_fractions  # noqa: E402
from bench_learning_curves import cpu_description  # noqa: E402

TISSUES = ("gm", "csf")


def agreement(measured: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Voxelwise r with the truth, and r of the departures from the subjects' mean (per subject, averaged)."""
    inside = mask > 0
    plain = [float(np.corrcoef(m[inside], t[inside])[0, 1]) for m, t in zip(measured, truth, strict=True)]
    m_dev, t_dev = measured - measured.mean(0), truth - truth.mean(0)
    departure = [float(np.corrcoef(m[inside], t[inside])[0, 1]) for m, t in zip(m_dev, t_dev, strict=True)]
    return {"r": float(np.mean(plain)), "departure_r": float(np.mean(departure))}


def true_tissues(label: str, seed: int, version: int, grid: Any, mask: np.ndarray) -> np.ndarray:
    """(2, *grid.shape): phantom ``label``'s (sub-XXX) true grey matter and CSF on ``grid``, 0 outside ``mask``."""
    from dualglow_app.phantom.cohort import subject_index

    return _subject_tissues((seed, subject_index(label), version, grid, "true", 1, 0)) * mask


def readings_agreement(readings: dict[str, list[np.ndarray]], truth: np.ndarray,
                       mask: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """{reading: {tissue: :func:`agreement`}} of each reading's (2, *grid) maps per subject with ``truth``."""
    return {name: {tissue: agreement(np.stack(maps)[:, k], truth[:, k], mask) for k, tissue in enumerate(TISSUES)}
            for name, maps in readings.items()}  # fmt: skip


def regional_grey_matter(measured: np.ndarray, truth: np.ndarray, ages: np.ndarray, grid: Any,
                         mask: np.ndarray) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per phantom region: r across subjects of the measured and true regional mean grey matter
    (inside ``mask``), and the true grey matter's age slope in % of its mean per decade."""
    from bench_real_anatomy import grid_regions

    regions = grid_regions(grid)
    inside = np.broadcast_to(mask > 0, measured.shape)
    measured_means, true_means = regions.means(measured, inside), regions.means(truth, inside)
    out = {}
    for k, name in enumerate(regions.names):
        m, t = measured_means[:, k], true_means[:, k]
        if not (np.isfinite(m).all() and np.isfinite(t).all()) or m.std() == 0 or t.std() == 0:
            continue
        out[name] = {"r": float(np.corrcoef(m, t)[0, 1]),
                     "true_gm_percent_per_decade": float(1000.0 * np.polyfit(ages, t, 1)[0] / t.mean())}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("-w", "--work-dir", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True,
                        help="a model (its grid; the grid readings need one with a tissue mixture, i.e. not a native-reading one)")
    parser.add_argument("--phantom-seed", type=int, required=True)
    parser.add_argument("--phantom-version", type=int, required=True)
    parser.add_argument("--participant-label", nargs="*", default=None)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from dualglow_app.dataset import DatasetSpec, find_pairs
    from dualglow_app.log import setup_logging
    from dualglow_app.model.dualglow import _tissue_posteriors
    from dualglow_app.preprocess import preprocess_t1w, tissue_maps_on_grid
    from dualglow_app.templates import brain_mask_on_grid
    from dualglow_app.tissue import MIXTURE_CLASSES, NATIVE_READINGS
    from dualglow_app.weights import open_model

    setup_logging(0)
    loaded = open_model(args.weights, "cpu")
    grid = loaded.grid
    seed, version = args.phantom_seed, args.phantom_version
    scans = find_pairs(DatasetSpec(args.bids_dir, args.work_dir, grid,
                                   participant_labels=tuple(args.participant_label or ())))  # fmt: skip
    mask = brain_mask_on_grid(grid).astype(np.uint8)
    # The grid readings need the model's own tissue mixture, which a native-reading model has no use for.
    with_mixture = "tissue_mixture" in dict(loaded.model.named_buffers())
    truth, labels, ages = [], [], []
    readings: dict[str, list[np.ndarray]] = {name: [] for name in (*(("grid", "grid, partial volume") if with_mixture
                                                                     else ()), *NATIVE_READINGS)}  # fmt: skip
    for scan in scans:
        t1w = preprocess_t1w(scan.t1w, grid, args.work_dir, args.nprocs)
        if with_mixture:
            x = torch.as_tensor(np.asarray(t1w.image.dataobj, np.float32))
            posteriors = _tissue_posteriors(x, loaded.model.get_buffer("tissue_mixture")).numpy()
            readings["grid"].append(np.stack([posteriors[MIXTURE_CLASSES.index(t)] for t in TISSUES]) * mask)
            readings["grid, partial volume"].append(partial_volume_fractions(loaded.model, x[None].numpy(), mask)[0])
        for reading in NATIVE_READINGS:
            readings[reading].append(tissue_maps_on_grid(t1w, args.nprocs, reading))
        truth.append(true_tissues(f"sub-{scan.subject}", seed, version, grid, mask))
        labels.append(f"sub-{scan.subject}")
        ages.append(scan.age)
    truth_a = np.stack(truth)
    result = readings_agreement(readings, truth_a, mask)
    per_region = {name: regional_grey_matter(np.stack(reading)[:, 0], truth_a[:, 0], np.array(ages, float), grid, mask)
                  for name, reading in readings.items()}  # fmt: skip
    print("native reading by region (r of regional GM across subjects; true GM %/decade):")
    for region, row in sorted(per_region["native"].items(), key=lambda item: item[1]["r"]):
        print(f"  {region:22s} r {row['r']:6.3f}   {row['true_gm_percent_per_decade']:7.2f}")
    for name, by_tissue in result.items():
        print(f"{name:21s} " + "  ".join(f"{t}: r {v['r']:.3f}, departure r {v['departure_r']:.3f}"
                                        for t, v in by_tissue.items()))  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bids_dir": str(args.bids_dir), "subjects": labels, "weights": str(args.weights),
                                         "machine": cpu_description(), "agreement": result,
                                         "regional_grey_matter": per_region}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
