"""The CLIP scorer (docs/METHOD.md §5): the release's reward, cosine of open_clip's normalised image
and text embeddings of an image and its own prompt. d_fusion/rewards.py names it `clip` among
the other rewards, and says what every reward offers.

The release scores with `ViT-H-14` / `laion2B-s32B-b79K`. `config.eval.model` may also be an open_clip
folder (`open_clip_config.json` + weights, as the tiny scorer is saved), an `hf-hub:` id, or an
architecture name with `config.eval.pretrained` a checkpoint file.
"""

import logging
import os
import pickle

import open_clip
import torch

from d_fusion import distributed
from d_fusion.errors import UserError
from d_fusion.models import resolve_device

log = logging.getLogger(__name__)


class ClipScorer:
    name = "clip"

    def __init__(self, model, preprocess, tokenizer, device):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess  # PIL image -> (3, S, S) normalised tensor
        self.tokenizer = tokenizer
        self.device = device

    @torch.no_grad()
    def image_embeddings(self, images):
        """PIL images -> (B, D) unit vectors."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)  # (B, 3, S, S)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts):
        """Prompts -> (B, D) unit vectors."""
        tokens = self.tokenizer(list(prompts)).to(self.device)  # (B, context_length)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @classmethod
    def from_config(cls, config):
        if config.pretrained.tiny:
            from d_fusion.tiny import build_missing

            build_missing(config.eval.model, config.tiny_cache)
        return load_scorer(config.eval.model, config.eval.pretrained, distributed.device_id(config.dev_id))

    @staticmethod
    def check_prompts(prompts):
        """Any text can be scored."""

    @staticmethod
    def settings(config):
        """The settings that decide its scores, besides its name."""
        return [config.eval.model, config.eval.pretrained]

    def score(self, images, prompts):
        """CLIP score of each image against its own prompt, in order: a list of floats in [-1, 1]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        similarity = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)  # (B,)
        return similarity.cpu().tolist()


def open_clip_name(model):
    """open_clip's name for `model`: a folder becomes `local-dir:<folder>`; names and ids stay as they are."""
    if os.path.isdir(model):
        return open_clip.factory.LOCAL_DIR_PREFIX + model
    return model


def create_open_clip(name, pretrained, device, what, hint):
    """(model, preprocess, tokenizer) of open_clip model `name` (weights: `pretrained`, a tag or a file;
    None when the name brings its own); a load failure is a UserError: `what` (the error). `hint`"""
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, require_pretrained=True
        )
        return model, preprocess, open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as error:
        raise UserError(f"{what} ({error}). {hint}") from None


def load_scorer(model, pretrained="", dev_id=0, fields=("eval.model", "eval.pretrained")):
    """The CLIP scorer of open_clip `model` with `pretrained`; `fields`: the settings that gave them."""
    device = resolve_device(dev_id)
    name = open_clip_name(model)
    schema, _ = open_clip.factory.parse_model_name(name)
    if not schema and not pretrained:
        raise UserError(
            f"config.{fields[1]} is empty, so the CLIP scorer {model!r} would score with random weights: pass "
            "a pretrained tag (laion2B-s32B-b79K for ViT-H-14) or a checkpoint file, or an open_clip folder as "
            f"config.{fields[0]}"
        )
    clip, preprocess, tokenizer = create_open_clip(
        name,
        None if schema else pretrained,
        device,
        f"could not load the CLIP scorer config.{fields[0]} = {model!r}, config.{fields[1]} = {pretrained!r}",
        "Pass an open_clip architecture and pretrained tag (downloaded on first use), an architecture and a "
        "checkpoint file, or an open_clip folder",
    )
    log.info("loaded CLIP scorer %s (%s) on %s", model, pretrained if not schema else "its own weights", device)
    return ClipScorer(clip, preprocess, tokenizer, device)
