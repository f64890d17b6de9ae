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


# --------------------------------------------------------------------------- temporaries of killed runs


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_name_their_owner(tmp_path: Path) -> None:
    import os

    from dualglow_app.io import is_temporary, temporary_owner

    with atomic_path(tmp_path / "img.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and is_temporary(tmp.name)
        assert temporary_owner(tmp.name) is not None and temporary_owner(tmp.name)[0] == os.getpid()  # type: ignore[index]
    assert not is_temporary("img.nii.gz") and not is_temporary(".bidsignore") and not is_temporary(".t1w-ab.lock")


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path: Path) -> None:
    """What SIGKILL leaves (a truncated hidden image, a half-built cache folder) is removed on
    the next run; a temporary a live run is writing is not."""
    import os

    from dualglow_app.io import _host_id, remove_stale_temporaries

    host, dead = _host_id(), _dead_pid()
    (tmp_path / "sub-01" / "pet").mkdir(parents=True)
    stale_file = tmp_path / "sub-01" / "pet" / f".x_pet.nii.gz.abcd1234.tmp-{dead}-{host}.nii.gz"
    stale_file.write_bytes(b"\x1f\x8b truncated")
    stale_dir = tmp_path / "cache" / f".t1w-0123-ab.efgh5678.tmp-{dead}-{host}"
    (stale_dir / "inner").mkdir(parents=True)
    (stale_dir / "inner" / f".not-ours.zzzz9999.tmp-{os.getpid()}-{host}").write_text("")
    live = tmp_path / "cache" / f".t1w-4567-cd.ijkl9012.tmp-{os.getpid()}-{host}"
    live.mkdir()
    finished = tmp_path / "sub-01" / "pet" / "x_pet.nii.gz"
    finished.write_bytes(b"done")
    assert remove_stale_temporaries(tmp_path) == [], "not recursive: nothing at the top level"
    removed = remove_stale_temporaries(tmp_path, recursive=True)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert live.is_dir() and finished.read_bytes() == b"done"


def test_foreign_and_legacy_temporaries_are_removed_only_when_old(tmp_path: Path) -> None:
    import os

    from dualglow_app.io import STALE_AFTER_S, remove_stale_temporaries

    names = [".x.nii.gz.abcd1234.tmp-1-00000000.nii.gz",  # another host
             ".x.json.abcd1234.tmp.json",  # atomic file of an earlier version
             ".tmp-t1w-0123-ab-abcd1234",  # cache entry of an earlier version
             ".0123456789abcdef.tmp-42"]  # stacked data of an earlier version  # fmt: skip
    for name in names:
        (tmp_path / name).write_text("")
    assert remove_stale_temporaries(tmp_path) == []
    old = os.path.getmtime(tmp_path / names[0]) - STALE_AFTER_S - 60
    for name in names:
        os.utime(tmp_path / name, (old, old))
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted(names)


def test_atomic_dir_renames_on_success_and_keeps_a_concurrent_copy(tmp_path: Path) -> None:
    from dualglow_app.io import atomic_dir

    final = tmp_path / "entry"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "mine").write_text("1")
        final.mkdir()
        (final / "theirs").write_text("2")  # a concurrent run finished first
    assert [p.name for p in final.iterdir()] == ["theirs"] and len(list(tmp_path.iterdir())) == 1


def test_entry_lock_makes_a_second_run_wait_and_clears_leftovers(tmp_path: Path) -> None:
    """Two processes building one cache entry: the second waits for the first's lock; the
    holder removes the entry's leftover temporaries whatever their owner."""
    import subprocess
    import sys
    import time

    from dualglow_app.io import entry_lock

    final = tmp_path / "cache" / "t1w-0123"
    final.parent.mkdir()
    leftover = final.parent / ".t1w-0123.abcd1234.tmp-1-00000000"
    leftover.mkdir()
    other = final.parent / ".t1w-9999.abcd1234.tmp-1-00000000"
    other.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dualglow_app.io import entry_lock\n"
         f"with entry_lock({str(final)!r}):\n    print('held', flush=True); time.sleep(1.5)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert not leftover.exists() and other.exists(), "the holder clears its own entry's leftovers only"
    start = time.perf_counter()
    with entry_lock(final):
        waited = time.perf_counter() - start
    holder.wait()
    assert waited > 0.5, "the lock was not held by the other process"


def test_writable_dir(tmp_path: Path) -> None:
    from dualglow_app.io import writable_dir

    (tmp_path / "file").write_text("")
    assert writable_dir(tmp_path / "new" / "deeper") and writable_dir(tmp_path)
    assert not writable_dir(tmp_path / "file" / "out"), "a file is in the way"


def test_json_files_are_always_valid_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        write_json(tmp_path / "a.json", {"Age": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_a_run_sweeps_only_the_work_dirs_own_folders(tmp_path: Path) -> None:
    """-w may point into a big shared scratch folder: only what dualglow writes is walked."""
    from dualglow_app.io import _host_id, remove_stale_work_temporaries

    name = f".x.json.abcd1234.tmp-{_dead_pid()}-{_host_id()}.json"
    ours = tmp_path / "train" / "dualglow" / name
    theirs = tmp_path / "someone-elses" / name
    for path in (ours, theirs):
        path.parent.mkdir(parents=True)
        path.write_text("")
    assert remove_stale_work_temporaries(tmp_path) == [ours] and theirs.exists()
