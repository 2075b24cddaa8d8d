"""The placement probe of ibkit.shapes.placement_probe: its items, its table, and which text reaches which model."""

from __future__ import annotations

import json
import re

import pytest

from ibkit.shapes.placement_probe import (
    READERS,
    ROLES,
    SIDES,
    format_table,
    model_answerer,
    placement_items,
    placement_table,
)
from ibkit.shapes.scenes import SIDE_THRESHOLD
from ibkit.shapes.writer import make_shapes

NAME = re.compile(r"\b(red|orange|yellow|green|blue|purple) (circle|triangle|square|star)\b")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("placement")
    make_shapes(folder, seed=5, sizes={"train": 1, "val": 1, "test": 60}, names=["shapes_vsr"], progress=False)
    return folder


def _records(root):
    return {r["id"]: r for r in json.loads((root / "shapes/shapes_vsr/test.json").read_text())["records"]}


def test_items_ask_each_named_shape_away_from_the_middle_about_its_own_side(root):
    records, items = _records(root), placement_items(root)
    expected = sum(abs(r["scene"]["objects"][r["extra"][key]]["x"] - 0.5) >= SIDE_THRESHOLD
                   for r in records.values() for key in ("subj", "obj"))
    assert len(items) == expected and {i["role"] for i in items} == set(ROLES)
    for item in items:
        record = records[item["id"]]
        subject, obj = NAME.findall(record["question"])  # the statement names the subject first
        asked = NAME.findall(item["prompt"])
        assert asked == [subject if item["role"] == "subject" else obj]
        shape = record["scene"]["objects"][record["extra"]["subj" if item["role"] == "subject" else "obj"]]
        assert item["answer"] == ("left" if shape["x"] < 0.5 else "right")
        assert item["qformer"]["statement"].endswith(record["question"])  # the test's own prompt and statement
        assert item["qformer"]["side question"] == item["prompt"] and item["image"].is_file()


def test_the_table_keeps_the_two_texts_and_the_two_roles_apart(root):
    records, items = _records(root), placement_items(root)
    sides = {}  # (picture, shape name) -> its side
    for record in records.values():
        for shape in record["scene"]["objects"]:
            sides[(record["image"].split("/")[-1], f"{shape['color']} {shape['shape']}")] = SIDES[shape["x"] >= 0.5]

    def first_name_reader(qformer_texts, prompts, images):
        """Places only the first shape its Q-Former text names; the LLM says that shape's side if asked about it."""
        said = []
        for text, prompt, image in zip(qformer_texts, prompts, images):
            placed, (asked,) = NAME.findall(text)[0], NAME.findall(prompt)
            side = sides[(image.name, " ".join(asked))]
            said.append(side if placed == asked else SIDES[1 - SIDES.index(side)])
        return said

    table = placement_table(first_name_reader, items, batch_size=7)
    assert set(table) == set(READERS)
    assert table["statement"]["subject"]["accuracy"] == 1.0 and table["statement"]["object"]["accuracy"] == 0.0
    assert table["side question"]["subject"]["accuracy"] == 1.0 == table["side question"]["object"]["accuracy"]
    assert sum(table["statement"][role]["n"] for role in ROLES) == len(items)
    assert table["statement"]["subject"]["se"] == 0.0
    text = format_table(table)
    assert "| the statement | 1.000 ± 0.000" in text and "| the side question |" in text


def test_the_model_reads_the_statement_in_the_qformer_and_the_side_question_in_the_llm(root, tmp_path, monkeypatch):
    from test_model import tiny_model
    from tiny_models import T5_TEXT, VISION, qformer_tokenizer, tiny_llm_tokenizer

    from ibkit import Processor
    from ibkit.models.instructblip import InstructBLIP

    processor = Processor(qformer_tokenizer(), tiny_llm_tokenizer("t5"), image_size=VISION["image_size"])
    tiny_model(T5_TEXT, qformer_vocab=30523).save_pretrained(tmp_path / "model", processor=processor)
    seen = []
    original = InstructBLIP.score_candidates

    def spy(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask, *args, **kwargs):
        seen.append((qformer_input_ids, input_ids, pixel_values.shape))
        return original(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
                        *args, **kwargs)

    monkeypatch.setattr(InstructBLIP, "score_candidates", spy)
    items = placement_items(root)[:3]
    said = model_answerer(tmp_path / "model")([i["qformer"]["statement"] for i in items], [i["prompt"] for i in items],
                                              [i["image"] for i in items])
    assert len(said) == 3 and set(said) <= set(SIDES)
    (qformer_ids, llm_ids, shape), = seen
    statements, questions = [i["qformer"]["statement"] for i in items], [i["prompt"] for i in items]

    def ids(tokenizer, texts):
        return processor.tokenize(tokenizer, texts, 128, "right")["input_ids"].tolist()

    assert ids(processor.qformer_tokenizer, statements) != ids(processor.qformer_tokenizer, questions)
    assert ids(processor.llm_tokenizer, statements) != ids(processor.llm_tokenizer, questions)
    assert qformer_ids.tolist() == ids(processor.qformer_tokenizer, statements)  # the Q-Former reads the statement
    assert llm_ids.tolist() == ids(processor.llm_tokenizer, questions)  # the LLM the side question
    assert shape[0] == 3

def test_a_missing_folder_or_a_record_without_its_shapes_is_named(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="shapes_vsr"):
        placement_items(tmp_path)
    broken = tmp_path / "broken"
    (broken / "shapes/shapes_vsr").mkdir(parents=True)
    data = json.loads((root / "shapes/shapes_vsr/test.json").read_text())
    del data["records"][2]["extra"]["obj"]
    (broken / "shapes/shapes_vsr/test.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{data['records'][2]['id']}.*extra.obj"):
        placement_items(broken)
    with pytest.raises(FileNotFoundError, match="instruct/model"):
        model_answerer(tmp_path / "nothing")
