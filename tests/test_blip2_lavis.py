"""A LAVIS-named BLIP-2 stage-1 checkpoint (written here by hand from LAVIS's key names) loads into Blip2Stage1."""

from __future__ import annotations

import re

import torch
from tiny_blip2 import caption_batch, tiny_stage1

from ibkit.convert.lavis_blip2 import load_lavis_stage1
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

VIT_PARTS = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.qkv.": "attn.qkv.",
             "self_attn.q_bias": "attn.q_bias", "self_attn.v_bias": "attn.v_bias", "self_attn.projection.": "attn.proj.",
             "mlp.": "mlp."}


def lavis_name(name: str) -> str:
    """ibkit -> LAVIS, written independently of the loader."""
    if name.startswith("vision_encoder.embeddings."):
        rest = name.removeprefix("vision_encoder.embeddings.")
        return {"class_embedding": "visual_encoder.cls_token", "position_embedding": "visual_encoder.pos_embed"}.get(
            rest, "visual_encoder.patch_embed.proj." + rest.removeprefix("patch_embedding."))
    if m := re.match(r"vision_encoder\.encoder\.layers\.(\d+)\.(.+)", name):
        for ours, theirs in VIT_PARTS.items():
            if m.group(2).startswith(ours):
                return f"visual_encoder.blocks.{m.group(1)}.{theirs}{m.group(2).removeprefix(ours)}"
    if name.startswith("qformer."):
        rest = name.removeprefix("qformer.").replace("embeddings.layernorm.", "embeddings.LayerNorm.")
        rest = rest.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.", ".crossattention.self.")
        return "Qformer.bert." + rest
    if name.startswith("lm_head."):
        return "Qformer.cls.predictions." + name.removeprefix("lm_head.")
    return name.replace("vision_projection.", "vision_proj.").replace("text_projection.", "text_proj.")


def test_lavis_stage1_checkpoint_loads(tmp_path):
    source = tiny_stage1(seed=3).eval()
    state = {lavis_name(k): v for k, v in source.state_dict().items()}
    state["Qformer.cls.predictions.decoder.weight"] = state["Qformer.bert.embeddings.word_embeddings.weight"]
    state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save({"model": state}, tmp_path / "blip2_pretrained.pth")
    vision = EVAViT(EVAViTConfig(**{k: getattr(source.vision_encoder.config, k) for k in EVAViTConfig.__dataclass_fields__}))
    loaded = load_lavis_stage1(tmp_path / "blip2_pretrained.pth", vision_encoder=vision,
                               num_attention_heads=2, dec_token_id=source.dec_token_id)
    assert loaded.num_query_tokens == 3 and loaded.embed_dim == 8 and loaded.lm_head.decoder is None
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    batch = caption_batch(3)
    torch.testing.assert_close(loaded.similarity(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]),
                               source.similarity(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))
