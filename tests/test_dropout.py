"""ibkit's CPU dropout (:mod:`ibkit.models.dropout`): F.dropout's distribution and scaling, seeded masks that
activation checkpointing replays, and the Q-Former's passes that skip unread last-layer work."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_blip2 import tiny_stage1

from ibkit.models.dropout import Dropout, dropout, keep_mask, keep_multiplier


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p(p):
    n = 1_000_000
    kept = keep_mask((n,), p, torch.Generator().manual_seed(0)).double().mean().item()
    expected = 1 - round(p * 65536) / 65536
    assert abs(expected - (1 - p)) < 1e-5
    assert abs(kept - expected) < 5 * math.sqrt(p * (1 - p) / n)  # 5 standard errors


def test_masks_are_independent_across_neighbouring_elements():
    """Four elements come from one 64-bit draw: their keep decisions must still be independent."""
    keep = keep_mask((400_000, 4), 0.5, torch.Generator().manual_seed(1)).double()
    both = (keep[:, 0] * keep[:, 1]).mean().item(), (keep[:, 2] * keep[:, 3]).mean().item()
    for value in both:
        assert abs(value - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 400_000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiplier_is_zero_or_the_scale_and_matches_the_mask_of_the_same_draws(dtype):
    multiplier = keep_multiplier((300, 7), 0.25, dtype, torch.Generator().manual_seed(4))
    assert multiplier.dtype == dtype and multiplier.shape == (300, 7)
    scale = torch.tensor(1 / 0.75, dtype=dtype)
    assert set(multiplier.unique().tolist()) == {0.0, scale.item()}
    # the same draws, decided the straightforward way: the 16-bit uniform >= round(p * 65536) - 32768
    draws = torch.empty(300 * 7 // 4 + 1, dtype=torch.int64).random_(-(2**63), None,
                                                                     generator=torch.Generator().manual_seed(4))
    uniforms = draws.view(torch.int16)[: 300 * 7].view(300, 7)
    assert torch.equal(multiplier != 0, uniforms >= round(0.25 * 65536) - 32768)


def test_probabilities_below_and_above_the_16_bit_resolution_keep_all_or_drop_all_and_draw_the_same():
    """p that rounds to 0 or to 65536 levels: nothing or everything drops; the generator advances as for
    any p, so the masks after it do not depend on it."""
    generators = [torch.Generator().manual_seed(2) for _ in range(3)]
    assert torch.equal(keep_multiplier((50,), 1e-6, torch.float32, generators[0]), torch.full((50,), 1 / (1 - 1e-6)))
    assert torch.equal(keep_multiplier((50,), 1 - 1e-6, torch.float32, generators[1]), torch.zeros(50))
    keep_multiplier((50,), 0.5, torch.float32, generators[2])
    after = [keep_mask((64,), 0.5, g) for g in generators]
    assert torch.equal(after[0], after[1]) and torch.equal(after[1], after[2])


def test_dropout_scales_kept_values_zeroes_the_rest_and_passes_gradients_the_same_way():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.2)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2), y)  # torch.manual_seed drives the mask
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x
    bf16 = dropout(x.detach().bfloat16(), 0.2)
    assert bf16.dtype == torch.bfloat16


def test_dropout_module_matches_nn_dropout_in_mean_and_switches_off_in_eval():
    module, reference = Dropout(0.3), torch.nn.Dropout(0.3)
    x = torch.ones(200_000)
    assert abs(module(x).mean().item() - reference(x).mean().item()) < 0.02  # both unbiased: mean 1
    assert torch.equal(module.eval()(x), x)
    assert module.p == 0.3 and "p=0.3" in repr(module)


def test_checkpointed_qformer_replays_the_same_dropout_masks():
    """Activation checkpointing restores torch's CPU generator, so the recomputed forward draws the same
    masks: gradients with and without checkpointing are equal under dropout."""
    model = tiny_stage1()
    for module in model.modules():
        if isinstance(module, Dropout):
            module.p = 0.2
    for layer in model.qformer.encoder.layer:
        layer.attention.attention.dropout = 0.2
    model.train()
    tokens = torch.randn(2, 7, model.qformer.encoder_width)
    params = [p for p in model.qformer.parameters() if p.requires_grad]
    grads = []
    for checkpointing in (False, True):
        model.qformer.gradient_checkpointing = checkpointing
        torch.manual_seed(5)
        out = model.query_outputs(tokens)
        grads.append(torch.autograd.grad(out.square().sum(), params, allow_unused=True))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_query_outputs_without_autograd_skip_the_last_text_feed_forward_and_equal_the_full_pass():
    model = tiny_stage1().eval()
    tokens = torch.randn(2, 7, model.qformer.encoder_width)
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    mask = (ids != 0).long()
    queries = model._queries(2)
    full = model.qformer.forward_hidden(queries, tokens, ids, mask)
    seen = []
    hook = model.qformer.encoder.layer[-1].intermediate.register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        only = model.qformer(queries, tokens, ids, mask)
    assert seen == [] and only.shape == (2, queries.shape[1], full.shape[-1])
    torch.testing.assert_close(only, full[:, : queries.shape[1]])
    # with autograd the full pass runs: every trainable parameter is in the graph (DDP needs it)
    trained = model.qformer(queries, tokens, ids, mask)
    hook.remove()
    assert seen == [1]
    torch.testing.assert_close(trained, only)
    grad = torch.autograd.grad(trained.sum(), model.qformer.encoder.layer[-1].intermediate.dense.weight)[0]
    assert torch.count_nonzero(grad) == 0
