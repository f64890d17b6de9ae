"""The one place that reads and writes model files.

A model is a pair ``NAME.safetensors`` (tensors only; no pickle) + ``NAME.json``:

    {"format": "dualglow-model", "format_version": 1, "package_version": "...",
     "created": "...", "tensors_file": "NAME.safetensors", "sha256": "<of the tensors file>",
     "config": {DualGlowConfig.to_dict()}, "metadata": {free-form: training, model grid, ...}}

Loading rebuilds the model from ``config``, refuses a missing or mismatching hash, and loads
the state dict with strict key matching.

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
from pathlib import Path
from typing import Any

import torch

from dualglow_app import __version__
from dualglow_app.io import file_sha256
from dualglow_app.log import get_logger
from dualglow_app.model.dualglow import CONDITIONING_RANGE_BUFFERS, DualGlow, DualGlowConfig

log = get_logger(__name__)

FORMAT = "dualglow-model"
FORMAT_VERSION = 1
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
    model: DualGlow, path_or_stem: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``NAME.safetensors`` + ``NAME.json``; returns the ``.safetensors`` path.

    ``metadata`` must be JSON-able (training options, data grid, metrics, ...).
    """
    from safetensors.torch import save_file

    tensors_path, json_path = model_paths(path_or_stem)
    try:
        meta_json = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as err:
        raise ModelFileError(
            f"metadata for {json_path} is not JSON-serialisable ({err}): pass plain dicts, lists, numbers and strings."
        ) from err
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
    if info.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{json_path}: format_version {info.get('format_version')!r}, this dualglow ({__version__}) "
            f"reads {FORMAT_VERSION}; use the dualglow version that wrote it ({info.get('package_version')})."
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
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Models written before the conditioning range existed load unbounded (as trained).
        missing = [key for key in missing if not key.startswith(CONDITIONING_RANGE_BUFFERS)]
        if missing or unexpected:
            raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except (SafetensorError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ModelFileError(
            f"{tensors_path}: tensors do not fit the model described in {json_path.name} ({first_line}); "
            "the two files do not belong together: re-save the model."
        ) from err
    model.to(device).eval()
    log.info("loaded model %s (sha256 %s)", tensors_path, actual[:12])
    return model, info


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


__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
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
