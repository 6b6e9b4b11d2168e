"""The config: the release's defaults (docs/METHOD.md §2), overridable from the command line; the presets."""

import subprocess
import sys

import torch
from transformers import CLIPTokenizer

from config.config import get_config
from d_fusion.cli import load_config
from d_fusion.masks import item_selection, load_objects
from d_fusion.pairing import check_samples_per_prompt, pair_samples
from d_fusion.prompts import load_prompts
from d_fusion.stages import epoch_layout


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


# the release README's "full version" command line (Terminal 2), without its model path
RELEASE_FULL_ARGV = [
    "run_sample.py", "--config.seed", "42", "--config.exp_name", "test2", "--config.sample.num_batches_per_epoch", "8",
    "--config.sample.batch_size", "2", "--config.dev_id", "0", "--config.train.num_epochs", "1",
    "--config.prompt_file", "config/prompt/template1_train.json",
    "--config.mask_thr_file", "config/prompt/template1_mask.json",
    "--config.item_idx_file", "config/prompt/template1_item.json",
]  # fmt: skip


def test_release_full_preset_is_the_release_full_command_line():
    preset = load_config(["run_sample.py", "--config", "config/config.py:release_full", "--config.exp_name", "test2"])
    assert preset.to_dict() == load_config(RELEASE_FULL_ARGV).to_dict()


def test_release_full_preset_lays_out_the_release_epoch():
    """The preset's epoch, through the code that lays it out: 40 prompts x 16 samples, 320 pairs whose
    fused batches of fusion.batch_size hold whole references; every prompt's objects are found."""
    config = get_config("release_full")
    prompts = load_prompts(config)
    objects = load_objects(config, prompts)  # every prompt has its objects and one threshold each
    tokenizer = CLIPTokenizer.from_pretrained("assets/shapes", subfolder="tokenizer")  # SD's CLIP tokenizer
    weights, _ = item_selection(tokenizer, prompts, objects, tokenizer.model_max_length)
    assert (weights.sum(-1) == 1).all()  # each object is one token of its prompt
    per_prompt = check_samples_per_prompt(config.sample.batch_size, config.sample.num_batches_per_epoch)
    samples = epoch_layout(config, prompts).sample_prompts
    scores = torch.rand(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    pairs = pair_samples(samples, scores, per_prompt)
    assert (len(prompts), per_prompt, len(samples), len(pairs)) == (40, 16, 640, 320)
    batches = [pairs[i : i + config.fusion.batch_size] for i in range(0, len(pairs), config.fusion.batch_size)]
    assert len(batches) == 40
    for batch in batches:  # one prompt's 8 targets: its 4 references, each twice, over its 8 lowest-scored samples
        assert len({samples[p.base] for p in batch}) == 1
        references = [p.reference for p in batch]
        assert len(set(references)) == 4 and all(references.count(r) == 2 for r in references)
        assert min(scores[r] for r in references) > max(scores[p.base] for p in batch)
