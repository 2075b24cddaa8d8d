"""The text-only instruction corpus of the demo's LM step: answers agree with the scene, no held-out content."""

from __future__ import annotations

import json
import random
import re

import pytest

from ibkit.shapes.scenes import (
    NOVEL_PAIRS,
    RELATIONS,
    TRAIN_PAIRS,
    describe,
    position_bins,
    qa_pool,
    relation_holds,
    sample_scene,
)
from ibkit.shapes.text_corpus import KINDS, TEXT_CORPUS, make_item, make_records

SENTENCE = re.compile(r"An? (small|large) (\w+) (\w+) (?:on the|at the|in the) ?(top|bottom)? ?(left|right|middle)?\.")


def _described(prompt: str) -> dict[str, dict[str, str]]:
    """name -> {size, x} of every object a prompt's description states."""
    objects = {}
    for size, color, shape, _, x in SENTENCE.findall(prompt):
        objects[f"{color} {shape}"] = {"size": size, "x": x or "middle"}
    return objects


def test_side_words_of_the_description_are_the_vqa_side_answers():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng, rng.randint(1, 4), TRAIN_PAIRS)
        side = {question: answer for question, answer in qa_pool(scene, TRAIN_PAIRS)["side"]}
        described = _described(describe(scene))
        for obj in scene.objects:
            name = f"{obj.color} {obj.shape}"
            question = f"Is the {name} on the left or on the right of the picture?"
            assert described[name]["x"] == side.get(question, "middle") == position_bins(obj)[0]
            assert described[name]["size"] == obj.size


def test_records_answer_what_their_description_says():
    records = make_records(1, "train", 600)
    assert {record["kind"] for record in records} == set(KINDS)
    for record in records:
        described = _described(record["prompt"])
        question = record["prompt"].split(". ", len(described))[-1]
        assert record["target"] in record["answers"]
        if record["kind"] == "qa_side":
            name = re.search(r"Is the (\w+ \w+) on the left", question).group(1)
            assert record["target"] == described[name]["x"]
        elif record["kind"] == "qa_count" and "How many shapes" in question:
            assert record["target"] == str(len(described))
        elif record["kind"] == "color_present":
            color = re.search(r"(red|orange|yellow|green|blue|purple)", question).group(1)
            present = any(name.startswith(color + " ") for name in described)
            assert record["target"] == ("yes" if present else "no")


def test_true_false_statements_are_true_exactly_when_the_relation_holds_and_are_balanced():
    rng = random.Random(2)
    answers = []
    for _ in range(400):
        scene = sample_scene(rng, rng.randint(2, 4), TRAIN_PAIRS)
        item = make_item(rng, scene, "true_false")
        if item is None:
            continue
        instruction, target, _ = item
        by_name = {f"{obj.color} {obj.shape}": obj for obj in scene.objects}
        phrases = "|".join(RELATIONS.values())
        subject, phrase, obj = re.search(rf"The (\w+ \w+) is ({phrases}) the (\w+ \w+)\.", instruction).groups()
        relation = next(name for name, text in RELATIONS.items() if text == phrase)
        assert target == ("true" if relation_holds(by_name[subject], by_name[obj], relation) else "false")
        answers.append(target)
    assert 0.4 < answers.count("true") / len(answers) < 0.6


def test_no_novel_pair_and_no_held_out_content_ever_appears():
    records = make_records(4, "train", 2000)
    text = " ".join(r["prompt"] + " " + " ".join(r["answers"]) for r in records).lower()
    for color, shape in NOVEL_PAIRS:
        assert f"{color} {shape}" not in text
    for held_out in ("corner", "warm", "cool", "moving", "written", "hateful"):
        assert held_out not in text


def test_corpus_is_deterministic_for_a_seed():
    assert make_records(7, "train", 50) == make_records(7, "train", 50)
    assert make_records(7, "train", 50) != make_records(8, "train", 50)
    assert make_records(7, "train", 50) != make_records(7, "val", 50)


def test_workspace_writes_the_corpus_only_when_asked_and_its_words_are_in_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    from ibkit.shapes.datamodule import prepare_tiny_workspace
    from ibkit.shapes.writer import TINY_SIZES, split_sizes

    plain = prepare_tiny_workspace(tmp_path / "plain")
    assert not (tmp_path / "plain" / "shapes" / TEXT_CORPUS).exists()
    sizes = {**TINY_SIZES, f"{TEXT_CORPUS}.train": 40, f"{TEXT_CORPUS}.val": 10}
    assert split_sizes(TEXT_CORPUS, sizes) == {"train": 40, "val": 10}
    paths = prepare_tiny_workspace(tmp_path / "ws", sizes=sizes)
    folder = tmp_path / "ws" / "shapes" / TEXT_CORPUS
    records = json.loads((folder / "train.json").read_text())["records"]
    assert len(records) == 40 and len(json.loads((folder / "val.json").read_text())["records"]) == 10
    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    unknown = tokenizer.unk_token_id
    for record in records:
        assert unknown not in tokenizer(record["prompt"] + " " + record["target"])["input_ids"], record
    # the image datasets are the same as without the corpus
    before = (tmp_path / "plain" / "shapes" / "shapes_vqa" / "train.json").read_text()
    assert (tmp_path / "ws" / "shapes" / "shapes_vqa" / "train.json").read_text() == before
    assert plain["llm"].is_dir()


