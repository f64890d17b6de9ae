"""Model files: safetensors + JSON, verified by sha256, rebuilt with strict keys."""

from __future__ import annotations

import doctest
import hashlib
import json
from pathlib import Path

import pytest
import torch

from dualglow_app import weights
from dualglow_app.model import AGE_SCALING, DualGlow, DualGlowConfig
from dualglow_app.model.conditioning import legacy_state_keys
from dualglow_app.model.flows import ActNorm
from dualglow_app.weights import ModelFileError, file_sha256, load_model, model_paths, save_model

SIDE = {"age": torch.tensor([64.0, 81.0]), "sex": torch.tensor([1, 0])}


def images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, 4, 4, 4, generator=gen), torch.rand(2, 1, 4, 4, 4, generator=gen)


@pytest.fixture
def model() -> DualGlow:
    """A tiny 3D model with side information, ActNorms initialised, weights off their init."""
    torch.manual_seed(0)
    cfg = DualGlowConfig(
        ndim=3,
        levels=2,
        depth=1,
        hidden=4,
        relation_hidden=4,
        continuous={"age": AGE_SCALING},
        categorical={"sex": 2},
    )
    net = DualGlow(cfg)
    net.train()
    net.nll(*images(), SIDE)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_save_writes_a_self_describing_pair(model: DualGlow, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "m", {"epochs": 3, "grid": [4, 4, 4]})
    assert path == tmp_path / "m.safetensors"
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["format"] == "dualglow-model" and info["format_version"] == 3
    assert info["sha256"] == file_sha256(path)
    assert info["config"] == model.config.to_dict()
    assert info["metadata"] == {"epochs": 3, "grid": [4, 4, 4]}
    assert "package_version" in info
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.json",
        "m.safetensors",
    ]  # no temp files


def test_loaded_model_gives_identical_outputs(model: DualGlow, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "m.safetensors")
    loaded, info = load_model(path)
    assert not loaded.training
    assert loaded.config == model.config
    mri, pet = images(seed=1)
    mine, theirs = model.nll(mri, pet, SIDE), loaded.nll(mri, pet, SIDE)
    for key in ("bpd_pet_given_mri", "bpd_mri"):
        assert torch.equal(theirs[key], mine[key]), key
    assert torch.equal(
        loaded.sample(mri, SIDE, temperature=0.0), model.sample(mri, SIDE, temperature=0.0)
    )


def test_model_files_leave_out_the_training_only_heads(model: DualGlow, tmp_path: Path) -> None:
    """Eq. 17's heads shape the latents in training and take no part in synthesis: a model file
    leaves them out (the shipped model's 1.9 MB of 21), its nll is eq. 12's likelihood alone,
    and a format 2 file that holds them still loads them."""
    from safetensors.torch import load_file

    full = model.state_dict()
    assert any(k.startswith(DualGlow.TRAINING_ONLY) for k in full)
    loaded, _ = load_model(save_model(model, tmp_path / "m"))
    assert not any(k.startswith(DualGlow.TRAINING_ONLY) for k in load_file(str(tmp_path / "m.safetensors")))
    mri, pet = images(seed=1)
    out = loaded.nll(mri, pet, SIDE)
    assert not loaded.has_side_heads and "side_keep" not in out
    assert torch.allclose(out["loss"], out["bpd_pet_given_mri"] + model.config.lambda_mri * out["bpd_mri"])
    _rewrite(tmp_path, {k: v.contiguous() for k, v in full.items()}, format_version=2)
    older, _ = load_model(tmp_path / "m")
    assert older.has_side_heads
    assert torch.equal(older.nll(mri, pet, SIDE)["loss"], model.nll(mri, pet, SIDE)["loss"])


def _rewrite(tmp_path: Path, tensors: dict[str, torch.Tensor], format_version: int) -> None:
    """Replace m.safetensors and fix m.json's hash and format version."""
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "m.safetensors"))
    info = json.loads((tmp_path / "m.json").read_text())
    info["sha256"], info["format_version"] = file_sha256(tmp_path / "m.safetensors"), format_version
    (tmp_path / "m.json").write_text(json.dumps(info))


