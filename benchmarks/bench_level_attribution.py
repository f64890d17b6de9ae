"""Which level of a DUAL-GLOW's PET latents limits how well it follows the subject.

    python benchmarks/bench_level_attribution.py phantom200_v2 --weights models/dualglow-phantom-demo.safetensors \
        --train 001-048,061-200 --test 049-060 -w work --json benchmarks/results/level_attribution.json

Each scan's true PET is encoded by the model's PET flow (centred as in training, each value
mid-bin); at each level i the relation network's prior mean mu_i (from the scan's MRI and
covariates, as at synthesis) is compared with the encoded truth zp_i:

- R^2 = 1 - sum (zp_i - mu_i)^2 / sum (zp_i - mean zp_i)^2: the share of the latent the prior
  predicts (held-out scans, and the first ``--train-scans`` training scans for overfitting);
- the least-squares slope of zp_i on mu_i: 1 for a calibrated conditional mean, above 1 when
  the prior's mean is shrunk towards 0;
- the deviation r (:func:`dualglow_app.metrics.deviation_correlation`, against the mean
  training PET) of the T = 0 mode with level i's latents replaced by the truth's: how much of
  the gap to a perfect synthesis that level's prediction accounts for;
- with ``--ridge``: the held-out R^2 of a ridge regression (dual form, every position to every
  position, fitted on all training scans) from the MRI latents of the same level, and of all
  levels, to the PET latent: whether the MRI flow's latents hold more than the relation
  network reads, and whether other levels' MRI latents would add to it. The penalty is
  ``--ridge-alpha`` times the mean of the kernel's diagonal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_default_model import add_split_arguments, labels, split_data  # noqa: E402

from dualglow_app.log import setup_logging  # noqa: E402
from dualglow_app.metrics import deviation_correlation  # noqa: E402
from dualglow_app.weights import open_model  # noqa: E402


def scan_tensors(loaded, data, row: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:  # type: ignore[no-untyped-def]
    """A scan's MRI and PET on the model's scale and its covariates as the model takes them."""
    scaling = loaded.scaling
    side = {name: torch.tensor([spec.encode(data.covariate_values(name)[row])]) for name, spec in loaded.covariates.items()}
    mri = torch.from_numpy(scaling.mri_to_model(np.asarray(data.mri[row])))[None, None]
    pet = torch.from_numpy(scaling.pet_to_model(np.asarray(data.pet[row])))[None, None]
    return mri, pet, side or None


def level_statistics(loaded, data, rows, mean_pet: np.ndarray, swap: bool) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """Per level, the mean over ``rows`` of R^2, slope and (``swap``) the swapped mode's deviation r."""
    model, scaling = loaded.model, loaded.scaling
    per_scan: dict[str, list[list[float]]] = {"r2": [], "slope": [], "deviation_r_with_true_level": []}
    for row in rows:
        mri, pet, side = scan_tensors(loaded, data, int(row))
        with torch.no_grad():
            prior = model.conditional_prior(mri, side)
            truth_latents, _ = model.flow_pet(model._dequantize(pet, noise=False, modality="pet", c=prior.side, x_mri=mri))
        r2, slope, swapped = [], [], []
        for i, (z, mu) in enumerate(zip(truth_latents, prior.mu, strict=True)):
            z, mu = z.double(), mu.double()
            r2.append(float(1 - ((z - mu) ** 2).sum() / ((z - z.mean()) ** 2).sum()))
            slope.append(float((z * mu).sum() / (mu * mu).sum()))
            if swap:
                mixed = [truth_latents[j] if j == i else prior.mu[j] for j in range(len(prior.mu))]
                with torch.no_grad():
                    image = model._quantize_back(model.flow_pet.inverse(mixed), "pet", prior.side, mri)
                suvr, _ = scaling.synthetic_pet(image[0, 0].float().numpy()[None])
                mask = np.asarray(data.mask[row])
                swapped.append(deviation_correlation(suvr[0] * (mask > 0), np.asarray(data.pet[row]), mean_pet, mask))
        per_scan["r2"].append(r2)
        per_scan["slope"].append(slope)
        if swap:
            per_scan["deviation_r_with_true_level"].append(swapped)
    return {key: np.mean(values, axis=0).tolist() for key, values in per_scan.items() if values}


