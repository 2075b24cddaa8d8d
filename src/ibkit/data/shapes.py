"""ibkit-shapes: a built-in synthetic instruction benchmark that mirrors the paper's split of tasks.

Scenes of 1-4 coloured shapes (6 colours x 4 shapes), optional written words and 8-frame clips of a
moving shape are generated from a seed and written to disk as annotation JSON + PNG/mp4 files under
``<root>/shapes/<dataset>/``. They are read back through the dataset registry like any real dataset,
so the CPU demo exercises exactly the code path of the 26 real datasets.

Held-in (training): captioning, VQA, VQG, scene-text VQA (OCR-VQA-like), multiple-choice VQA
(A-OKVQA-like). Held-out (zero-shot): spatial true/false (VSR), counting with options (IconQA),
context + options (ScienceQA), yes/no classification scored by AUC (HatefulMemes), dialog with
candidates (Visual Dialog), video QA (MSVD-QA) and captions of colour-shape pairs that never occur in
held-in data (NoCaps).

Every answer is derived from the scene geometry stored beside it (``extra["scene"]``); shapes never
overlap and every object is a unique (colour, shape) pair, so "the red circle" always names one object.
Scenes contain left/right questions and captions: train on them without horizontal flips, and without
crops that can cut shapes off (counts would change).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import product
from pathlib import Path

from ibkit.data.errors import SkipCounter
from ibkit.data.registry import (
    GEN_QUESTION,
    GEN_SHORT,
    PROMPT_CAPTION,
    PROMPT_OCR_QA,
    PROMPT_SHORT_QA,
    PROMPT_VQG,
    DatasetSpec,
    list_specs,
    register,
)
from ibkit.data.sample import Sample
from ibkit.data.shapes_render import (
    COLORS,
    SHAPES,
    TEXT_BAND,
    Scene,
    ShapeObject,
    check_image_size,
    render_image,
    save_png,
    write_clip,
)

GENERATOR_VERSION = 1  # bump when the generated content changes: old folders then fail the manifest check
SUITE = "shapes"
SIZE_WORDS = ("small", "large")
SIZE_RANGES = {"small": (0.085, 0.105), "large": (0.135, 0.16)}  # half-extent, normalised
GAP = 0.03  # minimum free space between two shapes' bounding boxes
MARGIN = 0.02  # minimum free space to the image border
SIDE_THRESHOLD = 0.15  # "on the left/right" is asked only when the centre is this far from the middle
BACKGROUNDS = ((245, 245, 245), (240, 236, 226), (232, 240, 246), (238, 245, 234))
# Scene text for the OCR task; no colour or shape names, so reading and seeing never get mixed up.
# fmt: off
WORDS = (
    "cat", "dog", "sun", "map", "box", "key", "cup", "hat", "pen", "car", "bus", "tree", "bird", "fish", "book",
    "door", "lamp", "milk", "rain", "ship", "frog", "kite", "ball", "moon", "road", "shoe", "bell", "leaf", "coin",
    "rose",
)
# fmt: on
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
DIRECTIONS = ("left", "right", "up", "down")
NUM_CLIP_FRAMES = 8  # the video loader takes 4 uniformly spaced frames (0, 2, 4, 6)
CORNERS = {"circle": 0, "triangle": 3, "square": 4, "star": 10}
WARM_COLORS = ("red", "orange", "yellow")
COOL_COLORS = ("green", "blue", "purple")

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(product(COLORS, SHAPES))
# NoCaps-style novel objects: each colour and each shape still occurs in training, only these combinations never.
NOVEL_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "star"),
    ("yellow", "square"),
    ("purple", "circle"),
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(pair for pair in ALL_PAIRS if pair not in NOVEL_PAIRS)

NUM_MC_OPTIONS = 4  # multiple-choice VQA (A-OKVQA-like) and ScienceQA-like
NUM_ICONQA_OPTIONS = 3
NUM_DIALOG_CANDIDATES = 15
NUM_DIALOG_ROUNDS = 4
DIALOG_VOCAB: tuple[str, ...] = (*COLORS, *SHAPES, *"01234", "yes", "no", *SIZE_WORDS, "left", "right")
VIDEO_VOCAB: tuple[str, ...] = (*DIRECTIONS, *COLORS, *SHAPES)
TRUE_FALSE = ("false", "true")  # candidate order of the registry's VSR convention: label 1 = true
NO_YES = ("no", "yes")  # HatefulMemes convention: label 1 = yes
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
VQA_ANSWER_COPIES = 10  # VQAv2 has 10 annotator answers; identical copies make the VQA metric exact

DEFAULT_SIZES = {"train": 2000, "val": 100, "test": 200}
TINY_SIZES = {"train": 6, "val": 3, "test": 6}

Record = dict  # the annotation fields of one sample (question, answers, candidates, ...)


# ------------------------------------------------------------------------------------------------ geometry


def _separated(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Boxes (cx, cy, half_w, half_h) are apart by at least GAP along x or along y."""
    return abs(a[0] - b[0]) >= a[2] + b[2] + GAP or abs(a[1] - b[1]) >= a[3] + b[3] + GAP


