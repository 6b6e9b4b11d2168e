"""The epoch loop's sampling stage: complete outputs, and a crash that loses nothing."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import d_fusion.experiment as experiment
from d_fusion.datadir import ExperimentDir, read_json
from d_fusion.errors import UserError
from d_fusion.models import load_models_from_config
from d_fusion import sampling, stages
from d_fusion.prompts import load_prompts
from d_fusion.stages import Run


def run_sampling(config, models):
    prompts = load_prompts(config)
    run = Run.build(config, models, ExperimentDir(config.save_path, config.exp_name), prompts, objects={})
    stages.sample_epoch(run, 0)
    return run.experiment.epoch(0), run.layout.sample_prompts


@pytest.fixture
def small_config(tiny_config):
    tiny_config.prompt_file = ""
    tiny_config.prompt = "a cat eating a sandwich"
    tiny_config.sample.batch_size = 2
    tiny_config.sample.num_batches_per_epoch = 2
    tiny_config.sample.num_steps = 3
    return tiny_config


def test_sampling_writes_images_prompts_and_trajectories(small_config, tiny_sd):
    epoch_dir, samples = run_sampling(small_config, tiny_sd)
    assert epoch_dir.sampled.published_prompts() == samples
    for index in range(len(samples)):
        assert Image.open(epoch_dir.sampled.image_path(index)).size == (128, 128)
        trajectory = epoch_dir.sampled.load_trajectories([index])[0]
        assert trajectory.latents.shape == (4, 4, 16, 16) and trajectory.log_probs.shape == (3,)
    assert not [f for f in os.listdir(epoch_dir.sampled.folder) if f.startswith(".tmp")]


def test_crash_mid_epoch_then_restart_equals_uninterrupted(small_config, tiny_sd, tmp_path, monkeypatch, crash_on_call):
    small_config.save_path = str(tmp_path / "whole")
    whole, samples = run_sampling(small_config, tiny_sd)

    small_config.save_path = str(tmp_path / "crashed")
    crash_on_call(sampling, "decode_images", 2)  # killed in the second batch
    with pytest.raises(KeyboardInterrupt):
        run_sampling(small_config, tiny_sd)
    monkeypatch.undo()
    crashed = ExperimentDir(small_config.save_path, small_config.exp_name).epoch(0)
    assert crashed.sampled.published_prompts() == samples[:2]
    first_image_time = os.path.getmtime(crashed.sampled.image_path(0))

    run_sampling(small_config, tiny_sd)
    assert os.path.getmtime(crashed.sampled.image_path(0)) == first_image_time, "published batch was redrawn"
    assert crashed.sampled.published_prompts() == samples
    for index in range(len(samples)):
        assert np.array_equal(np.asarray(Image.open(crashed.sampled.image_path(index))), np.asarray(Image.open(whole.sampled.image_path(index))))
        assert (crashed.sampled.load_trajectories([index]).latents[0] == whole.sampled.load_trajectories([index]).latents[0]).all()


def test_tiny_config_builds_its_model_on_first_use(tiny_config, tmp_path):
    tiny_config.tiny_cache = str(tmp_path / "cache")
    tiny_config.pretrained.model = tiny_config.tiny_cache + "/sd"
    models = load_models_from_config(tiny_config)
    assert os.path.isdir(tiny_config.pretrained.model) and models.resolution == 128


class ModelsWouldLoad(Exception):
    """Raised in place of loading the models: the run got past its start-up checks."""


@pytest.fixture
def no_models(monkeypatch):
    def refuse(config):
        raise ModelsWouldLoad

    monkeypatch.setattr(experiment, "load_models_from_config", refuse)


def test_a_second_sampler_stops_at_once_naming_the_first(tiny_config, no_models):
    with ExperimentDir(tiny_config.save_path, tiny_config.exp_name).hold("sampler"):
        with pytest.raises(UserError, match=f"process {os.getpid()} already runs as the sampler \\(run_sample.py\\)"):
            experiment.run_experiment(tiny_config)
    with pytest.raises(ModelsWouldLoad):  # the lock went with the first sampler
        experiment.run_experiment(tiny_config)


def test_an_empty_exp_name_gets_a_timestamped_name_printed_at_start_up(tiny_config, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(experiment, "run_epochs", lambda config, exp: started.append(exp.root))
    tiny_config.exp_name = ""
    experiment.run_experiment(tiny_config)
    name = tiny_config.exp_name
    assert re.fullmatch(r"\d{4}\.\d\d\.\d\d_\d\d\.\d\d\.\d\d", name)
    assert started == [os.path.join(tiny_config.save_path, name)]
    assert f"--config.exp_name {name}" in capsys.readouterr().out


def test_start_up_records_the_settings_and_a_rerun_that_changes_one_stops(tiny_config, no_models):
    with pytest.raises(ModelsWouldLoad):
        experiment.run_experiment(tiny_config)
    recorded = ExperimentDir(tiny_config.save_path, tiny_config.exp_name).config_file
    assert read_json(recorded)["config"]["train"]["learning_rate"] == tiny_config.train.learning_rate

    tiny_config.seed, tiny_config.train.learning_rate = 7, 1e-3
    with pytest.raises(UserError, match=r"seed: 42 -> 7; train.learning_rate: 0.0001 -> 0.001\. Rerun"):
        experiment.run_experiment(tiny_config)
    tiny_config.seed, tiny_config.train.learning_rate = 42, 1e-4
    tiny_config.train.num_epochs, tiny_config.eval.poll_interval, tiny_config.report.each_epoch = 9, 0.5, True
    with pytest.raises(ModelsWouldLoad):  # settings that may change do not stop it
        experiment.run_experiment(tiny_config)


def test_start_up_clears_the_scratch_of_a_killed_run(tiny_config, no_models):
    epoch_dir = ExperimentDir(tiny_config.save_path, tiny_config.exp_name).epoch(0)
    left = epoch_dir.path("images", ".tmp-x.png")
    os.makedirs(os.path.dirname(left))
    open(left, "w").close()
    with pytest.raises(ModelsWouldLoad):
        experiment.run_experiment(tiny_config)
    assert not os.path.exists(left)


def test_start_up_warns_about_a_prompt_the_text_encoder_cuts(tiny_config, monkeypatch, capsys):
    class SamplingWouldStart(Exception):
        pass

    def refuse(*args):
        raise SamplingWouldStart

    monkeypatch.setattr(experiment, "ScoreCollector", refuse)
    tiny_config.prompt_file = tiny_config.item_idx_file = ""
    tiny_config.prompt = "a cat playing chess" + " and a big dog" * 20
    with pytest.raises(SamplingWouldStart):
        experiment.run_experiment(tiny_config)
    assert f"the prompt {tiny_config.prompt!r} has 84 tokens" in capsys.readouterr().out


def test_an_inline_scorer_that_cannot_load_fails_before_any_sampling(tiny_config, tmp_path, monkeypatch):
    sampled = []
    monkeypatch.setattr(experiment, "sample_epoch", lambda *args: sampled.append(args))
    tiny_config.eval.model = str(tmp_path / "no-such-clip")
    with pytest.raises(UserError, match="could not load the CLIP scorer"):
        experiment.run_experiment(tiny_config)
    assert sampled == [] and not os.path.exists(tmp_path / "no-such-clip")


def test_a_published_sample_with_a_missing_or_damaged_file_is_regenerated(small_config, tiny_sd, caplog):
    epoch_dir, samples = run_sampling(small_config, tiny_sd)
    images = [np.asarray(Image.open(epoch_dir.sampled.image_path(i))) for i in range(len(samples))]
    latents = [epoch_dir.sampled.load_trajectories([i]).latents[0].clone() for i in range(len(samples))]  # not the mapped file
    second_batch = {i: os.path.getmtime(epoch_dir.sampled.image_path(i)) for i in (2, 3)}
    os.remove(epoch_dir.sampled.image_path(1))
    with open(epoch_dir.sampled.trajectory_path(0), "r+b") as f:
        f.truncate(100)

    with caplog.at_level("WARNING", logger="d_fusion.stages"):
        run_sampling(small_config, tiny_sd)
    warnings = [r.getMessage() for r in caplog.records if r.name == "d_fusion.stages" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("epoch 0: regenerating samples 0-1 from their seeds: ")
    for i in range(len(samples)):  # every sample regenerates exactly from its seed
        assert np.array_equal(np.asarray(Image.open(epoch_dir.sampled.image_path(i))), images[i])
        assert torch.equal(epoch_dir.sampled.load_trajectories([i]).latents[0], latents[i])
    assert {i: os.path.getmtime(epoch_dir.sampled.image_path(i)) for i in (2, 3)} == second_batch
    assert epoch_dir.sampled.published_prompts() == samples
