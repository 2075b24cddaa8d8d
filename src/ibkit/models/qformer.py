"""The instruction-aware Q-Former (InstructBLIP) and, with ``instruction_aware=False``, BLIP-2's.

Learned queries and instruction tokens share the self-attention (bidirectional, padding mask only);
only the queries cross-attend to the image tokens (every ``cross_attention_freq``-th layer) and the
two kinds of positions use separate feed-forward layers. Parameter names follow transformers'
``InstructBlipQFormerModel`` so that conversion is a rename of prefixes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: ``[DEC]``'s id in the Q-Former vocabulary: bert-base-uncased has 30522 tokens, ``[DEC]`` is appended
#: (BLIP-2's image-grounded text generation starts from it).
BERT_DEC_TOKEN_ID = 30522


@dataclass
class QFormerConfig:
    """Q-Former shape; defaults are BERT-base with the InstructBLIP vocabulary (bert-base + ``[DEC]``)."""

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_freq: int = 2
    instruction_aware: bool = True
    initializer_range: float = 0.02


def _activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    return F.gelu


class QFormerAttentionCore(nn.Module):
    """Scaled-dot-product attention with separate q/k/v projections (k/v may come from the image)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(kv)), self._heads(self.value(kv))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(*x.shape[:2], self.num_heads * self.head_dim)  # explicit: 0 queries work


class QFormerResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual), the BERT output sub-layer."""

    def __init__(self, cfg: QFormerConfig, in_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # noqa: N815 (checkpoint name)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.attention = QFormerAttentionCore(cfg, kv_width or cfg.hidden_size)
        self.output = QFormerResidualOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        return self.output(self.attention(x, x if kv is None else kv, mask), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention for queries, split feed-forward."""

    def __init__(self, cfg: QFormerConfig, layer_idx: int, encoder_width: int) -> None:
        super().__init__()
        self.attention = QFormerAttention(cfg)
        self.has_cross_attention = layer_idx % cfg.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(cfg, kv_width=encoder_width)
        if cfg.instruction_aware:
            self.intermediate = QFormerIntermediate(cfg)
            self.output = QFormerResidualOutput(cfg, cfg.intermediate_size)
        self.intermediate_query = QFormerIntermediate(cfg)
        self.output_query = QFormerResidualOutput(cfg, cfg.intermediate_size)

    def forward(
        self, hidden: torch.Tensor, self_mask: torch.Tensor | None, image_tokens: torch.Tensor | None, num_queries: int
    ) -> torch.Tensor:
        hidden = self.attention(hidden, mask=self_mask)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        if self.has_cross_attention and num_queries > 0:  # a text-only pass has no image to attend to
            queries = self.crossattention(queries, kv=image_tokens)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] == 0:
            return queries
        text = self.output(self.intermediate(text), text)
        return torch.cat((queries, text), dim=1)


class QFormerEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i, encoder_width) for i in range(cfg.num_hidden_layers))


class QFormer(nn.Module):
    """Q-Former body: ``forward(queries, image_tokens, input_ids, attention_mask)`` -> query outputs."""

    def __init__(self, config: QFormerConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = config
        self.encoder_width = encoder_width
        if config.instruction_aware:
            self.embeddings = QFormerEmbeddings(config)
        else:  # BLIP-2: queries only, so only the embedding LayerNorm exists
            self.embeddings = nn.Module()
            self.embeddings.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.embeddings.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = QFormerEncoder(config, encoder_width)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, queries: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        emb = self.embeddings
        if input_ids is not None and input_ids.shape[1] > 0:
            if not self.config.instruction_aware:
                raise ValueError("this Q-Former is in BLIP-2 mode (instruction_aware=False): it takes no text")
            if input_ids.shape[1] > self.config.max_position_embeddings:
                raise ValueError(
                    f"instruction of {input_ids.shape[1]} tokens exceeds the Q-Former's {self.config.max_position_embeddings} "
                    "positions: truncate it (the collator's max_qformer_len)"
                )
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)
            hidden = torch.cat((queries.to(text.dtype), text), dim=1)
        else:
            hidden = queries
        return emb.dropout(emb.layernorm(hidden.to(emb.layernorm.weight.dtype)))

    def forward(
        self,
        queries: torch.Tensor,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the ``num_queries`` output vectors (B, Q, hidden) of the last layer."""
        return self.forward_hidden(queries, image_tokens, input_ids, attention_mask)[:, : queries.shape[1]]

    def forward_hidden(
        self,
        queries: torch.Tensor,
        image_tokens: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """The whole last-layer sequence [queries ; instruction] (B, Q + L, hidden).

        With zero queries (``queries`` of shape (B, 0, hidden)) the text path is a plain BERT encoder
        (``image_tokens`` may then be None): BLIP-2's unimodal text pass, and how a BERT initialisation
        is checked. ``causal=True`` is BLIP-2's multimodal causal mask (its ITG loss): queries see the
        queries only, each text token sees every query and the text up to itself.
        """
        if not self.config.instruction_aware:
            input_ids, attention_mask = None, None
        hidden = self.embed(queries, input_ids)
        num_queries = queries.shape[1]
        if image_tokens is None and num_queries > 0:
            raise ValueError("the queries cross-attend to the image: pass image_tokens")
        self_mask = None
        if input_ids is not None and (attention_mask is not None or causal):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            keep = torch.cat((attention_mask.new_ones(attention_mask.shape[0], num_queries), attention_mask), 1)
            keep = keep.bool()[:, None, None, :]  # (B, 1, 1, L): padding keys are never seen
            if causal:
                length = keep.shape[-1]
                pos = torch.arange(length, device=keep.device)
                sees = (pos[None, :] <= pos[:, None]) & (pos[:, None] >= num_queries)  # text: earlier text
                sees |= pos[None, :] < num_queries  # everyone sees the queries
                keep = keep & sees  # (B, 1, L, L)
            # additive mask: hidden keys get a large negative score
            self_mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
            self_mask = self_mask.masked_fill(~keep, torch.finfo(hidden.dtype).min)
        image_tokens = image_tokens.to(hidden.dtype) if image_tokens is not None else None
        for layer in self.encoder.layer:
            if self.gradient_checkpointing and self.training and hidden.requires_grad:
                hidden = torch.utils.checkpoint.checkpoint(
                    layer, hidden, self_mask, image_tokens, num_queries, use_reentrant=False
                )
            else:
                hidden = layer(hidden, self_mask, image_tokens, num_queries)
        return hidden
