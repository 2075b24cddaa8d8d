"""BLIP-2 folders both ways: tiny random transformers Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration
(saved by transformers itself) load into ibkit with matching outputs, and ibkit's folders load back into transformers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    IMAGE_TOKEN,
    LLAMA_TEXT,
    NUM_QUERIES,
    QFORMER,
    T5_TEXT,
    VISION,
    hf_inputs,
    with_placeholders,
)

from ibkit.models.blip2 import Blip2Stage1, build_stage2, init_from_blip2, load_blip2
from ibkit.models.blip2_transformers_io import SIDE_FILE, load_blip2_generation, save_blip2_generation
from ibkit.models.instructblip import InstructBLIP
from ibkit.models.language import LanguageModel
from ibkit.models.qformer import QFormerConfig
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

OPT_TEXT = dict(
    model_type="opt", vocab_size=99, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1,
    dropout=0.0, attention_dropout=0.0, enable_bias=True, do_layer_norm_before=True,
)
TEXTS = {"t5": T5_TEXT, "opt": OPT_TEXT, "llama": LLAMA_TEXT}
EMBED = 16


def _perturb(model) -> None:
    """Random weights with some spread (transformers zero-initialises queries and biases)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                p.normal_(std=0.02)
                p[d : 2 * d] = 0  # EVA has no k bias
            elif "query_tokens" in name or "class_embedding" in name or "position_embedding" in name:
                p.normal_(std=0.5)
            elif "layernorm" in name.lower() or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(std=0.02)


def build_hf_retrieval(seed: int = 0):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=VISION, qformer_config={**QFORMER, "use_qformer_text_input": True},
        num_query_tokens=NUM_QUERIES, image_text_hidden_size=EMBED,
    )
    model = Blip2ForImageTextRetrieval(config).eval()
    _perturb(model)
    return model


