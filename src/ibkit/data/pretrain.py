"""BLIP-2 pre-training batches: (image, caption) pairs from the same datasets and shards as instruction tuning.

Pre-training reads the registry's caption datasets and img2dataset shards through the datamodule (same
mixture, resume and bad-input handling) and only collates differently: the caption is the text, no
instruction. :class:`CaptionCollator` gives, per batch,

* ``input_ids`` / ``attention_mask``: the caption in the Q-Former's special tokens (``[CLS] caption
  [SEP]``, cut on the right to ``max_target_len``), what stage 1 reads (ITG swaps ``[CLS]`` for ``[DEC]``);
* ``image_ids`` (B,): a stable id of the image file (or shard key), so that two captions of one image are
  never each other's ITM hard negatives;
* ``caption_ids``: the caption's LLM token ids without special tokens (a list per row, when the model has
  an LLM); the stage-2 module turns them into a caption-LM or prefix-LM batch with its per-step generator;
* held-out batches also carry every reference caption (``text_input_ids`` / ``text_attention_mask``, and
  ``text_image`` = the row of the image each one belongs to) for retrieval, and ``answers`` for CIDEr.

:class:`PretrainData` switches an :class:`InstructionDataModule` (or a subclass) to these batches; the
pre-training module hands it the tokenizers through ``connect``, the LLM tokenizer only in stage 2.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from ibkit.data.datamodule import InstructionDataModule
from ibkit.data.tokenize import encode_plain, pad_id, pad_rows, row_mask, special_token_frame


def image_id(item: dict[str, Any]) -> int:
    """A stable 63-bit id of an item's image: its file path, else (dataset, sample id) (shard keys)."""
    key = str(item.get("image") or f"{item.get('dataset')}/{item.get('sample_id')}").encode()
    return ((zlib.adler32(key) << 32) | zlib.crc32(key)) >> 1


class CaptionCollator:
    """Items of :class:`~ibkit.data.dataset.InstructionDataset` / shard datasets -> pre-training batches.

    ``mode="train"``: the item's ``target`` is the caption. ``mode="generate"`` (held-out): the references
    (``answers``) are the texts, the first one stands for the pair. Skipped items are dropped and their
    records passed on under ``skipped``, as :class:`~ibkit.data.collate.InstructionCollator` does.
    """

    def __init__(
        self, qformer_tokenizer: Any, llm_tokenizer: Any | None = None, mode: str = "train", max_target_len: int = 32
    ) -> None:
        if mode not in ("train", "generate"):
            raise ValueError(f"unknown collate mode {mode!r}; choose train or generate")
        self.qformer_tokenizer, self.llm_tokenizer, self.mode = qformer_tokenizer, llm_tokenizer, mode
        self.prefix, self.suffix = special_token_frame(qformer_tokenizer)
        if max_target_len <= len(self.prefix) + len(self.suffix):
            raise ValueError(f"max_target_len={max_target_len} leaves no room for the caption")
        self.max_len = max_target_len
        self.pad_id = pad_id(qformer_tokenizer, "Q-Former", allow_eos=False)

    def qformer_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [SEP]`` rows (right-truncated, right-padded) and their mask."""
        room = self.max_len - len(self.prefix) - len(self.suffix)
        rows = [self.prefix + ids[:room] + self.suffix for ids in encode_plain(self.qformer_tokenizer, list(texts))]
        return pad_rows(rows, self.pad_id, left=False), row_mask(rows, left=False)

    def _captions(self, kept: list[dict[str, Any]]) -> list[str]:
        captions = []
        for item in kept:
            text = item.get("target") if self.mode == "train" else (item.get("answers") or [item.get("target")])[0]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{item.get('dataset')}/{item.get('sample_id')}: no caption to pre-train on")
            captions.append(text)
        return captions

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        skipped = [record for item in items if item for record in item.get("skipped", ())]
        kept = [item for item in items if item and item.get("pixel_values") is not None]
        batch: dict[str, Any] = {
            "sample_ids": [item["sample_id"] for item in kept],
            "datasets": [item["dataset"] for item in kept],
            "answers": [list(item.get("answers") or []) for item in kept],
            "skipped": skipped,
        }
        if not kept:
            return batch
        captions = self._captions(kept)
        batch["captions"] = captions
        batch["pixel_values"] = torch.stack([item["pixel_values"] for item in kept])
        batch["input_ids"], batch["attention_mask"] = self.qformer_text(captions)
        batch["image_ids"] = torch.tensor([image_id(item) for item in kept], dtype=torch.long)
        if self.llm_tokenizer is not None:
            batch["caption_ids"] = [ids[: self.max_len - 1] for ids in encode_plain(self.llm_tokenizer, captions)]
        if self.mode == "generate":
            texts = [(row, ref) for row, refs in enumerate(batch["answers"]) for ref in (refs or [captions[row]])]
            batch["text_input_ids"], batch["text_attention_mask"] = self.qformer_text([t for _, t in texts])
            batch["text_image"] = torch.tensor([row for row, _ in texts], dtype=torch.long)
        return batch


class PretrainData:
    """Mixin: a datamodule whose batches are :class:`CaptionCollator`'s (put it first in the bases).

    ``connect`` takes the model's ``Processor`` as the instruction-tuning datamodule does, except that its
    LLM tokenizer may be None (stage 1 has no LLM); tokenizer folders in the data config still win.
    """

    def connect(self, processor: Any | None, is_encoder_decoder: bool) -> dict[str, Any] | None:
        if self.qformer_tokenizer is None and self.qformer_tokenizer_path is None and processor is not None:
            self.qformer_tokenizer, self.llm_tokenizer = processor.qformer_tokenizer, processor.llm_tokenizer
            self.is_encoder_decoder = bool(is_encoder_decoder)
        elif self.qformer_tokenizer is None:
            if self.is_encoder_decoder is None:
                self.is_encoder_decoder = is_encoder_decoder
            self.ensure_tokenizers()
        return self.text_settings()

    def ensure_tokenizers(self) -> None:
        if self.qformer_tokenizer is not None:
            return
        if self.qformer_tokenizer_path is not None and self.llm_tokenizer_path is None:
            from transformers import AutoTokenizer

            self.qformer_tokenizer = AutoTokenizer.from_pretrained(self.qformer_tokenizer_path)
            return
        super().ensure_tokenizers()

    def text_settings(self) -> dict[str, Any]:
        self.ensure_tokenizers()
        return dict(
            qformer_tokenizer=self.qformer_tokenizer,
            llm_tokenizer=self.llm_tokenizer,
            is_encoder_decoder=bool(self.is_encoder_decoder),
            max_target_len=self.max_lengths["max_target_len"],
        )

    def _collator(self, mode: str) -> CaptionCollator:
        settings = self.text_settings()
        return CaptionCollator(settings["qformer_tokenizer"], settings["llm_tokenizer"], mode, settings["max_target_len"])


class PretrainDataModule(PretrainData, InstructionDataModule):
    """:class:`InstructionDataModule` (registry caption datasets, ``shards``) serving BLIP-2 pre-training
    batches; ``max_target_len`` is the caption length (BLIP-2: 32 tokens)."""
