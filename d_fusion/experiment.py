"""The D-Fusion loop, one epoch after another (SPEC section 1): sample -> score -> pair -> fuse -> train.

Each stage's outputs are published under data/<exp_name>/epoch<k>/ as they are made; a restarted
run reuses what is published and goes on from there.
"""

import contextlib
import logging
import time

from tqdm.auto import tqdm

from d_fusion import distributed
from d_fusion.attention import attention_layers
from d_fusion.datadir import ExperimentDir, damaged_units, write_image
from d_fusion.errors import UserError
from d_fusion.evaluator import ScoreCollector, check_eval_config
from d_fusion.fusion import check_fusion_inputs, fuse_epoch
from d_fusion.logs import log_cleared_scratch, setup_logging
from d_fusion.masks import item_selection
from d_fusion.models import load_models_from_config
from d_fusion.prompts import epoch_samples, load_prompts, warn_long_prompts
from d_fusion.report import update_report
from d_fusion.sampling import decode_images, encode_prompts, sample_generators, sample_trajectories
from d_fusion.settings import record_or_compare
from d_fusion.training import TrainingStage, check_training_inputs

log = logging.getLogger(__name__)


def sample_epoch(config, models, epoch_dir, epoch, samples, negative_embeds):
    """Sample every batch of the epoch not yet published; returns the number of samples."""
    batch_size, num_samples = config.sample.batch_size, len(samples)
    published = epoch_dir.published_prompts()
    if published != samples[: len(published)]:
        raise UserError(
            f"{epoch_dir.prompts_file} lists other prompts than this run samples: "
            "use another exp_name, or the prompt file and batch sizes of the earlier run"
        )
    first_batch = len(published) // batch_size
    if first_batch:
        log.info("epoch %d: reusing %d published samples", epoch, first_batch * batch_size)
    # published batches with a missing or damaged file are sampled again: each sample regenerates from its seed
    damaged = distributed.from_main(damaged_units, epoch_dir.sample_files, len(published), batch_size)
    for start, reason in damaged:
        last = start + batch_size - 1
        log.warning("epoch %d: regenerating samples %d-%d from their seeds: %s", epoch, start, last, reason)
    starts = [start for start, _ in damaged] + list(range(first_batch * batch_size, num_samples, batch_size))
    # with K processes, process r samples batch r of each round of K; the main process publishes the round
    for round_starts, start in tqdm(
        distributed.rounds(starts), desc=f"epoch {epoch} sampling", unit="round", disable=not distributed.is_main()
    ):
        if start is not None:
            sample_batch(config, models, epoch_dir, epoch, samples, negative_embeds, start)
        listed = max(len(published), round_starts[-1] + batch_size)  # a round of repairs lists nothing new
        distributed.on_main(epoch_dir.publish_samples, samples[:listed])
    return num_samples


def sample_batch(config, models, epoch_dir, epoch, samples, negative_embeds, start):
    """Sample the batch of samples start.. (one prompt) and write its images and trajectories."""
    batch_size = config.sample.batch_size
    indices = range(start, start + batch_size)
    prompt_embeds = encode_prompts(models, [samples[start]]).expand(batch_size, -1, -1)
    trajectories = sample_trajectories(
        models,
        prompt_embeds,
        negative_embeds.expand(batch_size, -1, -1),
        sample_generators(config.seed, epoch, len(samples), indices),
        config.sample.num_steps,
        config.sample.eta,
        config.sample.guidance_scale,
        config.sample.cfg,
        progress=distributed.is_main(),
    )
    images = decode_images(models, trajectories.latents[:, -1])
    for row, index in enumerate(indices):
        write_image(epoch_dir.image_path(index), images[row])
        epoch_dir.save_trajectory(index, trajectories.latents[row], trajectories.log_probs[row], trajectories.timesteps)


def timestamp_name():
    """The exp_name of a run started without one."""
    return time.strftime("%Y.%m.%d_%H.%M.%S")


def run_experiment(config):
    """run_sample.py: the epoch loop, as the experiment's only sampler (its lock held by the main process)."""
    named = not config.exp_name
    if named:
        config.exp_name = distributed.from_main(timestamp_name)
    experiment = ExperimentDir(config.save_path, config.exp_name)
    with experiment.hold("sampler") if distributed.is_main() else contextlib.nullcontext():
        if named:
            print(f"config.exp_name is empty: this run is {experiment.root} (--config.exp_name {config.exp_name})")
        run_epochs(config, experiment)


def start_up(config, experiment):
    """The main process's start: the run's log, the scratch a killed run left cleared, the settings recorded
    or compared."""
    setup_logging(experiment.log_file)
    log_cleared_scratch(experiment.clear_sampler_scratch(), "run")
    record_or_compare(config, experiment)


def run_epochs(config, experiment):
    if distributed.is_main():
        start_up(config, experiment)
    else:  # the other processes of an `accelerate launch` run: warnings only, on the terminal
        setup_logging(level=logging.WARNING)
    prompts = load_prompts(config)
    objects = check_fusion_inputs(config, prompts)  # bad fusion inputs fail here, before any work
    check_eval_config(config, prompts)
    if config.use_lora:
        check_training_inputs(config)  # likewise training settings and resume_from
    samples = epoch_samples(prompts, config.sample.batch_size, config.sample.num_batches_per_epoch)
    log.info("experiment %s: %d prompts, %d samples per epoch", experiment.root, len(prompts), len(samples))

    models = load_models_from_config(config)
    # a mask grid the UNet lacks, or an object the tokenizer cannot find, fails here, before any sampling
    attention_layers(models.unet, config.fusion.mask_resolution)
    item_selection(models.tokenizer, prompts, objects, models.tokenizer.model_max_length)
    warn_long_prompts(models.tokenizer, prompts)
    negative_embeds = encode_prompts(models, [""])
    scores = ScoreCollector(config, experiment)
    if config.eval.inline:
        scores.scorer()  # a scorer that cannot load fails here, before any sampling
    # LoRA on models.unet in place (the next epoch samples from it), optimizer, resume_from
    training = TrainingStage(config, models, experiment) if config.use_lora else None
    if training is None:
        log.warning("config.use_lora is False: no training, every epoch samples from the pretrained UNet")
    first_epoch = training.first_epoch if training else config.train.begin_epoch
    distributed.on_main(experiment.clear_finished)
    epochs = range(first_epoch, config.train.num_epochs)
    for epoch in tqdm(epochs, desc="epoch", unit="epoch", disable=not distributed.is_main()):
        epoch_dir = experiment.epoch(epoch)
        sample_epoch(config, models, epoch_dir, epoch, samples, negative_embeds)
        image_scores = scores.collect(epoch, epoch_dir.sampled)
        fuse_epoch(config, models, epoch_dir, epoch, samples, image_scores, negative_embeds, objects)
        scores.collect(epoch, epoch_dir.injected)
        if training:
            training.train_epoch(epoch)
        distributed.on_main(update_report, config, experiment)
    distributed.on_main(experiment.mark_finished, config.train.num_epochs)
    distributed.on_main(update_report, config, experiment)
