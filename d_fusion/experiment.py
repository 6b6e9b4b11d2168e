"""run_sample.py: the D-Fusion loop, one epoch after another (docs/METHOD.md §1): sample -> score -> pair ->
fuse -> train. Start-up checks every input before any model loads; the stages are in d_fusion/stages.py.
"""

import contextlib
import logging
import time

from tqdm.auto import tqdm

from d_fusion import distributed
from d_fusion.datadir import ExperimentDir
from d_fusion.evaluator import check_eval_config
from d_fusion.logs import log_cleared_scratch, setup_logging
from d_fusion.masks import item_selection
from d_fusion.models import load_models_from_config
from d_fusion.prompts import load_prompts, warn_long_prompts
from d_fusion.report import update_report
from d_fusion.settings import record_or_compare
from d_fusion.stages import (
    Run,
    ScoreCollector,
    TrainingStage,
    check_fusion_inputs,
    check_training_inputs,
    epoch_layout,
    fuse_epoch,
    sample_epoch,
)

log = logging.getLogger(__name__)


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
    num_samples = epoch_layout(config, prompts).num_samples
    log.info("experiment %s: %d prompts, %d samples per epoch", experiment.root, len(prompts), num_samples)

    models = load_models_from_config(config)
    run = Run.build(config, models, experiment, prompts, objects)
    # a mask grid the UNet lacks, blocks the transformer lacks, or an object the tokenizer cannot find, fail
    # here, before any sampling
    models.family.check_fusion(models, run.fusion)
    item_selection(models.tokenizer, prompts, objects, models.tokenizer.model_max_length)
    warn_long_prompts(models.tokenizer, prompts)
    scores = ScoreCollector(config, experiment)
    if config.eval.inline:
        scores.scorer()  # a scorer that cannot load fails here, before any sampling
    # LoRA on models.unet (SD 3: the transformer) in place (the next epoch samples from it), optimizer, resume_from
    training = TrainingStage(config, models, experiment) if config.use_lora else None
    if training is None:
        log.warning("config.use_lora is False: no training, every epoch samples from the pretrained UNet")
    first_epoch = training.first_epoch if training else config.train.begin_epoch
    distributed.on_main(experiment.clear_finished)
    epochs = range(first_epoch, config.train.num_epochs)
    for epoch in tqdm(epochs, desc="epoch", unit="epoch", disable=not distributed.is_main()):
        epoch_dir = experiment.epoch(epoch)
        sample_epoch(run, epoch)
        fuse_epoch(run, epoch, scores.collect(epoch, epoch_dir.sampled))
        scores.collect(epoch, epoch_dir.injected)
        if training:
            training.train_epoch(epoch)
        distributed.on_main(update_report, config, experiment)
    distributed.on_main(experiment.mark_finished, config.train.num_epochs)
    distributed.on_main(update_report, config, experiment)
