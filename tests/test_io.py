from pathlib import Path

import pytest

from dualglow_app.io import atomic_path, write_json


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "img.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert list(target.parent.iterdir()) == []


def test_atomic_write_replaces(tmp_path: Path) -> None:
    target = write_json(tmp_path / "a.json", {"x": 1})
    write_json(target, {"x": 2})
    assert target.read_text().strip().endswith("}") and '"x": 2' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_outputs_get_the_usual_permissions(tmp_path: Path) -> None:
    import os
    import stat

    def recreate(path: Path) -> None:  # what safetensors' save_file does: a new 0600 file
        path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    current = os.umask(0o022)
    try:
        target = write_json(tmp_path / "b.json", {})
        with atomic_path(tmp_path / "c.safetensors") as tmp:
            recreate(tmp)
    finally:
        os.umask(current)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c.safetensors").stat().st_mode) == 0o644
