"""A readable log: to stdout (progress bars stay on stderr) and to the experiment's log file."""

import logging
import os
import sys


def quiet_open_clip(record):
    """open_clip logs every loading step at INFO on the root logger: keep only its warnings."""
    return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def setup_logging(log_file=None, level=logging.INFO):
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.addFilter(quiet_open_clip)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    for noisy in ("diffusers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def record_fatal(message):
    """Write the error that ends the run to the log files only (the terminal gets it on stderr)."""
    record = logging.LogRecord("d_fusion", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def log_cleared_scratch(cleared, whose):
    """One line for the scratch files a killed process left and start-up removed (none: nothing)."""
    if cleared:
        logging.getLogger("d_fusion").info(
            "removed %d scratch files left by an interrupted %s, e.g. %s", len(cleared), whose, cleared[0]
        )
