"""Sanity check of a model on real anatomy: Colin27 (one real adult T1w) -> synthetic FDG-PET.

    python benchmarks/model_card_colin27.py --weights models/dualglow-phantom-demo.safetensors \
        --t1w /usr/share/mricron/templates/ch2.nii.gz --png colin27_montage.png

Colin27 ships in Debian's ``mricron-data`` (``ch2.nii.gz``, with skull). The script builds a
one-subject BIDS dataset around it, runs the participant level (the real pipeline: skull strip,
N4, registration, synthesis; 4 samples at T = 0.7, age given with --age because Colin27 has
none in a participants.tsv), and saves the participant report's montage as a PNG for the
model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualglow_app.bids import find_scans, sidecar_path  # noqa: E402
from dualglow_app.derivatives import planned_outputs  # noqa: E402
from dualglow_app.io import atomic_path, write_json  # noqa: E402
from dualglow_app.log import setup_logging  # noqa: E402
from dualglow_app.options import ParticipantOptions  # noqa: E402
from dualglow_app.participant_report import scan_montage  # noqa: E402
from dualglow_app.report import figure_to_png  # noqa: E402
from dualglow_app.synthesize import run_participant  # noqa: E402

DEFAULT_T1W = Path("/usr/share/mricron/templates/ch2.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="model file (default: the shipped model)")
    parser.add_argument("--t1w", type=Path, default=DEFAULT_T1W, help="a real T1w (default: Colin27 of mricron-data)")
    parser.add_argument("--age", type=float, default=70.0, help="age (years) to synthesize at")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--png", type=Path, required=True, help="where to write the montage")
    parser.add_argument("--work", type=Path, default=None, help="work dir (default: a temporary one)")
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args()
    if not args.t1w.is_file():
        parser.error(f"{args.t1w} not found: apt-get install mricron-data, or pass --t1w")
    setup_logging(0)

    with tempfile.TemporaryDirectory(prefix="dualglow-colin27-") as tmp:
        bids = Path(tmp) / "bids"
        (bids / "sub-colin27" / "anat").mkdir(parents=True)
        shutil.copyfile(args.t1w, bids / "sub-colin27" / "anat" / "sub-colin27_T1w.nii.gz")
        write_json(bids / "dataset_description.json", {"Name": "Colin27 (mricron-data)", "BIDSVersion": "1.9.0"})
        options = ParticipantOptions(
            bids_dir=bids, output_dir=Path(tmp) / "out", work_dir=args.work or Path(tmp) / "work",
            weights=str(args.weights) if args.weights else None, age=args.age, samples=args.samples, temperature=args.temperature,
            nprocs=args.nprocs, skip_bids_validation=True,
        )  # fmt: skip
        summary = run_participant(options)
        if summary.exit_code:
            sys.exit(f"participant level failed: {summary.describe()}")
        scan = find_scans(bids)[0]
        planned = planned_outputs(scan, options)
        with atomic_path(args.png) as tmp_png:
            tmp_png.write_bytes(figure_to_png(scan_montage(planned), dpi=80))
        sidecar = json.loads(sidecar_path(planned["mean"]).read_text(encoding="utf-8"))
        suvr = np.asarray(nib.load(planned["mean"]).dataobj)
    brain = suvr[suvr > 0]
    print(f"montage: {args.png}")
    print(f"synthetic SUVR in the brain: 1st/50th/99th percentile {np.percentile(brain, 1):.2f} / "
          f"{np.median(brain):.2f} / {np.percentile(brain, 99):.2f}, max {brain.max():.2f}")
    print(f"clipped to the model's range: {100 * sidecar['ClippedFraction']:.2f} %; MRI latents outside the "
          f"training range: {100 * sidecar.get('LatentsOutsideTrainingRange', float('nan')):.2f} %")


if __name__ == "__main__":
    main()