def build_hf_generation(text: dict, seed: int = 0):
    from transformers import AutoConfig, Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(text)
    text_config = AutoConfig.for_model(text.pop("model_type"), **text)
    config = Blip2Config(
        vision_config=VISION, qformer_config=QFORMER, text_config=text_config.to_dict(),
        num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    _perturb(model)
    with torch.no_grad():
        model.language_model.get_output_embeddings().weight.mul_(40.0)  # peaky logits: no greedy ties
    return model


def _texts(batch: int = 3, length: int = 7, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, QFORMER["vocab_size"], (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, -1:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_blip2_itm")
    hf = build_hf_retrieval()
    hf.save_pretrained(directory)
    return hf, Blip2Stage1.from_pretrained(directory), directory


def test_retrieval_itc_and_itm_match_transformers(retrieval):
    hf, ours, _ = retrieval
    pixels = torch.randn(3, 3, VISION["image_size"], VISION["image_size"])
    ids, mask = _texts()
    with torch.no_grad():
        ref_itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        ref_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    torch.testing.assert_close(ours.similarity(pixels, ids, mask), ref_itc.logits_per_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.match(pixels, ids, mask), ref_itm.logits_per_image, atol=1e-4, rtol=1e-4)
    assert ref_itc.logits_per_image.std() > 1e-3 and ref_itm.logits_per_image.std() > 1e-3  # not trivially equal


def test_retrieval_round_trip(retrieval, tmp_path):
    from transformers import Blip2ForImageTextRetrieval

    hf, ours, _ = retrieval
    with torch.no_grad():
        ours.temp.fill_(0.05)
        ours.lm_head.bias.normal_()
    ours.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / SIDE_FILE).is_file()
    again, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for (name, a), b in zip(hf.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    reloaded = load_blip2(tmp_path / "export")
    assert isinstance(reloaded, Blip2Stage1)
    for (name, a), b in zip(ours.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name  # ITG head and temperature included (side file)


@pytest.fixture(scope="module", params=["t5", "opt", "llama"])
def generation(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"hf_blip2_{request.param}")
    hf = build_hf_generation(TEXTS[request.param])
    hf.save_pretrained(directory)
    return request.param, hf, load_blip2_generation(directory), directory


def _targets(batch=2, length=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, IMAGE_TOKEN, (batch, length), generator=g)


def _forward_both(kind, hf, ours):
    x = hf_inputs()
    pixels = x["pixel_values"]
    target = _targets()
    if kind == "t5":
        ids, mask = with_placeholders(x["input_ids"], x["attention_mask"])
        labels = target.clone()
        labels[1, -1] = -100
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(pixel_values=pixels, input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=labels)
        return ref.logits, got.logits, ref.loss, got.loss
    full_ids = torch.cat((x["input_ids"], target), 1)
    full_mask = torch.ones_like(full_ids)
    full_mask[1, -1] = 0
    labels = full_ids.masked_fill(full_mask == 0, -100)
    labels[:, : x["input_ids"].shape[1]] = -100
    hf_ids, hf_mask = with_placeholders(full_ids, full_mask)
    hf_labels = torch.cat((torch.full((2, NUM_QUERIES), -100), labels), 1)
    ref = hf(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels)
    got = ours(pixel_values=pixels, input_ids=full_ids, attention_mask=full_mask, labels=labels)
    valid = full_mask.bool()
    return ref.logits[:, NUM_QUERIES:][valid], got.logits[valid], ref.loss, got.loss


def test_generation_logits_and_greedy_output_match_transformers(generation):
    kind, hf, ours, _ = generation
    assert not ours.qformer_config.instruction_aware
    with torch.no_grad():
        ref_logits, logits, ref_loss, loss = _forward_both(kind, hf, ours)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    x = hf_inputs()
    ids, mask = with_placeholders(x["input_ids"], x["attention_mask"])
    kwargs = dict(max_new_tokens=6, num_beams=1, do_sample=False)
    ref = hf.generate(pixel_values=x["pixel_values"], input_ids=ids, attention_mask=mask, **kwargs)
    got = ours.generate(pixel_values=x["pixel_values"], input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                        **kwargs)
    ref = ref[:, 1:] if kind == "t5" else ref[:, ids.shape[1] :]
    assert got.shape[1] > 0 and got.tolist() == ref.tolist()


def test_generation_round_trip(generation, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    kind, hf, ours, _ = generation
    save_blip2_generation(ours, tmp_path / "export")
    again, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref_logits, _, _, _ = _forward_both(kind, hf, ours)
        new_logits, _, _, _ = _forward_both(kind, again.eval(), ours)
    torch.testing.assert_close(new_logits, ref_logits, atol=1e-5, rtol=1e-5)
    reloaded = load_blip2(tmp_path / "export")
    assert isinstance(reloaded, InstructBLIP)
    for (name, a), b in zip(ours.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_stage2_folder_initialises_instruction_tuning(generation):
    kind, _, stage2, directory = generation
    instruct = load_blip2_generation(directory, instruction_aware=True)
    assert instruct.qformer_config.instruction_aware
    for name, value in stage2.state_dict().items():
        torch.testing.assert_close(instruct.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # the same through init_from_blip2 into a fresh instruction-aware model
    fresh = InstructBLIP(
        EVAViT(EVAViTConfig(**{k: VISION[k] for k in VISION})), LanguageModel(config=dict(TEXTS[kind])),
        QFormerConfig(**{k: v for k, v in QFORMER.items() if k != "cross_attention_frequency"}),
        num_query_tokens=NUM_QUERIES, ln_vision_eps=stage2.ln_vision.eps,
    )
    report = init_from_blip2(fresh, stage2)
    assert "language_projection.weight" in report.copied and "query_tokens" in report.copied
    assert all("word_embeddings" in k or "position_embeddings" in k or ".intermediate." in k or ".output." in k
               for k in report.kept), report.kept


def test_stage1_folder_initialises_stage2_and_instructblip(retrieval):
    _, stage1, _ = retrieval
    vision = EVAViT(EVAViTConfig(**VISION))
    qcfg = QFormerConfig(**{k: v for k, v in QFORMER.items() if k != "cross_attention_frequency"})
    stage2 = build_stage2(vision, LanguageModel(config=dict(T5_TEXT)), qcfg, NUM_QUERIES, stage1.ln_vision.eps)
    report = init_from_blip2(stage2, stage1, vision=True)
    assert not report.kept or set(report.kept) == {"language_projection.weight", "language_projection.bias"}
    instruct = InstructBLIP(EVAViT(EVAViTConfig(**VISION)), LanguageModel(config=dict(T5_TEXT)), qcfg, NUM_QUERIES,
                            stage1.ln_vision.eps)
    init_from_blip2(instruct, stage1, vision=True)
    stage2.eval(), instruct.eval()  # dropout off for the comparison
    # the instruction path is stage 1's text side: the Q-Former's text-only output matches stage 1's
    ids, mask = _texts()
    empty = torch.zeros(3, 0, QFORMER["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(instruct.qformer.forward_hidden(empty, None, ids, mask), stage1.text_outputs(ids, mask))
        pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"])
        tokens = stage1.encode_images(pixels)
        torch.testing.assert_close(stage2.qformer(stage2.query_tokens.expand(2, -1, -1), stage2.encode_images(pixels)),
                                   stage1.query_outputs(tokens))
