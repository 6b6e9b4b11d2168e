"""The shipped shapes model (assets/shapes): it loads like SD 2.1, it draws what it is asked, its object
tokens attend to their objects, and D-Fusion on it makes targets that are better aligned than their
bases while staying close to them; the demo config runs the whole loop."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from config.config import get_config
from d_fusion.datadir import ExperimentDir
from d_fusion.experiment import run_experiment
from d_fusion.models import load_models
from d_fusion.prompts import read_prompt_file
from d_fusion.sampling import SamplerSettings, decode_images, encode_prompts, sample_generators, sample_trajectories
from d_fusion.shapes.quality import object_ious, sample_with_masks
from d_fusion.shapes.reward import shapes_score
from d_fusion.shapes.train import build_text_encoder, build_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "assets", "shapes")
TEST_PROMPTS = read_prompt_file(os.path.join(ROOT, "config", "prompt", "shapes_test.json"))[::7]  # 12: every family


@pytest.fixture(scope="module")
def shapes_sd():
    return load_models(MODEL, mixed_precision="no")


@pytest.fixture
def shapes_config():
    config = get_config("shapes")
    for name in ("item_idx_file", "mask_thr_file", "prompt_file"):
        config[name] = os.path.join(ROOT, config[name])
    config.heldout.prompt_file = os.path.join(ROOT, config.heldout.prompt_file)
    config.pretrained.model = MODEL
    return config


def sample_scores(models, prompts, seed=0):
    generators = sample_generators(seed, 0, len(prompts), range(len(prompts)))
    trajectories = sample_trajectories(
        models, encode_prompts(models, prompts), encode_prompts(models, [""]).expand(len(prompts), -1, -1),
        generators, SamplerSettings(20, 1.0, 5.0), progress=False,
    )
    images = decode_images(models, trajectories.latents[:, -1])
    return [shapes_score(Image.fromarray(image), prompt) for image, prompt in zip(images, prompts)]


def test_shipped_model_is_a_small_sd21_folder(shapes_sd):
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(MODEL) for f in files)
    assert size <= 25 * 2**20
    with open(os.path.join(MODEL, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionPipeline"
    unet = shapes_sd.unet
    assert unet.config.use_linear_projection
    assert unet.config.cross_attention_dim == shapes_sd.text_encoder.config.hidden_size
    assert tuple(unet.config.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert shapes_sd.resolution == 32 and shapes_sd.scheduler.config.beta_schedule == "scaled_linear"
    assert len(shapes_sd.tokenizer) == 49408  # CLIP's real vocabulary
    # stock diffusers loads it too
    pipeline = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    assert pipeline.unet.config.sample_size == 16


def test_trained_model_scores_far_above_an_untrained_one(shapes_sd):
    prompts = TEST_PROMPTS[:8]
    trained = sample_scores(shapes_sd, prompts)
    torch.manual_seed(0)
    untrained = load_models(MODEL, mixed_precision="no")
    untrained.unet.load_state_dict(build_unet().state_dict())  # same architecture, fresh weights
    untrained.text_encoder.load_state_dict(build_text_encoder(len(untrained.tokenizer)).state_dict())
    random_scores = sample_scores(untrained, prompts)
    assert np.mean(trained) > np.mean(random_scores) + 0.3
    assert np.mean(trained) > 0.4


def test_object_tokens_attend_to_their_objects(shapes_sd, shapes_config):
    images, masks = sample_with_masks(shapes_sd, shapes_config, TEST_PROMPTS[:8], seed=0, thresholds=(0.2,))
    ious = object_ious(images, TEST_PROMPTS[:8], masks)  # (objects found, steps, 1)
    assert len(ious) >= 6
    assert ious[:, -1].mean() > 0.3  # a region that matches its object, not the whole image or nothing


def test_demo_config_runs_and_fusion_helps(shapes_config, tmp_path):
    """The demo's whole loop (one epoch, fewer training steps) on the shipped model; on these fixed seeds
    the targets score above their bases and stay closer to them than the references are."""
    config = shapes_config
    config.save_path, config.exp_name = str(tmp_path), "demo"
    config.train.num_epochs = 1
    config.train.num_inner_epochs = 1
    config.train.timestep_fraction = 0.25
    run_experiment(config)
    epoch_dir = ExperimentDir(config.save_path, "demo").epoch(0)
    pairs = epoch_dir.read_injected_map()  # [(base, reference)] in target order
    scores, targets = epoch_dir.sampled.read_scores(), epoch_dir.injected.read_scores()
    assert len(scores) == 32 and len(targets) == len(pairs) == 16
    bases = [scores[b] for b, _ in pairs]
    assert np.mean(targets) > np.mean(bases)

    def distance(a, b):
        return np.abs(np.asarray(Image.open(a), float) - np.asarray(Image.open(b), float)).mean()

    to_base = [distance(epoch_dir.injected.image_path(t), epoch_dir.base_image_path(t)) for t in range(16)]
    ref_to_base = [distance(epoch_dir.reference_image_path(t), epoch_dir.base_image_path(t)) for t in range(16)]
    assert np.mean(to_base) < 0.7 * np.mean(ref_to_base)
    assert os.path.isdir(os.path.join(tmp_path, "demo", "checkpoints", "checkpoint_0"))
    assert os.path.isfile(os.path.join(tmp_path, "demo", "report", "index.html"))
