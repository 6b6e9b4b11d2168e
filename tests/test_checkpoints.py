"""Checkpoints: a stock diffusers pipeline reads our LoRA; a resumed run equals an uninterrupted one."""

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline

from d_fusion.checkpoints import checkpoint_due, checkpoints_at, resume, save_checkpoint, save_epoch_checkpoint
from d_fusion.datadir import ExperimentDir, checkpoints_in
from d_fusion.errors import UserError
from d_fusion.models import load_models
from d_fusion.sampling import SamplerSettings, encode_prompts, sample_generators, sample_trajectories
from d_fusion.stages import make_trainer
from d_fusion.trainer import PreferencePairs, reference_policy

NUM_STEPS = 3


@pytest.fixture
def config(tiny_config):
    tiny_config.sample.num_steps = NUM_STEPS
    tiny_config.train.learning_rate = 1e-3
    tiny_config.train.timestep_fraction = 0.7  # random subsets of 2 steps: the resumed run must draw the same
    tiny_config.train.num_inner_epochs = 2
    return tiny_config


def epoch_pairs(models, epoch):
    """Two (target, base) pairs of one prompt, sampled from the current UNet."""
    embeds = encode_prompts(models, ["a cat playing chess"]).expand(4, -1, -1)
    negative = encode_prompts(models, [""]).expand(4, -1, -1)
    generators = sample_generators(7, epoch, 4, range(4))
    trajectories = sample_trajectories(models, embeds, negative, generators, SamplerSettings(NUM_STEPS, 1.0, 5.0, True), progress=False)
    return PreferencePairs(trajectories[0:2], trajectories[2:4], embeds[:2])


def lora_weights(trainer):
    return [p.detach().clone() for p in trainer.params]


def new_trainer(config):
    return make_trainer(config, load_models(config.pretrained.model, mixed_precision="no"))


def test_resumed_run_reaches_the_uninterrupted_weights(config):
    experiment = ExperimentDir(config.save_path, config.exp_name)
    trainer = new_trainer(config)
    for epoch in range(2):
        trainer.train_pairs(epoch_pairs(trainer.models, epoch), epoch)
        save_checkpoint(trainer, experiment, epoch)
    uninterrupted = lora_weights(trainer)

    config.resume_from = experiment.checkpoints  # a folder of checkpoints: the newest is epoch 1
    assert checkpoints_at(config.resume_from, "resume_from")[-1].epoch == 1
    config.resume_from = experiment.checkpoint(0).root
    resumed = new_trainer(config)
    assert resume(resumed, config, experiment) == 1
    resumed.train_pairs(epoch_pairs(resumed.models, 1), 1)
    for a, b in zip(lora_weights(resumed), uninterrupted):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    config.resume_from = ""  # rerunning the same experiment continues after its newest checkpoint
    rerun = new_trainer(config)
    assert resume(rerun, config, experiment) == 2
    for a, b in zip(lora_weights(rerun), uninterrupted):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert resume(new_trainer(config), config, ExperimentDir(config.save_path, "other")) == config.train.begin_epoch


def test_stock_pipeline_loads_the_checkpoint(config):
    trainer = new_trainer(config)
    trainer.train_pairs(epoch_pairs(trainer.models, 0), 0)
    checkpoint = save_checkpoint(trainer, ExperimentDir(config.save_path, config.exp_name), 0)

    pipeline = StableDiffusionPipeline.from_pretrained(config.pretrained.model, safety_checker=None)
    pipeline.load_lora_weights(checkpoint.root)
    latents = torch.randn(1, *trainer.models.latent_shape, generator=torch.Generator().manual_seed(0))
    embeds = encode_prompts(trainer.models, ["a cat"])
    with torch.no_grad():
        ours = trainer.models.unet(latents, 500, encoder_hidden_states=embeds).sample
        stock = pipeline.unet(latents, 500, encoder_hidden_states=embeds).sample
        with reference_policy(trainer.models.unet):
            plain = trainer.models.unet(latents, 500, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(stock, ours, atol=1e-6, rtol=0)
    assert not torch.allclose(plain, ours, atol=1e-6)  # the LoRA was trained


def test_save_interval_limit_and_bad_resume(config):
    config.train.num_epochs, config.train.save_interval, config.train.num_checkpoint_limit = 5, 2, 2
    assert [e for e in range(5) if checkpoint_due(config, e)] == [1, 3, 4]
    experiment = ExperimentDir(config.save_path, config.exp_name)
    trainer = new_trainer(config)
    kept = []
    for epoch in range(5):
        save_epoch_checkpoint(trainer, config, experiment, epoch)
        kept.append([c.epoch for c in checkpoints_in(experiment.checkpoints)])
    # every epoch's checkpoint lives until the next one; due ones (1, 3, 4) stay, at most 2 of them
    assert kept == [[0], [1], [1, 2], [1, 3], [3, 4]]
    assert not any(name.startswith(".tmp") for name in os.listdir(experiment.checkpoints))

    config.resume_from = config.save_path
    with pytest.raises(UserError, match="resume_from"):
        resume(trainer, config, experiment)
    config.resume_from = experiment.checkpoint(4).root
    config.train.lora_rank = 8
    with pytest.raises(UserError, match="rank"):
        resume(trainer, config, experiment)

    # resumed from an older checkpoint, the run's next save drops the abandoned later ones
    save_epoch_checkpoint(trainer, config, experiment, 3)
    assert [c.epoch for c in checkpoints_in(experiment.checkpoints)] == [3]



def test_a_checkpoint_with_a_missing_file_is_ignored_and_the_log_says_so(config, caplog):
    experiment = ExperimentDir(config.save_path, config.exp_name)
    trainer = new_trainer(config)
    for epoch in range(2):
        save_checkpoint(trainer, experiment, epoch)
    os.remove(experiment.checkpoint(1).state_file)
    with caplog.at_level("WARNING", logger="d_fusion.checkpoints"):
        assert resume(new_trainer(config), config, experiment) == 1  # after checkpoint 0: epoch 1 is trained again
    warnings = [r.getMessage() for r in caplog.records if r.name == "d_fusion.checkpoints" and r.levelname == "WARNING"]
    assert warnings == [
        f"{experiment.checkpoint(1).root} lacks training_state.json: it is ignored, so epoch 1 is trained again "
        "if the run gets there"
    ]
