"""The relation recipe's shapes data (``relations=True``): held-in relation questions in two wordings, vertical
side questions, side statements, and a text corpus whose relation kinds read one relation sentence. Every
answer is checked against the scene stored beside it; the default workspace is left exactly as it was."""

from __future__ import annotations

import json
import random
import re

import pytest

from ibkit.shapes.relations import CONTEXT_KINDS, RELATION_QA_TYPES, STATEMENT_TYPE
from ibkit.shapes.render import Scene
from ibkit.shapes.scenes import RELATIONS, SIDE_THRESHOLD, relation_holds
from ibkit.shapes.tasks import maker_for
from ibkit.shapes.text_corpus import TEXT_CORPUS, make_records

WORDS = {words: relation for relation, words in RELATIONS.items()}
NAME = r"(\w+ \w+)"
EITHER = {
    re.compile(rf"^Is the {NAME} to the left or to the right of the {NAME}\?$"): {"left": "left of", "right": "right of"},
    re.compile(rf"^Is the {NAME} above or below the {NAME}\?$"): {"above": "above", "below": "below"},
}
YES_NO = re.compile(rf"^Is the {NAME} (to the left of|to the right of|above|below) the {NAME}\?$")
SENTENCE = re.compile(rf"^The {NAME} is (to the left of|to the right of|above|below) the {NAME}\.")


def _objects(scene: Scene) -> dict:
    return {f"{o.color} {o.shape}": o for o in scene.objects}


def _relation_answer(question: str, scene: Scene) -> tuple[str, str, str]:
    """(subject, object, the answer the scene gives) of a relation question in any of its wordings."""
    objects = _objects(scene)
    for pattern, answers in EITHER.items():
        if match := pattern.match(question):
            a, b = objects[match[1]], objects[match[2]]
            holding = [word for word, relation in answers.items() if relation_holds(a, b, relation)]
            assert len(holding) == 1, question  # asked only where one side clearly holds
            return match[1], match[2], holding[0]
    match = YES_NO.match(question)
    assert match, question
    said = relation_holds(objects[match[1]], objects[match[3]], WORDS[match[2]])
    return match[1], match[3], "yes" if said else "no"


def test_relation_questions_are_right_about_the_scene_and_the_two_wordings_state_one_fact():
    rng, seen, differ = random.Random(0), {"relation": 0, STATEMENT_TYPE: 0, "vertical": 0}, 0
    for _ in range(300):
        records, scene = maker_for("shapes_vqa", "train", relations=True)(rng)
        by_name = _objects(scene)
        for record in records:
            qtype, answer = record["extra"]["question_type"], record["answers"][0]
            if qtype == "relation":
                seen["relation"] += 1
                a, b, expected = _relation_answer(record["question"], scene)
                assert answer == expected, record
                own = record.get("qformer_question")
                if own is not None:
                    differ += 1
                    assert own != record["question"]
                    qa, qb, _ = _relation_answer(own, scene)  # a true question about the same two shapes
                    assert (qa, qb) == (a, b)
            elif qtype == STATEMENT_TYPE:
                seen[STATEMENT_TYPE] += 1
                match = re.match(rf"^The {NAME} is (to the left of|to the right of|above|below) the middle of the "
                                 r"picture\. True or false\?$", record["question"])
                obj, relation = by_name[match[1]], WORDS[match[2]]
                value = obj.x if relation in ("left of", "right of") else obj.y
                assert abs(value - 0.5) >= SIDE_THRESHOLD
                holds = value < 0.5 if relation in ("left of", "above") else value > 0.5
                assert answer == ("true" if holds else "false"), record
            elif qtype == "side" and "top or at the bottom" in record["question"]:
                seen["vertical"] += 1
                obj = by_name[re.match(rf"^Is the {NAME} at the top", record["question"])[1]]
                assert answer == ("top" if obj.y < 0.5 else "bottom") and abs(obj.y - 0.5) >= SIDE_THRESHOLD
    assert min(seen.values()) > 100 and 0.4 < differ / seen["relation"] < 0.9  # two of three draws differ
    types = {maker_for("shapes_vqa", "val", relations=True)(rng)[0]["extra"]["question_type"] for _ in range(300)}
    assert types == set(RELATION_QA_TYPES)  # validation asks every type, the recipe's own included


