"""Rewards: what scores an image against its prompt (docs/METHOD.md §5), by name.

`config.eval.reward` names one reward of `REWARDS`, or a weighted sum of them
(`clip:1.0,pickscore:0.5`: the sum of each reward's score times its weight). A reward is a class with
- `from_config(config)`: the loaded scorer;
- `check_prompts(prompts)`: a UserError at start-up, before any work, for prompts it cannot score;
- `settings(config)`: the settings that decide its scores besides its name (its model files);
- `score(images, prompts) -> [float]`: PIL images, one prompt each, scores in image order.

- `clip` (default): the release's CLIP score (d_fusion/scoring.py);
- `shapes`: the exact alignment reward of the shapes world (d_fusion/shapes/reward.py);
- `pickscore`: PickScore (Kirstain et al. 2023): a transformers CLIPModel fine-tuned on Pick-a-Pic, with
  its CLIPProcessor; score = logit_scale.exp() * cosine of the image and prompt embeddings;
- `hpsv2`: HPS v2 / v2.1 (Wu et al. 2023): open_clip ViT-H-14 with an HPS checkpoint file; score = cosine
  of the normalised embeddings (HPS's `image_features @ text_features.T`, no logit scale), the image
  resized on its longest side and padded to a square as HPS's preprocess_val does;
- `aesthetic`: the LAION aesthetic predictor: a linear head (v1) or the improved predictor's MLP
  (v2, `sac+logos+ava1-l14-linearMSE.pth`) on the normalised CLIP ViT-L/14 (OpenAI) image embedding;
  the prompt is not used.

ImageReward is not offered: the `image-reward` package (1.5) cannot build its model offline from a
local checkpoint (its BLIP constructor downloads `bert-base-uncased`'s tokenizer whatever is passed), it
pins timm 0.6.13 and fairscale 0.4.13 (this project runs timm 1.x), and its ViT-L / BERT-base sizes are
fixed in code, so no small model of the same code can be built for the offline tests.
"""

import logging
import math
import os
import pickle

import huggingface_hub
import open_clip
import torch
from transformers import CLIPModel, CLIPProcessor

from d_fusion import distributed
from d_fusion.errors import UserError
from d_fusion.models import HUB_TIMEOUT, check_hub_reachable, resolve_device
from d_fusion.scoring import ClipScorer, create_open_clip, load_scorer
from d_fusion.shapes.reward import ShapesReward

log = logging.getLogger(__name__)


def check_lengths(images, prompts):
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")


def build_tiny(config, *paths):
    """With pretrained.tiny, build the tiny models any of `paths` names (d_fusion/tiny.py)."""
    if config.pretrained.tiny:
        from d_fusion.tiny import build_missing

        for path in paths:
            build_missing(path, config.tiny_cache)


def weights_file(spec, field, published):
    """A weights file: a local path, or `org/repo/file` on the Hugging Face hub (downloaded on first use).
    `published`: where users get it, for the message when it is neither."""
    if os.path.isfile(spec):
        return spec
    parts = spec.split("/")
    if len(parts) < 3 or spec.startswith((".", "/", "~")):
        raise UserError(
            f"config.{field} = {spec!r}: no such file. Download {published} and pass its path (or org/repo/file on "
            "the hub)"
        )
    try:
        return huggingface_hub.hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), etag_timeout=HUB_TIMEOUT)
    except Exception as error:  # no network, an unknown repo or file: the hub's and httpx's error types
        raise UserError(
            f"config.{field} = {spec!r} is not a file and the Hugging Face hub cannot give it "
            f"({type(error).__name__}: {error}). Download it on a machine with a network and pass its path"
        ) from None


# ---------------------------------------------------------------- PickScore


class PickScore:
    name = "pickscore"

    def __init__(self, model, processor, device):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = device

    @classmethod
    def from_config(cls, config):
        ev = config.eval
        build_tiny(config, ev.pickscore_model, ev.pickscore_processor)
        device = resolve_device(distributed.device_id(config.dev_id))
        return load_pickscore(ev.pickscore_model, ev.pickscore_processor, device)

    @staticmethod
    def check_prompts(prompts):
        """Any text can be scored (cut at 77 tokens)."""

    @staticmethod
    def settings(config):
        return [config.eval.pickscore_model, config.eval.pickscore_processor]

    @torch.no_grad()
    def score(self, images, prompts):
        """PickScore_v1's model card: logit_scale.exp() * cosine of each image with its own prompt."""
        check_lengths(images, prompts)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)  # (B, 3, S, S)
        text = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = self.model.get_image_features(pixel_values=pixels).pooler_output  # (B, D)
        text_embeds = self.model.get_text_features(**text.to(self.device)).pooler_output  # (B, D)
        cosine = (normalize(image_embeds) * normalize(text_embeds)).sum(dim=-1)  # (B,)
        return (self.model.logit_scale.exp() * cosine).cpu().tolist()


