"""Instruction-tuning a language model on text alone (TextLMModule + TextDataModule) and its export."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from fixtures_text import write_text_corpus

from ibkit.data.text import IGNORE_INDEX, TextDataModule, TextPairCollator, read_text_pairs
from ibkit.models.language import LanguageModel
from ibkit.training.checkpoint import RunCheckpoint
from ibkit.training.optim import OptimSettings
from ibkit.training.text_lm import TextLMModule, normalize_answer

TINY_T5 = {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1,
           "num_heads": 2, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu",
           "relative_attention_num_buckets": 8, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
           "dropout_rate": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few shapes corpus records (JSONL train, JSON val) and a word-level tokenizer covering them."""
    return write_text_corpus(tmp_path_factory.mktemp("text"), "t5", train=48, val=8)


def _module(config: dict, corpus) -> TextLMModule:
    lm = LanguageModel(config={**config, "vocab_size": 256}, frozen=False)
    return TextLMModule(lm, tokenizer=str(corpus / "tok"), max_new_tokens=8,
                        optim=OptimSettings(lr=3e-3, warmup_start_lr=1e-4, warmup_steps=2, weight_decay=0.0))


def _data(corpus) -> TextDataModule:
    return TextDataModule(train_files=[str(corpus / "train.jsonl")], val_files=[str(corpus / "val.json")],
                          batch_size=8, max_prompt_len=128)


def _trainer(run, steps: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=steps,
                      check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=run,
                      callbacks=[RunCheckpoint(save_top_k=0, save_last=True)])


def _first_val_batch(data: TextDataModule) -> dict:
    return next(iter(data.val_dataloader()))


def test_training_lowers_the_loss_and_the_export_loads_as_the_same_language_model(corpus, tmp_path, caplog):
    from transformers import AutoTokenizer

    from ibkit.app.export import export_checkpoint

    pl.seed_everything(0)
    module, data = _module(TINY_T5, corpus), _data(corpus)
    trainer = _trainer(tmp_path / "run", 40)
    data.connect(module.processor(), True)
    data.setup("fit")
    batch = _first_val_batch(data)
    with torch.no_grad():
        before = float(module._loss(batch))
    trainer.fit(module, datamodule=data)
    with torch.no_grad():
        after = float(module._loss(batch))
    assert after < 0.7 * before
    assert 0.0 <= trainer.callback_metrics["val/acc"] <= 1.0
    assert any(key.startswith("val/acc_") for key in trainer.callback_metrics)

    # ibkit export's path: a fresh module of the same configuration, the checkpoint's weights, save_model
    fresh = _module(TINY_T5, corpus)
    out = export_checkpoint(fresh, _data(corpus), tmp_path / "run" / "checkpoints", tmp_path / "lm")
    loaded = LanguageModel(name_or_path=str(out), frozen=True)  # t5_exact_gelu left at its default
    assert loaded.hf_config.dense_act_fn == "gelu"
    module.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        expected, got = module.language_model(**inputs).logits, loaded(**inputs).logits
    assert torch.equal(expected, got)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == module.processor().get_vocab()

    # the tanh GELU that gated-gelu alone means is what the loader replaces: the export says so
    tanh = _module({k: v for k, v in TINY_T5.items() if k != "dense_act_fn"}, corpus)
    with caplog.at_level(logging.WARNING, logger="ibkit.training.text_lm"):
        tanh.save_model(tmp_path / "tanh")
    assert "t5_exact_gelu" in caplog.text


