"""The loop's stages (docs/METHOD.md §1): sample -> score -> pair and fuse -> train, as publishing steps.

Each stage reads its inputs from data/<exp_name>/epoch<k>/ and publishes its outputs there as they
are made (`publish_in_rounds`): a restarted run reuses what is published and goes on from there,
and a published unit with a missing or damaged file is made again from its seeds. The algorithms
(sampling, fusion, the trainer, the rewards) never see the config or a folder: this module builds
their settings from the config (`Run`) and hands them data.

With K processes (`accelerate launch`), process r makes unit r of each round of K units; the main
process publishes the round (see d_fusion/distributed.py).
"""

import importlib
import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from d_fusion import distributed
from d_fusion.checkpoints import checkpoints_at, resume, save_epoch_checkpoint
from d_fusion.cli import config_file
from d_fusion.datadir import damaged_units, mean, read_image, write_image
from d_fusion.errors import UserError
from d_fusion.families import Conditioning
from d_fusion.fusion import FusionBatch, FusionSettings
from d_fusion.injection import injection_from_config
from d_fusion.masks import item_selection, load_objects, mask_picture
from d_fusion.objectives import per_prompt_advantages
from d_fusion.pairing import check_samples_per_prompt, pair_samples
from d_fusion.prompts import EpochLayout
from d_fusion.rewards import load_scorer_from_config, parse_reward, reward_label
from d_fusion.sampling import (
    SamplerSettings,
    Trajectories,
    decode_images,
    encode_prompts,
    negative_conditioning,
    sample_images,
)
from d_fusion.trainer import PreferencePairs, ScoredSamples, Trainer

log = logging.getLogger(__name__)

MASK_IMAGES = ("all", "last", "none")
ALGORITHMS = ("dpo", "ddpo", "dpok")
PREFERRED = ("target", "reference")  # train.preferred: what DPO prefers over the base


# ---------------------------------------------------------------- settings, built once from the config


def sampler_settings(config, cfg=None):
    """The sampling's SamplerSettings; `cfg` overrides sample.cfg (training's train.cfg)."""
    sample = config.sample
    return SamplerSettings(
        sample.num_steps, sample.eta, sample.guidance_scale, sample.cfg if cfg is None else cfg, sample.noise_level
    )


def epoch_layout(config, prompts):
    return EpochLayout(tuple(prompts), config.sample.batch_size, config.sample.num_batches_per_epoch, config.seed)


def fusion_settings(config, models):
    """The fusion's settings, inject_l's block ranges resolved against the UNet's blocks (a UserError when
    a numbered range goes beyond them; SD 3 fuses fusion.blocks instead)."""
    return FusionSettings(
        models.family.injection_on_blocks(models, injection_from_config(config), config.fusion.mask_resolution),
        sampler_settings(config),
        mask_resolution=config.fusion.mask_resolution,
        use_mask=config.fusion.use_mask,
        base_pass=config.fusion.base_masks and config.fusion.use_mask,
        one_call=config.fusion.one_call,
        blocks=config.fusion.blocks,
        mask_blocks=config.fusion.mask_blocks,
    )


@dataclass
class Run:
    """What the stages of every epoch share, built once at start-up."""

    config: object
    models: object  # StableDiffusion, sd3.StableDiffusion3
    experiment: object  # ExperimentDir
    layout: EpochLayout
    objects: dict  # {prompt: PromptObjects}, from check_fusion_inputs
    sampler: SamplerSettings
    fusion: FusionSettings
    negative: Conditioning  # one row: CFG's unconditional conditioning

    @staticmethod
    def build(config, models, experiment, prompts, objects):
        return Run(
            config, models, experiment, epoch_layout(config, prompts), objects, sampler_settings(config),
            fusion_settings(config, models), negative_conditioning(models),
        )


# ---------------------------------------------------------------- start-up checks


