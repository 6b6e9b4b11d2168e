"""What the entry scripts share: the `--config` flag and clean exits on bad input."""

import sys

import torch
from absl import app
from ml_collections import config_flags

from d_fusion.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", "config/config.py", "Configuration file (config.py[:variant]).")


def main(run):
    """Run `run(config)` as an absl program: bad input prints one line, Ctrl-C exits quietly."""

    def entry(argv):
        try:
            if len(argv) > 1:
                raise UserError(
                    f"unexpected argument(s) {' '.join(argv[1:])}: a boolean option takes its value after "
                    "'=', e.g. --config.eval.inline=False (a bare --config.eval.inline means True)"
                )
            config = _CONFIG.value
            if config.threads:
                torch.set_num_threads(config.threads)
            run(config)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    app.run(entry)
