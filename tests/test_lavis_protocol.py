"""Issue 18: the evaluation protocol and the data as LAVIS's InstructBLIP ran them (each test failed before)."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from test_model import tiny_model
from test_transforms_collate import item, llama_tokenizer, qformer_tokenizer, t5_tokenizer, words
from tiny_models import LLAMA_TEXT, T5_TEXT, hf_inputs, tiny_llm_tokenizer

from ibkit.data.catalog import check_root, format_check
from ibkit.data.collate import InstructionCollator
from ibkit.data.datamodule import InstructionDataModule
from ibkit.data.registry import get_spec, load_samples
from ibkit.data.sample import Sample
from ibkit.data.templates import fill_instruction
from ibkit.eval.evaluator import Evaluator
from ibkit.eval.protocol import candidate_tensors, generation_settings, predict_batch
from ibkit.models.language import LanguageModel


# -- item 2: generation defaults -------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["nocaps", "flickr30k", "gqa", "vizwiz", "textvqa", "ivqa", "okvqa"])
@pytest.mark.parametrize("encoder_decoder", [True, False])
def test_generation_uses_lavis_repetition_penalty(dataset, encoder_decoder):
    """LAVIS's generate default (1.5) is never overridden for captions or short answers."""
    assert generation_settings(get_spec(dataset), encoder_decoder)["repetition_penalty"] == 1.5


def test_caption_min_length_counts_the_t5_decoder_start_token():
    """LAVIS's min_length=10 is 10 new tokens for Vicuna (it generates from inputs_embeds only) and 9 for T5."""
    assert generation_settings(get_spec("nocaps"), is_encoder_decoder=False)["min_new_tokens"] == 10
    t5 = generation_settings(get_spec("nocaps"), is_encoder_decoder=True)
    assert t5["min_new_tokens"] == 9
    assert generation_settings(get_spec("gqa"), is_encoder_decoder=True)["min_new_tokens"] == 0
    # ... and transformers agrees: a T5 that always wants to stop stops exactly where LAVIS's min_length lets it
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(40))
        model.lm_head.bias[1] = 100.0  # EOS whenever allowed
    ids = torch.tensor([[5, 6, 7, 1]])
    lavis = model.generate(input_ids=ids, num_beams=1, max_new_tokens=30, min_length=10)
    ours = model.generate(input_ids=ids, num_beams=1, max_new_tokens=30, min_new_tokens=t5["min_new_tokens"])
    assert lavis.tolist() == ours.tolist() and lavis.shape[1] == 11  # start + 9 tokens + EOS


# -- item 4: candidates --------------------------------------------------------------------------------
def test_decoder_only_candidates_have_no_eos_t5_candidates_do():
    llama, t5 = tiny_llm_tokenizer("llama"), tiny_llm_tokenizer("t5")
    ids, mask = candidate_tensors(llama, [["w5 w6", "w7"]], is_encoder_decoder=False)
    assert ids[0, 0].tolist() == llama("w5 w6", add_special_tokens=False)["input_ids"]
    assert mask[0, 1].tolist() == [1, 0] and llama.eos_token_id not in ids[0, :, :].tolist()[0]
    ids, mask = candidate_tensors(t5, [["w5 w6", "w7"]], is_encoder_decoder=True)
    assert ids[0, 0].tolist() == t5("w5 w6", add_special_tokens=False)["input_ids"] + [t5.eos_token_id]
    assert ids[0, 1, :2].tolist() == t5("w7", add_special_tokens=False)["input_ids"] + [t5.eos_token_id]


# -- item 5: evaluation prompt lengths -------------------------------------------------------------
def test_evaluation_batches_keep_the_whole_llm_prompt_and_cut_the_qformer_text():
    dm = InstructionDataModule(eval_datasets=["gqa"], max_qformer_len=12, max_prompt_len=12, eval_max_qformer_len=10)
    dm.setup_tokenizers(qformer_tokenizer(), llama_tokenizer(), is_encoder_decoder=False)
    long = words(4, 40)  # 36 words, far over either limit
    train = dm._collator("train")([item(long, target="w5")])
    assert train["input_ids"].shape[1] == 12 + 2  # 12-token prompt + target + EOS
    evaluation = dm._collator("generate")([item(long)])
    assert evaluation["input_ids"].shape[1] == 1 + 36  # BOS + every word: LAVIS never cuts the LLM prompt
    assert evaluation["qformer_input_ids"].shape[1] == 10  # the Q-Former text is cut, as in LAVIS
    assert evaluation["prompts"] == [long]


def test_prompts_record_what_a_truncating_collator_kept():
    collate = InstructionCollator(qformer_tokenizer(), t5_tokenizer(), True, mode="generate", max_prompt_len=4)
    batch = collate([item(words(4, 10))])
    assert batch["prompts"] == [words(7, 10)]  # 3 words + </s>


