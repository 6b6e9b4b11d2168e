"""An experiment's settings, kept across reruns.

`record_or_compare` writes data/<exp_name>/config.json at an experiment's first start (the whole
config, the package versions and the project's git commit); a rerun compares its settings with
the recorded ones and stops, listing every changed field, unless the field is one of
`config.config.RERUN_MAY_CHANGE`.
"""

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import time

from config.config import RERUN_MAY_CHANGE
from d_fusion.datadir import read_json, write_json
from d_fusion.errors import UserError

log = logging.getLogger(__name__)


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
    changes = changed_settings(recorded_config(experiment.config_file), current)
    if changes:
        listed = "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in changes)
        raise UserError(
            f"{experiment.root} was made with other settings ({experiment.config_file}): {listed}. Rerun with "
            "the recorded settings, or use a new exp_name (settings that may change between runs: "
            "RERUN_MAY_CHANGE in config/config.py)"
        )
