"""Rewards by name: each one's score equals an independent computation on the same saved weights;
weighted sums equal the weighted sum of their parts; bad names and weights fail at start-up."""

import os

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor

from d_fusion.errors import UserError
from d_fusion.rewards import (
    AestheticScorer,
    HpsScorer,
    PickScore,
    check_reward,
    load_scorer_from_config,
    parse_reward,
    reward_settings,
)
from d_fusion.scoring import ClipScorer
from d_fusion.shapes.reward import ShapesReward
from d_fusion.tiny import TINY_AESTHETIC, TINY_CLIP, TINY_HPS_CHECKPOINT

PROMPTS = ["a cat playing chess", "a dog driving a car", "a horse playing basketball"]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def images():
    """Two square images and a wide one (HPS pads it to a square)."""
    rng = np.random.default_rng(0)
    sizes = [(128, 128), (96, 96), (64, 128)]
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in sizes]


def normalized(features):
    return features / features.norm(dim=-1, keepdim=True)


def to_pixels(image):
    """A PIL image at the tiny models' 32 px -> normalised (3, 32, 32)."""
    return TF.normalize(TF.to_tensor(image), OPENAI_MEAN, OPENAI_STD)


def test_pickscore_is_logit_scale_times_the_cosine_of_clipmodel(tiny_config, tiny_dir, images):
    scorer = load_scorer_from_config(tiny_config, "pickscore")
    assert isinstance(scorer, PickScore)
    folder = os.path.join(tiny_dir, "pickscore")
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    # the processor: shortest side to 32 (bicubic), centre crop, OpenAI mean/std
    square = images[:2]
    bicubic = TF.InterpolationMode.BICUBIC
    by_hand = torch.stack([to_pixels(TF.center_crop(TF.resize(im, 32, bicubic), 32)) for im in square])
    pixels = processor(images=square, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, by_hand, atol=0.05)
    # CLIPModel's own forward: logits_per_image = logit_scale.exp() * cosine matrix
    text = processor(text=PROMPTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=pixels, **text).logits_per_image  # (images, prompts)
    assert scorer.score(square, PROMPTS[:2]) == pytest.approx(logits.diagonal().tolist(), abs=1e-4)
    assert scorer.score(square, PROMPTS[1::-1]) == pytest.approx(logits.flip(1).diagonal().tolist(), abs=1e-4)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-4)  # the scale is there


def hps_pixels(image):
    """HPS's preprocess_val by hand: longest side to 32 (bicubic), centred on black 32x32, normalised."""
    w, h = image.size
    scale = 32 / max(w, h)
    resized = TF.to_tensor(TF.resize(image, [round(h * scale), round(w * scale)], TF.InterpolationMode.BICUBIC))
    canvas = torch.zeros(3, 32, 32)
    top, left = (32 - resized.shape[1]) // 2, (32 - resized.shape[2]) // 2
    canvas[:, top : top + resized.shape[1], left : left + resized.shape[2]] = resized
    return TF.normalize(canvas, OPENAI_MEAN, OPENAI_STD)


