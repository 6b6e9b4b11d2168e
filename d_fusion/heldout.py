"""Held-out evaluation: the base model and LoRA checkpoints on a prompt file, same seeds, every reward.

Image j of the evaluation (prompts in file order, `heldout.images_per_prompt` images each) is drawn
by a generator seeded `seed + j` for every model, so the base model and each checkpoint are
compared image by image on the same noise. Images are sampled with the experiment's DDIM settings
and scored with each reward of `heldout.rewards` (default: the training reward), so that a run
trained on one reward can be checked with others for reward hacking. Each model also gets a
diversity figure: per prompt, the mean pairwise distance 1 - cosine of its images' CLIP image
embeddings (the `clip` reward's model), averaged over prompts in the overall row.

Each model's images, scores and settings land under data/<exp_name>/heldout/<prompt set>/<model>/;
images, a reward's scores and the diversity made before with the same settings are reused, so
evaluating a new checkpoint does not sample the base model again, and adding a reward only scores.
"""

import logging
import os

import torch

from d_fusion.checkpoints import checkpoints_at, load_lora, lora_prefix
from d_fusion.datadir import ExperimentDir, mean, read_image, read_json, score_text, write_json
from d_fusion.errors import UserError
from d_fusion.logs import setup_logging
from d_fusion.models import load_models_from_config
from d_fusion.prompts import EpochLayout, read_prompt_file, warn_long_prompts
from d_fusion.rewards import REWARDS, check_reward, load_scorer_from_config, parse_reward, reward_label, reward_settings
from d_fusion.sampling import encode_prompts, negative_conditioning, sample_images
from d_fusion.stages import sampler_settings
from d_fusion.trainer import add_model_lora

log = logging.getLogger(__name__)

BASE = "base"


def prompt_set_name(prompt_file):
    """The results folder of a prompt file: its name without .json."""
    return os.path.splitext(os.path.basename(prompt_file))[0]


def model_name(checkpoint):
    return BASE if checkpoint is None else os.path.basename(os.path.normpath(checkpoint.root))


def heldout_rewards(config):
    """`heldout.rewards` as reward specs: "" -> [eval.reward] (the training reward, a weighted sum too);
    "clip,pickscore" -> each of these rewards."""
    if not config.heldout.rewards.strip():
        return [config.eval.reward]
    names = [name.strip() for name in config.heldout.rewards.split(",")]
    for name in names:
        if name not in REWARDS or names.count(name) > 1:
            raise UserError(
                f"config.heldout.rewards = {config.heldout.rewards!r}: {name!r} is unknown or repeated; pass "
                f"reward names out of {', '.join(REWARDS)}, comma-separated, or leave it empty for the training "
                "reward (config.eval.reward)"
            )
    return names


def diversity(embeddings, samples):
    """{prompt: mean over the pairs of that prompt's images (at least 2) of 1 - cos}; embeddings: (N, D)
    unit rows, samples: the prompt of each row."""
    groups = {}
    for index, prompt in enumerate(samples):
        groups.setdefault(prompt, []).append(index)
    result = {}
    for prompt, indices in groups.items():
        group, n = embeddings[indices], len(indices)  # (n, D)
        distances = 1 - group @ group.T  # (n, n); the diagonal is 0
        result[prompt] = float(distances.sum() - distances.diagonal().sum()) / (n * (n - 1))
    return result


