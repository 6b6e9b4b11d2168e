import json
import os
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from d_fusion.datadir import ExperimentDir, write_image
from d_fusion.errors import UserError
from d_fusion.rewards import load_scorer_from_config
from d_fusion.scoring import load_scorer
from d_fusion.stages import score_pending
from d_fusion.shapes import world
from d_fusion.shapes.reward import ShapesReward, shapes_score
from d_fusion.tiny import TINY_CLIP

PROMPTS = ["a cat playing chess", "a dog driving a car", "a horse playing basketball"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in PROMPTS]


@pytest.fixture(scope="module")
def clip_dir(tiny_dir):
    return os.path.join(tiny_dir, "clip")


def expected_similarity(clip_dir, images, prompts):
    """(images, prompts) cosine matrix, from the saved weights, without the scorer's code."""
    model = open_clip.CLIP(**TINY_CLIP)
    model.load_state_dict(load_file(os.path.join(clip_dir, "open_clip_model.safetensors")))
    model.eval()
    preprocess = open_clip.image_transform(TINY_CLIP["vision_cfg"]["image_size"], is_train=False)
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(image) for image in images]))
        text_features = model.encode_text(open_clip.tokenize(prompts))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return image_features @ text_features.T


def test_tiny_scorer_is_the_cosine_of_each_image_with_its_own_prompt(clip_dir, images):
    scorer = load_scorer(clip_dir)
    similarity = expected_similarity(clip_dir, images, PROMPTS)
    # image i against prompt i: the diagonal; against the reversed prompt list: the anti-diagonal
    assert scorer.score(images, PROMPTS) == pytest.approx(similarity.diagonal().tolist(), abs=1e-5)
    assert scorer.score(images, PROMPTS[::-1]) == pytest.approx(similarity.flip(1).diagonal().tolist(), abs=1e-5)
    assert len(set(scorer.score(images, PROMPTS))) == len(PROMPTS)  # random weights still tell images apart


def test_architecture_name_with_checkpoint_file_loads_the_same_weights(clip_dir, images, tmp_path):
    # a user's own checkpoint of a registered architecture: eval.model = name, eval.pretrained = file
    config_file = tmp_path / "d-fusion-tiny-test.json"
    config_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_file)
    from_file = load_scorer("d-fusion-tiny-test", os.path.join(clip_dir, "open_clip_model.safetensors"))
    from_folder = load_scorer("local-dir:" + clip_dir)
    assert from_file.score(images, PROMPTS) == pytest.approx(from_folder.score(images, PROMPTS), abs=1e-6)


@pytest.mark.parametrize(
    "model, pretrained",
    [("no/such/folder", "x"), ("ViT-H-14", "no-such-tag"), ("ViT-H-14", ""), ("folder without weights", "")],
)
def test_unloadable_or_weightless_scorer_is_a_user_error(model, pretrained, clip_dir, tmp_path):
    if model == "folder without weights":
        model = str(tmp_path)
        with open(os.path.join(clip_dir, "open_clip_config.json")) as f:
            (tmp_path / "open_clip_config.json").write_text(f.read())
    with pytest.raises(UserError, match="config.eval.model"):
        load_scorer(model, pretrained)


def test_tiny_config_builds_a_missing_scorer_on_first_use(tiny_config, clip_dir, images, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(os.path.join(os.path.dirname(clip_dir), "sd"), cache / "sd")  # an older cache: no clip/ yet
    tiny_config.tiny_cache, tiny_config.eval.model = str(cache), str(cache / "clip")
    scorer = load_scorer_from_config(tiny_config)
    assert sorted(os.listdir(cache / "clip")) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert scorer.score(images, PROMPTS) == pytest.approx(load_scorer(clip_dir).score(images, PROMPTS), abs=1e-6)


def test_run_eval_scores_a_shapes_experiment_with_the_shapes_reward(tiny_config, tmp_path):
    """The same files and the same scorer loop as CLIP: an image set's listed images get scores."""
    experiment = ExperimentDir(str(tmp_path / "data"), "shapes")
    epoch_dir = experiment.epoch(0)
    rng, prompts, images = random.Random(0), [], []
    for scene in world.split_scenes("test")[:4]:
        image, _ = world.render(scene, rng)
        write_image(epoch_dir.sampled.image_path(len(prompts)), np.asarray(image))
        prompts.append(world.caption(scene))
        images.append(image)
    epoch_dir.sampled.publish(prompts)
    assert score_pending(ShapesReward(), experiment, batch_size=3) == 4
    expected = [shapes_score(Image.open(epoch_dir.sampled.image_path(j)), p) for j, p in enumerate(prompts)]
    assert epoch_dir.sampled.read_scores() == pytest.approx(expected)
    assert min(expected) > 0.9