def test_causal_lm_learns_the_target_only(corpus):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus / "tok")
    records = read_text_pairs(corpus / "val.json")[:3]
    batch = TextPairCollator(tokenizer, is_encoder_decoder=False, max_prompt_len=128, generate=True)(records)
    eos = tokenizer.eos_token_id
    for row, record in enumerate(records):
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        target = tokenizer(record["target"], add_special_tokens=False)["input_ids"] + [eos]
        labels = batch["labels"][row][batch["attention_mask"][row].bool()].tolist()
        assert labels == [IGNORE_INDEX] * len(prompt) + target
        assert batch["gen_input_ids"][row][-len(prompt):].tolist() == prompt  # left-padded: ends at the prompt
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 256,
            "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
    module = _module(gpt2, corpus)
    module._tokenizer = tokenizer
    assert torch.isfinite(module._loss(batch))
    assert len(module.answer(batch["gen_input_ids"], batch["gen_attention_mask"])) == 3


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_sample_reduction_weighs_each_record_once_whatever_its_target_length(corpus, arch):
    """loss_reduction="sample": the mean of each record's own loss (the model's loss on that record alone),
    for a seq2seq and a causal LM; "token" is the model's own batch loss."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus / "tok")
    everything = read_text_pairs(corpus / "train.jsonl")
    records = [r for r in everything if " " in r["target"]][:4] + [r for r in everything if " " not in r["target"]][:8]
    assert len(records) == 12  # descriptions and one-word answers: the two reductions differ
    config = TINY_T5 if arch == "t5" else {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2,
                                           "n_positions": 256, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
    torch.manual_seed(0)
    module = _module(config, corpus)
    module.eval()
    with torch.no_grad():  # far from uniform predictions, so that tokens' losses differ
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.3)
    collate = TextPairCollator(tokenizer, is_encoder_decoder=arch == "t5", max_prompt_len=128)
    batch = collate(records)
    with torch.no_grad():
        alone = [float(module._loss(collate([record]))) for record in records]
        per_sample = float(module._loss(batch, "sample"))
        per_token = float(module._loss(batch))
        hf = float(module.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         labels=batch["labels"]).loss)
    assert per_sample == pytest.approx(sum(alone) / len(alone), rel=1e-4)
    assert per_token == pytest.approx(hf, rel=1e-6)
    assert abs(per_sample - per_token) > 1e-3
    with pytest.raises(ValueError, match="loss_reduction"):
        TextLMModule(LanguageModel(config={**TINY_T5, "vocab_size": 256}, frozen=False), loss_reduction="batch")


def test_bad_records_name_the_file_and_the_record(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "a", "target": "b"}, {"prompt": "c", "id": "x7"}]))
    with pytest.raises(ValueError, match=r"bad\.json: record 1 \(id 'x7'\): field 'target'"):
        read_text_pairs(bad)
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"prompt": "a", "target": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: not valid JSON"):
        read_text_pairs(lines)
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"prompt": "a", "target": "b", "answers": "b"}\n')
    with pytest.raises(ValueError, match=r"answers\.jsonl: line 1: field 'answers'"):
        read_text_pairs(answers)


def test_answers_compare_word_by_word():
    assert normalize_answer("Two shapes : a red  circle") == normalize_answer("two shapes: a red circle")
    assert normalize_answer("left") != normalize_answer("right")


@pytest.mark.parametrize("forced", ["1", "0"], ids=["bf16", "fp32"])
def test_fast_paths_autocast_only_where_bf16_is_fast_and_train_t5_with_eager_attention(corpus, tmp_path, monkeypatch,
                                                                                      forced):
    from ibkit.models.precision import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, forced)  # the decision forced either way, whatever this CPU has
    pl.seed_everything(0)
    module, data = _module(TINY_T5, corpus), _data(corpus)
    module.fast_paths = True
    seen: dict[str, set] = {"dtypes": set(), "kernels": set()}
    base = module.language_model.base_model

    def record(linear, inputs, output):
        if torch.is_grad_enabled():  # training forwards only (validation answers run under no_grad)
            seen["dtypes"].add(output.dtype)
            seen["kernels"].add(base.config._attn_implementation)

    for linear in (m for m in base.modules() if isinstance(m, torch.nn.Linear)):
        linear.register_forward_hook(record)
    trainer = _trainer(tmp_path / "run", 3)
    trainer.fit(module, datamodule=data)
    assert seen["dtypes"] == {torch.bfloat16 if forced == "1" else torch.float32}
    assert seen["kernels"] == {"eager"} and base.config._attn_implementation == "sdpa"  # validation ran last
    assert all(p.dtype == torch.float32 for p in module.parameters())  # fp32 master weights
    assert 0.0 <= trainer.callback_metrics["val/acc"] <= 1.0
