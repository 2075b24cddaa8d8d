"""A record's own wording for the Q-Former (``qformer_question``): read, templated like the LLM's question,
collated into the Q-Former's ids while the LLM reads ``question``, and named where it is malformed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_transforms_collate import qformer_tokenizer, t5_tokenizer

from ibkit.data.collate import InstructionCollator
from ibkit.data.dataset import InstructionDataset
from ibkit.data.errors import MalformedRecordError, SkipCounter
from ibkit.data.registry import get_spec, load_samples
from ibkit.data.registry.custom import register_custom
from ibkit.data.sample import Sample
from ibkit.data.templates import TEMPLATES, fill_instruction
from ibkit.data.transforms import eval_transform
from ibkit.shapes.reader import read_shapes

LLM_QUESTION = "is the w1 to the left of the w2 ?"
QFORMER_QUESTION = "is the w2 to the right of the w1 ?"


@pytest.fixture()
def items(tmp_path: Path) -> Path:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    lines = [
        {"id": "own", "image": "a.png", "question": LLM_QUESTION, "qformer_question": QFORMER_QUESTION, "answer": "yes"},
        {"id": "shared", "image": "a.png", "question": "what is it ?", "answer": "w3"},
        {"id": "empty", "image": "a.png", "question": "what ?", "qformer_question": "  ", "answer": "w3"},
        {"id": "number", "image": "a.png", "question": "what ?", "qformer_question": 7, "answer": "w3"},
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    register_custom([{"name": "qq_items", "format": "jsonl", "path": str(path), "image_root": str(tmp_path),
                      "template_set": "vqa", "metric": "exact_match"}])
    return tmp_path


def test_jsonl_reads_the_qformer_question_and_names_bad_ones(items):
    skips = SkipCounter("qq_items")
    samples = load_samples("qq_items", items, "train", skips=skips)
    assert [(s.sample_id, s.question, s.qformer_question) for s in samples] == [
        ("own", LLM_QUESTION, QFORMER_QUESTION), ("shared", "what is it ?", None)]
    summary = skips.summary()
    assert skips.total == 2
    assert "field 'qformer_question' is empty (e.g. " in summary and "items.jsonl: record line 3 (id=empty)" in summary
    assert "field 'qformer_question' should be str, got int" in summary and "line 4 (id=number)" in summary
    with pytest.raises(MalformedRecordError, match=r"items.jsonl: record line 3 \(id=empty\): field 'qformer_question' is empty"):
        load_samples("qq_items", items, "train", strict=True)


def test_the_template_drawn_for_the_llm_is_filled_with_the_qformer_question():
    sample = Sample("d", "s", image="x.png", question=LLM_QUESTION, qformer_question=QFORMER_QUESTION, answers=["yes"])
    drawn = set()
    for seed in range(40):
        filled = fill_instruction(sample, "vqa", random.Random(seed))
        assert QFORMER_QUESTION not in filled.instruction and LLM_QUESTION in filled.instruction
        assert filled.qformer_instruction == filled.instruction.replace(LLM_QUESTION, QFORMER_QUESTION)
        drawn.add(filled.instruction.replace(LLM_QUESTION, "{question}"))
        # the draw is the one a record without the field gets: the LLM's instruction does not move
        assert fill_instruction(Sample("d", "s", question=LLM_QUESTION, answers=["yes"]), "vqa",
                                random.Random(seed)).instruction == filled.instruction
    assert len(drawn) > 3 and drawn <= set(TEMPLATES["vqa"])
    assert fill_instruction(Sample("d", "s", question="q", answers=["a"]), "vqa", random.Random(0)).qformer_instruction is None


def test_collated_qformer_ids_read_the_own_wording_and_the_llm_ids_the_question(items):
    samples = load_samples("qq_items", items, "train")
    qformer, llm = qformer_tokenizer(), t5_tokenizer()
    for mode, dataset in (
        ("train", InstructionDataset(samples, eval_transform(16), template_set="vqa", require_target=True)),
        ("generate", InstructionDataset(samples, eval_transform(16), spec=get_spec("qq_items"))),  # zero-shot prompt
    ):
        rows = [dataset[i] for i in range(len(samples))]
        own, shared = rows
        assert own["qformer_instruction"].replace(QFORMER_QUESTION, LLM_QUESTION) == own["instruction"]
        assert QFORMER_QUESTION in own["qformer_instruction"] and shared["qformer_instruction"] is None
        batch = InstructionCollator(qformer, llm, True, mode=mode)(rows)
        assert batch["qformer_instructions"] == [own["qformer_instruction"], shared["instruction"]]
        for row, qformer_text, llm_text in ((0, own["qformer_instruction"], own["instruction"]),
                                            (1, shared["instruction"], shared["instruction"])):
            expected_q = qformer(qformer_text)["input_ids"]
            assert batch["qformer_input_ids"][row, : len(expected_q)].tolist() == expected_q
            assert int(batch["qformer_attention_mask"][row].sum()) == len(expected_q)
            expected_llm = llm(llm_text)["input_ids"]
            assert batch["input_ids"][row, : len(expected_llm)].tolist() == expected_llm


def test_a_qformer_instruction_that_is_not_text_is_refused_naming_the_record():
    row = {"pixel_values": torch.zeros(3, 4, 4), "instruction": "q", "qformer_instruction": ["q"], "target": "a",
           "sample_id": "r7", "dataset": "d"}
    with pytest.raises(ValueError, match=r"d/r7: the Q-Former's instruction should be a string, got list"):
        InstructionCollator(qformer_tokenizer(), t5_tokenizer(), True, mode="train")([row])


def test_shapes_records_carry_it_and_one_without_question_is_skipped_by_name(tmp_path):
    folder = tmp_path / "shapes_vqa"
    (folder / "images").mkdir(parents=True)
    records = [
        {"id": "a", "image": "a.png", "question": LLM_QUESTION, "qformer_question": QFORMER_QUESTION, "answers": ["yes"]},
        {"id": "b", "image": "b.png", "qformer_question": QFORMER_QUESTION, "answers": ["yes"]},
        {"id": "c", "image": "c.png", "question": "q", "qformer_question": 3, "answers": ["yes"]},
    ]
    (folder / "train.json").write_text(json.dumps({"info": {"dataset": "shapes_vqa"}, "records": records}))
    skips = SkipCounter("shapes_vqa")
    samples = read_shapes({"train": folder / "train.json", "images": folder / "images"}, "train", skips)
    assert [(s.sample_id, s.qformer_question) for s in samples] == [("a", QFORMER_QUESTION)]
    summary = skips.summary()
    assert "'qformer_question' (the Q-Former's wording of the question) needs 'question'" in summary
    assert "'qformer_question' must be a string" in summary
