"""The 12 task generators of the shapes benchmark: one random sample (annotation fields + scene) each.

Held-in tasks draw only TRAIN_PAIRS, so the NoCaps-like task can show pairs no held-in sample ever
shows or names. Every answer is derived from the scene, which is stored beside the sample.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable, Sequence

from ibkit.shapes.relations import RELATION_QA_TYPES, relation_pool, relation_records, relation_sentence
from ibkit.shapes.render import COLORS, SHAPES, Scene, ShapeObject
from ibkit.shapes.scenes import (
    ALL_PAIRS,
    BACKGROUNDS,
    NOVEL_PAIRS,
    OPPOSITE,
    RELATIONS,
    SIZE_WORDS,
    TRAIN_PAIRS,
    captions_for,
    describe,
    draw_radius,
    pick_qa,
    place_boxes,
    qa_pool,
    relation_holds,
    sample_scene,
)

# Scene text for the OCR task; no colour or shape names, so reading and seeing never get mixed up.
# fmt: off
WORDS = (
    "cat", "dog", "sun", "map", "box", "key", "cup", "hat", "pen", "car", "bus", "tree", "bird", "fish", "book",
    "door", "lamp", "milk", "rain", "ship", "frog", "kite", "ball", "moon", "road", "shoe", "bell", "leaf", "coin",
    "rose",
)
# fmt: on
DIRECTIONS = ("left", "right", "up", "down")
NUM_CLIP_FRAMES = 8  # the video loader takes 4 uniformly spaced frames (0, 2, 4, 6)
CORNERS = {"circle": 0, "triangle": 3, "square": 4, "star": 10}
WARM_COLORS = ("red", "orange", "yellow")
COOL_COLORS = ("green", "blue", "purple")

NUM_MC_OPTIONS = 4  # multiple-choice VQA (A-OKVQA-like) and ScienceQA-like
NUM_ICONQA_OPTIONS = 3
NUM_DIALOG_CANDIDATES = 15
NUM_DIALOG_ROUNDS = 4
DIALOG_VOCAB: tuple[str, ...] = (*COLORS, *SHAPES, *"01234", "yes", "no", *SIZE_WORDS, "left", "right")
VIDEO_VOCAB: tuple[str, ...] = (*DIRECTIONS, *COLORS, *SHAPES)
TRUE_FALSE = ("false", "true")  # candidate order of the registry's VSR convention: label 1 = true
NO_YES = ("no", "yes")  # HatefulMemes convention: label 1 = yes
VQA_ANSWER_COPIES = 10  # VQAv2 has 10 annotator answers; identical copies make the VQA metric exact

Record = dict  # the annotation fields of one sample (question, answers, candidates, ...)


def _options(rng: random.Random, answer: str, universe: Sequence[str], count: int) -> tuple[list[str], int]:
    """``count`` shuffled options: the answer plus distinct distractors from ``universe``."""
    distractors = rng.sample([option for option in universe if option != answer], count - 1)
    options = [answer, *distractors]
    rng.shuffle(options)
    return options, options.index(answer)


# ------------------------------------------------------------------------------------------------ tasks
# Each maker draws one sample: (annotation fields, scene). Held-in makers use TRAIN_PAIRS only.

Maker = Callable[[random.Random], tuple[Record, Scene]]
MultiMaker = Callable[[random.Random], tuple[list[Record], Scene]]  # several samples of one picture


def _plain_scene(rng: random.Random, pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS, most: int = 4) -> Scene:
    return sample_scene(rng, rng.randint(1, most), pairs)


def _make_caption(rng: random.Random) -> tuple[Record, Scene]:
    """Captions, and the scene's description in the LM's own language (:func:`describe`): web captions of
    the real pre-training data are text the LLM has read; here the description is, and it alone says where
    each shape is, which the side questions and the VSR-like statements need."""
    scene = _plain_scene(rng)
    return {"answers": [*captions_for(scene), describe(scene)]}, scene


def _make_vqa(rng: random.Random, relations: bool = False) -> tuple[Record, Scene]:
    scene = _plain_scene(rng)
    if relations:  # the relation recipe's held-in questions (ibkit.shapes.relations)
        question, answer, qtype = pick_qa(rng, relation_pool(scene, TRAIN_PAIRS), RELATION_QA_TYPES)
    else:
        question, answer, qtype = pick_qa(rng, qa_pool(scene, TRAIN_PAIRS))
    return {
        "question": question,
        "answers": [answer] * VQA_ANSWER_COPIES,
        "extra": {"question_type": qtype},
    }, scene


# Questions per training picture and type (VQAv2 asks ~5.4 per image): at most this many of each type the
# scene supports; "exists" is one yes and one no question. Side is asked of every shape away from the middle.
# With one question per picture (as val has) the demo ended at side 0.55, size 0.54, "is there" 0.55; with
# these counts and the side warm-up (configs/instruct_side.yaml) at 0.63, 0.74, 0.66 (docs/demo.md).
VQA_TRAIN_QUESTIONS = {"color": 2, "shape": 2, "count": 1, "exists": 2, "size": 2, "side": 4}
# ...and every picture is asked "How many shapes are there?" (answers 1-4 about equally often), beside the count
# question drawn above: drawn alone, four of five count questions name one shape or colour and answer "1", and
# the demo's model said "1" to 253 of 260 count questions (count 0.800, its share of 1s plus four threes). With
# it (2-core AMD EPYC, seed 0, the same stages: docs/demo.md): count 0.862, the whole-picture count 50 of 58
# right instead of 34, IconQA-like 0.543 against 0.443. Also asking the per-shape and per-colour counts whose
# answer is 2 or more: count 0.758 (the model then says "2" to half the shapes that are alone).
WHOLE_COUNT_QUESTION = "How many shapes are there?"


def _make_vqa_train(rng: random.Random, relations: bool = False) -> tuple[list[Record], Scene]:
    """Several questions about one picture (VQA_TRAIN_QUESTIONS, and WHOLE_COUNT_QUESTION), as VQAv2 has: one
    record each; with ``relations`` the recipe's relation questions and side statement after them."""
    scene = _plain_scene(rng)
    pool = relation_pool(scene, TRAIN_PAIRS) if relations else qa_pool(scene, TRAIN_PAIRS)
    records = []
    for qtype, most in VQA_TRAIN_QUESTIONS.items():
        if qtype == "exists":
            chosen = [rng.choice(pool[key]) for key in ("exists_yes", "exists_no") if pool[key]][:most]
        else:
            chosen = rng.sample(pool[qtype], min(most, len(pool[qtype])))
        records += [{"question": question, "answers": [answer] * VQA_ANSWER_COPIES,
                     "extra": {"question_type": qtype}} for question, answer in chosen]
    if all(record["question"] != WHOLE_COUNT_QUESTION for record in records):
        records.append({"question": WHOLE_COUNT_QUESTION, "answers": [str(len(scene.objects))] * VQA_ANSWER_COPIES,
                        "extra": {"question_type": "count"}})
    if relations:
        records += relation_records(rng, scene, VQA_ANSWER_COPIES)
    return records, scene


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
    scene = sample_scene(rng, rng.randint(1, 3), TRAIN_PAIRS, words)
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
    scene = sample_scene(rng, rng.randint(2, 3), TRAIN_PAIRS)
    subject_index, object_index = rng.sample(range(len(scene.objects)), 2)
    subject, obj = scene.objects[subject_index], scene.objects[object_index]
    holding = [
        rel for rel in RELATIONS if relation_holds(subject, obj, rel)
    ]  # never empty: shapes do not overlap
    true_statement = rng.random() < 0.5
    relation = rng.choice(holding) if true_statement else OPPOSITE[rng.choice(holding)]
    statement = relation_sentence(subject, obj, relation)
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
    scene = sample_scene(rng, count + len(distractors), TRAIN_PAIRS, include=counted + distractors)
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
    scene = sample_scene(rng, rng.randint(1, 3), TRAIN_PAIRS, {band: "?"})  # the word is chosen below
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
        radii = [draw_radius(rng, size) for size in sizes]
        horizontal = direction in ("left", "right")
        sweep = (radii[0] + distance / 2, radii[0]) if horizontal else (radii[0], radii[0] + distance / 2)
        centres = place_boxes(rng, [sweep] + [(r, r) for r in radii[1:]], (0.0, 1.0))
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
    scene = sample_scene(rng, num_objects, ALL_PAIRS, include=[novel])
    novel_present = sorted({(obj.color, obj.shape) for obj in scene.objects} & set(NOVEL_PAIRS))
    return {
        "answers": captions_for(scene),
        "extra": {"novel_pairs": [list(pair) for pair in novel_present]},
    }, scene


