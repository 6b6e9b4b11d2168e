"""The command line: overrides checked at start-up, list settings, one-line errors, fatal errors kept in the log."""

import logging
import os
import subprocess
import sys

import pytest

from d_fusion import cli
from d_fusion.cli import load_config, main
from d_fusion.errors import UserError
from d_fusion.logs import setup_logging
from d_fusion.masks import load_objects

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_unknown_field_names_the_closest_settings():
    with pytest.raises(UserError, match=r"--config.num_step is not a setting \(closest: --config.sample.num_steps"):
        load_config(["run_sample.py", "--config.num_step", "3"])
    closest = r"--config.train.learning_rat is not a setting \(closest: --config.train.learning_rate"
    with pytest.raises(UserError, match=closest):
        load_config(["run_sample.py", "--config", "config/config.py:tiny", "--config.train.learning_rat=0.1"])


def test_a_missing_config_file_or_variant_is_one_error():
    with pytest.raises(UserError, match="--config nosuch.py: no such file 'nosuch.py'"):
        load_config(["run_sample.py", "--config", "nosuch.py"])
    with pytest.raises(UserError, match="--config config/config.py:nope: unknown config variant 'nope'; known: tiny"):
        load_config(["run_sample.py", "--config=config/config.py:nope"])


def test_an_unknown_field_is_one_line_on_the_command_line():
    result = subprocess.run(
        [sys.executable, "run_sample.py", "--config.foo", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --config.foo is not a setting (see config/config.py)"]


def test_list_settings_on_the_command_line():
    config = load_config(
        ["run_sample.py", "--config.prompt", "a cat eating a sandwich", "--config.item_idx", "1,4",
         "--config.mask_thr=0.03,0.005"]  # fmt: skip
    )
    assert list(config.item_idx) == [1, 4] and list(config.mask_thr) == [0.03, 0.005]
    objects = load_objects(config, [config.prompt])[config.prompt]
    assert objects.items == (1, 4) and objects.thresholds == (0.03, 0.005)
    assert load_config(["run_sample.py", "--config.mask_thr", "0.02"]).mask_thr == 0.02  # one number stays a number
    with pytest.raises(UserError, match="--config.item_idx '1,x' is not a comma-separated list of ints"):
        load_config(["run_sample.py", "--config.item_idx", "1,x"])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("sample.num_steps", "0", "config.sample.num_steps = 0: it must be an integer >= 1"),
        ("sample.num_steps", "-3", "config.sample.num_steps = -3"),
        ("sample.eta", "-0.5", "config.sample.eta = -0.5: it must be a number >= 0"),
        ("sample.guidance_scale", "-1", "config.sample.guidance_scale = -1.0"),
        ("mixed_precision", "fp8", "config.mixed_precision = 'fp8': it must be one of 'fp16', 'bf16', 'no'"),
        ("mask_thr", "2", "config.mask_thr = 2.0: it must be a number in \\[0, 1\\]"),
        ("mask_thr", "0.1,2", "config.mask_thr = \\[0.1, 2.0\\]"),
        ("sample.noise_level", "-0.1", "config.sample.noise_level = -0.1: it must be a number >= 0"),
        ("fusion.blocks", "3", "config.fusion.blocks = '3': it must be a block range \"lo-hi\""),
        ("fusion.mask_blocks", "5-2", "config.fusion.mask_blocks = '5-2'"),
    ],
)
def test_a_setting_outside_its_domain_is_a_start_up_error_naming_it(option, value, message):
    with pytest.raises(UserError, match=message):
        load_config(["run_sample.py", "--config", "config/config.py:tiny", f"--config.{option}", value])


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


def test_every_config_variant_passes_the_settings_checks():
    for variant in ("", ":tiny", ":shapes"):
        assert load_config(["run_sample.py", "--config", "config/config.py" + variant]).sample.num_steps >= 1
    assert cli.LIST_SETTINGS.keys() <= set(cli.field_names(load_config(["run_sample.py"])))
