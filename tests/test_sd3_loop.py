"""The whole loop on the tiny SD 3.5 (the `tiny_sd3` variant): sample -> score -> fuse -> train (DPO, then DDPO
and DPOK on the same epoch) -> checkpoint -> held-out -> report, through the family, as on SD 2.1."""

import json
import os

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from d_fusion.checkpoints import load_lora, lora_prefix
from d_fusion.datadir import ExperimentDir, checkpoints_in
from d_fusion.errors import UserError
from d_fusion.experiment import run_experiment
from d_fusion.heldout import run_heldout
from d_fusion.models import load_models
from d_fusion.sd3 import StableDiffusion3
from d_fusion.stages import epoch_advantages, load_scored_samples, make_trainer
from d_fusion.trainer import add_model_lora
from tests.test_joint_attention import inputs

NUM_SAMPLES, NUM_TARGETS, NUM_STEPS = 4, 2, 2


@pytest.fixture
def config(tiny_sd3_config, tmp_path):
    config = tiny_sd3_config
    config.prompt_file = config.item_idx_file = config.mask_thr_file = ""
    config.prompt, config.item_idx = "a cat eating a sandwich", [1, 4]
    config.mask_thr = 0.0  # full masks: the targets differ clearly from their bases
    config.sample.num_steps, config.inject_t = NUM_STEPS, "0-2,0-2,0-2,0-2,0-2,"
    config.sample.batch_size = NUM_SAMPLES
    config.train.num_epochs, config.train.learning_rate = 1, 1e-3
    config.report.each_epoch, config.report.thumbnail = True, 64
    prompt_file = tmp_path / "sd3_test.json"
    prompt_file.write_text(json.dumps(["a dog driving a car"]))
    config.heldout.prompt_file, config.heldout.images_per_prompt = str(prompt_file), 2
    return config


def test_the_loop_runs_on_sd3_and_its_checkpoint_loads_in_the_pipeline(config):
    run_experiment(config)
    experiment = ExperimentDir(config.save_path, config.exp_name)
    epoch_dir = experiment.epoch(0)
    assert len(epoch_dir.sampled.read_scores()) == NUM_SAMPLES and len(epoch_dir.injected.read_scores()) == NUM_TARGETS
    targets = epoch_dir.injected.load_trajectories(range(NUM_TARGETS))
    bases = epoch_dir.sampled.load_trajectories([base for base, _ in epoch_dir.read_injected_map()])
    assert targets.latents.shape == (NUM_TARGETS, NUM_STEPS + 1, 16, 16, 16)
    assert torch.equal(targets.latents[:, 0], bases.latents[:, 0])  # each target starts from its base's x_1
    assert (targets.latents[:, -1] - bases.latents[:, -1]).abs().max() > 1e-3  # and is fused
    assert os.listdir(epoch_dir.path("mask")) and experiment.is_finished()
    with open(experiment.metrics_file) as f:
        (metrics,) = [json.loads(line) for line in f]
    assert metrics["loss"] == pytest.approx(0.6931, abs=0.05) and metrics["abs_log_ratio"] >= 0
    assert os.path.isfile(experiment.report.index_html)

    # the checkpoint: StableDiffusion3Pipeline.load_lora_weights reads it, and resuming reads it the same
    (checkpoint,) = checkpoints_in(experiment.checkpoints)
    trained = load_models(config.pretrained.model, mixed_precision="no")
    assert isinstance(trained, StableDiffusion3)
    add_model_lora(trained, config.train.lora_rank, config.seed)
    load_lora(trained.transformer, checkpoint.lora_weights, lora_prefix(trained.family))
    pipeline = StableDiffusion3Pipeline.from_pretrained(config.pretrained.model, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        base = pipeline.transformer(**inputs()).sample
        pipeline.load_lora_weights(checkpoint.root)
        theirs, ours = pipeline.transformer(**inputs()).sample, trained.transformer(**inputs()).sample
    assert (theirs - base).abs().max() > 1e-6  # the epoch trained the LoRA
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)

    # held-out: the base model and the checkpoint on the same seeds, every image scored, the table written
    config.heldout.checkpoint = checkpoint.root
    rows = run_heldout(config)
    results = experiment.heldout("sd3_test")
    assert rows[-1]["prompt"] == "all prompts" and os.path.isfile(results.table_csv)
    for name in ("base", "checkpoint_0"):
        assert len(results.model(name).scored("clip").read_scores()) == 2  # the training reward

    # DDPO and DPOK on the same epoch files from the policy that sampled them (fresh LoRA), the targets' old
    # log-probs recomputed without fusion
    for algorithm in ("ddpo", "dpok"):
        config.train.algorithm = algorithm
        config.train.gradient_accumulation_steps = NUM_SAMPLES + NUM_TARGETS  # one optimizer step
        trainer = make_trainer(config, load_models(config.pretrained.model, mixed_precision="no"))
        scored = load_scored_samples(trainer, epoch_dir, epoch_advantages(config, experiment, 0), NUM_SAMPLES)
        assert (scored.trajectories.log_probs[NUM_SAMPLES:] - targets.log_probs).abs().max() > 1e-4
        metrics = trainer.train_samples(scored, 0)
        # every ratio is 1 and DPOK's KL 0 at the start: the loss is -mean(advantage)
        assert metrics["loss"] == pytest.approx(-scored.advantages.mean().item(), abs=1e-5)



@pytest.mark.parametrize("field, value, message", [
    ("fusion.blocks", "2-9", r"config.fusion.blocks = '2-9': this transformer has blocks 0-3"),
    ("fusion.mask_blocks", "4-4", r"config.fusion.mask_blocks = '4-4': this transformer has blocks 0-3"),
    ("sample.noise_level", 0.0, r"config.sample.noise_level must be > 0 to train on sd3"),
])
def test_sd3_settings_that_cannot_work_stop_the_run_before_sampling(config, field, value, message):
    block, name = field.split(".")
    config[block][name] = value
    with pytest.raises(UserError, match=message):
        run_experiment(config)
    assert ExperimentDir(config.save_path, config.exp_name).epochs() == []


def test_a_unet_stops_on_sd3_block_settings(tiny_config):
    tiny_config.fusion.blocks = "1-2"
    with pytest.raises(UserError, match="fusion.blocks and fusion.mask_blocks apply to SD 3 only"):
        run_experiment(tiny_config)
