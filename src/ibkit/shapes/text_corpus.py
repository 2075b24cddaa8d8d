"""A text-only instruction corpus from scene descriptions: the demo's miniature of FlanT5's training data.

Each record is ``prompt = "<scene description> <instruction>"`` and ``target = answer``. The description
names every object with its size, colour, shape and coarse position ("A large red circle at the top
left."), so every answer is determined by the text. The instructions use the image tasks' prompts and
template sets, so that a language model trained here already answers those formats in words when the
Q-Former's soft prompt later stands where the description stood.

Only held-in content: TRAIN_PAIRS scenes (no novel pair is ever described or named), no corner counts or
warm/cool colours (ScienceQA-like), no motion (video), no word written on the image (HatefulMemes-like).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from ibkit.data.registry import PROMPT_CAPTION, PROMPT_MULTIPLE_CHOICE, PROMPT_SHORT_QA
from ibkit.data.templates import TEMPLATES, format_options, render
from ibkit.shapes.folders import holds_set, move_into_place
from ibkit.shapes.relations import (
    CONTEXT_KINDS,
    RELATION_QA_TYPES,
    context_item,
    relation_pool,
    relation_sentence,
)
from ibkit.shapes.render import COLORS, SHAPES, Scene
from ibkit.shapes.scenes import (
    OPPOSITE,
    QA_TYPES,
    TRAIN_PAIRS,
    captions_for,
    describe,
    pick_qa,
    position_bins,
    qa_pool,
    relation_holds,
    sample_scene,
)

TEXT_CORPUS = "shapes_text"  # the folder under <root>/shapes/ and the key prefix in the writer's sizes dict
TEXT_SPLITS = ("train", "val")
CORPUS_VERSION = 1  # bump when the generated text changes: old folders then fail the manifest check
PROMPT_TRUE_FALSE = "Based on the image, is this statement true or false? {question}"  # shapes_vsr's prompt
PROMPT_DIALOG = "Dialog history: {context} Question: {question} Short answer:"  # shapes_visdial's prompt
FIXED_PROMPT_SHARE = 0.5  # how often an instruction is the evaluation prompt itself, else a template
NUM_OPTIONS = 4
MAX_DIALOG_ROUNDS = 3
PRESENCE_QUESTIONS = ("Is there a {color} shape?", "Is any shape {color}?", "Is one of the shapes {color}?")
OBJECTS = (1, 4)  # the fewest and most objects a described scene has
KINDS = (*(f"qa_{qtype}" for qtype in QA_TYPES), "caption", "true_false", "options", "color_present", "dialog")
RELATION_KINDS = (*(f"qa_{qtype}" for qtype in RELATION_QA_TYPES), *KINDS[len(QA_TYPES):])  # a relations corpus


# ------------------------------------------------------------------------------------------------ instructions
Item = tuple[str, str, list[str]]  # (instruction, target, every accepted answer)


def _instruction(rng: random.Random, fixed: str, template_set: str, **fields: str) -> str:
    """The evaluation prompt ``fixed`` half of the time, else a random template of ``template_set``."""
    template = fixed if rng.random() < FIXED_PROMPT_SHARE else rng.choice(TEMPLATES[template_set])
    values = {name: "" for name in ("question", "answer", "options", "context", "ocr", "text")} | fields
    return render(template, values)


def _short_qa(rng: random.Random, scene: Scene, qtype: str, relations: bool = False) -> Item | None:
    pool = relation_pool(scene, TRAIN_PAIRS) if relations else qa_pool(scene, TRAIN_PAIRS)
    has_question = pool["exists_yes"] or pool["exists_no"] if qtype == "exists" else pool[qtype]
    if not has_question:
        return None
    question, answer, _ = pick_qa(rng, pool, (qtype,))  # exists: yes/no balanced by pick_qa
    return _instruction(rng, PROMPT_SHORT_QA, "vqa", question=question), answer, [answer]


def _caption(rng: random.Random, scene: Scene) -> Item:
    references = captions_for(scene)
    return _instruction(rng, PROMPT_CAPTION, "caption"), rng.choice(references), references


def _true_false(rng: random.Random, scene: Scene) -> Item | None:
    """A spatial statement whose truth the coarse positions decide: the relation holds between the shapes'
    extents and their position words differ that way; false statements name the opposite relation."""
    axis_bins = {"left of": (0, False), "right of": (0, True), "above": (1, False), "below": (1, True)}
    facts = []
    for subject in scene.objects:
        for obj in scene.objects:
            for relation, (axis, reverse) in axis_bins.items():
                order = ("left", "middle", "right") if axis == 0 else ("top", "middle", "bottom")
                a, b = order.index(position_bins(subject)[axis]), order.index(position_bins(obj)[axis])
                if subject is not obj and relation_holds(subject, obj, relation) and (a > b if reverse else a < b):
                    facts.append((subject, obj, relation))
    if not facts:
        return None
    subject, obj, relation = rng.choice(facts)
    true_statement = rng.random() < 0.5
    said = relation if true_statement else OPPOSITE[relation]
    statement = relation_sentence(subject, obj, said)
    answer = "true" if true_statement else "false"
    return _instruction(rng, PROMPT_TRUE_FALSE, "true_false", question=statement), answer, [answer]


def _with_options(rng: random.Random, scene: Scene) -> Item:
    question, answer, qtype = pick_qa(rng, qa_pool(scene, TRAIN_PAIRS), ("color", "shape", "count"))
    universe = {"color": tuple(COLORS), "shape": SHAPES, "count": ("0", "1", "2", "3", "4")}[qtype]
    options = [answer, *rng.sample([o for o in universe if o != answer], NUM_OPTIONS - 1)]
    rng.shuffle(options)
    instruction = _instruction(rng, PROMPT_MULTIPLE_CHOICE, "multiple_choice", question=question,
                               options=format_options(options))
    return instruction, answer, [answer]


def _color_present(rng: random.Random, scene: Scene) -> Item:
    present = sorted({obj.color for obj in scene.objects})
    present_answer = rng.random() < 0.5
    color = rng.choice(present if present_answer else [c for c in COLORS if c not in present])
    question = rng.choice(PRESENCE_QUESTIONS).format(color=color)
    answer = "yes" if present_answer else "no"
    return _instruction(rng, PROMPT_SHORT_QA, "vqa", question=question), answer, [answer]


def _dialog(rng: random.Random, scene: Scene) -> Item:
    """Earlier Q/A rounds (after a caption, as the VisDial-like layout has them), then the current question."""
    pool = qa_pool(scene, TRAIN_PAIRS)
    rounds: list[tuple[str, str]] = []
    wanted = rng.randint(1, MAX_DIALOG_ROUNDS) + 1
    for _ in range(4 * wanted):
        question, answer, _ = pick_qa(rng, pool)
        if question not in {q for q, _ in rounds}:
            rounds.append((question, answer))
        if len(rounds) == wanted:
            break
    *history, (question, answer) = rounds
    context = " ".join([f"{rng.choice(captions_for(scene))}.", *(f"Q: {q} A: {a}." for q, a in history)])
    return _instruction(rng, PROMPT_DIALOG, "dialog", context=context, question=question), answer, [answer]


def make_item(rng: random.Random, scene: Scene, kind: str, relations: bool = False) -> Item | None:
    """(instruction, target, accepted answers) of ``kind`` about ``scene``; None when the scene has no such question.
    With ``relations``, the relation recipe's: a :data:`~ibkit.shapes.relations.CONTEXT_KINDS` item is one
    relation sentence and its question, which stands in the prompt without the description."""
    if relations and kind in CONTEXT_KINDS:
        prompts = {"qa_relation": (PROMPT_SHORT_QA, "vqa"), "true_false": (PROMPT_TRUE_FALSE, "true_false")}
        return context_item(rng, scene, kind, lambda kind, question: _instruction(rng, *prompts[kind], question=question))
    if kind.startswith("qa_"):
        return _short_qa(rng, scene, kind.removeprefix("qa_"), relations)
    makers: dict[str, Callable[[random.Random, Scene], Item | None]] = {
        "caption": _caption, "true_false": _true_false, "options": _with_options,
        "color_present": _color_present, "dialog": _dialog,
    }
    return makers[kind](rng, scene)


def make_record(rng: random.Random, kinds: Sequence[str] = KINDS, objects: tuple[int, int] = OBJECTS,
                relations: bool = False) -> dict:
    """One (prompt, target) record: the kind uniformly from ``kinds``, a fresh scene of ``objects[0]`` to
    ``objects[1]`` objects until the kind fits it.

    No id field: the demo's word-level vocabulary is counted over every string of the annotation files,
    and 40k distinct index numbers would compete with words for its 1,024 entries."""
    kind = rng.choice(list(kinds))
    while True:
        scene = sample_scene(rng, rng.randint(*objects), TRAIN_PAIRS)
        item = make_item(rng, scene, kind, relations)
        if item is not None:
            break
    instruction, target, answers = item
    return {
        "prompt": instruction if relations and kind in CONTEXT_KINDS else f"{describe(scene)} {instruction}",
        "target": target,
        "answers": answers,
        "kind": kind,
    }


def make_records(seed: int, split: str, count: int, relations: bool = False) -> list[dict]:
    """``count`` records of ``split``; the same for the same (seed, split) in every process. ``relations``: the
    relation recipe's corpus (:data:`RELATION_KINDS`, :func:`make_item`)."""
    rng = random.Random(f"ibkit-shapes:{seed}:{TEXT_CORPUS}:{split}")
    kinds = RELATION_KINDS if relations else KINDS
    return [make_record(rng, kinds, relations=relations) for _ in range(count)]


