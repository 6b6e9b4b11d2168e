"""Fused sampling: targets made from a base's noise with a reference's self-attention (SPEC section 6).

Per step, one UNet pass over the distinct references (regenerated from their own generators,
unchanged) records the keys and values of the self-attention layers that fuse at this step and
the reference's cross-attention object mask; one pass over the targets (from the base's x_T, with
the base's generator) fuses them. Each reference guides two targets, so a step costs 1.5 UNet
passes per target. The base's trajectory is already stored from sampling: its pass runs only
when its masks are asked for (`fusion.base_masks`). Only the current step's keys and values are
kept.
"""

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from d_fusion import distributed
from d_fusion.attention import Fuse, Record, fusion_processors
from d_fusion.datadir import copy_file, damaged_units, write_image
from d_fusion.errors import UserError
from d_fusion.injection import Injection, injection_from_config
from d_fusion.masks import item_selection, load_objects, mask_picture, object_masks, union_mask
from d_fusion.pairing import check_samples_per_prompt, pair_samples
from d_fusion.sampling import Denoising, Trajectories, decode_images, encode_prompts, sample_generators

log = logging.getLogger(__name__)

MASK_IMAGES = ("all", "last", "none")


@dataclass(frozen=True)
class FusionSettings:
    injection: Injection
    num_steps: int
    eta: float
    guidance_scale: float
    cfg: bool = True
    mask_resolution: int = 0  # 0: latent side // 4
    use_mask: bool = True  # False: K' = K_ref, V' = V_ref everywhere
    base_pass: bool = False  # also regenerate the bases (for their masks)

    @staticmethod
    def from_config(config):
        return FusionSettings(
            injection_from_config(config),
            config.sample.num_steps,
            config.sample.eta,
            config.sample.guidance_scale,
            config.sample.cfg,
            config.fusion.mask_resolution,
            config.fusion.use_mask,
            config.fusion.base_masks and config.fusion.use_mask,
        )


@dataclass
class FusedSamples:
    targets: Trajectories
    references: Trajectories
    bases: Trajectories | None  # only with settings.base_pass
    reference_masks: torch.Tensor | None  # (R, T, I, g, g) bool: each object's mask at each step
    base_masks: torch.Tensor | None  # (B, T, I, g, g) bool, only with settings.base_pass
    fused: list  # (step index, block) of every fused self-attention call, in call order


def _copy_generators(generators):
    return [torch.Generator(g.device).set_state(g.get_state()) for g in generators]


def _stack_masks(masks):
    return torch.stack(masks, dim=1) if masks else None


@torch.no_grad()
def fused_sampling(
    unet, scheduler, reference_embeds, negative_embeds, reference_generators, base_generators, guide,
    item_weights, item_thresholds, settings, progress=False,
):
    """Make one target per base: from the base's x_T, with its reference's self-attention fused in.

    reference_embeds: (R, 77, D) prompt embeddings of the references (a target shares its
    reference's prompt); negative_embeds: (1, 77, D); reference_generators: R fresh per-sample
    generators; base_generators: B fresh per-sample generators (they are consumed); guide: (B,)
    long, the reference row of each target; item_weights (R, I, 77) and item_thresholds (R, I):
    each reference prompt's objects (`masks.item_selection`).
    """
    scheduler.set_timesteps(settings.num_steps, device=unet.device)
    guide = guide.to(unet.device)
    item_weights, item_thresholds = item_weights.to(unet.device), item_thresholds.to(unet.device)
    target_embeds = reference_embeds[guide]
    references = Denoising(unet, reference_generators, reference_embeds, negative_embeds)
    bases = (
        Denoising(unet, _copy_generators(base_generators), target_embeds, negative_embeds)
        if settings.base_pass else None
    )
    targets = Denoising(unet, base_generators, target_embeds, negative_embeds)
    injection, num_steps = settings.injection, settings.num_steps
    with fusion_processors(unet, settings.mask_resolution) as layers:
        blocks = sorted({layer.block for layer in layers})

        def blocks_at(i):
            k_blocks = frozenset(b for b in blocks if injection.blends_k(i, num_steps, b))
            v_blocks = frozenset(b for b in blocks if injection.blends_v(i, num_steps, b))
            return k_blocks, v_blocks

        return fuse_steps(
            unet, scheduler, scheduler.timesteps, (settings.eta, settings.guidance_scale, settings.cfg),
            references, targets, bases, blocks_at, guide, item_weights, item_thresholds, settings.use_mask,
            settings.cfg, progress,
        )


def fuse_steps(
    model, scheduler, timesteps, step_args, references, targets, bases, blocks_at, guide, item_weights,
    item_thresholds, use_mask, cfg, progress=False,
):
    """The steps of a fused sampling, for any model whose attention processors read `Record` and `Fuse`.

    references, targets, bases (or None): the batches on their way (`sampling.Denoising` or the like),
    stepped as `batch.step(model, scheduler, t, *step_args, attention_kwargs)`; blocks_at(i): the
    blocks (k_blocks, v_blocks) whose K, V the targets take from their references at step i; guide
    (B,), item_weights (R, I, tokens), item_thresholds (R, I): on the model's device.
    """
    reference_masks, base_masks, fused = [], [], []
    for i, t in enumerate(tqdm(timesteps, desc="fused step", leave=False, disable=not progress)):
        k_blocks, v_blocks = blocks_at(i)
        reference = Record(k_blocks | v_blocks, use_mask, cfg)
        references.step(model, scheduler, t, *step_args, {"fusion": reference})
        mask = None
        if use_mask:
            reference_masks.append(object_masks(reference.cross_attention_map(), item_weights, item_thresholds))
            mask = union_mask(reference_masks[-1])
        target = Fuse(reference, guide, mask, k_blocks, v_blocks)
        targets.step(model, scheduler, t, *step_args, {"fusion": target})
        fused += [(i, layer.block) for layer in target.fused]
        if bases is not None:
            base = Record(frozenset(), True, cfg)
            bases.step(model, scheduler, t, *step_args, {"fusion": base})
            base_masks.append(object_masks(base.cross_attention_map(), item_weights[guide], item_thresholds[guide]))
        del reference, target  # the step's keys and values go
    return FusedSamples(
        targets.trajectories(timesteps),
        references.trajectories(timesteps),
        None if bases is None else bases.trajectories(timesteps),
        _stack_masks(reference_masks),
        _stack_masks(base_masks),
        fused,
    )


