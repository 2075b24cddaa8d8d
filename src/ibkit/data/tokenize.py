"""Text -> token ids, one way for training batches and for serving (the collator and the Processor).

Every prompt is framed by its tokenizer's own special tokens (found by probing, so any tokenizer works
without knowing its class) and truncated on the LEFT, inside the frame: the end of an instruction,
where the question is, matters most. Also here: where a model folder keeps its Q-Former tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: the Q-Former tokenizer's sub-folder of a model folder (transformers' InstructBlipProcessor layout)
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
_PROBE_TEXT = "hello world"


def nested_qformer_tokenizer(folder: str | Path) -> Path | None:
    """The Q-Former tokenizer folder inside a model (or LLM) folder, None when it has none."""
    nested = Path(folder) / QFORMER_TOKENIZER_DIR
    return nested if nested.is_dir() else None


def encode_plain(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
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


def pad_id(tokenizer: Any, role: str, allow_eos: bool) -> int:
    """The tokenizer's pad id; its EOS where ``allow_eos`` and it has no pad token (padding is masked)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if allow_eos and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        f"the {role} tokenizer ({type(tokenizer).__name__}) has no pad token; set one "
        "(e.g. tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and resize the embeddings)"
    )


def tokenize_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int | None,
    frame: tuple[list[int], list[int]] | None = None,
) -> list[list[int]]:
    """Each text's ids inside ``frame`` (default: the tokenizer's special tokens), content cut on the left
    so that a row holds at most ``max_length`` ids (``None``: never cut, as LAVIS's LLM prompts at inference)."""
    prefix, suffix = frame if frame is not None else special_token_frame(tokenizer)
    if max_length is None:
        return [prefix + ids + suffix for ids in encode_plain(tokenizer, texts)]
    room = max_length - len(prefix) - len(suffix)
    if room <= 0:
        raise ValueError(f"max length {max_length} leaves no room for text next to {len(prefix) + len(suffix)} special token(s)")
    return [
        prefix + ids[len(ids) - room :] + suffix if len(ids) > room else prefix + ids + suffix
        for ids in encode_plain(tokenizer, texts)
    ]


def pad_rows(rows: list[list[int]], pad_value: int, left: bool) -> torch.Tensor:
    """Rows of ids as one (N, longest) tensor, padded on the left or the right."""
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


def row_mask(rows: list[list[int]], left: bool) -> torch.Tensor:
    """The attention mask of :func:`pad_rows`' result."""
    return pad_rows([[1] * len(r) for r in rows], 0, left)
