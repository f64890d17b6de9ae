from pathlib import Path

from click.testing import CliRunner

from dualglow_app import __version__
from dualglow_app.cli import main


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_output_dir_equal_to_bids_dir_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [str(tmp_path), str(tmp_path), "participant"])
    assert result.exit_code == 2
    assert "OUTPUT_DIR" in result.output