def test_corpus_is_written_once_per_manifest_and_rewritten_for_another_seed(tmp_path):
    from ibkit.shapes.text_corpus import write_text_corpus

    sizes = {"train": 8, "val": 4}
    folder = write_text_corpus(tmp_path, 0, sizes)

    def stamp() -> list[tuple[int, int]]:
        return [((folder / f"{s}.json").stat().st_ino, (folder / f"{s}.json").stat().st_mtime_ns) for s in sizes]

    before = stamp()
    assert write_text_corpus(tmp_path, 0, sizes) == folder and stamp() == before  # left alone
    write_text_corpus(tmp_path, 1, sizes)
    assert json.loads((folder / "train.json").read_text())["info"]["seed"] == 1
    (folder / "val.json").unlink()  # a damaged corpus is rewritten
    write_text_corpus(tmp_path, 1, sizes)
    assert len(json.loads((folder / "val.json").read_text())["records"]) == 4
    assert not [p for p in (tmp_path / "shapes").iterdir() if p.name.startswith(".")]  # no scratch left over


def test_unknown_corpus_split_is_refused():
    from ibkit.shapes.writer import split_sizes

    with pytest.raises(ValueError, match="shapes_text.test"):
        split_sizes("shapes_vqa", {"shapes_text.test": 3})


def test_pretraining_captions_include_the_description_and_held_out_references_do_not():
    """shapes_caption (the pre-training captions) ends with the scene's description in the LM's language;
    the NoCaps-like references stay captions, so the held-out metric is unchanged."""
    from ibkit.shapes.tasks import TASKS

    rng = random.Random(3)
    for _ in range(50):
        record, scene = TASKS["shapes_caption"](rng)
        assert record["answers"][-1] == describe(scene)
        assert set(_described(record["answers"][-1])) == {f"{o.color} {o.shape}" for o in scene.objects}
        record, scene = TASKS["shapes_nocaps"](rng)
        assert describe(scene) not in record["answers"]


def test_focused_records_hold_only_the_asked_kinds_and_object_counts_and_never_repeat_the_corpus():
    from ibkit.shapes.text_corpus import make_focused_records

    records = make_focused_records(0, "train", 300, ["qa_color", "qa_shape"], (2, 4))
    assert {r["kind"] for r in records} == {"qa_color", "qa_shape"}
    # one sentence per object, "A large red circle on the left."
    assert {len(re.findall(r"\b(?:A|An) (?:small|large) ", r["prompt"])) for r in records} == {2, 3, 4}
    for record in records:  # still answered by the description: the answer is the named object's attribute
        assert record["target"] in record["prompt"].split("?")[0]
    assert make_focused_records(0, "train", 50, ["qa_color"], (2, 4)) == make_focused_records(0, "train", 50, ["qa_color"], (2, 4))
    assert {r["prompt"] for r in records}.isdisjoint(r["prompt"] for r in make_records(0, "train", 2000))
    one = make_focused_records(0, "val", 40, ["qa_side"], (1, 1))
    assert all(len(re.findall(r"\b(?:A|An) (?:small|large) ", r["prompt"])) == 1 for r in one)
    with pytest.raises(ValueError, match="qa_colour"):
        make_focused_records(0, "train", 5, ["qa_colour"], (2, 4))
    with pytest.raises(ValueError, match=r"objects \(0, 4\)"):
        make_focused_records(0, "train", 5, ["qa_color"], (0, 4))
    with pytest.raises(ValueError, match=r"objects \(3, 2\)"):
        make_focused_records(0, "train", 5, ["qa_color"], (3, 2))


def test_text_data_module_trains_on_focused_records_made_in_memory(tmp_path):
    from ibkit.shapes.datamodule import ShapesTextDataModule
    from ibkit.shapes.writer import TINY_SIZES

    sizes = {**TINY_SIZES, f"{TEXT_CORPUS}.train": 40, f"{TEXT_CORPUS}.val": 10}
    plain = ShapesTextDataModule(root=str(tmp_path), sizes=sizes)
    focused = ShapesTextDataModule(root=str(tmp_path), sizes=sizes, focus_kinds=["qa_shape"], focus_objects=(2, 3))
    for module in (plain, focused):
        module.prepare_data()
        module.setup("fit")
    assert len(focused.train_set) == 40 and len(focused.val_set) == 10
    assert {r["kind"] for r in focused.train_set.records} == {r["kind"] for r in focused.val_set.records} == {"qa_shape"}
    assert len({r["kind"] for r in plain.train_set.records}) > 1  # the corpus on disk, every kind
    with pytest.raises(ValueError, match="qa_size_of"):
        ShapesTextDataModule(root=str(tmp_path), sizes=sizes, focus_kinds=["qa_size_of"])


def test_records_made_in_memory_are_checked_as_a_files_are():
    from ibkit.data.text import TextPairDataset

    assert len(TextPairDataset.of_records([{"prompt": "p", "target": "t"}], "made here")) == 1
    with pytest.raises(ValueError, match="made here: record 1: field 'target'"):
        TextPairDataset.of_records([{"prompt": "p", "target": "t"}, {"prompt": "p", "target": ""}], "made here")
    with pytest.raises(ValueError, match="made here: no text records"):
        TextPairDataset.of_records([], "made here")
