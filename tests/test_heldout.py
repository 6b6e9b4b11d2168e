"""Held-out evaluation: paired seeds for base and checkpoints, tables equal to the score files, reuse."""

import csv
import json

import numpy as np
import pytest
import torch

from d_fusion.checkpoints import save_checkpoint
from d_fusion.datadir import ExperimentDir, read_image
from d_fusion.errors import UserError
from d_fusion.heldout import HeldoutEvaluator, comparison_table, diversity, run_heldout
from d_fusion.rewards import load_scorer_from_config
from d_fusion.sampling import SamplerSettings, decode_images, encode_prompts, sample_generators, sample_trajectories
from d_fusion.stages import make_trainer
from tests.test_rewards import clip_image_features

PROMPTS = ["a cat playing chess", "a dog eating a sandwich"]


@pytest.fixture
def config(tiny_config, tmp_path):
    prompt_file = tmp_path / "my_test.json"
    prompt_file.write_text(json.dumps(PROMPTS))
    tiny_config.heldout.prompt_file = str(prompt_file)
    tiny_config.heldout.images_per_prompt = 2
    tiny_config.heldout.batch_size = 3  # batches cross prompts
    tiny_config.sample.num_steps = 3
    return tiny_config


def save_two_checkpoints(config, models):
    """checkpoint_0: fresh LoRA (B = 0, so the base model's function); checkpoint_1: non-zero LoRA."""
    experiment = ExperimentDir(config.save_path, config.exp_name)
    trainer = make_trainer(config, models)
    save_checkpoint(trainer, experiment, 0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in models.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    save_checkpoint(trainer, experiment, 1)
    return experiment


def pixels(image_set, index):
    return np.asarray(read_image(image_set.image_path(index)), dtype=np.int16)


def test_checkpoints_are_scored_against_base_on_the_same_seeds(config, fresh_tiny_sd, tiny_sd, monkeypatch):
    experiment = save_two_checkpoints(config, fresh_tiny_sd)
    config.heldout.checkpoint = experiment.checkpoints  # a folder: every checkpoint in it
    rows = run_heldout(config)

    results = experiment.heldout("my_test")
    base, zero_lora, trained = (results.model(n).images for n in ("base", "checkpoint_0", "checkpoint_1"))
    num_images = 4
    for j in range(num_images):
        assert np.array_equal(pixels(base, j), pixels(zero_lora, j))  # same seeds, same function
    assert any(not np.array_equal(pixels(base, j), pixels(trained, j)) for j in range(num_images))

    # image j is sample j's own generator (seed + j), whatever batch it was drawn in
    j = 3
    embeds = encode_prompts(tiny_sd, [PROMPTS[1]])
    trajectory = sample_trajectories(
        tiny_sd, embeds, encode_prompts(tiny_sd, [""]), sample_generators(config.seed, 0, num_images, [j]),
        SamplerSettings(3, config.sample.eta, config.sample.guidance_scale), progress=False,
    )
    alone = decode_images(tiny_sd, trajectory.latents[:, -1])[0].astype(np.int16)
    assert np.abs(alone - pixels(base, j)).max() <= 1

    # the table's numbers are the score files'
    names = ("base", "checkpoint_0", "checkpoint_1")
    scores = {name: results.model(name).scored("clip").read_scores() for name in names}
    assert base.published_prompts() == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    by_prompt = {row["prompt"]: row for row in rows}
    for name, model_scores in scores.items():
        assert by_prompt[PROMPTS[0]][f"clip: {name}"] == pytest.approx(np.mean(model_scores[:2]))
        assert by_prompt[PROMPTS[1]][f"clip: {name}"] == pytest.approx(np.mean(model_scores[2:]))
        with open(results.model(name).scored("clip").scores_file) as f:
            saved = json.load(f)
        assert by_prompt["all prompts"][f"clip: {name}"] == pytest.approx(saved["mean"]) and saved["reward"] == "clip"
    assert by_prompt["all prompts"]["clip: checkpoint_0 - base"] == 0
    delta = np.mean(scores["checkpoint_1"]) - np.mean(scores["base"])
    assert by_prompt["all prompts"]["clip: checkpoint_1 - base"] == pytest.approx(delta)
    with open(results.table_csv) as f:
        table = list(csv.DictReader(f))
    assert [r["prompt"] for r in table] == PROMPTS + ["all prompts"]
    assert float(table[-1]["clip: checkpoint_1"]) == pytest.approx(by_prompt["all prompts"]["clip: checkpoint_1"])
    assert results.read_table() == dict(rows=rows, rewards=["clip"])

    # diversity: per prompt, 1 - cosine of its two images' CLIP embeddings (the saved weights, open_clip directly)
    for name in ("base", "checkpoint_1"):
        images = [read_image(results.model(name).images.image_path(j)) for j in range(num_images)]
        features = clip_image_features(config.tiny_cache, images)
        per_prompt = [1 - float(features[0] @ features[1]), 1 - float(features[2] @ features[3])]
        assert by_prompt[PROMPTS[0]][f"diversity: {name}"] == pytest.approx(per_prompt[0], abs=1e-5)
        assert by_prompt[PROMPTS[1]][f"diversity: {name}"] == pytest.approx(per_prompt[1], abs=1e-5)
        assert by_prompt["all prompts"][f"diversity: {name}"] == pytest.approx(np.mean(per_prompt), abs=1e-5)

    # a second run with the same settings reuses every model: nothing loads, nothing is sampled
    def no_loading(self, *args):
        raise AssertionError("reused results must not load a model")

    for method in ("models", "scorer", "clip"):
        monkeypatch.setattr(HeldoutEvaluator, method, no_loading)
    assert run_heldout(config) == rows

    # another reward on the same images: scored, not sampled again; the training reward's columns stay
    monkeypatch.undo()
    monkeypatch.setattr(HeldoutEvaluator, "models", no_loading)
    config.heldout.rewards = "clip,aesthetic"
    rows = run_heldout(config)
    aesthetic = load_scorer_from_config(config, "aesthetic")
    images = [read_image(base.image_path(j)) for j in range(num_images)]
    assert results.model("base").scored("aesthetic").read_scores() == pytest.approx(aesthetic.score(images, [""] * 4))
    overall = rows[-1]
    assert overall["clip: checkpoint_1"] == by_prompt["all prompts"]["clip: checkpoint_1"]
    assert overall["aesthetic: base"] == pytest.approx(np.mean(aesthetic.score(images, [""] * 4)))
    assert "aesthetic: checkpoint_1 wins" in overall


def test_comparison_table_means_deltas_wins_and_diversity():
    samples = ["a", "a", "b", "b"]
    scores = {"clip": {"base": [0.1, 0.2, 0.3, 0.4], "checkpoint_2": [0.2, 0.1, 0.5, 0.4]}}
    diversities = {"base": {"a": 0.25, "b": 0.5}, "checkpoint_2": {"a": 0.5, "b": 0.0}}
    rows = comparison_table(samples, scores, diversities)
    assert [r["prompt"] for r in rows] == ["a", "b", "all prompts"]
    assert rows[0]["clip: base"] == pytest.approx(0.15) and rows[1]["clip: checkpoint_2"] == pytest.approx(0.45)
    assert rows[1]["clip: checkpoint_2 - base"] == pytest.approx(0.1)
    assert rows[2]["clip: checkpoint_2 wins"] == 0.5  # a tie is not a win
    assert rows[1]["diversity: base"] == 0.5 and rows[2]["diversity: base"] == 0.375  # the mean over prompts
    assert list(rows[0]) == [
        "prompt", "images", "clip: base", "clip: checkpoint_2", "clip: checkpoint_2 - base", "clip: checkpoint_2 wins",
        "diversity: base", "diversity: checkpoint_2",
    ]


def test_diversity_is_the_mean_pairwise_cosine_distance_per_prompt():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1], [1, 1], [3, 4], [3, 4]]), dim=-1)
    result = diversity(e, ["a", "a", "a", "b", "b"])
    c = 1 / 2**0.5  # cos 45 degrees
    assert result["a"] == pytest.approx(((1 - 0) + (1 - c) + (1 - c)) / 3) and result["b"] == pytest.approx(0, abs=1e-7)


def test_heldout_rewards_and_diversity_settings_fail_before_loading(config):
    config.heldout.rewards = "clip,imagereward"
    with pytest.raises(UserError, match="'imagereward' is unknown or repeated"):
        run_heldout(config)
    config.heldout.rewards, config.heldout.images_per_prompt = "", 1
    with pytest.raises(UserError, match="heldout.diversity needs at least 2 images per prompt"):
        run_heldout(config)


def test_bad_checkpoint_or_prompt_file_fails_before_loading(config, tmp_path):
    config.heldout.checkpoint = str(tmp_path)
    with pytest.raises(UserError, match="heldout.checkpoint"):
        run_heldout(config)
    config.heldout.checkpoint = ""
    config.heldout.prompt_file = str(tmp_path / "missing.json")
    with pytest.raises(UserError, match="missing.json"):
        run_heldout(config)
