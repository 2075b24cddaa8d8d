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

from ibkit.models.dropout import Dropout, dropout

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

    def _self_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, KeysValues]:
        """Queries, keys and values of ``x`` in one matmul (the three weights concatenated per call):
        one autocast copy of ``x`` and one larger GEMM instead of three (the Q-Former is narrow, so its
        steps are bound by the number of ops, not their FLOPs). Projections wrapped by an adapter (LoRA)
        are called one by one, so the adapter's update is applied."""
        if not all(type(p) is nn.Linear for p in (self.query, self.key, self.value)):
            return self._heads(self.query(x)), (self._heads(self.key(x)), self._heads(self.value(x)))
        weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))
        bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))
        q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)
        return self._heads(q), (self._heads(k), self._heads(v))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Scaled-dot-product attention. Training on CPU (autograd on) computes it as matmul, softmax,
        dropout, matmul: SDPA has no fused CPU kernel with dropout and falls back to the same math with
        extra ops (mask casts, a fully-masked-row check), about 1.4x slower for the Q-Former's shapes.
        Without dropout, under bf16 autocast with autograd, SDPA is slower too (a training step of the
        bench's "small" Q-Former without dropout: 88 ms with SDPA, 66 ms explicit; in fp32 both 72-75 ms;
        2-core Xeon VM). Inference, fp32 training without dropout and every GPU keep SDPA."""
        p = self.dropout if self.training else 0.0
        explicit = p > 0.0 or (torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"))
        if q.device.type != "cpu" or not explicit:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(-2, -1))
        if mask is not None:  # in the scores' dtype, as SDPA does (no row is fully masked: no NaN)
            scores = scores + mask.to(scores.dtype)
        return torch.matmul(dropout(scores.softmax(-1), p), v)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | KeysValues,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``kv``: the tokens to attend to (``x`` itself: self-attention), or their :meth:`keys_values`
        computed once for several passes."""
        if kv is x:
            q, (k, v) = self._self_projections(x)
        else:
            q, (k, v) = self._heads(self.query(x)), kv if isinstance(kv, tuple) else self.keys_values(kv)
        out = self._attend(q, k, v, mask)
        return out.transpose(1, 2).reshape(*x.shape[:2], self.num_heads * self.head_dim)  # explicit: 0 queries work


class QFormerResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual), the BERT output sub-layer."""

    def __init__(self, cfg: QFormerConfig, in_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # noqa: N815 (checkpoint name)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

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
    ) -> torch.Tensor:
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
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        image_tokens: torch.Tensor | KeysValues | None,
        num_queries: int,
        text_rows: int | None = None,
    ) -> torch.Tensor:
        """``image_tokens`` may be this layer's cross-attention keys/values. ``text_rows`` keeps only the
        first so many text positions (0: the queries only), skipping the feed-forward of the others (a last
        layer whose outputs there nobody reads)."""
        hidden = self.attention(hidden, mask=self_mask)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        if self.has_cross_attention and num_queries > 0:  # a text-only pass has no image to attend to
            queries = self.crossattention(queries, kv=image_tokens)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text_rows is not None:
            text = text[:, :text_rows]
        if text.shape[1] > 0:
            queries = torch.cat((queries, self.output(self.intermediate(text), text)), dim=1)
        return queries


class QFormerEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)


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
            self.embeddings.dropout = Dropout(config.hidden_dropout_prob)
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

    def _check_length(self, length: int) -> None:
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"instruction of {length} tokens exceeds the Q-Former's {self.config.max_position_embeddings} "
                "positions: truncate it (the collator's max_qformer_len)"
            )

    def embed(
        self, queries: torch.Tensor, input_ids: torch.Tensor | None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """LayerNorm(dropout) of [queries ; text embeddings]; ``positions`` (L,): the text's position ids
        (default 0 .. L-1; several texts side by side each count from 0: their caller checks each length)."""
        emb = self.embeddings
        if input_ids is not None and input_ids.shape[1] > 0:
            if not self.config.instruction_aware:
                raise ValueError("this Q-Former is in BLIP-2 mode (instruction_aware=False): it takes no text")
            if positions is None:
                self._check_length(input_ids.shape[1])
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
        """Return the ``num_queries`` output vectors (B, Q, hidden) of the last layer.

        Without autograd (generation, evaluation, feature extraction) the last layer's text feed-forward,
        which the queries do not read, is skipped. With autograd it runs, as in LAVIS and transformers: its
        parameters then get zero gradients, so DDP finds every trainable parameter in the graph and AdamW's
        weight decay treats them as before."""
        skip = not torch.is_grad_enabled()
        return self.forward_hidden(queries, image_tokens, input_ids, attention_mask, queries_only=skip)[
            :, : queries.shape[1]
        ]

    def forward_hidden(
        self,
        queries: torch.Tensor,
        image_tokens: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        causal: bool = False,
        image_kv: Sequence[KeysValues | None] | None = None,
        queries_only: bool = False,
    ) -> torch.Tensor:
        """The whole last-layer sequence [queries ; instruction] (B, Q + L, hidden).

        With zero queries (``queries`` of shape (B, 0, hidden)) the text path is a plain BERT encoder
        (``image_tokens`` may then be None): BLIP-2's unimodal text pass, and how a BERT initialisation
        is checked. ``causal=True`` is BLIP-2's multimodal causal mask (its ITG loss): queries see the
        queries only, each text token sees every query and the text up to itself.

        ``image_kv`` (from :meth:`image_keys_values`) replaces ``image_tokens``: the image's
        cross-attention keys/values computed once for several passes. ``queries_only=True`` returns the
        query outputs (B, Q, hidden) and skips the last layer's text feed-forward, which they do not read.
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
        return self._run_layers(hidden, self_mask, image_kv, num_queries, 0 if queries_only and num_queries else None)

    def _run_layers(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        image: Sequence[torch.Tensor | KeysValues | None],
        num_queries: int,
        last_text_rows: int | None = None,
    ) -> torch.Tensor:
        """The layers; the last one keeps ``last_text_rows`` text positions (None: all)."""
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            args = (hidden, self_mask, image[i], num_queries, last_text_rows if i == last else None)
            if self.gradient_checkpointing and self.training and hidden.requires_grad:
                hidden = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden = layer(*args)
        return hidden

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

    def forward_itc_itg(
        self,
        queries: torch.Tensor,
        image_kv: Sequence[KeysValues | None],
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BLIP-2's ITC query pass, ITC text pass and ITG pass as one pass over [queries ; ITG text ; text].

        A block mask keeps the three apart: queries see the queries only (so their states are the
        query-only pass's, which ITG reuses as LAVIS does with past_key_values), ITG text sees the queries
        and earlier ITG text, ITC text sees the (non-padding) ITC text only. Same values as three passes,
        but one set of ops with 2x-3x the rows each: the narrow Q-Former's step is bound by its op count.
        Returns (query states (B, Q, H), ITG text states (B, L, H), ITC text [CLS] states (B, 1, H)): the last
        layer skips the feed-forward of the other ITC text positions, which no loss reads.
        """
        length = input_ids.shape[1]
        self._check_length(length)  # two texts side by side, each from position 0
        positions = torch.arange(length, device=input_ids.device).repeat(2)
        hidden = self.embed(queries, torch.cat((decoder_input_ids, input_ids), 1), positions)
        num_queries = queries.shape[1]
        mask = _itc_itg_mask(attention_mask, num_queries, hidden.dtype)
        hidden = self._run_layers(hidden, mask, image_kv, num_queries, length + 1)  # ITC reads the text's [CLS]
        return hidden[:, :num_queries], hidden[:, num_queries : num_queries + length], hidden[:, num_queries + length :]


def select_kv_rows(layers: Sequence[KeysValues | None], rows: torch.Tensor) -> list[KeysValues | None]:
    """The batch rows ``rows`` of every layer's keys/values (e.g. of :meth:`QFormer.image_keys_values`).

    ``index_select``, not ``kv[rows]``: the same values, but its backward is an ``index_add`` where advanced
    indexing's is an accumulating ``index_put`` (on the CPU ~6x slower for BLIP-2's ITM rows)."""
    return [None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows)) for kv in layers]


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


def _itc_itg_mask(attention_mask: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, T, T) mask of :meth:`QFormer.forward_itc_itg` over [queries ; ITG text ; ITC text]."""
    length = attention_mask.shape[1]
    device = attention_mask.device
    segment = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate((num_queries, length, length))])
    position = torch.arange(segment.shape[0], device=device)
    row, key = segment[:, None], segment[None, :]
    earlier = position[None, :] <= position[:, None]
    sees = (row == key) & ((row != 1) | earlier)  # each part sees itself; ITG text causally
    sees |= (row == 1) & (key == 0)  # ITG text also sees every query
    valid = torch.cat((attention_mask.new_ones(attention_mask.shape[0], num_queries), attention_mask, attention_mask), 1)
    keep = sees[None, None] & valid.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
