"""Text-only instruction data: (prompt, target) records -> language-model batches.

For instruction-tuning a language model on its own (the demo's miniature FlanT5), before it is frozen
under a Q-Former. A file is JSON (a list of records, or ``{"records": [...]}``) or JSONL (one record a
line); a record is ``{"prompt": str, "target": str}`` with optional ``id``, ``answers`` (every accepted
answer, for exact-match accuracy; default ``[target]``) and ``kind`` (the instruction kind that accuracy
is reported per). A malformed record is an error naming the file and the record.

Batches follow :mod:`ibkit.data.collate`'s conventions: prompts framed by the tokenizer's special tokens
and cut on the left, targets + EOS cut on the right, labels -100 on padding (and, for a causal LM, on the
prompt). Validation batches also carry the prompt alone (``gen_input_ids``; left-padded for a causal LM)
for greedy answers. For masked-language modelling (:class:`MaskedTextCollator`) a batch is each record's
prompt alone, framed as the tokenizer frames a text (BERT: ``[CLS] ... [SEP]``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from ibkit.data.collate import IGNORE_INDEX
from ibkit.data.tokenize import (
    encode_plain,
    pad_id,
    pad_rows,
    row_mask,
    special_token_frame,
    tokenize_prompts,
)

DEFAULT_KIND = "text"


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be an object with prompt and target, got {type(record).__name__}")
    for name in ("prompt", "target"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {record.get(name)!r}")
    answers = record.get("answers", [record["target"]])
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r}")
    kind = record.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{where}: field 'kind' must be a non-empty string, got {kind!r}")
    return {"id": str(record.get("id", "")), "prompt": record["prompt"], "target": record["target"],
            "answers": list(answers), "kind": kind}


def read_text_pairs(path: str | Path) -> list[dict[str, Any]]:
    """The checked records of one JSON / JSONL file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: text instruction file not found")
    text = path.read_text()
    if path.suffix == ".jsonl":
        raw = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    raw.append((f"{path}: line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number}: not valid JSON ({error})") from error
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        records = data.get("records") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of records or an object with a 'records' list")
        raw = [(f"{path}: record {index}", record) for index, record in enumerate(records)]
    out = []
    for where, record in raw:
        if isinstance(record, dict) and record.get("id") is not None:
            where = f"{where} (id {record['id']!r})"
        out.append(_check_record(record, where))
    return out


class TextPairDataset(Dataset):
    """The records of several files, in order (or records made in memory: :meth:`of_records`)."""

    def __init__(self, files: Sequence[str | Path]) -> None:
        self.records = [record for file in files for record in read_text_pairs(file)]
        if not self.records:
            raise ValueError(f"no text records in {[str(f) for f in files]}")

    @classmethod
    def of_records(cls, records: Sequence[Any], source: str) -> TextPairDataset:
        """Records generated in memory, checked as a file's are; ``source`` names them in an error."""
        if not records:
            raise ValueError(f"{source}: no text records")
        dataset = cls.__new__(cls)
        dataset.records = [_check_record(record, f"{source}: record {index}") for index, record in enumerate(records)]
        return dataset

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


class TextPairCollator:
    """Records -> ``input_ids`` / ``attention_mask`` / ``labels`` (+ the prompt alone when ``generate``)."""

    def __init__(self, tokenizer: Any, is_encoder_decoder: bool, max_prompt_len: int = 256,
                 max_target_len: int = 64, generate: bool = False) -> None:
        self.tokenizer, self.is_encoder_decoder, self.generate = tokenizer, is_encoder_decoder, generate
        prefix, suffix = special_token_frame(tokenizer)
        # a causal LM's prompt must not end in EOS (it would tell the model to stop): keep only the BOS
        self.frame = (prefix, suffix if is_encoder_decoder else [])
        if max_prompt_len <= len(self.frame[0]) + len(self.frame[1]):
            raise ValueError(f"max_prompt_len={max_prompt_len} leaves no room for the prompt")
        if max_target_len < 2:
            raise ValueError(f"max_target_len must be >= 2 (one token + EOS), got {max_target_len}")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token to end targets")
        self.max_prompt_len, self.max_target_len = max_prompt_len, max_target_len
        self.pad_id = pad_id(tokenizer, "LLM", allow_eos=not is_encoder_decoder)
        self.eos_id = tokenizer.eos_token_id

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        prompts = tokenize_prompts(self.tokenizer, [r["prompt"] for r in records], self.max_prompt_len, self.frame)
        targets = [ids[: self.max_target_len - 1] + [self.eos_id]
                   for ids in encode_plain(self.tokenizer, [r["target"] for r in records])]
        batch: dict[str, Any] = {
            "ids": [r["id"] for r in records],
            "kinds": [r["kind"] for r in records],
            "answers": [r["answers"] for r in records],
        }
        if self.is_encoder_decoder:
            batch["input_ids"], batch["attention_mask"] = pad_rows(prompts, self.pad_id, False), row_mask(prompts, False)
            batch["labels"] = pad_rows(targets, IGNORE_INDEX, False)
        else:
            rows = [p + t for p, t in zip(prompts, targets)]
            batch["input_ids"], batch["attention_mask"] = pad_rows(rows, self.pad_id, False), row_mask(rows, False)
            batch["labels"] = pad_rows([[IGNORE_INDEX] * len(p) + t for p, t in zip(prompts, targets)],
                                       IGNORE_INDEX, False)
        if self.generate:
            left = not self.is_encoder_decoder
            batch["gen_input_ids"], batch["gen_attention_mask"] = pad_rows(prompts, self.pad_id, left), row_mask(prompts, left)
        return batch


class MaskedTextCollator:
    """Records -> ``input_ids`` / ``attention_mask`` of each prompt (framed by the tokenizer's special tokens,
    content cut on the left to ``max_len``; the target is not read) and ``kinds``: the text a masked LM
    learns from (the masking itself is the model's, :mod:`ibkit.training.masked_lm`)."""

    def __init__(self, tokenizer: Any, max_len: int = 64) -> None:
        self.tokenizer, self.max_len = tokenizer, max_len
        self.frame = special_token_frame(tokenizer)
        if max_len <= len(self.frame[0]) + len(self.frame[1]):
            raise ValueError(f"max_len={max_len} leaves no room for the text")
        self.pad_id = pad_id(tokenizer, "masked-LM", allow_eos=False)

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = tokenize_prompts(self.tokenizer, [r["prompt"] for r in records], self.max_len, self.frame)
        return {"ids": [r["id"] for r in records], "kinds": [r["kind"] for r in records],
                "input_ids": pad_rows(rows, self.pad_id, False), "attention_mask": row_mask(rows, False)}


class LengthGroupedBatches(Sampler[list[int]]):
    """Training batches of similar prompt lengths, so little of a batch is padding (a prompt padded to the
    batch's longest costs as much as the longest): every epoch a fresh seeded permutation (seed, epoch),
    cut into groups of ``group`` batches, each group sorted by length and cut into batches, the batches
    shuffled. Ranks take every ``world_size``-th batch; the last incomplete batch is dropped."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 64, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size <= 0 or len(lengths) < batch_size * world_size:
            raise ValueError(f"{len(lengths)} records do not fill one batch of {batch_size} on {world_size} rank(s)")
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches = [batch for batch in batches if len(batch) == self.batch_size]
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size
        return iter(batches[self.rank : usable : self.world_size])

    def __len__(self) -> int:
        span, total = self.batch_size * self.group, len(self.lengths)
        full = (total // span) * self.group + (total % span) // self.batch_size
        return full // self.world_size


class TextDataModule(LightningDataModule):
    """(prompt, target) files for training a language model on text alone.

    Args:
        train_files / val_files: JSON or JSONL files (see the module docstring).
        tokenizer: the LLM tokenizer folder; unset, the training module's comes through :meth:`connect`.
        is_encoder_decoder: the LM kind; set by :meth:`connect` from the model.
        batch_size / eval_batch_size: rows per batch (eval: default ``batch_size``).
        max_prompt_len / max_target_len: token limits (prompt cut on the left, target on the right).
        max_eval_samples: validate on the first this many records of ``val_files``.
        seed: the training order (a new permutation every epoch; batches of similar prompt lengths).
        group_by_length: batches of similar prompt lengths (less padding, so faster); False: batches drawn at
            random, which a masked LM needs (on the demo's text, batches of one length left its Q-Former's BERT
            at 0.66 of the masked words right, random batches at 0.74: docs/demo.md).
    """

    def __init__(self, train_files: list[str] | None = None, val_files: list[str] | None = None,
                 tokenizer: str | None = None, is_encoder_decoder: bool | None = None, batch_size: int = 32,
                 eval_batch_size: int | None = None, max_prompt_len: int = 256, max_target_len: int = 64,
                 max_eval_samples: int | None = None, num_workers: int = 0, seed: int = 0,
                 group_by_length: bool = True) -> None:
        super().__init__()
        self.group_by_length = group_by_length
        self.train_files, self.val_files = list(train_files or []), list(val_files or [])
        self.tokenizer_path = tokenizer
        self.tokenizer: Any = None
        self.is_encoder_decoder = is_encoder_decoder
        self.masked = False  # set by connect(): batches for a masked LM (the prompts alone)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_prompt_len, self.max_target_len = max_prompt_len, max_target_len
        self.max_eval_samples, self.num_workers, self.seed = max_eval_samples, num_workers, seed
        self.train_set: TextPairDataset | None = None
        self.val_set: TextPairDataset | None = None

    def connect(self, tokenizer: Any | None, is_encoder_decoder: bool, masked: bool = False) -> Any:
        """Take the model's tokenizer and LM kind (a tokenizer folder named here wins); returns the tokenizer.
        ``masked``: the model is a masked LM (BERT), which reads the prompts alone (:class:`MaskedTextCollator`)."""
        self.is_encoder_decoder, self.masked = bool(is_encoder_decoder), masked
        if self.tokenizer is None:
            if self.tokenizer_path is not None:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            elif tokenizer is not None:
                self.tokenizer = tokenizer
            else:
                raise ValueError("no tokenizer: set data.tokenizer or the module's tokenizer folder")
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and self.train_files and stage in (None, "fit"):
            self.train_set = self.dataset("train")
        if self.val_set is None and self.val_files:
            self.val_set = self.dataset("val")
            if self.max_eval_samples is not None:
                self.val_set.records = self.val_set.records[: self.max_eval_samples]

    def dataset(self, split: str) -> TextPairDataset:
        """The records of ``split`` ("train" or "val"): its files; a subclass may make them instead."""
        return TextPairDataset(self.train_files if split == "train" else self.val_files)

    def _collator(self, generate: bool) -> TextPairCollator | MaskedTextCollator:
        if self.tokenizer is None or self.is_encoder_decoder is None:
            raise RuntimeError("TextDataModule.connect(tokenizer, is_encoder_decoder) must run before the loaders")
        if self.masked:
            return MaskedTextCollator(self.tokenizer, self.max_prompt_len)
        return TextPairCollator(self.tokenizer, self.is_encoder_decoder, self.max_prompt_len, self.max_target_len,
                                generate=generate)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("no training data: set data.train_files")
        rank, world = self._rank()
        lengths = [len(record["prompt"].split()) for record in self.train_set.records]
        batches = LengthGroupedBatches(lengths, self.batch_size, self.seed, group=64 if self.group_by_length else 1,
                                       rank=rank, world_size=world)  # a group of one batch: a random batch
        return DataLoader(self.train_set, batch_sampler=batches, collate_fn=self._collator(False),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        rank, world = self._rank()
        indices = list(range(rank, len(self.val_set), world))
        return DataLoader(torch.utils.data.Subset(self.val_set, indices), batch_size=self.eval_batch_size,
                          shuffle=False, collate_fn=self._collator(True), num_workers=self.num_workers)
