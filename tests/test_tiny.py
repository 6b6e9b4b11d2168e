"""The tiny model: SD 2.1's topology scaled down, and a real CLIP tokenizer built offline."""

import os

import open_clip
import pytest

from d_fusion.attention import attention_layers
from d_fusion.tiny import build_missing


@pytest.mark.parametrize(
    "prompt", ["a cat playing chess", "the dog on the right of the vase", "A Rabbit, eating a sandwich!"]
)
def test_tokenizer_ids_match_open_clip(tiny_sd, prompt):
    ours = tiny_sd.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    theirs = open_clip.get_tokenizer("ViT-H-14")(prompt)[0].tolist()
    end = theirs.index(49407) + 1
    assert ours[:end] == theirs[:end]
    assert set(ours[end:]) == {49407}, "pads with <|endoftext|>"
    assert len(ours) == 77


def test_unet_numbers_its_blocks_and_grids_like_sd21(tiny_sd):
    """What fusion reads from SD 2.1's topology holds for the tiny UNet: 3 down blocks with attentions, the
    mid block (3) and 3 up blocks, each with self- and cross-attention; the mask layers at latent side // 4;
    several heads per layer; the epsilon-predicting DDIM of SD 2.1."""
    layers = attention_layers(tiny_sd.unet)
    side = tiny_sd.unet.config.sample_size
    blocks = {}
    for layer in layers:
        blocks.setdefault(layer.block, set()).add((layer.self_attention, layer.grid))
    assert sorted(blocks) == list(range(7))
    grids = {b: {grid for _, grid in kinds} for b, kinds in blocks.items()}
    assert grids == {0: {side}, 1: {side // 2}, 2: {side // 4}, 3: {side // 8}, 4: {side // 4}, 5: {side // 2}, 6: {side}}
    assert all({kind for kind, _ in kinds} == {True, False} for kinds in blocks.values())
    assert {layer.block for layer in layers if layer.mask_layer} == {2, 4}  # the 16x16 blocks of a 64x64 latent
    assert min(m.heads for name, m in tiny_sd.unet.named_modules() if name.endswith("attn1")) > 1
    scheduler = tiny_sd.scheduler
    assert scheduler.config.prediction_type == "epsilon"
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[:3].tolist() == [951, 901, 851]  # SD's DDIM: leading spacing, steps_offset 1


def test_folder_is_the_standard_diffusers_layout(tiny_dir):
    sd = os.path.join(tiny_dir, "sd")
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        assert os.path.exists(os.path.join(sd, part)), part


def test_tiny_models_are_built_only_into_the_tiny_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = str(tmp_path / "cache")
    build_missing(str(tmp_path / "cahce" / "sd"), cache)  # a mistyped pretrained.model
    build_missing("ViT-B-32", cache)  # an architecture name as eval.model: nothing in the current folder
    build_missing(os.path.join(cache, "unet"), cache)  # not one of the tiny models
    assert os.listdir(tmp_path) == []
