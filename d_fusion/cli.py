"""What the entry scripts share: the `--config` flag and clean exits on bad input."""

import sys

from absl import app, flags
from ml_collections import config_flags

from d_fusion.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", "config/config.py", "Configuration file (config.py[:variant]).")


def main(run):
    """Run `run(config)` as an absl program: bad input prints one line, Ctrl-C exits quietly."""

    def entry(argv):
        del argv
        try:
            run(_CONFIG.value)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    app.run(entry)