def require(package, setting):
    """The optional `package` that `config.<setting>` asks for, or a UserError saying how to get it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"config.{setting} is set but {package} is not installed: pip install {package}, "
            f"or set --config.{setting} False"
        ) from None


def check_fusion_inputs(config, prompts):
    """Every fusion input checked at start-up, before models load; returns {prompt: PromptObjects}."""
    check_samples_per_prompt(config.sample.batch_size, config.sample.num_batches_per_epoch)
    if config.fusion.batch_size < 2:
        raise UserError(
            f"config.fusion.batch_size = {config.fusion.batch_size}: a fused pass makes at least 2 targets"
        )
    if config.fusion.mask_images not in MASK_IMAGES:
        raise UserError(f"config.fusion.mask_images = {config.fusion.mask_images!r}; use one of {MASK_IMAGES}")
    injection_from_config(config)
    return load_objects(config, prompts)


def check_train_config(config):
    """Fail at start-up on training settings that cannot work."""
    train = config.train
    if train.algorithm not in ALGORITHMS:
        raise UserError(f"config.train.algorithm = {train.algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if train.preferred not in PREFERRED:
        raise UserError(f"config.train.preferred = {train.preferred!r}; use one of {', '.join(PREFERRED)}")
    if train.stat_buffer and train.stat_min_count > train.stat_buffer:
        raise UserError(
            f"config.train.stat_min_count = {train.stat_min_count} exceeds config.train.stat_buffer = "
            f"{train.stat_buffer}: the per-prompt buffer would never be used"
        )
    if not 0 < train.eps < 1:
        raise UserError(f"config.train.eps = {train.eps}: the ratio clip must lie in (0, 1)")
    if int(config.sample.num_steps * train.timestep_fraction) < 1:
        raise UserError("config.train.timestep_fraction leaves no training timestep: raise it (at most 1.0)")
    if min(train.batch_size, train.gradient_accumulation_steps, train.num_inner_epochs, train.save_interval) < 1:
        raise UserError(
            "config.train.batch_size, gradient_accumulation_steps, num_inner_epochs and save_interval must be >= 1"
        )


def check_training_inputs(config):
    """Training's start-up checks, before any model loads: settings, optional packages, resume_from."""
    check_train_config(config)
    if config.train.use_8bit_adam:
        require("bitsandbytes", "train.use_8bit_adam")
    if config.train.tensorboard:
        require("tensorboard", "train.tensorboard")
    if config.resume_from:
        checkpoints_at(config.resume_from, "resume_from")


# ---------------------------------------------------------------- publishing


def publish_in_rounds(units, work, publish, desc):
    """Make `units` in rounds of one per process: each process calls work(unit) on its unit of the round,
    then the main process calls publish(round_units, results), the results of the round's units in
    order, while the others wait for it."""
    for round_units, unit in tqdm(distributed.rounds(units), desc=desc, unit="round", disable=not distributed.is_main()):
        result = work(unit) if unit is not None else None
        results = distributed.gather(result)[: len(round_units)]
        distributed.on_main(publish, round_units, results)


def units_to_make(files_of, num_published, num_total, size, repair_message):
    """(start, stop) of the units of `size` indices still to make: the published units with a missing
    or damaged file (each logged as repair_message % (first, last) and the reason), then every unit
    after the published ones."""
    damaged = distributed.from_main(damaged_units, files_of, num_published, size)
    repairs = []
    for start, reason in damaged:
        repairs.append((start, min(start + size, num_published)))
        log.warning(repair_message + ": %s", start, repairs[-1][1] - 1, reason)
    return repairs + [(start, min(start + size, num_total)) for start in range(num_published, num_total, size)]


def publish_listing(image_set, prompts, num_published):
    """publish(round_units, results) that lists the image set's images up to the round's last unit
    (a round of repairs lists nothing new)."""

    def publish(round_units, results):
        image_set.publish(prompts[: max(num_published, round_units[-1][1])])

    return publish


def check_listing(image_set, prompts, remedy):
    """The prompts the set has published, which must begin this run's `prompts`."""
    published = image_set.published_prompts()
    if published != prompts[: len(published)]:
        raise UserError(f"{image_set.prompts_file} lists other prompts than this run makes: {remedy}")
    return published


# ---------------------------------------------------------------- 1-2. sampling


