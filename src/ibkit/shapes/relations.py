"""The relation recipe's data: what a shapes workspace made with ``relations=True`` adds to the default one.

The default demo reads VSR-like statements ("The red circle is to the left of the blue square.") at chance:
its T5 learns spatial relations only from descriptions, where coarse positions decide them, and nothing asks the
Q-Former to pass on a relation between two shapes. The recipe (docs/demo.md, "The relation fact handed over")
changes the data in four places:

- held-in VQA (``shapes_vqa``) gets a ``relation`` question type: two relation facts per training picture,
  each worded three ways (the either-or question, a yes and a no question); the Q-Former reads one wording
  (``qformer_question``) and the T5 is asked another, both drawn at random, so the Q-Former must hand over the
  fact, not the answer to its own question;
- the side question is also asked along the vertical axis ("... at the top or at the bottom of the picture?");
- every training picture gets one side statement ("The red circle is to the left of the middle of the
  picture. True or false?"), a question type of its own (``side_statement``), so that the side warm-up can
  leave it out;
- in the T5's text corpus, relation questions and true/false statements read one sentence stating a relation
  fact ("The red circle is above the blue square.") instead of the scene's description: the T5 learns to
  answer from the fact, which the Q-Former's soft prompt must then carry.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ibkit.shapes.render import Scene, ShapeObject
from ibkit.shapes.scenes import (
    OPPOSITE,
    QA_TYPES,
    RELATIONS,
    SIDE_THRESHOLD,
    object_name,
    qa_pool,
    relation_holds,
)

EITHER_OR_ANSWER = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
RELATION_QA_TYPES = (*QA_TYPES, "relation")  # held-in VQA's question types in a relations workspace
STATEMENT_TYPE = "side_statement"  # the side statements' question type (training pictures only)
RELATION_QUESTIONS_PER_PICTURE = 2
CONTEXT_KINDS = ("qa_relation", "true_false")  # corpus kinds whose prompt is one relation sentence


def relation_facts(scene: Scene) -> list[tuple[ShapeObject, ShapeObject, str]]:
    """Every (subject, object, relation) that clearly holds in ``scene`` (:func:`relation_holds`)."""
    return [(a, b, relation) for a in scene.objects for b in scene.objects if a is not b
            for relation in RELATIONS if relation_holds(a, b, relation)]


def relation_sentence(subject: ShapeObject, obj: ShapeObject, relation: str) -> str:
    """"The red circle is to the left of the blue square."."""
    return f"The {object_name(subject)} is {RELATIONS[relation]} the {object_name(obj)}."


def relation_wordings(subject: ShapeObject, obj: ShapeObject, relation: str) -> list[tuple[str, str]]:
    """One true fact as three (question, answer): the either-or question, a yes and a no question."""
    a, b = object_name(subject), object_name(obj)
    either = (f"Is the {a} to the left or to the right of the {b}?" if relation in ("left of", "right of")
              else f"Is the {a} above or below the {b}?")
    return [(either, EITHER_OR_ANSWER[relation]), (f"Is the {a} {RELATIONS[relation]} the {b}?", "yes"),
            (f"Is the {a} {RELATIONS[OPPOSITE[relation]]} the {b}?", "no")]


def relation_pool(scene: Scene, absent_pairs: Sequence[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """:func:`~ibkit.shapes.scenes.qa_pool` of a relations workspace: side also asked vertically, and every
    wording of every relation fact as the ``relation`` type."""
    pool = qa_pool(scene, absent_pairs)
    pool["side"] = pool["side"] + [
        (f"Is the {object_name(obj)} at the top or at the bottom of the picture?", "top" if obj.y < 0.5 else "bottom")
        for obj in scene.objects if abs(obj.y - 0.5) >= SIDE_THRESHOLD]
    pool["relation"] = [qa for fact in relation_facts(scene) for qa in relation_wordings(*fact)]
    return pool


def relation_records(rng: random.Random, scene: Scene, answer_copies: int) -> list[dict]:
    """A training picture's relation questions (up to :data:`RELATION_QUESTIONS_PER_PICTURE` facts; the T5's
    wording as ``question``, the Q-Former's as ``qformer_question`` where they differ) and its side statement."""
    records = []
    facts = relation_facts(scene)
    for fact in rng.sample(facts, min(RELATION_QUESTIONS_PER_PICTURE, len(facts))):
        wordings = relation_wordings(*fact)
        qformer_question, _ = rng.choice(wordings)
        question, answer = rng.choice(wordings)
        record = {"question": question, "answers": [answer] * answer_copies, "extra": {"question_type": "relation"}}
        if qformer_question != question:
            record["qformer_question"] = qformer_question
        records.append(record)
    statement = side_statement(rng, scene)
    if statement is not None:
        question, answer = statement
        records.append({"question": question, "answers": [answer] * answer_copies,
                        "extra": {"question_type": STATEMENT_TYPE}})
    return records


def side_statement(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    """A true or false statement placing one shape against the middle of the picture, along an axis where it is
    away from the middle; None when no shape is."""
    choices = [(obj, axis) for obj in scene.objects for axis in ("x", "y") if abs(getattr(obj, axis) - 0.5) >= SIDE_THRESHOLD]
    if not choices:
        return None
    obj, axis = rng.choice(choices)
    value = getattr(obj, axis)
    relation = ("left of" if value < 0.5 else "right of") if axis == "x" else ("above" if value < 0.5 else "below")
    true = rng.random() < 0.5
    said = relation if true else OPPOSITE[relation]
    return (f"The {object_name(obj)} is {RELATIONS[said]} the middle of the picture. True or false?",
            "true" if true else "false")


def context_item(rng: random.Random, scene: Scene, kind: str, instruction_for) -> tuple[str, str, list[str]] | None:
    """A corpus item of a :data:`CONTEXT_KINDS` kind: a relation fact's sentence, then a question about it (an
    either-or or, half the time, a yes/no wording) or a true/false statement of it or its opposite.
    ``instruction_for(kind, question)`` wraps the question in the kind's prompt; None: no fact holds."""
    facts = relation_facts(scene)
    if not facts:
        return None
    subject, obj, relation = rng.choice(facts)
    if kind == "qa_relation":
        wordings = relation_wordings(subject, obj, relation)
        question, answer = wordings[0] if rng.random() < 0.5 else rng.choice(wordings[1:])
    else:
        true = rng.random() < 0.5
        question = relation_sentence(subject, obj, relation if true else OPPOSITE[relation])
        answer = "true" if true else "false"
    return f"{relation_sentence(subject, obj, relation)} {instruction_for(kind, question)}", answer, [answer]