# --- the epoch's fusion stage ---


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


def _mask_steps(mask_images, num_steps):
    return {"all": range(num_steps), "last": [num_steps - 1], "none": []}[mask_images]


def _save_mask_pictures(epoch_dir, sample_indices, masks, counts, steps, resolution):
    """masks: (B, T, I, g, g) of the samples `sample_indices`; counts: objects of each sample's prompt."""
    for row, index in enumerate(sample_indices):
        for step in steps:
            for item in range(counts[row]):
                write_image(epoch_dir.mask_path(index, item, step), mask_picture(masks[row, step, item], resolution))


def fuse_pairs(config, models, epoch_dir, epoch, samples, pairs, negative_embeds, objects, settings):
    """Make the targets of `pairs` and write them, their references, bases and masks."""
    references = list(dict.fromkeys(p.reference for p in pairs))
    prompts = [samples[r] for r in references]
    reference_embeds = encode_prompts(models, prompts)
    weights, thresholds = item_selection(models.tokenizer, prompts, objects, reference_embeds.shape[1])
    fused = fused_sampling(
        models.unet,
        models.scheduler,
        reference_embeds,
        negative_embeds,
        sample_generators(config.seed, epoch, len(samples), references),
        sample_generators(config.seed, epoch, len(samples), [p.base for p in pairs]),
        torch.tensor([references.index(p.reference) for p in pairs]),
        weights,
        thresholds,
        settings,
    )
    images = decode_images(models, fused.targets.latents[:, -1])
    targets = fused.targets
    for row, pair in enumerate(pairs):
        write_image(epoch_dir.injected.image_path(pair.target), images[row])
        epoch_dir.save_injected_trajectory(pair.target, targets.latents[row], targets.log_probs[row], targets.timesteps)
        copy_file(epoch_dir.image_path(pair.reference), epoch_dir.reference_image_path(pair.target))
        copy_file(epoch_dir.image_path(pair.base), epoch_dir.base_image_path(pair.target))
    steps = _mask_steps(config.fusion.mask_images, settings.num_steps)
    if fused.reference_masks is not None:
        counts = [len(objects[p].items) for p in prompts]
        _save_mask_pictures(epoch_dir, references, fused.reference_masks, counts, steps, models.resolution)
    if fused.base_masks is not None:
        counts = [len(objects[samples[p.base]].items) for p in pairs]
        _save_mask_pictures(epoch_dir, [p.base for p in pairs], fused.base_masks, counts, steps, models.resolution)


def fuse_epoch(config, models, epoch_dir, epoch, samples, scores, negative_embeds, objects):
    """Pair the epoch's samples by score and make every target not yet published (SPEC sections 4, 6).

    samples: the prompt of every sample; scores: their CLIP scores (image order); objects: from
    `check_fusion_inputs`. Targets are published batch by batch in injected_prompt.json; a restarted
    run reuses those already published.
    """
    pairs = pair_samples(samples, scores, config.sample.batch_size * config.sample.num_batches_per_epoch)
    pair_indices = [(p.base, p.reference) for p in pairs]
    target_prompts = [samples[p.base] for p in pairs]
    published = epoch_dir.injected.published_prompts()
    if published != target_prompts[: len(published)]:
        raise UserError(f"{epoch_dir.injected.prompts_file} lists other prompts than this run's targets")
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
    settings = FusionSettings.from_config(config)
    chunk = config.fusion.batch_size // 2 * 2  # whole references: each guides two targets in a row
    # published targets with a missing or damaged file are fused again, from their pair's seeds
    damaged = distributed.from_main(damaged_units, epoch_dir.target_files, len(published), chunk)
    repairs = [(start, min(start + chunk, len(published))) for start, _ in damaged]
    for (start, stop), (_, reason) in zip(repairs, damaged):
        log.warning("epoch %d: fusing targets %d-%d again: %s", epoch, start, stop - 1, reason)
    chunks = repairs + [(start, start + chunk) for start in range(len(published), len(pairs), chunk)]
    # with K processes, process r fuses chunk r of each round of K; the main process publishes the round
    for round_chunks, this_chunk in tqdm(
        distributed.rounds(chunks), desc=f"epoch {epoch} fusion", unit="round", disable=not distributed.is_main()
    ):
        if this_chunk is not None:
            chunk_pairs = pairs[slice(*this_chunk)]
            fuse_pairs(config, models, epoch_dir, epoch, samples, chunk_pairs, negative_embeds, objects, settings)
        listed = max(len(published), round_chunks[-1][1])  # a round of repairs lists nothing new
        distributed.on_main(epoch_dir.injected.publish, target_prompts[:listed])
    log.info("epoch %d: %d targets in %s", epoch, len(pairs), epoch_dir.injected.folder)
    return pairs
