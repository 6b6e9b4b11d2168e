"""Checkpoints of training (docs/METHOD.md §7.5): kept every `train.save_interval` epochs, resume exactly.

Every epoch ends with a checkpoint, so a crash loses at most the unfinished epoch; one that is not
due by `save_interval` is deleted when the next epoch's is written. At most `num_checkpoint_limit`
due checkpoints are kept (the oldest go).

A checkpoint holds the UNet's (SD 3: the transformer's) LoRA weights in the format the family's
pipeline's `load_lora_weights` reads (`StableDiffusionPipeline`, `StableDiffusion3Pipeline`, ...), the optimizer's state, the gradient scaler's state (fp16) and the global RNG states. The
shuffles and timestep subsets of training come from a generator seeded by (seed, epoch), so these
make a resumed run follow the uninterrupted one.
"""

import logging
import os
import shutil

import torch

from d_fusion import distributed
from d_fusion.datadir import (
    CheckpointDir,
    atomic_folder,
    checkpoint_folders,
    checkpoints_in,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from d_fusion.errors import UserError
from d_fusion.trainer import load_lora_state_dict

log = logging.getLogger(__name__)

UNET_PREFIX = "unet."  # how load_lora_weights names the UNet's LoRA keys (SD 3: "transformer.")


def lora_prefix(family):
    """The LoRA keys' prefix in the family's load_lora_weights files: its denoiser's name."""
    return family.denoiser + "."


def checkpoint_due(config, epoch):
    """After every `save_interval` epochs and after the last one."""
    return (epoch + 1) % config.train.save_interval == 0 or epoch == config.train.num_epochs - 1


# ---------------------------------------------------------------- LoRA weights


def save_lora(family, weights, folder):
    """Write LoRA weights (`trainer.lora_state_dict`'s format) as the family's pipeline's
    `load_lora_weights(folder)` reads them."""
    family.pipeline_class.save_lora_weights(
        folder, **{f"{family.denoiser}_lora_layers": weights}, weight_name=CheckpointDir.LORA_WEIGHTS,
        safe_serialization=True,
    )


def read_lora(path, prefix=UNET_PREFIX):
    """The LoRA weights of a load_lora_weights file, without their model's prefix ("unet.", or SD 3's
    "transformer.")."""
    return {k[len(prefix) :]: v for k, v in read_tensors(path).items() if k.startswith(prefix)}


def load_lora(unet, path, prefix=UNET_PREFIX):
    """Set the UNet's (or, with prefix "transformer.", SD 3's transformer's) LoRA adapter from a
    load_lora_weights file."""
    try:
        misfits = load_lora_state_dict(unet, read_lora(path, prefix))
    except RuntimeError as error:  # shape mismatch: another rank or model
        raise UserError(
            f"LoRA weights {path} do not fit this UNet and its LoRA rank ({error}): "
            "was the checkpoint made from another model?"
        ) from None
    if misfits:
        raise UserError(f"LoRA weights {path} do not match this UNet's LoRA layers: resume with the same model")


# ---------------------------------------------------------------- optimizer and RNG state


def _split_optimizer_state(state):
    """torch optimizer state_dict -> (tensors by flat name, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, dict(param_groups=state["param_groups"], scalars=scalars)


def _join_optimizer_state(tensors, saved):
    state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in saved["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return dict(state=state, param_groups=saved["param_groups"])


def _rng_states():
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return states


def _set_rng_states(tensors):
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- save, prune, resume


def save_checkpoint(trainer, experiment, epoch):
    """Write checkpoints/checkpoint_<epoch>/ whole (a scratch folder renamed into place)."""
    checkpoint = experiment.checkpoint(epoch)
    state = trainer.state_dict()
    tensors, optimizer = _split_optimizer_state(state["optimizer"])
    with atomic_folder(checkpoint.root) as scratch:
        folder = CheckpointDir(scratch)
        save_lora(trainer.models.family, state["lora"], scratch)
        write_tensors(folder.state_tensors_file, tensors | _rng_states())
        write_json(
            folder.state_file,
            dict(epoch=epoch, lora_rank=state["lora_rank"], optimizer=optimizer, grad_scaler=state["grad_scaler"]),
        )
    log.info("epoch %d: checkpoint %s", epoch, checkpoint.root)
    return checkpoint


def keep_checkpoints(config, experiment, epoch):
    """After epoch `epoch`'s checkpoint: drop earlier ones not due, due ones beyond the limit, and later
    ones (left by a run that was resumed from an older checkpoint: they belong to an abandoned branch)."""
    found = checkpoints_in(experiment.checkpoints)
    for abandoned in [c for c in found if c.epoch > epoch]:
        shutil.rmtree(abandoned.root)
    earlier = [c for c in found if c.epoch < epoch]
    due = [c for c in earlier if checkpoint_due(config, c.epoch)]
    not_due = [c for c in earlier if not checkpoint_due(config, c.epoch)]
    room = config.train.num_checkpoint_limit - checkpoint_due(config, epoch)
    for old in not_due + due[: max(0, len(due) - room)]:
        shutil.rmtree(old.root)


def save_epoch_checkpoint(trainer, config, experiment, epoch):
    """The main process writes the checkpoint (every process holds the same weights) and prunes the
    older ones; all wait for it. Returns the checkpoint on the main process, None on the others."""
    return distributed.on_main(_save_and_prune, trainer, config, experiment, epoch)


def _save_and_prune(trainer, config, experiment, epoch):
    checkpoint = save_checkpoint(trainer, experiment, epoch)
    keep_checkpoints(config, experiment, epoch)
    return checkpoint


def checkpoints_at(path, setting):
    """[`path`] when it is a checkpoint folder, else the checkpoints inside it, oldest first; a UserError
    naming `setting` (the config field that gave `path`) when it holds none."""
    if CheckpointDir(path).is_checkpoint():
        return [CheckpointDir(path)]
    found = checkpoints_in(path)
    if not found:
        raise UserError(
            f"config.{setting} = {path!r} is neither a checkpoint folder nor a folder holding checkpoint_<k>/ "
            "folders: pass e.g. data/<exp_name>/checkpoints/checkpoint_3 or data/<exp_name>/checkpoints"
        )
    return found


def load_checkpoint(trainer, checkpoint):
    """Restore LoRA, optimizer, grad scaler and RNG from `checkpoint`; returns its epoch."""
    saved = read_json(checkpoint.state_file, "checkpoint state")
    if not isinstance(saved, dict) or not {"epoch", "lora_rank", "optimizer", "grad_scaler"} <= saved.keys():
        raise UserError(f"checkpoint state {checkpoint.state_file} is incomplete; resume from another checkpoint")
    tensors = read_tensors(checkpoint.state_tensors_file)
    state = dict(
        lora=read_lora(checkpoint.lora_weights, lora_prefix(trainer.models.family)),
        lora_rank=saved["lora_rank"],
        optimizer=_join_optimizer_state(tensors, saved["optimizer"]),
        grad_scaler=saved["grad_scaler"],
    )
    try:
        trainer.load_state_dict(state)
    except ValueError as error:
        raise UserError(f"checkpoint {checkpoint.root} holds {error}: resume with the checkpoint's settings") from None
    _set_rng_states(tensors)
    log.info("resumed from %s (epoch %d)", checkpoint.root, saved["epoch"])
    return saved["epoch"]


def resume(trainer, config, experiment):
    """The first epoch to run: after the `resume_from` checkpoint when given, else after the
    experiment's own newest checkpoint (rerunning a stopped run continues it), else `train.begin_epoch`."""
    resume_from = config.resume_from
    for incomplete in [c for c in checkpoint_folders(resume_from or experiment.checkpoints) if not c.is_checkpoint()]:
        log.warning(
            "%s lacks %s: it is ignored, so epoch %d is trained again if the run gets there",
            incomplete.root,
            ", ".join(incomplete.missing_files()),
            incomplete.epoch,
        )
    if not resume_from and checkpoints_in(experiment.checkpoints):
        resume_from = experiment.checkpoints
        log.info("%s holds checkpoints: continuing from the newest (use a new exp_name to start afresh)", resume_from)
    if not resume_from:
        return config.train.begin_epoch
    if not os.path.exists(resume_from):
        raise UserError(f"config.resume_from = {resume_from!r} does not exist")
    return load_checkpoint(trainer, checkpoints_at(resume_from, "resume_from")[-1]) + 1
