from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from dualglow_app import __version__
from dualglow_app.cli import main
from dualglow_app.cli.bids_app import expand_multi_value_options


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_output_dir_equal_to_bids_dir_is_a_usage_error(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids()
    result = CliRunner().invoke(main, [str(root), str(root), "participant"])
    assert result.exit_code == 2
    assert "OUTPUT_DIR" in result.output


def test_non_bids_directory_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [str(tmp_path), str(tmp_path / "out"), "participant"])
    assert result.exit_code == 2
    assert "dataset_description.json" in result.output


def test_missing_bids_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [str(tmp_path / "nope"), str(tmp_path / "out"), "group"])
    assert result.exit_code == 2
    assert "is not a directory" in result.output


def test_space_separated_labels_are_expanded() -> None:
    args = ["bids", "out", "participant", "--participant-label", "01", "sub-02", "-w", "work", "--age-sweep", "60", "-5"]
    assert expand_multi_value_options(args) == [
        "bids", "out", "participant",
        "--participant-label", "01", "--participant-label", "sub-02",
        "-w", "work", "--age-sweep", "60", "--age-sweep", "-5",
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unwind_so_atomic_writes_clean_up(tmp_path: Path, signum: int) -> None:
    """SIGTERM and SIGINT alike become an exception, so every atomic write removes its temporary."""
    from dualglow_app.cli.errors import Interrupted, signals_as_interrupts
    from dualglow_app.io import atomic_path

    target = tmp_path / "out.nii.gz"
    with pytest.raises(Interrupted) as interrupted, signals_as_interrupts(), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a file")
        os.kill(os.getpid(), signum)
    assert interrupted.value.signum == signum and isinstance(interrupted.value, KeyboardInterrupt)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_participant_option_errors_exit_2_before_any_work(tiny_bids: Callable[..., Path], tmp_path: Path) -> None:
    root = tiny_bids()
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(root), str(out), "participant", "--samples", "5"])
    assert result.exit_code == 2
    assert "--samples 5 at --temperature 0 gives 5 identical samples" in result.output
    result = CliRunner().invoke(main, [str(root), str(out), "participant", "--weights", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "looked for" in result.output and "none.safetensors" in result.output
    assert not (out / "sub-01").exists()


def test_participant_help_lists_the_options() -> None:
    result = CliRunner().invoke(main, ["--help"])
    for option in ("--weights", "--samples", "--temperature", "--seed", "--age-sweep", "--output-spaces",
                   "--output-res", "--overwrite", "--device"):
        assert option in result.output


def test_options_of_the_other_level_are_refused(tiny_bids: Callable[..., Path], tmp_path: Path) -> None:
    """An option the chosen level does not use is a usage error naming it, never dropped."""
    root = tiny_bids()
    out = tmp_path / "out"
    epochs = CliRunner().invoke(main, [str(root), str(out), "participant", "--epochs", "5"])
    assert epochs.exit_code == 2
    assert "--epochs is a group-level option; the participant level does not use it" in epochs.output
    for args, flag in ((["--grid", "paper2mm"], "--grid"), (["--ablate-mri"], "--ablate-mri"),
                       (["--patience", "3"], "--patience"), (["--min-delta", "0.01"], "--min-delta")):  # fmt: skip
        refused = CliRunner().invoke(main, [str(root), str(out), "participant", *args])
        assert refused.exit_code == 2 and f"{flag} is a group-level option" in refused.output
    for args, flag in ((["--samples", "10"], "--samples"), (["--weights", "/nonexistent"], "--weights"),
                       (["--overwrite"], "--overwrite"), (["--age-sweep", "60", "70"], "--age-sweep")):  # fmt: skip
        refused = CliRunner().invoke(main, [str(root), str(out), "group", "--preprocess-only", *args])
        assert refused.exit_code == 2 and f"{flag} is a participant-level option" in refused.output
    assert not out.exists()  # refused before any work


def test_options_both_levels_use_are_accepted_by_both() -> None:
    from dualglow_app.cli.bids_app import level_parameters

    shared = level_parameters("participant") & level_parameters("group")
    assert {"device", "seed", "nprocs", "work_dir", "participant_labels"} <= shared
    assert "epochs" not in level_parameters("participant") and "samples" not in level_parameters("group")


@pytest.mark.parametrize(("args", "message"), [
    (["--side-info", "apoe4"], "participants.tsv: no column 'apoe4' (nor in any sub-*_sessions.tsv); the columns are "
                               "age, sex, diagnosis: add apoe4 there, or drop it from --side-info."),
    (["--side-info", "participant_id"], "participant_id identifies rows, it is not a covariate"),
    (["--side-info", "age", "age"], "a covariate named twice"),
])  # fmt: skip
def test_group_side_info_errors_are_one_line(tiny_bids: Callable[..., Path], tmp_path: Path, args: list[str],
                                             message: str) -> None:  # fmt: skip
    root = tiny_bids(subjects=["01", "02"], with_pet=["01", "02"])
    result = CliRunner().invoke(main, [str(root), str(tmp_path / "out"), "group", "--skip-bids-validation",
                                       "-w", str(tmp_path / "work"), *args])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_sweep_and_covariate_take_several_values() -> None:
    args = ["--sweep", "age=50:90:20", "diagnosis=CN,AD", "--covariate", "sex=F", "--impute-covariates"]
    assert expand_multi_value_options(args) == ["--sweep", "age=50:90:20", "--sweep", "diagnosis=CN,AD",
                                                 "--covariate", "sex=F", "--impute-covariates"]  # fmt: skip
