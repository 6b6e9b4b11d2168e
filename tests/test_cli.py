"""The command line: overrides checked at start-up, list settings, one-line errors, fatal errors kept in the log."""

import logging
import os
import subprocess
import sys

import pytest

from d_fusion.cli import main
from d_fusion.errors import UserError
from d_fusion.logs import setup_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_fatal_error_ends_the_run_log(tmp_path, capsys):
    log_file = tmp_path / "run.log"

    def failing_run(error):
        def run(config):
            setup_logging(str(log_file))
            logging.getLogger("d_fusion.test").info("started")
            raise error

        return run

    with pytest.raises(SystemExit) as exit_info:
        main(failing_run(UserError("config.x is wrong")), ["run_sample.py"])
    assert exit_info.value.code == 2 and "error: config.x is wrong" in capsys.readouterr().err
    assert log_file.read_text().splitlines()[-1].endswith("ERROR d_fusion: error: config.x is wrong")

    with pytest.raises(OSError):  # an unexpected failure keeps its traceback for the terminal and the log
        main(failing_run(OSError(28, "No space left on device")), ["run_sample.py"])
    text = log_file.read_text()
    assert "the run failed:\nTraceback (most recent call last):" in text
    assert "OSError: [Errno 28] No space left on device" in text


def test_run_log_keeps_the_error_of_the_real_script(tmp_path):
    result = subprocess.run(
        [sys.executable, "run_sample.py", "--config", "config/config.py:tiny", "--config.exp_name", "x",
         "--config.save_path", str(tmp_path), "--config.pretrained.tiny=False",
         "--config.pretrained.model", str(tmp_path / "no-such-model")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "INFO" in result.stdout and "INFO" not in result.stderr  # log lines on stdout
    with open(os.path.join(tmp_path, "x", "run.log")) as f:
        assert "ERROR d_fusion: error: config.pretrained.model" in f.read()
