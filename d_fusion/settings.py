"""Settings at start-up: each one inside its domain, and an experiment's settings kept across reruns.

`check_settings` checks the plain domain of the settings (ranges, choices) that no module checks
on its own; the checks that need a module's knowledge (train.algorithm, fusion.mask_images,
eval.reward, sizes that must fit together, the inject_* strings) stay in that module's start-up
check. Both run before any model loads.

`record_or_compare` writes data/<exp_name>/config.json at an experiment's first start (the whole
config, the package versions and the project's git commit); a rerun compares its settings with
the recorded ones and stops, listing every changed field, unless the field is one of
`config.config.RERUN_MAY_CHANGE`; `compare_scoring` holds run_eval.py to the recorded eval.* settings.
"""

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import time

from config.config import RERUN_MAY_CHANGE
from d_fusion.datadir import is_number, read_json, write_json
from d_fusion.errors import UserError
from d_fusion.injection import _range

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- domains


def integer(lo):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def at_least(lo):
    return (lambda v: is_number(v) and v >= lo), f"a number >= {lo}"


def above(lo):
    return (lambda v: is_number(v) and v > lo), f"a number > {lo}"


def interval(lo, hi, open_lo=False, open_hi=False):
    def accepts(v):
        return is_number(v) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)

    return accepts, f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"


def one_of(*choices):
    return (lambda v: v in choices), f"one of {', '.join(map(repr, choices))}"


def thresholds():
    """mask_thr: one threshold in [0, 1] (a probability), or one per object."""
    def accepts(v):
        values = v if isinstance(v, (list, tuple)) else [v]
        return bool(values) and all(is_number(x) and 0 <= x <= 1 for x in values)

    return accepts, "a number in [0, 1] or a list of such numbers (one per object)"


def block_range():
    """fusion.blocks, fusion.mask_blocks: "" (the default) or "lo-hi" with 0 <= lo <= hi (the transformer's
    number of blocks is checked when it loads)."""
    def accepts(v):
        if not isinstance(v, str):
            return False
        try:
            return v == "" or _range(v, "") is not None
        except UserError:
            return False

    return accepts, 'a block range "lo-hi" with 0 <= lo <= hi, or "" for the default'


# field -> (accepts(value), what the value must be)
DOMAINS = {
    "mixed_precision": one_of("fp16", "bf16", "no"),
    "dev_id": integer(0),
    "threads": integer(0),
    "mask_thr": thresholds(),
    "sample.num_steps": integer(1),
    "sample.eta": at_least(0),
    "sample.guidance_scale": at_least(0),
    "sample.compute_batch_size": integer(1),
    "sample.noise_level": at_least(0),
    "train.learning_rate": above(0),
    "train.adam_beta1": interval(0, 1, open_hi=True),
    "train.adam_beta2": interval(0, 1, open_hi=True),
    "train.adam_weight_decay": at_least(0),
    "train.adam_epsilon": above(0),
    "train.max_grad_norm": above(0),
    "train.timestep_fraction": interval(0, 1, open_lo=True),
    "train.alpha": above(0),
    "train.beta": at_least(0),
    "train.num_epochs": integer(1),
    "train.adv_clip_max": above(0),
    "train.num_checkpoint_limit": integer(1),
    "train.begin_epoch": integer(0),
    "train.lora_rank": integer(1),
    "train.compute_batch_size": integer(1),
    "train.reference_batch_size": integer(1),
    "train.kl_weight": at_least(0),
    "train.stat_buffer": integer(0),
    "train.stat_min_count": integer(0),
    "eval.no_scorer_timeout": at_least(0),
    "eval.debug_batch_delay": at_least(0),
    "fusion.mask_resolution": integer(0),
    "fusion.blocks": block_range(),
    "fusion.mask_blocks": block_range(),
    "report.poll_interval": above(0),
    "report.thumbnail": integer(1),
}


def setting(config, field):
    """The value of a dotted field ("sample.num_steps")."""
    for key in field.split("."):
        config = config[key]
    return config


def check_settings(config):
    """Every setting of DOMAINS inside its domain, else one UserError naming it."""
    for field, (accepts, domain) in DOMAINS.items():
        value = setting(config, field)
        if not accepts(value):
            raise UserError(f"config.{field} = {value!r}: it must be {domain}")


# ---------------------------------------------------------------- the experiment's recorded settings

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip_torch", "ml_collections", "numpy")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_versions():
    """{package: version} of Python and the packages that shape results (None: not installed)."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def git_state():
    """{"commit": HEAD of the project's git repository, "dirty": uncommitted changes to tracked files};
    both None outside a repository (or without git)."""
    def git(*args):
        result = subprocess.run(["git", "-C", PROJECT_ROOT, *args], capture_output=True, text=True, timeout=30)
        if result.returncode:
            raise OSError(result.stderr)
        return result.stdout.strip()

    try:
        return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.SubprocessError):
        return dict(commit=None, dirty=None)


def plain_config(config):
    """The config as JSON data (what config.json holds and what a rerun compares)."""
    return json.loads(json.dumps(config.to_dict()))


def flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def may_change(field):
    """Whether RERUN_MAY_CHANGE lets `field` differ between runs of an experiment ("block.*": the whole block)."""
    return any(field == name or (name.endswith(".*") and field.startswith(name[:-1])) for name in RERUN_MAY_CHANGE)


def changed_settings(recorded, current):
    """[(field, recorded value, current value)] of the fields that shape results and differ. Fields
    the record lacks (added to the project after the experiment started) are not compared."""
    recorded, current = flatten(recorded), flatten(current)
    return [
        (field, recorded[field], current[field])
        for field in sorted(recorded.keys() & current.keys())
        if not may_change(field) and recorded[field] != current[field]
    ]


def recorded_config(config_file):
    """The config of a config.json; a damaged file is a UserError naming it."""
    record = read_json(config_file, "settings record")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UserError(f"settings record {config_file} is damaged (no config); move it aside and rerun")
    return record["config"]


def refuse_changes(experiment, changes):
    """Stop, listing each changed field, when `changes` ([(field, old, new)]) is not empty."""
    if changes:
        listed = "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in changes)
        raise UserError(
            f"{experiment.root} was made with other settings ({experiment.config_file}): {listed}. Rerun with "
            "the recorded settings, or use a new exp_name (settings that may change between runs: "
            "RERUN_MAY_CHANGE in config/config.py)"
        )


def record_or_compare(config, experiment):
    """At the first start, write config.json; on a rerun, stop when a setting that shapes results changed."""
    current = plain_config(config)
    if not os.path.exists(experiment.config_file):
        record = dict(
            config=current, versions=package_versions(), git=git_state(), created=time.strftime("%Y-%m-%d %H:%M:%S")
        )
        write_json(experiment.config_file, record)
        log.info("settings recorded in %s", experiment.config_file)
        return
    refuse_changes(experiment, changed_settings(recorded_config(experiment.config_file), current))


def compare_scoring(config, experiment):
    """run_eval.py on an experiment the sampler has recorded: the eval.* settings that decide the scores
    (the reward and its models) must be the recorded ones."""
    if os.path.exists(experiment.config_file):
        changes = changed_settings(recorded_config(experiment.config_file), plain_config(config))
        refuse_changes(experiment, [change for change in changes if change[0].startswith("eval.")])