def normalize(embeddings):
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def load_pickscore(model, processor, device):
    """PickScore's CLIPModel (`model`) and CLIPProcessor (`processor`): folders or hub ids."""
    for name, field in ((model, "eval.pickscore_model"), (processor, "eval.pickscore_processor")):
        if not os.path.isdir(name):
            check_hub_reachable(name, "main", field, os.path.basename(name))
    try:
        loaded = CLIPModel.from_pretrained(model).to(device)
        loaded_processor = CLIPProcessor.from_pretrained(processor)
    except (OSError, ValueError) as error:
        raise UserError(
            f"could not load PickScore from config.eval.pickscore_model = {model!r} and "
            f"config.eval.pickscore_processor = {processor!r} ({error}). Pass a transformers CLIPModel folder "
            "or hub id (yuvalkirstain/PickScore_v1) and a CLIPProcessor one (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
        ) from None
    log.info("loaded PickScore %s (processor %s) on %s", model, processor, device)
    return PickScore(loaded, loaded_processor, device)


# ---------------------------------------------------------------- HPS v2


class HpsScorer(ClipScorer):
    """The CLIP scorer's cosine, with HPS's weights and image preprocessing."""

    name = "hpsv2"

    @classmethod
    def from_config(cls, config):
        ev = config.eval
        build_tiny(config, ev.hpsv2_architecture, ev.hpsv2_checkpoint)
        checkpoint = weights_file(ev.hpsv2_checkpoint, "eval.hpsv2_checkpoint", "HPS_v2.1_compressed.pt (xswu/HPSv2)")
        return load_hps(ev.hpsv2_architecture, checkpoint, resolve_device(distributed.device_id(config.dev_id)))

    @staticmethod
    def settings(config):
        return [config.eval.hpsv2_architecture, config.eval.hpsv2_checkpoint]


def open_clip_architecture(architecture):
    """An open_clip architecture name, or a model config file (open_clip's JSON format) registered under its stem."""
    if architecture.endswith(".json"):
        if not os.path.isfile(architecture):
            raise UserError(f"config.eval.hpsv2_architecture = {architecture!r}: no such file")
        open_clip.add_model_config(architecture)
        return os.path.splitext(os.path.basename(architecture))[0]
    return architecture


def load_hps(architecture, checkpoint, device):
    """open_clip `architecture` with the HPS checkpoint (`{"state_dict": ...}`, as HPS_v2*.pt are)."""
    name = open_clip_architecture(architecture)
    model, _, tokenizer = create_open_clip(
        name,
        checkpoint,
        device,
        f"could not load HPS from config.eval.hpsv2_architecture = {architecture!r} and "
        f"config.eval.hpsv2_checkpoint = {checkpoint!r}",
        "Pass ViT-H-14 and an HPS v2 or v2.1 checkpoint (HPS_v2.1_compressed.pt from xswu/HPSv2)",
    )
    cfg = open_clip.get_model_preprocess_cfg(model)
    # HPS's preprocess_val: resize the longest side (bicubic), pad to a square with black, normalise
    preprocess = open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"], resize_mode="longest", interpolation="bicubic"
    )
    log.info("loaded HPS %s (%s) on %s", architecture, checkpoint, device)
    return HpsScorer(model, preprocess, tokenizer, device)


# ---------------------------------------------------------------- LAION aesthetic predictor


class AestheticMLP(torch.nn.Module):
    """The improved aesthetic predictor's head: `layers` is Linear, Dropout, Linear, ... as in its file
    (`layers.<i>.weight`); the dropouts are the identity when scoring, so they are Identity here."""

    def __init__(self, state_dict):
        super().__init__()
        linear_at = sorted({int(key.split(".")[1]) for key in state_dict})
        layers = [torch.nn.Identity() for _ in range(linear_at[-1] + 1)]
        for i in linear_at:
            out_features, in_features = state_dict[f"layers.{i}.weight"].shape
            layers[i] = torch.nn.Linear(in_features, out_features)
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, embeddings):
        return self.layers(embeddings)


