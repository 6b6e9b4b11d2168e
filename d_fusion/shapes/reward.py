"""An exact alignment reward for the shapes world: find the objects, score the prompt's facts.

1. Segment: a pixel is read as a blend of the background and one palette colour c (red, green,
   blue, yellow), p ~ bg + a (c - bg): the colour whose blend line passes nearest to it; it belongs
   to c when a > 1/2 (anti-aliased edges go to the side that covers more of the pixel), else to the
   background. Same-colour 4-connected regions of at least `MIN_AREA` px are the image's objects.
2. Describe each object softly, from its coverage a (the blend, over its pixels and their rim):
   - colour confidence  exp(-d^2 / 2 sigma_c^2), d the median RGB distance of its pixels to their
     blend line (sigma_c = 45);
   - shape confidence   for each shape s, the shape drawn (`world.coverage`) with the region's area
     and coverage-weighted centre (the best of a few sizes and heights around that), and its soft
     IoU_s = sum min(a, t_s) / sum max(a, t_s) with the region;
     L_s = exp(-(1 - IoU_s)^2 / 2 sigma_s^2) (sigma_s = 0.05), p_s = L_s / (sum L + e^-4.5)
     (no shape fits a blob);
   - size confidence    1 when the side the shape has at that area lies in the size word's range
     (world.SIDES: small 6-8 px, big 13-15), falling off outside it as exp(-e^2 / 2 sigma^2),
     e the distance to the range in px (sigma = 0.7).
3. The prompt's facts, under the assignment of distinct objects to the two things that makes them
   most confident: each thing's confidence (colour x shape [x size]); for a relation prompt the
   relation's, sigmoid(along) x sigmoid(along - across), along and across the displacement of the
   two box centres (px) on the relation's axis and across it.
4. Score = mean(thing confidences) x relation confidence (relation prompts)
           x 0.5 ** (extra objects of at least `EXTRA_AREA` px, each weighted by min(1, area / 20)),
   in [0, 1].

An image is *fully aligned* when every fact's confidence is above 0.5 and no extra object is there.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np

from d_fusion.errors import UserError
from d_fusion.shapes import world

PALETTE = np.array([world.BACKGROUND] + list(world.COLOURS.values()), dtype=np.float32)  # (5, 3): background first
MIN_AREA = 3  # px: smaller regions are edge noise
EXTRA_AREA = 6  # px: an unexplained region this large counts against the score
SIGMA_COLOUR, SIGMA_SHAPE, SIGMA_SIDE = 45.0, 0.05, 0.7


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@dataclass
class Region:
    colour: str
    pixels: np.ndarray  # (H, W) bool: the pixels the colour covers more than half of
    area: float  # px covered (sum of the colour's coverage over the region)
    colour_confidence: float
    shape_confidence: dict  # {shape: p}
    side: dict  # {shape: side in px of that shape with the region's area}
    centre: dict  # {shape: (x, y) in px of that shape's box, fitted to the region}


# area of a shape of side s, over s^2; where its coverage-weighted centre lies below its box centre, over s
AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}


def _connected_regions(mask):
    """The 4-connected regions of a (H, W) bool array, each a list of (y, x)."""
    todo = mask.copy()
    regions = []
    for y0, x0 in zip(*np.nonzero(todo)):
        if not todo[y0, x0]:
            continue
        todo[y0, x0] = False
        stack, region = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and todo[ny, nx]:
                    todo[ny, nx] = False
                    stack.append((ny, nx))
        regions.append(region)
    return regions


def _dilate(mask):
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def palette_blend(rgb):
    """Per pixel, the colour whose blend line bg + a (c - bg) passes nearest: (index (H, W) into
    world.COLOURS, its blend a (H, W) in [0, 1], the distance (H, W) to that line)."""
    background, colours = PALETTE[0], PALETTE[1:]  # (3,), (4, 3)
    direction = colours - background  # (4, 3)
    offset = rgb[:, :, None, :] - background  # (H, W, 1, 3)
    blend = np.clip((offset * direction).sum(-1) / (direction**2).sum(-1), 0, 1)  # (H, W, 4)
    residual = np.linalg.norm(offset - blend[..., None] * direction, axis=-1)  # (H, W, 4)
    nearest = residual.argmin(axis=-1)  # (H, W)
    pick = lambda a: np.take_along_axis(a, nearest[..., None], -1)[..., 0]  # noqa: E731
    return nearest, pick(blend), pick(residual)


def soft_iou(a, b):
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def shape_fit(alpha):
    """Per shape, (soft IoU of the region's coverage with that shape drawn with the region's area and
    coverage-weighted centre, the side and box centre it then has), the best of a few sides (+-6%)
    and heights (+-0.5 px) around that. alpha: (H, W) coverage of the region's colour, 0 elsewhere."""
    area = float(alpha.sum())
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    fits = {}
    for shape in world.SHAPES:
        candidates = []
        for scale, shift in itertools.product((0.94, 1.0, 1.06), (-0.5, 0.0, 0.5)):
            side = scale * math.sqrt(area / AREA[shape])
            centre = (cx, cy - CENTROID_DROP[shape] * side + shift)
            candidates.append((soft_iou(alpha, world.coverage(shape, *centre, side, alpha.shape[0])), side, centre))
        fits[shape] = max(candidates)
    return fits


