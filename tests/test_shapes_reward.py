"""The shapes reward on drawn images: faithful drawings score high, each kind of error clearly lower."""

import random

import numpy as np
import pytest
from PIL import Image

from d_fusion.errors import UserError
from d_fusion.shapes import world
from d_fusion.shapes.reward import ShapesReward, facts, find_regions, fully_aligned, shapes_score
from d_fusion.shapes.world import Placed, Scene, Thing

PROMPT = "a red circle above a blue square"


def drawings(scene, count, seed=0):
    rng = random.Random(seed)
    return [world.render(scene, rng)[0] for _ in range(count)]


@pytest.mark.parametrize("family", ["binding", "relation", "size"])
def test_faithful_drawings_score_at_least_095(family):
    rng = random.Random(1)
    scenes = [s for s in world.split_scenes("test") + world.split_scenes("train") if s.family == family]
    scores = [shapes_score(world.render(s, rng)[0], world.caption(s)) for s in scenes]
    # small shapes (6 px triangles) are the hardest to tell apart: a few faithful drawings score a little less
    assert np.mean(scores) >= 0.96
    assert np.mean(np.array(scores) >= 0.95) >= (0.85 if family == "size" else 0.95)
    assert min(scores) >= 0.8


def test_errors_score_clearly_lower():
    images = drawings(world.parse(PROMPT), 20)
    score = lambda prompt: np.array([shapes_score(im, prompt) for im in images])  # noqa: E731
    faithful = score(PROMPT)
    assert faithful.min() >= 0.95
    assert score("a blue circle above a red square").max() < 0.1  # colours swapped
    assert score("a red circle below a blue square").max() < 0.1  # the opposite relation
    assert score("a red circle to the left of a blue square").mean() < 0.5  # another axis
    assert score("a red triangle above a blue square").max() < 0.55  # one wrong shape: half the objects
    assert score("a green circle above a blue square").max() < 0.55  # one wrong colour


def test_blank_and_size_errors():
    blank = Image.new("RGB", (32, 32), world.BACKGROUND)
    assert shapes_score(blank, PROMPT) < 0.01
    big_small = Scene(Thing("red", "circle", "big"), Thing("blue", "square", "small"))
    images = drawings(big_small, 10)
    right = [shapes_score(im, "a big red circle and a small blue square") for im in images]
    wrong = [shapes_score(im, "a small red circle and a big blue square") for im in images]
    assert min(right) >= 0.95 and max(wrong) < 0.1


def test_extra_object_lowers_the_score():
    pair = [Placed(Thing("red", "circle"), 8, 8, 10), Placed(Thing("blue", "square"), 8, 24, 10)]
    alone = world.draw(pair)
    crowded = world.draw(pair + [Placed(Thing("green", "triangle"), 24, 16, 10)])
    assert shapes_score(alone, PROMPT) >= 0.95
    assert shapes_score(crowded, PROMPT) < 0.6 * shapes_score(alone, PROMPT)
    assert fully_aligned(alone, PROMPT) and not fully_aligned(crowded, PROMPT)


def test_regions_are_the_drawn_objects():
    placed = [Placed(Thing("yellow", "triangle"), 10.3, 9.7, 12), Placed(Thing("green", "circle"), 22.5, 22.1, 9)]
    regions = find_regions(world.draw(placed))
    assert [r.colour for r in regions] == ["yellow", "green"]
    for region, p in zip(regions, placed):
        assert max(region.shape_confidence, key=region.shape_confidence.get) == p.thing.shape
        assert region.side[p.thing.shape] == pytest.approx(p.side, abs=0.5)
        assert region.centre[p.thing.shape] == pytest.approx((p.cx, p.cy), abs=0.3)


def test_scores_are_soft_and_in_range():
    """Pairing sorts by score: near-misses get distinct scores between 0 and 1, not ties at 0 or 1."""
    rng = random.Random(3)
    scene = world.parse(PROMPT)
    scores = []
    for _ in range(20):
        image = np.asarray(world.render(scene, rng)[0]).astype(np.float32)
        noisy = image + np.random.default_rng(len(scores)).normal(0, 25, image.shape)  # a blurry, noisy model
        scores.append(shapes_score(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), PROMPT))
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(np.round(scores, 6))) == len(scores)


def test_facts_name_what_is_wrong():
    image = drawings(world.parse(PROMPT), 1)[0]
    found, penalty = facts(image, world.parse("a red circle below a blue square"))
    assert found["first"] > 0.9 and found["second"] > 0.9 and found["relation"] < 0.05 and penalty == 1.0


def test_reward_interface_checks_prompts_at_start_up():
    reward = ShapesReward()
    image = drawings(world.parse(PROMPT), 1)[0]
    assert reward.score([image, image], [PROMPT, "a blue circle above a red square"]) == [
        shapes_score(image, PROMPT), shapes_score(image, "a blue circle above a red square")
    ]
    ShapesReward.check_prompts([PROMPT])
    with pytest.raises(UserError, match="a cat playing chess"):
        ShapesReward.check_prompts([PROMPT, "a cat playing chess"])
