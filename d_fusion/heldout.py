"""Held-out evaluation: scores (`config.eval.reward`) of the base model and of LoRA checkpoints on a prompt file, same seeds.

Image j of the evaluation (prompts in file order, `heldout.images_per_prompt` images each) is drawn
by a generator seeded `seed + j` for every model, so the base model and each checkpoint are
compared image by image on the same noise. Images are sampled with the experiment's DDIM settings
and scored with its reward. Each model's images, scores and settings land under
data/<exp_name>/heldout/<prompt set>/<model>/; a model evaluated before with the same settings is
reused, so evaluating a new checkpoint does not sample the base model again.
"""

import logging
import os

import torch
from PIL import Image

from d_fusion.checkpoints import checkpoints_at, load_lora
from d_fusion.datadir import ExperimentDir, mean, read_json, score_text
from d_fusion.errors import UserError
from d_fusion.logs import setup_logging
from d_fusion.models import load_models_from_config
from d_fusion.prompts import EpochLayout, read_prompt_file, warn_long_prompts
from d_fusion.sampling import encode_prompts, negative_conditioning, sample_images
from d_fusion.scoring import check_reward, load_scorer_from_config, reward_settings
from d_fusion.stages import sampler_settings
from d_fusion.trainer import add_lora

log = logging.getLogger(__name__)

BASE = "base"


def prompt_set_name(prompt_file):
    """The results folder of a prompt file: its name without .json."""
    return os.path.splitext(os.path.basename(prompt_file))[0]


def model_name(checkpoint):
    return BASE if checkpoint is None else os.path.basename(os.path.normpath(checkpoint.root))


class HeldoutEvaluator:
    """Samples and scores one model after another; SD and the scorer load on first need."""

    def __init__(self, config, prompts):
        self.config = config
        # image j: prompt j // images_per_prompt, its generator seeded seed + j (epoch 0 of this layout)
        self.layout = EpochLayout(tuple(prompts), config.heldout.images_per_prompt, 1, config.seed)
        self.image_prompts = self.layout.sample_prompts  # the prompt of each image
        self._models = self._scorer = None
        self._has_lora = False

    def models(self):
        if self._models is None:
            self._models = load_models_from_config(self.config)
            warn_long_prompts(self._models.tokenizer, self.image_prompts)
        return self._models

    def scorer(self):
        if self._scorer is None:
            self._scorer = load_scorer_from_config(self.config)
        return self._scorer

    def settings(self, checkpoint):
        """Everything that decides a model's images and scores (JSON-able, compared with the saved ones)."""
        config, sample = self.config, self.config.sample
        return dict(
            model=config.pretrained.model,
            revision=config.pretrained.revision,
            mixed_precision=config.mixed_precision,
            checkpoint=None if checkpoint is None else os.path.abspath(checkpoint.root),
            checkpoint_time=None if checkpoint is None else os.path.getmtime(checkpoint.lora_weights),
            prompts=self.image_prompts,
            seed=config.seed,
            num_steps=sample.num_steps,
            eta=sample.eta,
            guidance_scale=sample.guidance_scale,
            cfg=sample.cfg,
            scorer=reward_settings(config),
        )

    def use_weights(self, checkpoint):
        """The UNet as the base model (adapters off) or with the checkpoint's LoRA."""
        unet = self.models().unet
        if checkpoint is None:
            if self._has_lora:
                unet.disable_adapters()
            return
        if not self._has_lora:
            add_lora(unet, read_json(checkpoint.state_file, "checkpoint state")["lora_rank"], self.config.seed)
            self._has_lora = True
        unet.enable_adapters()
        load_lora(unet, checkpoint.lora_weights)

    def evaluate(self, model_dir, checkpoint):
        """The score (config.eval.reward) of every held-out image of a model (image order), reused when its settings match."""
        settings = self.settings(checkpoint)
        if model_dir.read_settings() == settings:
            log.info("%s: reusing its held-out results in %s", model_dir.name, model_dir.root)
            return model_dir.images.read_scores()
        model_dir.clear()
        self.use_weights(checkpoint)
        scores = self.sample_and_score(model_dir)
        model_dir.write_settings(settings)
        return scores

    @torch.no_grad()
    def sample_and_score(self, model_dir):
        models, batch_size, num_images = self.models(), self.config.heldout.batch_size, len(self.image_prompts)
        sampler, negative = sampler_settings(self.config), negative_conditioning(models)
        scores = []
        for start in range(0, num_images, batch_size):
            indices = range(start, min(start + batch_size, num_images))
            prompts = self.image_prompts[indices.start : indices.stop]
            generators = self.layout.generators(0, indices)
            _, images = sample_images(
                models, encode_prompts(models, prompts), negative, generators, sampler, progress=False
            )
            model_dir.images.save_images(indices, images)
            scores += self.scorer().score([Image.fromarray(image) for image in images], prompts)
            model_dir.images.publish(self.image_prompts[: indices.stop])
            model_dir.images.write_scores(scores)
            log.info("%s: %d of %d held-out images", model_dir.name, indices.stop, num_images)
        return scores


