"""The whole loop on the tiny models, in one process: sample -> score -> pair -> fuse -> score -> train, twice."""

import json
import os

import pytest
import torch

from d_fusion.checkpoints import load_lora
from d_fusion.datadir import ExperimentDir, checkpoints_in
from d_fusion.experiment import run_experiment
from d_fusion.models import load_models
from d_fusion.sampling import SamplerSettings, encode_prompts, sample_generators, sample_trajectories
from d_fusion.stages import TrainingStage, epoch_advantages, load_scored_samples
from d_fusion.trainer import add_lora

NUM_SAMPLES, NUM_TARGETS, NUM_STEPS = 4, 2, 3


@pytest.fixture
def config(tiny_config):
    tiny_config.prompt_file = tiny_config.item_idx_file = tiny_config.mask_thr_file = ""
    tiny_config.prompt = "a cat eating a sandwich"
    tiny_config.item_idx = [1, 4]
    tiny_config.mask_thr = 0.0  # masks cover the whole image: the targets differ clearly from their bases
    tiny_config.sample.num_steps = NUM_STEPS
    tiny_config.inject_t = "0-2,0-2,0-2,0-2,0-2,"
    tiny_config.sample.batch_size = NUM_SAMPLES
    tiny_config.train.num_epochs = 2
    tiny_config.train.save_interval = 1
    tiny_config.train.learning_rate = 1e-3
    return tiny_config


def regenerate_epoch_1(config, unet_setup):
    """Epoch 1's samples (N, T+1, C, H, W), regenerated from their seeds with a UNet prepared by unet_setup(models)."""
    models = load_models(config.pretrained.model, mixed_precision="no")
    unet_setup(models)
    embeds = encode_prompts(models, [config.prompt]).expand(NUM_SAMPLES)
    negative = encode_prompts(models, [""]).expand(NUM_SAMPLES)
    generators = sample_generators(config.seed, 1, NUM_SAMPLES, range(NUM_SAMPLES))
    return sample_trajectories(
        models, embeds, negative, generators, SamplerSettings(NUM_STEPS, 1.0, config.sample.guidance_scale), progress=False
    ).latents


def test_two_epochs_write_everything_and_epoch_1_samples_from_the_trained_unet(config):
    run_experiment(config)
    experiment = ExperimentDir(config.save_path, config.exp_name)

    for epoch in range(2):
        epoch_dir = experiment.epoch(epoch)
        for index in range(NUM_SAMPLES):
            assert os.path.isfile(epoch_dir.sampled.image_path(index))
            assert os.path.isfile(epoch_dir.sampled.trajectory_path(index))
        for target in range(NUM_TARGETS):
            for path in (
                epoch_dir.injected.image_path(target),
                epoch_dir.injected.trajectory_path(target),
                epoch_dir.reference_image_path(target),
                epoch_dir.base_image_path(target),
            ):
                assert os.path.isfile(path), path
        assert len(epoch_dir.sampled.published_prompts()) == NUM_SAMPLES
        assert len(epoch_dir.injected.published_prompts()) == NUM_TARGETS
        assert len(epoch_dir.read_injected_map()) == NUM_TARGETS
        assert len(epoch_dir.sampled.read_scores()) == NUM_SAMPLES
        assert len(epoch_dir.injected.read_scores()) == NUM_TARGETS
        assert os.listdir(epoch_dir.path("mask"))
        assert os.path.isfile(epoch_dir.prompt_history_file)
    assert experiment.is_finished() and os.path.isfile(experiment.log_file)
    assert [c.epoch for c in checkpoints_in(experiment.checkpoints)] == [0, 1]
    with open(experiment.metrics_file) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["epoch"] for m in metrics] == [0, 1]
    for m in metrics:
        assert {"loss", "accuracy", "abs_log_ratio", "clipped", "lr", "sample_score", "target_score"} <= set(m)
    assert metrics[1]["abs_log_ratio"] > 0  # epoch 1 starts from the trained LoRA, not from the reference

    stored = torch.stack([experiment.epoch(1).sampled.load_trajectories([i]).latents[0] for i in range(NUM_SAMPLES)])
    checkpoint_0 = experiment.checkpoint(0).lora_weights

    def trained(models):
        add_lora(models.unet, config.train.lora_rank, config.seed)
        load_lora(models.unet, checkpoint_0)

    torch.testing.assert_close(regenerate_epoch_1(config, trained), stored, atol=1e-6, rtol=0)
    pretrained = regenerate_epoch_1(config, lambda models: None)
    assert not torch.allclose(pretrained, stored, atol=1e-4)

    # DDPO trains on the same epoch files: samples and targets, targets' old log-probs recomputed without fusion
    config.train.algorithm = "ddpo"
    config.resume_from = experiment.checkpoint(0).root  # the policy that sampled epoch 1
    config.train.gradient_accumulation_steps = NUM_SAMPLES + NUM_TARGETS  # one optimizer step, after every loss
    stage = TrainingStage(config, load_models(config.pretrained.model, mixed_precision="no"), experiment)
    advantages = epoch_advantages(config, experiment, 1)
    scored = load_scored_samples(stage.trainer, experiment.epoch(1), advantages, config.sample.batch_size)
    assert len(scored) == NUM_SAMPLES + NUM_TARGETS and scored.advantages.mean().abs() < 1e-5
    fused = experiment.epoch(1).injected.load_trajectories(range(NUM_TARGETS)).log_probs
    assert (scored.trajectories.log_probs[NUM_SAMPLES:] - fused).abs().max() > 1e-3
    assert stage.train_epoch(1)["loss"] == pytest.approx(-scored.advantages.mean().item(), abs=1e-5)  # every ratio is 1
