"""How well does the preprocessing measure each subject's grey matter and CSF on the model grid?

    python benchmarks/bench_tissue_measurement.py BIDS_DIR -w WORK_DIR --weights MODEL.safetensors \\
        --phantom-seed 0 --phantom-version 2 [--participant-label 001 002 ...] [--json OUT]

BIDS_DIR is a phantom cohort (``dualglow-phantom`` with that seed and version), so each subject's true grey-matter and CSF fractions on the grid
are known (``bench_interaction.py``'s :func:`subject_tissues`, the MNI-space truth of the same
subject). Two measurements of them through the real preprocessing (skull strip, N4, SyN):

- *grid*: what the anatomy template reads today, the model's tissue mixture's posteriors of the
  T1w on the grid (:meth:`DualGlow.anatomy_features` at the voxel);
- *grid, partial volume*: the fractions read linearly from the grid T1w's intensity between
  the same mixture's means (``bench_interaction.partial_volume_fractions``);
- *native*: a 3-class Gaussian mixture fitted to each subject's N4-corrected native brain
  (:class:`dualglow_app.tissue.GreyMatterModel`), its posteriors warped to the grid as the
  T1w is (anti-aliased, the same transforms): fractions of the 1 mm voxels in each grid voxel
  (:func:`dualglow_app.preprocess.tissue_maps_on_grid`, ``--anatomy-reading native``).

For each, inside the template brain mask: the voxelwise Pearson r with the truth, and the r of
the subject's departure from the cohort's mean (measurement minus the mean measurement against
truth minus the mean truth), which is what following the subject needs. ``bench_interaction.py
--true-tissues`` showed on the MNI stack that the truth itself would take the anatomy
template's deviation r from 0.874 to 0.979 (lab book, finding 25).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("-w", "--work-dir", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True, help="a model with the anatomy template (its tissue mixture)")
    parser.add_argument("--phantom-seed", type=int, required=True)
    parser.add_argument("--phantom-version", type=int, required=True)
    parser.add_argument("--participant-label", nargs="*", default=None)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from dualglow_app.dataset import DatasetSpec, find_pairs
    from dualglow_app.log import setup_logging
    from dualglow_app.phantom.cohort import subject_index
    from dualglow_app.preprocess import preprocess_t1w, tissue_maps_on_grid
    from dualglow_app.templates import brain_mask_on_grid
    from dualglow_app.weights import open_model

    setup_logging(0)
    loaded = open_model(args.weights, "cpu")
    grid = loaded.grid
    seed, version = args.phantom_seed, args.phantom_version
    scans = find_pairs(DatasetSpec(args.bids_dir, args.work_dir, grid,
                                   participant_labels=tuple(args.participant_label or ())))  # fmt: skip
    mask = brain_mask_on_grid(grid).astype(np.uint8)
    truth, grid_reading, pv_reading, native_reading, labels = [], [], [], [], []
    for scan in scans:
        t1w = preprocess_t1w(scan.t1w, grid, args.work_dir, args.nprocs)
        x = torch.as_tensor(np.asarray(t1w.image.dataobj, np.float32))[None, None]
        features = loaded.model.anatomy_features(x)[0, :, 0].numpy()  # tissue-major, sigma 0 first
        per_tissue = len(loaded.model.config.anatomy_sigmas)
        grid_reading.append(np.stack([features[k * per_tissue] for k in range(len(TISSUES))]) * mask)
        pv_reading.append(partial_volume_fractions(loaded.model, x[:, 0].numpy(), mask)[0])
        native_reading.append(tissue_maps_on_grid(t1w, args.nprocs))
        truth.append(_subject_tissues((seed, subject_index(f"sub-{scan.subject}"), version, grid, "true")) * mask)
        labels.append(f"sub-{scan.subject}")
    truth_a = np.stack(truth)
    readings = {"grid": grid_reading, "grid, partial volume": pv_reading, "native": native_reading}
    result = {name: {tissue: agreement(np.stack(reading)[:, k], truth_a[:, k], mask) for k, tissue in enumerate(TISSUES)}
              for name, reading in readings.items()}  # fmt: skip
    for name, by_tissue in result.items():
        print(f"{name:21s} " + "  ".join(f"{t}: r {v['r']:.3f}, departure r {v['departure_r']:.3f}"
                                        for t, v in by_tissue.items()))  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bids_dir": str(args.bids_dir), "subjects": labels, "weights": str(args.weights),
                                         "machine": cpu_description(), "agreement": result}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
