"""Masked-language-model pretraining of a small BERT: the demo's miniature of bert-base-uncased.

BLIP-2 does not start its Q-Former from scratch: the text side (embeddings, self-attention, feed-forward)
comes from bert-base-uncased, and the query feed-forward is a copy of BERT's (LAVIS ``init_Qformer``).
:class:`MaskedLMModule` trains a transformers ``BertForMaskedLM`` on text (BERT's objective: 15% of the
tokens chosen, of them 80% replaced by ``[MASK]``, 10% by a random token, 10% kept) from
:class:`ibkit.data.text.TextDataModule` batches. ``ibkit export`` writes a transformers BERT folder, which
``init_from`` loads into a Q-Former the way it loads bert-base-uncased (:mod:`ibkit.convert.bert_init`),
so the shape of the BERT must match the Q-Former's (layers, widths, heads, activation).

Validation masks each batch with a generator seeded by the batch's index, so every validation reads the
same masked tokens: ``val/loss`` and ``val/acc`` (the masked tokens predicted exactly) compare across steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ibkit.data.collate import IGNORE_INDEX
from ibkit.training.optim import OptimSettings
from ibkit.training.text_lm import TextModule

log = logging.getLogger(__name__)

#: BERT's rule: of the chosen tokens this share becomes [MASK], this share a random token, the rest is kept
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1
MASKED_LM_OPTIM = OptimSettings(lr=5e-4, warmup_start_lr=1e-6, warmup_steps=100, weight_decay=0.01)


def check_masking(probability: float, mask_share: float, random_share: float) -> None:
    """Refuse a masking that is not one: a chosen share outside (0, 1), replacement shares outside [0, 1]."""
    if not 0 < probability < 1:
        raise ValueError(f"mask probability must be in (0, 1), got {probability}")
    if mask_share < 0 or random_share < 0 or mask_share + random_share > 1:
        raise ValueError(f"mask_share {mask_share} and random_share {random_share}: shares of the chosen tokens, "
                         "each >= 0, at most 1 together")


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int], mask_id: int,
                vocab_size: int, probability: float = 0.15, generator: torch.Generator | None = None,
                mask_share: float = MASK_SHARE, random_share: float = RANDOM_SHARE,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a batch: ``(inputs, labels)``. Each real (unpadded, non-special) token is chosen with
    ``probability``; a chosen token becomes ``mask_id`` (``mask_share``, BERT's 80%), a random non-special
    token (``random_share``, 10%) or stays (the rest). ``labels`` hold the original id where chosen, -100 elsewhere. At least one token of the batch is
    chosen whenever it has any (a batch of short texts would otherwise sometimes have no loss at all)."""
    check_masking(probability, mask_share, random_share)
    device = input_ids.device
    specials = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=device)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, specials)
    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    chosen = candidate & (draw < probability)
    if candidate.any() and not chosen.any():
        chosen = candidate & (draw == draw.masked_fill(~candidate, 2.0).min())  # the most likely candidate
    how = torch.rand(input_ids.shape, generator=generator, device=device)
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=device)
    ordinary[specials[specials < vocab_size]] = False
    pool = ordinary.nonzero().squeeze(1)
    random_ids = pool[torch.randint(len(pool), input_ids.shape, generator=generator, device=device)]
    inputs = input_ids.clone()
    inputs[chosen & (how < mask_share)] = mask_id
    swap = chosen & (how >= mask_share) & (how < mask_share + random_share)
    inputs[swap] = random_ids[swap]
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    return inputs, labels


class MaskedLMModule(TextModule):
    """Train a small BERT (transformers ``BertForMaskedLM``) by masked-language modelling on text.

    Args:
        config: ``transformers.BertConfig`` fields (e.g. ``vocab_size``, ``hidden_size``,
            ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings``).
        tokenizer: the tokenizer folder (saved by ``ibkit export`` beside the model); unset, the datamodule's.
        mask_probability: the share of tokens chosen for prediction (BERT: 0.15).
        mask_share / random_share: of the chosen tokens, the share replaced by ``[MASK]`` / by a random token
            (BERT: 0.8 / 0.1; the rest stay as they are).
        optim: AdamW + warm-up/cosine (:data:`MASKED_LM_OPTIM` by default).

    A tokenizer without a ``[MASK]`` token (the demo's word-level one) has ``[UNK]`` play its part: every
    word of the text it was built from has an id, so ``[UNK]`` appears in no training text.
    """

    def __init__(self, config: dict[str, Any], tokenizer: str | None = None, mask_probability: float = 0.15,
                 mask_share: float = MASK_SHARE, random_share: float = RANDOM_SHARE,
                 optim: OptimSettings | None = None) -> None:
        super().__init__(tokenizer, optim or MASKED_LM_OPTIM)
        from transformers import BertConfig, BertForMaskedLM

        check_masking(mask_probability, mask_share, random_share)  # before any step
        self.bert = BertForMaskedLM(BertConfig(**config))
        self.mask_probability, self.mask_share, self.random_share = mask_probability, mask_share, random_share

    checkpoint_name = "masked_lm"

    def configure_model(self) -> None:
        self._connect(self.bert.config.vocab_size, is_encoder_decoder=False, masked=True)

    def _masking_ids(self) -> tuple[list[int], int]:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise RuntimeError("MaskedLMModule: no tokenizer (set tokenizer, or train with a TextDataModule)")
        mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        if mask_id is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has neither [MASK] nor [UNK] to mask with")
        return list(tokenizer.all_special_ids), int(mask_id)

    def _masked_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        specials, mask_id = self._masking_ids()
        inputs, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], specials, mask_id,
                                     self.bert.config.vocab_size, self.mask_probability, generator,
                                     self.mask_share, self.random_share)
        out = self.bert(input_ids=inputs, attention_mask=batch["attention_mask"], labels=labels)
        return out.loss, out.logits, labels

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._masked_loss(batch)
        self._log_training(loss, batch)
        return loss

    # ----------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"loss": 0.0, "right": 0, "tokens": 0}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(batch_idx)
        loss, logits, labels = self._masked_loss(batch, generator)
        chosen = labels != IGNORE_INDEX
        tokens = int(chosen.sum())
        self._val["loss"] += float(loss) * tokens
        self._val["tokens"] += tokens
        self._val["right"] += int((logits.argmax(-1)[chosen] == labels[chosen]).sum())

    def on_validation_epoch_end(self) -> None:
        val = self._val
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, val)
            val = {key: sum(part[key] for part in parts) for key in ("loss", "right", "tokens")}
        if not val.get("tokens"):
            return
        self.log("val/loss", val["loss"] / val["tokens"], sync_dist=False)
        self.log("val/acc", val["right"] / val["tokens"], sync_dist=False)

    # ----------------------------------------------------------------------------------- export
    def save_model(self, output: str | Path, processor: Any = None) -> Path:
        """``ibkit export``: a transformers BERT folder (+ the tokenizer), which ``init_from`` loads into a
        Q-Former as it loads bert-base-uncased."""
        output = Path(output)
        self.bert.save_pretrained(output)
        if processor is not None:
            processor.save_pretrained(output)
        return output