def shape_confidence(iou):
    likelihood = {s: math.exp(-((1 - v) ** 2) / (2 * SIGMA_SHAPE**2)) for s, v in iou.items()}
    total = sum(likelihood.values()) + math.exp(-4.5)
    return {s: v / total for s, v in likelihood.items()}


def find_regions(image):
    """The objects of an image (PIL RGB or (H, W, 3) uint8), largest first."""
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)  # (H, W, 3)
    nearest, blend, distance = palette_blend(rgb)
    regions = []
    for k, colour in enumerate(world.COLOURS):
        of_colour = nearest == k
        for coords in _connected_regions(of_colour & (blend > 0.5)):
            if len(coords) < MIN_AREA:
                continue
            ys, xs = np.array(coords).T
            core = np.zeros(nearest.shape, bool)
            core[ys, xs] = True
            alpha = np.where(_dilate(core) & of_colour, blend, 0.0)  # the core and its anti-aliased rim
            fits = shape_fit(alpha)
            median = float(np.median(distance[ys, xs]))
            regions.append(Region(
                colour=colour,
                pixels=core,
                area=float(alpha.sum()),
                colour_confidence=math.exp(-(median**2) / (2 * SIGMA_COLOUR**2)),
                shape_confidence=shape_confidence({s: fit[0] for s, fit in fits.items()}),
                side={s: fit[1] for s, fit in fits.items()},
                centre={s: fit[2] for s, fit in fits.items()},
            ))
    return sorted(regions, key=lambda r: -r.area)


def size_confidence(size, side):
    lo, hi = world.SIDES[size]
    outside = max(lo - side, side - hi, 0.0)
    return math.exp(-(outside**2) / (2 * SIGMA_SIDE**2))


def thing_confidence(thing, region):
    """How surely `region` is `thing` (colour x shape, x size when the prompt names one)."""
    if region.colour != thing.colour:
        return 0.0
    confidence = region.colour_confidence * region.shape_confidence[thing.shape]
    if thing.size:
        confidence *= size_confidence(thing.size, region.side[thing.shape])
    return confidence


def relation_confidence(relation, a, b):
    """How surely the box centre a = (x, y) stands in `relation` to b (y grows downwards)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along = {"above": dy, "below": -dy, "to the left of": dx, "to the right of": -dx}[relation]
    across = abs(dx) if relation in ("above", "below") else abs(dy)
    return sigmoid(along) * sigmoid(along - across)


def _assignments(regions):
    """(first, second) region choices: distinct regions, or None for a thing not found."""
    options = list(range(len(regions))) + [None]
    return [(i, j) for i, j in itertools.product(options, options) if i is None or i != j]


def match(regions, scene):
    """(index of the first thing's region, of the second's), None for a thing not found: the
    assignment of distinct regions that makes the two things most confident."""
    def conf(thing, index):
        return 0.0 if index is None else thing_confidence(thing, regions[index])

    return max(_assignments(regions), key=lambda ij: conf(scene.first, ij[0]) + conf(scene.second, ij[1]))


def facts(image, scene):
    """({fact: confidence in [0, 1]}, penalty factor of the extra regions) of `image` for `scene`."""
    regions = find_regions(image)
    first, second = match(regions, scene)
    found = {
        name: 0.0 if index is None else thing_confidence(thing, regions[index])
        for name, thing, index in (("first", scene.first, first), ("second", scene.second, second))
    }
    if scene.relation != "and":
        found["relation"] = 0.0 if first is None or second is None else relation_confidence(
            scene.relation, regions[first].centre[scene.first.shape], regions[second].centre[scene.second.shape]
        )
    extras = [r for k, r in enumerate(regions) if k not in (first, second) and r.area >= EXTRA_AREA]
    penalty = 0.5 ** sum(min(1.0, r.area / 20) for r in extras)
    return found, penalty


def scene_of(prompt):
    scene = world.parse(prompt)
    if scene is None:
        raise UserError(f"the shapes reward cannot read the prompt {prompt!r}: it scores captions of the shapes "
                        "world (config/prompt/shapes_*.json), e.g. 'a red circle above a blue square'")
    return scene


def shapes_score(image, prompt):
    found, penalty = facts(image, scene_of(prompt))
    return penalty * (found["first"] + found["second"]) / 2 * found.get("relation", 1.0)


def fully_aligned(image, prompt):
    found, penalty = facts(image, scene_of(prompt))
    return penalty == 1.0 and min(found.values()) > 0.5


class ShapesReward:
    """The reward interface (`d_fusion.rewards`): `score(images, prompts)` -> list of floats in [0, 1]."""

    name = "shapes"

    @classmethod
    def from_config(cls, config):
        return cls()

    @staticmethod
    def check_prompts(prompts):
        for prompt in prompts:
            scene_of(prompt)

    @staticmethod
    def settings(config):
        """Nothing but its name decides its scores."""
        return []

    def score(self, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return [shapes_score(image, prompt) for image, prompt in zip(images, prompts)]
