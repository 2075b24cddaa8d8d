"""Numerical parity with transformers' InstructBlipForConditionalGeneration (the independent implementation)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import (
    IMAGE_TOKEN,
    LLAMA_TEXT,
    NUM_QUERIES,
    T5_TEXT,
    VISION,
    VOCAB,
    assert_folder_runs_in_transformers,
    hf_inputs,
    save_hf_instructblip,
    tiny_llm_tokenizer,
    tiny_qformer_tokenizer,
    with_placeholders,
)

from ibkit import InstructBLIP

TEXTS = {"t5": T5_TEXT, "llama": LLAMA_TEXT}


@pytest.fixture(scope="module", params=["t5", "llama"])
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf = save_hf_instructblip(TEXTS[request.param], directory)
    ours = InstructBLIP.from_pretrained(directory).eval()
    return request.param, hf, ours, directory


def _targets(batch=2, length=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, IMAGE_TOKEN, (batch, length), generator=g)


def _forward_both(kind, hf, ours):
    x = hf_inputs()
    ids, mask = with_placeholders(x["input_ids"], x["attention_mask"])
    common = {k: x[k] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
    target = _targets()
    if kind == "t5":
        labels = target.clone()
        labels[1, -1] = -100
        ref = hf(**common, input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(**x, labels=labels)
        return ref.logits, got.logits, ref.loss, got.loss
    full_ids = torch.cat((x["input_ids"], target), 1)
    full_mask = torch.ones_like(full_ids)
    full_mask[1, -1] = 0  # right padding on row 1
    labels = full_ids.masked_fill(full_mask == 0, -100)
    labels[:, : x["input_ids"].shape[1]] = -100
    hf_ids, hf_mask = with_placeholders(full_ids, full_mask)
    hf_labels = torch.cat((torch.full((2, NUM_QUERIES), -100), labels), 1)
    ref = hf(**common, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels)
    got = ours(**common, input_ids=full_ids, attention_mask=full_mask, labels=labels)
    valid = full_mask.bool()  # logits at padding positions are meaningless in both implementations
    return ref.logits[:, NUM_QUERIES:][valid], got.logits[valid], ref.loss, got.loss


def test_logits_and_loss_match_transformers(pair):
    kind, hf, ours, _ = pair
    with torch.no_grad():
        ref_logits, logits, ref_loss, loss = _forward_both(kind, hf, ours)
    assert logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_matches_transformers(pair, beams):
    kind, hf, ours, _ = pair
    x = hf_inputs()
    ids, mask = with_placeholders(x["input_ids"], x["attention_mask"])
    kwargs = dict(max_new_tokens=6, num_beams=beams, do_sample=False)
    ref = hf.generate(
        pixel_values=x["pixel_values"], qformer_input_ids=x["qformer_input_ids"],
        qformer_attention_mask=x["qformer_attention_mask"], input_ids=ids, attention_mask=mask, **kwargs,
    )
    got = ours.generate(**x, **kwargs)
    ref = ref[:, 1:] if kind == "t5" else ref[:, ids.shape[1]:]
    assert got.tolist() == ref.tolist()
    assert got.shape[1] > 0


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    kind, hf, ours, _ = pair
    ours.save_pretrained(tmp_path / "export")
    again, info = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref_logits, _, _, _ = _forward_both(kind, hf, ours)
        new_logits, _, _, _ = _forward_both(kind, again.eval(), ours)
    torch.testing.assert_close(new_logits, ref_logits, atol=1e-5, rtol=1e-5)
    reloaded = InstructBLIP.from_pretrained(tmp_path / "export")
    for (name, a), b in zip(ours.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


PROMPTS = ["w5 w6 w7 w8", "w9 w10 w11 w12"]


def _processor(kind: str):
    from ibkit.processor import Processor

    return Processor(tiny_qformer_tokenizer(), tiny_llm_tokenizer(kind), image_size=VISION["image_size"])


def test_export_with_tokenizers_runs_in_transformers(pair, tmp_path):
    """The folder runs in transformers as its users run it: InstructBlipProcessor + forward + greedy generate."""
    kind, _, ours, _ = pair
    ours.save_pretrained(tmp_path / "export", processor=_processor(kind))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["image_token_index"] == IMAGE_TOKEN and config["num_query_tokens"] == NUM_QUERIES
    assert json.loads((tmp_path / "export" / "processor_config.json").read_text())["num_query_tokens"] == NUM_QUERIES
    assert_folder_runs_in_transformers(tmp_path / "export", ours, PROMPTS)


def test_a_model_without_image_token_exports_one(pair, tmp_path):
    """A folder with ``image_token_index: null`` (what ibkit wrote before issue 18, and what a LAVIS conversion
    gives) loads; exporting it writes a placeholder id transformers can run, growing the LLM vocabulary when
    the id is new."""
    from transformers import InstructBlipForConditionalGeneration

    kind, _, _, directory = pair
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    config = json.loads((old / "config.json").read_text())
    config["image_token_index"] = None
    (old / "config.json").write_text(json.dumps(config))
    model = InstructBLIP.from_pretrained(old)
    assert model.image_token_index is None

    # no tokenizer: a new row after the vocabulary
    model.save_pretrained(tmp_path / "bare")
    saved = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert saved["image_token_index"] == VOCAB and saved["text_config"]["vocab_size"] == VOCAB + 1
    hf = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "bare").eval()
    x = hf_inputs()
    ids = torch.cat((torch.full((2, NUM_QUERIES), VOCAB), x["input_ids"]), 1)
    mask = torch.cat((torch.ones(2, NUM_QUERIES, dtype=torch.long), x["attention_mask"]), 1)
    common = {k: x[k] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
    kwargs = dict(max_new_tokens=5, num_beams=1, do_sample=False)
    ref = hf.generate(**common, input_ids=ids, attention_mask=mask, **kwargs)
    ref = ref[:, 1:] if kind == "t5" else ref[:, ids.shape[1]:]
    assert ref.tolist() == model.generate(**x, **kwargs).tolist()
    assert InstructBLIP.from_pretrained(tmp_path / "bare").image_token_index == VOCAB

    # with the tokenizers: <image> is added to the saved LLM tokenizer, the caller's tokenizer is left alone
    processor = _processor(kind)
    model.save_pretrained(tmp_path / "full", processor=processor)
    assert "<image>" not in processor.llm_tokenizer.get_vocab()
    assert json.loads((tmp_path / "full" / "config.json").read_text())["image_token_index"] == len(processor.llm_tokenizer)
    assert_folder_runs_in_transformers(tmp_path / "full", model, PROMPTS)
