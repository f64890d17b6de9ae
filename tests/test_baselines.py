"""Baselines: one interface, seeded, output on the model scale, and the supervised ones learn."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from dualglow_app import baselines
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
    with pytest.raises(ValueError, match=r"must be \(N, X, Y, Z\)"):
        model.fit(np.zeros((2, 8, 8, 8), np.float32), np.zeros((2, 8, 8), np.float32))
    with_maps = make_baseline("unet", BaselineOptions(epochs=1, width=4, input_channels=3))
    with pytest.raises(ValueError, match=r"must be \(N, 3, X, Y, Z\)"):
        with_maps.fit(np.zeros((2, 2, 8, 8, 8), np.float32), np.zeros((2, 8, 8, 8), np.float32))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_method_reads_maps_beside_the_t1w(name: str) -> None:
    """With input_channels = 3 (the T1w and two tissue maps) each method trains on and predicts
    from (N, 3, X, Y, Z) inputs, PETs come back (N, X, Y, Z), and the networks read the maps:
    other maps give another prediction (the mean PET reads nothing, by design)."""
    rng = np.random.default_rng(0)
    t1w = rng.random((3, 8, 8, 8), dtype=np.float32) + 0.1
    maps = rng.random((3, 2, 8, 8, 8), dtype=np.float32)
    inputs = np.concatenate([t1w[:, None], maps], axis=1)
    model = make_baseline(name, BaselineOptions(epochs=2, width=4, input_channels=3))
    model.fit(inputs, 0.4 * t1w + 0.3 * maps[:, 0])
    pred = model.predict(inputs)
    assert pred.shape == t1w.shape and np.isfinite(pred).all()
    other = model.predict(np.concatenate([t1w[:, None], maps[::-1]], axis=1))
    if name == "meanpet":
        np.testing.assert_array_equal(other, pred)
    else:
        assert np.abs(other - pred).max() > 1e-4


# --------------------------------------------------------------------------- early stopping


def _weights(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    return model._state()


def _assert_same_weights(a: Any, b: Any) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for module in wa:
        for name, tensor in wa[module].items():
            assert torch.equal(tensor, wb[module][name]), f"{module}.{name}"


def _scripted(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    curve = iter(values)
    monkeypatch.setattr(baselines, "_mae", lambda pred, truth, mask: next(curve))


def test_early_stopping_stops_after_patience_and_restores_the_best_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted validation MAE: epoch 2 improves by more than min_delta, epoch 4 is lower still
    but by less than min_delta (kept as the best weights, yet not resetting patience), so
    patience 3 ends the fit after epoch 5 holding epoch 4's weights."""
    mri, pet = pairs(n=4)
    options = BaselineOptions(max_epochs=50, patience=3, min_delta=0.01, width=4, seed=2)
    _scripted(monkeypatch, [0.5, 0.3, 0.31, 0.299, 0.32, 0.01, 0.01])
    model = make_baseline("unet", options)
    losses = model.fit(mri, pet, mri[:2], pet[:2])
    assert [row["val_mae"] for row in model.history] == [0.5, 0.3, 0.31, 0.299, 0.32]
    assert [row["improved"] for row in model.history] == [True, True, False, False, False]
    assert model.epochs_run == 5 and model.best_epoch == 4 and model.stopped_early
    assert model.stop_reason == "patience" and model.best_val_mae == 0.299 and len(losses) == 5

    fixed = make_baseline("unet", BaselineOptions(epochs=4, width=4, seed=2))
    fixed.fit(mri, pet)
    _assert_same_weights(model, fixed)
    np.testing.assert_array_equal(model.predict(mri[:1]), fixed.predict(mri[:1]))


def test_flat_validation_curve_stops_after_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    mri, pet = pairs(n=4)
    _scripted(monkeypatch, [0.2] * 20)
    model = make_baseline("cvae", BaselineOptions(max_epochs=20, patience=2, width=4))
    model.fit(mri, pet, mri[:2], pet[:2])
    assert model.epochs_run == 3 and model.best_epoch == 1 and model.stopped_early
    fixed = make_baseline("cvae", BaselineOptions(epochs=1, width=4))
    fixed.fit(mri, pet)
    _assert_same_weights(model, fixed)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_validated_fit_history_and_summary(name: str) -> None:
    mri, pet = pairs(n=4)
    mask = (pet > 0.12).astype(np.uint8)
    seen: list[tuple[int, tuple[int, ...]]] = []
    model = make_baseline(name, BaselineOptions(max_epochs=2, patience=5, width=4, seed=1))
    model.fit(mri[:3], pet[:3], mri[3:], pet[3:], val_mask=mask[3:],
              on_epoch=lambda row, pred: seen.append((row["epoch"], pred.shape)))  # fmt: skip
    summary = json.loads(json.dumps(model.summary()))
    assert set(summary) >= {"method", "epochs_run", "best_epoch", "stopped_early", "stop_reason", "wall_s",
                            "best_val_mae", "history", "val_metric", "budget_epochs"}  # fmt: skip
    assert summary["method"] == name and not summary["stopped_early"] and summary["wall_s"] > 0
    assert np.isfinite(summary["best_val_mae"])
    if name == "meanpet":
        assert summary["epochs_run"] == summary["best_epoch"] == 0 and summary["history"] == []
        assert summary["stop_reason"] == "closed_form" and seen == []
        expected = np.abs(pet[:3].mean(0) - pet[3])[mask[3] > 0].mean()
        assert summary["best_val_mae"] == pytest.approx(expected, rel=1e-5)
        return
    assert summary["epochs_run"] == 2 and summary["stop_reason"] == "max_epochs"
    assert summary["best_val_mae"] == min(row["val_mae"] for row in summary["history"])
    for epoch, row in enumerate(summary["history"], start=1):
        assert row["epoch"] == epoch and {"train_loss", "val_mae", "seconds", "train_seconds"} <= set(row)
        assert all(np.isfinite(v) for k, v in row.items() if k != "improved")
    if name in ("pix2pix", "cgan"):
        assert {"train_loss_d", "train_adversarial", "train_l1"} <= set(summary["history"][0])
    if name == "cvae":
        assert {"train_l1", "train_kl"} <= set(summary["history"][0])
    assert seen == [(1, (1, 8, 8, 8)), (2, (1, 8, 8, 8))]


