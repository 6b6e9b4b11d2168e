"""Scenes, captions and drawings of the shapes world.

A scene is two flat objects (a colour and a shape each) on a plain background, 32x32 px. Its
caption comes from one of three templates that mirror the release's three prompt families:

    binding   "a red circle and a blue square"                     (attribute binding)
    relation  "a red circle above a blue square"                   (spatial: above, below,
              "a red circle to the left of a blue square"           to the left of, to the right of)
    size      "a big red circle and a small blue square"            (a third attribute to bind)

Every word is one CLIP token, so an object's word position (`item_idx`) is its shape noun.

The 36 unordered object pairs whose two objects differ in colour and in shape are split, once and
for all, into 24 the model is trained on (`pretrain`), 6 whose prompts D-Fusion trains on
(`train`: config/prompt/shapes_train.json) and 6 held out for evaluation (`test`:
shapes_test.json). The model has seen every colour and every shape, and every object, but never
the two objects of a `train` or `test` prompt together: the combinations where text-to-image models
misalign most.
"""

import itertools
import json
import os
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
BACKGROUND = (240, 240, 240)
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "to the left of", "to the right of")
SIDES = {"": (9, 12), "big": (13, 15), "small": (6, 8)}  # object side in px, by size word
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str = ""  # "", "big" or "small"

    @property
    def words(self):
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)


@dataclass(frozen=True)
class Scene:
    """What a caption says: two things, and how they relate ("and" or one of RELATIONS)."""

    first: Thing
    second: Thing
    relation: str = "and"

    @property
    def family(self):
        if self.relation != "and":
            return "relation"
        return "size" if self.first.size else "binding"

    @property
    def things(self):
        return (self.first, self.second)


def caption(scene):
    return f"a {scene.first.words} {scene.relation} a {scene.second.words}"


_THING = r"a (?:(big|small) )?(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")"
_CAPTION = re.compile(rf"^{_THING} (and|{'|'.join(RELATIONS)}) {_THING}$")


def parse(prompt):
    """The scene a caption describes (the inverse of `caption`); None for any other text."""
    match = _CAPTION.match(prompt.strip().lower())
    if match is None:
        return None
    size1, colour1, shape1, relation, size2, colour2, shape2 = match.groups()
    if bool(size1) != bool(size2) or (size1 and relation != "and"):
        return None
    return Scene(Thing(colour1, shape1, size1 or ""), Thing(colour2, shape2, size2 or ""), relation)


def item_positions(prompt):
    """0-based word positions of the two shape nouns (the release's item_idx)."""
    words = prompt.split()
    return [i for i, word in enumerate(words) if word in SHAPES]


# --- the split of object pairs -------------------------------------------------------------------

def object_pairs():
    """The 36 unordered pairs of (colour, shape) objects that differ in both colour and shape."""
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    return [(a, b) for a, b in itertools.combinations(objects, 2) if a[0] != b[0] and a[1] != b[1]]


def pair_split(seed=0):
    """{"pretrain": 24 pairs, "train": 6, "test": 6}, fixed by `seed`."""
    pairs = object_pairs()
    random.Random(seed).shuffle(pairs)
    return {"pretrain": pairs[:24], "train": pairs[24:30], "test": pairs[30:]}


def scenes_of_pair(pair):
    """Every scene of the pair's two objects: both orders, each family (2 x 7 = 14 scenes)."""
    scenes = []
    for (c1, s1), (c2, s2) in (pair, pair[::-1]):
        scenes.append(Scene(Thing(c1, s1), Thing(c2, s2)))
        scenes += [Scene(Thing(c1, s1), Thing(c2, s2), relation) for relation in RELATIONS]
        scenes += [Scene(Thing(c1, s1, a), Thing(c2, s2, b)) for a, b in (("big", "small"), ("small", "big"))]
    return scenes


def split_scenes(split, seed=0):
    return [scene for pair in pair_split(seed)[split] for scene in scenes_of_pair(pair)]


# --- layout and drawing ------------------------------------------------------------------------

@dataclass(frozen=True)
class Placed:
    thing: Thing
    cx: float  # centre, in px of the 32x32 image
    cy: float
    side: float  # width = height, in px


def _separated(a, b, gap=2.0):
    return abs(a.cx - b.cx) >= (a.side + b.side) / 2 + gap or abs(a.cy - b.cy) >= (a.side + b.side) / 2 + gap


