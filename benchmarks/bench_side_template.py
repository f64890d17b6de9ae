"""What the side template's least-squares start says about age, for each way of holding the anatomy fixed.

    python benchmarks/bench_side_template.py BIDS_DIR --weights models/NAME.safetensors --test 049-060 \
        -w WORK_DIR --phantom-seed 0 --phantom-version 2 [--fwhm 0 --fwhm 0,8,24 ...] [--json OUT]

A trained model's age sweep is almost all its side template's (``DualGlowConfig.side_template``:
the PET is centred on T + sum_j c_j B_j; for the default model of finding 16 the regional slopes
of its sweep and of its template correlate 0.995), and the template starts from a voxelwise
least-squares fit (:meth:`DualGlow.fit_pet_template`), which training moves only so far (its
age map not at all with ``--side-template-fixed age``, the default since). This bench
refits that start on the model's own training scans (``metadata.training.subjects``), once per
``--fwhm`` set (the MRI at each voxel = 0 and blurred to these FWHMs in mm,
``--side-template-mri-fwhm`` of the group level; with ``--anatomy gm`` its grey-matter
probability, ``--side-template-anatomy``), sweeps each held-out scan's template over the
model benchmark's ages at its own other covariates, and scores the regional slopes against the
swept truth (the same phantoms aged with their anatomy fixed) as ``bench_default_model.py`` does.
The trained model's own template is the last row. No training: a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualglow_app.dataset import DatasetSpec, mean_images, prepare_dataset
from dualglow_app.evaluate.atlases import phantom_regions
from dualglow_app.evaluate.statistics import regional_slopes, swept_slope_agreement
from dualglow_app.imaging import FWHM_TO_SIGMA
from dualglow_app.log import setup_logging
from dualglow_app.model.dualglow import DualGlow
from dualglow_app.phantom.cohort import subject_index
from dualglow_app.regions import regional_mean_matrix
from dualglow_app.tissue import SIDE_TEMPLATE_ANATOMY
from dualglow_app.train import fit_pet_template
from dualglow_app.weights import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_default_model import labels  # noqa: E402
from bench_dualglow_targets import SWEEP_AGES, scan_covariates, true_age_sweeps  # noqa: E402
from bench_learning_curves import cpu_description  # noqa: E402


def template_sweeps(model: DualGlow, scaling: Any, data: Any, rows: np.ndarray, ages: tuple[float, ...],
                    specs: dict[str, Any]) -> np.ndarray:  # fmt: skip
    """(rows, ages, phantom regions): each row's PET template T + sum_j c_j B_j at every age (its
    other covariates its own, encoded by the model's ``specs``), in SUVR, as regional means over
    the row's mask."""
    region_labels, names = phantom_regions(data.grid)
    like = torch.zeros(1, 1, *data.grid.shape)
    out = np.empty((len(rows), len(ages), len(names)))
    for k, row in enumerate(rows):
        own = scan_covariates(data, specs, row)
        images = []
        for age in ages:
            side = {name: torch.tensor([float(age if name == "age" else value)]) for name, value in own.items()}
            encoded = model._encode_side(side, 1, like)
            assert encoded is not None
            images.append(scaling.pet_from_model(model._center(like, "pet", encoded[0]).detach().numpy()[0, 0]))
        out[k] = regional_mean_matrix(np.stack(images), region_labels, len(names), np.asarray(data.mask[row]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--test", required=True, help="held-out subject range, e.g. 049-060")
    parser.add_argument("-w", "--work-dir", type=Path, required=True)
    parser.add_argument("--phantom-seed", type=int, required=True)
    parser.add_argument("--phantom-version", type=int, required=True)
    parser.add_argument("--fwhm", action="append", default=None,
                        help="a set of FWHMs in mm, comma-separated (0 = the voxel's own MRI); repeat for more rows "
                             "(default: 0 | 0,8 | 0,24 | 0,8,24)")  # fmt: skip
    parser.add_argument("--anatomy", action="append", choices=SIDE_TEMPLATE_ANATOMY, default=None,
                        help="what the MRI held fixed is: the T1w, or its grey-matter probability (repeat for both; "
                             "default t1w)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_logging(-1)
    torch.set_num_threads(args.threads)

    loaded = open_model(args.weights, "cpu")
    side_info = list(loaded.covariates)
    training = loaded.metadata.training
    train_labels = [label.removeprefix("sub-") for label in training["subjects"]]
    data = prepare_dataset(DatasetSpec(args.bids_dir, args.work_dir, loaded.grid,
                                       participant_labels=tuple(train_labels + labels(args.test)),
                                       side_info=tuple(side_info)))  # fmt: skip
    train_rows = np.array([data.labels.index(f"sub-{label}") for label in train_labels])
    test_rows = np.array([data.labels.index(f"sub-{label}") for label in labels(args.test)])
    indices = np.array([subject_index(data.labels[row]) for row in test_rows])
    truth = true_age_sweeps((args.phantom_seed, args.phantom_version), data, test_rows, SWEEP_AGES,
                            args.work_dir / "age_truth", indices=indices)  # fmt: skip
    assert truth is not None
    _, names = phantom_regions(data.grid)

    def scored(sweeps: np.ndarray) -> dict[str, Any]:
        slopes = np.nanmean(regional_slopes(sweeps, SWEEP_AGES)[1], axis=0)
        return {**swept_slope_agreement(slopes, truth, SWEEP_AGES), "per_decade": dict(zip(names, slopes.tolist(), strict=True))}

    rows: dict[str, dict[str, Any]] = {}
    for anatomy_name in args.anatomy or ["t1w"]:
        for fwhm_set in args.fwhm or ["0", "0,8", "0,24", "0,8,24"]:
            fwhms = [float(v) for v in fwhm_set.split(",")]
            config = dataclasses.replace(loaded.model.config, anatomy_tissue=anatomy_name, anatomy_template=False,
                                         anatomy_sigmas=[f * FWHM_TO_SIGMA / data.grid.voxel_size for f in fwhms])
            model = DualGlow(config)
            model.set_templates(*mean_images(data, train_rows, loaded.scaling))
            fit_pet_template(model, data, train_rows, side_info)
            label = "MRI" if anatomy_name == "t1w" else "grey-matter probability"
            rows[f"fit, {label} at FWHM {fwhm_set} mm"] = scored(
                template_sweeps(model, loaded.scaling, data, test_rows, SWEEP_AGES, loaded.covariates))
    recorded = training.get("options", {}).get("side_template_mri_fwhm", [0.0])
    rows[f"the trained model's template (fitted at {','.join(f'{v:g}' for v in recorded)} mm)"] = scored(
        template_sweeps(loaded.model, loaded.scaling, data, test_rows, SWEEP_AGES, loaded.covariates))

    print(f"side template's age sweep vs the swept truth of {len(test_rows)} held-out scans; fitted on "
          f"{len(train_rows)} training scans; model {loaded.sha256[:12]}; {cpu_description()['model_name']}")
    print(f"{'template':<64}{'r':>6}{'sign':>6}{'ratio':>7}{'+-25 %':>8}{'caudate':>9}{'thalamus':>9}")
    true = dict(zip(names, next(iter(rows.values()))["true_per_decade"], strict=True))
    for name, row in [*rows.items(), ("swept truth", {"pearson_r": 1, "sign_agreement": 1, "median_ratio": 1,
                                                      "within_25_percent": 1, "per_decade": true})]:  # fmt: skip
        print(f"{name:<64}{row['pearson_r']:>6.2f}{row['sign_agreement']:>6.2f}{row['median_ratio']:>7.2f}"
              f"{row['within_25_percent']:>8.2f}{100 * row['per_decade']['caudate']:>8.1f}%"
              f"{100 * row['per_decade']['thalamus']:>8.1f}%")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"model_sha256": loaded.sha256, "test": [data.labels[r] for r in test_rows],
                                         "train_scans": len(train_rows), "cpu": cpu_description(), "rows": rows},
                                        indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
