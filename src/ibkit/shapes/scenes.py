"""Scenes of the shapes benchmark: where shapes go, and what can be said about them.

A scene is 1-4 non-overlapping shapes, each a unique (colour, shape) pair, so "the red circle" always
names one object. Captions and questions are derived from the scene alone, never from what was drawn.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from itertools import product

from ibkit.shapes.render import COLORS, SHAPES, TEXT_BAND, Scene, ShapeObject

SIZE_WORDS = ("small", "large")
SIZE_RANGES = {"small": (0.085, 0.105), "large": (0.135, 0.16)}  # half-extent, normalised
GAP = 0.03  # minimum free space between two shapes' bounding boxes
MARGIN = 0.02  # minimum free space to the image border
SIDE_THRESHOLD = 0.15  # "on the left/right" is asked only when the centre is this far from the middle
BACKGROUNDS = ((245, 245, 245), (240, 236, 226), (232, 240, 246), (238, 245, 234))
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(product(COLORS, SHAPES))
# NoCaps-style novel objects: each colour and each shape still occurs in training, only these combinations never.
NOVEL_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "star"),
    ("yellow", "square"),
    ("purple", "circle"),
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(pair for pair in ALL_PAIRS if pair not in NOVEL_PAIRS)


# ------------------------------------------------------------------------------------------------ geometry


def _separated(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Boxes (cx, cy, half_w, half_h) are apart by at least GAP along x or along y."""
    return abs(a[0] - b[0]) >= a[2] + b[2] + GAP or abs(a[1] - b[1]) >= a[3] + b[3] + GAP


def place_boxes(
    rng: random.Random,
    half_extents: Sequence[tuple[float, float]],
    y_range: tuple[float, float],
    attempts: int = 60,
) -> list[tuple[float, float]] | None:
    """Centres for boxes of the given half extents, none overlapping, all inside; None if it did not fit."""
    placed: list[tuple[float, float, float, float]] = []
    for half_w, half_h in half_extents:
        x_low, x_high = half_w + MARGIN, 1 - half_w - MARGIN
        y_low, y_high = y_range[0] + half_h + MARGIN, y_range[1] - half_h - MARGIN
        if x_low > x_high or y_low > y_high:
            return None
        for _ in range(attempts):
            box = (round(rng.uniform(x_low, x_high), 4), round(rng.uniform(y_low, y_high), 4), half_w, half_h)
            if all(_separated(box, other) for other in placed):
                placed.append(box)
                break
        else:
            return None
    return [(box[0], box[1]) for box in placed]


def _y_range(words: dict[str, str]) -> tuple[float, float]:
    return (TEXT_BAND if "top" in words else 0.0, 1 - TEXT_BAND if "bottom" in words else 1.0)


def draw_radius(rng: random.Random, size: str) -> float:
    """A half-extent for a shape of ``size`` ("small" | "large"), rounded as stored."""
    return round(rng.uniform(*SIZE_RANGES[size]), 4)


