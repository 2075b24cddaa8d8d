"""A tiny random BLIP-2 stage-1 model and caption batch (CPU, no downloads)."""

from __future__ import annotations

import torch

from ibkit.models.blip2 import Blip2Stage1
from ibkit.models.qformer import QFormerConfig
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

VOCAB = 40
DEC = VOCAB - 1
IMAGE = 12


def tiny_stage1(seed: int = 0, **kwargs) -> Blip2Stage1:
    torch.manual_seed(seed)
    vision = EVAViT(EVAViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=IMAGE, patch_size=6))
    qformer = QFormerConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    model = Blip2Stage1(vision, qformer, num_query_tokens=3, embed_dim=8, dec_token_id=DEC, **kwargs)
    with torch.no_grad():  # spread the logits: LayerNorm/ITM/LM parameters away from their trivial init
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        model.query_tokens.normal_(std=0.5)
    return model


def caption_batch(batch: int, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Captions starting with [CLS]=1, some right padding (pad 0), and random images."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, DEC, (batch, length), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    for row in range(1, batch, 2):
        cut = 2 + row % (length - 2)
        mask[row, cut:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
