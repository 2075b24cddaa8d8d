"""Expected GPU memory of InstructBLIP instruction tuning, per GPU, from parameter counts and shapes.

Parameter counts are exact: the models are built on the meta device (no weights, no memory) from
the architectures below. Activation memory follows the usual transformer estimate (Korthikanti et
al., 2022, "Reducing Activation Recomputation in Large Transformer Models"): a block keeps about
``34 * s * b * h`` bytes of 16-bit activations for backward when attention is computed by a fused
kernel (no ``s^2`` score matrix), ``2 * s * b * h`` bytes when it is checkpointed. Gradients flow
through the frozen LLM to the soft prompt, so its activations count even though it does not train.

Run ``python -m ibkit.training.memory`` for the table in docs/train.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

GIB = 1024**3

# transformers configs of the paper's LLMs (and the ablation's Mistral-7B), as in their config.json files
LLM_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "flan-t5-xl": dict(
        model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
        num_heads=32, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, tie_word_embeddings=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ),
    "flan-t5-xxl": dict(
        model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
        num_heads=64, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, tie_word_embeddings=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ),
    "vicuna-7b-v1.1": dict(
        model_type="llama", vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=32000,
    ),
    "vicuna-13b-v1.1": dict(
        model_type="llama", vocab_size=32001, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=32000,
    ),
    "mistral-7b-v0.1": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
}

# The paper's runs: global batch 192 / 128 / 64 / 64 (FlanT5-XL / Vicuna-7B / FlanT5-XXL / Vicuna-13B) on
# 16 A100s; the per-GPU batch of the experiment configs (x 16 GPUs, or 8 GPUs x 2 accumulation steps).
PAPER_MODELS: dict[str, tuple[str, int]] = {
    "InstructBLIP FlanT5-XL": ("flan-t5-xl", 12),
    "InstructBLIP FlanT5-XXL": ("flan-t5-xxl", 4),
    "InstructBLIP Vicuna-7B": ("vicuna-7b-v1.1", 8),
    "InstructBLIP Vicuna-13B": ("vicuna-13b-v1.1", 4),
}


def llm_for_path(name_or_path: str) -> dict[str, Any] | None:
    """The architecture of a checkpoint folder named like one of :data:`LLM_ARCHITECTURES` (by its last part)."""
    base = str(name_or_path).rstrip("/").rsplit("/", 1)[-1].lower()
    for key, arch in LLM_ARCHITECTURES.items():
        if base == key or base.startswith(key) or key.startswith(base):
            return dict(arch)
    return None


def meta_instructblip(
    llm: str | dict[str, Any], instruction_aware: bool = True, num_query_tokens: int = 32, llm_dtype: str = "bf16"
):
    """The full-size model on the meta device as the experiments build it (bf16 LLM, fp32 ViT weights
    with fp16 compute): shapes, dtypes and parameter counts, no memory."""
    from ibkit.models import EVAViT, EVAViTConfig, InstructBLIP, LanguageModel, QFormerConfig

    config = LLM_ARCHITECTURES[llm] if isinstance(llm, str) else llm
    with torch.device("meta"):
        return InstructBLIP(
            EVAViT(EVAViTConfig(), compute_dtype="fp16"),
            LanguageModel(config=dict(config), dtype=llm_dtype),
            QFormerConfig(instruction_aware=instruction_aware),
            num_query_tokens=num_query_tokens,
        )


@dataclass
class MemoryEstimate:
    """GiB per GPU, by kind of memory."""

    frozen_weights: float
    trainable_states: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.frozen_weights + self.trainable_states + self.activations + self.logits + self.overhead


def estimate_memory(
    model: torch.nn.Module,
    batch_size: int,
    prompt_len: int = 128,
    target_len: int = 256,
    world_size: int = 1,
    sharded: bool = False,
    activation_checkpointing: bool = False,
    overhead_gib: float = 1.0,
) -> MemoryEstimate:
    """Memory per GPU for one training step at the longest sequences the collator produces.

    ``sharded`` (FSDP FULL_SHARD) divides weights, gradients and optimizer states by ``world_size``;
    activations are per GPU either way. Trainable parameters are fp32 with fp32 gradients and two
    AdamW moments (16 bytes each); frozen ones take their storage dtype's size.
    """
    shards = world_size if sharded else 1
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lm = model.language_model
    cfg = lm.hf_config
    hidden = lm.hidden_size
    queries = model.num_query_tokens
    act = 2  # bytes of a bf16 activation
    b = batch_size

    def block_bytes(seq: int, width: int, layers: int, per_block: float = 34.0) -> float:
        if activation_checkpointing:
            # the inputs of every block, plus one block's full activations during its recomputation
            return layers * act * seq * b * width + per_block * seq * b * width
        return layers * per_block * seq * b * width

    if lm.is_encoder_decoder:
        enc_seq, dec_seq = queries + prompt_len, target_len
        # T5 blocks keep more than the generic 34: RMSNorm inputs in fp32 and, with transformers'
        # gated-gelu (tanh GELU built from elementwise ops), ~6 more d_ff-wide tensors (~30 at d_ff=2.5h);
        # decoder blocks add cross-attention. 76/92 reproduce a measured FlanT5-XL step within ~5%.
        unfused_gelu = getattr(cfg, "dense_act_fn", "") == "gelu_new"
        extra = 30.0 * (cfg.d_ff / hidden) / 2.5 if unfused_gelu else 0.0
        llm_act = block_bytes(enc_seq, hidden, cfg.num_layers, per_block=46.0 + extra)
        llm_act += block_bytes(dec_seq, hidden, cfg.num_decoder_layers, per_block=62.0 + extra)
        logit_positions = dec_seq
    else:
        seq = queries + prompt_len + target_len
        llm_act = block_bytes(seq, hidden, cfg.num_hidden_layers)
        logit_positions = seq
    # Q-Former (trains, never checkpointed): [queries; instruction] through its layers, plus the
    # image tokens it cross-attends to (kept as fp32 input of the trainable ln_vision)
    qcfg = model.qformer_config
    qformer_seq = queries + (prompt_len if qcfg.instruction_aware else 0)
    qformer_act = qcfg.num_hidden_layers * 34.0 * qformer_seq * b * qcfg.hidden_size
    patch = getattr(getattr(model.vision_encoder, "config", None), "patch_size", 14)
    image_tokens = (model.vision_encoder.image_size // patch) ** 2 + 1
    qformer_act += 3 * 4 * b * image_tokens * model.vision_encoder.width
    vocab = int(cfg.vocab_size)
    # bf16 logits + their fp32 copy for the loss + its gradient
    logits = b * logit_positions * vocab * (2 + 4 + 4)
    return MemoryEstimate(
        frozen_weights=frozen_bytes / shards / GIB,
        trainable_states=trainable * 16 / shards / GIB,
        activations=(llm_act + qformer_act) / GIB,
        logits=logits / GIB,
        overhead=overhead_gib,
    )


def paper_table(prompt_len: int = 128, target_len: int = 256) -> str:
    """Markdown table: memory per GPU of each paper model, 1 GPU or DDP (with/without activation
    checkpointing of the LLM blocks) and 8-GPU FSDP (with it)."""
    lines = [
        "| model | frozen + trainable params | batch per GPU | 1 GPU / DDP | + LLM activation checkpointing "
        "| FSDP, 8 GPUs |",
        "|---|---|---|---|---|---|",
    ]
    for name, (llm, batch) in PAPER_MODELS.items():
        model = meta_instructblip(llm)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) / 1e9
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        ddp = estimate_memory(model, batch, prompt_len, target_len)
        ddp_ckpt = estimate_memory(model, batch, prompt_len, target_len, activation_checkpointing=True)
        fsdp = estimate_memory(model, batch, prompt_len, target_len, world_size=8, sharded=True,
                               activation_checkpointing=True)
        lines.append(
            f"| {name} | {frozen:.2f}B + {trainable:.0f}M | {batch} | {ddp.total:.0f} GiB | "
            f"{ddp_ckpt.total:.0f} GiB | {fsdp.total:.0f} GiB |"
        )
    return "\n".join(lines)
