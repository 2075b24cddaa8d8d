"""The from-scratch encoder aids of the demo: the convolutional stem and the vision-word loss."""

from __future__ import annotations

import pytest
import torch
from tiny_models import NUM_QUERIES, QFORMER, T5_TEXT, VISION

from ibkit import InstructBLIP, LanguageModel
from ibkit.models import EVAViT, EVAViTConfig
from ibkit.models.transformers_io import qformer_config_from_hf
from ibkit.training.module import InstructBLIPModule
from ibkit.training.vision_words import VisionWordHead, VisionWordSettings, vision_word_loss, word_targets

STEM = dict(VISION, stem_channels=(8, 16))  # full-resolution 3x3, one stride-2 3x3, then 3x3 patches of 3 px


def _model(vision: dict, frozen: bool) -> InstructBLIP:
    torch.manual_seed(0)
    return InstructBLIP(EVAViT(EVAViTConfig(**vision), frozen=frozen), LanguageModel(config=T5_TEXT),
                        qformer_config_from_hf(QFORMER), num_query_tokens=NUM_QUERIES)


def test_conv_stem_gives_one_token_per_patch_and_refuses_a_stride_that_does_not_divide_the_patch():
    encoder = EVAViT(EVAViTConfig(**STEM), frozen=False)
    out = encoder(torch.randn(2, 3, 30, 30))
    assert out.shape == (2, 1 + 5 * 5, VISION["hidden_size"])
    convs = [m for m in encoder.embeddings.patch_embedding.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.stride[0], c.kernel_size[0]) for c in convs] == [(1, 3), (2, 3), (3, 3)]
    assert convs[0].weight.std() > 0.05  # fan-in init, not the transformer's 0.02
    with pytest.raises(ValueError, match="patch_size 6"):
        EVAViTConfig(**dict(VISION, stem_channels=(8, 16, 32)))  # 4x does not divide 6


def test_conv_stem_model_round_trips_through_an_ibkit_folder(tmp_path, caplog):
    model = _model(STEM, frozen=True).eval()
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path / "stem")
    assert "convolutional stem" in caplog.text
    loaded = InstructBLIP.from_pretrained(tmp_path / "stem")
    assert loaded.vision_encoder.config.stem_channels == (8, 16)
    pixels = torch.randn(2, 3, 30, 30)
    torch.testing.assert_close(loaded.vision_encoder(pixels), model.vision_encoder(pixels))


