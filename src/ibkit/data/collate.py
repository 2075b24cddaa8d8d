"""Collation: a list of prepared samples -> the keyword arguments of ``ibkit.InstructBLIP``.

Model convention (LAVIS): ``input_ids`` carry no image placeholder tokens; the model puts the 32
visual vectors in front of them itself. Both prompts are truncated on the left (the end of an
instruction, where the question is, matters most); targets are truncated on the right. A limit of
``None`` keeps the whole prompt: LAVIS truncates only the Q-Former text at inference, never the LLM
prompt (the datamodule's evaluation default).

Rows per kind of language model:

* encoder-decoder (T5): ``input_ids`` = the prompt with the tokenizer's special tokens (T5: ``</s>``),
  right-padded; ``labels`` = target ids + EOS, padding -100 (the LM builds decoder inputs itself).
* decoder-only (LLaMA, Vicuna, OPT, GPT-2), train: prompt (with the tokenizer's BOS, if it adds one)
  + target (no BOS) + EOS, right-padded; ``labels`` has the same shape, -100 on prompt and padding.
* decoder-only, generate: the prompt only, LEFT-padded (so every row ends at the last column and
  generation continues from there), no labels.

A decoder-only tokenizer without a pad token pads with EOS (padding is masked by ``attention_mask``
and never labelled, so the choice does not matter); other tokenizers without one are an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ibkit.data.tokenize import (
    encode_plain,
    pad_id,
    pad_rows,
    row_mask,
    special_token_frame,
    tokenize_prompts,
)

IGNORE_INDEX = -100
COLLATE_MODES = ("train", "generate")
MODEL_INPUTS = (
    "pixel_values",
    "qformer_input_ids",
    "qformer_attention_mask",
    "input_ids",
    "attention_mask",
    "labels",
    "decoder_input_ids",
    "decoder_attention_mask",
    "image_features",
)


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``InstructBLIP.forward`` that a collated batch carries."""
    return {k: batch[k] for k in MODEL_INPUTS if isinstance(batch.get(k), torch.Tensor)}


def is_empty(batch: dict[str, Any]) -> bool:
    """A batch whose every sample was skipped as bad input carries no tensors."""
    return not isinstance(batch.get("pixel_values"), torch.Tensor) and not isinstance(
        batch.get("image_features"), torch.Tensor
    )