def sample_scene(
    rng: random.Random,
    num_objects: int,
    pairs: Sequence[tuple[str, str]],
    words: dict[str, str] | None = None,
    include: Sequence[tuple[str, str]] = (),
    tries: int = 200,
) -> Scene:
    """A scene of ``num_objects`` distinct (colour, shape) pairs from ``pairs`` (plus ``include``)."""
    words = dict(words or {})
    remaining = [pair for pair in pairs if pair not in include]
    chosen = list(include) + rng.sample(remaining, num_objects - len(include))
    rng.shuffle(chosen)
    for attempt in range(tries):
        # After many failures (crowded scenes with text bands) fall back to small shapes, which always fit.
        sizes = [rng.choice(SIZE_WORDS) if attempt < tries // 2 else "small" for _ in chosen]
        radii = [draw_radius(rng, size) for size in sizes]
        centres = place_boxes(rng, [(r, r) for r in radii], _y_range(words))
        if centres is not None:
            objects = tuple(
                ShapeObject(color, shape, size, x, y, r)
                for (color, shape), size, r, (x, y) in zip(chosen, sizes, radii, centres)
            )
            return Scene(objects, rng.choice(BACKGROUNDS), words)
    raise RuntimeError(f"could not place {num_objects} shapes after {tries} tries (words: {words})")


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """``a`` is clearly ``relation`` ``b``: their extents along that axis do not overlap."""
    if relation == "left of":
        return a.x + a.r < b.x - b.r
    if relation == "right of":
        return a.x - a.r > b.x + b.r
    if relation == "above":
        return a.y + a.r < b.y - b.r
    if relation == "below":
        return a.y - a.r > b.y + b.r
    raise ValueError(f"unknown relation {relation!r}; known relations: {sorted(RELATIONS)}")


def object_name(obj: ShapeObject) -> str:
    """How captions and questions name ``obj``: "red circle"."""
    return f"{obj.color} {obj.shape}"


# ------------------------------------------------------------------------------------------------ language


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article ("an orange circle", "a red star")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(scene: Scene) -> list[str]:
    """Reference captions (several phrasings, like the 5 human captions of COCO), all derived from the scene."""
    objects = scene.objects
    by_x = sorted(objects, key=lambda obj: obj.x)
    by_y = sorted(objects, key=lambda obj: obj.y)
    sized = _join([_a(f"{obj.size} {object_name(obj)}") for obj in by_x])
    plain = _join([_a(object_name(obj)) for obj in by_x])
    references = [sized, plain, _join([_a(f"{obj.size} {object_name(obj)}") for obj in by_y])]
    if len(objects) == 1:
        references += [f"a single {object_name(objects[0])} on a plain background", f"a picture of {sized}"]
    else:
        references.append(f"{NUMBER_WORDS[len(objects)]} shapes: {plain}")
        left, right = by_x[0], by_x[-1]
        if len(objects) == 2 and relation_holds(left, right, "left of"):
            references.append(f"{_a(object_name(left))} to the left of {_a(object_name(right))}")
        else:
            references.append(f"a picture of {plain}")
    return list(dict.fromkeys(references))


def _bin(value: float, low: str, high: str) -> str:
    """``low``/``high`` when ``value`` is SIDE_THRESHOLD or more from the middle (as qa_pool's side answers), else middle."""
    if abs(value - 0.5) >= SIDE_THRESHOLD:
        return low if value < 0.5 else high
    return "middle"


def position_bins(obj: ShapeObject) -> tuple[str, str]:
    """(left | middle | right, top | middle | bottom) of the object's centre; y grows downwards."""
    return _bin(obj.x, "left", "right"), _bin(obj.y, "top", "bottom")


def position_phrase(obj: ShapeObject) -> str:
    """"on the left", "at the top", "at the bottom right", "in the middle"."""
    x, y = position_bins(obj)
    if x == "middle" and y == "middle":
        return "in the middle"
    if y == "middle":
        return f"on the {x}"
    return f"at the {y}" if x == "middle" else f"at the {y} {x}"


def describe(scene: Scene) -> str:
    """One sentence per object, in the scene's own (random) order: "A large red circle on the left.".

    The language of the text corpus (:mod:`ibkit.shapes.text_corpus`) the demo's LM learns from, and one of
    the pre-training captions: BLIP-2 aligns images with text the LM already reads."""
    sentences = []
    for obj in scene.objects:
        phrase = f"{obj.size} {object_name(obj)}"
        sentences.append(f"{'An' if phrase[0] in 'aeiou' else 'A'} {phrase} {position_phrase(obj)}.")
    return " ".join(sentences)


def qa_pool(scene: Scene, absent_pairs: Sequence[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Every unambiguous (question, answer) the scene supports, by question type.

    ``absent_pairs`` are the pairs an "Is there a ...?" question may name when answering "no"
    (held-in data passes TRAIN_PAIRS so novel pairs are never even mentioned).
    """
    objects = scene.objects
    shape_counts = Counter(obj.shape for obj in objects)
    color_counts = Counter(obj.color for obj in objects)
    present = {(obj.color, obj.shape) for obj in objects}
    pool: dict[str, list[tuple[str, str]]] = {
        "color": [
            (f"What color is the {obj.shape}?", obj.color) for obj in objects if shape_counts[obj.shape] == 1
        ],
        "shape": [
            (f"What shape is the {obj.color} object?", obj.shape)
            for obj in objects
            if color_counts[obj.color] == 1
        ],
        "count": [("How many shapes are there?", str(len(objects)))]
        + [(f"How many {shape}s are there?", str(count)) for shape, count in sorted(shape_counts.items())]
        + [
            (f"How many {color} shapes are there?", str(count))
            for color, count in sorted(color_counts.items())
        ],
        "exists_yes": [(f"Is there {_a(object_name(obj))}?", "yes") for obj in objects],
        "exists_no": [
            (f"Is there {_a(f'{c} {s}')}?", "no") for c, s in absent_pairs if (c, s) not in present
        ],
        "size": [(f"Is the {object_name(obj)} small or large?", obj.size) for obj in objects],
        "side": [
            (
                f"Is the {object_name(obj)} on the left or on the right of the picture?",
                "left" if obj.x < 0.5 else "right",
            )
            for obj in objects
            if abs(obj.x - 0.5) >= SIDE_THRESHOLD
        ],
    }
    return pool


QA_TYPES = ("color", "shape", "count", "exists", "size", "side")


def pick_qa(
    rng: random.Random, pool: dict[str, list[tuple[str, str]]], types: Sequence[str] = QA_TYPES
) -> tuple[str, str, str]:
    """(question, answer, question type): a type uniformly among those with questions, yes/no balanced."""
    available = [
        t for t in types if (t == "exists" and (pool["exists_yes"] or pool["exists_no"])) or pool.get(t)
    ]
    if not available:
        raise ValueError(f"no question of types {list(types)} fits this scene")
    qtype = rng.choice(available)
    if qtype == "exists":
        key = rng.choice([k for k in ("exists_yes", "exists_no") if pool[k]])
        question, answer = rng.choice(pool[key])
    else:
        question, answer = rng.choice(pool[qtype])
    return question, answer, qtype

