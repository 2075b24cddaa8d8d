"""A small shapes text corpus on disk (JSONL train, JSON val) with a word-level tokenizer covering it: the data of
the text-only modules' tests (the T5 step, the Q-Former's BERT)."""

from __future__ import annotations

import json
from pathlib import Path


def write_text_corpus(folder: Path, tokenizer_kind: str, train: int, val: int) -> Path:
    """``train`` / ``val`` corpus records in ``folder`` and, in ``folder/tok``, a ``tokenizer_kind`` ("t5" or
    "bert") tokenizer of at most 256 words built from them."""
    from ibkit.shapes.datamodule import LLM_SPECIALS, QFORMER_SPECIALS, build_vocabulary, word_level_tokenizer
    from ibkit.shapes.text_corpus import make_records

    train_records, val_records = make_records(0, "train", train), make_records(0, "val", val)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_records))
    (folder / "val.json").write_text(json.dumps({"records": val_records}))
    texts = [r["prompt"] + " " + " ".join(r["answers"]) for r in train_records + val_records]
    specials = LLM_SPECIALS if tokenizer_kind == "t5" else QFORMER_SPECIALS
    word_level_tokenizer(build_vocabulary(texts, 256, specials), tokenizer_kind).save_pretrained(folder / "tok")
    return folder