class InstructionCollator:
    """Builds a batch of model inputs from the dicts :class:`ibkit.data.dataset.InstructionDataset` returns.

    Items whose ``pixel_values`` is ``None`` were skipped (bad input); they are dropped, and the skip
    records of all items are passed on under ``skipped`` so that the main process can count them (the
    collator runs inside DataLoader workers). A batch where every item was skipped has no tensors and
    ``sample_ids == []``.
    """

    def __init__(
        self,
        qformer_tokenizer: Any,
        llm_tokenizer: Any,
        is_encoder_decoder: bool,
        mode: str = "train",
        max_qformer_len: int = 128,
        max_prompt_len: int | None = 128,
        max_target_len: int = 256,
    ) -> None:
        if mode not in COLLATE_MODES:
            raise ValueError(f"unknown collate mode {mode!r}; choose one of {COLLATE_MODES}")
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.mode = mode
        self.max_qformer_len = max_qformer_len
        self.max_prompt_len = max_prompt_len
        self.max_target_len = max_target_len
        self.qformer_prefix, self.qformer_suffix = special_token_frame(qformer_tokenizer)
        self.llm_prefix, self.llm_suffix = special_token_frame(llm_tokenizer)
        if not is_encoder_decoder:
            # A prompt that ended in EOS would tell a causal LM to stop; keep only the leading BOS.
            self.llm_suffix = []
        for name, limit, frame in (
            ("max_qformer_len", max_qformer_len, self.qformer_prefix + self.qformer_suffix),
            ("max_prompt_len", max_prompt_len, self.llm_prefix + self.llm_suffix),
        ):
            if limit is not None and limit <= len(frame):
                raise ValueError(
                    f"{name}={limit} leaves no room for text next to {len(frame)} special token(s)"
                )
        if max_target_len < 2:
            raise ValueError(f"max_target_len must be >= 2 (one token + EOS), got {max_target_len}")
        self.qformer_pad_id = pad_id(qformer_tokenizer, "Q-Former", allow_eos=False)
        self.llm_pad_id = pad_id(llm_tokenizer, "LLM", allow_eos=not is_encoder_decoder)
        if llm_tokenizer.eos_token_id is None and mode == "train":
            raise ValueError(
                f"the LLM tokenizer ({type(llm_tokenizer).__name__}) has no EOS token to end targets"
            )
        self.eos_id = llm_tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------------ text
    def _targets(self, targets: list[str]) -> list[list[int]]:
        contents = encode_plain(self.llm_tokenizer, targets)
        return [ids[: self.max_target_len - 1] + [self.eos_id] for ids in contents]

    def tokenize_qformer(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        frame = (self.qformer_prefix, self.qformer_suffix)
        rows = tokenize_prompts(self.qformer_tokenizer, instructions, self.max_qformer_len, frame)
        return pad_rows(rows, self.qformer_pad_id, left=False), row_mask(rows, left=False)

    def tokenize_llm(self, instructions: list[str], targets: list[str] | None) -> dict[str, torch.Tensor]:
        prompts = tokenize_prompts(self.llm_tokenizer, instructions, self.max_prompt_len, (self.llm_prefix, self.llm_suffix))
        if targets is None:  # generate mode
            left = not self.is_encoder_decoder
            return {"input_ids": pad_rows(prompts, self.llm_pad_id, left), "attention_mask": row_mask(prompts, left)}
        target_ids = self._targets(targets)
        if self.is_encoder_decoder:
            return {
                "input_ids": pad_rows(prompts, self.llm_pad_id, left=False),
                "attention_mask": row_mask(prompts, left=False),
                "labels": pad_rows(target_ids, IGNORE_INDEX, left=False),
            }
        rows = [p + t for p, t in zip(prompts, target_ids)]
        labels = [[IGNORE_INDEX] * len(p) + t for p, t in zip(prompts, target_ids)]
        return {
            "input_ids": pad_rows(rows, self.llm_pad_id, left=False),
            "attention_mask": row_mask(rows, left=False),
            "labels": pad_rows(labels, IGNORE_INDEX, left=False),
        }

    # ------------------------------------------------------------------------------------------ batch
    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        skipped = [record for item in items if item for record in item.get("skipped", ())]
        kept = [item for item in items if item and item.get("pixel_values") is not None]
        batch: dict[str, Any] = {
            "sample_ids": [item["sample_id"] for item in kept],
            "datasets": [item["dataset"] for item in kept],
            "instructions": [item["instruction"] for item in kept],
            "targets": [item.get("target") for item in kept],
            "answers": [list(item.get("answers") or []) for item in kept],
            "candidates": [item.get("candidates") for item in kept],
            "labels_idx": [item.get("label") for item in kept],
            "skipped": skipped,
        }
        if not kept:
            return batch
        for item in kept:
            if not isinstance(item.get("instruction"), str):
                raise ValueError(f"{item['dataset']}/{item['sample_id']}: no instruction text to tokenize")
            if not isinstance(item.get("qformer_instruction") or "", str):
                raise ValueError(f"{item['dataset']}/{item['sample_id']}: the Q-Former's instruction should be a "
                                 f"string, got {type(item['qformer_instruction']).__name__}")
        targets = None
        if self.mode == "train":
            missing = [
                f"{item['dataset']}/{item['sample_id']}"
                for item in kept
                if not isinstance(item.get("target"), str)
            ]
            if missing:
                raise ValueError(
                    f"train-mode collation needs a target for every sample; none for {missing[:5]}"
                )
            targets = batch["targets"]
        batch["pixel_values"] = self._stack_pixels(kept)
        # the Q-Former reads a record's own wording where it gives one (Sample.qformer_question), else the LLM's
        batch["qformer_instructions"] = [item.get("qformer_instruction") or item["instruction"] for item in kept]
        batch["qformer_input_ids"], batch["qformer_attention_mask"] = self.tokenize_qformer(
            batch["qformer_instructions"]
        )
        batch.update(self.tokenize_llm(batch["instructions"], targets))
        if self.mode == "generate":
            batch["prompts"] = self.llm_prompt_texts(batch["instructions"])
        return batch

    def llm_prompt_texts(self, instructions: list[str]) -> list[str]:
        """The instruction text the LLM was given: the instruction itself, or, where ``max_prompt_len`` cut
        it, the decoded part that was kept (so prediction records show what was really asked)."""
        if self.max_prompt_len is None:
            return list(instructions)
        room = self.max_prompt_len - len(self.llm_prefix) - len(self.llm_suffix)
        return [
            text if len(ids) <= room else self.llm_tokenizer.decode(ids[len(ids) - room :])
            for text, ids in zip(instructions, encode_plain(self.llm_tokenizer, instructions))
        ]

    @staticmethod
    def _stack_pixels(items: list[dict[str, Any]]) -> torch.Tensor:
        shapes = {tuple(item["pixel_values"].shape) for item in items}
        if len(shapes) > 1:
            where = {
                f"{item['dataset']}/{item['sample_id']}": tuple(item["pixel_values"].shape) for item in items
            }
            raise ValueError(f"cannot batch inputs of different shapes (mixing images and videos?): {where}")
        return torch.stack([item["pixel_values"] for item in items])
