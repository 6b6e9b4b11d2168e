"""The log: lines on stdout and in the log file; the fatal error in the log file."""

import logging

from d_fusion.logs import record_fatal, setup_logging


def test_log_lines_go_to_stdout_and_the_file_and_the_fatal_error_only_to_the_file(tmp_path, capsys):
    log_file = tmp_path / "exp" / "run.log"
    setup_logging(str(log_file))
    logging.getLogger("d_fusion.test").info("epoch 0: sampled")
    record_fatal("error: the disk is full")
    out, err = capsys.readouterr()
    assert "epoch 0: sampled" in out and "the disk is full" not in out and err == ""
    text = log_file.read_text()
    assert "INFO d_fusion.test: epoch 0: sampled" in text and "ERROR d_fusion: error: the disk is full" in text
    setup_logging()  # the terminal only: a later fatal error has no file to go to
    record_fatal("error: elsewhere")
    assert "elsewhere" not in log_file.read_text() and capsys.readouterr().out == ""
