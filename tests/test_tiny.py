"""The tiny model: SD 2.1's topology scaled down, and a real CLIP tokenizer built offline."""

import os

import open_clip
import pytest

from d_fusion.tiny import SD_SCHEDULER, build_missing


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


def test_unet_has_sd21_topology(tiny_sd):
    config = tiny_sd.unet.config
    assert list(config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert list(config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert config.use_linear_projection
    heads = {m.heads for name, m in tiny_sd.unet.named_modules() if name.endswith("attn1")}
    assert min(heads) > 1
    assert tiny_sd.scheduler.config.prediction_type == "epsilon"
    for key, value in SD_SCHEDULER.items():
        assert tiny_sd.scheduler.config[key] == value


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
