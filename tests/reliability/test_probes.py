"""Issue 20's probes, each as a new user would meet it, through the command line.

Registration is the fast identity of :mod:`harness`; everything else runs for real. Each test
names the probe it covers (1-11; 6 and 8 are container matters, tests/test_container.py).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from conftest import invoke
from harness import build_cohort, temporaries

pytestmark = pytest.mark.usefixtures("fast_registration")


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One work dir for the module: later runs reuse the preprocessing cache."""
    return tmp_path_factory.mktemp("probe-work")


def participant(bids: Path, out: Path, model: Path, work: Path, *extra: object) -> list[object]:
    return [bids, out, "participant", "--weights", model, "-w", work, "--skip-bids-validation", "--nprocs", "1",
            "--output-res", "4", *extra]  # fmt: skip


def with_age(cohort: Path, folder: Path, cell: str) -> Path:
    """A copy of the cohort whose sub-01 has ``cell`` as its age."""
    bids = folder / "bids"
    shutil.copytree(cohort, bids)
    rows = (bids / "participants.tsv").read_text().splitlines()
    rows[1] = "\t".join(["sub-01", cell, *rows[1].split("\t")[2:]])
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    return bids


# --------------------------------------------------------------------------- probes 1 and 2: ages


@pytest.mark.parametrize("cell", ["nan", "-5", "0", "300", "abc", "n/a"])
def test_probe_1_2_an_unusable_age_fails_that_subject_alone(
    cohort: Path, model: Path, shared_work: Path, tmp_path: Path, cell: str
) -> None:
    """Before: nan gave exit 0 and an all-zero PET with "Age": NaN in its sidecar; -5, 0 and
    300 were used; abc stopped the whole run (exit 2); n/a failed the subject alone. Now all
    of them fail sub-01 alone, naming participants.tsv and the row, and nothing of sub-01 is
    written."""
    bids, out = with_age(cohort, tmp_path, cell), tmp_path / "out"
    result = invoke(*participant(bids, out, model, shared_work))
    assert result.exit_code == 1, result.output
    assert "2 processed, 0 skipped (outputs exist), 1 failed" in result.output
    failed = next(line for line in result.stdout.splitlines() if "FAILED sub-01" in line)
    if cell == "n/a":
        assert f"add an 'age' value to {bids}/participants.tsv (row sub-01), or pass --age YEARS" in failed
    else:
        assert f"{bids}/participants.tsv, row sub-01, column age: " in failed and "write n/a" in failed
    assert not (out / "sub-01").exists()
    sidecars = list(out.rglob("*_pet.json"))
    assert len(sidecars) == 2 and all(json.loads(p.read_text())["Age"] in (65.0, 70.0) for p in sidecars)


def test_probe_1_nan_never_reaches_the_model() -> None:
    """The last guard before the model: a NaN age is refused even by the Python API."""
    from types import SimpleNamespace

    from dualglow_app.synthesize import ScanError, synthesize

    model = SimpleNamespace(uses_age=True, name="m")
    with pytest.raises(ScanError, match="conditioned on age"):
        synthesize(model, None, None, float("nan"), None, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "message"), [
    (["--age", "5"], "--age 5: 5 is outside 18-110 years"),
    (["--age", "nan"], "--age nan: nan is not a number of years"),
    (["--age-sweep", "60", "300"], "--age-sweep 300: 300 is outside 18-110 years"),
])  # fmt: skip
def test_probe_2_the_age_options_use_the_same_range(cohort: Path, model: Path, tmp_path: Path, args: list[str],
                                                    message: str) -> None:  # fmt: skip
    result = invoke(*participant(cohort, tmp_path / "out", model, tmp_path / "work", *args))
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out" / "sub-01").exists()


# --------------------------------------------------------------------------- probe 3: options of the other level


