"""BLIP-2 pre-training models: stage 1 (Q-Former with ITC/ITM/ITG) and the stage-2 pieces.

Stage 1 (:class:`Blip2Stage1`) aligns the Q-Former with a frozen image encoder; its Q-Former has the text
path (word/position embeddings, text feed-forward: ``QFormerConfig(instruction_aware=True)``, which in
stage 1 means "has a text side", not "reads instructions"). Stage 2 IS InstructBLIP's architecture with a
BLIP-2 Q-Former (``instruction_aware=False``): :func:`build_stage2` makes one, :func:`caption_lm_batch`
and :func:`prefix_lm_batch` make its decoder-only and FlanT5 (prefix LM) training batches for
``InstructBLIP.forward``. :func:`init_from_blip2` carries a stage-1 or stage-2 result into the next stage
or into an instruction-tuned InstructBLIP.

Plain ``nn.Module`` code; the transformers folder formats are in ``blip2_transformers_io`` (which the
models here call, never the reverse); :func:`load_blip2` reads either kind of folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ibkit.models import blip2_transformers_io, transformers_io
from ibkit.models import qformer as qformer_lib
from ibkit.models.blip2_losses import (
    ContrastiveOutput,
    distributed_world,
    gather_rows,
    itc_loss,
    itg_loss,
    itm_loss,
    max_query_similarity,
    negative_exclusion,
    pad_to_global_length,
    same_caption,
    sample_hard_negatives,
)
from ibkit.models.instructblip import InstructBLIP
from ibkit.models.language import LanguageModel
from ibkit.models.qformer import BERT_DEC_TOKEN_ID, QFormer, QFormerConfig, _activation
from ibkit.models.vision.base import VisionEncoder

log = logging.getLogger(__name__)

class Blip2LMHead(nn.Module):
    """BERT's prediction head (LAVIS ``Qformer.cls.predictions``): dense -> act -> LayerNorm -> vocabulary.

    The vocabulary projection is the Q-Former's word embedding matrix (tied, as in LAVIS) unless
    ``tied=False``, which gives the head its own ``decoder`` weight.
    """

    def __init__(self, config: QFormerConfig, tied: bool = True) -> None:
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = _activation(config.hidden_act)
        self.decoder = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.transform.LayerNorm(self.act(self.transform.dense(hidden)))
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return F.linear(x, weight, self.bias)


@dataclass
class Blip2Stage1Output:
    """``loss`` = ``loss_itc + loss_itm + loss_itg`` (LAVIS sums them), each a scalar for this rank's rows.

    ``itc`` holds the similarities (for logging/retrieval) and the gather offsets. ``negative_texts`` /
    ``negative_images`` (B,) are the global batch indices of the hard negatives drawn for each local image /
    text, -1 where the row had no valid negative (that pair is left out of the ITM loss).
    """

    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor
    itc: ContrastiveOutput
    negative_texts: torch.Tensor
    negative_images: torch.Tensor


class Blip2Stage1(nn.Module):
    """BLIP-2 stage 1: frozen image encoder + ``ln_vision`` + Q-Former with the three heads.

    Attribute names follow transformers' ``Blip2ForImageTextRetrieval`` where it has the part
    (``query_tokens``, ``qformer``, ``vision_projection``, ``text_projection``, ``itm_head``) and ibkit's
    InstructBLIP otherwise (``vision_encoder``, ``ln_vision``); ``lm_head`` (ITG) and ``temp`` exist in
    LAVIS only (``Qformer.cls.predictions.*``, ``temp``).

    Text inputs are Q-Former tokenizer output with ``[CLS]`` first (bert-base-uncased + ``[DEC]``):
    ITC and ITM read them as given; ITG replaces the first token by ``dec_token_id``.
    """

    def __init__(
        self,
        vision_encoder: VisionEncoder,
        qformer: QFormerConfig | None = None,
        num_query_tokens: int = 32,
        embed_dim: int = 256,
        ln_vision_eps: float = 1e-5,
        dec_token_id: int = BERT_DEC_TOKEN_ID,
        temperature: float = 0.07,
        temperature_range: tuple[float, float] = (0.001, 0.5),
        itc_label_smoothing: float = 0.1,
        itg_label_smoothing: float = 0.1,
        gather_with_grad: bool = True,
        tie_lm_head: bool = True,
    ) -> None:
        """``gather_with_grad``: in-batch ITC negatives from other ranks carry gradient (False: LAVIS's
        no-grad gather, see :func:`ibkit.models.blip2_losses.itc_loss`). ``itg_label_smoothing`` 0.1 is
        LAVIS's; ``temperature_range`` is the clamp LAVIS applies before every step."""
        super().__init__()
        qformer = qformer or QFormerConfig()
        if not qformer.instruction_aware:
            raise ValueError("stage 1 needs the Q-Former's text side: QFormerConfig(instruction_aware=True)")
        if dec_token_id >= qformer.vocab_size:
            raise ValueError(f"dec_token_id {dec_token_id} is outside the Q-Former vocabulary ({qformer.vocab_size})")
        self.qformer_config = qformer
        self.vision_encoder = vision_encoder
        self.ln_vision = nn.LayerNorm(vision_encoder.width, eps=ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer.hidden_size))
        nn.init.normal_(self.query_tokens, std=qformer.initializer_range)
        self.qformer = QFormer(qformer, encoder_width=vision_encoder.width)
        self.vision_projection = nn.Linear(qformer.hidden_size, embed_dim)
        self.text_projection = nn.Linear(qformer.hidden_size, embed_dim)
        self.itm_head = nn.Linear(qformer.hidden_size, 2)
        self.lm_head = Blip2LMHead(qformer, tied=tie_lm_head)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.temperature_range = temperature_range
        self.dec_token_id = dec_token_id
        self.itc_label_smoothing = itc_label_smoothing
        self.itg_label_smoothing = itg_label_smoothing
        self.gather_with_grad = gather_with_grad
        self.frozen_encoder_chunk: int | None = None  # as InstructBLIP: images per frozen-encoder call
        std = qformer.initializer_range
        for module in (self.vision_projection, self.text_projection, self.itm_head, self.lm_head.transform.dense):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        if self.lm_head.decoder is not None:
            nn.init.normal_(self.lm_head.decoder.weight, std=std)

    # -- bookkeeping ----------------------------------------------------------------------------------
    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def embed_dim(self) -> int:
        return self.vision_projection.out_features

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def clamp_temperature(self) -> None:
        """Keep the temperature in ``temperature_range`` (LAVIS clamps in place before each forward)."""
        with torch.no_grad():
            self.temp.clamp_(*self.temperature_range)

    # -- the pieces (also what retrieval evaluation needs) ----------------------------------------------
    def encode_images(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image tokens after ``ln_vision`` (B, N, Dv); ``image_features`` are cached encoder outputs."""
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or image_features")
            if self.vision_encoder.frozen:
                step = self.frozen_encoder_chunk
                with torch.no_grad():
                    if step and step < pixel_values.shape[0]:
                        image_features = torch.cat([self.vision_encoder(c) for c in pixel_values.split(step)])
                    else:
                        image_features = self.vision_encoder(pixel_values)
            else:
                image_features = self.vision_encoder(pixel_values)
        return self.ln_vision(image_features.to(self.ln_vision.weight.dtype))

    def _queries(self, batch: int) -> torch.Tensor:
        return self.query_tokens.expand(batch, -1, -1)

    def query_outputs(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Unimodal query pass (queries and image only): (B, Q, hidden)."""
        return self.qformer(self._queries(image_tokens.shape[0]), image_tokens)

    def text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unimodal text pass (no queries, no image): (B, L, hidden)."""
        empty = self.query_tokens.new_zeros(input_ids.shape[0], 0, self.query_tokens.shape[-1])
        return self.qformer.forward_hidden(empty, None, input_ids, attention_mask)

    def image_embeds(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected query outputs (B, Q, embed_dim): ITC's image side."""
        return F.normalize(self.vision_projection(self.query_outputs(image_tokens)), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised projected [CLS] output (B, embed_dim): ITC's text side."""
        return F.normalize(self.text_projection(self.text_outputs(input_ids, attention_mask)[:, 0]), dim=-1)

    def itm_logits(
        self,
        image_tokens: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_kv: list[qformer_lib.KeysValues | None] | None = None,
    ) -> torch.Tensor:
        """2-way matching logits (B, 2) of pairs (image i, text i): bidirectional queries + text, head on
        every query output, averaged over the queries. Column 1 is "match". ``image_kv`` (the Q-Former's
        ``image_keys_values`` of the B images) may stand for ``image_tokens``."""
        hidden = self.qformer.forward_hidden(self._queries(input_ids.shape[0]), image_tokens, input_ids,
                                             attention_mask, image_kv=image_kv, queries_only=True)
        return self.itm_head(hidden).mean(dim=1)

    def itg_logits(
        self, image_tokens: torch.Tensor, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vocabulary logits (B, L, V) at the text positions under the multimodal causal mask."""
        queries = self._queries(image_tokens.shape[0])
        hidden = self.qformer.forward_hidden(queries, image_tokens, decoder_input_ids, attention_mask, causal=True)
        return self.lm_head(hidden[:, queries.shape[1] :], self.qformer.embeddings.word_embeddings.weight)

    def decoder_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITG inputs and labels: ``[DEC]`` replaces the first token; padding labels are -100."""
        ids = input_ids.clone()
        ids[:, 0] = self.dec_token_id
        return ids, ids.masked_fill(attention_mask == 0, -100)

    @torch.no_grad()
    def similarity(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITC cosine similarities (images x texts), max over queries, no temperature (transformers'
        ``Blip2ForImageTextRetrieval(..., use_image_text_matching_head=False).logits_per_image``)."""
        tokens = self.encode_images(pixel_values, image_features)
        return max_query_similarity(self.image_embeds(tokens), self.text_embeds(input_ids, attention_mask))

    @torch.no_grad()
    def match(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM logits (B, 2) for pairs (image i, text i) (transformers' ``use_image_text_matching_head=True``)."""
        return self.itm_logits(self.encode_images(pixel_values, image_features), input_ids, attention_mask)

    # -- training ---------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Blip2Stage1Output:
        """The three BLIP-2 stage-1 losses for a batch of B (image, caption) pairs on this rank.

        ``image_ids`` (B,) mark pairs that show the same image (several captions per image): such pairs
        are never hard negatives of each other; without them only the pair itself is excluded. Pairs
        with token-identical captions are always excluded. ``generator`` drives the hard-negative draws.

        What happens on every rank (all ranks must call forward, as in any DDP step):
        ITC against all ranks' pairs (:func:`itc_loss`); ITM on B positives, B (image, hard-negative
        text) and B (hard-negative image, text) pairs, the negatives drawn from all ranks' pairs (the
        negative images' tokens gathered with gradient, as LAVIS); ITG on the B captions.

        No pass repeats another's work (as LAVIS): image cross-attention keys/values are computed once for
        ITC, ITM and ITG; ITG's text attends to the ITC queries' states (LAVIS's past_key_values), in one
        Q-Former pass with ITC's query and text rows (fewer, larger ops; same values).
        """
        if input_ids is None:
            raise ValueError("stage 1 needs captions (input_ids)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.clamp_temperature()
        tokens = self.encode_images(pixel_values, image_features)
        batch = tokens.shape[0]
        image_kv = self.qformer.image_keys_values(tokens)

        # ITC's query and text passes and ITG's pass in one (QFormer.forward_itc_itg: a block mask)
        dec_ids, dec_labels = self.decoder_inputs(input_ids, attention_mask)
        query_hidden, dec_hidden, text_hidden = self.qformer.forward_itc_itg(self._queries(batch), image_kv,
                                                                             input_ids, dec_ids, attention_mask)
        image_feats = F.normalize(self.vision_projection(query_hidden), dim=-1)
        text_feats = F.normalize(self.text_projection(text_hidden[:, 0]), dim=-1)
        itc = itc_loss(image_feats, text_feats, self.temp, self.itc_label_smoothing, self.gather_with_grad)

        # ITM: hard negatives from all ranks
        pad_id = self.qformer_config.pad_token_id
        ids_pad, mask_pad = pad_to_global_length(input_ids, attention_mask, pad_id)
        ids_all, _ = gather_rows(ids_pad, with_grad=False)
        mask_all, _ = gather_rows(mask_pad, with_grad=False)
        ids_all_img = None
        if image_ids is not None:
            ids_all_img, _ = gather_rows(image_ids, with_grad=False)
        exclude = negative_exclusion(
            itc.offset, batch, itc.global_rows, image_ids, ids_all_img, same_caption(ids_pad, mask_pad, ids_all, mask_all)
        )
        neg_text, text_ok = sample_hard_negatives(itc.sim_i2t, exclude, generator)  # a text for each image
        neg_image, image_ok = sample_hard_negatives(itc.sim_t2i, exclude, generator)  # an image for each text
        if not (text_ok.all() and image_ok.all()):
            log.debug("ITM: %d images and %d texts have no valid negative: their negative pairs are left out",
                      int((~text_ok).sum()), int((~image_ok).sum()))
        itm_ids = torch.cat((ids_pad, ids_all[neg_text][text_ok], ids_pad[image_ok]))
        itm_mask = torch.cat((mask_pad, mask_all[neg_text][text_ok], mask_pad[image_ok]))
        local = torch.arange(batch, device=tokens.device)
        if distributed_world()[1] == 1:  # every negative image is a local one
            itm_kv = qformer_lib.select_kv_rows(image_kv, torch.cat((local, local[text_ok], neg_image[image_ok])))
        else:  # other ranks' images: their tokens with gradient, projected here
            tokens_all, _ = gather_rows(tokens, with_grad=True)
            negative_kv = self.qformer.image_keys_values(tokens_all[neg_image][image_ok])
            own = qformer_lib.select_kv_rows(image_kv, torch.cat((local, local[text_ok])))
            itm_kv = qformer_lib.cat_kv_rows(own, negative_kv)
        negatives = int(text_ok.sum()) + int(image_ok.sum())
        labels = torch.cat((torch.ones(batch, dtype=torch.long), torch.zeros(negatives, dtype=torch.long)))
        loss_itm = itm_loss(self.itm_logits(None, itm_ids, itm_mask, image_kv=itm_kv), labels.to(tokens.device))

        # ITG: captioning under the multimodal causal mask (its states came with ITC's)
        logits = self.lm_head(dec_hidden, self.qformer.embeddings.word_embeddings.weight)
        loss_itg = itg_loss(logits, dec_labels, self.itg_label_smoothing)

        return Blip2Stage1Output(
            loss=itc.loss + loss_itm + loss_itg,
            loss_itc=itc.loss,
            loss_itm=loss_itm,
            loss_itg=loss_itg,
            itc=itc,
            negative_texts=neg_text.masked_fill(~text_ok, -1),
            negative_images=neg_image.masked_fill(~image_ok, -1),
        )

    # -- captioning with the Q-Former (stage-1 validation) -----------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int = 30,
        eos_token_id: int = 102,
    ) -> torch.Tensor:
        """Greedy ITG captions (B, <= max_new_tokens) after ``[DEC]``; rows that ended are padded with
        ``pad_token_id``. ``eos_token_id`` 102 is bert-base-uncased's ``[SEP]`` (LAVIS stops there).
        Recomputes the whole sequence per step (no cache): meant for small validation sets."""
        tokens = self.encode_images(pixel_values, image_features)
        pad = self.qformer_config.pad_token_id
        ids = torch.full((tokens.shape[0], 1), self.dec_token_id, dtype=torch.long, device=tokens.device)
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            nxt = self.itg_logits(tokens, ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            done |= nxt == eos_token_id
            if done.all():
                break
        return ids[:, 1:]

    # -- persistence (transformers Blip2ForImageTextRetrieval folders) ----------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Blip2Stage1:
        """Load a transformers ``Blip2ForImageTextRetrieval`` folder (or one saved by :meth:`save_pretrained`)."""
        return blip2_transformers_io.load_blip2_retrieval(cls, path, **kwargs)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a folder that transformers' ``Blip2ForImageTextRetrieval`` loads as is (ITG head and
        temperature in a side file that only ibkit reads)."""
        return blip2_transformers_io.save_blip2_retrieval(self, path)


def load_blip2(path: str | Path, **kwargs: Any) -> Blip2Stage1 | InstructBLIP:
    """Either BLIP-2 folder kind, by its ``architectures`` (hub ids are resolved first): a retrieval folder
    gives a :class:`Blip2Stage1`, a generation folder a BLIP-2-mode :class:`InstructBLIP`."""
    directory = transformers_io._resolve(path)
    if blip2_transformers_io.blip2_architecture(directory) == blip2_transformers_io.RETRIEVAL:
        return Blip2Stage1.from_pretrained(directory, **kwargs)
    return blip2_transformers_io.load_blip2_generation(directory, **kwargs)


# -- stage 2 ------------------------------------------------------------------------------------------
def build_stage2(
    vision_encoder: VisionEncoder,
    language_model: LanguageModel,
    qformer: QFormerConfig | None = None,
    num_query_tokens: int = 32,
    ln_vision_eps: float = 1e-5,
) -> InstructBLIP:
    """BLIP-2 stage 2: InstructBLIP with a BLIP-2 Q-Former (no text side); its ``forward`` is the loss."""
    qformer = QFormerConfig(**{**(qformer or QFormerConfig()).__dict__, "instruction_aware": False})
    return InstructBLIP(vision_encoder, language_model, qformer, num_query_tokens, ln_vision_eps)


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    longest = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [value] * (longest - len(r)) for r in rows], dtype=torch.long).view(len(rows), longest)


def caption_lm_batch(
    captions: Sequence[Sequence[int]],
    eos_token_id: int,
    pad_token_id: int,
    bos_token_id: int | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Decoder-only stage-2 batch: ``[bos] caption eos`` right-padded, labels on caption and eos.

    ``captions`` are token ids without special tokens; ``max_length`` truncates the caption (eos kept).
    The BOS label is -100: LAVIS's OPT code also trains the last visual position to predict BOS,
    which carries no information about the image. Feed the dict to ``InstructBLIP.forward``.
    """
    rows, labels = [], []
    for cap in captions:
        cap = list(cap)[: max_length - 1 if max_length else None]
        head = [bos_token_id] if bos_token_id is not None else []
        rows.append(head + cap + [eos_token_id])
        labels.append([-100] * len(head) + cap + [eos_token_id])
    ids = _pad(rows, pad_token_id)
    mask = _pad([[1] * len(r) for r in rows], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": _pad(labels, -100)}


def prefix_lm_batch(
    captions: Sequence[Sequence[int]],
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    max_prefix_length: int | None = None,
    max_target_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """FlanT5 stage-2 batch, BLIP-2's prefix language modelling.

    Each caption (token ids, no special tokens) is split after a number of tokens drawn uniformly from
    0 .. len - 1 with ``generator``: the prefix (+ eos, as T5's tokenizer ends every text) goes with the
    visual prompt into the encoder (``input_ids``), the rest (+ eos) is the decoder's target (``labels``,
    -100 on padding; ``decoder_attention_mask``). A split at 0 is plain captioning; the target is never
    empty. ``max_prefix_length`` keeps the prefix's LAST tokens (next to the split), ``max_target_length``
    the target's first ones (eos kept in both).
    """
    inputs, targets = [], []
    for cap in captions:
        cap = list(cap)
        cut = int(torch.randint(0, max(len(cap), 1), (1,), generator=generator)) if cap else 0
        prefix, target = cap[:cut], cap[cut:]
        if max_prefix_length is not None:
            prefix = prefix[max(0, len(prefix) - (max_prefix_length - 1)) :]
        if max_target_length is not None:
            target = target[: max_target_length - 1]
        inputs.append(prefix + [eos_token_id])
        targets.append(target + [eos_token_id])
    return {
        "input_ids": _pad(inputs, pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in inputs], 0),
        "labels": _pad(targets, -100),
        "decoder_attention_mask": _pad([[1] * len(r) for r in targets], 0),
    }


# -- carrying weights to the next stage ---------------------------------------------------------------
#: what a BLIP-2 result hands on: the Q-Former (+ its text side when both have one), queries, ln_vision,
#: and, from stage 2, the LLM projection
HANDED_ON = ("query_tokens", "ln_vision.", "qformer.", "language_projection.")


@dataclass
class InitReport:
    """Which target tensors came from the BLIP-2 source, which kept their own values and why."""

    copied: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def init_from_blip2(
    target: InstructBLIP | Blip2Stage1,
    source: Blip2Stage1 | InstructBLIP | dict[str, torch.Tensor],
    vision: bool = False,
    projection: bool = True,
) -> InitReport:
    """Copy a BLIP-2 result into ``target`` in place (names are shared, so this is a name match).

    - stage 1 -> stage 2 (``build_stage2``): Q-Former query side, queries, ``ln_vision``;
    - stage 1 -> InstructBLIP (instruction-aware): the same plus the text embeddings and text FFNs, which
      become the instruction path;
    - stage 2 -> InstructBLIP: Q-Former query side, queries, ``ln_vision`` and the LLM projection (when
      ``projection`` and the widths match); the instruction path keeps the target's values (e.g. BERT's);
    - a state dict in ibkit names (e.g. an ibkit checkpoint's model weights) works as a source too.

    ``vision=True`` also copies the image encoder (same architecture required). Shape mismatches are
    kept and reported, never silently broadcast.
    """
    state = source if isinstance(source, dict) else source.state_dict()
    prefixes = HANDED_ON if projection else HANDED_ON[:-1]
    if vision:
        prefixes = (*prefixes, "vision_encoder.")
    report = InitReport()
    updates = {}
    for name, value in target.state_dict().items():
        if not name.startswith(prefixes):
            continue
        if name not in state:
            report.kept[name] = "not in the source"
        elif state[name].shape != value.shape:
            report.kept[name] = f"shape {tuple(state[name].shape)} in the source, {tuple(value.shape)} here"
        else:
            updates[name] = state[name]
            report.copied.append(name)
    target.load_state_dict(updates, strict=False)
    log.info("BLIP-2 init: %d tensors copied, %d kept (%s)", len(report.copied), len(report.kept),
             sorted({reason for reason in report.kept.values()}) or "none")
    return report
