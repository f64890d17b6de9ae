"""The capacity benchmark's carrying helpers: a stack survives pack + unpack as float16 values,
and collect sends back the histories and the best models that fit under the cap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_capacity import collect, pack, parse_settings, unpack  # noqa: E402


def fake_stack(folder: Path, n: int = 5) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    np.save(folder / "mri.npy", rng.random((n, 4, 4, 4), dtype=np.float32))
    np.save(folder / "pet.npy", 3 * rng.random((n, 4, 4, 4), dtype=np.float32))
    np.save(folder / "mask.npy", np.broadcast_to((rng.random((4, 4, 4)) > 0.5).astype(np.uint8), (n, 4, 4, 4)))
    np.save(folder / "explainable.npy", rng.random((n, 4, 4, 4), dtype=np.float32))
    np.save(folder / "tissue_maps.npy", rng.random((n, 2, 4, 4, 4), dtype=np.float32))
    (folder / "index.json").write_text(json.dumps({"Kind": "mni-stack", "labels": [f"sub-{i}" for i in range(n)],
                                                   "age": list(range(60, 60 + n)), "seed": 0}))  # fmt: skip


def test_pack_and_unpack_keep_the_first_subjects_rounded_to_float16(tmp_path: Path) -> None:
    fake_stack(tmp_path / "stack")
    pack(tmp_path / "stack", tmp_path / "carry" / "s.npz", subjects=3)
    unpack(tmp_path / "carry" / "s.npz", tmp_path / "back", explainable_from=tmp_path / "stack")
    for name in ("mri", "pet", "tissue_maps"):
        original = np.load(tmp_path / "stack" / f"{name}.npy")[:3]
        back = np.load(tmp_path / "back" / f"{name}.npy")
        assert back.dtype == np.float32 and np.array_equal(back, original.astype(np.float16).astype(np.float32))
    assert np.array_equal(np.load(tmp_path / "back" / "mask.npy"), np.load(tmp_path / "stack" / "mask.npy")[:3])
    assert np.load(tmp_path / "back" / "explainable.npy").shape[0] == 3
    index = json.loads((tmp_path / "back" / "index.json").read_text())
    assert index["labels"] == ["sub-0", "sub-1", "sub-2"] and index["age"] == [60, 61, 62] and index["seed"] == 0


def test_collect_sends_the_models_of_the_lowest_validation_mae_that_fit(tmp_path: Path) -> None:
    for label, mae, mib in (("a", 0.06, 3), ("b", 0.05, 3), ("c", 0.07, 1)):
        models = tmp_path / "work" / label / "out" / "models"
        models.mkdir(parents=True)
        (models / f"{label}.safetensors").write_bytes(b"x" * (mib << 20))
        (models / f"{label}.json").write_text("{}")
        (tmp_path / "work" / label / "history.json").write_text(json.dumps({"history": [{"val_mae_suvr": mae}]}))
    collect(tmp_path / "work", tmp_path / "out", max_mib=5.0)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["by_last_val_mae"] == ["b", "a", "c"] and manifest["models"] == ["b", "c"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.history.json")) == [f"{x}.history.json" for x in "abc"]


def test_settings_are_training_options() -> None:
    assert parse_settings(["depth=8", "amp=false", "select_on=mae"]) == {"depth": 8, "amp": False, "select_on": "mae"}
    with pytest.raises(SystemExit, match="not a TrainOptions field"):
        parse_settings(["depht=8"])
