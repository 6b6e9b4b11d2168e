import json

import pytest
import torch

from d_fusion.errors import UserError
from d_fusion.masks import (
    PromptObjects,
    item_selection,
    item_token_positions,
    load_objects,
    mask_picture,
    object_masks,
    resize_mask,
    union_mask,
)

PROMPT = "a dog driving a car"


@pytest.fixture
def config():
    from config.config import get_config

    return get_config()


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_objects_from_the_release_files(config):
    config.item_idx_file = "config/prompt/template1_item.json"
    config.mask_thr_file = "config/prompt/template1_mask.json"
    objects = load_objects(config, [PROMPT, "a horse playing basketball"])
    assert objects[PROMPT].items == (1, 4) and objects[PROMPT].thresholds == (0.03, 0.01)


def test_one_threshold_serves_every_object(config):
    config.item_idx = [1, 4]
    assert load_objects(config, [PROMPT])[PROMPT].thresholds == (0.05, 0.05)


@pytest.mark.parametrize(
    "items, thresholds, message",
    [
        ({"another prompt": [1]}, None, "no entry for the prompt 'a dog driving a car'"),
        ({PROMPT: [1, 5]}, None, "word positions 0..4"),
        ({PROMPT: [1, 4]}, {PROMPT: [0.1, 0.2, 0.3]}, "3 thresholds but 2 objects"),
        ({PROMPT: [1, 4]}, {"another prompt": 0.1}, "no entry for the prompt"),
        ({PROMPT: []}, None, "no objects to mask"),
    ],
)
def test_bad_object_files_are_user_errors(config, tmp_path, items, thresholds, message):
    config.item_idx_file = write(tmp_path, "items.json", items)
    if thresholds is not None:
        config.mask_thr_file = write(tmp_path, "thr.json", thresholds)
    with pytest.raises(UserError, match=message):
        load_objects(config, [PROMPT])


def test_item_words_must_be_words_of_every_prompt(config):
    config.item_words = "dog,car"
    config.mask_thr = 0.1
    assert load_objects(config, [PROMPT])[PROMPT].items == ("dog", "car")
    config.item_words = "do"
    with pytest.raises(UserError, match="not a word of the prompt"):
        load_objects(config, [PROMPT])
    config.item_words, config.item_idx_file = "dog", "config/prompt/template1_item.json"
    with pytest.raises(UserError, match="both set"):
        load_objects(config, [PROMPT])


def test_item_words_map_to_all_their_tokens(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    assert item_token_positions(tokenizer, PROMPT, 1) == [2]  # word 1, after the start token
    assert item_token_positions(tokenizer, PROMPT, "car") == [5]
    assert item_token_positions(tokenizer, "a car and a car", "car") == [2, 5]
    word = "zqxjvrbl"  # not a CLIP word: several tokens
    pieces = len(tokenizer(word, add_special_tokens=False).input_ids)
    assert pieces > 1
    assert item_token_positions(tokenizer, f"a {word} here", word) == list(range(2, 2 + pieces))
    with pytest.raises(UserError, match="not among the tokens"):  # no match inside another word
        item_token_positions(tokenizer, "a sidecar", "car")  # side + car


def test_masks_per_object_are_thresholded_and_united():
    # two prompts (the second with one object), a 2x2 grid, 5 tokens
    cross_map = torch.zeros(2, 4, 5)
    cross_map[0, :, 1] = torch.tensor([0.5, 0.1, 0.0, 0.0])  # object 0 of prompt 0
    cross_map[0, :, 3] = torch.tensor([0.0, 0.0, 0.2, 0.3])  # object 1 of prompt 0 (tokens 3 and 4)
    cross_map[0, :, 4] = torch.tensor([0.0, 0.0, 0.0, 0.3])
    cross_map[1, :, 2] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    weights = torch.zeros(2, 2, 5)
    weights[0, 0, 1] = weights[0, 1, 3] = weights[0, 1, 4] = weights[1, 0, 2] = 1
    thresholds = torch.tensor([[0.1, 0.5], [0.3, float("inf")]])
    masks = object_masks(cross_map, weights, thresholds)
    assert masks.shape == (2, 2, 2, 2)
    assert masks[0, 0].flatten().tolist() == [True, True, False, False]  # >= threshold
    assert masks[0, 1].flatten().tolist() == [False, False, False, True]  # 0.3 + 0.3 summed over its tokens
    assert masks[1, 0].flatten().tolist() == [False, False, True, True]
    assert not masks[1, 1].any()  # the missing object
    assert union_mask(masks).flatten(1).tolist() == [[1, 1, 0, 1], [0, 0, 1, 1]]


def test_item_selection_pads_missing_objects(tiny_sd, config):
    config.item_idx_file = "config/prompt/template1_item.json"
    config.mask_thr_file = "config/prompt/template1_mask.json"
    prompts = [PROMPT, "a horse playing basketball"]
    weights, thresholds = item_selection(tiny_sd.tokenizer, prompts, load_objects(config, prompts), 77)
    assert weights.shape == (2, 2, 77) and weights.sum() == 4
    assert weights[0, 1, 5] == 1 and weights[1, 1, 4] == 1

    objects = {PROMPT: PromptObjects((1, 4), (0.1, 0.2)), "a cat": PromptObjects((1,), (0.3,))}
    weights, thresholds = item_selection(tiny_sd.tokenizer, [PROMPT, "a cat"], objects, 77)
    assert weights.shape == (2, 2, 77) and not weights[1, 1].any()  # "a cat" has one object: the 2nd is padding
    assert thresholds[1].tolist() == [pytest.approx(0.3), float("inf")]


def test_a_word_position_beyond_the_prompts_tokens_is_a_clear_error(tiny_sd):
    with pytest.raises(UserError, match="word position 5 is beyond the tokens"):
        item_selection(tiny_sd.tokenizer, ["a cat"], {"a cat": PromptObjects((5,), (0.1,))}, 77)


def test_nearest_resize_and_pictures():
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    resized = resize_mask(mask, 4).view(4, 4)
    assert resized.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    picture = mask_picture(mask[0].bool(), 8)
    assert picture.shape == (8, 8, 3) and picture.dtype.name == "uint8"
    assert picture[0, 0].tolist() == [255] * 3 and picture[0, 7].tolist() == [0] * 3