def relation_holds(relation, a, b, margin=0.0):
    """Does `a` stand in `relation` to `b`? The displacement along the relation's axis must be
    positive and exceed the other axis' by `margin` px (a clear "above", not a diagonal)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # y grows downwards
    along = {"above": dy, "below": -dy, "to the left of": dx, "to the right of": -dx}[relation]
    across = abs(dx) if relation in ("above", "below") else abs(dy)
    return along > 0 and along - across >= margin


def layout(scene, rng):
    """Random positions and sizes for the scene's two things (the relation holds by a 4 px margin)."""
    while True:
        placed = []
        for thing in scene.things:
            side = rng.uniform(*SIDES[thing.size])
            lo, hi = side / 2 + 1, IMAGE_SIZE - side / 2 - 1
            placed.append(Placed(thing, rng.uniform(lo, hi), rng.uniform(lo, hi), side))
        a, b = placed
        if _separated(a, b) and (scene.relation == "and" or relation_holds(scene.relation, a, b, margin=4.0)):
            return placed


def shape_polygon(shape, cx, cy, side):
    """The outline of a shape: a bounding box for circle and square, three corners for a triangle
    (apex up, base along the bottom of the box)."""
    h = side / 2
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    return [(cx - h, cy - h), (cx + h, cy + h)]


def coverage(shape, cx, cy, side, size=IMAGE_SIZE):
    """(size, size) float array in [0, 1]: how much of each pixel the shape covers (drawn at 4x, box-filtered)."""
    s = SUPERSAMPLE
    mask = Image.new("L", (s * size,) * 2, 0)
    outline = [(x * s, y * s) for x, y in shape_polygon(shape, cx, cy, side)]
    pen = ImageDraw.Draw(mask)
    {"circle": pen.ellipse, "square": pen.rectangle, "triangle": pen.polygon}[shape](outline, fill=255)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def draw(placed, size=IMAGE_SIZE):
    """An RGB PIL image of the placed things, in order (a later thing is drawn over an earlier one)."""
    image = np.broadcast_to(np.array(BACKGROUND, np.float32), (size, size, 3)).copy()  # (H, W, 3)
    for p in placed:
        alpha = coverage(p.thing.shape, p.cx, p.cy, p.side, size)[..., None]  # (H, W, 1)
        image = image * (1 - alpha) + np.array(COLOURS[p.thing.colour], np.float32) * alpha
    return Image.fromarray(np.round(image).astype(np.uint8))


def render(scene, rng):
    """A random drawing of `scene`: (PIL image, the placed things)."""
    placed = layout(scene, rng)
    return draw(placed), placed


# --- prompt files (the release's format) -------------------------------------------------------

PROMPT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "config", "prompt")


def demo_scenes(seed=0):
    """Four `train` scenes for the demo: one binding, an "above", a "to the left of", one size."""
    scenes = split_scenes("train", seed)
    wanted = ("and", "above", "to the left of")
    picks = [next(s for s in scenes if s.relation == r and not s.first.size) for r in wanted]
    return picks + [next(s for s in scenes if s.family == "size")]


def write_prompt_files(mask_threshold, folder=PROMPT_DIR, seed=0):
    """The release's prompt files for the shapes world: shapes_train.json, shapes_test.json and
    shapes_demo.json (JSON lists of prompts), shapes_item.json ({prompt: word positions of its two
    objects}) and shapes_mask.json ({prompt: [threshold per object]}, the same for every prompt)."""
    prompts = {split: [caption(scene) for scene in split_scenes(split, seed)] for split in ("train", "test")}
    everything = prompts["train"] + prompts["test"]
    files = {
        "shapes_train.json": prompts["train"],
        "shapes_test.json": prompts["test"],
        "shapes_demo.json": [caption(scene) for scene in demo_scenes(seed)],
        "shapes_item.json": {p: item_positions(p) for p in everything},
        "shapes_mask.json": {p: [mask_threshold] * 2 for p in everything},
    }
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=1)
            f.write("\n")
    return files


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m d_fusion.shapes.world MASK_THRESHOLD  (writes config/prompt/shapes_*.json)")
    print(", ".join(write_prompt_files(float(sys.argv[1]))))