# dataset name -> its maker; the writer draws each sample of a dataset with it
TASKS: dict[str, Maker] = {
    "shapes_caption": _make_caption,
    "shapes_vqa": _make_vqa,
    "shapes_vqg": _make_vqg,
    "shapes_ocrvqa": _make_ocrvqa,
    "shapes_mcvqa": _make_mcvqa,
    "shapes_vsr": _make_vsr,
    "shapes_iconqa": _make_iconqa,
    "shapes_scienceqa": _make_scienceqa,
    "shapes_hatefulmemes": _make_hatefulmemes,
    "shapes_visdial": _make_visdial,
    "shapes_msvdqa": _make_msvdqa,
    "shapes_nocaps": _make_nocaps,
}
# the train split's maker where it differs: several samples (records) of one picture
TRAIN_TASKS: dict[str, MultiMaker] = {"shapes_vqa": _make_vqa_train}


RELATION_DATASETS = ("shapes_vqa",)  # the image datasets that a relations workspace makes differently


def maker_for(name: str, split: str, relations: bool = False) -> Maker | MultiMaker:
    """The generator of ``name``'s ``split``: TRAIN_TASKS for a train split that has one, else TASKS; with
    ``relations``, held-in VQA's of the relation recipe (:mod:`ibkit.shapes.relations`)."""
    maker = TRAIN_TASKS.get(name, TASKS[name]) if split == "train" else TASKS[name]
    return functools.partial(maker, relations=True) if relations and name in RELATION_DATASETS else maker