def test_hpsv2_is_hps_cosine_on_its_checkpoint(tiny_config, tiny_dir, images):
    scorer = load_scorer_from_config(tiny_config, "hpsv2")
    assert isinstance(scorer, HpsScorer)
    model = open_clip.CLIP(**TINY_CLIP)
    checkpoint = torch.load(os.path.join(tiny_dir, "hpsv2", TINY_HPS_CHECKPOINT), weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    with torch.no_grad():  # HPS: outputs = model(image, text); image_features @ text_features.T
        pixels = torch.stack([hps_pixels(im) for im in images])  # (3, 3, 32, 32)
        image_features, text_features, _ = model(pixels, open_clip.tokenize(PROMPTS))
    logits = image_features @ text_features.T
    assert scorer.score(images, PROMPTS) == pytest.approx(logits.diagonal().tolist(), abs=1e-5)
    clip_weights = load_file(os.path.join(tiny_dir, "clip", "open_clip_model.safetensors"))
    assert not torch.equal(clip_weights["text_projection"], checkpoint["state_dict"]["text_projection"])  # HPS's own


def clip_image_features(tiny_dir, images):
    """The tiny CLIP's normalised image embeddings, from its saved weights."""
    model = open_clip.CLIP(**TINY_CLIP)
    model.load_state_dict(load_file(os.path.join(tiny_dir, "clip", "open_clip_model.safetensors")))
    model.eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        return normalized(model.encode_image(torch.stack([preprocess(im) for im in images])))


def test_aesthetic_mlp_is_the_improved_predictor_on_normalised_clip_embeddings(tiny_config, tiny_dir, images):
    scorer = load_scorer_from_config(tiny_config, "aesthetic")
    assert isinstance(scorer, AestheticScorer)
    state = torch.load(os.path.join(tiny_dir, "aesthetic", TINY_AESTHETIC), weights_only=True)
    assert sorted({int(k.split(".")[1]) for k in state}) == [0, 2, 4, 6, 7]  # dropouts at 1, 3, 5
    x = clip_image_features(tiny_dir, images)
    for i in (0, 2, 4, 6, 7):  # no activations between the layers, as published
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert scorer.score(images, ["ignored"] * 3) == pytest.approx(x.squeeze(-1).tolist(), abs=1e-5)


def test_aesthetic_linear_head_is_laion_v1(tiny_config, tiny_dir, images, tmp_path):
    weight, bias = torch.randn(1, TINY_CLIP["embed_dim"]), torch.randn(1)
    torch.save(dict(weight=weight, bias=bias), tmp_path / "sa_0_4_vit_l_14_linear.pth")
    tiny_config.eval.aesthetic_model = str(tmp_path / "sa_0_4_vit_l_14_linear.pth")
    expected = clip_image_features(tiny_dir, images) @ weight.T + bias
    scores = load_scorer_from_config(tiny_config, "aesthetic").score(images, PROMPTS)
    assert scores == pytest.approx(expected.squeeze(-1).tolist(), abs=1e-5)


def test_a_weighted_sum_is_the_weighted_sum_of_its_parts(tiny_config, images):
    tiny_config.eval.reward = "clip:1.0, pickscore:0.5,aesthetic:-2"
    summed = load_scorer_from_config(tiny_config)
    assert summed.name == "clip:1,pickscore:0.5,aesthetic:-2"
    parts = {
        name: load_scorer_from_config(tiny_config, name).score(images, PROMPTS)
        for name in ("clip", "pickscore", "aesthetic")
    }
    expected = [c + 0.5 * p - 2 * a for c, p, a in zip(parts["clip"], parts["pickscore"], parts["aesthetic"])]
    assert summed.score(images, PROMPTS) == pytest.approx(expected, abs=1e-5)
    # one reward by name is that reward itself: the release's CLIP scores, unchanged
    tiny_config.eval.reward = "clip"
    assert isinstance(load_scorer_from_config(tiny_config), ClipScorer)
    assert reward_settings(tiny_config) == [["clip", None, tiny_config.eval.model, tiny_config.eval.pretrained]]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("imagereward", "known rewards: clip, shapes, pickscore, hpsv2, aesthetic"),
        ("clip:1,pickscor:0.5", "'pickscor' is not a reward"),
        ("clip:one", "the weight of clip must be a finite non-zero number"),
        ("clip:0", "the weight of clip"),
        ("clip:nan,hpsv2", "the weight of clip"),
        ("clip:1,clip:2", "clip appears twice"),
    ],
)
def test_bad_reward_names_and_weights_fail_at_start_up(tiny_config, spec, message):
    tiny_config.eval.reward = spec
    with pytest.raises(UserError, match=message):
        check_reward(tiny_config, PROMPTS)


def test_parse_reward():
    assert parse_reward("hpsv2") == [("hpsv2", None)]
    assert parse_reward("clip,pickscore:0.25") == [("clip", 1.0), ("pickscore", 0.25)]


def test_eval_reward_picks_the_scorer_and_checks_prompts_at_start_up(tiny_config):
    tiny_config.eval.reward = "shapes"
    assert isinstance(load_scorer_from_config(tiny_config), ShapesReward)
    check_reward(tiny_config, ["a red circle above a blue square"])
    with pytest.raises(UserError, match="a dog driving a car"):
        check_reward(tiny_config, ["a dog driving a car"])
    tiny_config.eval.reward = "clip:1,shapes:1"  # a sum checks the prompts of each part
    with pytest.raises(UserError, match="a dog driving a car"):
        check_reward(tiny_config, ["a dog driving a car"])


def test_tiny_config_builds_missing_reward_models_on_first_use(tiny_config, tiny_dir, images, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(os.path.join(tiny_dir, "clip"), cache / "clip")  # an older cache: clip only
    tiny_config.tiny_cache = str(cache)
    scores = load_scorer_from_config(tiny_config, "hpsv2").score(images, PROMPTS)
    assert sorted(os.listdir(cache / "hpsv2")) == ["HPS_v2.1_compressed.pt", "tiny-hps.json"]
    assert os.path.isdir(cache / "pickscore") and os.path.isdir(cache / "aesthetic")
    tiny_config.tiny_cache = tiny_dir
    assert scores == pytest.approx(load_scorer_from_config(tiny_config, "hpsv2").score(images, PROMPTS), abs=1e-6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hpsv2_checkpoint", "no/such/HPS_v2.1.pt", "hpsv2_checkpoint = 'no/such/HPS_v2.1.pt' is not a file"),
        ("hpsv2_checkpoint", "HPS.pt", "no such file"),
        ("pickscore_model", "/no/such/folder", "could not load PickScore"),
        ("aesthetic_model", __file__, "is not an aesthetic predictor.s weights"),
        ("hpsv2_checkpoint", __file__, "could not load HPS"),
    ],
)
def test_missing_or_wrong_reward_models_are_user_errors(tiny_config, field, value, message):
    tiny_config.eval[field] = value
    with pytest.raises(UserError, match=message):
        load_scorer_from_config(tiny_config, field.split("_")[0])
