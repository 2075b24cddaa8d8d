"""The instruction-aware Q-Former (InstructBLIP) and, with ``instruction_aware=False``, BLIP-2's.

Learned queries and instruction tokens share the self-attention (bidirectional, padding mask only);
only the queries cross-attend to the image tokens (every ``cross_attention_freq``-th layer) and the
two kinds of positions use separate feed-forward layers. Parameter names follow transformers'
``InstructBlipQFormerModel`` so that conversion is a rename of prefixes only.
"""

from __future__ import annotations

from collections.abc import Sequence
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


#: one attention's keys and values, (B, heads, N, head_dim) each
KeysValues = tuple[torch.Tensor, torch.Tensor]


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

    def keys_values(self, kv: torch.Tensor) -> KeysValues:
        """Keys and values (B, heads, N, head_dim) of ``kv``: what a later pass may reuse."""
        return self._heads(self.key(kv)), self._heads(self.value(kv))

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | KeysValues,
        mask: torch.Tensor | None,
        prefix: KeysValues | None = None,
        record: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KeysValues]:
        """``kv``: the tokens to attend to, or their :meth:`keys_values` computed once for several passes.
        ``prefix``: keys/values of earlier positions put before this pass's own (BLIP-2's ITG text attends
        to the query pass's). ``record``: also return this pass's own keys/values."""
        own = kv if isinstance(kv, tuple) else self.keys_values(kv)
        k, v = own
        if prefix is not None:
            k, v = torch.cat((prefix[0], k), dim=2), torch.cat((prefix[1], v), dim=2)
        out = F.scaled_dot_product_attention(
            self._heads(self.query(x)), k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(*x.shape[:2], self.num_heads * self.head_dim)  # explicit: 0 queries work
        return (out, own) if record else out


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

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | KeysValues | None = None,
        mask: torch.Tensor | None = None,
        prefix: KeysValues | None = None,
        record: bool = False,
    ):
        """``record=True`` returns (output, this pass's keys/values); see :class:`QFormerAttentionCore`."""
        out = self.attention(x, x if kv is None else kv, mask, prefix, record)
        if record:
            return self.output(out[0], x), out[1]
        return self.output(out, x)


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
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        image_tokens: torch.Tensor | KeysValues | None,
        num_queries: int,
        prefix: KeysValues | None = None,
        record: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KeysValues]:
        """``image_tokens`` may be this layer's cross-attention keys/values; ``prefix`` / ``record``: the
        self-attention's (:class:`QFormerAttentionCore`); ``record`` returns (hidden, keys/values)."""
        hidden = self.attention(hidden, mask=self_mask, prefix=prefix, record=record)
        if record:
            hidden, own = hidden
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        if self.has_cross_attention and num_queries > 0:  # a text-only pass has no image to attend to
            queries = self.crossattention(queries, kv=image_tokens)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] > 0:
            queries = torch.cat((queries, self.output(self.intermediate(text), text)), dim=1)
        return (queries, own) if record else queries


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
        image_kv: Sequence[KeysValues | None] | None = None,
        record: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KeysValues]]:
        """The whole last-layer sequence [queries ; instruction] (B, Q + L, hidden).

        With zero queries (``queries`` of shape (B, 0, hidden)) the text path is a plain BERT encoder
        (``image_tokens`` may then be None): BLIP-2's unimodal text pass, and how a BERT initialisation
        is checked. ``causal=True`` is BLIP-2's multimodal causal mask (its ITG loss): queries see the
        queries only, each text token sees every query and the text up to itself.

        ``image_kv`` (from :meth:`image_keys_values`) replaces ``image_tokens``: the image's
        cross-attention keys/values computed once for several passes. ``record=True`` also returns every
        layer's self-attention keys/values (what :meth:`forward_text_after_queries` reuses).
        """
        if not self.config.instruction_aware:
            input_ids, attention_mask = None, None
        hidden = self.embed(queries, input_ids)
        num_queries = queries.shape[1]
        if image_tokens is None and image_kv is None and num_queries > 0:
            raise ValueError("the queries cross-attend to the image: pass image_tokens")
        self_mask = None
        if input_ids is not None and (attention_mask is not None or causal):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            self_mask = _self_attention_mask(attention_mask, num_queries, 0, causal, hidden.dtype)
        if image_kv is None:
            image_tokens = image_tokens.to(hidden.dtype) if image_tokens is not None else None
            image_kv = [image_tokens] * len(self.encoder.layer)
        return self._run_layers(hidden, self_mask, image_kv, num_queries, None, record)

    def _run_layers(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        image: Sequence[torch.Tensor | KeysValues | None],
        num_queries: int,
        prefix: Sequence[KeysValues] | None,
        record: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KeysValues]]:
        recorded: list[KeysValues] = []
        for i, layer in enumerate(self.encoder.layer):
            args = (hidden, self_mask, image[i], num_queries, None if prefix is None else prefix[i], record)
            if self.gradient_checkpointing and self.training and hidden.requires_grad:
                out = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                out = layer(*args)
            if record:
                hidden, own = out
                recorded.append(own)
            else:
                hidden = out
        return (hidden, recorded) if record else hidden

    def image_keys_values(self, image_tokens: torch.Tensor) -> list[KeysValues | None]:
        """Every cross-attention layer's keys/values of ``image_tokens`` (None for the other layers).

        Passes over the same images (BLIP-2's ITC, ITM and ITG) can share them instead of projecting
        the image tokens again in each pass; rows are selected by indexing both tensors.
        """
        dtype = self.embeddings.layernorm(self.embeddings.layernorm.weight.new_zeros(1, self.config.hidden_size)).dtype
        image_tokens = image_tokens.to(dtype)
        return [
            layer.crossattention.attention.keys_values(image_tokens) if layer.has_cross_attention else None
            for layer in self.encoder.layer
        ]

    def forward_text_after_queries(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, query_kv: Sequence[KeysValues]
    ) -> torch.Tensor:
        """The text rows (B, L, hidden) of a ``causal=True`` pass, given the query pass's recorded keys/values.

        Under the multimodal causal mask the queries never see the text, so their states are those of
        the query-only pass; reusing its self-attention keys/values (``forward_hidden(..., record=True)``,
        LAVIS's ``past_key_values``) leaves only the text to compute, and no cross-attention.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        num_queries = query_kv[0][0].shape[2]
        empty = self.embeddings.layernorm.weight.new_zeros(input_ids.shape[0], 0, self.config.hidden_size)
        hidden = self.embed(empty, input_ids)
        self_mask = _self_attention_mask(attention_mask, num_queries, num_queries, True, hidden.dtype)
        return self._run_layers(hidden, self_mask, [None] * len(self.encoder.layer), 0, query_kv, False)


def select_kv_rows(layers: Sequence[KeysValues | None], rows: torch.Tensor) -> list[KeysValues | None]:
    """The batch rows ``rows`` of every layer's keys/values (e.g. of :meth:`QFormer.image_keys_values`)."""
    return [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in layers]


def cat_kv_rows(first: Sequence[KeysValues | None], then: Sequence[KeysValues | None]) -> list[KeysValues | None]:
    """Every layer's keys/values of ``first``'s rows followed by ``then``'s."""
    return [None if a is None else (torch.cat((a[0], b[0])), torch.cat((a[1], b[1]))) for a, b in zip(first, then)]


def _self_attention_mask(
    attention_mask: torch.Tensor, num_queries: int, first_row: int, causal: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Additive self-attention mask over the keys [queries ; text] for the rows ``first_row`` onwards.

    Padding keys are never seen; with ``causal`` (BLIP-2's ITG) queries see the queries only and each
    text token every query and the text up to itself. Shape (B, 1, 1, keys), or (B, 1, rows, keys) when causal.
    """
    keep = torch.cat((attention_mask.new_ones(attention_mask.shape[0], num_queries), attention_mask), 1)
    keep = keep.bool()[:, None, None, :]
    if causal:
        keys = torch.arange(keep.shape[-1], device=keep.device)
        rows = keys[first_row:]
        sees = (keys[None, :] <= rows[:, None]) & (rows[:, None] >= num_queries)  # text: earlier text
        sees |= keys[None, :] < num_queries  # everyone sees the queries
        keep = keep & sees
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)