def make_focused_records(seed: int, split: str, count: int, kinds: Sequence[str],
                         objects: tuple[int, int]) -> list[dict]:
    """``count`` records of only ``kinds`` about scenes of ``objects[0]`` to ``objects[1]`` objects (the demo's
    optional binding phase: colour and shape questions about 2-4 objects), drawn from a random stream of
    their own rather than the corpus's; the same for the same arguments everywhere."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds {list(kinds)!r}: choose from {list(KINDS)}")
    low, high = objects
    if not OBJECTS[0] <= low <= high <= OBJECTS[1]:
        raise ValueError(f"objects {objects!r}: a range (low, high) within {OBJECTS}")
    rng = random.Random(f"ibkit-shapes:{seed}:{TEXT_CORPUS}:focused:{split}:{','.join(kinds)}:{low}-{high}")
    return [make_record(rng, kinds, (low, high)) for _ in range(count)]


def kind_counts(records: Sequence[dict]) -> Counter:
    return Counter(record["kind"] for record in records)


# ------------------------------------------------------------------------------------------------ on disk


def write_text_corpus(root: str | Path, seed: int, sizes: dict[str, int], relations: bool = False) -> Path:
    """``<root>/shapes/shapes_text/{train,val}.json`` (``{"info", "records"}``) + a manifest; idempotent,
    written to a scratch folder first so that a crash never leaves half a corpus."""
    folder = Path(root).expanduser() / "shapes" / TEXT_CORPUS
    manifest = {"generator_version": CORPUS_VERSION, "dataset": TEXT_CORPUS, "seed": seed, "sizes": dict(sizes),
                **({"relations": True} if relations else {})}
    if holds_set(folder, manifest, manifest["sizes"]):
        return folder
    scratch = folder.with_name(f".{TEXT_CORPUS}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for split, count in sizes.items():
        info = {"dataset": TEXT_CORPUS, "split": split, "seed": seed}
        payload = {"info": info, "records": make_records(seed, split, count, relations)}
        (scratch / f"{split}.json").write_text(json.dumps(payload))
    (scratch / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    move_into_place(scratch, folder, lambda: holds_set(folder, manifest, manifest["sizes"]))
    return folder