def test_fixed_epochs_without_validation_and_a_time_budget() -> None:
    mri, pet = pairs(n=4)
    model = make_baseline("unet", BaselineOptions(epochs=3, width=4))
    model.fit(mri, pet)
    assert model.summary()["stop_reason"] == "fixed_epochs" and model.epochs_run == model.best_epoch == 3
    assert model.best_val_mae is None and "val_mae" not in model.history[0]
    capped = make_baseline("unet", BaselineOptions(max_epochs=50, width=4, budget_seconds=1e-6))
    capped.fit(mri, pet, mri[:1], pet[:1])
    assert capped.epochs_run == 1 and capped.stop_reason == "budget_seconds" and not capped.stopped_early


def test_cgan_predicts_deterministically() -> None:
    mri, pet = pairs(n=4)
    model = make_baseline("cgan", BaselineOptions(epochs=1, width=4))
    model.fit(mri, pet)
    np.testing.assert_array_equal(model.predict(mri[:2]), model.predict(mri[:2]))


def test_baseline_options_are_checked() -> None:
    with pytest.raises(ValueError, match="patience=0"):
        BaselineOptions(patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        BaselineOptions(min_delta=1.5)
    model = make_baseline("unet", BaselineOptions(epochs=1, width=4))
    mri, pet = pairs(n=2)
    with pytest.raises(ValueError, match="both val_mri and val_pet"):
        model.fit(mri, pet, val_mri=mri)


@pytest.mark.parametrize("name", ["pix2pix", "cgan"])
def test_gan_generators_leave_the_background_at_zero(name: str) -> None:
    """Real PET is 0 outside the brain (where the MRI is 0); a fake that is not would let the
    critic tell them apart by the background alone."""
    mri, pet = pairs(n=4)
    mri[:, :2] = 0.0
    pet[:, :2] = 0.0
    model = make_baseline(name, BaselineOptions(epochs=1, width=4))
    model.fit(mri, pet)
    out = model.predict(mri)
    assert np.all(out[:, :2] == 0) and np.all(out[:, 2:] > 0)
    fake = model._fake(model._tensor(mri))  # type: ignore[attr-defined]
    assert torch.all(fake[:, :, :2] == 0)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("name", ["unet", "cgan", "cvae"])
def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(name: str, tmp_path: Any) -> None:
    """Killed after epoch 3's validation (before its checkpoint), the fit resumes from epoch 2
    and ends where an uninterrupted fit ends: same history, kept epoch and weights. A finished
    checkpoint returns the result without training."""
    mri, pet = pairs(n=4)
    options = BaselineOptions(max_epochs=5, patience=2, width=4, seed=5)
    uninterrupted = make_baseline(name, options)
    uninterrupted.fit(mri, pet, mri[:2], pet[:2])

    def interrupt(row: dict[str, Any], _: np.ndarray) -> None:
        if row["epoch"] == 3:
            raise _Interrupted

    checkpoint = tmp_path / "fit.pt"
    with pytest.raises(_Interrupted):
        make_baseline(name, options).fit(mri, pet, mri[:2], pet[:2], on_epoch=interrupt, checkpoint=checkpoint)
    resumed_epochs: list[int] = []
    resumed = make_baseline(name, options)
    resumed.fit(mri, pet, mri[:2], pet[:2], checkpoint=checkpoint,
                on_epoch=lambda row, _: resumed_epochs.append(row["epoch"]))  # fmt: skip
    assert resumed_epochs[0] == 3
    assert [r["val_mae"] for r in resumed.history] == [r["val_mae"] for r in uninterrupted.history]
    assert (resumed.best_epoch, resumed.stop_reason) == (uninterrupted.best_epoch, uninterrupted.stop_reason)
    _assert_same_weights(resumed, uninterrupted)

    again: list[int] = []
    finished = make_baseline(name, options)
    finished.fit(mri, pet, mri[:2], pet[:2], checkpoint=checkpoint, on_epoch=lambda row, _: again.append(row["epoch"]))
    assert again == [] and finished.epochs_run == uninterrupted.epochs_run
    np.testing.assert_array_equal(finished.predict(mri[:1]), uninterrupted.predict(mri[:1]))


def test_a_checkpoint_of_another_fit_is_refused(tmp_path: Any) -> None:
    from dualglow_app.weights import ModelFileError

    mri, pet = pairs(n=4)
    checkpoint = tmp_path / "fit.pt"
    make_baseline("unet", BaselineOptions(epochs=1, width=4)).fit(mri, pet, checkpoint=checkpoint)
    with pytest.raises(ModelFileError, match=r"different unet fit \(changed: training or validation scans\)"):
        make_baseline("unet", BaselineOptions(epochs=1, width=4)).fit(mri, 0.5 * pet, checkpoint=checkpoint)
    with pytest.raises(ModelFileError, match=r"\(changed: option lr\)"):
        make_baseline("unet", BaselineOptions(epochs=1, width=4, lr=0.5)).fit(mri, pet, checkpoint=checkpoint)
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="fit.pt"):
        make_baseline("unet", BaselineOptions(epochs=1, width=4)).fit(mri, pet, checkpoint=checkpoint)


