"""The config: the release's defaults (docs/METHOD.md §2), overridable from the command line; the presets."""

import subprocess
import sys

import torch
from transformers import CLIPTokenizer

from config.config import get_config
from d_fusion import stages
from d_fusion.cli import load_config
from d_fusion.masks import item_selection, load_objects
from d_fusion.pairing import check_samples_per_prompt, pair_samples
from d_fusion.prompts import load_prompts
from d_fusion.attention import attention_layers
from d_fusion.checkpoints import checkpoint_due
from d_fusion.objectives import per_prompt_advantages
from d_fusion.sampling import SamplerSettings
from d_fusion.stages import epoch_layout


def test_release_defaults_make_the_release_epoch(tiny_sd):
    """The defaults, through the code that uses them, behave as the release's get_config() does."""
    c = get_config()
    layout = epoch_layout(c, [c.prompt])
    assert (c.seed, layout.num_samples, layout.batch_size) == (42, 4, 4)  # one batch of 4 per prompt
    # per prompt: the best sample guides two targets made from the two lowest-scored ones
    pairs = pair_samples(layout.sample_prompts, [0.4, 0.1, 0.3, 0.2], layout.samples_per_prompt)
    assert [(p.reference, p.base) for p in pairs] == [(0, 3), (0, 1)]
    # the objects of "a cat playing chess" are "cat" and "chess", masked at a 0.05 cross-attention probability
    objects = load_objects(c, [c.prompt])
    weights, _ = item_selection(tiny_sd.tokenizer, [c.prompt], objects, 77)
    assert weights[0].nonzero()[:, 1].tolist() == [2, 4] and objects[c.prompt].thresholds == (0.05, 0.05)
    # 20 DDIM steps with eta 1 and guidance 5; K and V fused in the mid block and every up block (3-6 of
    # SD 2.1's numbering), at every step but the two noisiest
    assert stages.sampler_settings(c) == SamplerSettings(20, 1.0, 5.0, True)
    injection = stages.fusion_settings(c, tiny_sd).injection
    blocks = sorted({layer.block for layer in attention_layers(tiny_sd.unet)})
    fused = {i: [b for b in blocks if injection.blends_k(i, 20, b) and injection.blends_v(i, 20, b)] for i in range(20)}
    assert fused == {i: ([3, 4, 5, 6] if i >= 2 else []) for i in range(20)}
    # training: DPO, one pair's 20 timesteps per optimizer step, 2 passes over the epoch's pairs, and the
    # release's AdamW and grad-norm clip
    t = c.train
    assert (t.algorithm, t.batch_size * t.gradient_accumulation_steps, int(20 * t.timestep_fraction)) == ("dpo", 1, 20)
    assert (t.num_inner_epochs, t.alpha, t.beta, t.eps, t.max_grad_norm) == (2, 1.0, 0.0, 0.1, 1.0)
    optimizer = stages.make_optimizer(c, [torch.nn.Parameter(torch.zeros(1))])
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (1e-4, (0.9, 0.999), 1e-4, 1e-8)
    # 20 epochs, a checkpoint every 2, DDPO's advantages clipped at 5
    assert [e for e in range(t.num_epochs) if checkpoint_due(c, e)] == list(range(1, 20, 2))
    assert per_prompt_advantages([0.0, 0.0, 0.0, 1.0], ["p"] * 4, t.adv_clip_max).max() < 5


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
