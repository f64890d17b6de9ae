"""Baselines: one interface, seeded, output on the model scale, and the supervised ones learn."""

from __future__ import annotations

import numpy as np
import pytest

from dualglow_app.baselines import BASELINES, BaselineOptions, make_baseline


def pairs(n: int = 4, shape: tuple[int, int, int] = (8, 8, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MRI blobs and a PET that is a fixed function of them (so the MRI predicts the PET)."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mri, pet = [], []
    for _ in range(n):
        c = rng.normal(0, 0.3, 3)
        blob = np.exp(-sum((a - ci) ** 2 for a, ci in zip(axes, c, strict=True)) / 0.2)
        mri.append(0.2 + 0.7 * blob)
        pet.append(0.1 + 0.5 * blob**2)
    return np.asarray(mri, np.float32), np.asarray(pet, np.float32)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_fits_and_predicts_on_the_model_scale(name: str) -> None:
    mri, pet = pairs()
    model = make_baseline(name, BaselineOptions(epochs=1, width=4, seed=3))
    history = model.fit(mri, pet)
    assert len(history) == 1 and np.isfinite(history[0])
    out = model.predict(mri[:3])
    assert out.shape == (3, 8, 8, 8) and out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    assert model.fit_seconds > 0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_same_seed_same_predictions(name: str) -> None:
    mri, pet = pairs()
    runs = []
    for _ in range(2):
        model = make_baseline(name, BaselineOptions(epochs=1, width=4, seed=7))
        model.fit(mri, pet)
        runs.append(model.predict(mri[:1]))
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("name", ["unet", "cvae"])
def test_supervised_baselines_learn_the_mapping(name: str) -> None:
    mri, pet = pairs(n=6)
    model = make_baseline(name, BaselineOptions(epochs=40, width=8, lr=1e-2, seed=0))
    history = model.fit(mri, pet)
    assert history[-1] < 0.5 * history[0]
    error = np.abs(model.predict(mri) - pet).mean()
    constant = np.abs(pet.mean() - pet).mean()
    assert error < constant


def test_meanpet_reference_ignores_the_mri() -> None:
    mri, pet = pairs(n=5)
    model = make_baseline("meanpet")
    model.fit(mri, pet)
    out = model.predict(np.random.default_rng(1).random((2, 8, 8, 8), dtype=np.float32))
    np.testing.assert_allclose(out[0], pet.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(out[0], out[1])


def test_bad_names_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="choose from"):
        make_baseline("resnet")
    model = make_baseline("unet", BaselineOptions(epochs=1, width=4))
    with pytest.raises(ValueError, match="divisible by 4"):
        model.fit(np.zeros((2, 6, 8, 8), np.float32), np.zeros((2, 6, 8, 8), np.float32))
    with pytest.raises(ValueError, match="must both be"):
        model.fit(np.zeros((2, 8, 8, 8), np.float32), np.zeros((2, 8, 8), np.float32))
