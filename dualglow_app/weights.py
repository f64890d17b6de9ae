"""The one place that reads and writes model files and training checkpoints.

A model is a pair ``NAME.safetensors`` (tensors only; no pickle) + ``NAME.json``:

    {"format": "dualglow-model", "format_version": 2, "package_version": "...",
     "created": "...", "tensors_file": "NAME.safetensors", "sha256": "<of the tensors file>",
     "config": {DualGlowConfig.to_dict()}, "metadata": {ModelMetadata.to_dict()}}

Loading rebuilds the model from ``config``, refuses a missing or mismatching hash, and loads
the state dict with strict key matching. Format versions:

- 1: the conditioning range as model buffers ``<what>_{low,high}_<level>`` (or absent in files
  written before it existed: they load unbounded, as trained);
- 2: the conditioning range as ``conditioning_range.<level>.*`` (one module per level).

Files of version 1 are migrated on load; every file this version writes is version 2.
The metadata the stages rely on (model grid, intensity scale, covariates, demonstration flag)
is :class:`ModelMetadata`, written by the group level and checked by :func:`open_model`.
Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) are torch files read with
``weights_only=True``: data, never code.

Example:
    >>> import tempfile
    >>> from dualglow_app.model import DualGlow, DualGlowConfig
    >>> model = DualGlow(DualGlowConfig(ndim=2, levels=1, depth=1, hidden=4, relation_hidden=4))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_model(model, f"{folder}/tiny", {"note": "untrained"})
    ...     loaded, info = load_model(path)
    >>> path.name, info["metadata"]["note"]
    ('tiny.safetensors', 'untrained')
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualglow_app import __version__
from dualglow_app.data import IntensityScaling
from dualglow_app.grid import ModelGrid
from dualglow_app.io import file_sha256
from dualglow_app.log import get_logger
from dualglow_app.model.conditioning import legacy_state_keys
from dualglow_app.model.dualglow import DualGlow, DualGlowConfig

log = get_logger(__name__)

FORMAT = "dualglow-model"
#: 3: eq. 17's side-information heads are left out (DualGlow.TRAINING_ONLY; 1.9 MB of the
#: shipped model's 21 MB), so a file holds what synthesis uses.
FORMAT_VERSION = 3
#: Versions this release reads (older ones are migrated on load).
READABLE_FORMAT_VERSIONS = (1, 2, 3)
_SUFFIXES = (".safetensors", ".json")


class ModelFileError(Exception):
    """A model file is missing, unreadable, corrupt or does not match its description."""


def model_paths(path_or_stem: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, ``NAME.safetensors`` or ``NAME.json``."""
    path = Path(path_or_stem)
    stem = path.with_suffix("") if path.suffix in _SUFFIXES else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _write_atomically(path: Path, write: Any) -> None:
    """Write via ``write(tmp_path)`` then rename, so readers never see a half-written file."""
    from dualglow_app.io import atomic_path

    with atomic_path(path) as tmp:
        write(tmp)


