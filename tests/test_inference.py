"""The one prediction path (dualglow_app.inference.predict): reproducible, seeded, clipped,
and pinned to what the shipped model produced before the architecture change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from participant_data import make_model
from pinned import check_pinned, mean_tissue_maps

from dualglow_app.data import IntensityScaling
from dualglow_app.grid import preset
from dualglow_app.inference import predict, scan_seed
from dualglow_app.weights import open_model

GRID = preset("tiny8mm")
PINNED = Path(__file__).parent / "data" / "shipped_model_prediction.json"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A small age-conditioned model trained a few steps on blob 'T1w' volumes."""
    rng = np.random.default_rng(0)
    t1w = [(rng.random(GRID.shape) * 0.8).astype(np.float32) for _ in range(3)]
    path = make_model(tmp_path_factory.mktemp("model") / "tiny", GRID, t1w, [62.0, 71.0, 84.0], steps=4)
    return open_model(path, "cpu")


def _t1w() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.random(GRID.shape) * 0.8).astype(np.float32), np.ones(GRID.shape, bool)


def test_predict_is_reproducible_and_seed_dependent(tiny_model: object) -> None:
    model, scaling = tiny_model.model, tiny_model.scaling  # type: ignore[attr-defined]
    t1w, mask = _t1w()
    first = predict(model, scaling, t1w, mask, {"age": 70.0}, samples=3, temperature=0.7, seed=5)
    again = predict(model, scaling, t1w, mask, {"age": 70.0}, samples=3, temperature=0.7, seed=5)
    other = predict(model, scaling, t1w, mask, {"age": 70.0}, samples=3, temperature=0.7, seed=6)
    assert first.mean.tobytes() == again.mean.tobytes() and first.sd is not None
    assert not np.array_equal(first.mean, other.mean)
    mode = predict(model, scaling, t1w, mask, {"age": 70.0})
    assert mode.sd is None and np.array_equal(mode.mean, predict(model, scaling, t1w, mask, {"age": 70.0}, seed=9).mean)
    older = predict(model, scaling, t1w, mask, {"age": 90.0})
    assert not np.array_equal(mode.mean, older.mean)  # the age reaches the output
    assert mode.latents_outside is not None and 0.0 <= mode.latents_outside <= 1.0


def test_predict_clips_to_the_model_range_masks_and_reports(tiny_model: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flow's inverse is unbounded: values outside [0, 1] (model scale) are clipped to the
    training range, their in-brain share is returned, and the output is 0 outside the brain."""
    model = tiny_model.model  # type: ignore[attr-defined]
    wild = torch.full((1, 1, 1, *GRID.shape), 0.5)
    wild[..., :2, :, :] = 40.0  # 2 of the grid's x-slices far above the ceiling
    wild[..., 2, :, :] = float("nan")
    monkeypatch.setattr(model, "sample_prior", lambda *args, **kwargs: wild)
    mask = np.ones(GRID.shape, bool)
    mask[-1] = False
    scaling = IntensityScaling(pet_suvr_max=2.5)  # the scaling passed in is the one applied
    prediction = predict(model, scaling, np.zeros(GRID.shape, np.float32), mask, {"age": 70.0})
    assert prediction.clipped_fraction == pytest.approx(3 / (GRID.shape[0] - 1))
    assert np.nanmax(prediction.mean) == pytest.approx(2.5) and np.isfinite(prediction.mean).all()
    assert prediction.mean[5, 5, 5] == pytest.approx(1.25) and prediction.mean[-1].max() == 0.0


def test_scan_seed_is_stable_and_distinct() -> None:
    assert scan_seed(0, "01", None) == scan_seed(0, "01", None)
    seeds = {scan_seed(0, "01", None), scan_seed(0, "02", None), scan_seed(0, "01", "a"), scan_seed(1, "01", None)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)


def test_shipped_model_prediction_is_pinned() -> None:
    """The shipped model on its own mean training T1w (and mean tissue maps, where it reads
    them), age 70 (CN): the conditional mode and two
    samples at T = 0.7 match, per axis profile, what the same model gave when it was shipped
    (tests/data/shipped_model_prediction.json; re-pinned with a new shipped model: tests/pinned.py)."""
    loaded = open_model("dualglow-phantom-demo", "cpu")
    t1w = loaded.model.mri_template[0, 0].numpy().astype(np.float32)
    mask = t1w > 0.05
    side = {name: spec.encode({"age": 70.0, "diagnosis": "CN"}[name]) for name, spec in loaded.covariates.items()}
    got: dict[str, object] = {}
    for name, (samples, temperature) in {"mode": (1, 0.0), "samples": (2, 0.7)}.items():
        out = predict(loaded.model, loaded.scaling, t1w, mask, side, samples, temperature,
                      scan_seed(0, "001", None), mean_tissue_maps(loaded.model))  # fmt: skip
        got[name] = {
            "profiles": [out.mean.sum(axis=tuple(a for a in range(3) if a != axis)).tolist() for axis in range(3)],
            "sd_profile": out.sd.sum(axis=(1, 2)).tolist() if out.sd is not None else None,
            "clipped_fraction": float(out.clipped_fraction), "latents_outside": float(out.latents_outside or 0.0),
        }  # fmt: skip
    check_pinned(got, PINNED, tol=1e-4)