def test_the_corpus_reads_relations_from_one_sentence_and_the_rest_from_descriptions():
    records = make_records(0, "train", 600, relations=True)
    kinds = {record["kind"] for record in records}
    assert "qa_relation" in kinds and "true_false" in kinds
    for record in records:
        match = SENTENCE.match(record["prompt"])
        if record["kind"] not in CONTEXT_KINDS:
            assert record["prompt"].startswith(("A ", "An ")), record  # the scene's description
            continue
        assert match, record
        fact = (match[1], WORDS[match[2]], match[3])
        question = record["prompt"][match.end():]
        if record["kind"] == "true_false":
            said = re.search(rf"The {NAME} is (to the left of|to the right of|above|below) the {NAME}\.", question)
            stated = (said[1], WORDS[said[2]], said[3])
            assert record["target"] == ("true" if stated == fact else "false"), record
        else:
            either = re.search(rf"Is the {NAME} (?:to the left or to the right of|above or below) the {NAME}\?", question)
            if either:
                assert record["target"] == {"left of": "left", "right of": "right", "above": "above",
                                            "below": "below"}[fact[1]], record
            else:
                asked = re.search(rf"Is the {NAME} (to the left of|to the right of|above|below) the {NAME}\?", question)
                assert record["target"] == ("yes" if WORDS[asked[2]] == fact[1] else "no"), record
    assert make_records(0, "train", 50, relations=True) == records[:50]  # deterministic
    assert make_records(0, "train", 50) != records[:50]
    assert "qa_relation" not in {r["kind"] for r in make_records(0, "train", 300)}  # the default corpus has none


def test_a_relations_workspace_changes_held_in_vqa_and_the_corpus_only(tmp_path):
    from transformers import AutoTokenizer

    from ibkit.shapes.datamodule import prepare_tiny_workspace
    from ibkit.shapes.writer import TINY_SIZES

    sizes = {**TINY_SIZES, "shapes_vqa.train": 30, f"{TEXT_CORPUS}.train": 60, f"{TEXT_CORPUS}.val": 10}
    plain = prepare_tiny_workspace(tmp_path / "plain", sizes=sizes)
    paths = prepare_tiny_workspace(tmp_path / "rel", sizes=sizes, relations=True)
    for folder in sorted((tmp_path / "plain" / "shapes").iterdir()):
        other = tmp_path / "rel" / "shapes" / folder.name
        manifest = json.loads((other / "manifest.json").read_text())
        changed = folder.name in ("shapes_vqa", TEXT_CORPUS)
        assert manifest.get("relations", False) is changed, folder.name
        assert "relations" not in json.loads((folder / "manifest.json").read_text())  # the default as it was
        same = [(folder / f"{s}.json").read_text() == (other / f"{s}.json").read_text()
                for s in ("train", "val", "test") if (folder / f"{s}.json").exists()]
        assert all(same) is not changed, folder.name
    records = json.loads((tmp_path / "rel" / "shapes" / "shapes_vqa" / "train.json").read_text())["records"]
    assert {"relation", STATEMENT_TYPE} <= {r["extra"]["question_type"] for r in records}
    assert any("qformer_question" in r for r in records)
    for name in ("llm", "qformer"):  # every word of the recipe's text has an id
        tokenizer = AutoTokenizer.from_pretrained(paths[name])
        corpus = json.loads((tmp_path / "rel" / "shapes" / TEXT_CORPUS / "train.json").read_text())["records"]
        texts = [r["prompt"] for r in corpus] + [r["question"] for r in records] + [
            r["qformer_question"] for r in records if "qformer_question" in r]
        assert all(tokenizer.unk_token_id not in tokenizer(t)["input_ids"] for t in texts), name
    assert plain["llm"] != paths["llm"]


def test_the_recipes_question_types_are_known_only_to_a_relations_workspace(tmp_path):
    from ibkit.shapes.datamodule import TinyShapesDataModule

    kept = TinyShapesDataModule(root=str(tmp_path), datasets=["shapes_vqa"], relations=True,
                                question_types=["side", STATEMENT_TYPE, "relation"])
    assert kept.question_types == {"shapes_vqa": ["side", STATEMENT_TYPE, "relation"]}
    with pytest.raises(ValueError, match="relations: true"):
        TinyShapesDataModule(root=str(tmp_path), datasets=["shapes_vqa"], question_types=["relation"])