def embed_prompts(models, prompts):
    """The conditioning (N rows) of a list of prompts, each distinct prompt encoded once."""
    distinct = list(dict.fromkeys(prompts))
    table = encode_prompts(models, distinct)
    return table[[distinct.index(p) for p in prompts]]


def samples_per_call(sample):
    """Samples per sampling UNet call: `sample.compute_batch_size` rounded down to whole batches, at least one."""
    return max(1, sample.compute_batch_size // sample.batch_size) * sample.batch_size


def sample_epoch(run, epoch):
    """Sample every batch of the epoch not yet published, `samples_per_call` samples (whole batches, of one
    or more prompts) in each UNet call; returns the number of samples."""
    layout, images = run.layout, run.experiment.epoch(epoch).sampled
    prompts = layout.sample_prompts
    remedy = "use another exp_name, or the prompt file and batch sizes of the earlier run"
    published = check_listing(images, prompts, remedy)
    if published:
        log.info("epoch %d: reusing %d published samples", epoch, len(published))
    units = units_to_make(
        images.files, len(published), layout.num_samples, samples_per_call(run.config.sample),
        f"epoch {epoch}: regenerating samples %d-%d from their seeds",
    )
    publish_in_rounds(
        units, lambda unit: sample_unit(run, epoch, unit), publish_listing(images, prompts, len(published)),
        f"epoch {epoch} sampling",
    )
    return layout.num_samples


def sample_unit(run, epoch, unit):
    """Sample the samples (start, stop) (whole batches) in one batch and write their images and trajectories.
    Each sample draws its noise from its own generator, so it is the same in any unit."""
    indices = range(*unit)
    images = run.experiment.epoch(epoch).sampled
    conditioning = embed_prompts(run.models, run.layout.sample_prompts[slice(*unit)])
    generators = run.layout.generators(epoch, indices)
    trajectories, pictures = sample_images(
        run.models, conditioning, run.negative, generators, run.sampler, progress=distributed.is_main()
    )
    images.save_images(indices, pictures)
    images.save_trajectories(indices, trajectories)


# ---------------------------------------------------------------- 3. scoring


def saved_scores(image_set, num_published, reward):
    """The set's saved scores; more scores than published images means they belong to other images,
    scores of another reward than `reward` (its label) to another experiment's settings."""
    scored_by = image_set.scored_by()
    if scored_by not in (None, reward):
        raise UserError(
            f"{image_set.scores_file} holds scores of the reward {scored_by!r}, but this run scores with {reward!r} "
            "(config.eval.reward): run the sampler and run_eval.py with the experiment's reward, or use a new exp_name"
        )
    scores = image_set.read_scores()
    if len(scores) > num_published:
        raise UserError(
            f"{image_set.scores_file} holds {len(scores)} scores but {image_set.prompts_file} lists only "
            f"{num_published} images: the scores belong to an earlier run; move the eval/ folder aside and rerun"
        )
    return scores


def published_and_scored(image_set, reward):
    """(the listed prompts, their saved scores), as the main process reads them: every process of a
    run must agree on what is left to score even while run_eval.py writes the same files."""

    def read():
        prompts = image_set.published_prompts()
        return prompts, saved_scores(image_set, len(prompts), reward)

    return distributed.from_main(read)


def prompt_history(experiment, epoch, scores):
    """Per prompt, the scores of `images/` in every epoch up to `epoch` (whose scores so far are `scores`)."""
    history = {}
    for k in experiment.epochs():
        if k > epoch:
            break
        sampled = experiment.epoch(k).sampled
        epoch_scores = scores if k == epoch else sampled.read_scores()
        per_prompt = {}
        for prompt, score in zip(sampled.published_prompts(), epoch_scores):
            per_prompt.setdefault(prompt, []).append(score)
        for prompt, prompt_scores in per_prompt.items():
            history.setdefault(prompt, []).append(dict(epoch=k, mean=mean(prompt_scores), scores=prompt_scores))
    return history


def save_scores(experiment, epoch, image_set, scores, reward):
    epoch_dir = experiment.epoch(epoch)
    # the history first: the scores file is what marks a batch done, so a crash in between
    # only makes the scorer redo that batch and rewrite both
    if image_set.name == epoch_dir.sampled.name:
        epoch_dir.write_prompt_history(prompt_history(experiment, epoch, scores))
    image_set.write_scores(scores, reward)


def score_chunk(scorer, image_set, prompts, chunk):
    """Scores of the listed images chunk = (start, stop)."""
    images = [read_image(image_set.image_path(i)) for i in range(*chunk)]
    return scorer.score(images, prompts[slice(*chunk)])


def score_new(scorer, experiment, epoch, image_set, batch_size, batch_delay=0.0):
    """Score the images the set's manifest lists and its scores lack, in index order; returns how many.

    Images are scored in fixed chunks, images [k * batch_size, (k + 1) * batch_size), so that the
    same images always meet in the same batch, however the publishing and the polling fall (a
    model's outputs depend on its batch in the last bits): a chunk scored while only partly listed
    is scored again, whole, when more of it is listed. The main process saves each round's scores.
    """
    prompts, scores = published_and_scored(image_set, scorer.name)
    first = len(scores)
    if first == len(prompts):
        return 0
    first_chunk = first // batch_size * batch_size
    chunks = [(start, min(start + batch_size, len(prompts))) for start in range(first_chunk, len(prompts), batch_size)]

    def publish(round_chunks, results):
        nonlocal scores
        scores = scores[: round_chunks[0][0]] + [s for part in results for s in part]  # index order
        save_scores(experiment, epoch, image_set, scores, scorer.name)
        log.info("epoch %d %s: scored %d-%d (%d listed)", epoch, image_set.name, round_chunks[0][0], len(scores) - 1, len(prompts))
        time.sleep(batch_delay)

    work = lambda chunk: score_chunk(scorer, image_set, prompts, chunk)  # noqa: E731
    publish_in_rounds(chunks, work, publish, f"epoch {epoch} scoring {image_set.name}")
    return len(prompts) - first


def score_pending(scorer, experiment, batch_size, batch_delay=0.0):
    """One pass over every epoch and image set, in order; returns the number of images scored."""
    return sum(
        score_new(scorer, experiment, k, image_set, batch_size, batch_delay)
        for k in experiment.epochs()
        for image_set in experiment.epoch(k).image_sets
    )


class ScoreCollector:
    """The sampler's side: an image set's scores, computed in this process (`eval.inline`) or awaited."""

    def __init__(self, config, experiment):
        self.config = config
        self.experiment = experiment
        self.reward = reward_label(parse_reward(config.eval.reward))  # what the scores files must record
        self._scorer = None

    def scorer(self):
        if self._scorer is None:
            self._scorer = load_scorer_from_config(self.config)
        return self._scorer

    def collect(self, epoch, image_set):
        """The scores of every image the set has published (list of floats, index order).

        Inline scoring is split between the processes of an `accelerate launch` run; only the
        main process waits for run_eval.py, and sends the scores to the others.
        """
        ev = self.config.eval
        prompts, scores = published_and_scored(image_set, self.reward)
        count = len(prompts)
        if ev.inline and len(scores) < count:
            score_new(self.scorer(), self.experiment, epoch, image_set, ev.batch_size, ev.debug_batch_delay)
        return distributed.from_main(self.wait, epoch, image_set, count)

    def wait(self, epoch, image_set, count):
        """Poll the scores file until it holds `count` scores, saying once how to start a scorer if none comes."""
        ev = self.config.eval
        scores = saved_scores(image_set, count, self.reward)
        if len(scores) == count:
            return scores
        log.info("epoch %d: waiting for run_eval.py to score %s (%d of %d scored)", epoch, image_set.name, len(scores), count)
        last_progress, warned = time.monotonic(), False
        with tqdm(total=count, initial=len(scores), desc=f"epoch {epoch} {image_set.name} scored", unit="image") as bar:
            while len(scores) < count:
                time.sleep(ev.poll_interval)
                new_scores = saved_scores(image_set, count, self.reward)
                if len(new_scores) > len(scores):
                    bar.update(len(new_scores) - len(scores))
                    last_progress = time.monotonic()
                elif not warned and time.monotonic() - last_progress >= ev.no_scorer_timeout:
                    log.warning(
                        "no new scores for %.0f s. Is the scorer running? Start it in another terminal with the same "
                        "exp_name and config: python run_eval.py --config %s --config.exp_name %s (and this run's "
                        "eval.* options), or rerun this command with --config.eval.inline=True to score in this "
                        "process",
                        ev.no_scorer_timeout,
                        config_file(),
                        self.config.exp_name,
                    )
                    warned = True
                scores = new_scores
        return scores


# ---------------------------------------------------------------- 4-5. pairing and fusion


def fuse_epoch(run, epoch, scores):
    """Pair the epoch's samples by score and make every target not yet published (docs/METHOD.md §4, §6).

    scores: the samples' scores (image order). Targets are published chunk by chunk in
    injected_prompt.json; a restarted run reuses those already published. Returns the pairs.
    """
    epoch_dir, sample_prompts = run.experiment.epoch(epoch), run.layout.sample_prompts
    pairs = pair_samples(sample_prompts, scores, run.layout.samples_per_prompt)
    pair_indices = [(p.base, p.reference) for p in pairs]
    target_prompts = [sample_prompts[p.base] for p in pairs]
    published = check_listing(epoch_dir.injected, target_prompts, "move the epoch's injected files aside and rerun")
    if epoch_dir.read_injected_map()[: len(published)] != pair_indices[: len(published)]:
        raise UserError(
            f"{epoch_dir.injected_map_file} pairs other samples than these scores do: the scores changed since "
            "the targets were made; move the epoch's injected files aside and rerun"
        )
    distributed.on_main(epoch_dir.write_injected_map, pair_indices)
    if published:
        log.info("epoch %d: reusing %d published targets", epoch, len(published))
    else:  # scores left from targets that were moved aside would be taken for the new ones'
        distributed.on_main(epoch_dir.injected.forget_scores)
    chunk = run.config.fusion.batch_size // 2 * 2  # whole references: each guides two targets in a row
    chunks = units_to_make(
        epoch_dir.target_files, len(published), len(pairs), chunk, f"epoch {epoch}: fusing targets %d-%d again"
    )
    publish_in_rounds(
        chunks,
        lambda c: fuse_pairs(run, epoch, pairs[slice(*c)]),
        publish_listing(epoch_dir.injected, target_prompts, len(published)),
        f"epoch {epoch} fusion",
    )
    log.info("epoch %d: %d targets in %s", epoch, len(pairs), epoch_dir.injected.folder)
    return pairs


def fusion_batch(run, epoch, pairs):
    """The FusionBatch of `pairs` (whole references: each reference's pairs are together)."""
    sample_prompts, models = run.layout.sample_prompts, run.models
    references = list(dict.fromkeys(p.reference for p in pairs))
    prompts = [sample_prompts[r] for r in references]
    reference_conditioning = encode_prompts(models, prompts)
    weights, thresholds = item_selection(models.tokenizer, prompts, run.objects, reference_conditioning.num_tokens)
    return FusionBatch(
        reference_conditioning,
        run.layout.generators(epoch, references),
        run.layout.generators(epoch, [p.base for p in pairs]),
        torch.tensor([references.index(p.reference) for p in pairs]),
        weights,
        thresholds,
    ), references


def fuse_pairs(run, epoch, pairs):
    """Make the targets of `pairs` and write them, copies of their references and bases, and the masks."""
    epoch_dir, models, sample_prompts = run.experiment.epoch(epoch), run.models, run.layout.sample_prompts
    batch, references = fusion_batch(run, epoch, pairs)
    fused = models.family.fused_sampling(models, batch, run.negative, run.fusion)
    targets = [p.target for p in pairs]
    epoch_dir.injected.save_images(targets, decode_images(models, fused.targets.latents[:, -1]))
    epoch_dir.injected.save_trajectories(targets, fused.targets)
    for pair in pairs:
        epoch_dir.save_pair_copies(pair.target, pair.base, pair.reference)
    steps = {"all": range(run.sampler.num_steps), "last": [run.sampler.num_steps - 1], "none": []}
    steps = steps[run.config.fusion.mask_images]
    if fused.reference_masks is not None:
        counts = [len(run.objects[sample_prompts[r]].items) for r in references]
        save_mask_pictures(epoch_dir, references, fused.reference_masks, counts, steps, models.resolution)
    if fused.base_masks is not None:
        counts = [len(run.objects[sample_prompts[p.base]].items) for p in pairs]
        save_mask_pictures(epoch_dir, [p.base for p in pairs], fused.base_masks, counts, steps, models.resolution)


def save_mask_pictures(epoch_dir, sample_indices, masks, counts, steps, resolution):
    """masks: (B, T, I, g, g) of the samples `sample_indices`; counts: objects of each sample's prompt."""
    for row, index in enumerate(sample_indices):
        for step in steps:
            for item in range(counts[row]):
                write_image(epoch_dir.mask_path(index, item, step), mask_picture(masks[row, step, item], resolution))


# ---------------------------------------------------------------- 6. training


def make_optimizer(config, params):
    train = config.train
    if train.use_8bit_adam:
        optimizer_class = require("bitsandbytes", "train.use_8bit_adam").optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )


def check_stochastic_steps(config, family):
    """Training needs the family's steps to have a log-probability: sample.eta (SD 3: sample.noise_level) > 0."""
    level = family.solver().level
    if config.sample[level] <= 0:
        raise UserError(
            f"config.sample.{level} must be > 0 to train on {family.name}: with {level} = 0 its steps have no "
            "log-probability"
        )


def make_trainer(config, models):
    """The Trainer of `config` (LoRA added to models.unet, or SD 3's transformer, in place)."""
    check_train_config(config)
    check_stochastic_steps(config, models.family)
    return Trainer(
        models,
        config.train,
        sampler_settings(config, cfg=config.train.cfg),
        config.seed,
        config.mixed_precision,
        lambda params: make_optimizer(config, params),
    )


def complete_scores(image_set, count):
    scores = image_set.read_scores()
    if len(scores) != count:
        raise UserError(
            f"{image_set.scores_file} holds {len(scores)} of {count} scores: the epoch was not scored to the end"
        )
    return scores


def load_pairs(models, epoch_dir, preferred="target"):
    """The epoch's (target, base) pairs, from eval/injected_map.json and both trajectory folders; with
    preferred = "reference", the (reference, base) pairs instead (the paper's visually inconsistent
    baseline: an ordinary well-aligned sample preferred over a poorly aligned one)."""
    pairs = epoch_dir.read_injected_map()  # [(base index, reference index)] in target order
    prompts = epoch_dir.injected.published_prompts()
    if not pairs or len(prompts) != len(pairs):
        raise UserError(
            f"{epoch_dir.root}: {len(prompts)} targets published for {len(pairs)} pairs; "
            "the fusion stage did not finish, rerun to complete it"
        )
    if preferred == "target":
        winners = epoch_dir.injected.load_trajectories(range(len(pairs)))
    else:
        winners = epoch_dir.sampled.load_trajectories([reference for _, reference in pairs])
    bases = epoch_dir.sampled.load_trajectories([base for base, _ in pairs])
    return PreferencePairs(winners, bases, embed_prompts(models, prompts))


