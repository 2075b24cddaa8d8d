"""The stage-1 training step shares work between its passes (image keys/values once, ITG after the ITC
query pass) and still computes exactly the straightforward passes' losses and gradients."""

from __future__ import annotations

import pytest
import torch
from tiny_blip2 import caption_batch, tiny_stage1

from ibkit.models.blip2_losses import itc_loss, itg_loss, itm_loss


def straightforward_losses(model, batch, negative_texts, negative_images):
    """ITC, ITM and ITG through the public one-purpose passes (each recomputes queries and image keys),
    on the hard negatives the step drew."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tokens = model.encode_images(batch["pixel_values"])
    rows = torch.arange(ids.shape[0])
    itc = itc_loss(model.image_embeds(tokens), model.text_embeds(ids, mask), model.temp, model.itc_label_smoothing)
    text_ok, image_ok = negative_texts >= 0, negative_images >= 0
    image_rows = torch.cat((rows, rows[text_ok], negative_images[image_ok]))
    text_rows = torch.cat((rows, negative_texts[text_ok], rows[image_ok]))
    labels = torch.cat((torch.ones(len(rows), dtype=torch.long), torch.zeros(len(image_rows) - len(rows), dtype=torch.long)))
    itm = itm_loss(model.itm_logits(tokens[image_rows], ids[text_rows], mask[text_rows]), labels)
    dec_ids, dec_labels = model.decoder_inputs(ids, mask)
    itg = itg_loss(model.itg_logits(tokens, dec_ids, mask), dec_labels, model.itg_label_smoothing)
    return itc.loss, itm, itg


@pytest.mark.parametrize("checkpointing", [False, True])
def test_step_equals_straightforward_losses_and_gradients(checkpointing):
    model = tiny_stage1().train()  # dropout 0: both computations are deterministic
    b = caption_batch(6)
    b["input_ids"][4], b["attention_mask"][4] = b["input_ids"][0], b["attention_mask"][0]  # a duplicate caption
    image_ids = torch.tensor([0, 1, 2, 3, 4, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    model.qformer.gradient_checkpointing = checkpointing
    out = model(**b, image_ids=image_ids, generator=torch.Generator().manual_seed(0))
    fast = torch.autograd.grad(out.loss, params, allow_unused=True)
    model.qformer.gradient_checkpointing = False
    itc, itm, itg = straightforward_losses(model, b, out.negative_texts, out.negative_images)
    slow = torch.autograd.grad(itc + itm + itg, params, allow_unused=True)
    for name, got, want in (("itc", out.loss_itc, itc), ("itm", out.loss_itm, itm), ("itg", out.loss_itg, itg)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, fast, slow):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_step_projects_each_image_once_and_reuses_the_itc_queries_for_itg():
    model = tiny_stage1().train()
    b = caption_batch(4)
    layer = model.qformer.encoder.layer[0]
    seen = {"image": 0, "query": 0}

    def count(kind):
        return lambda module, args, output: seen.__setitem__(kind, seen[kind] + args[0].shape[0] * args[0].shape[1])

    hooks = [layer.crossattention.attention.key.register_forward_hook(count("image")),
             layer.intermediate_query.dense.register_forward_hook(count("query"))]
    out = model(**b)
    for hook in hooks:
        hook.remove()
    image_tokens = model.encode_images(b["pixel_values"]).shape[1]
    itm_pairs = 4 + int((out.negative_texts >= 0).sum() + (out.negative_images >= 0).sum())
    assert seen["image"] == 4 * image_tokens  # each image's keys once, not once per pass and pair
    assert seen["query"] == (4 + itm_pairs) * model.num_query_tokens  # ITC and ITM; ITG runs the text only


def test_step_runs_two_qformer_passes():
    """ITC's query and text passes and ITG share one Q-Former pass (block mask); ITM is the other."""
    model = tiny_stage1().train()
    calls = []
    hook = model.qformer.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
    model(**caption_batch(4))
    hook.remove()
    assert len(calls) == 2


def test_explicit_cpu_training_attention_equals_sdpa():
    """Training on CPU with dropout computes attention explicitly; with a dropout that never drops it is
    SDPA's attention (scale, additive padding mask, softmax)."""
    from ibkit.models.qformer import QFormerAttentionCore, QFormerConfig

    torch.manual_seed(0)
    core = QFormerAttentionCore(QFormerConfig(hidden_size=32, num_attention_heads=4), kv_width=32)
    q, k, v = (torch.randn(3, 4, n, 8) for n in (5, 7, 7))
    mask = torch.zeros(3, 1, 1, 7).masked_fill(torch.rand(3, 1, 1, 7) < 0.3, torch.finfo(torch.float32).min)
    mask[..., 0] = 0  # every row sees at least one key
    core.train()
    core.dropout = 1e-30  # takes the training path, drops nothing
    got = core._attend(q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_cpu_attention_kernel_choice_without_dropout(monkeypatch):
    """Without dropout the Q-Former's CPU attention is explicit only under bf16 autocast with autograd (a
    training step, where SDPA's CPU backward is slower); inference and fp32 training call SDPA. Both give
    the same attention."""
    from ibkit.models.qformer import QFormerAttentionCore, QFormerConfig

    torch.manual_seed(0)
    core = QFormerAttentionCore(QFormerConfig(hidden_size=32, num_attention_heads=4), kv_width=32).train()
    core.dropout = 0.0
    q, k, v = (torch.randn(3, 4, n, 8, requires_grad=True) for n in (5, 7, 7))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = core._attend(q, k, v, None)
        assert calls == []
        with torch.no_grad():
            core._attend(q, k, v, None)
        assert calls == [1]
        reference = sdpa(q, k, v)
    torch.testing.assert_close(explicit.float(), reference.float(), rtol=2e-2, atol=2e-2)
    core._attend(q, k, v, None)  # fp32 training
    assert calls == [1, 1]


def test_step_takes_captions_up_to_the_qformer_positions_and_names_longer_ones():
    """ITC and ITG texts sit side by side in one pass, each counting positions from 0: a caption may use
    every position (the limit is per text, not for the two together); one token more is a clear error."""
    model = tiny_stage1().train()
    limit = model.qformer_config.max_position_embeddings
    out = model(**caption_batch(4, length=limit))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=f"{limit + 1} tokens exceeds the Q-Former's {limit} positions"):
        model(**caption_batch(4, length=limit + 1))