def test_stem_batchnorm_trains_its_statistics_round_trips_and_stays_fixed_when_frozen(tmp_path):
    with pytest.raises(ValueError, match="stem_channels"):
        EVAViTConfig(**dict(VISION, stem_batchnorm=True))
    model = _model(dict(STEM, stem_batchnorm=True), frozen=False)
    norms = [m for m in model.vision_encoder.embeddings.patch_embedding if isinstance(m, torch.nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [8, 16]  # after each 3x3 convolution, not after the patch one
    model.train()
    model.vision_encoder(torch.randn(4, 3, 30, 30) * 3 + 1)  # a training step updates the running statistics
    assert norms[0].running_mean.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path / "bn")
    loaded = InstructBLIP.from_pretrained(tmp_path / "bn")  # frozen on load
    pixels = torch.randn(2, 3, 30, 30)
    torch.testing.assert_close(loaded.vision_encoder(pixels), model.vision_encoder(pixels))
    stats = [m.running_mean.clone() for m in loaded.vision_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    loaded.train()  # the surrounding model trains; the frozen encoder keeps its statistics
    loaded.vision_encoder(pixels * 5)
    after = [m.running_mean for m in loaded.vision_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))


def test_default_encoder_config_keeps_the_transformers_layout(tmp_path):
    import json

    _model(VISION, frozen=True).save_pretrained(tmp_path / "plain")
    vision = json.loads((tmp_path / "plain" / "config.json").read_text())["vision_config"]
    assert "stem_channels" not in vision and "stem_batchnorm" not in vision


def test_word_targets_mark_words_and_distinct_word_pairs():
    settings = VisionWordSettings(weight=1.0, ngrams=2, buckets=4096)
    labels = torch.tensor([[5, 7, 9, 1, -100], [9, 7, 5, 1, 0], [1, -100, -100, -100, -100]])
    targets = word_targets(labels, vocab_size=20, settings=settings, special_ids={0, 1})
    assert targets.shape == (3, 20 + 4096)
    assert torch.nonzero(targets[0, :20]).flatten().tolist() == [5, 7, 9]
    assert torch.equal(targets[0, :20], targets[1, :20])  # same words ...
    pairs = [set(torch.nonzero(row[20:]).flatten().tolist()) for row in targets[:2]]
    assert len(pairs[0]) == len(pairs[1]) == 2 and pairs[0] != pairs[1]  # ... in another order: other pairs
    assert targets[2].sum() == 0  # eos alone is no word
    words_only = word_targets(labels, 20, VisionWordSettings(weight=1.0, ngrams=1), {0, 1})
    assert words_only.shape == (3, 20) and torch.equal(words_only, targets[:, :20])


def test_word_head_scores_an_image_by_its_best_token_and_learns_to_find_words():
    torch.manual_seed(0)
    head = VisionWordHead(width=16, num_classes=6)
    tokens = torch.randn(3, 5, 16)
    torch.testing.assert_close(head(tokens), head.proj(tokens).max(dim=1).values)
    # word k is in an image iff one of its 8 tokens carries marker k: max-pooling must localise it
    markers = torch.randn(6, 16) * 3
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)

    def batch(n):
        tokens = torch.randn(n, 8, 16)
        words = torch.randint(0, 6, (n, 2))
        targets = torch.zeros(n, 6).scatter_(1, words, 1.0)
        tokens[:, 0] += markers[words[:, 0]]
        tokens[:, 1] += markers[words[:, 1]]
        return tokens, targets

    for _ in range(150):
        tokens, targets = batch(64)
        loss = vision_word_loss(head, tokens, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens, targets = batch(200)
    top2 = head(tokens).topk(2, dim=-1).indices
    found = targets.gather(1, top2).sum() / targets.sum()
    assert found > 0.9
    assert vision_word_loss(head, tokens, torch.zeros_like(targets)) == 0  # no words, no loss


def test_module_adds_the_word_loss_and_trains_the_encoder_through_it():
    settings = VisionWordSettings(weight=0.5, ngrams=2, buckets=64)
    module = InstructBLIPModule(model=_model(STEM, frozen=False), vision_words=settings)
    assert module.vision_word_head.proj.out_features == T5_TEXT["vocab_size"] + 64
    batch = {
        "pixel_values": torch.randn(2, 3, 30, 30),
        "qformer_input_ids": torch.randint(2, 90, (2, 4)), "qformer_attention_mask": torch.ones(2, 4, dtype=torch.long),
        "input_ids": torch.randint(2, 90, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "labels": torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]]),
    }
    module.eval()  # the Q-Former's dropout off: the same forward twice
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # no trainer attached
    module._log_throughput = lambda *args: None
    loss = module.training_step(batch, 0)
    lm = module.model(**batch).loss
    special = {0, 1}
    with torch.no_grad():
        tokens = module.model.encode_images(batch["pixel_values"])
        words = vision_word_loss(module.vision_word_head, tokens,
                                 word_targets(batch["labels"], T5_TEXT["vocab_size"], settings, special))
    torch.testing.assert_close(loss, lm + 0.5 * words)
    torch.testing.assert_close(logged["train/loss"], lm)  # the curve stays the LM loss, comparable across runs
    torch.testing.assert_close(logged["train/vision_word_loss"], words)
    stem_weight = module.model.vision_encoder.embeddings.patch_embedding[0].weight
    (grad,) = torch.autograd.grad(0.5 * vision_word_loss(
        module.vision_word_head, module.model.encode_images(batch["pixel_values"]),
        word_targets(batch["labels"], T5_TEXT["vocab_size"], settings, special)), stem_weight)
    assert grad.abs().sum() > 0
    assert any(k.startswith("vision_word_head.") for k in module.trainable_state_keys())
    assert not any(k.startswith("vision_word_head") for k in module.model.state_dict())  # never exported


def test_word_loss_refuses_a_frozen_encoder_and_bad_settings():
    with pytest.raises(ValueError, match="ngrams >= 1"):
        VisionWordSettings(weight=1.0, ngrams=0)
    with pytest.raises(ValueError, match="frozen"):
        InstructBLIPModule(model=_model(VISION, frozen=True), vision_words=VisionWordSettings(weight=1.0))
    assert InstructBLIPModule(model=_model(VISION, frozen=True), vision_words=VisionWordSettings()).vision_word_head is None
