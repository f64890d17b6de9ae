"""Where a DUAL-GLOW checkpoint's likelihood breaks: per-level latent statistics, training vs validation scans.

    python benchmarks/diag_latents.py --mni-stack STACK --checkpoint WORK/LABEL/train/LABEL/checkpoint.pt

For each scan (the split of ``dataset.split_subjects`` with ``--val-fraction``/``--seed``),
per level i: the RMS and largest |value| of the MRI latent zm_i, the largest |mu_i| of the
relation network, the smallest log sigma_i, and the PET latent's standardised residual
(zp_i - mu_i) / sigma_i (mean square, largest); then bpd(PET | MRI) and bpd(MRI). A scan
whose MRI latents are far beyond the training scans' (finding 14 of docs/MODEL_EXPERIMENTS.md:
a validation MRI with larger ventricles, top latent 1340 against <= 57) is what makes the
validation bpd diverge. Reads the checkpoint with ``weights.load_checkpoint`` (tensors only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualglow_app.data import IntensityScaling  # noqa: E402
from dualglow_app.dataset import load_mni_stack, model_batch, split_subjects  # noqa: E402
from dualglow_app.model import DualGlow, DualGlowConfig  # noqa: E402
from dualglow_app.weights import load_checkpoint  # noqa: E402

COLUMNS = ("zm RMS", "zm max", "mu max", "log sigma min", "residual^2", "residual max")


def scan_statistics(model: DualGlow, batch: object) -> tuple[list[list[float]], float, float]:
    """Per level the :data:`COLUMNS` of one scan, and its bpd(PET | MRI) and bpd(MRI)."""
    mri, pet, side = batch.mri, batch.pet, batch.side  # type: ignore[attr-defined]
    with torch.no_grad():
        encoded = model._encode_side(side, 1, mri)
        c = encoded[0] if encoded is not None else None
        zm, _ = model.flow_mri(model._dequantize(mri, False, "mri"))
        zp, _ = model.flow_pet(model._dequantize(pet, False, "pet", c, mri))
        levels = []
        for i, (z_m, z_p) in enumerate(zip(zm, zp, strict=True)):
            mu, log_sigma = model._relation(i, z_m, c)
            residual = (z_p - mu) / log_sigma.exp()
            levels.append([z_m.pow(2).mean().sqrt().item(), z_m.abs().max().item(), mu.abs().max().item(),
                           log_sigma.min().item(), residual.pow(2).mean().item(), residual.abs().max().item()])
        nll = model.nll(mri, pet, side)
    return levels, nll["bpd_pet_given_mri"].item(), nll["bpd_mri"].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mni-stack", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side-info", default="age")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_mni_stack(args.mni_stack)
    train_rows, val_rows = split_subjects(data.subjects, args.val_fraction, args.seed)
    state = load_checkpoint(args.checkpoint)
    model = DualGlow(DualGlowConfig.from_dict(state["fingerprint"]["config"]))
    model.load_state_dict(state["model"])
    model.eval()
    side_info = [s for s in args.side_info.split(",") if s]
    print(f"checkpoint of epoch {state['epoch']}")
    for name, rows in (("training", train_rows), ("validation", val_rows)):
        print(f"\n{name} scans: per level, the median over scans and the largest")
        stats, bpds = [], []
        for row in rows:
            batch = model_batch(data, np.array([row]), IntensityScaling(), torch.device("cpu"), side_info, True)
            levels, bpd_pet, bpd_mri = scan_statistics(model, batch)
            stats.append(levels)
            bpds.append((bpd_pet, bpd_mri))
            if name == "validation":
                print(f"  {data.labels[row]}: top zm max {levels[-1][1]:.1f}, bpd(PET|MRI) {bpd_pet:.2f}, bpd(MRI) {bpd_mri:.2f}")
        table = np.array(stats)
        for level in range(table.shape[1]):
            cells = ", ".join(f"{col} {np.median(table[:, level, k]):.2f} / {table[:, level, k].max():.2f}"
                              for k, col in enumerate(COLUMNS))  # fmt: skip
            print(f"  level {level}: {cells}")
        bpd = np.array(bpds)
        print(f"  bpd(PET|MRI) {np.median(bpd[:, 0]):.2f} / {bpd[:, 0].max():.2f}, bpd(MRI) {np.median(bpd[:, 1]):.2f} / {bpd[:, 1].max():.2f}")


if __name__ == "__main__":
    main()