def test_probe_3_options_of_the_other_level_are_refused(cohort: Path, tmp_path: Path) -> None:
    """The issue's two commands, word for word: both exit 0 before; now 2, naming the option."""
    out = tmp_path / "out"
    first = invoke(cohort, out, "participant", "--epochs", "5", "--grid", "paper2mm")
    assert first.exit_code == 2 and "--epochs is a group-level option" in first.output
    second = invoke(cohort, out, "group", "--preprocess-only", "--samples", "10", "--weights", "/nonexistent",
                    "--overwrite")  # fmt: skip
    assert second.exit_code == 2 and "is a participant-level option" in second.output
    assert not out.exists()


# --------------------------------------------------------------------------- probe 4: folders that cannot be written


@pytest.mark.parametrize("level", ["participant", "group"])
@pytest.mark.parametrize("which", ["OUTPUT_DIR", "-w/--work-dir"])
def test_probe_4_a_folder_that_cannot_be_written_is_one_line_exit_2(cohort: Path, tmp_path: Path, level: str,
                                                                    which: str) -> None:  # fmt: skip
    """Before: a traceback ending in NotADirectoryError / PermissionError, exit 1."""
    (tmp_path / "file").write_text("in the way")
    blocked = tmp_path / "file" / "folder"
    out, work = (blocked, tmp_path / "work") if which == "OUTPUT_DIR" else (tmp_path / "out", blocked)
    result = invoke(cohort, out, level, "-w", work, "--skip-bids-validation")
    assert result.exit_code == 2, result.output
    assert f"{which} {blocked} cannot be written: make it writable, or choose another folder." in result.output
    assert "Traceback" not in result.output


def test_probe_4_evaluation_folders_too(cohort: Path, tmp_path: Path) -> None:
    from dualglow_app.cli.evaluate import main as evaluate

    (tmp_path / "file").write_text("in the way")
    result = invoke(cohort, tmp_path / "out", "-w", tmp_path / "file" / "work", command=evaluate)
    assert result.exit_code == 2 and "-w/--work-dir" in result.output and "cannot be written" in result.output


