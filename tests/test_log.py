"""Logging: rich on a terminal, one plain line per message when stderr is redirected."""

from __future__ import annotations

import subprocess
import sys


def test_redirected_logs_keep_each_message_on_one_line() -> None:
    path = "/data/" + "/".join(f"segment{i:02d}" for i in range(20)) + "/sub-01_T1w.nii.gz"
    code = f"from dualglow_app.log import setup_logging, get_logger; setup_logging(0); get_logger().info('reading %s', {path!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "INFO" in lines[0]