def encode(loaded, data, row: int) -> tuple[list[np.ndarray], list[np.ndarray]]:  # type: ignore[no-untyped-def]
    """A scan's MRI latents and its true PET's latents, flattened, per level."""
    model = loaded.model
    mri, pet, side = scan_tensors(loaded, data, row)
    with torch.no_grad():
        zm, c = model._mri_latents(mri, side)
        zp, _ = model.flow_pet(model._dequantize(pet, noise=False, modality="pet", c=c, x_mri=mri))
    return [z.flatten().double().numpy() for z in zm], [z.flatten().double().numpy() for z in zp]


def ridge_r2(loaded, data, train_rows, test_rows, alpha: float) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """Per PET level, the held-out R^2 of ridge regressions from the MRI latents (see the docstring)."""
    latents = [encode(loaded, data, int(row)) for row in np.concatenate([train_rows, test_rows])]
    n = len(train_rows)
    levels = len(latents[0][1])
    out: dict[str, list[float]] = {"own level": [], "all levels": []}
    for level in range(levels):
        target = np.stack([pet[level] for _, pet in latents])
        for name, inputs in (("own level", [level]), ("all levels", list(range(levels)))):
            x = np.concatenate([np.stack([mri[k] for mri, _ in latents]) for k in inputs], axis=1)
            x_mean, y_mean = x[:n].mean(axis=0), target[:n].mean(axis=0)
            xc, yc = x[:n] - x_mean, target[:n] - y_mean
            kernel = xc @ xc.T
            dual = np.linalg.solve(kernel + alpha * np.trace(kernel) / n * np.eye(n), yc)
            # (test x train kernel) @ dual: never the (inputs x outputs) weight matrix, which can be
            # tens of GB.
            predicted = ((x[n:] - x_mean) @ xc.T) @ dual + y_mean
            truth = target[n:]
            out[name].append(float(1 - ((truth - predicted) ** 2).sum()
                                   / ((truth - truth.mean(axis=1, keepdims=True)) ** 2).sum()))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_arguments(parser)
    parser.add_argument("--train-scans", type=int, default=24, help="training scans scored for comparison")
    parser.add_argument("--ridge", action="store_true", help="also the ridge regressions from the MRI latents")
    parser.add_argument("--ridge-alpha", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup_logging(-1)
    torch.set_num_threads(args.threads)
    loaded = open_model(args.weights, "cpu")
    data, train_rows, test_rows = split_data(args, loaded)
    mean_pet = np.asarray(data.pet[train_rows]).mean(axis=0)
    held_out = level_statistics(loaded, data, test_rows, mean_pet, swap=True)
    training = level_statistics(loaded, data, train_rows[: args.train_scans], mean_pet, swap=False)
    ridge = ridge_r2(loaded, data, train_rows, test_rows, args.ridge_alpha) if args.ridge else None
    levels = len(held_out["r2"])
    print(f"{'level':<7}{'R2 held-out':>13}{'R2 training':>13}{'slope held-out':>16}{'dev r, this level true':>24}"
          + (f"{'ridge R2, own level':>21}{'ridge R2, all levels':>22}" if ridge else ""))  # fmt: skip
    for i in range(levels):
        print(f"{i + 1:<7}{held_out['r2'][i]:>13.3f}{training['r2'][i]:>13.3f}{held_out['slope'][i]:>16.3f}"
              f"{held_out['deviation_r_with_true_level'][i]:>24.3f}"
              + (f"{ridge['own level'][i]:>21.3f}{ridge['all levels'][i]:>22.3f}" if ridge else ""))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "model": str(args.weights), "model_sha256": loaded.sha256, "test": labels(args.test),
            "train_scans_scored": int(min(args.train_scans, len(train_rows))), "held_out": held_out, "training": training,
            "ridge": None if ridge is None else {"alpha": args.ridge_alpha, "held_out_r2": ridge},
        }, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
