"""Collation: a list of prepared samples -> the keyword arguments of ``ibkit.InstructBLIP``.

Model convention (LAVIS): ``input_ids`` carry no image placeholder tokens; the model puts the 32
visual vectors in front of them itself. Both prompts are truncated on the left (the end of an
instruction, where the question is, matters most); targets are truncated on the right.

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

IGNORE_INDEX = -100
COLLATE_MODES = ("train", "generate")
_PROBE_TEXT = "hello world"


def _encode_plain(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without any special tokens."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def special_token_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after a text (BERT: [CLS] / [SEP], T5: - / </s>).

    Found by tokenizing a probe with and without special tokens, so any tokenizer works without
    knowing its class; truncation is then done here (on the content only, keeping the specials),
    without touching the tokenizer's own truncation settings.
    """
    plain = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE_TEXT, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    raise ValueError(
        f"{type(tokenizer).__name__}: cannot locate the text inside its special tokens "
        f"(with: {full}, without: {plain}); collation needs add_special_tokens to only add a prefix/suffix"
    )


def _pad_id(tokenizer: Any, role: str, allow_eos: bool) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if allow_eos and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        f"the {role} tokenizer ({type(tokenizer).__name__}) has no pad token; set one "
        "(e.g. tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and resize the embeddings)"
    )


def _pad(rows: list[list[int]], pad_value: int, left: bool) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if left:
            out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        else:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _mask(rows: list[list[int]], left: bool) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left)


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
        max_prompt_len: int = 128,
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
            if limit <= len(frame):
                raise ValueError(
                    f"{name}={limit} leaves no room for text next to {len(frame)} special token(s)"
                )
        if max_target_len < 2:
            raise ValueError(f"max_target_len must be >= 2 (one token + EOS), got {max_target_len}")
        self.qformer_pad_id = _pad_id(qformer_tokenizer, "Q-Former", allow_eos=False)
        self.llm_pad_id = _pad_id(llm_tokenizer, "LLM", allow_eos=not is_encoder_decoder)
        if llm_tokenizer.eos_token_id is None and mode == "train":
            raise ValueError(
                f"the LLM tokenizer ({type(llm_tokenizer).__name__}) has no EOS token to end targets"
            )
        self.eos_id = llm_tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------------ text
    @staticmethod
    def _frame_left_truncated(
        contents: list[list[int]], prefix: list[int], suffix: list[int], limit: int
    ) -> list[list[int]]:
        room = limit - len(prefix) - len(suffix)
        return [
            prefix + ids[len(ids) - room :] + suffix if len(ids) > room else prefix + ids + suffix
            for ids in contents
        ]

    def _targets(self, targets: list[str]) -> list[list[int]]:
        contents = _encode_plain(self.llm_tokenizer, targets)
        return [ids[: self.max_target_len - 1] + [self.eos_id] for ids in contents]

    def tokenize_qformer(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._frame_left_truncated(
            _encode_plain(self.qformer_tokenizer, instructions),
            self.qformer_prefix,
            self.qformer_suffix,
            self.max_qformer_len,
        )
        return _pad(rows, self.qformer_pad_id, left=False), _mask(rows, left=False)

    def tokenize_llm(self, instructions: list[str], targets: list[str] | None) -> dict[str, torch.Tensor]:
        prompts = self._frame_left_truncated(
            _encode_plain(self.llm_tokenizer, instructions),
            self.llm_prefix,
            self.llm_suffix,
            self.max_prompt_len,
        )
        if targets is None:  # generate mode
            left = not self.is_encoder_decoder
            return {"input_ids": _pad(prompts, self.llm_pad_id, left), "attention_mask": _mask(prompts, left)}
        target_ids = self._targets(targets)
        if self.is_encoder_decoder:
            return {
                "input_ids": _pad(prompts, self.llm_pad_id, left=False),
                "attention_mask": _mask(prompts, left=False),
                "labels": _pad(target_ids, IGNORE_INDEX, left=False),
            }
        rows = [p + t for p, t in zip(prompts, target_ids)]
        labels = [[IGNORE_INDEX] * len(p) + t for p, t in zip(prompts, target_ids)]
        return {
            "input_ids": _pad(rows, self.llm_pad_id, left=False),
            "attention_mask": _mask(rows, left=False),
            "labels": _pad(labels, IGNORE_INDEX, left=False),
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
        batch["qformer_input_ids"], batch["qformer_attention_mask"] = self.tokenize_qformer(
            batch["instructions"]
        )
        batch.update(self.tokenize_llm(batch["instructions"], targets))
        return batch

    @staticmethod
    def _stack_pixels(items: list[dict[str, Any]]) -> torch.Tensor:
        shapes = {tuple(item["pixel_values"].shape) for item in items}
        if len(shapes) > 1:
            where = {
                f"{item['dataset']}/{item['sample_id']}": tuple(item["pixel_values"].shape) for item in items
            }
            raise ValueError(f"cannot batch inputs of different shapes (mixing images and videos?): {where}")
        return torch.stack([item["pixel_values"] for item in items])
