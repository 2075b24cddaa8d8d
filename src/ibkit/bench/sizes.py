"""Benchmark sizes: tiny (tests), small (CPU, the real proportions), full (ViT-g + Q-Former-base + FlanT5-XL).

"small" divides every width of ViT-g/14 : Q-Former (BERT-base) : FlanT5-XL by 8 (head dimensions kept
near the originals by dividing head counts by 8) and every depth by 3 (39 : 12 : 24 -> 13 : 4 : 8), and
the two vocabularies by 8. The image (224 px, 257 tokens), the 32 queries and the sequence lengths
are the real ones. Parameters then scale as width^2 x depth in every part alike, so each part's share
of the FLOPs (the ViT's dominance of the training step, the LLM's of generation) is that of the real
model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ibkit.models.qformer import QFormerConfig
from ibkit.models.vision.eva_vit import EVAViTConfig

FLAN_T5_XL = dict(
    model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
    num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=32,
)


@dataclass(frozen=True)
class BenchSize:
    """Model shapes and workload settings of one benchmark size."""

    name: str
    description: str
    vision: EVAViTConfig
    qformer: QFormerConfig
    t5: dict[str, Any]
    num_query_tokens: int = 32
    train_batch: int = 8
    qformer_len: int = 24
    prompt_len: int = 24
    target_len: int = 8
    gen_batches: tuple[int, ...] = (1, 8)
    gen_beams: tuple[int, ...] = (1, 5)
    new_tokens: int = 16
    rank_questions: int = 2
    rank_candidates: int = 100
    candidate_len: int = 4
    warmup: int = 1
    repeats: int = 5
    rank_repeats: int = 3
    matmul_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


TINY = BenchSize(
    name="tiny",
    description="test size: a few thousand parameters per part, seconds on any CPU",
    vision=EVAViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8),
    qformer=QFormerConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64),
    t5=dict(FLAN_T5_XL, vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8),
    num_query_tokens=4,
    train_batch=2,
    qformer_len=6,
    prompt_len=6,
    target_len=3,
    gen_batches=(1, 2),
    new_tokens=4,
    rank_questions=1,
    rank_candidates=20,
    candidate_len=2,
    warmup=1,
    repeats=2,
    rank_repeats=1,
    matmul_size=256,
)

SMALL = BenchSize(
    name="small",
    description=(
        "ViT-g/14 : Q-Former-base : FlanT5-XL with widths / 8 and depths / 3 (ViT 176 x 13 blocks, 2 heads, "
        "MLP 768; Q-Former 96 x 4 layers, 2 heads, FFN 384; T5 256, 8 + 8 layers, 4 heads of 64, FFN 640; "
        "vocabularies / 8); real 224 px images (257 tokens), 32 queries, real prompt lengths"
    ),
    vision=EVAViTConfig(hidden_size=176, intermediate_size=768, num_hidden_layers=13, num_attention_heads=2),
    qformer=QFormerConfig(vocab_size=3816, hidden_size=96, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_size=384),
    t5=dict(FLAN_T5_XL, vocab_size=4016, d_model=256, d_kv=64, d_ff=640, num_layers=8, num_decoder_layers=8,
            num_heads=4),
    rank_questions=1,
    repeats=7,
)

FULL = BenchSize(
    name="full",
    description="ViT-g/14 (39 blocks) + Q-Former (BERT-base) + FlanT5-XL, random weights (GPU only)",
    vision=EVAViTConfig(),
    qformer=QFormerConfig(),
    t5=dict(FLAN_T5_XL),
    train_batch=16,
    new_tokens=24,
    rank_questions=1,
    repeats=4,
    rank_repeats=2,
)

SIZES: dict[str, BenchSize] = {s.name: s for s in (TINY, SMALL, FULL)}