def scored_prompts(epoch_dir):
    """(prompts, scores) of the epoch's samples, then its targets: DDPO's and DPOK's training samples."""
    sample_prompts, target_prompts = epoch_dir.sampled.published_prompts(), epoch_dir.injected.published_prompts()
    scores = complete_scores(epoch_dir.sampled, len(sample_prompts)) + complete_scores(
        epoch_dir.injected, len(target_prompts)
    )
    return sample_prompts + target_prompts, scores


def score_history(experiment, epoch):
    """{prompt: its training samples' scores in the epochs before `epoch`, oldest first}: the per-prompt
    stat tracker's buffers, read back from the experiment (nothing to checkpoint)."""
    history = {}
    for k in experiment.epochs():
        if k < epoch:
            for prompt, score in zip(*scored_prompts(experiment.epoch(k))):
                history.setdefault(prompt, []).append(score)
    return history


def epoch_advantages(config, experiment, epoch):
    """Per-prompt advantages (N,) of the epoch's samples then targets: this epoch's statistics, or with
    `train.stat_buffer` the tracked ones (ddpo-pytorch's per-prompt stat tracking)."""
    train = config.train
    prompts, scores = scored_prompts(experiment.epoch(epoch))
    history = score_history(experiment, epoch) if train.stat_buffer else None
    return per_prompt_advantages(scores, prompts, train.adv_clip_max, history, train.stat_buffer, train.stat_min_count)


