"""Ranking and generation through the evaluation protocol, against the model scored one candidate at a time."""

from __future__ import annotations

import pytest
import torch
from test_model import tiny_model
from tiny_models import LLAMA_TEXT, T5_TEXT, hf_inputs, tiny_llm_tokenizer

from ibkit.data.registry import get_spec
from ibkit.eval.protocol import PAPER_TABLE1, candidate_tensors, predict_batch, results_markdown

CANDIDATES = [["w5 w6", "w7", "w9 w10 w11", "w12"], ["w20", "w21 w22"]]


@pytest.fixture(scope="module", params=["t5", "llama"])
def setup(request):
    kind = request.param
    return tiny_model({"t5": T5_TEXT, "llama": LLAMA_TEXT}[kind]), tiny_llm_tokenizer(kind)


def _batch(n=2):
    x = hf_inputs(batch=n)
    return {**x, "sample_ids": [f"s{i}" for i in range(n)], "candidates": CANDIDATES[:n], "labels_idx": [0, 1][:n],
            "answers": [["w5"], ["w6"]][:n]}


def test_ranking_matches_scoring_each_candidate_alone(setup):
    model, tok = setup
    spec = get_spec("vsr")  # a ranking dataset (true/false); candidates come from the batch
    records = predict_batch(model, _batch(), spec, tok)
    x = hf_inputs(batch=2)
    for i, row in enumerate(CANDIDATES):
        alone = []
        for cand in row:
            ids, mask = candidate_tensors(tok, [[cand]], model.is_encoder_decoder)
            s = model.score_candidates(
                x["pixel_values"][i : i + 1], x["qformer_input_ids"][i : i + 1], x["qformer_attention_mask"][i : i + 1],
                x["input_ids"][i : i + 1], x["attention_mask"][i : i + 1], ids, mask,
            )
            alone.append(s.item())
        assert records[i]["prediction_index"] == max(range(len(row)), key=lambda c: alone[c])
        assert records[i]["scores"] == pytest.approx(alone, rel=1e-4, abs=1e-3)


def test_padded_candidate_batch_equals_unpadded(setup):
    model, tok = setup
    x = hf_inputs(batch=2)
    ids, mask = candidate_tensors(tok, CANDIDATES, model.is_encoder_decoder)
    assert ids.shape[:2] == (2, 4) and mask[1, 2:].sum() == 0  # row 1 has two padding candidates
    scores = model.score_candidates(
        x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"], x["input_ids"], x["attention_mask"],
        ids, mask, chunk_size=3,
    )
    assert torch.isinf(scores[1, 2:]).all()
    for i, row in enumerate(CANDIDATES):
        ids_i, mask_i = candidate_tensors(tok, [row], model.is_encoder_decoder)
        alone = model.score_candidates(
            x["pixel_values"][i : i + 1], x["qformer_input_ids"][i : i + 1], x["qformer_attention_mask"][i : i + 1],
            x["input_ids"][i : i + 1], x["attention_mask"][i : i + 1], ids_i, mask_i,
        )
        torch.testing.assert_close(scores[i, : len(row)], alone[0], rtol=1e-4, atol=1e-3)


def test_generate_records_and_markdown(setup):
    model, tok = setup
    spec = get_spec("gqa")
    records = predict_batch(model, _batch(), spec, tok, {"max_new_tokens": 3, "num_beams": 1})
    assert [r["sample_id"] for r in records] == ["s0", "s1"]
    assert all(isinstance(r["prediction"], str) for r in records)
    md = results_markdown({"gqa": {"vqa_accuracy": 0.25}}, paper_model="InstructBLIP FlanT5-XL")
    assert "| gqa | vqa_accuracy | 25.0 | 48.4 | -23.4 |" in md
    assert PAPER_TABLE1["InstructBLIP Vicuna-13B"]["ivqa"] == 51.0