def save_model(
    model: DualGlow, path_or_stem: str | os.PathLike[str], metadata: ModelMetadata | dict[str, Any] | None = None
) -> Path:
    """Write ``NAME.safetensors`` + ``NAME.json``; returns the ``.safetensors`` path.

    ``metadata`` is a :class:`ModelMetadata` (what the stages read) or any JSON-able dict.
    """
    from safetensors.torch import save_file

    tensors_path, json_path = model_paths(path_or_stem)
    if isinstance(metadata, ModelMetadata):
        metadata = metadata.to_dict()
    try:
        meta_json = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as err:
        raise ModelFileError(
            f"metadata for {json_path} is not JSON-serialisable ({err}): pass plain dicts, lists, numbers and strings."
        ) from err
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith(DualGlow.TRAINING_ONLY)}  # fmt: skip
    _write_atomically(
        tensors_path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})
    )
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tensors_file": tensors_path.name,
        "sha256": file_sha256(tensors_path),
        "config": model.config.to_dict(),
        "metadata": meta_json,
    }
    text = json.dumps(description, indent=2, sort_keys=False) + "\n"
    _write_atomically(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("saved model %s (sha256 %s)", tensors_path, description["sha256"][:12])
    return tensors_path


def read_model_info(path_or_stem: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``NAME.json`` of a model, checked for format (not for the tensors' hash)."""
    _, json_path = model_paths(path_or_stem)
    if not json_path.is_file():
        raise ModelFileError(
            f"{json_path}: model description not found; a dualglow model is NAME.safetensors + NAME.json "
            "written by dualglow_app.weights.save_model, keep both files together."
        )
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelFileError(
            f"{json_path}: unreadable model description ({err}); re-save or re-download the model."
        ) from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelFileError(
            f'{json_path}: not a dualglow model description (no "format": "{FORMAT}").'
        )
    if info.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ModelFileError(
            f"{json_path}: format_version {info.get('format_version')!r}, this dualglow ({__version__}) "
            f"reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))}; use the dualglow version that wrote it "
            f"({info.get('package_version')})."
        )
    return info


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[DualGlow, dict[str, Any]]:
    """Rebuild a :class:`DualGlow` from ``NAME.json`` and its verified ``NAME.safetensors``.

    Returns ``(model, info)`` with the model in eval mode on ``device`` and ``info`` the
    parsed JSON description. Raises :class:`ModelFileError` with a one-line reason and fix.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors_path, json_path = model_paths(path)
    info = read_model_info(json_path)
    if not tensors_path.is_file():
        raise ModelFileError(
            f"{tensors_path}: tensors file not found next to {json_path.name}; copy both files of the model."
        )
    expected = info.get("sha256")
    if not isinstance(expected, str) or not expected:
        raise ModelFileError(
            f"{json_path}: no sha256 for {tensors_path.name}, refusing unverifiable weights; re-save the model with save_model."
        )
    actual = file_sha256(tensors_path)
    if actual != expected:
        raise ModelFileError(
            f"{tensors_path}: sha256 {actual[:12]}... does not match {expected[:12]}... recorded in {json_path.name}; "
            "the file is corrupt or was modified: re-download or re-save the model."
        )
    try:
        config = DualGlowConfig.from_dict(info["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{json_path}: bad model config ({err}).") from err
    model = DualGlow(config)
    try:
        state = load_file(str(tensors_path), device="cpu")
        if info["format_version"] == 1:
            state = _migrate_v1(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        heads = [k for k in missing if k.startswith(DualGlow.TRAINING_ONLY)]
        missing = [k for k in missing if k not in heads]
        if missing or unexpected:
            raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.has_side_heads = model.has_side_heads and not heads
    except (SafetensorError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ModelFileError(
            f"{tensors_path}: tensors do not fit the model described in {json_path.name} ({first_line}); "
            "the two files do not belong together: re-save the model."
        ) from err
    model.to(device).eval()
    log.info("loaded model %s (sha256 %s)", tensors_path, actual[:12])
    return model, info


def _migrate_v1(state: dict[str, torch.Tensor], model: DualGlow) -> dict[str, torch.Tensor]:
    """Format 1 -> 2: rename the conditioning-range buffers; a file written before the range
    existed gets the model's unbounded one (it loads as it was trained)."""
    renames = legacy_state_keys(len(model.conditioning_range))
    migrated = {renames.get(key, key): value for key, value in state.items()}
    for key, value in model.state_dict().items():
        if key.startswith("conditioning_range.") and key not in migrated:
            migrated[key] = value
    return migrated


DEFAULT_MODEL = "dualglow-phantom-demo"
MODELS_DIR_ENV = "DUALGLOW_MODELS_DIR"


class WeightsNotFoundError(ModelFileError, FileNotFoundError):
    """``--weights`` names no model file; the message lists every place that was searched."""


def model_search_dirs() -> list[Path]:
    """Where named models are looked up, in order: ``$DUALGLOW_MODELS_DIR``, then the
    ``models/`` folder of the source tree, then ``<prefix>/share/dualglow/models`` (installed)."""
    import sys

    folders = []
    if os.environ.get(MODELS_DIR_ENV):
        folders.append(Path(os.environ[MODELS_DIR_ENV]))
    folders.append(Path(__file__).resolve().parents[1] / "models")
    folders.append(Path(sys.prefix) / "share" / "dualglow" / "models")
    return folders


def resolve_weights(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """The ``NAME.safetensors`` of a model given as a path (stem or either file) or a name.

    A path is used as given; a bare name is looked up in :func:`model_search_dirs`. ``None``
    means :data:`DEFAULT_MODEL`. Raises :class:`WeightsNotFoundError` naming where it looked.

    >>> resolve_weights("/no/such/model")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    WeightsNotFoundError: model '/no/such/model' not found; looked for /no/such/model.safetensors; ...
    """
    given = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    candidates: list[Path] = []
    is_path = os.sep in given or given.endswith(_SUFFIXES) or Path(given).exists()
    if is_path:
        candidates.append(model_paths(Path(given).expanduser())[0])
    else:
        candidates.extend(model_paths(folder / given)[0] for folder in model_search_dirs())
    for tensors_path in candidates:
        if tensors_path.is_file() or model_paths(tensors_path)[1].is_file():
            return tensors_path
    hint = (
        "pass --weights PATH to a NAME.safetensors written by the group level"
        if is_path
        else f"put {given}.safetensors + {given}.json in ${MODELS_DIR_ENV} or pass --weights PATH"
    )
    looked = "; ".join(str(c) for c in candidates)
    raise WeightsNotFoundError(f"model {given!r} not found; looked for {looked}; {hint}.")


# --------------------------------------------------------------------------- metadata


@dataclass
class ModelMetadata:
    """What the stages read from a model file besides the weights (``NAME.json["metadata"]``).

    ``grid``: the model grid the model was trained on (None only for models that are not for
    synthesis, e.g. 2D test models); ``intensity``: the [0, 1] <-> SUVR scaling;
    ``side_info``: the covariate names it is conditioned on (e.g. ``["age"]``);
    ``covariates``: how each was learnt (:class:`dualglow_app.covariates.CovariateSpec` as a
    dict: kind, units, centre/scale and training range, or the classes in index order with
    their training counts), so the participant level decodes a scan's values as the training
    encoded them; empty in files written before it existed (age alone: see
    :attr:`LoadedModel.covariates`); ``demonstration``: trained on the synthetic phantom
    cohort; ``training``: free-form facts (subjects, epochs, seed, validation metrics,
    hardware, options).

    >>> meta = ModelMetadata(grid=None, side_info=["age"])
    >>> ModelMetadata.from_dict(meta.to_dict()) == meta
    True
    """

    grid: ModelGrid | None
    intensity: IntensityScaling = field(default_factory=IntensityScaling)
    side_info: list[str] = field(default_factory=list)
    demonstration: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    covariates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "grid": None if self.grid is None else self.grid.to_dict(),
            "intensity": self.intensity.to_dict(),
            "side_info": list(self.side_info),
            "demonstration": self.demonstration,
            "training": self.training,
        }
        if self.covariates:  # absent, as in older files, for a model without learnt covariates
            data["covariates"] = {name: dict(spec) for name, spec in self.covariates.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: os.PathLike[str] | str = "metadata") -> ModelMetadata:
        """Parse and check; a bad grid or intensity raises :class:`ModelFileError` naming ``source``."""
        try:
            grid = ModelGrid.from_dict(data["grid"]) if data.get("grid") is not None else None
            intensity = IntensityScaling.from_dict(data.get("intensity") or {})
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{source}: bad grid or intensity metadata ({err}).") from err
        covariates = data.get("covariates") or {}
        if not isinstance(covariates, dict) or not all(isinstance(v, dict) for v in covariates.values()):
            raise ModelFileError(f"{source}: bad covariates metadata (expected an object of objects by name).")
        return cls(
            grid=grid, intensity=intensity, side_info=list(data.get("side_info") or []),
            demonstration=bool(data.get("demonstration", False)), training=dict(data.get("training") or {}),
            covariates={name: dict(spec) for name, spec in covariates.items()},
        )  # fmt: skip


@dataclass
class LoadedModel:
    """A verified model ready for synthesis: the network and what its file says about it.

    ``name`` is the file stem, ``sha256`` the tensors file's hash, ``device`` where it runs.
    """

    model: DualGlow
    path: Path
    name: str
    sha256: str
    metadata: ModelMetadata
    device: Any

    @property
    def grid(self) -> ModelGrid:
        assert self.metadata.grid is not None, "open_model refuses models without a grid"
        return self.metadata.grid

    @property
    def scaling(self) -> IntensityScaling:
        return self.metadata.intensity

    @property
    def side_names(self) -> list[str]:
        return list(self.model.config.side_names)

    @property
    def uses_age(self) -> bool:
        return "age" in self.side_names

    @property
    def covariates(self) -> dict[str, Any]:
        """Each covariate the model is conditioned on as a learnt
        :class:`~dualglow_app.covariates.CovariateSpec`, in the network's order: from the
        metadata, or for a file written before covariates were stored, from its config (age in
        years with its (70, 10) scaling; a categorical covariate then has no named classes)."""
        from dualglow_app.covariates import CovariateSpec, legacy_specs

        stored = self.metadata.covariates
        if stored:
            return {name: CovariateSpec.from_dict(stored[name]) for name in self.side_names}
        config = self.model.config
        return legacy_specs(config.continuous, config.categorical)

    @property
    def demonstration(self) -> bool:
        return self.metadata.demonstration

    def mean_training_pet(self) -> np.ndarray | None:
        """The mean training PET (SUVR, model grid) as the model holds it, or None without templates.

        With a side template that is T + B c-bar, the template at the training population's
        average covariates: a continuous covariate at its centre (the training mean, c = 0),
        a categorical one at its classes' training shares. T alone is the PET at c = 0, which
        for a one-hot covariate is no class at all: the fit centres each categorical
        covariate's maps over its classes (DualGlow.centre_categorical_maps), so T is then
        their unweighted average, not the training population's mix (and models fitted
        before that had whatever split the least-squares solution chose: with the MRI terms
        of finding 17 T fell to a median of 0.72 SUVR).
        """
        model = self.model
        if model.config.template_shape is None:
            return None
        template = model.get_buffer("pet_template")
        average = None
        if model.pet_side_template is not None:
            average = torch.zeros(1, model.config.n_side, dtype=template.dtype, device=template.device)
            for name, spec in self.covariates.items():
                total = sum(spec.counts.values())
                if spec.is_categorical and total:
                    shares = [spec.counts.get(level, 0) / total for level in spec.levels]
                    average[0, model.config.side_channels(name)] = torch.tensor(shares, dtype=template.dtype)
        with torch.no_grad():
            centre = model._center(template, "pet", average)  # the model's own T + B c
        assert isinstance(centre, torch.Tensor)
        return self.scaling.pet_from_model(centre[0, 0].cpu().numpy().astype(np.float32))


def open_model(weights: str | os.PathLike[str] | None, device: Any = "cpu") -> LoadedModel:
    """Resolve (:func:`resolve_weights`), verify and load a model for synthesis on ``device``:
    a trained 3D model with a model grid in its metadata."""
    path = resolve_weights(weights)
    model, info = load_model(path, device=device)
    json_path = model_paths(path)[1]
    metadata = ModelMetadata.from_dict(info.get("metadata") or {}, json_path)
    if metadata.grid is None:
        raise ModelFileError(
            f"{json_path}: no model grid in the metadata; re-save the model with ModelMetadata(grid=...)."
        )
    if model.config.ndim != 3:
        raise ModelFileError(f"{json_path}: a {model.config.ndim}D model; synthesis needs a 3D one.")
    if not model.is_initialized:
        raise ModelFileError(f"{json_path}: the model was never trained (ActNorm not initialised); use trained weights.")
    check_covariates(metadata, model.config, json_path)
    return LoadedModel(model, path, path.name.removesuffix(".safetensors"), str(info["sha256"]), metadata, device)


def check_covariates(metadata: ModelMetadata, config: DualGlowConfig, source: os.PathLike[str] | str) -> None:
    """The stored covariates must be the config's, encoded as the config says (the same
    centre/scale, as many classes as levels); otherwise the file was edited or mixed up."""
    from dualglow_app.covariates import CovariateSpec

    if not metadata.covariates:
        return
    problems = []
    if sorted(metadata.covariates) != sorted(config.side_names):
        problems.append(f"covariates {sorted(metadata.covariates)} but the network takes {sorted(config.side_names)}")
    for name, data in metadata.covariates.items():
        try:
            spec = CovariateSpec.from_dict(data)
        except (TypeError, ValueError) as err:
            problems.append(str(err))
            continue
        if name in config.continuous and (spec.is_categorical or (spec.centre, spec.scale) != config.continuous[name]):
            problems.append(f"{name}: stored as {spec.summary()!r}, the network scales it by {config.continuous[name]}")
        if name in config.categorical and len(spec.levels) != config.categorical[name]:
            problems.append(f"{name}: {len(spec.levels)} levels stored, the network has {config.categorical[name]} classes")
    if problems:
        raise ModelFileError(f"{source}: the covariates in the metadata do not match the model ({'; '.join(problems)}); "
                             "re-save the model from its group level.")  # fmt: skip


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: os.PathLike[str] | str, state: dict[str, Any]) -> Path:
    """Write a training checkpoint atomically (tensors, numbers, strings, lists and dicts only)."""
    from dualglow_app.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: os.PathLike[str] | str, device: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, never unpickling code.

    A truncated or foreign file raises :class:`ModelFileError` with one line naming it and the fix.
    """
    import pickle
    import zipfile

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"{path}: not a dualglow checkpoint (it holds Python objects, which are never unpickled); "
            "delete it, or drop --resume to start afresh."
        ) from err
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise ModelFileError(
            f"{path}: unreadable checkpoint ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
            "delete it, or drop --resume to start afresh."
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise ModelFileError(f"{path}: not a dualglow checkpoint; delete it, or drop --resume to start afresh.")
    return state


__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "LoadedModel",
    "ModelMetadata",
    "load_checkpoint",
    "open_model",
    "save_checkpoint",
    "WeightsNotFoundError",
    "ModelFileError",
    "file_sha256",
    "load_model",
    "model_paths",
    "model_search_dirs",
    "read_model_info",
    "resolve_weights",
    "save_model",
]
