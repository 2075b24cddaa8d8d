"""Readers for datasets a user declares in YAML (:mod:`ibkit.data.registry.custom`): LLaVA JSON and plain JSONL.

Both follow the conventions of the registered readers: a malformed record is skipped and counted (or
raised when strict) with its file, line or index and id; media paths are absolute or relative to the
dataset's image root; missing media files are found later, when the item is loaded, and counted there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ibkit.data.errors import SkipCounter
from ibkit.data.readers.common import (
    BadRecord,
    as_int,
    convert_records,
    counter_for,
    expect,
    expect_str,
    expect_str_list,
    load_jsonl,
    media_path,
)
from ibkit.data.readers.dialog import read_llava_file
from ibkit.data.sample import Sample

QUESTION_KEYS = ("instruction", "question")


def read_custom_llava(
    paths: dict[str, Path], split: str, skips: SkipCounter | None = None, *, dataset: str = "custom"
) -> list[Sample]:
    """LLaVA conversations, read as the registered LLaVA datasets are (every human/gpt pair one sample,
    earlier turns as context, ``<image>`` removed); ``image`` is relative to the image root."""
    return read_llava_file(paths, split, skips, dataset, image_path=media_path)


def _question(record: dict) -> str:
    present = [key for key in QUESTION_KEYS if record.get(key) is not None]
    if not present:
        raise BadRecord("missing field 'question' (or 'instruction')")
    if len(present) > 1:
        raise BadRecord("both 'instruction' and 'question' are given; keep one")
    return expect_str(record, present[0]).strip()


def _answers(record: dict) -> list[str]:
    if record.get("answer") is not None and record.get("answers") is not None:
        raise BadRecord("both 'answer' and 'answers' are given; keep one")
    if record.get("answer") is not None:
        return [expect_str(record, "answer").strip()]
    if record.get("answers") is not None:
        return [a.strip() for a in expect_str_list(record, "answers")]
    return []  # a file of questions to predict, or a ranking record labelled by 'label'


def _label(record: dict, choices: list[str], answers: list[str]) -> int | None:
    """Index of the correct choice: ``label`` (index or choice text), else the one answer when it is a choice."""
    if record.get("label") is None:
        return choices.index(answers[0]) if answers and answers[0] in choices else None
    label = record["label"]
    if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
        if label not in choices:
            raise BadRecord(f"field 'label' = {label!r} is not one of the choices {choices}")
        return choices.index(label)
    index = as_int(label, "label")
    if not 0 <= index < len(choices):
        raise BadRecord(f"field 'label' = {index} is out of range for {len(choices)} choices")
    return index


def read_custom_jsonl(
    paths: dict[str, Path],
    split: str,
    skips: SkipCounter | None = None,
    *,
    dataset: str = "custom",
    task: str = "generate",
) -> list[Sample]:
    """One JSON object a line: ``image`` (a path or a list of paths) or ``video``, ``question`` (or
    ``instruction``), ``answer`` or ``answers``, optional ``id``, ``context``, ``choices``, ``label`` and
    ``qformer_question`` (another wording of the question for the Q-Former alone; the LLM reads ``question``).

    ``task="rank"`` needs ``choices`` on every record. ``id`` defaults to the line number; ids must be
    unique in a file (predictions and resuming are keyed by them).
    """
    path = paths[split]
    skips = counter_for(skips, dataset)
    seen: set[str] = set()

    def convert(line: int | str, record: Any) -> Sample:
        if not isinstance(record, dict):
            raise BadRecord(f"expected an object, got {type(record).__name__}")
        record_id = str(expect(record, "id", (str, int))) if record.get("id") is not None else str(line).removeprefix("line ")
        if record_id in seen:
            raise BadRecord(f"duplicate id {record_id!r}")
        image = video = None
        if record.get("image") is not None and record.get("video") is not None:
            raise BadRecord("both 'image' and 'video' are given; keep one")
        if record.get("video") is not None:
            video = media_path(paths["images"], expect_str(record, "video"))
        elif isinstance(record.get("image"), list):
            image = [media_path(paths["images"], p) for p in expect_str_list(record, "image")]
        else:
            image = media_path(paths["images"], expect_str(record, "image"))
        question = _question(record)
        qformer_question = None
        if record.get("qformer_question") is not None:
            qformer_question = expect_str(record, "qformer_question").strip()
            if not qformer_question:
                raise BadRecord("field 'qformer_question' is empty (leave it out to give the Q-Former 'question')")
        answers = _answers(record)
        context = record.get("context")
        if context is not None and not isinstance(context, str):
            raise BadRecord(f"field 'context' should be str, got {type(context).__name__}")
        choices = label = None
        if record.get("choices") is not None:
            choices = expect_str_list(record, "choices")
            label = _label(record, choices, answers)
            if not answers and label is not None:
                answers = [choices[label]]
        elif task == "rank":
            raise BadRecord("missing field 'choices' (the dataset's task is rank)")
        elif record.get("label") is not None:
            raise BadRecord("field 'label' needs 'choices'")
        seen.add(record_id)
        return Sample(
            dataset, record_id, image=image, video=video, question=question, answers=answers,
            target=choices[label] if choices is not None and label is not None else None,
            candidates=choices, label=label, context=context or None, qformer_question=qformer_question,
        )

    records = [(f"line {n}", record) for n, record in load_jsonl(path, dataset, skips)]
    return convert_records(records, path, skips, convert, id_keys=("id",))
