"""LoRA on the LLM and on the Q-Former: what trains, merging on export, gradient checkpointing, YAML."""

from __future__ import annotations

from pathlib import Path

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

from ibkit import InstructBLIP, LanguageModel
from ibkit.models import EVAViT, EVAViTConfig, LoraSettings, QFormerConfig
from ibkit.models.lora import apply_qformer_lora, has_lora, merge_lora_modules, merged_copy
from ibkit.models.transformers_io import qformer_config_from_hf

TEXTS = {"t5": T5_TEXT, "llama": LLAMA_TEXT}
LLM_TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}
BRIDGE = {"qformer", "query_tokens", "language_projection", "ln_vision"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def _tiny(kind: str, llm_lora: bool = False, qformer_lora: bool = False, gradient_checkpointing: bool = False,
          dropout: float = 0.0, seed: int = 0) -> InstructBLIP:
    torch.manual_seed(seed)
    lora = LoraSettings(r=4, alpha=8, dropout=dropout, target_modules=LLM_TARGETS[kind]) if llm_lora else None
    lm = LanguageModel(config=TEXTS[kind], lora=lora, gradient_checkpointing=gradient_checkpointing)
    with torch.no_grad():
        lm.base_model.get_output_embeddings().weight.mul_(40.0)
    model = InstructBLIP(EVAViT(EVAViTConfig(**VISION)), lm, qformer_config_from_hf(QFORMER), num_query_tokens=NUM_QUERIES)
    model.image_token_index = IMAGE_TOKEN  # written to config.json: transformers' placeholder id
    if qformer_lora:
        apply_qformer_lora(model.qformer, LoraSettings(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): give the adapters something to change
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    return model.eval()


def _target(kind: str):
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, IMAGE_TOKEN, (2, 4), generator=g)


def _logits(model: InstructBLIP, kind: str) -> torch.Tensor:
    x, target = hf_inputs(), _target(kind)
    if kind == "t5":
        return model(**x, labels=target).logits
    ids = torch.cat((x["input_ids"], target), 1)
    return model(**{**x, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits


def _hf_logits(hf, kind: str) -> torch.Tensor:
    x, target = hf_inputs(), _target(kind)
    common = {k: x[k] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
    if kind == "t5":
        ids, mask = with_placeholders(x["input_ids"], x["attention_mask"])
        return hf(**common, input_ids=ids, attention_mask=mask, labels=target).logits
    full = torch.cat((x["input_ids"], target), 1)
    ids, mask = with_placeholders(full, torch.ones_like(full))
    return hf(**common, input_ids=ids, attention_mask=mask).logits[:, NUM_QUERIES:]


def _loss(model: InstructBLIP, kind: str) -> torch.Tensor:
    x, target = hf_inputs(), _target(kind)
    if kind == "t5":
        return model(**x, labels=target).loss
    ids = torch.cat((x["input_ids"], target), 1)
    labels = ids.clone()
    labels[:, : x["input_ids"].shape[1]] = -100
    return model(**{**x, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels=labels).loss


def _snapshot(model: InstructBLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_export_reproduces(model: InstructBLIP, kind: str, directory: Path) -> None:
    from transformers import InstructBlipForConditionalGeneration

    with torch.no_grad():
        expected = _logits(model, kind)
        hf, info = InstructBlipForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        # merged (W + BA)x and unmerged Wx + BAx round differently; the head's x40 scale magnifies that
        torch.testing.assert_close(_hf_logits(hf.eval(), kind), expected, atol=2e-3, rtol=1e-3)
        again = InstructBLIP.from_pretrained(directory).eval()
        assert not has_lora(again.qformer) and again.language_model.lora is None
        torch.testing.assert_close(_logits(again, kind), expected, atol=2e-3, rtol=1e-3)


# -- LoRA on the LLM ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_llm_lora_trains_adapters_and_bridge_only(kind):
    model = _tiny(kind, llm_lora=True)
    trainable = model.trainable_parameters()
    adapters = [n for n in trainable if n.startswith("language_model.")]
    assert adapters and all("lora_" in n for n in adapters)
    assert all(n.split(".")[0] in BRIDGE for n in trainable if n not in adapters)
    assert {n.split(".")[0] for n in trainable} == BRIDGE | {"language_model"}
    model.train()
    _loss(model, kind).backward()
    assert all(model.get_parameter(n).grad is not None for n in adapters)
    assert model.query_tokens.grad is not None
    frozen = [p for n, p in model.named_parameters() if n not in trainable]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_llm_lora_export_merges_on_a_copy(kind, tmp_path):
    model = _tiny(kind, llm_lora=True)
    with torch.no_grad(), model.language_model.model.disable_adapter():
        without_adapters = _logits(model, kind)
    assert (without_adapters - _logits(model, kind)).abs().max() > 0.5  # the adapters matter
    before = _snapshot(model)
    model.save_pretrained(tmp_path / "export")
    after = _snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.language_model.lora is not None
    _assert_export_reproduces(model, kind, tmp_path / "export")


# -- LoRA on the Q-Former -----------------------------------------------------------------------------
def test_qformer_lora_trains_adapters_and_bridge_only():
    model = _tiny("t5", qformer_lora=True)
    trainable = model.trainable_parameters()
    in_qformer = [n for n in trainable if n.startswith("qformer.")]
    assert in_qformer and all(".lora_A." in n or ".lora_B." in n for n in in_qformer)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in in_qformer}
    assert wrapped == {"query", "value"}  # self- and cross-attention query/value
    assert any(".crossattention." in n for n in in_qformer)
    assert {n.split(".")[0] for n in trainable} == BRIDGE
    model.train()
    _loss(model, "t5").backward()
    assert all(model.get_parameter(n).grad is not None for n in in_qformer)
    assert model.ln_vision.weight.grad is not None and model.language_projection.weight.grad is not None
    assert model.qformer.encoder.layer[0].attention.attention.key.weight.grad is None


def test_qformer_lora_can_keep_the_base_trainable():
    model = _tiny("t5")
    apply_qformer_lora(model.qformer, LoraSettings(r=2, alpha=4, target_modules=["key"]), train_base=True)
    trainable = model.trainable_parameters()
    assert "qformer.encoder.layer.0.attention.attention.key.base_layer.weight" in trainable
    assert "qformer.encoder.layer.0.attention.attention.key.lora_A.default.weight" in trainable
    assert "qformer.embeddings.word_embeddings.weight" in trainable


def test_qformer_lora_rejects_unknown_targets_and_double_application():
    model = _tiny("t5")
    with pytest.raises(ValueError, match="q_proj"):
        apply_qformer_lora(model.qformer, LoraSettings(target_modules=["q_proj"]))
    apply_qformer_lora(model.qformer)
    with pytest.raises(ValueError, match="already"):
        apply_qformer_lora(model.qformer)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_merged_copy_exports_both_adapters_and_leaves_the_model(kind, tmp_path):
    model = _tiny(kind, llm_lora=True, qformer_lora=True)
    plain = _tiny(kind)  # same seed, same base weights, no adapters
    with torch.no_grad():
        assert (_logits(plain, kind) - _logits(model, kind)).abs().max() > 0.5
    before = _snapshot(model)
    merged = merged_copy(model)
    assert merged is not model and not has_lora(merged.qformer) and merged.language_model.lora is None
    merged.save_pretrained(tmp_path / "export")
    after = _snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert has_lora(model.qformer) and model.language_model.lora is not None
    _assert_export_reproduces(model, kind, tmp_path / "export")


def test_merge_lora_modules_restores_plain_names():
    model = _tiny("t5")
    names = set(model.qformer.state_dict())
    apply_qformer_lora(model.qformer)
    assert set(model.qformer.state_dict()) != names
    merge_lora_modules(model.qformer)
    assert set(model.qformer.state_dict()) == names and not has_lora(model.qformer)


def test_save_pretrained_merges_qformer_lora(tmp_path):
    model = _tiny("t5", qformer_lora=True)
    model.save_pretrained(tmp_path / "export")
    assert has_lora(model.qformer)
    _assert_export_reproduces(model, "t5", tmp_path / "export")


# -- gradient checkpointing ---------------------------------------------------------------------------
def _count_calls(module: torch.nn.Module) -> list[int]:
    """Count runs of ``module.forward`` (forward hooks do not fire when checkpointing recomputes)."""
    calls = [0]
    forward = module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def _linear_in_first_llm_block(model: InstructBLIP) -> torch.nn.Module:
    """A Linear inside the LLM's first block (transformers checkpoints the block's inner ``forward``)."""
    blocks = model.language_model.block_classes
    block = next(m for m in model.language_model.base_model.modules() if type(m) in blocks)
    return next(m for m in block.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(kind):
    reference = _tiny(kind, llm_lora=True, qformer_lora=False, dropout=0.1)
    checkpointed = _tiny(kind, llm_lora=True, gradient_checkpointing=True, dropout=0.1)
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.qformer.gradient_checkpointing = True
    results = []
    for model in (reference, checkpointed):
        qformer_calls, llm_calls = _count_calls(model.qformer.encoder.layer[0]), _count_calls(_linear_in_first_llm_block(model))
        model.train()
        torch.manual_seed(11)  # same dropout masks in both runs (checkpointing replays the RNG state)
        loss = _loss(model, kind)
        loss.backward()
        grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                 for n, p in model.trainable_parameters().items()}
        results.append((loss.detach(), grads, qformer_calls[0], llm_calls[0]))
    (loss_a, grads_a, q_a, l_a), (loss_b, grads_b, q_b, l_b) = results
    assert (q_a, l_a) == (1, 1) and (q_b, l_b) == (2, 2)  # checkpointed blocks run again in backward
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("lora_" in n for n in grads_a)
    for name, expected in grads_a.items():  # equal up to float summation order, relative to each tensor's scale
        assert (grads_b[name] - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-8, name


# -- YAML components ----------------------------------------------------------------------------------
class _QFormerHolder:
    """Takes a Q-Former config the way InstructBLIP does (``qformer: QFormerConfig | None``)."""

    def __init__(self, qformer: QFormerConfig | None = None) -> None:
        self.qformer = qformer


def test_component_yaml_files_parse_and_build():
    from jsonargparse import ArgumentParser

    from ibkit.models import VisionEncoder

    # as LightningCLI sees them: files given for InstructBLIP's nested arguments
    model_parser = ArgumentParser()
    model_parser.add_class_arguments(InstructBLIP, "model", sub_configs=True)
    for llm in ("flant5_xl", "flant5_xxl", "vicuna_7b", "vicuna_13b", "vicuna_7b_lora"):
        for qformer in ("base", "blip2"):
            cfg = model_parser.parse_args([
                "--model.vision_encoder", str(CONFIGS / "vision" / "eva_vit_g.yaml"),
                "--model.language_model", str(CONFIGS / "llm" / f"{llm}.yaml"),
                "--model.qformer", str(CONFIGS / "qformer" / f"{qformer}.yaml"),
            ])
            llm_args = cfg.model.language_model.init_args
            assert llm_args.dtype == "bf16" and llm_args.frozen
            assert llm.replace("flant5_", "flan-t5-").replace("_lora", "").replace("_", "-") in llm_args.name_or_path
            assert (llm_args.lora is not None) == llm.endswith("_lora")
    lora = cfg.model.language_model.init_args.lora
    assert (lora.r, lora.alpha, lora.target_modules) == (8, 16, ["q_proj", "v_proj"])

    parser = ArgumentParser()
    parser.add_subclass_arguments(VisionEncoder, "vision")
    parser.add_class_arguments(_QFormerHolder, "holder", sub_configs=True)
    cfg = parser.parse_args([
        "--vision", str(CONFIGS / "vision" / "eva_vit_g.yaml"), "--holder.qformer", str(CONFIGS / "qformer" / "base.yaml"),
    ])
    with torch.device("meta"):
        built = parser.instantiate_classes(cfg)
    assert isinstance(built.vision, EVAViT) and len(built.vision.encoder.layers) == 39 and built.vision.width == 1408
    assert built.vision.frozen
    assert built.holder.qformer == QFormerConfig()  # the dataclass defaults are InstructBLIP's
    cfg = parser.parse_args([
        "--vision", str(CONFIGS / "vision" / "eva_vit_g.yaml"), "--holder.qformer", str(CONFIGS / "qformer" / "blip2.yaml"),
    ])
    with torch.device("meta"):
        assert parser.instantiate_classes(cfg).holder.qformer == QFormerConfig(instruction_aware=False)