class HeldoutEvaluator:
    """Samples and scores one model after another; SD and the scorers load on first need."""

    def __init__(self, config, prompts):
        self.config = config
        # image j: prompt j // images_per_prompt, its generator seeded seed + j (epoch 0 of this layout)
        self.layout = EpochLayout(tuple(prompts), config.heldout.images_per_prompt, 1, config.seed)
        self.image_prompts = self.layout.sample_prompts  # the prompt of each image
        self.rewards = {reward_label(parse_reward(spec)): spec for spec in heldout_rewards(config)}  # label -> spec
        self._models, self._scorers, self._clip = None, {}, None
        self._has_lora = False

    def models(self):
        if self._models is None:
            self._models = load_models_from_config(self.config)
            warn_long_prompts(self._models.tokenizer, self.image_prompts)
        return self._models

    def scorer(self, label):
        if label not in self._scorers:
            self._scorers[label] = load_scorer_from_config(self.config, self.rewards[label])
        return self._scorers[label]

    def clip(self):
        """The `clip` reward's model, for the diversity's image embeddings."""
        if self._clip is None:
            self._clip = self._scorers.get("clip") or REWARDS["clip"].from_config(self.config)
        return self._clip

    def sampling_settings(self, checkpoint):
        """Everything that decides a model's images (JSON-able, compared with the saved ones)."""
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
            noise_level=sample.noise_level,
            guidance_scale=sample.guidance_scale,
            cfg=sample.cfg,
        )

    def use_weights(self, checkpoint):
        """The UNet (SD 3: the transformer) as the base model (adapters off) or with the checkpoint's LoRA."""
        models = self.models()
        if checkpoint is None:
            if self._has_lora:
                models.denoiser.disable_adapters()
            return
        if not self._has_lora:
            add_model_lora(models, read_json(checkpoint.state_file, "checkpoint state")["lora_rank"], self.config.seed)
            self._has_lora = True
        models.denoiser.enable_adapters()
        load_lora(models.denoiser, checkpoint.lora_weights, lora_prefix(models.family))

    def evaluate(self, model_dir, checkpoint):
        """({reward label: the score of every held-out image, image order}, {prompt: diversity} or None) of a
        model; images, scores and diversity made before with the same settings are reused."""
        sampling = self.sampling_settings(checkpoint)
        record = model_dir.read_settings() or {}
        if record.get("sampling") != sampling:
            model_dir.clear()
            self.use_weights(checkpoint)
            self.sample(model_dir)
            record = dict(sampling=sampling, scores={})
            model_dir.write_settings(record)
        else:
            log.info("%s: reusing its held-out images in %s", model_dir.name, model_dir.root)
        scores = {label: self.scores(model_dir, record, label) for label in self.rewards}
        return scores, self.diversity(model_dir, record)

    @torch.no_grad()
    def sample(self, model_dir):
        models, batch_size, num_images = self.models(), self.config.heldout.batch_size, len(self.image_prompts)
        sampler, negative = sampler_settings(self.config), negative_conditioning(models)
        for start in range(0, num_images, batch_size):
            indices = range(start, min(start + batch_size, num_images))
            prompts = self.image_prompts[indices.start : indices.stop]
            generators = self.layout.generators(0, indices)
            _, images = sample_images(
                models, encode_prompts(models, prompts), negative, generators, sampler, progress=False
            )
            model_dir.images.save_images(indices, images)
            model_dir.images.publish(self.image_prompts[: indices.stop])
            log.info("%s: %d of %d held-out images", model_dir.name, indices.stop, num_images)

    def image_batches(self, model_dir):
        """(PIL images, their prompts) of the model's held-out images, heldout.batch_size at a time."""
        batch_size = self.config.heldout.batch_size
        for start in range(0, len(self.image_prompts), batch_size):
            stop = min(start + batch_size, len(self.image_prompts))
            yield [read_image(model_dir.images.image_path(i)) for i in range(start, stop)], self.image_prompts[start:stop]

    def scores(self, model_dir, record, label):
        """The images' scores by one reward: reused when its settings match the recorded ones."""
        settings, scored = reward_settings(self.config, self.rewards[label]), model_dir.scored(label)
        if record["scores"].get(label) == settings:
            return scored.read_scores()
        scores = []
        for images, prompts in self.image_batches(model_dir):
            scores += self.scorer(label).score(images, prompts)
            scored.write_scores(scores, label)
        record["scores"][label] = settings
        model_dir.write_settings(record)
        log.info("%s: scored with %s, mean %.4f", model_dir.name, label, mean(scores))
        return scores

    def diversity(self, model_dir, record):
        """{prompt: diversity} (None without heldout.diversity), reused when the CLIP model is the recorded one."""
        if not self.config.heldout.diversity:
            return None
        settings = REWARDS["clip"].settings(self.config)
        if record.get("diversity") == settings:
            return read_json(model_dir.diversity_file, "held-out diversity")
        embeddings = torch.cat([self.clip().image_embeddings(images) for images, _ in self.image_batches(model_dir)])
        result = diversity(embeddings.cpu(), self.image_prompts)
        write_json(model_dir.diversity_file, result)
        record["diversity"] = settings
        model_dir.write_settings(record)
        return result


def comparison_table(image_prompts, scores, diversities=None):
    """Per prompt, then "all prompts": per reward, each model's mean score, each checkpoint's mean delta vs
    base and the fraction of images (same seed) it scores higher than base; then each model's diversity.

    image_prompts: the prompt of each image; scores: {reward label: {model: [score of each image]}}, base
    first; diversities: {model: {prompt: diversity}} or None (no diversity columns).
    """
    groups = {}
    for index, prompt in enumerate(image_prompts):
        groups.setdefault(prompt, []).append(index)
    groups["all prompts"] = list(range(len(image_prompts)))
    rows = []
    for position, (prompt, indices) in enumerate(groups.items()):
        overall = position == len(groups) - 1  # "all prompts"
        row = dict(prompt=prompt, images=len(indices))
        for label, by_model in scores.items():
            base = [by_model[BASE][i] for i in indices]
            for name, model_scores in by_model.items():
                row[f"{label}: {name}"] = mean([model_scores[i] for i in indices])
            for name, model_scores in by_model.items():
                if name != BASE:
                    ours = [model_scores[i] for i in indices]
                    row[f"{label}: {name} - base"] = mean([a - b for a, b in zip(ours, base)])
                    row[f"{label}: {name} wins"] = mean([float(a > b) for a, b in zip(ours, base)])
        for name, per_prompt in (diversities or {}).items():
            row[f"diversity: {name}"] = mean(list(per_prompt.values())) if overall else per_prompt[prompt]
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
    if heldout.diversity and heldout.images_per_prompt < 2:
        raise UserError(
            "config.heldout.diversity needs at least 2 images per prompt (config.heldout.images_per_prompt); "
            "pass --config.heldout.diversity=False to evaluate with one"
        )


def run_heldout(config):
    """run_heldout.py: evaluate the base model and the checkpoints on the held-out prompts; returns the table."""
    setup_logging()
    check_heldout_config(config)
    experiment = ExperimentDir(config.save_path, config.exp_name)
    prompts = read_prompt_file(config.heldout.prompt_file)
    for spec in heldout_rewards(config):
        check_reward(config, prompts, spec)
    checkpoint = config.heldout.checkpoint
    checkpoints = checkpoints_at(checkpoint, "heldout.checkpoint") if checkpoint else []
    results = experiment.heldout(prompt_set_name(config.heldout.prompt_file))
    evaluator = HeldoutEvaluator(config, prompts)
    scores, diversities = {label: {} for label in evaluator.rewards}, {}
    for checkpoint in [None, *checkpoints]:
        name = model_name(checkpoint)
        model_scores, diversities[name] = evaluator.evaluate(results.model(name), checkpoint)
        for label, values in model_scores.items():
            scores[label][name] = values
    rows = comparison_table(evaluator.image_prompts, scores, diversities if config.heldout.diversity else None)
    results.write_table(rows, list(evaluator.rewards))
    print(format_table(rows))
    log.info("held-out table: %s (and .json)", results.table_csv)
    return rows
