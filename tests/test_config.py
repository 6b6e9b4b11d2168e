"""The config: the release's defaults (SPEC section 2), overridable from the command line."""

import subprocess
import sys

from config.config import get_config


def test_release_defaults():
    c = get_config()
    assert (c.seed, c.mixed_precision, c.mask_thr, list(c.item_idx)) == (42, "fp16", 0.05, [1, 3])
    assert (c.inject_component, c.inject_t, c.inject_l) == ("T,T,T,T,T,F", "0-18,0-18,0-18,0-18,0-18,", "3-6,3-6,3-6,3-6,3-6,")
    s = c.sample
    assert (s.num_steps, s.eta, s.guidance_scale, s.batch_size, s.num_batches_per_epoch, s.cfg) == (20, 1.0, 5.0, 4, 1, True)
    t = c.train
    assert (t.batch_size, t.learning_rate, t.num_inner_epochs, t.timestep_fraction, t.alpha, t.beta, t.eps) == (
        1, 1e-4, 2, 1.0, 1.0, 0.0, 0.1)
    assert (t.num_epochs, t.save_interval, t.num_checkpoint_limit, t.adv_clip_max, t.gamma) == (20, 2, 100, 5.0, 2.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_weight_decay, t.adam_epsilon, t.max_grad_norm) == (0.9, 0.999, 1e-4, 1e-8, 1.0)


def test_tiny_variant_runs_offline_from_the_release_prompt_files():
    c = get_config("tiny")
    assert c.pretrained.tiny and c.mixed_precision == "no"
    assert c.prompt_file.endswith("template1_3prompt.json")


def test_bad_model_path_is_one_line_on_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "run_sample.py", "--config.exp_name", "x", "--config.save_path", str(tmp_path),
         "--config.pretrained.model", str(tmp_path / "no-such-model")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: config.pretrained.model" in result.stderr and "no such folder" in result.stderr


def test_a_stray_word_after_a_boolean_flag_is_an_error_not_ignored(tmp_path):
    result = subprocess.run(
        [sys.executable, "run_sample.py", "--config", "config/config.py:tiny", "--config.exp_name", "x",
         "--config.save_path", str(tmp_path), "--config.eval.inline", "False"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unexpected argument(s) False" in result.stderr and "--config.eval.inline=False" in result.stderr
