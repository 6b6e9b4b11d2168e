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

from d_fusion.checkpoints import load_lora
from d_fusion.datadir import CheckpointDir, ExperimentDir, checkpoints_in, read_json, write_image
from d_fusion.errors import UserError
from d_fusion.logs import setup_logging
from d_fusion.models import load_models_from_config
from d_fusion.prompts import epoch_samples, read_prompt_file, warn_long_prompts
from d_fusion.sampling import decode_images, encode_prompts, sample_generators, sample_trajectories
from d_fusion.rewards import check_reward, load_scorer_from_config, reward_settings
from d_fusion.training import add_lora

log = logging.getLogger(__name__)

BASE = "base"


def prompt_set_name(prompt_file):
    """The results folder of a prompt file: its name without .json."""
    return os.path.splitext(os.path.basename(prompt_file))[0]


def checkpoints_to_evaluate(path):
    """`heldout.checkpoint`: "" -> none; a checkpoint folder -> it; a folder of checkpoints -> each, oldest first."""
    if not path:
        return []
    if CheckpointDir(path).is_checkpoint():
        return [CheckpointDir(path)]
    found = checkpoints_in(path)
    if not found:
        raise UserError(
            f"config.heldout.checkpoint = {path!r} is neither a checkpoint folder nor a folder holding "
            "checkpoint_<k>/ folders: pass e.g. data/<exp_name>/checkpoints/checkpoint_3 or data/<exp_name>/checkpoints"
        )
    return found


def model_name(checkpoint):
    return BASE if checkpoint is None else os.path.basename(os.path.normpath(checkpoint.root))


class HeldoutEvaluator:
    """Samples and scores one model after another; SD and the scorer load on first need."""

    def __init__(self, config, prompts):
        self.config = config
        self.samples = epoch_samples(prompts, config.heldout.images_per_prompt, 1)  # prompt of each image
        self._models = self._scorer = None
        self._has_lora = False

    def models(self):
        if self._models is None:
            self._models = load_models_from_config(self.config)
            warn_long_prompts(self._models.tokenizer, self.samples)
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
            prompts=self.samples,
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
            add_lora(unet, read_json(checkpoint.state_file, "checkpoint state")["lora_rank"])
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
        models, sample, batch_size = self.models(), self.config.sample, self.config.heldout.batch_size
        num_images = len(self.samples)
        negative_embeds = encode_prompts(models, [""])
        scores = []
        for start in range(0, num_images, batch_size):
            indices = range(start, min(start + batch_size, num_images))
            prompts = self.samples[indices.start : indices.stop]
            trajectories = sample_trajectories(
                models,
                encode_prompts(models, prompts),
                negative_embeds.expand(len(prompts), -1, -1),
                sample_generators(self.config.seed, 0, num_images, indices),  # seed + j
                sample.num_steps,
                sample.eta,
                sample.guidance_scale,
                sample.cfg,
                progress=False,
            )
            images = decode_images(models, trajectories.latents[:, -1])  # (B, H, W, 3) uint8
            for row, index in enumerate(indices):
                write_image(model_dir.images.image_path(index), images[row])
            scores += self.scorer().score([Image.fromarray(image) for image in images], prompts)
            model_dir.images.publish(self.samples[: indices.stop])
            model_dir.images.write_scores(scores)
            log.info("%s: %d of %d held-out images", model_dir.name, indices.stop, num_images)
        return scores


def _mean(values):
    return sum(values) / len(values)


def comparison_table(samples, scores):
    """Per prompt, then "all prompts": each model's mean score; each checkpoint's mean delta vs base and
    the fraction of images (same seed) it scores higher than base.

    samples: the prompt of each image; scores: {model: [score of each image]}, base first.
    """
    groups = {}
    for index, prompt in enumerate(samples):
        groups.setdefault(prompt, []).append(index)
    groups["all prompts"] = list(range(len(samples)))
    rows = []
    for prompt, indices in groups.items():
        base = [scores[BASE][i] for i in indices]
        row = dict(prompt=prompt, images=len(indices))
        for name, model_scores in scores.items():
            row[name] = _mean([model_scores[i] for i in indices])
        for name, model_scores in scores.items():
            if name != BASE:
                ours = [model_scores[i] for i in indices]
                row[f"{name} - base"] = _mean([a - b for a, b in zip(ours, base)])
                row[f"{name} wins"] = _mean([float(a > b) for a, b in zip(ours, base)])
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
            value = f"{value:+.4f}" if column.endswith(" - base") else f"{value:.4f}"
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
    checkpoints = checkpoints_to_evaluate(config.heldout.checkpoint)
    results = experiment.heldout(prompt_set_name(config.heldout.prompt_file))
    evaluator = HeldoutEvaluator(config, prompts)
    scores = {}
    for checkpoint in [None, *checkpoints]:
        name = model_name(checkpoint)
        scores[name] = evaluator.evaluate(results.model(name), checkpoint)
    rows = comparison_table(evaluator.samples, scores)
    results.write_table(rows)
    print(format_table(rows))
    log.info("held-out table: %s (and .json)", results.table_csv)
    return rows
