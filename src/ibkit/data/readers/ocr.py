"""Rosetta OCR token files shared by TextVQA and TextCaps (``TextVQA_Rosetta_OCR_v0.2_{split}.json``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ibkit.data.readers.common import AnnotationFileError, load_json


def load_ocr_tokens(paths: Iterable[Path], dataset: str) -> dict[str, list[str]]:
    """image_id -> OCR tokens, merged over the files that exist (OCR files are optional).

    Format: ``{"data": [{"image_id", "ocr_tokens": [str], "ocr_info": [{"word", "bounding_box"}]}]}``;
    ``ocr_info[*].word`` is used when ``ocr_tokens`` is absent.
    """
    tokens: dict[str, list[str]] = {}
    for path in paths:
        if not path.is_file():
            continue
        data = load_json(path, dataset)
        entries = data.get("data") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise AnnotationFileError(f"{dataset}: {path}: expected an OCR file with a 'data' list")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), str):
                continue  # an OCR entry without an id cannot be matched to any image
            words = entry.get("ocr_tokens")
            if not isinstance(words, list):
                words = [info.get("word") for info in entry.get("ocr_info") or [] if isinstance(info, dict)]
            tokens[entry["image_id"]] = [
                str(word) for word in words if isinstance(word, str) and word.strip()
            ]
    return tokens