def comparison_table(image_prompts, scores):
    """Per prompt, then "all prompts": each model's mean score; each checkpoint's mean delta vs base and
    the fraction of images (same seed) it scores higher than base.

    image_prompts: the prompt of each image; scores: {model: [score of each image]}, base first.
    """
    groups = {}
    for index, prompt in enumerate(image_prompts):
        groups.setdefault(prompt, []).append(index)
    groups["all prompts"] = list(range(len(image_prompts)))
    rows = []
    for prompt, indices in groups.items():
        base = [scores[BASE][i] for i in indices]
        row = dict(prompt=prompt, images=len(indices))
        for name, model_scores in scores.items():
            row[name] = mean([model_scores[i] for i in indices])
        for name, model_scores in scores.items():
            if name != BASE:
                ours = [model_scores[i] for i in indices]
                row[f"{name} - base"] = mean([a - b for a, b in zip(ours, base)])
                row[f"{name} wins"] = mean([float(a > b) for a, b in zip(ours, base)])
        rows.append(row)
    return rows


def format_table(rows, prompt_width=40):
    """The table as aligned text for the terminal."""
    columns = list(rows[0])
    widths = [prompt_width] + [max(len(c), 8) for c in columns[1:]]

    def cell(column, value, width):
        if column == "prompt":
            return (value if len(value) <= width else value[: width - 1] + "~").ljust(width)
        if isinstance(value, float):
            value = score_text(value, signed=column.endswith(" - base"))
        return str(value).rjust(width)

    lines = ["  ".join(c.ljust(w) if c == "prompt" else c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(c, row[c], w) for c, w in zip(columns, widths)) for row in rows]
    return "\n".join(lines)


def check_heldout_config(config):
    heldout = config.heldout
    if heldout.images_per_prompt < 1 or heldout.batch_size < 1:
        raise UserError("config.heldout.images_per_prompt and config.heldout.batch_size must be >= 1")


def run_heldout(config):
    """run_heldout.py: evaluate the base model and the checkpoints on the held-out prompts; returns the table."""
    setup_logging()
    check_heldout_config(config)
    experiment = ExperimentDir(config.save_path, config.exp_name)
    prompts = read_prompt_file(config.heldout.prompt_file)
    check_reward(config, prompts)
    checkpoints = checkpoints_at(config.heldout.checkpoint, "heldout.checkpoint") if config.heldout.checkpoint else []
    results = experiment.heldout(prompt_set_name(config.heldout.prompt_file))
    evaluator = HeldoutEvaluator(config, prompts)
    scores = {}
    for checkpoint in [None, *checkpoints]:
        name = model_name(checkpoint)
        scores[name] = evaluator.evaluate(results.model(name), checkpoint)
    rows = comparison_table(evaluator.image_prompts, scores)
    results.write_table(rows)
    print(format_table(rows))
    log.info("held-out table: %s (and .json)", results.table_csv)
    return rows
