"""BLIP-2 stage 2: the prefix-LM (FlanT5) and caption-LM (decoder-only) batches, and the losses they give
through InstructBLIP in BLIP-2 mode, against naive computations."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import LLAMA_TEXT, NUM_QUERIES, QFORMER, T5_TEXT, VISION

from ibkit.models.blip2 import build_stage2, caption_lm_batch, prefix_lm_batch
from ibkit.models.language import LanguageModel
from ibkit.models.qformer import QFormerConfig
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

CAPTIONS = [[5, 6, 7, 8, 9], [10, 11], [12], []]


def _strip(row, stop):
    out = []
    for v in row.tolist():
        if v == stop:
            break
        out.append(v)
    return out


def test_prefix_split_reassembles_the_caption_and_is_reproducible():
    a = prefix_lm_batch(CAPTIONS, eos_token_id=1, pad_token_id=0, generator=torch.Generator().manual_seed(4))
    b = prefix_lm_batch(CAPTIONS, eos_token_id=1, pad_token_id=0, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for i, cap in enumerate(CAPTIONS):
        prefix, target = _strip(a["input_ids"][i], 1), _strip(a["labels"][i], 1)
        assert prefix + target == cap and len(target) >= 1 or cap == []
        n_in, n_out = int(a["attention_mask"][i].sum()), int(a["decoder_attention_mask"][i].sum())
        assert a["input_ids"][i, n_in - 1] == 1 and a["labels"][i, n_out - 1] == 1  # both end with eos
        assert (a["labels"][i, n_out:] == -100).all() and (a["input_ids"][i, n_in:] == 0).all()
    assert a["labels"][3].tolist()[:1] == [1]  # an empty caption: target is eos only


def test_prefix_split_points_are_uniform():
    g = torch.Generator().manual_seed(0)
    counts = [0] * 5
    for _ in range(2000):
        batch = prefix_lm_batch([CAPTIONS[0]], 1, 0, generator=g)
        counts[int(batch["attention_mask"][0].sum()) - 1] += 1
    assert all(abs(c / 2000 - 0.2) < 0.04 for c in counts), counts


def test_prefix_truncation_keeps_the_tokens_next_to_the_split():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = prefix_lm_batch([list(range(10, 30))], 1, 0, g, max_prefix_length=4, max_target_length=3)
        prefix, target = _strip(b["input_ids"][0], 1), _strip(b["labels"][0], 1)
        assert len(prefix) <= 3 and len(target) <= 2
        if prefix and target:
            assert target[0] == prefix[-1] + 1  # contiguous around the split


def test_caption_batch_labels():
    b = caption_lm_batch(CAPTIONS[:2], eos_token_id=2, pad_token_id=0, bos_token_id=1)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 8, 9, 2], [1, 10, 11, 2, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6, 7, 8, 9, 2], [-100, 10, 11, 2, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]


def _stage2(text: dict):
    torch.manual_seed(0)
    qcfg = QFormerConfig(**{k: v for k, v in QFORMER.items() if k != "cross_attention_frequency"})
    model = build_stage2(EVAViT(EVAViTConfig(**VISION)), LanguageModel(config=dict(text)), qcfg, NUM_QUERIES)
    assert not model.qformer_config.instruction_aware and not hasattr(model.qformer.encoder.layer[0], "intermediate")
    return model.eval()


def _naive_ce(logits_rows, targets):
    total = 0.0
    for row, t in zip(logits_rows, targets):
        m = max(row)
        total += -(row[t] - m - math.log(sum(math.exp(v - m) for v in row)))
    return total / len(targets)


def test_prefix_lm_loss_is_the_suffix_given_queries_and_prefix():
    model = _stage2(T5_TEXT)
    pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"])
    batch = prefix_lm_batch([[5, 6, 7, 8], [9, 10, 11]], 1, 0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(pixel_values=pixels, **batch).loss
        t5 = model.language_model.base_model
        logits_rows, targets = [], []
        for i in range(2):  # one sample at a time, no padding anywhere
            n_in, n_out = int(batch["attention_mask"][i].sum()), int(batch["decoder_attention_mask"][i].sum())
            visual = model.visual_prompt(pixels[i : i + 1])
            embeds = torch.cat((visual, t5.get_input_embeddings()(batch["input_ids"][i : i + 1, :n_in])), 1)
            target = batch["labels"][i, :n_out]
            start = torch.tensor([[t5.config.decoder_start_token_id]])
            dec = torch.cat((start, target[None, :-1]), 1)  # teacher forcing: start token, then the target
            logits = t5(inputs_embeds=embeds, decoder_input_ids=dec).logits[0]
            logits_rows += logits.tolist()
            targets += target.tolist()
    assert loss.item() == pytest.approx(_naive_ce(logits_rows, targets), rel=1e-5)


def test_decoder_only_loss_is_the_caption_given_queries():
    model = _stage2(LLAMA_TEXT)
    pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"])
    batch = caption_lm_batch([[5, 6, 7], [8, 9]], eos_token_id=2, pad_token_id=0, bos_token_id=1)
    with torch.no_grad():
        loss = model(pixel_values=pixels, **batch).loss
        lm = model.language_model.base_model
        logits_rows, targets = [], []
        for i in range(2):
            n = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i : i + 1, :n]
            embeds = torch.cat((model.visual_prompt(pixels[i : i + 1]), lm.get_input_embeddings()(ids)), 1)
            logits = lm(inputs_embeds=embeds).logits[0, NUM_QUERIES:]
            for t in range(n - 1):  # token t+1 (caption and eos, not bos) predicted at position t
                logits_rows.append(logits[t].tolist())
                targets.append(int(ids[0, t + 1]))
    assert loss.item() == pytest.approx(_naive_ce(logits_rows, targets), rel=1e-5)