def load_scored_samples(trainer, epoch_dir, advantages, batch_size):
    """The epoch's samples and targets with their advantages (N,); the targets' old log-probs recomputed
    without fusion, in batches of `batch_size` and under the training's autocast (so that ratios start at 1)."""
    policy = trainer.policy
    sample_prompts, target_prompts = epoch_dir.sampled.published_prompts(), epoch_dir.injected.published_prompts()
    samples = epoch_dir.sampled.load_trajectories(range(len(sample_prompts)))
    targets = epoch_dir.injected.load_trajectories(range(len(target_prompts)))
    trainer.check_steps(targets)
    target_conditioning = embed_prompts(policy.models, target_prompts)
    # each process recomputes its share of the targets
    rows = distributed.shard(range(len(target_prompts)))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    with trainer.accelerator.autocast():
        share = [policy.trajectory_log_probs(targets[batch], target_conditioning[batch]) for batch in batches]
    targets.log_probs = torch.cat([log_probs for part in distributed.gather(share) for log_probs in part])
    return ScoredSamples(
        Trajectories.cat([samples, targets]),
        Conditioning.cat([embed_prompts(policy.models, sample_prompts), target_conditioning]),
        advantages,
    )


def tensorboard_writer(config, experiment):
    if not config.train.tensorboard:
        return None
    require("tensorboard", "train.tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(experiment.tensorboard_dir)


class TrainingStage:
    """Set up before the epoch loop (LoRA, optimizer, resume); `train_epoch` is the epoch's last stage."""

    def __init__(self, config, models, experiment):
        self.config, self.experiment = config, experiment
        self.trainer = make_trainer(config, models)
        self.first_epoch = resume(self.trainer, config, experiment)
        self.tensorboard = tensorboard_writer(config, experiment) if distributed.is_main() else None

    def train_epoch(self, epoch):
        """Train on the epoch's pairs (DPO) or scored samples (DDPO, DPOK), record the metrics, checkpoint."""
        epoch_dir, trainer, train = self.experiment.epoch(epoch), self.trainer, self.config.train
        if train.algorithm == "dpo":
            pairs = load_pairs(trainer.models, epoch_dir, train.preferred)
            metrics = trainer.train_pairs(pairs, epoch)
        else:
            advantages = epoch_advantages(self.config, self.experiment, epoch)
            samples = load_scored_samples(trainer, epoch_dir, advantages, self.config.sample.batch_size)
            metrics = trainer.train_samples(samples, epoch)
        metrics = dict(epoch=epoch, **metrics)
        metrics.update(
            sample_score=mean(epoch_dir.sampled.read_scores()), target_score=mean(epoch_dir.injected.read_scores())
        )
        distributed.on_main(self.record, metrics)
        save_epoch_checkpoint(trainer, self.config, self.experiment, epoch)
        return metrics

    def record(self, metrics):
        """metrics.jsonl, the log and tensorboard (the main process's job)."""
        self.experiment.record_metrics(metrics)
        values = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None)
        log.info("epoch %d training: %s", metrics["epoch"], values)
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if name != "epoch" and value is not None:
                    self.tensorboard.add_scalar(f"train/{name}", value, metrics["epoch"])
            self.tensorboard.flush()