def _place(
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


def _draw_size(rng: random.Random, size: str) -> float:
    return round(rng.uniform(*SIZE_RANGES[size]), 4)


def _sample_scene(
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
        radii = [_draw_size(rng, size) for size in sizes]
        centres = _place(rng, [(r, r) for r in radii], _y_range(words))
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


def _name(obj: ShapeObject) -> str:
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
    sized = _join([_a(f"{obj.size} {_name(obj)}") for obj in by_x])
    plain = _join([_a(_name(obj)) for obj in by_x])
    references = [sized, plain, _join([_a(f"{obj.size} {_name(obj)}") for obj in by_y])]
    if len(objects) == 1:
        references += [f"a single {_name(objects[0])} on a plain background", f"a picture of {sized}"]
    else:
        references.append(f"{NUMBER_WORDS[len(objects)]} shapes: {plain}")
        left, right = by_x[0], by_x[-1]
        if len(objects) == 2 and relation_holds(left, right, "left of"):
            references.append(f"{_a(_name(left))} to the left of {_a(_name(right))}")
        else:
            references.append(f"a picture of {plain}")
    return list(dict.fromkeys(references))


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
        "exists_yes": [(f"Is there {_a(_name(obj))}?", "yes") for obj in objects],
        "exists_no": [
            (f"Is there {_a(f'{c} {s}')}?", "no") for c, s in absent_pairs if (c, s) not in present
        ],
        "size": [(f"Is the {_name(obj)} small or large?", obj.size) for obj in objects],
        "side": [
            (
                f"Is the {_name(obj)} on the left or on the right of the picture?",
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


def _options(rng: random.Random, answer: str, universe: Sequence[str], count: int) -> tuple[list[str], int]:
    """``count`` shuffled options: the answer plus distinct distractors from ``universe``."""
    distractors = rng.sample([option for option in universe if option != answer], count - 1)
    options = [answer, *distractors]
    rng.shuffle(options)
    return options, options.index(answer)


# ------------------------------------------------------------------------------------------------ tasks
# Each maker draws one sample: (annotation fields, scene). Held-in makers use TRAIN_PAIRS only.


def _plain_scene(rng: random.Random, pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS, most: int = 4) -> Scene:
    return _sample_scene(rng, rng.randint(1, most), pairs)


def _make_caption(rng: random.Random) -> tuple[Record, Scene]:
    scene = _plain_scene(rng)
    return {"answers": captions_for(scene)}, scene


def _make_vqa(rng: random.Random) -> tuple[Record, Scene]:
    scene = _plain_scene(rng)
    question, answer, qtype = pick_qa(rng, qa_pool(scene, TRAIN_PAIRS))
    return {
        "question": question,
        "answers": [answer] * VQA_ANSWER_COPIES,
        "extra": {"question_type": qtype},
    }, scene


def _make_vqg(rng: random.Random) -> tuple[Record, Scene]:
    """Answer in, question out (the question is the target and the CIDEr reference)."""
    scene = _plain_scene(rng)
    question, answer, qtype = pick_qa(rng, qa_pool(scene, TRAIN_PAIRS))
    return {  # laid out like the registry's VQG readers: no question field, the question is the reference
        "answers": [question],
        "target": question,
        "extra": {"answer": answer, "question_type": qtype},
    }, scene


def _make_ocrvqa(rng: random.Random) -> tuple[Record, Scene]:
    bands = rng.choice([("top",), ("bottom",), ("top", "bottom")])
    words = dict(zip(bands, rng.sample(WORDS, len(bands))))
    scene = _sample_scene(rng, rng.randint(1, 3), TRAIN_PAIRS, words)
    if len(words) == 1:
        question = rng.choice(["What word is written in the image?", "What is written on the picture?"])
        answer = next(iter(words.values()))
    else:
        band = rng.choice(bands)
        question, answer = f"What word is written at the {band} of the image?", words[band]
    # OCR tokens as a scene-text detector would give them, sorted so their order does not give away the position.
    return {"question": question, "answers": [answer], "ocr_tokens": sorted(words.values())}, scene


def _make_mcvqa(rng: random.Random) -> tuple[Record, Scene]:
    scene = _plain_scene(rng)
    pool = qa_pool(scene, TRAIN_PAIRS)
    question, answer, qtype = pick_qa(rng, pool, ("color", "shape", "count"))
    universe = {"color": tuple(COLORS), "shape": SHAPES, "count": ("0", "1", "2", "3", "4")}[qtype]
    options, label = _options(rng, answer, universe, NUM_MC_OPTIONS)
    return {
        "question": question,
        "answers": [answer],
        "candidates": options,
        "label": label,
        "extra": {"question_type": qtype},
    }, scene


def _make_vsr(rng: random.Random) -> tuple[Record, Scene]:
    scene = _sample_scene(rng, rng.randint(2, 3), TRAIN_PAIRS)
    subject_index, object_index = rng.sample(range(len(scene.objects)), 2)
    subject, obj = scene.objects[subject_index], scene.objects[object_index]
    holding = [
        rel for rel in RELATIONS if relation_holds(subject, obj, rel)
    ]  # never empty: shapes do not overlap
    true_statement = rng.random() < 0.5
    relation = rng.choice(holding) if true_statement else OPPOSITE[rng.choice(holding)]
    statement = f"The {_name(subject)} is {RELATIONS[relation]} the {_name(obj)}."
    label = TRUE_FALSE.index("true" if true_statement else "false")
    return {
        "question": statement,
        "answers": [TRUE_FALSE[label]],
        "candidates": list(TRUE_FALSE),
        "label": label,
        "extra": {"relation": relation, "subj": subject_index, "obj": object_index},
    }, scene


ICONQA_MAX_COUNT = 4
ICONQA_MAX_DISTRACTORS = 2


def _make_iconqa(rng: random.Random) -> tuple[Record, Scene]:
    """Counting: the count is drawn first (uniform 1-4), so no answer dominates; other shapes distract."""
    count = rng.randint(1, ICONQA_MAX_COUNT)
    kind = rng.choice(["all", "shape", "color"])
    if kind == "all":
        question, counted, others = "How many shapes are there?", rng.sample(TRAIN_PAIRS, count), []
    else:
        axis = 1 if kind == "shape" else 0
        values = SHAPES if kind == "shape" else tuple(COLORS)
        # only attributes with enough training pairs to show ``count`` distinct objects of them
        value = rng.choice([v for v in values if sum(pair[axis] == v for pair in TRAIN_PAIRS) >= count])
        counted = rng.sample([pair for pair in TRAIN_PAIRS if pair[axis] == value], count)
        others = [pair for pair in TRAIN_PAIRS if pair[axis] != value]
        question = (
            f"How many {value}s are there?" if kind == "shape" else f"How many {value} shapes are there?"
        )
    distractors = rng.sample(others, min(len(others), rng.randint(0, ICONQA_MAX_DISTRACTORS)))
    scene = _sample_scene(rng, count + len(distractors), TRAIN_PAIRS, include=counted + distractors)
    answer = str(count)
    nearby = [str(v) for v in range(max(0, count - 2), count + 3)]
    options, label = _options(rng, answer, nearby, NUM_ICONQA_OPTIONS)
    return {"question": question, "answers": [answer], "candidates": options, "label": label}, scene


CORNER_CONTEXT = (
    "A circle has no corners. A triangle has 3 corners. A square has 4 corners. A star has 10 corners."
)
WARMTH_CONTEXT = "Red, orange and yellow are warm colors. Green, blue and purple are cool colors."


def _make_scienceqa(rng: random.Random) -> tuple[Record, Scene]:
    """A context sentence the image alone does not give (corner counts, warm/cool colours) + the image."""
    scene = _plain_scene(rng)
    color_counts = Counter(obj.color for obj in scene.objects)
    unique = [obj for obj in scene.objects if color_counts[obj.color] == 1]
    if unique and rng.random() < 0.5:
        target = rng.choice(unique)
        context, question = CORNER_CONTEXT, f"How many corners does the {target.color} shape have?"
        answer, universe = str(CORNERS[target.shape]), [str(v) for v in sorted(CORNERS.values())]
        kind = "corners"
    else:
        warmth = rng.choice(["warm", "cool"])
        palette = WARM_COLORS if warmth == "warm" else COOL_COLORS
        context, question = WARMTH_CONTEXT, f"How many shapes in the picture have a {warmth} color?"
        answer = str(sum(1 for obj in scene.objects if obj.color in palette))
        universe, kind = ["0", "1", "2", "3", "4"], warmth
    options, label = _options(rng, answer, universe, NUM_MC_OPTIONS)
    return {
        "question": question,
        "context": context,
        "answers": [answer],
        "candidates": options,
        "label": label,
        "extra": {"question_type": kind},
    }, scene


HATEFUL_QUESTION = "Does a shape in the image have this color?"


def _make_hatefulmemes(rng: random.Random) -> tuple[Record, Scene]:
    """A colour word is written on the image; "yes" iff a shape has that colour (needs text and image, like a meme)."""
    band = rng.choice(["top", "bottom"])
    scene = _sample_scene(rng, rng.randint(1, 3), TRAIN_PAIRS, {band: "?"})  # the word is chosen below
    present = sorted({obj.color for obj in scene.objects})
    absent = [color for color in COLORS if color not in present]
    label = 1 if rng.random() < 0.5 else 0
    word = rng.choice(present if label else absent)
    scene = Scene(scene.objects, scene.background, {band: word})
    return {
        "question": word,
        "answers": [NO_YES[label]],
        "candidates": list(NO_YES),
        "label": label,
        "ocr_tokens": [word],
    }, scene


def _make_visdial(rng: random.Random) -> tuple[Record, Scene]:
    """Caption + earlier question/answer rounds as history; rank candidates for the current question."""
    scene = _plain_scene(rng)
    pool = qa_pool(scene, TRAIN_PAIRS)
    rounds: list[tuple[str, str]] = []
    for _ in range(4 * NUM_DIALOG_ROUNDS):
        question, answer, _ = pick_qa(rng, pool)
        if question not in {q for q, _ in rounds}:
            rounds.append((question, answer))
        if len(rounds) == NUM_DIALOG_ROUNDS:
            break
    current = rng.randrange(len(rounds))
    caption = captions_for(scene)[0]
    # The Visual Dialog reader's layout: "<caption>. Q: <question> A: <answer>. Q: ..."
    context = " ".join([f"{caption}.", *(f"Q: {q} A: {a}." for q, a in rounds[:current])])
    question, answer = rounds[current]
    candidates, label = _options(rng, answer, DIALOG_VOCAB, NUM_DIALOG_CANDIDATES)
    return {
        "question": question,
        "context": context,
        "answers": [answer],
        "candidates": candidates,
        "label": label,
        "extra": {"caption": caption, "round": current, "dialog": [list(r) for r in rounds[:current]]},
    }, scene


def _make_msvdqa(rng: random.Random) -> tuple[Record, Scene]:
    """One shape moves in a straight line (others stay put); questions on direction, colour and shape."""
    num_objects = rng.randint(1, 2)
    chosen = rng.sample(TRAIN_PAIRS, num_objects)
    for _ in range(200):
        direction = rng.choice(DIRECTIONS)
        distance = round(rng.uniform(0.3, 0.4), 4)
        sizes = [rng.choice(SIZE_WORDS) for _ in chosen]
        radii = [_draw_size(rng, size) for size in sizes]
        horizontal = direction in ("left", "right")
        sweep = (radii[0] + distance / 2, radii[0]) if horizontal else (radii[0], radii[0] + distance / 2)
        centres = _place(rng, [sweep] + [(r, r) for r in radii[1:]], (0.0, 1.0))
        if centres is not None:
            break
    else:
        raise RuntimeError("could not place a moving shape")
    sign = -1 if direction in ("left", "up") else 1
    step = round(sign * distance / (NUM_CLIP_FRAMES - 1), 5)
    (mx, my), travel = centres[0], step * (NUM_CLIP_FRAMES - 1)
    start = (round(mx - travel / 2, 4), my) if horizontal else (mx, round(my - travel / 2, 4))
    velocity = (step, 0.0) if horizontal else (0.0, step)
    (color, shape), size, r = chosen[0], sizes[0], radii[0]
    mover = ShapeObject(color, shape, size, *start, r, *velocity)
    others = [
        ShapeObject(c, s, sz, x, y, rr)
        for (c, s), sz, rr, (x, y) in zip(chosen[1:], sizes[1:], radii[1:], centres[1:])
    ]
    scene = Scene((mover, *others), rng.choice(BACKGROUNDS), {}, NUM_CLIP_FRAMES)
    qtype = rng.choice(["direction", "color", "shape"])
    question, answer = {
        "direction": (f"In which direction is the {color} {shape} moving?", direction),
        "color": ("What color is the moving shape?", color),
        "shape": ("What shape is moving?", shape),
    }[qtype]
    return {
        "question": question,
        "answers": [answer],
        "candidates": list(VIDEO_VOCAB),
        "label": VIDEO_VOCAB.index(answer),
        "extra": {"question_type": qtype},
    }, scene


def _make_nocaps(rng: random.Random) -> tuple[Record, Scene]:
    """Scenes with at least one colour-shape pair that no held-in sample ever shows or names."""
    num_objects = rng.randint(1, 3)
    novel = rng.choice(NOVEL_PAIRS)
    scene = _sample_scene(rng, num_objects, ALL_PAIRS, include=[novel])
    novel_present = sorted({(obj.color, obj.shape) for obj in scene.objects} & set(NOVEL_PAIRS))
    return {
        "answers": captions_for(scene),
        "extra": {"novel_pairs": [list(pair) for pair in novel_present]},
    }, scene


# ------------------------------------------------------------------------------------------------ registry

GEN_SHAPES_CAPTION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0}
# Like the real caption setting but without its 10-token minimum: a one-shape caption is ~4 tokens long.

_MC_PROMPT = "Question: {question} Options: {options}. Short answer:"
_MAKERS: dict[str, Callable[[random.Random], tuple[Record, Scene]]] = {}


def _spec(name: str, maker: Callable, held_in: bool, modality: str = "image", **kwargs) -> DatasetSpec:
    splits = ("train", "val") if held_in else ("val", "test")
    media = "videos" if modality == "video" else "images"
    files = {split: f"{SUITE}/{name}/{split}.json" for split in splits} | {media: f"{SUITE}/{name}/{media}"}
    _MAKERS[name] = maker
    return DatasetSpec(
        name=name,
        held_in=held_in,
        files=files,
        reader=read_shapes,
        splits=splits,
        modality=modality,
        suite=SUITE,
        **kwargs,
    )


def shapes_specs() -> list[DatasetSpec]:
    """The 12 shapes datasets: 5 held-in task families, 7 held-out ones (their real counterparts' settings)."""
    short_rank = {"eval_mode": "rank", "generation": {}}
    return [
        _spec(
            "shapes_caption",
            _make_caption,
            True,
            family="image_captioning",
            metric="cider",
            eval_mode="generate",
            prompt=PROMPT_CAPTION,
            templates="caption",
            generation=GEN_SHAPES_CAPTION,
            description="captions of 1-4 shapes (COCO Caption-like)",
        ),
        _spec(
            "shapes_vqa",
            _make_vqa,
            True,
            family="image_qa",
            metric="vqa_accuracy",
            eval_mode="generate",
            prompt=PROMPT_SHORT_QA,
            templates="vqa",
            generation=GEN_SHORT,
            description="colour / shape / count / yes-no / size / side questions (VQAv2-like)",
        ),
        _spec(
            "shapes_vqg",
            _make_vqg,
            True,
            family="image_question_generation",
            metric="none",
            eval_mode="generate",
            prompt=PROMPT_VQG,
            templates="vqg",
            generation=GEN_QUESTION,
            description="answer in, question out (VQG from VQAv2-like data)",
        ),
        _spec(
            "shapes_ocrvqa",
            _make_ocrvqa,
            True,
            family="image_qa_reading_comprehension",
            metric="accuracy",
            eval_mode="generate",
            prompt=PROMPT_OCR_QA,
            templates="vqa_ocr",
            generation=GEN_SHORT,
            description="what word is written (OCR tokens given; OCR-VQA-like)",
        ),
        _spec(
            "shapes_mcvqa",
            _make_mcvqa,
            True,
            family="knowledge_grounded_image_qa",
            metric="accuracy",
            prompt=_MC_PROMPT,
            templates="multiple_choice",
            **short_rank,
            description="4-option multiple-choice questions (A-OKVQA MC-like)",
        ),
        _spec(
            "shapes_vsr",
            _make_vsr,
            False,
            family="visual_reasoning",
            metric="accuracy",
            prompt="Based on the image, is this statement true or false? {question}",
            templates="true_false",
            **short_rank,
            description="spatial statements, rank false/true (VSR-like)",
        ),
        _spec(
            "shapes_iconqa",
            _make_iconqa,
            False,
            family="visual_reasoning",
            metric="accuracy",
            prompt=_MC_PROMPT,
            templates="multiple_choice",
            **short_rank,
            description="counting with 3 options (IconQA choose_txt-like)",
        ),
        _spec(
            "shapes_scienceqa",
            _make_scienceqa,
            False,
            family="knowledge_grounded_image_qa",
            metric="accuracy",
            prompt="Context: {context} Question: {question} Options: {options}. Answer:",
            templates="multiple_choice",
            **short_rank,
            description="a context sentence + question + 4 options (ScienceQA-IMG-like)",
        ),
        _spec(
            "shapes_hatefulmemes",
            _make_hatefulmemes,
            False,
            family="image_classification",
            metric="auc",
            prompt='This is an image with: "{text}" written on it. ' + HATEFUL_QUESTION + " Answer:",
            templates="classification",
            **short_rank,
            description="is the written colour the colour of a shape? rank no/yes, AUC (HatefulMemes-like)",
        ),
        _spec(
            "shapes_visdial",
            _make_visdial,
            False,
            family="visual_conversational_qa",
            metric="mrr",
            prompt="Dialog history: {context} Question: {question} Short answer:",
            templates="dialog",
            **short_rank,
            description=f"dialog history + question, rank {NUM_DIALOG_CANDIDATES} candidates",
        ),
        _spec(
            "shapes_msvdqa",
            _make_msvdqa,
            False,
            modality="video",
            family="video_qa",
            metric="accuracy",
            prompt=PROMPT_SHORT_QA,
            templates="video_qa",
            **short_rank,
            description=f"{NUM_CLIP_FRAMES}-frame clips of a moving shape, rank the answer vocabulary",
        ),
        _spec(
            "shapes_nocaps",
            _make_nocaps,
            False,
            family="image_captioning",
            metric="cider",
            eval_mode="generate",
            prompt=PROMPT_CAPTION,
            templates="caption",
            generation=GEN_SHAPES_CAPTION,
            description="captions of colour-shape pairs never seen in held-in data (NoCaps-like)",
        ),
    ]


def _harmonic(n: int) -> float:
    return sum(1.0 / k for k in range(1, n + 1))


_CHANCE = {
    "shapes_caption": 0.0,
    "shapes_vqa": 0.0,
    "shapes_vqg": 0.0,
    "shapes_ocrvqa": 0.0,
    "shapes_mcvqa": 1.0 / NUM_MC_OPTIONS,
    "shapes_vsr": 1.0 / len(TRUE_FALSE),
    "shapes_iconqa": 1.0 / NUM_ICONQA_OPTIONS,
    "shapes_scienceqa": 1.0 / NUM_MC_OPTIONS,
    "shapes_hatefulmemes": 0.5,  # AUC of a random score
    "shapes_visdial": _harmonic(NUM_DIALOG_CANDIDATES) / NUM_DIALOG_CANDIDATES,  # E[1/rank], rank uniform
    "shapes_msvdqa": 1.0 / len(VIDEO_VOCAB),
    "shapes_nocaps": 0.0,  # CIDEr of unrelated text
}


def chance_level(name: str) -> float:
    """The expected score of random guessing on ``name`` in its own metric (generated text scores 0)."""
    if name not in _CHANCE:
        raise KeyError(f"no chance level for {name!r}; shapes datasets: {', '.join(sorted(_CHANCE))}")
    return _CHANCE[name]


# ------------------------------------------------------------------------------------------------ writing


def split_sizes(name: str, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Samples per split of ``name``: defaults, then ``sizes[split]``, then ``sizes["<name>.<split>"]``."""
    spec = _SPECS[name]
    sizes = dict(sizes or {})
    for key, value in sizes.items():
        dataset, _, split = key.rpartition(".")
        known_split = split in (
            _SPECS[dataset].splits if dataset in _SPECS else () if dataset else DEFAULT_SIZES
        )
        if not known_split:
            raise ValueError(
                f"sizes: unknown key {key!r}; use a split ({', '.join(DEFAULT_SIZES)}) or '<dataset>.<split>' "
                "with a shapes dataset and one of its splits"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"sizes[{key!r}] must be a non-negative integer, got {value!r}")
    return {
        split: sizes.get(f"{name}.{split}", sizes.get(split, DEFAULT_SIZES[split])) for split in spec.splits
    }


def _manifest(name: str, seed: int, image_size: int, sizes: dict[str, int]) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "dataset": name,
        "seed": seed,
        "image_size": image_size,
        "sizes": sizes,
    }


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _up_to_date(folder: Path, manifest: dict) -> bool:
    spec = _SPECS[manifest["dataset"]]
    return _read_manifest(folder) == manifest and all(
        (folder / f"{split}.json").is_file() for split in spec.splits
    )


def _generate(folder: Path, manifest: dict, progress: Callable[[int], object]) -> None:
    """Write one dataset into a scratch folder and move it into place, so a crash never leaves a half set."""
    name, seed, image_size = manifest["dataset"], manifest["seed"], manifest["image_size"]
    spec, maker = _SPECS[name], _MAKERS[name]
    media = "videos" if spec.modality == "video" else "images"
    scratch = folder.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    for split, count in manifest["sizes"].items():
        rng = random.Random(f"ibkit-shapes:{seed}:{name}:{split}")  # str seeds are stable across processes
        records = []
        for index in range(count):
            fields, scene = maker(rng)
            relative = f"{split}/{index:06d}." + ("mp4" if spec.modality == "video" else "png")
            if spec.modality == "video":
                write_clip(scene, image_size, scratch / media / relative)
            else:
                save_png(render_image(scene, image_size), scratch / media / relative)
            records.append(
                {
                    "id": f"{name}-{split}-{index:06d}",
                    ("video" if media == "videos" else "image"): relative,
                    **fields,
                    "scene": scene.to_json(),
                }
            )
            progress(1)
        info = {"dataset": name, "split": split, "seed": seed, "image_size": image_size, "media": media}
        (scratch / media).mkdir(parents=True, exist_ok=True)
        (scratch / f"{split}.json").write_text(json.dumps({"info": info, "records": records}))
    (scratch / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    try:
        scratch.rename(folder)
    except OSError:
        if not _up_to_date(folder, manifest):  # lost a race against another process writing the same set
            raise
        shutil.rmtree(scratch, ignore_errors=True)


def make_shapes(
    root: Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    image_size: int = 64,
    *,
    names: Iterable[str] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Generate the shapes datasets under ``<root>/shapes/<name>/``; returns name -> folder.

    Idempotent: a dataset whose manifest (generator version, seed, image size, split sizes) matches
    is left alone; a different manifest regenerates it. ``sizes`` maps a split (``"train"``) or
    ``"<dataset>.<split>"`` to a sample count (defaults: DEFAULT_SIZES).
    """
    from tqdm import tqdm

    check_image_size(image_size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    selected = list(names) if names is not None else list(_SPECS)
    unknown = [name for name in selected if name not in _SPECS]
    if unknown:
        raise KeyError(f"unknown shapes dataset(s) {unknown}; known: {', '.join(_SPECS)}")
    base = Path(root).expanduser() / SUITE
    manifests = {name: _manifest(name, seed, image_size, split_sizes(name, sizes)) for name in selected}
    todo = [name for name in selected if not _up_to_date(base / name, manifests[name])]
    total = sum(sum(manifests[name]["sizes"].values()) for name in todo)
    with tqdm(total=total, desc="generating shapes", unit="sample", disable=not progress or not todo) as bar:
        for name in todo:
            bar.set_postfix_str(name)
            base.mkdir(parents=True, exist_ok=True)
            _generate(base / name, manifests[name], bar.update)
    return {name: base / name for name in selected}


def write_tiny_shapes(root: Path, seed: int = 0, image_size: int = 64) -> dict[str, Path]:
    """A few samples of every shapes dataset (for other modules' tests)."""
    return make_shapes(root, seed=seed, sizes=dict(TINY_SIZES), image_size=image_size, progress=False)


# ------------------------------------------------------------------------------------------------ reading


def _check_record(record: object) -> str | None:
    """Why ``record`` cannot become a Sample, or None if it can."""
    if not isinstance(record, dict):
        return "record is not an object"
    if not isinstance(record.get("id"), str):
        return "missing or non-string 'id'"
    media = [key for key in ("image", "video") if key in record]
    if len(media) != 1 or not isinstance(record[media[0]], str):
        return "needs exactly one of 'image' / 'video' as a string"
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "'answers' must be a non-empty list of strings"
    for key in ("question", "context", "target"):
        if key in record and not isinstance(record[key], str):
            return f"'{key}' must be a string"
    for key in ("candidates", "ocr_tokens"):
        if key in record and not (
            isinstance(record[key], list) and all(isinstance(v, str) for v in record[key])
        ):
            return f"'{key}' must be a list of strings"
    if "label" in record:
        label, candidates = record["label"], record.get("candidates")
        if not isinstance(label, int) or isinstance(label, bool) or candidates is None:
            return "'label' must be an integer index into 'candidates'"
        if not 0 <= label < len(candidates):
            return f"'label' {label} is out of range for {len(candidates)} candidates"
    for key in ("extra", "scene"):
        if key in record and not isinstance(record[key], dict):
            return f"'{key}' must be an object"
    return None


def read_shapes(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """Read one split of a shapes dataset (the registry reader; media paths become absolute)."""
    file = Path(paths[split])
    try:
        document = json.loads(file.read_text())
    except ValueError as error:
        raise ValueError(f"{file}: not valid JSON: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("records"), list):
        raise ValueError(f"{file}: expected an object with a 'records' list (a shapes annotation file)")
    info = document.get("info") if isinstance(document.get("info"), dict) else {}
    dataset = str(info.get("dataset", file.parent.name))
    skips = skips if skips is not None else SkipCounter(dataset, strict=True)
    media_root = Path(paths["videos"] if "videos" in paths else paths["images"])
    samples = []
    for index, record in enumerate(document["records"]):
        problem = _check_record(record)
        if problem is not None:
            record_name = record.get("id", index) if isinstance(record, dict) else index
            skips.skip(file, record_name, problem)
            continue
        extra = dict(record.get("extra", {}))
        if "scene" in record:
            extra["scene"] = record["scene"]
        samples.append(
            Sample(
                dataset=dataset,
                sample_id=record["id"],
                image=str(media_root / record["image"]) if "image" in record else None,
                video=str(media_root / record["video"]) if "video" in record else None,
                question=record.get("question"),
                answers=list(record["answers"]),
                target=record.get("target"),
                candidates=list(record["candidates"]) if "candidates" in record else None,
                label=record.get("label"),
                ocr_tokens=list(record["ocr_tokens"]) if "ocr_tokens" in record else None,
                context=record.get("context"),
                extra=extra,
            )
        )
    return samples


def scene_of(sample: Sample) -> Scene:
    """The scene a shapes sample was drawn from (for checks and visualisation)."""
    if "scene" not in sample.extra:
        raise KeyError(f"{sample.dataset} {sample.sample_id}: no 'scene' in extra (not a shapes sample?)")
    return Scene.from_json(sample.extra["scene"])


_SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in shapes_specs()}


def register_shapes() -> None:
    """Register the shapes specs that the registry lacks (idempotent: safe after a registry reset)."""
    registered = {spec.name for spec in list_specs(SUITE)}
    for spec in _SPECS.values():
        if spec.name not in registered:
            register(spec)


register_shapes()

__all__ = [
    "ALL_PAIRS",
    "NOVEL_PAIRS",
    "TRAIN_PAIRS",
    "chance_level",
    "make_shapes",
    "read_shapes",
    "register_shapes",
    "scene_of",
    "shapes_specs",
    "write_tiny_shapes",
]
