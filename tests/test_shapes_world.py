"""The shapes world: captions, the split of object pairs, layouts, and the shipped prompt files."""

import json
import os
import random

import pytest

from d_fusion.masks import item_token_positions
from d_fusion.shapes import world
from d_fusion.tiny import build_tokenizer

ALL_SCENES = {split: world.split_scenes(split) for split in ("pretrain", "train", "test")}


def test_captions_parse_back_to_their_scenes():
    for scenes in ALL_SCENES.values():
        for scene in scenes:
            assert world.parse(world.caption(scene)) == scene
    for text in ("a cat playing chess", "a red circle", "a big red circle above a small blue square",
                 "a big red circle and a blue square", "a purple circle and a blue square"):
        assert world.parse(text) is None


def test_three_families_in_every_split():
    for scenes in ALL_SCENES.values():
        assert {s.family for s in scenes} == {"binding", "relation", "size"}
        assert {s.relation for s in scenes} == {"and", *world.RELATIONS}


def test_held_out_pairs_are_never_seen_in_training():
    def pairs(split):
        return {frozenset(((t.colour, t.shape) for t in s.things)) for s in ALL_SCENES[split]}

    pretrain, train, test = pairs("pretrain"), pairs("train"), pairs("test")
    assert len(pretrain) == 24 and len(train) == 6 and len(test) == 6
    assert not (pretrain & train) and not (pretrain & test) and not (train & test)
    # ...while every object of a held-out prompt is seen in training, with other partners
    seen = {obj for pair in pretrain for obj in pair}
    assert all(obj in seen for pair in train | test for obj in pair)


def test_every_word_is_one_clip_token_and_items_are_the_shape_nouns(tmp_path):
    tokenizer = build_tokenizer(str(tmp_path))
    for scene in ALL_SCENES["train"] + ALL_SCENES["test"]:
        prompt = world.caption(scene)
        ids = tokenizer(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 2  # start, one token per word, end
        for item, thing in zip(world.item_positions(prompt), scene.things):
            (position,) = item_token_positions(tokenizer, prompt, item)
            assert tokenizer.convert_ids_to_tokens(ids[position]) == thing.shape + "</w>"


def test_layouts_keep_inside_apart_and_in_relation():
    rng = random.Random(0)
    for scene in ALL_SCENES["test"]:
        for _ in range(5):
            a, b = world.layout(scene, rng)
            for p in (a, b):
                assert p.side / 2 <= p.cx <= world.IMAGE_SIZE - p.side / 2
                assert p.side / 2 <= p.cy <= world.IMAGE_SIZE - p.side / 2
                assert world.SIDES[p.thing.size][0] <= p.side <= world.SIDES[p.thing.size][1]
            assert world._separated(a, b)
            if scene.relation != "and":
                assert world.relation_holds(scene.relation, a, b, margin=4.0)
                assert not world.relation_holds(scene.relation, b, a)


def test_drawing_is_the_composed_coverage():
    placed = [world.Placed(world.Thing("red", "circle"), 10.0, 10.0, 10.0)]
    image = world.draw(placed)
    alpha = world.coverage("circle", 10.0, 10.0, 10.0)
    assert image.getpixel((10, 10)) == world.COLOURS["red"] and image.getpixel((25, 25)) == world.BACKGROUND
    assert alpha.sum() == pytest.approx(3.14159 * 25, rel=0.05)


def test_shipped_prompt_files_are_the_worlds(tmp_path):
    folder = os.path.join(os.path.dirname(world.__file__), "..", "..", "config", "prompt")
    with open(os.path.join(folder, "shapes_mask.json")) as f:
        threshold = next(iter(json.load(f).values()))[0]
    written = world.write_prompt_files(threshold, str(tmp_path))
    for name, content in written.items():
        with open(os.path.join(folder, name)) as f:
            assert json.load(f) == content, f"config/prompt/{name} differs from `python -m d_fusion.shapes.world`"
    assert len(written["shapes_train.json"]) == len(written["shapes_test.json"]) == 84
    assert set(written["shapes_demo.json"]) <= set(written["shapes_train.json"])
