"""Rewards: what scores an image against its prompt (docs/METHOD.md §5).

`config.eval.reward` names the reward, a class in `REWARDS` with
- `from_config(config)`: the loaded scorer;
- `check_prompts(prompts)`: a UserError at start-up, before any work, for prompts it cannot score;
- `score(images, prompts) -> [float]`: PIL images, one prompt each, scores in image order.

- `clip` (default): the release's CLIP score, open_clip, cosine of normalised embeddings;
- `shapes`: the exact alignment reward of the shapes world (`d_fusion.shapes.reward`).

The release scores with `ViT-H-14` / `laion2B-s32B-b79K`. `config.eval.model` may also be an open_clip
folder (`open_clip_config.json` + weights, as the tiny scorer is saved), an `hf-hub:` id, or an
architecture name with `config.eval.pretrained` a checkpoint file.
"""

import logging
import os

import open_clip
import torch

from d_fusion import distributed
from d_fusion.errors import UserError
from d_fusion.models import resolve_device
from d_fusion.shapes.reward import ShapesReward

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


def load_scorer(model, pretrained="", dev_id=0):
    device = resolve_device(dev_id)
    name = open_clip_name(model)
    schema, _ = open_clip.factory.parse_model_name(name)
    if not schema and not pretrained:
        raise UserError(
            f"config.eval.pretrained is empty, so the CLIP scorer {model!r} would score with random weights: pass "
            "a pretrained tag (laion2B-s32B-b79K for ViT-H-14) or a checkpoint file, or an open_clip folder as "
            "config.eval.model"
        )
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if schema else pretrained, device=device, require_pretrained=True
        )
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, OSError) as error:
        raise UserError(
            f"could not load the CLIP scorer config.eval.model = {model!r}, config.eval.pretrained = "
            f"{pretrained!r} ({error}). Pass an open_clip architecture and pretrained tag (downloaded on "
            "first use), an architecture and a checkpoint file, or an open_clip folder"
        ) from None
    log.info("loaded CLIP scorer %s (%s) on %s", model, pretrained if not schema else "its own weights", device)
    return ClipScorer(clip, preprocess, tokenizer, device)


REWARDS = {"clip": ClipScorer, "shapes": ShapesReward}


def reward_class(config):
    if config.eval.reward not in REWARDS:
        raise UserError(f"config.eval.reward = {config.eval.reward!r}; known rewards: {', '.join(REWARDS)}")
    return REWARDS[config.eval.reward]


def check_reward(config, prompts):
    """An unknown reward, or prompts the reward cannot score, fail at start-up."""
    reward_class(config).check_prompts(prompts)


def reward_settings(config):
    """What decides the scores (saved with held-out results): the reward and, for CLIP, its model."""
    if config.eval.reward == "clip":
        return [config.eval.model, config.eval.pretrained]
    return [config.eval.reward]


def load_scorer_from_config(config):
    """The scorer `config.eval.reward` names."""
    return reward_class(config).from_config(config)