# -- item 6: captions, video vocabulary, exact GELU, held-in checkpoint selection ---------------------
def test_caption_targets_are_cleaned_like_lavis_blip_caption():
    sample = Sample("coco_caption", "1", image="x.jpg", answers=['A Man (riding) a "horse"!  On the beach.'],
                    target='A Man (riding) a "horse"!  On the beach.')
    filled = fill_instruction(sample, "caption", random.Random(0))
    assert filled.target == "a man riding a horse on the beach"
    long = Sample("coco_caption", "2", image="x.jpg", target=" ".join(f"w{i}," for i in range(60)))
    assert len(fill_instruction(long, "caption", random.Random(0)).target.split(" ")) == 50
    vqa = Sample("vqav2", "3", image="x.jpg", question="What?", target="Mr. Smith")
    assert fill_instruction(vqa, "vqa", random.Random(0)).target == "Mr. Smith"  # only captions


def _msvd_root(tmp_path, with_vocab: bool):
    root = tmp_path / "data"
    (root / "msvd_qa" / "videos").mkdir(parents=True)
    train = [{"answer": a, "id": i, "question": "what?", "video_id": 1} for i, a in enumerate(["cat", "dog", "dog"])]
    test = [{"answer": "fish", "id": 9, "question": "what is it?", "video_id": 1}]
    (root / "msvd_qa" / "train_qa.json").write_text(json.dumps(train))
    (root / "msvd_qa" / "test_qa.json").write_text(json.dumps(test))
    (root / "msvd_qa" / "youtube_mapping.txt").write_text("abc_1_2 vid1\n")
    if with_vocab:
        (root / "msvd_qa" / "train_ans2label.json").write_text(json.dumps({"fish": 0, "cat": 1, "bird": 2}))
    return root


def test_msvd_ranks_lavis_answer_vocabulary_and_says_when_it_cannot(tmp_path, caplog):
    (sample,) = load_samples("msvd_qa", _msvd_root(tmp_path / "a", with_vocab=True), "test")
    assert sample.candidates == ["fish", "cat", "bird"] and sample.label == 0
    with caplog.at_level(logging.WARNING):
        root = _msvd_root(tmp_path / "b", with_vocab=False)
        for _ in range(2):
            (sample,) = load_samples("msvd_qa", root, "test")
    assert sample.candidates == ["dog", "cat"] and sample.label is None
    warnings = [r.getMessage() for r in caplog.records if "answer vocabulary" in r.getMessage()]
    assert len(warnings) == 1 and "train_ans2label.json" in warnings[0]


def test_flant5_loaded_for_training_runs_exact_gelu(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
    assert cfg.dense_act_fn == "gelu_new"  # what google/flan-t5-* folders say
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "flan")
    lm = LanguageModel(name_or_path=str(tmp_path / "flan"))
    assert lm.hf_config.dense_act_fn == "gelu"
    act = lm.base_model.encoder.block[0].layer[1].DenseReluDense.act
    x = torch.linspace(-3, 3, 50)
    torch.testing.assert_close(act(x), torch.nn.functional.gelu(x))
    kept = LanguageModel(name_or_path=str(tmp_path / "flan"), t5_exact_gelu=False)
    assert kept.hf_config.dense_act_fn == "gelu_new"


def test_heldin_score_is_the_mean_metric_of_the_held_in_datasets():
    evaluator = Evaluator(["vqav2", "vizwiz"], torch.device("cpu"), llm_tokenizer=None)
    for name, prediction in (("vqav2", "yes"), ("vizwiz", "no")):
        evaluator.run.evaluators[name].update([{"sample_id": "1", "prediction": prediction, "answers": ["yes"] * 10}])
        evaluator.run.records[name].append({})
    results = evaluator.compute("val")
    assert results["val/vqav2/vqa_accuracy"] == 1.0 and results["val/vizwiz/vqa_accuracy"] == 0.0
    assert results["val/heldin_score"] == 1.0 and results["val/score"] == 0.5


@pytest.mark.parametrize("dataset", ["gqa", "vsr"])  # generated answers; ranked candidates
def test_an_eval_batch_encodes_its_images_once_for_its_loss_and_its_predictions(dataset):
    model = tiny_model(T5_TEXT).eval()
    tok = tiny_llm_tokenizer("t5")
    inputs = hf_inputs(batch=2)
    labels = torch.randint(3, 20, (2, 3), generator=torch.Generator().manual_seed(0))
    batch = {**inputs, "labels": labels, "sample_ids": ["a", "b"], "answers": [["w5"], ["w6"]],
             "candidates": [["w5", "w6 w7"], ["w8", "w9"]], "labels_idx": [0, 1], "prompts": ["p one", "p two"]}
    overrides = {"max_new_tokens": 2, "num_beams": 1}
    with torch.no_grad():  # the pixel path, one pass for each use
        expected_records = predict_batch(model, batch, get_spec(dataset), tok, overrides)
        expected_loss = model(**inputs, labels=labels).loss
    calls = []
    model.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    evaluator = Evaluator([dataset], torch.device("cpu"), llm_tokenizer=tok, generation_overrides=overrides)
    with torch.no_grad():
        evaluator.step(model, batch, 0)
    assert len(calls) == 1  # was 2: the loss forward and the predictions each encoded the images
    assert evaluator.run.records[dataset] == expected_records  # the same text, candidate scores and choice
    assert float(evaluator.losses[0].compute()) == float(expected_loss)


