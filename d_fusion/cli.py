"""What the entry scripts share: the `--config` flag, its overrides, and clean exits.

Bad input prints one line (`error: ...`) and exits with status 2; an unexpected failure prints its
traceback. Both also end the run's log file (run.log, eval.log) when the run had opened one.
"""

import sys
import traceback

import torch
from absl import flags
from ml_collections.config_flags import config_flags

from d_fusion.errors import UserError
from d_fusion.logs import record_fatal

DEFAULT_CONFIG = "config/config.py"


def load_config(argv):
    """The config that argv asks for (--config file, then its overrides)."""
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Configuration file (config.py[:variant]).", flag_values=flag_values, sys_argv=argv
    )
    try:
        rest = flag_values(argv)[1:]
    except flags.Error as error:
        raise UserError(str(error)) from None
    if rest:
        raise UserError(
            f"unexpected argument(s) {' '.join(rest)}: a boolean option takes its value after "
            "'=', e.g. --config.eval.inline=False (a bare --config.eval.inline means True)"
        )
    return holder.value


def main(run, argv=None):
    """Run `run(config)` with the config from argv (sys.argv): bad input prints one line, Ctrl-C exits quietly."""
    try:
        config = load_config(list(sys.argv if argv is None else argv))
        if config.threads:
            torch.set_num_threads(config.threads)
        run(config)
    except UserError as error:
        record_fatal(f"error: {error}")
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        record_fatal(f"the run failed:\n{traceback.format_exc()}")
        raise