def aesthetic_head(path):
    """The head in a weights file: a linear layer (`weight`, `bias`: LAION's v1 predictor) or the MLP."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if set(state_dict) == {"weight", "bias"}:
            head = torch.nn.Linear(state_dict["weight"].shape[1], state_dict["weight"].shape[0])
        else:
            head = AestheticMLP(state_dict)
        head.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, IndexError, AttributeError, OSError, pickle.UnpicklingError) as error:
        raise UserError(
            f"config.eval.aesthetic_model = {path!r} is not an aesthetic predictor's weights ({type(error).__name__}: "
            f"{error}): pass sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor) or "
            "sa_0_4_vit_l_14_linear.pth (LAION-AI/aesthetic-predictor)"
        ) from None
    return head.eval().requires_grad_(False)


class AestheticScorer:
    name = "aesthetic"

    def __init__(self, clip, head):
        self.clip = clip  # a ClipScorer: its normalised image embeddings
        self.head = head.to(clip.device)

    @classmethod
    def from_config(cls, config):
        ev = config.eval
        build_tiny(config, ev.aesthetic_clip, ev.aesthetic_model)
        published = "sac+logos+ava1-l14-linearMSE.pth (github.com/christophschuhmann/improved-aesthetic-predictor)"
        head = aesthetic_head(weights_file(ev.aesthetic_model, "eval.aesthetic_model", published))
        fields = ("eval.aesthetic_clip", "eval.aesthetic_clip_pretrained")
        dev_id = distributed.device_id(config.dev_id)
        clip = load_scorer(ev.aesthetic_clip, ev.aesthetic_clip_pretrained, dev_id, fields)
        return cls(clip, head)

    @staticmethod
    def check_prompts(prompts):
        """The prompt is not used."""

    @staticmethod
    def settings(config):
        return [config.eval.aesthetic_clip, config.eval.aesthetic_clip_pretrained, config.eval.aesthetic_model]

    @torch.no_grad()
    def score(self, images, prompts):
        check_lengths(images, prompts)
        return self.head(self.clip.image_embeddings(images)).squeeze(-1).cpu().tolist()  # (B, D) -> (B,)


# ---------------------------------------------------------------- by name, and weighted sums

REWARDS = {
    "clip": ClipScorer,
    "shapes": ShapesReward,
    "pickscore": PickScore,
    "hpsv2": HpsScorer,
    "aesthetic": AestheticScorer,
}


def parse_reward(spec, field="eval.reward"):
    """`spec` -> [(name, weight)]: "clip" -> [("clip", None)] (the reward itself); "clip:1.0,pickscore:0.5"
    -> [("clip", 1.0), ("pickscore", 0.5)] (a weighted sum; a term without weight has weight 1)."""
    terms = [term.strip() for term in spec.split(",")]
    if len(terms) == 1 and ":" not in terms[0]:
        if terms[0] not in REWARDS:
            raise UserError(f"config.{field} = {spec!r}; known rewards: {', '.join(REWARDS)}")
        return [(terms[0], None)]
    parsed = []
    for term in terms:
        name, _, weight = term.partition(":")
        name = name.strip()
        if name not in REWARDS:
            raise UserError(f"config.{field} = {spec!r}: {name!r} is not a reward; known rewards: {', '.join(REWARDS)}")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value == 0:
            raise UserError(f"config.{field} = {spec!r}: the weight of {name} must be a finite non-zero number")
        if name in dict(parsed):
            raise UserError(f"config.{field} = {spec!r}: {name} appears twice")
        parsed.append((name, value))
    return parsed


def reward_label(terms):
    """The reward's name in score files: "clip", or "clip:1,pickscore:0.5" for a weighted sum."""
    return ",".join(name if weight is None else f"{name}:{weight:g}" for name, weight in terms)


class WeightedReward:
    """sum_i weight_i * score_i(image, prompt) over its parts."""

    def __init__(self, parts, name):
        self.parts = parts  # [(weight, scorer)]
        self.name = name

    def score(self, images, prompts):
        check_lengths(images, prompts)
        totals = [0.0] * len(images)
        for weight, scorer in self.parts:
            totals = [total + weight * s for total, s in zip(totals, scorer.score(images, prompts))]
        return totals


def check_reward(config, prompts, spec=None):
    """An unknown reward, a bad weight, or prompts a reward cannot score, fail at start-up."""
    for name, _ in parse_reward(config.eval.reward if spec is None else spec):
        REWARDS[name].check_prompts(prompts)


def reward_settings(config, spec=None):
    """What decides the scores of reward `spec` (default eval.reward): per term, name, weight, model settings."""
    terms = parse_reward(config.eval.reward if spec is None else spec)
    return [[name, weight, *REWARDS[name].settings(config)] for name, weight in terms]


def load_scorer_from_config(config, spec=None):
    """The scorer of `spec` (default: config.eval.reward); its `name` is the reward's label."""
    terms = parse_reward(config.eval.reward if spec is None else spec)
    if terms[0][1] is None:
        return REWARDS[terms[0][0]].from_config(config)
    return WeightedReward([(weight, REWARDS[name].from_config(config)) for name, weight in terms], reward_label(terms))