# -- item 7: LLaVA-Instruct-150K merged file ------------------------------------------------------------
def _llava_record(image_id: str, *pairs: tuple[str, str]):
    turns = []
    for k, (q, a) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": image_id, "image": f"{image_id}.jpg", "conversations": turns}


def test_llava_merged_file_is_split_into_the_three_subsets(tmp_path):
    root = tmp_path / "data"
    (root / "llava_instruct").mkdir(parents=True)
    merged = [
        _llava_record("000000000001", ("What colour is the bus?", "Red."), ("Where is it?", "On a street.")),
        _llava_record("000000000001", ("What do you see happening in this image?", "A red bus drives ...")),
        _llava_record("000000000002", ("Why might the man be holding an umbrella?", "It is raining ...")),
    ]
    (root / "llava_instruct" / "llava_instruct_150k.json").write_text(json.dumps(merged))
    conversation = load_samples("llava_conversation", root, "train")
    detail = load_samples("llava_detail", root, "train")
    reasoning = load_samples("llava_reasoning", root, "train")
    assert [s.sample_id for s in conversation] == ["000000000001_0", "000000000001_1"]
    assert [s.target for s in detail] == ["A red bus drives ..."]
    assert [s.question for s in reasoning] == ["Why might the man be holding an umbrella?"]
    report = format_check(check_root(root, names=["llava_detail"]))
    assert "train: found, 1 samples (from " in report and "llava_instruct_150k.json" in report
    # the per-type file, when present, is read instead (and the check says so)
    (root / "llava_instruct" / "detail_23k.json").write_text(json.dumps(merged[1:2] * 2))
    assert len(load_samples("llava_detail", root, "train")) == 2
    assert "detail_23k.json" in format_check(check_root(root, names=["llava_detail"]))


def test_llava_missing_everywhere_names_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="conversation_58k.json or .*llava_instruct_150k.json"):
        load_samples("llava_conversation", tmp_path, "train")


# -- item 9: what was asked -------------------------------------------------------------------------------
def test_textvqa_without_ocr_file_warns_once_naming_it(tmp_path, caplog):
    root = tmp_path / "data"
    (root / "textvqa").mkdir(parents=True)
    data = {"data": [{"question_id": 1, "image_id": "abc", "question": "what brand?", "answers": ["coke"] * 10}]}
    (root / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            load_samples("textvqa", root, "val")
    warnings = [r.getMessage() for r in caplog.records if "OCR" in r.getMessage()]
    assert len(warnings) == 1 and "TextVQA_Rosetta_OCR_v0.2_val.json" in warnings[0]


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_prediction_records_hold_the_prompt_and_the_settings(kind):
    model = tiny_model({"t5": T5_TEXT, "llama": LLAMA_TEXT}[kind])
    tok = tiny_llm_tokenizer(kind)
    batch = {**hf_inputs(batch=2), "sample_ids": ["a", "b"], "answers": [["w5"], ["w6"]],
             "candidates": [["w5", "w6 w7"], ["w8", "w9"]], "labels_idx": [0, 1], "prompts": ["p one", "p two"]}
    records = predict_batch(model, batch, get_spec("gqa"), tok, {"max_new_tokens": 2, "num_beams": 1})
    expected = generation_settings(get_spec("gqa"), model.is_encoder_decoder, {"max_new_tokens": 2, "num_beams": 1})
    assert [r["prompt"] for r in records] == ["p one", "p two"]
    assert all(r["generation"] == expected for r in records)
    assert records[0]["generation"]["repetition_penalty"] == 1.5
    ranked = predict_batch(model, batch, get_spec("vsr"), tok)
    assert ranked[1]["prompt"] == "p two"
    assert ranked[0]["ranking"]["candidate_ends_with_eos"] is (kind == "t5")
    assert all(math.isfinite(v) for r in ranked for v in r["scores"])


def test_prediction_records_name_the_qformer_wording_only_where_it_differs():
    model = tiny_model(T5_TEXT)
    tok = tiny_llm_tokenizer("t5")
    batch = {**hf_inputs(batch=2), "sample_ids": ["a", "b"], "answers": [["w5"], ["w6"]],
             "candidates": [["w5", "w6"], ["w8", "w9"]], "labels_idx": [0, 1], "instructions": ["p one", "p two"],
             "qformer_instructions": ["q own", "p two"]}
    for spec in ("gqa", "vsr"):  # generated and ranked
        records = predict_batch(model, batch, get_spec(spec), tok, {"max_new_tokens": 2, "num_beams": 1})
        assert [r["prompt"] for r in records] == ["p one", "p two"]
        assert records[0]["qformer_prompt"] == "q own" and "qformer_prompt" not in records[1]
