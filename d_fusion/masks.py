"""The objects of each prompt, their thresholds, and the reference's cross-attention object mask.

docs/METHOD.md §6.2: the objects ("items") of a prompt are token positions of the prompt. They come from
- `item_words` (this project's option): words naming the objects, e.g. "cat,sandwich", the same for every
  prompt; each maps through the tokenizer to all its token positions (a word of several tokens, or
  written twice, covers them all), or
- `item_idx_file` (a JSON {prompt: [word position, ...]}), else `item_idx`: 0-based word positions,
  at token position word + 1 (the start token comes first), as the release does.
Thresholds: `mask_thr_file` (a JSON {prompt: number or [one per item]}), else `mask_thr` (same forms).

An object's map is the cross-attention probability of its tokens (summed over the tokens of an
object of several tokens), averaged over the mask layers and heads; its mask is 1 where the map
is >= its threshold; the fusion mask is the union of the objects' masks.
"""

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from d_fusion.datadir import is_number, read_json
from d_fusion.errors import UserError


@dataclass(frozen=True)
class PromptObjects:
    items: tuple  # per object: an int (0-based word position) or a str (words of the prompt)
    thresholds: tuple  # one float per object


def _items_of(config, prompts):
    """{prompt: [item, ...]} from `item_words`, `item_idx_file` or `item_idx`, checked against each prompt."""
    if config.item_words and config.item_idx_file:
        raise UserError("config.item_words and config.item_idx_file are both set: name the objects one way")
    if config.item_words:
        words = [w.strip() for w in config.item_words.split(",") if w.strip()]
        for prompt in prompts:
            for word in words:
                if not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, re.IGNORECASE):
                    raise UserError(f"config.item_words names {word!r}, which is not a word of the prompt {prompt!r}")
        return {prompt: words for prompt in prompts}
    if config.item_idx_file:
        table = _prompt_table(config.item_idx_file, "item file", prompts)
    else:
        table = {prompt: list(config.item_idx) for prompt in prompts}
    where = config.item_idx_file or "config.item_idx"
    for prompt, positions in table.items():
        words = len(prompt.split())
        if not isinstance(positions, list) or not all(is_number(p) and isinstance(p, int) and 0 <= p < words for p in positions):
            raise UserError(
                f"{where}: the objects of {prompt!r} must be a list of word positions 0..{words - 1}, got {positions!r}"
            )
    return table


def _prompt_table(path, what, prompts):
    table = read_json(path, what)
    if not isinstance(table, dict):
        raise UserError(f"{what} {path} must hold a JSON object {{prompt: value}}")
    missing = [p for p in prompts if p not in table]
    if missing:
        raise UserError(f"{what} {path} has no entry for the prompt {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return {p: table[p] for p in prompts}


def _thresholds_of(config, prompts, items):
    if config.mask_thr_file:
        table, where = _prompt_table(config.mask_thr_file, "threshold file", prompts), config.mask_thr_file
    else:
        table, where = {p: config.mask_thr for p in prompts}, "config.mask_thr"
    thresholds = {}
    for prompt, value in table.items():
        count = len(items[prompt])
        values = [value] * count if isinstance(value, (int, float)) else value
        if not isinstance(values, (list, tuple)) or not all(map(is_number, values)):
            raise UserError(f"{where}: the threshold of {prompt!r} must be a number or a list of numbers, got {value!r}")
        if len(values) != count:
            raise UserError(
                f"{where}: {prompt!r} has {len(values)} thresholds but {count} objects; give one per object"
            )
        thresholds[prompt] = tuple(float(v) for v in values)
    return thresholds


def load_objects(config, prompts):
    """{prompt: PromptObjects}, every input checked (run at start-up, before any model loads)."""
    items = _items_of(config, prompts)
    if config.fusion.use_mask:
        empty = [p for p in prompts if not items[p]]
        if empty:
            raise UserError(
                f"the prompt {empty[0]!r} has no objects to mask: name them, or set config.fusion.use_mask=False "
                "to fuse over the whole image"
            )
    thresholds = _thresholds_of(config, prompts, items)
    return {p: PromptObjects(tuple(items[p]), thresholds[p]) for p in prompts}


def item_token_positions(tokenizer, prompt, item):
    """Token positions (in the padded prompt, start token at 0) of one object of `prompt`."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    if isinstance(item, int):
        if item + 1 >= len(ids) - 1:  # ids: start token, the prompt's tokens, end token
            raise UserError(f"word position {item} is beyond the tokens of the prompt {prompt!r}")
        return [item + 1]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    word = tokenizer(item, add_special_tokens=False).input_ids
    positions = [
        p + k
        for p in range(1, len(ids) - len(word) + 1)
        if ids[p : p + len(word)] == word and (p == 1 or tokens[p - 1].endswith("</w>"))
        for k in range(len(word))
    ]
    if not positions:
        raise UserError(f"the object {item!r} is not among the tokens of the prompt {prompt!r}")
    return positions


def item_selection(tokenizer, prompts, objects, num_tokens):
    """Which tokens make each object of each prompt, and its threshold.

    Returns weights (B, I, num_tokens), 1 at an object's tokens, and thresholds (B, I), with I the
    most objects of any prompt; missing objects have no tokens and an infinite threshold.
    """
    most = max(len(objects[p].items) for p in prompts)
    weights = torch.zeros(len(prompts), most, num_tokens)
    thresholds = torch.full((len(prompts), most), float("inf"))
    for row, prompt in enumerate(prompts):
        for k, (item, threshold) in enumerate(zip(objects[prompt].items, objects[prompt].thresholds)):
            weights[row, k, item_token_positions(tokenizer, prompt, item)] = 1.0
            thresholds[row, k] = threshold
    return weights, thresholds


def object_masks(cross_map, weights, thresholds):
    """Binary mask of each object: (B, I, g, g) bool.

    cross_map: (B, g*g, num_tokens) cross-attention probabilities averaged over mask layers and heads.
    """
    maps = torch.einsum("bqt,bit->biq", cross_map.float(), weights.to(cross_map.device))
    grid = int(round(cross_map.shape[1] ** 0.5))
    return (maps >= thresholds.to(cross_map.device)[..., None]).unflatten(-1, (grid, grid))


def union_mask(item_masks):
    """The fusion mask M: 1 where any object's mask is 1. (B, I, g, g) -> (B, g, g) float."""
    return item_masks.any(dim=1).float()


def resize_mask(mask, grid):
    """Nearest-neighbour resize of (B, g, g) masks to a layer's grid: (B, grid * grid)."""
    return F.interpolate(mask[:, None], size=(grid, grid), mode="nearest").flatten(1)


def mask_picture(item_mask, resolution):
    """One object's binary mask (g, g) as a white-on-black uint8 picture (resolution, resolution, 3)."""
    picture = resize_mask(item_mask[None].float(), resolution).view(resolution, resolution)
    return np.repeat((picture * 255).to(torch.uint8).cpu().numpy()[..., None], 3, axis=-1)
