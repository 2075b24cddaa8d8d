"""The binding probe of ibkit.shapes.probe: its records, its scoring and its model answers."""

from __future__ import annotations

import json
import re

import pytest

from ibkit.shapes.probe import (
    PROBE_KINDS,
    binding_table,
    format_table,
    language_model_answerer,
    probe_records,
    score,
)
from ibkit.shapes.render import COLORS


def _described_objects(prompt: str) -> int:
    return len(re.findall(r"\b(?:small|large) \w+ \w+ (?:on|at|in) the\b", prompt))


@pytest.mark.parametrize("objects", [1, 2, 3, 4])
def test_records_describe_exactly_the_asked_number_of_objects(objects):
    records = probe_records("qa_color", objects, 30)
    assert len(records) == 30
    assert {r["objects"] for r in records} == {objects}
    assert all(_described_objects(r["prompt"]) == objects for r in records)
    for record in records:  # the answer is one of the described colours: a binding question, not a guess
        (answer,) = record["answers"]
        assert answer in COLORS and answer in record["prompt"].split("Question")[0]
    assert probe_records("qa_color", objects, 30) == records  # the same for the same seed
    assert probe_records("qa_color", objects, 30, seed=1) != records


def test_true_false_needs_two_objects_and_bad_arguments_are_named():
    assert probe_records("true_false", 1, 10) == []
    assert len(probe_records("true_false", 2, 10)) == 10
    with pytest.raises(ValueError, match="qa_colour"):
        probe_records("qa_colour", 2, 10)
    with pytest.raises(ValueError, match="objects: 5"):
        probe_records("qa_color", 5, 10)


def test_a_folder_without_a_model_is_named(tmp_path, capsys):
    from ibkit.shapes.probe import main

    with pytest.raises(FileNotFoundError, match="no config.json"):
        language_model_answerer(str(tmp_path))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "lm")])
    assert f"{tmp_path / 'lm'}: not a language model folder" in capsys.readouterr().err


def test_scoring_an_oracle_a_constant_and_a_first_colour_answerer():
    def oracle(prompts):
        return [by_prompt[p] for p in prompts]

    records = probe_records("qa_exists", 2, 200) + probe_records("qa_color", 2, 200)
    by_prompt = {r["prompt"]: r["answers"][0].upper() for r in records}  # case does not count
    assert score(oracle, records, batch_size=64) == {"value": 1.0, "stderr": 0.0, "n": 400}

    exists = probe_records("qa_exists", 3, 200)
    always_yes = score(lambda prompts: ["yes"] * len(prompts), exists)
    assert 0.35 < always_yes["value"] < 0.65  # yes and no balanced
    assert always_yes["stderr"] == pytest.approx((always_yes["value"] * (1 - always_yes["value"]) / 200) ** 0.5)

    def first_colour(prompts):  # the colour of the first object described: right only by luck beyond one object
        return [next(w for w in p.split() if w in COLORS) for p in prompts]

    table = binding_table(first_colour, kinds=["qa_color"], per_cell=120)
    assert table["qa_color"][1]["value"] == 1.0
    assert table["qa_color"][4]["value"] < 0.5
    text = format_table(table)
    assert "| qa_color | 1.00 ± 0.00 |" in text and text.count("\n") == 2


def test_model_answers_are_the_lm_steps_validation_answers(tmp_path):
    """The probe loads an exported LM as the later stages do and answers as the LM step's validation does."""
    import torch

    from ibkit.models.language import LanguageModel
    from ibkit.shapes.datamodule import LLM_SPECIALS, build_vocabulary, word_level_tokenizer
    from ibkit.training.text_lm import TextLMModule
    from tests.test_text_lm import TINY_T5

    records = [r for kind in PROBE_KINDS for r in probe_records(kind, 2, 4)]
    texts = [r["prompt"] + " " + " ".join(r["answers"]) for r in records]
    tokenizer = word_level_tokenizer(build_vocabulary(texts, 256, LLM_SPECIALS), "t5")
    torch.manual_seed(0)
    lm = LanguageModel(config={**TINY_T5, "vocab_size": len(tokenizer)}, frozen=False)  # every row a word
    with torch.no_grad():  # special tokens score 0 (embeddings tied): a random model then says words, not ""
        lm.base_model.get_input_embeddings().weight[tokenizer.all_special_ids] = 0.0
    module = TextLMModule(lm, max_new_tokens=6)
    module._tokenizer = tokenizer
    module.save_model(tmp_path / "lm", tokenizer)
    prompts = [r["prompt"] for r in records]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    expected = module.eval().answer(batch["input_ids"], batch["attention_mask"])
    got = language_model_answerer(str(tmp_path / "lm"), max_new_tokens=6)(prompts)
    assert got == expected
    assert all(got) and len(set(got)) > 1  # words, and not the same for every prompt
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["model_type"] == "t5"
