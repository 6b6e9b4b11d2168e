"""Choosing references and bases by score (docs/METHOD.md §4).

Per prompt, with its n samples sorted by score, best first: the references are the best n // 4,
each used twice in a row (r0, r0, r1, r1, ...); the bases are the lower half, best first. Pair k
is (reference k, base k) and makes target k. Pairs never cross prompts.
"""

from dataclasses import dataclass

from d_fusion.errors import UserError


@dataclass(frozen=True)
class Pair:
    target: int  # index of the target in the epoch's injected_images/
    reference: int  # sample index (images/) of the well-aligned reference
    base: int  # sample index of the poorly-aligned base; the target starts from its noise


def check_samples_per_prompt(batch_size, num_batches_per_epoch):
    """n = samples per prompt must be a multiple of 4 (checked at start-up, before any sampling)."""
    if batch_size < 1 or num_batches_per_epoch < 1:
        raise UserError(
            f"sample.batch_size = {batch_size} and sample.num_batches_per_epoch = {num_batches_per_epoch} "
            "must both be >= 1"
        )
    n = batch_size * num_batches_per_epoch
    if n % 4:
        raise UserError(
            f"each prompt gets sample.batch_size * sample.num_batches_per_epoch = {batch_size} * "
            f"{num_batches_per_epoch} = {n} samples; D-Fusion pairs them in fours (best quarter as references, "
            "lower half as bases): make it a multiple of 4"
        )
    return n


def pair_samples(samples, scores, per_prompt):
    """Pairs of the epoch in target order: prompt by prompt (file order), pair k within the prompt.

    samples: the prompt of every sample index (each prompt's `per_prompt` samples contiguous);
    scores: one float per sample, in sample order.
    """
    if len(scores) != len(samples):
        raise UserError(f"got {len(scores)} scores for {len(samples)} samples")
    pairs = []
    for start in range(0, len(samples), per_prompt):
        group = range(start, start + per_prompt)
        assert len({samples[j] for j in group}) == 1, "a prompt's samples must be contiguous"
        ranked = sorted(group, key=lambda j: -scores[j])  # best first; ties keep sample order
        references, bases = ranked[: per_prompt // 4], ranked[per_prompt // 2 :]
        for k, base in enumerate(bases):
            pairs.append(Pair(len(pairs), references[k // 2], base))
    return pairs