def test_probe_4_an_oserror_later_in_the_run_is_one_line_naming_the_path(
    cohort: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boundary's safety net: a full disk while writing the dataset's own files stops
    the run with the path and the fix (exit 2); with -v the traceback follows."""
    from dualglow_app import bids

    def full_disk(out_dir: Path, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(Path(out_dir) / "dataset_description.json"))

    monkeypatch.setattr(bids, "write_dataset_description", full_disk)
    monkeypatch.setattr("dualglow_app.derivatives.write_dataset_description", full_disk)
    out = tmp_path / "out"
    result = invoke(*participant(cohort, out, model, tmp_path / "work"))
    assert result.exit_code == 2
    assert (f"{out}/dataset_description.json: No space left on device; the disk is full: free space, or choose a "
            "folder on another disk") in result.output  # fmt: skip
    assert "Traceback" not in result.output
    verbose = invoke(*participant(cohort, out, model, tmp_path / "work", "-v"))
    assert verbose.exit_code == 2 and "Traceback" in verbose.output


def test_probe_4_an_oserror_in_one_subject_fails_that_subject(
    cohort: Path, model: Path, shared_work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dualglow_app import io

    real = io.save_nifti

    def save(image: object, path: Path) -> Path:
        if "sub-02" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(image, path)

    monkeypatch.setattr("dualglow_app.synthesize.save_nifti", save)
    result = invoke(*participant(cohort, tmp_path / "out", model, shared_work))
    assert result.exit_code == 1 and "2 processed, 0 skipped (outputs exist), 1 failed" in result.output
    assert "FAILED sub-02: " in result.stdout and ": Permission denied; make it writable" in result.stdout


def test_probe_4_the_default_work_dir_falls_back_to_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """In the container OUTPUT_DIR is /out and /dualglow-work cannot be written."""
    import tempfile

    from dualglow_app import options
    from dualglow_app.options import ParticipantOptions, TrainOptions, default_work_dir

    assert default_work_dir(tmp_path / "out") == tmp_path / "dualglow-work"
    monkeypatch.setattr(options, "writable_dir", lambda path: Path(path) != tmp_path / "dualglow-work")
    caplog.set_level("INFO", logger="dualglow")
    fallback = Path(tempfile.gettempdir()) / "dualglow-work"
    assert ParticipantOptions(tmp_path / "bids", tmp_path / "out").work_dir == fallback
    assert TrainOptions(tmp_path / "bids", tmp_path / "out").work_dir == fallback
    assert f"{tmp_path / 'dualglow-work'} cannot be written; the work directory is {fallback}" in caplog.text


# --------------------------------------------------------------------------- probe 5 (and 11): SIGTERM


def test_probe_5_sigterm_while_stacking_leaves_nothing_and_says_how_to_resume(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: no handler, so the group level died with WORK/train-data/.HASH.tmp-PID/ left
    behind and not a word. Now: exit 143, one line naming what was interrupted, no temporary."""
    import os

    from dualglow_app import preprocess

    real, calls = preprocess.preprocess_pet, {"n": 0}

    def pet_then_sigterm(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(preprocess, "preprocess_pet", pet_then_sigterm)
    work = tmp_path / "work"
    result = invoke(cohort, tmp_path / "out", "group", "-w", work, "--preprocess-only", "--grid", "tiny8mm",
                    "--skip-bids-validation", "--nprocs", "1")  # fmt: skip
    assert result.exit_code == 143, result.output
    assert ("interrupted by SIGTERM while preprocessing sub-02 (1 of 3 pairs done): no half-written file was kept; "
            "rerun the same command to continue: what was preprocessed is cached in the work dir") in result.output
    assert temporaries(work, tmp_path / "out") == []
    assert [p.name for p in (work / "train-data").iterdir() if not p.name.endswith(".lock")] == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the previous handler is restored"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_probe_11_an_interrupted_participant_run_says_where_and_how_to_resume(
    cohort: Path, model: Path, shared_work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """Before: a SIGTERM'd participant run exited without a word."""
    import os

    from dualglow_app import io

    real, calls = io.save_nifti, {"n": 0}

    def save_then_signal(image: object, path: Path) -> Path:
        calls["n"] += 1
        if calls["n"] == 3:  # sub-02's preprocessed T1w
            os.kill(os.getpid(), signum)
        return real(image, path)

    monkeypatch.setattr("dualglow_app.synthesize.save_nifti", save_then_signal)
    out = tmp_path / "out"
    result = invoke(*participant(cohort, out, model, shared_work))
    assert result.exit_code == 128 + signum
    name = signal.Signals(signum).name
    assert (f"interrupted by {name} during sub-02, after 1 of 3 scan(s): no half-written file was kept; rerun the "
            "same command to continue: finished scans are skipped") in result.output  # fmt: skip
    assert temporaries(out) == [] and not list((out / "sub-02").rglob("*.nii.gz"))


def test_interrupted_evaluation_and_phantom_say_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from dualglow_app.cli.evaluate import main as evaluate_cli
    from dualglow_app.cli.phantom import main as phantom_cli

    def sigterm(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("dualglow_app.evaluate.evaluate", sigterm)
    monkeypatch.setattr("dualglow_app.phantom.cohort.make_cohort", sigterm)
    bids = build_cohort(tmp_path / "bids", subjects=1)
    result = invoke(bids, tmp_path / "out", "-w", tmp_path / "work", command=evaluate_cli)
    assert result.exit_code == 143
    assert "interrupted by SIGTERM: no half-written file was kept; rerun the same command to continue: finished " \
           "folds and methods are reused" in result.output
    made = invoke(tmp_path / "phantom", "--subjects", "2", command=phantom_cli)
    assert made.exit_code == 143 and "rerun the same command with --overwrite" in made.output


def test_probe_10_an_image_whose_sidecar_was_never_renamed_is_redone(
    cohort: Path, model: Path, shared_work: Path, tmp_path: Path
) -> None:
    """SIGKILL between an image's rename and its sidecar's left a scan that every rerun
    skipped, so its sidecar (and report) never came (found by the random-kill tests)."""
    out = tmp_path / "out"
    args = participant(cohort, out, model, shared_work, "--participant-label", "03")
    assert invoke(*args).exit_code == 0
    sidecar = next((out / "sub-03" / "pet").glob("*desc-synthetic_pet.json"))
    sidecar.unlink()
    (out / "sub-03.html").unlink()
    again = invoke(*args)
    assert again.exit_code == 0 and "1 processed, 0 skipped" in again.stdout
    assert json.loads(sidecar.read_text())["Age"] == 70.0 and (out / "sub-03.html").is_file()
    assert "0 processed, 1 skipped" in invoke(*args).stdout


# --------------------------------------------------------------------------- probe 7: a bad checkpoint


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("payload", ["truncated", "pickle"])
def test_probe_7_a_bad_checkpoint_under_resume_is_one_line(cohort: Path, tmp_path: Path, payload: str) -> None:
    import pickle

    work = tmp_path / "work"
    checkpoint = work / "train" / "dualglow" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    if payload == "pickle":
        checkpoint.write_bytes(pickle.dumps(Path("/etc/passwd")))
    else:
        checkpoint.write_bytes(b"PK\x03\x04 half a zip")
    result = invoke(cohort, tmp_path / "out", "group", "-w", work, "--resume", "--grid", "tiny8mm", "--depth", "1",
                    "--hidden", "8", "--relation-hidden", "8", "--epochs", "1", "--skip-bids-validation",
                    "--nprocs", "1")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"{checkpoint}: " in result.output and "delete it, or drop --resume to start afresh" in result.output
    assert "Traceback" not in result.output and "weights_only" not in result.output


# --------------------------------------------------------------------------- probe 9: an unknown label


def test_probe_9_an_unknown_label_lists_the_subjects_there_are(cohort: Path, model: Path, tmp_path: Path) -> None:
    """Before: "the dataset has: none" (only the labels asked for were indexed)."""
    result = invoke(*participant(cohort, tmp_path / "out", model, tmp_path / "work", "--participant-label", "01", "7"))
    assert result.exit_code == 2
    assert "no participant(s) sub-7; the dataset has: sub-01, sub-02, sub-03." in result.output


# --------------------------------------------------------------------------- probe 11: pickles, reprs


def test_probe_11_a_pickle_weights_file_is_refused_as_such(cohort: Path, tmp_path: Path) -> None:
    """Before: "model 'x.pt' not found" although the file is there."""
    (tmp_path / "x.pt").write_bytes(b"\x80\x04 pickle")
    result = invoke(cohort, tmp_path / "out", "participant", "--weights", tmp_path / "x.pt", "-w", tmp_path / "work")
    assert result.exit_code == 2
    assert f"--weights {tmp_path / 'x.pt'}: pickle files (torch.save) are not accepted" in result.output


def test_probe_11_messages_show_numbers_not_numpy_reprs(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    from dualglow_app.preprocess import InputImageError, load_image

    path = tmp_path / "absurd.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16), np.float32), np.diag([50.0] * 3 + [1])), path)
    with pytest.raises(InputImageError) as refused:
        load_image(path)
    assert "np.float64" not in str(refused.value) and "(50.0, 50.0, 50.0) mm" in str(refused.value)


def test_unexpected_errors_are_one_line_with_a_hint_and_traceback_under_v(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    def boom(options: object) -> None:
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr("dualglow_app.synthesize.run_participant", boom)
    args = [cohort, tmp_path / "out", "participant", "-w", tmp_path / "work"]
    result = invoke(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output and "second line" not in result.output
    assert "RuntimeError: something nobody foresaw (rerun with -v for the traceback)" in result.output
    verbose = invoke(*args, "-v")
    assert verbose.exit_code == 1 and "Traceback" in verbose.output