def test_conditioning_range_is_saved_and_format_1_files_are_migrated(model: DualGlow, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model.set_conditioning_range([(images()[0], SIDE)])
    loaded, _ = load_model(save_model(model, tmp_path / "m"))
    assert loaded.has_conditioning_range
    tensors = load_file(str(tmp_path / "m.safetensors"))
    # Format 1 stored the range as <what>_{low,high}_<level> buffers: migrated on load.
    legacy = {new: old for old, new in legacy_state_keys(len(model.conditioning_range)).items()}
    _rewrite(tmp_path, {legacy.get(k, k): v for k, v in tensors.items()}, format_version=1)
    migrated, _ = load_model(tmp_path / "m")
    assert migrated.has_conditioning_range
    assert torch.equal(migrated.conditioning_range[1].mu_high, model.conditioning_range[1].mu_high)
    # A format 1 file written before the range existed loads unbounded, as it was trained.
    without = {k: v for k, v in tensors.items() if not k.startswith("conditioning_range.")}
    _rewrite(tmp_path, without, format_version=1)
    older, _ = load_model(tmp_path / "m")
    assert not older.has_conditioning_range
    # Format 2 must hold the range, and anything else missing is refused in any format.
    _rewrite(tmp_path, without, format_version=2)
    with pytest.raises(ModelFileError, match="do not fit the model"):
        load_model(tmp_path / "m")
    _rewrite(tmp_path, {k: v for k, v in without.items() if not k.startswith("relations.0")}, format_version=1)
    with pytest.raises(ModelFileError, match="do not fit the model"):
        load_model(tmp_path / "m")


def test_unknown_format_versions_are_refused(model: DualGlow, tmp_path: Path) -> None:
    save_model(model, tmp_path / "m")
    info = json.loads((tmp_path / "m.json").read_text())
    info["format_version"] = 4
    (tmp_path / "m.json").write_text(json.dumps(info))
    with pytest.raises(ModelFileError, match="format_version 4.*reads 1, 2, 3"):
        load_model(tmp_path / "m")


def test_metadata_round_trips_and_bad_grids_name_the_file(tmp_path: Path) -> None:
    from dualglow_app.data import IntensityScaling
    from dualglow_app.grid import preset
    from dualglow_app.weights import ModelMetadata

    meta = ModelMetadata(grid=preset("tiny8mm"), intensity=IntensityScaling(2.5), side_info=["age"],
                         demonstration=True, training={"epochs": 3})  # fmt: skip
    assert ModelMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    with pytest.raises(ModelFileError, match=r"m\.json: bad grid or intensity"):
        ModelMetadata.from_dict({"grid": {"voxel_size": 4.0, "shape": [5, 5, 5], "origin": [0, 0, 0]}}, tmp_path / "m.json")


def test_checkpoints_round_trip_and_refuse_what_is_not_one(tmp_path: Path) -> None:
    from dualglow_app.weights import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)}, "epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ModelFileError, match=r"t\.pt: unreadable checkpoint.*drop --resume"):
        load_checkpoint(truncated)

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("never run",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(ModelFileError, match="never unpickled") as refused:
        load_checkpoint(evil)
    assert "weights_only" not in str(refused.value)

def test_actnorm_init_survives_load_and_never_reruns(model: DualGlow, tmp_path: Path) -> None:
    loaded, _ = load_model(save_model(model, tmp_path / "m"))
    norms = [m for m in loaded.modules() if isinstance(m, ActNorm)]
    assert norms and all(bool(m.initialized) for m in norms)
    before = [m.loc.detach().clone() for m in norms]
    loaded.train()
    mri, pet = images(seed=2)
    loaded.nll(mri * 10, pet * 10, SIDE)  # very different data: a re-init would move loc
    assert all(torch.equal(b, m.loc) for b, m in zip(before, norms, strict=True))


@pytest.mark.parametrize("name", ["m", "m.json", "m.safetensors"])
def test_load_accepts_stem_or_either_file(model: DualGlow, tmp_path: Path, name: str) -> None:
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / name)
    assert isinstance(loaded, DualGlow)


def test_tampered_tensors_are_refused(model: DualGlow, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "m")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit in the last tensor's data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"m\.safetensors: sha256 .* does not match"):
        load_model(path)


def test_missing_hash_is_refused(model: DualGlow, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "m")
    json_path = tmp_path / "m.json"
    info = json.loads(json_path.read_text())
    del info["sha256"]
    json_path.write_text(json.dumps(info))
    with pytest.raises(ModelFileError, match="no sha256"):
        load_model(path)


def test_missing_description_or_tensors_are_refused(model: DualGlow, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "m")
    (tmp_path / "m.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(ModelFileError, match=r"m\.json: model description not found"):
        load_model(path)
    (tmp_path / "elsewhere.json").rename(tmp_path / "m.json")
    path.unlink()
    with pytest.raises(ModelFileError, match="tensors file not found"):
        load_model(tmp_path / "m")


def test_config_that_does_not_fit_the_tensors_is_refused(model: DualGlow, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "m")
    json_path = tmp_path / "m.json"
    info = json.loads(json_path.read_text())
    info["config"]["depth"] = 2  # the hash covers the tensors only: strict keys must catch this
    json_path.write_text(json.dumps(info))
    with pytest.raises(ModelFileError, match="do not fit the model"):
        load_model(path)
    info["config"]["depht"] = 1
    json_path.write_text(json.dumps(info))
    with pytest.raises(ModelFileError, match="unknown keys"):
        load_model(path)


def test_metadata_must_be_json(model: DualGlow, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not JSON-serialisable"):
        save_model(model, tmp_path / "m", {"when": object()})
    assert not any(tmp_path.iterdir())


def test_file_sha256_and_model_paths(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"dualglow" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"dualglow" * 1000).hexdigest()
    assert model_paths(tmp_path / "a.b.json") == (
        tmp_path / "a.b.safetensors",
        tmp_path / "a.b.json",
    )


def test_docstring_examples_run() -> None:
    result = doctest.testmod(weights)
    assert result.attempted > 0 and result.failed == 0