def _rewrite_fit_fields(path: Any, edit: Any) -> None:
    """Rewrite the JSON of a baseline checkpoint's ``fit`` entry through ``edit(fields)``."""
    from dualglow_app.weights import load_checkpoint, save_checkpoint

    state = load_checkpoint(path, torch.device("cpu"))
    fields = json.loads(state["fit"])
    edit(fields)
    state["fit"] = json.dumps(fields)
    save_checkpoint(path, state)


def _fit_edit_and_resume(checkpoint: Any, edit: Any) -> tuple[Any, Any, Any]:
    """Fit a small U-Net with a checkpoint, rewrite its stored fit through ``edit(fields)``, fit
    again from it; assert nothing was trained again. (mri, pet, options) of the fit, the two fits."""
    mri, pet = pairs(n=4)
    options = BaselineOptions(max_epochs=3, patience=3, width=4)
    reference = make_baseline("unet", options)
    reference.fit(mri, pet, mri[:2], pet[:2], checkpoint=checkpoint)
    _rewrite_fit_fields(checkpoint, edit)
    again: list[int] = []
    resumed = make_baseline("unet", options)
    resumed.fit(mri, pet, mri[:2], pet[:2], checkpoint=checkpoint, on_epoch=lambda row, _: again.append(row["epoch"]))
    assert again == [] and resumed.epochs_run == reference.epochs_run
    return (mri, pet, options), reference, resumed


def test_a_checkpoint_written_on_another_device_resumes(tmp_path: Any) -> None:
    """The device is where a fit runs, not which fit it is: a GPU's checkpoint resumes on the CPU."""

    def written_on_a_gpu(fields: dict[str, Any]) -> None:
        fields["identity"]["options"]["device"] = "cuda:0"

    (mri, _, _), reference, resumed = _fit_edit_and_resume(tmp_path / "fit.pt", written_on_a_gpu)
    np.testing.assert_array_equal(resumed.predict(mri[:1]), reference.predict(mri[:1]))


def test_checkpoints_of_earlier_releases_resume(tmp_path: Any) -> None:
    """A checkpoint written before an option existed (the fit had its default), or in the
    single-hash form of earlier releases, resumes; one whose option then differed does not."""
    from dualglow_app.weights import ModelFileError

    def without_input_channels(fields: dict[str, Any]) -> None:
        del fields["identity"]["options"]["input_channels"]

    checkpoint = tmp_path / "fit.pt"
    (mri, pet, options), reference, _ = _fit_edit_and_resume(checkpoint, without_input_channels)
    with pytest.raises(ModelFileError, match="option input_channels"):
        make_baseline("unet", BaselineOptions(max_epochs=3, patience=3, width=4, input_channels=2)).fit(
            np.stack([mri, mri], 1), pet, np.stack([mri[:2], mri[:2]], 1), pet[:2], checkpoint=checkpoint)

    def as_single_hash(fields: dict[str, Any]) -> None:
        del fields["identity"]
        prefix = json.dumps(["unet", options.to_dict()], sort_keys=True).encode()
        fields["fingerprint"] = baselines._digest(prefix, (mri, pet, mri[:2], pet[:2], None))

    _rewrite_fit_fields(checkpoint, as_single_hash)
    legacy = make_baseline("unet", options)
    legacy.fit(mri, pet, mri[:2], pet[:2], checkpoint=checkpoint)
    assert legacy.epochs_run == reference.epochs_run
    with pytest.raises(ModelFileError, match="changed: options or training scans"):
        make_baseline("unet", options).fit(mri, 0.5 * pet, mri[:2], pet[:2], checkpoint=checkpoint)
