"""What the entry scripts share: the `--config` flag, its overrides, and clean exits.

Bad input prints one line (`error: ...`) and exits with status 2; an unexpected failure prints its
traceback. Both also end the run's log file (run.log, eval.log) when the run had opened one.
"""

import difflib
import os
import re
import sys
import traceback

import torch
from absl import flags
from ml_collections import ConfigDict
from ml_collections.config_flags import config_flags

from d_fusion.errors import UserError
from d_fusion.logs import record_fatal
from d_fusion.settings import check_settings

DEFAULT_CONFIG = "config/config.py"

# settings that take a list on the command line, comma-separated (`--config.item_idx 1,3`), and the type
# of each element; absl cannot override list fields, nor turn a number field into a list (mask_thr)
LIST_SETTINGS = {"item_idx": int, "mask_thr": float}

_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)(=.*)?$")  # --config.<field>[=value]

_started_with = {"config": DEFAULT_CONFIG}  # the --config value of this process, once main() has read it


def config_file():
    """The --config value (config.py[:variant]) this process was started with; the default file otherwise."""
    return _started_with["config"]


def config_argument(argv):
    """The value of --config in argv (config.py[:variant]); the default file when absent."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def take_list_overrides(argv):
    """argv without the LIST_SETTINGS overrides, and those as {field: text}."""
    rest, lists, args = [], {}, iter(argv)
    for arg in args:
        match = _OVERRIDE.match(arg)
        field = match and match.group(2)
        if field not in LIST_SETTINGS:
            rest.append(arg)
            continue
        text = match.group(3)[1:] if match.group(3) else next(args, None)
        if text is None:
            raise UserError(f"--config.{field} needs a value, e.g. --config.{field} 1,3")
        lists[field] = text
    return rest, lists


def parse_list(field, text):
    """'1,3' (or '[1, 3]') -> [1, 3] with LIST_SETTINGS's element type; one number stays a number for mask_thr."""
    kind = LIST_SETTINGS[field]
    parts = [p.strip() for p in text.strip().strip("[]()").split(",") if p.strip()]
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        raise UserError(
            f"--config.{field} {text!r} is not a comma-separated list of {kind.__name__}s, e.g. --config.{field} 1,3"
        ) from None
    return values[0] if kind is float and len(values) == 1 else values


def read_config_file(spec):
    """The config of a --config value (config.py[:variant]); a missing file or an unknown variant is a UserError."""
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise UserError(f"--config {spec}: no such file {path!r}")
    try:
        return config_flags.ConfigFileFlagParser(name="config").parse(spec)
    except ValueError as error:  # ml_collections wraps the config file's own error
        raise UserError(f"--config {spec}: {error.__context__ or error}") from None


def field_names(config, prefix=""):
    """Every field of the config as a dotted name (blocks and their fields)."""
    for key, value in config.items():
        yield prefix + key
        if isinstance(value, ConfigDict):
            yield from field_names(value, f"{prefix}{key}.")


def closest_names(name, names):
    """Up to three names like `name`: by the whole dotted name, or by its last part (num_steps -> sample.num_steps)."""
    last = name.rsplit(".", 1)[-1]
    by_last = [n for n in names if difflib.get_close_matches(last, [n.rsplit(".", 1)[-1]], cutoff=0.8)]
    return list(dict.fromkeys(difflib.get_close_matches(name, names, n=3, cutoff=0.6) + by_last))[:3]


def check_override_names(config, argv):
    """Every --config.<name> in argv names a field of `config`; else one line with the closest names."""
    names = list(field_names(config))
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match and match.group(2) not in names:
            close = closest_names(match.group(2), names)
            hint = f"closest: {', '.join('--config.' + n for n in close)}" if close else "see config/config.py"
            raise UserError(f"--config.{match.group(2)} is not a setting ({hint})")


def load_config(argv):
    """The config that argv asks for (--config file, then its overrides), every setting checked."""
    argv, lists = take_list_overrides(argv)
    check_override_names(read_config_file(config_argument(argv)), argv)
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
    config = holder.value
    with config.ignore_type():  # mask_thr: a number or a list of numbers
        for field, text in lists.items():
            config[field] = parse_list(field, text)
    check_settings(config)
    return config


def main(run, argv=None):
    """Run `run(config)` with the config from argv (sys.argv): bad input prints one line, Ctrl-C exits quietly."""
    argv = list(sys.argv if argv is None else argv)
    _started_with["config"] = config_argument(argv)
    try:
        config = load_config(argv)
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
