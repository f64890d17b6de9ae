"""How wide is a brain's pure grey matter on its T1w? Phantoms beside real brains.

    python benchmarks/bench_gm_spread.py LABEL=FOLDER [LABEL=FOLDER ...] [--json OUT]

Each FOLDER is searched for the preprocessing's native tissue caches (``*-tissues-*/meta.json``,
:func:`dualglow_app.preprocess.tissue_maps_on_grid`): a phantom cohort's work folder after a
group level or ``bench_linear_anatomy.py`` with ``--anatomy-reading native-pve``, and
``bench_real_anatomy.py``'s cache after ``bench_reading_on_real_brains.py`` (Colin27 and the
MPRAGE, each its own row). Each cache records its subject's own mixture fitted to the
N4-corrected native brain; in units of its CSF-to-WM distance:

- *partial-volume mixture* (``native-pve``, :class:`dualglow_app.tissue.PartialVolumeMixture`):
  the pure grey matter's SD, where its mean sits between CSF (0) and WM (1), and the share of
  the brain on the two boundaries;
- *three-class mixture* (``native``, :class:`dualglow_app.tissue.GreyMatterModel`): the grey
  matter's SD and mean (the pure tissue and the partial volume together).

A phantom whose T1w is linear in its tissue fractions has a narrow pure grey matter (version 2:
4.8 % of the distance); real T1w grey matter varies by itself (lab book, findings 32-33).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

#: Groups of at most this many brains also print each brain.
FEW = 3


def mixture_figures(meta: dict[str, Any]) -> dict[str, float]:
    """One cache's mixture in units of its CSF-to-WM distance.

    >>> meta = {"reading": "native-pve", "mixture": {"weights": [0.1, 0.2, 0.2, 0.2, 0.3],
    ...         "means": [0.2, 0.5, 1.0], "variances": [0.01, 0.0016, 0.01]}}
    >>> mixture_figures(meta)
    {'gm_sd': 0.05, 'gm_position': 0.375, 'boundary_share': 0.5}
    """
    mixture = meta["mixture"]
    weights, means, variances = (np.asarray(mixture[k], float) for k in ("weights", "means", "variances"))
    order = np.argsort(means)
    means, sds = means[order], np.sqrt(variances[order])
    distance = means[2] - means[0]
    out = {"gm_sd": round(float(sds[1] / distance), 4), "gm_position": round(float((means[1] - means[0]) / distance), 4)}
    if len(weights) == 5:  # the partial-volume mixture: CSF, GM, WM, CSF/GM, GM/WM
        out["boundary_share"] = round(float(weights[3:].sum()), 4)
    return out


def gather(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per reading, per source T1w: the figures of every native tissue cache under ``folder``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path in sorted(folder.rglob("*-tissues-*/meta.json")):
        meta = json.loads(path.read_text())
        if "mixture" not in meta or meta.get("reading") not in ("native", "native-pve"):
            continue
        out.setdefault(meta["reading"], {})[Path(meta["source"]).name] = mixture_figures(meta)
    return out


def summary(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Median and 5-95 % range of each figure over a group's subjects."""
    out: dict[str, Any] = {"n": len(rows)}
    for key in next(iter(rows.values())):
        values = np.array([row[key] for row in rows.values()])
        out[key] = {"median": round(float(np.median(values)), 4),
                    "p5": round(float(np.percentile(values, 5)), 4), "p95": round(float(np.percentile(values, 95)), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="+", metavar="LABEL=FOLDER")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    for group in args.groups:
        label, _, name = group.partition("=")
        folder = Path(name).expanduser()
        if not name or not folder.is_dir():
            parser.error(f"{group}: give LABEL=FOLDER with an existing folder")
        found = gather(folder)
        if not found:
            parser.error(f"{folder}: no native tissue caches (*-tissues-*/meta.json) with a native or native-pve reading")
        result[label] = {reading: {"subjects": rows, "summary": summary(rows)} for reading, rows in found.items()}
    print(f"{'group':14s} {'reading':11s} {'n':>4s}  {'GM SD (median, 5-95 %)':26s} {'GM position':24s} boundary share")
    for label, readings in result.items():
        for reading, entry in readings.items():
            s = entry["summary"]
            cells = [f"{s[k]['median']:.3f} ({s[k]['p5']:.3f}-{s[k]['p95']:.3f})" if k in s else "-"
                     for k in ("gm_sd", "gm_position", "boundary_share")]  # fmt: skip
            print(f"{label:14s} {reading:11s} {s['n']:4d}  {cells[0]:26s} {cells[1]:24s} {cells[2]}")
            if s["n"] <= FEW:  # a few brains (the real ones): each on its own line
                for source, row in entry["subjects"].items():
                    print(f"  {source[:33]:33s} {row['gm_sd']:<26.3f} {row['gm_position']:<24.3f} {row.get('boundary_share', '-')}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
