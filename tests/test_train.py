"""Group level (dualglow_app.train): short runs on 16^3 volumes and tiny models.

Preprocessing is replaced by a fake (it costs 30-60 s a subject) except in the slow
end-to-end test, which runs the real pipeline on two phantom subjects.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from synthetic_pairs import ddp_worker, fake_preprocessing, paired_volumes, tiny_options

from dualglow_app import train as train_module
from dualglow_app.bids import is_phantom_cohort
from dualglow_app.data import IntensityScaling
from dualglow_app.grid import preset, resolve_grid
from dualglow_app.metrics import image_metrics
from dualglow_app.options import TrainOptions
from dualglow_app.train import TrainingError, train
from dualglow_app.weights import load_model

TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- pure functions


def test_image_metrics_of_a_perfect_and_a_bad_synthesis() -> None:
    data = paired_volumes(1)
    pet, mask = data.pet[0], data.mask[0]
    perfect = image_metrics(pet, pet.copy(), mask, 3.0)
    assert perfect["mae_suvr"] == 0 and perfect["ssim"] == pytest.approx(1.0)
    bad = image_metrics(pet, np.zeros_like(pet), mask, 3.0)
    assert bad["mae_suvr"] == pytest.approx(pet[mask > 0].mean(), rel=1e-5)
    assert bad["ssim"] < 0.5 and bad["psnr_db"] < perfect["psnr_db"]


def test_grid_from_preset_or_voxel_size() -> None:
    assert TrainOptions("b", "o", grid="tiny8mm").model_grid == preset("tiny8mm")
    grid = resolve_grid(grid_mm=6.0, levels=2)
    assert grid.voxel_size == 6.0 and all(s % 4 == 0 and s * 6 >= 160 for s in grid.shape)


def test_options_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="side_info"):
        TrainOptions("b", "o", side_info=["participant_id"])
    with pytest.raises(ValueError, match="val_fraction"):
        TrainOptions("b", "o", val_fraction=1.0)
    with pytest.raises(ValueError, match="memory_saving"):
        TrainOptions("b", "o", memory_saving="maybe")
    with pytest.raises(ValueError, match="side_template_fixed"):
        TrainOptions("b", "o", side_info=["age"], side_template_fixed=["sex"])
    with pytest.raises(ValueError, match="side_template_mri_fwhm"):
        TrainOptions("b", "o", side_template_mri_fwhm=[-8.0])
    with pytest.raises(ValueError, match="side_template_anatomy"):
        TrainOptions("b", "o", side_template_anatomy="csf")


def test_the_age_map_is_fixed_by_default_when_conditioned_on_age() -> None:
    assert TrainOptions("b", "o", side_info=["age", "sex"]).side_template_fixed == ("age",)
    assert TrainOptions("b", "o", side_info=["sex"]).side_template_fixed == ()
    assert TrainOptions("b", "o", side_info=["age"], side_template_fixed=()).side_template_fixed == ()


def test_group_level_trains_with_memory_saving(tmp_path: Path) -> None:
    options = tiny_options(tmp_path / "out", tmp_path / "work", epochs=1, memory_saving="on")
    result = train(options, data=paired_volumes(4))
    assert result.model.memory_saving
    assert all(torch.isfinite(p.grad).all() for p in result.model.parameters() if p.grad is not None)


def test_phantom_cohort_is_recognised(tmp_path: Path) -> None:
    (tmp_path / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "GeneratedBy": [{"Name": "dualglow-phantom"}]}))  # fmt: skip
    assert is_phantom_cohort(tmp_path)
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "ADNI"}))
    assert not is_phantom_cohort(tmp_path)


# --------------------------------------------------------------------------- training runs


def test_train_writes_a_model_the_participant_level_can_load(tmp_path: Path) -> None:
    options = tiny_options(tmp_path / "out", tmp_path / "work", side_info=["age"], report=True)
    result = train(options, data=paired_volumes(6))

    model, info = load_model(result.model_path)
    meta = info["metadata"]
    assert set(meta) >= {"grid", "intensity", "side_info", "demonstration", "training"}
    assert meta["side_info"] == ["age"] and meta["demonstration"] is False
    assert meta["grid"]["shape"] == [16, 16, 16]
    assert meta["training"]["epochs"] == 3 and meta["training"]["seed"] == 0
    assert len(meta["training"]["subjects"]) + len(meta["training"]["validation_subjects"]) == 6
    assert set(meta["training"]["validation"]) == {"bpd_pet_given_mri", "bpd_mri", "mae_suvr", "psnr_db", "ssim", "deviation_r"}
    assert -1.0 <= meta["training"]["validation"]["deviation_r"] <= 1.0
    # Age is scaled by the dataset's own mean and SD (learnt at the group level).
    ages = np.asarray(paired_volumes(6).age)
    centre, scale = info["config"]["continuous"]["age"]
    assert (centre, scale) == pytest.approx((ages.mean(), ages.std()), rel=1e-3) and scale > 0
    assert model.is_initialized
    # The file holds everything but eq. 17's training-only heads (model file format 3).
    for name, tensor in result.model.state_dict().items():
        if not name.startswith(model.TRAINING_ONLY):
            assert torch.equal(tensor, model.state_dict()[name]), name
    assert result.model.has_side_heads and not model.has_side_heads
    # Template centring (default): the MRI template is the training scans' mean image; with
    # side information the PET template is the mean training PET at the learnt centre age: the
    # mean minus the age map (per voxel, least squares of the PET on 1, (age - centre) / scale
    # and the MRI; the side template's start, its map then trains) times the mean scaled age.
    assert info["config"]["template_shape"] == [16, 16, 16] and info["config"]["side_template"] is True
    # The app's weight of log p(MRI) (eq. 12), 10x the paper's: finding 14 of docs/MODEL_EXPERIMENTS.md.
    assert info["config"]["lambda_mri"] == 0.01
    data = paired_volumes(6)
    train_rows = [data.labels.index(label) for label in meta["training"]["subjects"]]
    pets = IntensityScaling().pet_to_model(np.asarray(data.pet)[train_rows]).reshape(len(train_rows), -1)
    mris = IntensityScaling().mri_to_model(np.asarray(data.mri)[train_rows]).reshape(len(train_rows), -1)
    decades = (np.asarray(data.age)[train_rows] - centre) / scale
    age_map = np.array([np.linalg.lstsq(np.column_stack([np.ones_like(decades), decades, mris[:, v]]), pets[:, v],
                                        rcond=None)[0][1] for v in range(pets.shape[1])])  # fmt: skip
    expected_template = (pets.mean(0) - age_map * decades.mean()).reshape(16, 16, 16)
    assert np.allclose(model.pet_template[0, 0].numpy(), expected_template, atol=1e-4)
    assert model.pet_side_template is not None and model.pet_side_template.abs().max() > 0
    expected_mri = IntensityScaling().mri_to_model(np.asarray(data.mri)[train_rows]).mean(0)
    assert np.allclose(model.mri_template[0, 0].numpy(), expected_mri, atol=1e-5)
    # Conditioning range: set from the training scans, so none of theirs is outside it; the
    # validation scans were not used for it.
    assert model.has_conditioning_range
    scaled = torch.from_numpy(IntensityScaling().mri_to_model(np.asarray(data.mri)[train_rows]))[:, None]
    ages = {"age": torch.from_numpy(np.asarray(data.age)[train_rows])}
    assert model.conditional_prior(scaled, ages).outside_fraction.max().item() == 0.0

    rows = result.metrics_path.read_text().splitlines()
    assert rows[0].startswith("epoch\tstep") and len(rows) == 1 + 3
    assert result.report_path == options.output_dir / "group.html"
    html = result.report_path.read_text()
    assert "Loss curves" in html and "Validation montages" in html and "data:image/png" in html
    assert options.checkpoint_path.is_file()
    assert all(math.isfinite(v) for v in result.final_metrics.values())


def test_training_lowers_the_validation_bpd(tmp_path: Path) -> None:
    options = tiny_options(tmp_path / "out", tmp_path / "work", epochs=4, batch_size=1, lr=3e-3)
    history = train(options, data=paired_volumes(6)).history
    assert history[-1]["val_bpd_pet_given_mri"] < history[0]["val_bpd_pet_given_mri"]


def test_cpu_bf16_trains_under_autocast_where_the_cpu_has_native_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dualglow_app.model import DualGlow

    autocast_states: list[bool] = []  # whether each DualGlow.nll call ran under CPU autocast
    original = DualGlow.nll

    def recording_nll(self: Any, *args: Any, **kwargs: Any) -> Any:
        autocast_states.append(torch.is_autocast_enabled("cpu"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DualGlow, "nll", recording_nll)
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    with pytest.raises(TrainingError, match="no native bf16"):
        train(tiny_options(tmp_path / "a", tmp_path / "wa", epochs=1, cpu_bf16=True), data=paired_volumes(4))
    assert not autocast_states  # refused before any step
    train(tiny_options(tmp_path / "b", tmp_path / "wb", epochs=1), data=paired_volumes(4))
    assert autocast_states and not any(autocast_states)  # float32 unless asked
    autocast_states.clear()
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    history = train(tiny_options(tmp_path / "c", tmp_path / "wc", epochs=1, cpu_bf16=True), data=paired_volumes(4)).history
    assert any(autocast_states) and math.isfinite(history[-1]["val_bpd_pet_given_mri"])


def _final_weights(result: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGKILL in the middle of epoch 3 (step 5 of 3 x 2), resume: same weights as no kill."""
    killed = subprocess.run(
        [sys.executable, "-m", "synthetic_pairs", "5", str(tmp_path / "out"), str(tmp_path / "work")],
        cwd=TESTS, env={**__import__("os").environ, "PYTHONPATH": str(TESTS.parent)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    options = tiny_options(tmp_path / "out", tmp_path / "work", resume=True)
    checkpoint = torch.load(options.checkpoint_path, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 4
    assert not (tmp_path / "out" / "models").exists()

    resumed = train(options, data=paired_volumes(6))
    straight = train(tiny_options(tmp_path / "out2", tmp_path / "work2"), data=paired_volumes(6))
    assert resumed.steps == straight.steps == 6
    expected = _final_weights(straight)
    for name, tensor in _final_weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name
    assert [h["val_bpd_pet_given_mri"] for h in resumed.history] == [
        h["val_bpd_pet_given_mri"] for h in straight.history
    ]


def test_keep_best_selects_the_lowest_validation_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted validation bpd 3.0, 2.0, 2.5: the model holds epoch 2's weights, which a run
    stopped after epoch 2 reproduces exactly; --keep last holds epoch 3's."""
    real_evaluate = train_module.validate
    scripted = iter([3.0, 2.0, 2.5] * 2)

    def fake_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        return {**real_evaluate(*args, **kwargs), "bpd_pet_given_mri": next(scripted)}

    monkeypatch.setattr(train_module, "validate", fake_evaluate)
    best = train(tiny_options(tmp_path / "best", tmp_path / "w1"), data=paired_volumes(6))
    last = train(tiny_options(tmp_path / "last", tmp_path / "w2", keep="last"), data=paired_volumes(6))
    monkeypatch.setattr(train_module, "validate", real_evaluate)
    two = train(tiny_options(tmp_path / "two", tmp_path / "w3", epochs=2, keep="last"), data=paired_volumes(6))

    assert best.selected_epoch == 2 and last.selected_epoch == 3 and best.epochs == 3
    assert best.final_metrics["bpd_pet_given_mri"] == 2.0
    for name, tensor in _final_weights(two).items():
        assert torch.equal(_final_weights(best)[name], tensor), name
    assert any(not torch.equal(_final_weights(last)[k], v) for k, v in _final_weights(two).items())
    _, info = load_model(best.model_path)
    assert info["metadata"]["training"]["selected_epoch"] == 2 and info["metadata"]["training"]["keep"] == "best"


def test_epochs_without_improvement_counts_from_the_last_real_improvement() -> None:
    rows = [{"val_bpd_pet_given_mri": v} for v in (3.0, 2.0, 1.99, float("nan"), 2.5)]
    assert train_module.epochs_without_improvement(rows) == 2  # 1.99 < 2.0 counts with min_delta 0
    assert train_module.epochs_without_improvement(rows, min_delta=0.01) == 3  # 1.99 is not 1 % below 2.0
    assert train_module.epochs_without_improvement([{"epoch": 1}, {"epoch": 2}]) == 2  # no validation values
    with pytest.raises(ValueError, match="validation split"):
        TrainOptions("b", "o", patience=3, val_fraction=0.0)


class _Interrupt(Exception):
    pass


def test_patience_stops_early_and_a_resumed_run_stops_at_the_same_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripted validation bpd 3.0, 2.0, 2.5, 2.4, 2.6, ...: patience 2 ends a 6-epoch budget
    after epoch 4 with epoch 2's weights. A run interrupted in epoch 4 and resumed stops there
    too, with the same weights; resuming the finished run trains nothing more."""
    real_validate = train_module.validate
    curve = [3.0, 2.0, 2.5, 2.4, 2.6, 1.0]

    def script(start: int) -> None:
        values = iter(curve[start:])
        monkeypatch.setattr(train_module, "validate",
                            lambda *a, **k: {**real_validate(*a, **k), "bpd_pet_given_mri": next(values)})  # fmt: skip

    settings = {"epochs": 6, "patience": 2}
    script(0)
    straight = train(tiny_options(tmp_path / "a", tmp_path / "wa", **settings), data=paired_volumes(6))
    assert straight.stopped_early and straight.epochs == 4 and straight.steps == 8 and straight.selected_epoch == 2
    assert [h["val_bpd_pet_given_mri"] for h in straight.history] == curve[:4]

    def interrupt(step: int) -> None:
        if step == 7:  # 2 steps an epoch: in epoch 4, after epoch 3's checkpoint
            raise _Interrupt

    script(0)
    with pytest.raises(_Interrupt):
        train(tiny_options(tmp_path / "b", tmp_path / "wb", **settings), data=paired_volumes(6), on_step=interrupt)
    options = tiny_options(tmp_path / "b", tmp_path / "wb", resume=True, **settings)
    checkpoint = torch.load(options.checkpoint_path, weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["early_stopping"]["epochs_without_improvement"] == 1
    script(3)
    resumed = train(options, data=paired_volumes(6))
    assert resumed.stopped_early and resumed.epochs == 4 and resumed.steps == 8 and resumed.selected_epoch == 2
    expected = _final_weights(straight)
    for name, tensor in _final_weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name

    script(4)
    again = train(options, data=paired_volumes(6))  # the finished run's checkpoint: nothing left to train
    assert again.stopped_early and again.epochs == 4 and again.steps == 8
    _, info = load_model(again.model_path)
    assert info["metadata"]["training"]["stopped_early"] is True and info["metadata"]["training"]["patience"] == 2
    from dualglow_app.preprocess import preprocessing_versions

    assert info["metadata"]["training"]["preprocessing"] == preprocessing_versions()


def test_time_limit_ends_the_run_between_epochs_and_resume_continues(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A clock that advances 10 s a step (2 steps an epoch): with a 50 s limit a run stops
    before an epoch that would end past it (after epoch 2: 40 s + 20 s > 50 s), writes its
    model and checkpoint, and three such runs with resume reach the weights of one unlimited
    run of 5 epochs."""
    import types

    clock = {"now": 0.0}
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def tick(step: int) -> None:
        clock["now"] += 10.0

    straight = train(tiny_options(tmp_path / "a", tmp_path / "wa", epochs=5), data=paired_volumes(6), on_step=tick)
    assert not straight.time_limited and straight.epochs == 5
    options = tiny_options(tmp_path / "b", tmp_path / "wb", epochs=5, time_limit=50.0, resume=True)
    runs = [train(options, data=paired_volumes(6), on_step=tick)]
    assert load_model(runs[0].model_path)[1]["metadata"]["training"]["time_limited"] is True
    runs += [train(options, data=paired_volumes(6), on_step=tick) for _ in range(2)]
    assert [(r.epochs, r.time_limited) for r in runs] == [(2, True), (4, True), (5, False)]
    expected = _final_weights(straight)
    for name, tensor in _final_weights(runs[-1]).items():
        assert torch.equal(tensor, expected[name]), name
    with pytest.raises(ValueError, match="time_limit"):
        tiny_options(tmp_path / "c", tmp_path / "wc", time_limit=0.0)


def test_select_on_mae_stops_and_keeps_on_the_validation_mae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Scripted validation MAE 0.30, 0.20, 0.25, 0.24 with a bpd that keeps falling: with
    select_on="mae", patience 2 ends the run after epoch 4 holding epoch 2's weights (on the bpd
    it would have run all 6 epochs and kept the last); the checkpoint records the rule."""
    real_validate = train_module.validate
    mae, bpd = iter([0.30, 0.20, 0.25, 0.24, 0.10, 0.10]), iter([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    monkeypatch.setattr(train_module, "validate", lambda *a, **k: {
        **real_validate(*a, **k), "mae_suvr": next(mae), "bpd_pet_given_mri": next(bpd)})  # fmt: skip
    options = tiny_options(tmp_path / "o", tmp_path / "w", epochs=6, patience=2, select_on="mae")
    with caplog.at_level(logging.INFO, logger="dualglow"):
        result = train(options, data=paired_volumes(6))
    assert result.stopped_early and result.epochs == 4 and result.selected_epoch == 2
    assert result.final_metrics["mae_suvr"] == 0.20 and result.final_metrics["bpd_pet_given_mri"] == 5.0
    assert "validation MAE (SUVR) has not improved" in caplog.text
    checkpoint = torch.load(options.checkpoint_path, weights_only=True)
    assert checkpoint["best"]["select_on"] == "mae" and checkpoint["best"]["epoch"] == 2
    assert checkpoint["early_stopping"]["select_on"] == "mae"
    with pytest.raises(ValueError, match="select_on='ssim'"):
        TrainOptions("b", "o", select_on="ssim")


def test_min_epochs_holds_early_stopping_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The validation MAE of the test above: patience 2 would stop after epoch 4, but with
    min_epochs 5 the run trains epoch 5 first and then stops, still keeping epoch 2."""
    real_validate = train_module.validate
    mae = iter([0.30, 0.20, 0.25, 0.24, 0.26, 0.27])
    monkeypatch.setattr(train_module, "validate", lambda *a, **k: {**real_validate(*a, **k), "mae_suvr": next(mae)})
    options = tiny_options(tmp_path / "o", tmp_path / "w", epochs=6, patience=2, select_on="mae", min_epochs=5)
    result = train(options, data=paired_volumes(6))
    assert result.stopped_early and result.epochs == 5 and result.selected_epoch == 2
    _, info = load_model(result.model_path)
    assert info["metadata"]["training"]["min_epochs"] == 5 and info["metadata"]["training"]["select_on"] == "mae"
    with pytest.raises(ValueError, match="min_epochs=7"):
        TrainOptions("b", "o", epochs=6, min_epochs=7)


def test_a_checkpoints_best_epoch_is_kept_only_when_chosen_on_the_same_figure() -> None:
    """A checkpoint written before select_on existed stored its bpd-best epoch as "val_bpd"."""
    old = {"epoch": 3, "val_bpd": 1.5, "model": {}}
    assert train_module._stored_best(old, "bpd") == {"epoch": 3, "select_on": "bpd", "value": 1.5, "model": {}}
    assert train_module._stored_best(old, "mae") is None  # its weights are not the MAE's best
    assert train_module._stored_best(None, "mae") is None


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    train(tiny_options(tmp_path / "out", tmp_path / "work", epochs=1), data=paired_volumes(4))
    with pytest.raises(TrainingError, match="changed: config"):
        train(tiny_options(tmp_path / "out", tmp_path / "work", hidden=12, resume=True), data=paired_volumes(4))


def test_resume_accepts_a_checkpoint_written_before_a_config_field_existed(tmp_path: Path) -> None:
    from dualglow_app.weights import load_checkpoint, save_checkpoint

    options = tiny_options(tmp_path / "out", tmp_path / "work", epochs=1)
    train(options, data=paired_volumes(4))
    checkpoint = load_checkpoint(options.checkpoint_path, "cpu")
    del checkpoint["fingerprint"]["config"]["relation_layers"]  # as an older release wrote it
    save_checkpoint(options.checkpoint_path, checkpoint)
    resumed = train(tiny_options(tmp_path / "out", tmp_path / "work", epochs=2, resume=True), data=paired_volumes(4))
    assert [row["epoch"] for row in resumed.history] == [1, 2]


def test_resume_gives_a_checkpoint_without_the_anatomy_terms_range_the_training_range(tmp_path: Path) -> None:
    """A checkpoint written before the anatomy term's range existed resumes, and the range is
    then what a fresh fit sets (the training MRIs'), not left unbounded."""
    from dualglow_app.weights import load_checkpoint, save_checkpoint

    data = paired_volumes(42)
    options = tiny_options(tmp_path / "out", tmp_path / "work", epochs=1, side_info=("age",), val_fraction=0.2)
    first = train(options, data=data).model
    assert first.config.anatomy_template
    checkpoint = load_checkpoint(options.checkpoint_path, "cpu")
    del checkpoint["model"]["anatomy_term_range"]  # as the code before it wrote checkpoints
    save_checkpoint(options.checkpoint_path, checkpoint)
    resumed = train(replace(options, epochs=2, resume=True), data=data)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert torch.equal(resumed.model.get_buffer("anatomy_term_range"), first.get_buffer("anatomy_term_range"))


def test_non_finite_step_is_skipped_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dualglow_app.model import DualGlow

    original = DualGlow.forward
    calls = {"n": 0}

    def poisoned(self: DualGlow, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DualGlow, "forward", poisoned)
    caplog.set_level(logging.WARNING, logger="dualglow")
    result = train(tiny_options(tmp_path / "out", tmp_path / "work", epochs=2), data=paired_volumes(6))
    assert result.skipped_steps == 1 and result.steps == 4
    assert "step skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_diverged_training_stops_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dualglow_app import train as train_module
    from dualglow_app.model import DualGlow

    original = DualGlow.forward

    def always_nan(self: DualGlow, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = original(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(DualGlow, "forward", always_nan)
    monkeypatch.setattr(train_module, "MAX_CONSECUTIVE_BAD_STEPS", 3)
    with pytest.raises(TrainingError, match="lower --lr"):
        train(tiny_options(tmp_path / "out", tmp_path / "work", epochs=5), data=paired_volumes(6))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ddp_two_cpu_processes_agree_and_only_rank0_writes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp


    mp.spawn(ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "weights-rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights-rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (tmp_path / "out-rank0" / "models" / "dualglow.safetensors").is_file()
    assert (tmp_path / "work-rank0" / "train" / "dualglow" / "checkpoint.pt").is_file()
    for folder in ("out-rank1", "work-rank1"):
        written = [p for p in (tmp_path / folder).rglob("*") if p.is_file()]
        assert written == [], f"rank 1 wrote {written}"
    meta = json.loads((tmp_path / "out-rank0" / "models" / "dualglow.json").read_text())["metadata"]
    assert meta["training"]["world_size"] == 2
    # 4 training subjects, 2 ranks, batch 1: 2 steps per epoch on each rank.
    assert meta["training"]["steps"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training(tmp_path: Path) -> None:
    options = tiny_options(tmp_path / "out", tmp_path / "work", device="cuda", amp=True, epochs=2)
    result = train(options, data=paired_volumes(6))
    assert result.device.startswith("cuda") and "bf16" in result.device
    assert all(math.isfinite(v) for v in result.final_metrics.values())
    model, _ = load_model(result.model_path, device="cuda")
    assert next(model.parameters()).is_cuda


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> Any:
    from click.testing import CliRunner

    from dualglow_app.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_group_trains_and_writes_the_model(
    tiny_bids: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bids = tiny_bids(subjects=["01", "02", "03"], with_pet=["01", "02", "03"])
    fake_preprocessing(monkeypatch)
    out = tmp_path / "out"
    result = _cli(str(bids), str(out), "group", "-w", str(tmp_path / "work"), "--skip-bids-validation",
                  "--grid", "tiny8mm", "--epochs", "1", "--depth", "1", "--hidden", "8", "--batch-size", "2",
                  "--side-info", "age", "--model-name", "study", "--nprocs", "1", "--patience", "4",
                  "--min-delta", "0.01", "--lambda-mri", "0.5", "--side-template-mri-fwhm", "0", "16",
                  "--side-template-fixed", "none")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "models/study.safetensors" in result.output
    info = json.loads((out / "models" / "study.json").read_text())
    assert info["config"]["lambda_mri"] == 0.5
    assert info["metadata"]["training"]["options"]["patience"] == 4
    assert info["metadata"]["training"]["options"]["min_delta"] == 0.01
    assert info["metadata"]["training"]["options"]["side_template_mri_fwhm"] == [0.0, 16.0]
    assert info["metadata"]["training"]["options"]["side_template_fixed"] == []  # "none": every map trained
    assert info["metadata"]["side_info"] == ["age"] and info["metadata"]["grid"]["voxel_size"] == 8.0
    assert (out / "group.html").is_file() and (out / "models" / "study_metrics.tsv").is_file()


def test_cli_group_preprocess_only(tiny_bids: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bids = tiny_bids(subjects=["01", "02"], with_pet=["01", "02"])
    fake_preprocessing(monkeypatch)
    result = _cli(str(bids), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
                  "--skip-bids-validation", "--grid", "tiny8mm", "--preprocess-only")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "work" / "train-data").glob("*/mri.npy"))
    assert not (tmp_path / "out" / "models").exists()


def test_cli_group_errors(tiny_bids: Callable[..., Path], tmp_path: Path) -> None:
    bids = tiny_bids(subjects=["01", "02"], with_pet=["01"])
    args = [str(bids), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"), "--skip-bids-validation"]
    too_few = _cli(*args)
    assert too_few.exit_code == 1
    assert (tmp_path / "out" / "logs").is_dir()
    assert _cli(*args, "--side-info", "participant_id").exit_code == 2  # any column but an id is a covariate
    unknown = _cli(*args, "--participant-label", "09")
    assert unknown.exit_code == 2 and "sub-09" in unknown.output


# --------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_group_level_on_phantoms_through_real_preprocessing(tmp_path: Path) -> None:
    from dualglow_app.phantom.cohort import make_cohort

    bids = tmp_path / "bids"
    make_cohort(bids, 2, seed=0, voxel_mm=2.0, jobs=1)
    out = tmp_path / "out"
    result = _cli(str(bids), str(out), "group", "-w", str(tmp_path / "work"), "--grid", "tiny8mm",
                  "--epochs", "2", "--depth", "2", "--hidden", "16", "--nprocs", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((out / "models" / "dualglow.json").read_text())
    assert info["metadata"]["demonstration"] is True
    assert len(info["metadata"]["training"]["subjects"]) == 1


def test_a_fixed_side_template_keeps_its_least_squares_start(tmp_path: Path) -> None:
    """--side-template-fixed age: the age map stays what the fit made it (one epoch or two: the
    same map) while the others train; without it, it trains from the same start."""
    from dualglow_app.covariates import CovariateSpec

    data = paired_volumes(6)
    data.covariates = {"sex": ["F", "M", "F", "M", "F", "M"]}
    data.covariate_declarations = {"sex": CovariateSpec("sex", "categorical", levels=("F", "M"))}
    maps = {}
    for fixed, epochs in ((("age",), 1), (("age",), 2), ((), 2)):
        options = tiny_options(tmp_path / f"{fixed}{epochs}", tmp_path / f"w{fixed}{epochs}", epochs=epochs,
                               side_info=("age", "sex"), side_template_fixed=fixed)  # fmt: skip
        model = train(options, data=data).model
        assert model.pet_side_template is not None
        maps[fixed, epochs] = model.pet_side_template.detach().clone()
    age, sex = model.config.side_channels("age"), model.config.side_channels("sex")
    assert torch.equal(maps[("age",), 1][age], maps[("age",), 2][age]) and maps[("age",), 1][age].abs().max() > 0
    assert not torch.allclose(maps[("age",), 1][sex], maps[("age",), 2][sex])  # the sex maps train
    assert not torch.allclose(maps[("age",), 2][age], maps[(), 2][age])


def test_the_side_template_can_hold_grey_matter_fixed_instead_of_the_t1w(tmp_path: Path) -> None:
    """--side-template-anatomy gm with --anatomy-reading posterior: the least-squares start
    adjusts for the MRI's grey-matter probability (the model's mixture, fitted on the training
    brains, as tissue.GreyMatterModel gives it), so the age map it starts from differs from the
    T1w-adjusted one; gm+csf adds the CSF probability's terms after the grey matter's."""
    from dualglow_app.tissue import GreyMatterModel

    data = paired_volumes(6)
    maps, models = {}, {}
    for anatomy in ("t1w", "gm", "gm+csf"):
        options = tiny_options(tmp_path / anatomy, tmp_path / f"w{anatomy}", epochs=1, side_info=("age",),
                               side_template_anatomy=anatomy, anatomy_reading="posterior")  # fmt: skip
        models[anatomy] = model = train(options, data=data).model
        assert model.pet_side_template is not None and model.config.anatomy_tissue == anatomy
        maps[anatomy] = model.pet_side_template.detach().clone()
    assert not torch.allclose(maps["t1w"], maps["gm"]) and not torch.allclose(maps["gm"], maps["gm+csf"])
    # The model's grey matter is the training brains' mixture posterior (numpy / sklearn there, torch here).
    scaling = IntensityScaling()
    rows = train_module.split_subjects(data.subjects, 0.34, 0)[0]
    grey_matter = GreyMatterModel.fit((scaling.mri_to_model(np.asarray(data.mri[r])) for r in rows),
                                      (np.asarray(data.mask[r]) for r in rows), seed=0)  # fmt: skip
    mri = torch.from_numpy(scaling.mri_to_model(np.asarray(data.mri[:2])))[:, None]
    features = models["gm"].anatomy_features(mri.double())
    assert np.allclose(features[:, 0].numpy(), grey_matter.probability(mri.numpy()), atol=1e-5)
    both = models["gm+csf"].anatomy_features(mri.double())  # the grey matter's terms, then the CSF's
    assert torch.equal(both[:, :3], features)
    assert np.allclose(both[:, 3].numpy(), grey_matter.probability(mri.numpy(), "csf"), atol=1e-5)
    assert torch.equal(models["t1w"].anatomy_features(mri)[:, 0], mri)


def test_anatomy_template_trains_and_the_model_file_carries_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--anatomy-template (the default): the fitted anatomy maps (and, reading the grid T1w, the
    grey-matter mixture) travel in the model file. With fewer than 4 training subjects per
    parameter of its least-squares fit (intercept, age, the grey matter's and the CSF's 3 terms
    each: 32) it is off, and the log says so."""
    with caplog.at_level(logging.WARNING, logger="dualglow"):
        few = train(tiny_options(tmp_path / "few", tmp_path / "wf", epochs=1, side_info=("age",)), data=paired_volumes(6))
    assert not few.model.config.anatomy_template and "--anatomy-template is off for this run: 4 training subjects" in caplog.text
    data = paired_volumes(42)  # 34 training subjects
    options = tiny_options(tmp_path / "o", tmp_path / "w", epochs=1, side_info=("age",), val_fraction=0.2,
                           anatomy_reading="posterior")  # fmt: skip
    result = train(options, data=data)
    model, _ = load_model(result.model_path)
    assert model.config.anatomy_template and model.config.anatomy_tissue == "gm+csf"
    assert model.config.anatomy_terms == 6 and float(model.get_buffer("pet_anatomy_maps").abs().max()) > 0
    assert float(model.get_buffer("tissue_mixture")[1, 1]) != 0.5  # fitted, not the placeholder
    assert bool(torch.isfinite(model.get_buffer("anatomy_term_range")).all())  # set with the fit
    assert math.isfinite(result.final_metrics["mae_suvr"])


def test_a_native_reading_model_trains_on_the_stacked_tissue_maps_and_predicts_from_them(tmp_path: Path) -> None:
    """--anatomy-reading native: the anatomy template is fitted on the tissue maps
    stacked beside the MRIs, the model file says so, and its predictions move with the maps they
    are given (the same T1w with another subject's maps gives another PET); data without maps
    are refused. The T1w-intensity terms read no tissue, whatever the reading."""
    from synthetic_pairs import tissue_maps_of

    from dualglow_app.inference import predict

    data = paired_volumes(42)
    options = tiny_options(tmp_path / "o", tmp_path / "w", epochs=1, side_info=("age",), val_fraction=0.2,
                           anatomy_reading="native")
    assert options.reads_tissue_maps and options.dataset_spec.tissue_maps == "native"
    fractions = tiny_options(tmp_path / "o", tmp_path / "w")  # the default reading: the shipped model's
    assert fractions.anatomy_reading == "native-fractions" == TrainOptions.anatomy_reading
    assert fractions.reads_tissue_maps and fractions.dataset_spec.tissue_maps == "native-fractions"
    intensity = tiny_options(tmp_path / "o", tmp_path / "w", side_template_anatomy="t1w")
    assert not intensity.reads_tissue_maps and intensity.tissue_reading == "posterior"
    data.tissue_maps = None
    with pytest.raises(ValueError, match="needs the scans' native tissue maps"):
        train(options, data=data)
    data.tissue_maps = np.stack([tissue_maps_of(np.roll(m, 2, axis=0), k) for m, k in zip(data.mri, data.mask, strict=True)])
    data.tissue_maps_reading = "native"
    with pytest.raises(ValueError, match="read as 'native'"):  # maps of another reading than the model's
        train(fractions, data=data)
    result = train(options, data=data)
    model, _ = load_model(result.model_path)
    assert model.reads_tissue_maps and not model.uses_tissue_mixture and "tissue_mixture" not in model.state_dict()
    assert float(model.get_buffer("pet_anatomy_maps").abs().max()) > 0
    assert math.isfinite(result.final_metrics["mae_suvr"])
    model.eval()
    own = predict(model, IntensityScaling(), data.mri[0], data.mask[0], {"age": 70.0}, tissue_maps=data.tissue_maps[0]).mean
    other = predict(model, IntensityScaling(), data.mri[0], data.mask[0], {"age": 70.0}, tissue_maps=data.tissue_maps[5]).mean
    assert np.abs(own - other).max() > 0.01
    with pytest.raises(ValueError, match="pass tissue_maps"):
        predict(model, IntensityScaling(), data.mri[0], data.mask[0], {"age": 70.0})
