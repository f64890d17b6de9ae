from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from dualglow_app import __version__
from dualglow_app.cli import expand_multi_value_options, main


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
