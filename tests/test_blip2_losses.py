"""BLIP-2 stage-1 losses against naive computations of BLIP-2's formulas on the same tensors, the
hard-negative rules, and the Q-Former masks the losses rely on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_blip2 import DEC, caption_batch, tiny_stage1

from ibkit.models.blip2_losses import (
    itc_loss,
    itg_loss,
    negative_exclusion,
    same_caption,
    sample_hard_negatives,
)


# -- naive references ---------------------------------------------------------------------------------
def naive_smoothed_ce(logits: list[float], target: int, eps: float) -> torch.Tensor:
    """-(1 - eps) log p_target - eps/K sum_k log p_k, with an explicit softmax."""
    m = max(logits)
    exps = [math.exp(v - m) for v in logits]
    total = sum(exps)
    logp = [math.log(e / total) for e in exps]
    return -(1 - eps) * logp[target] - eps / len(logits) * sum(logp)


def naive_itc(image, text, temp, eps):
    n = image.shape[0]
    sim = [[max(float(sum(image[i, q, d] * text[j, d] for d in range(image.shape[2]))) for q in range(image.shape[1]))
            / temp for j in range(n)] for i in range(n)]
    i2t = sum(naive_smoothed_ce(sim[i], i, eps) for i in range(n)) / n
    t2i = sum(naive_smoothed_ce([sim[j][i] for j in range(n)], i, eps) for i in range(n)) / n
    return (i2t + t2i) / 2


def naive_itg(logits, labels, eps):
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            total += naive_smoothed_ce(logits[b, t].tolist(), target, eps)
            count += 1
    return total / count


# -- ITC ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_itc_equals_naive_formula(eps):
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 3, 4, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    out = itc_loss(image, text, 0.07, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(naive_itc(image, text, 0.07, eps), rel=1e-5)
    assert out.offset == 0 and out.sim_i2t.shape == (5, 5)
    torch.testing.assert_close(out.sim_t2i, out.sim_i2t.t())


def test_itc_gradient_matches_autograd_of_an_explicit_formula():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    text = torch.randn(4, 5, generator=g, requires_grad=True)
    temp = torch.tensor(0.1, requires_grad=True)
    itc_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), temp).loss.backward()
    grads = [image.grad.clone(), text.grad.clone(), temp.grad.clone()]
    image.grad = text.grad = temp.grad = None
    # explicit: loop over pairs, explicit log-softmax, smoothing 0.1
    im, tx = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    sim = torch.stack([torch.stack([(im[i] @ tx[j]).max() for j in range(4)]) for i in range(4)]) / temp
    loss = 0
    for s in (sim, sim.t()):
        logp = s - s.exp().sum(1, keepdim=True).log()
        loss = loss + (-(0.9 * logp.diagonal()) - 0.1 * logp.mean(1)).mean() / 2
    loss.backward()
    for got, ref in zip(grads, [image.grad, text.grad, temp.grad]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# -- ITG ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_itg_equals_naive_formula(eps):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[1, 3:] = -100
    labels[:, 0] = -100  # never a target anyway ([DEC] position)
    assert itg_loss(logits, labels, eps).item() == pytest.approx(naive_itg(logits, labels, eps), rel=1e-5)


# -- hard negatives -------------------------------------------------------------------------------------
def test_exclusion_mask_by_loops():
    ids = torch.tensor([[1, 5, 6, 0], [1, 5, 6, 7], [1, 5, 6, 0], [1, 8, 0, 0]])
    mask = (ids != 0).long()
    image_ids = torch.tensor([10, 11, 12, 11])
    got = negative_exclusion(0, 4, 4, image_ids, image_ids, same_caption(ids, mask, ids, mask))
    for i in range(4):
        for j in range(4):
            dup_caption = ids[i][mask[i].bool()].tolist() == ids[j][mask[j].bool()].tolist()
            assert bool(got[i, j]) == (i == j or image_ids[i] == image_ids[j] or dup_caption), (i, j)


def test_hard_negatives_never_positive_or_duplicate_and_follow_the_softmax():
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(4, 6, generator=g) * 2
    sim[torch.arange(4), torch.arange(4) + 2] = 50.0  # positives (offset 2) dominate the softmax
    exclude = negative_exclusion(2, 4, 6)
    exclude[0, 5] = True  # a duplicate caption
    counts = torch.zeros(4, 6)
    draws = 4000
    for _ in range(draws):
        idx, valid = sample_hard_negatives(sim, exclude, g)
        assert valid.all()
        assert not exclude[torch.arange(4), idx].any()
        counts[torch.arange(4), idx] += 1
    expected = torch.softmax(sim.masked_fill(exclude, float("-inf")), dim=1)
    torch.testing.assert_close(counts / draws, expected, atol=0.03, rtol=0)


def test_row_without_a_valid_negative_is_flagged():
    sim = torch.zeros(2, 2)
    exclude = torch.tensor([[True, True], [False, True]])
    idx, valid = sample_hard_negatives(sim, exclude)
    assert valid.tolist() == [False, True] and idx.tolist()[1] == 0


# -- the model: masks and its three losses ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_stage1().eval()


def test_causal_mask_queries_see_no_text_and_text_sees_only_the_past(model):
    b = caption_batch(2)
    tokens = model.encode_images(b["pixel_values"])
    queries = model.query_tokens.expand(2, -1, -1)
    ids, mask = torch.ones_like(b["input_ids"]) * 5, torch.ones_like(b["attention_mask"])
    with torch.no_grad():
        out = model.qformer.forward_hidden(queries, tokens, ids, mask, causal=True)
        torch.testing.assert_close(out[:, :3], model.query_outputs(tokens))  # queries: image + queries only
        changed = ids.clone()
        changed[:, 4] = 9
        out2 = model.qformer.forward_hidden(queries, tokens, changed, mask, causal=True)
        torch.testing.assert_close(out2[:, : 3 + 4], out[:, : 3 + 4])  # earlier text: unchanged
        assert not torch.allclose(out2[:, 3 + 4 :], out[:, 3 + 4 :])
        other = model.qformer.forward_hidden(queries, tokens.flip(0), ids, mask, causal=True)
        assert not torch.allclose(other[:, 3:], out[:, 3:])  # text sees the queries, hence the image
        # bidirectional (ITM) pass: queries do see the text
        bi = model.qformer.forward_hidden(queries, tokens, ids, mask)
        bi2 = model.qformer.forward_hidden(queries, tokens, changed, mask)
        assert not torch.allclose(bi[:, :3], bi2[:, :3])


def test_text_pass_ignores_padding_and_image(model):
    b = caption_batch(2)
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        ref = model.text_outputs(ids, mask)
        garbage = ids.masked_fill(mask == 0, 7)
        torch.testing.assert_close(model.text_outputs(garbage, mask)[mask.bool()], ref[mask.bool()])


def test_stage1_losses_equal_naive_recomputation(model):
    b = caption_batch(6)
    b["input_ids"][4] = b["input_ids"][0]  # a duplicate caption
    b["attention_mask"][4] = b["attention_mask"][0]
    image_ids = torch.tensor([0, 1, 2, 3, 4, 1])  # pairs 1 and 5 show the same image
    b["pixel_values"][5] = b["pixel_values"][1]
    out = model(**b, image_ids=image_ids, generator=torch.Generator().manual_seed(0))
    ids, mask, pixels = b["input_ids"], b["attention_mask"], b["pixel_values"]
    with torch.no_grad():
        tokens = model.encode_images(pixels)
        image = F.normalize(model.vision_projection(model.query_outputs(tokens)), dim=-1)
        text = torch.stack([model.text_embeds(ids[i : i + 1], mask[i : i + 1])[0] for i in range(6)])
        assert out.loss_itc.item() == pytest.approx(naive_itc(image, text, model.temp.item(), 0.1), rel=1e-4)

        # ITM: the drawn negatives are allowed ones, and the loss is the mean CE over the pairs, one at a time
        terms = []
        for i in range(6):
            terms.append(naive_smoothed_ce(model.itm_logits(tokens[i : i + 1], ids[i : i + 1], mask[i : i + 1])[0].tolist(), 1, 0))
        for i, j in enumerate(out.negative_texts.tolist()):
            if j >= 0:
                assert j != i and image_ids[j] != image_ids[i] and {i, j} != {0, 4}
                terms.append(naive_smoothed_ce(model.itm_logits(tokens[i : i + 1], ids[j : j + 1], mask[j : j + 1])[0].tolist(), 0, 0))
        for i, j in enumerate(out.negative_images.tolist()):
            if j >= 0:
                assert j != i and image_ids[j] != image_ids[i] and {i, j} != {0, 4}
                terms.append(naive_smoothed_ce(model.itm_logits(tokens[j : j + 1], ids[i : i + 1], mask[i : i + 1])[0].tolist(), 0, 0))
        assert len(terms) == 18
        assert out.loss_itm.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)

        # ITG: [DEC] first, next-token CE with smoothing 0.1 on the text, per caption without padding
        total, count = 0.0, 0
        for i in range(6):
            n = int(mask[i].sum())
            dec = ids[i : i + 1, :n].clone()
            dec[0, 0] = DEC
            logits = model.itg_logits(tokens[i : i + 1], dec)[0]
            for t in range(n - 1):
                total += naive_smoothed_ce(logits[t].tolist(), int(dec[0, t + 1]), 0.1)
                count += 1
        assert out.loss_itg.item() == pytest.approx(total / count, rel=1e-4)
    assert out.loss.item() == pytest.approx((out.loss_itc + out.loss_itm + out.loss_itg).item())


def test_itm_batch_without_valid_negatives_keeps_the_positives():
    model = tiny_stage1().eval()
    b = caption_batch(2)
    out = model(**b, image_ids=torch.tensor([7, 7]))  # one image, two captions: no negative anywhere
    assert out.negative_texts.tolist() == [-1, -1] and out.negative_images.tolist() == [-1, -1]
    assert torch.isfinite(out.loss)


def test_temperature_is_clamped_and_trains():
    model = tiny_stage1().train()
    with torch.no_grad():
        model.temp.fill_(0.9)
    out = model(**caption_batch(4))
    assert model.temp.item() == pytest.approx(0.5)
    out.loss.backward()
    assert model.temp.grad is not None and model.temp.grad.abs() > 0
    trained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not trained, trained  # every trainable tensor gets a gradient (the frozen ViT has none)
    assert all(p.grad is None for p in model.vision_encoder.parameters())


def test_greedy_caption_shapes():
    model = tiny_stage1().eval()
    out = model.generate(caption_batch(2)["pixel_values"], max_new_tokens=4, eos_token_id=2)
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 4
