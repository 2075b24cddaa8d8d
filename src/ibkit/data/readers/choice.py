"""Readers for datasets answered by ranking a fixed set: VSR, IconQA, ScienceQA, Hateful Memes.

Every sample carries ``candidates`` and ``label`` (index of the correct candidate); ``answers`` /
``target`` hold the correct candidate's text so captioning-style training also works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ibkit.data.errors import SkipCounter
from ibkit.data.readers.common import (
    AnnotationFileError,
    BadRecord,
    as_int,
    convert_records,
    counter_for,
    expect,
    expect_str,
    expect_str_list,
    expect_top,
    load_json,
    load_jsonl,
    media_path,
    under,
)
from ibkit.data.sample import Sample

TRUE_FALSE = ("false", "true")  # index == VSR label (1 = the statement is true)
NO_YES = ("no", "yes")  # index == Hateful Memes label (1 = hateful)


def _binary_label(record: dict, key: str = "label") -> int:
    label = as_int(expect(record, key, (int, str)), key)
    if label not in (0, 1):
        raise BadRecord(f"field {key!r} should be 0 or 1, got {label}")
    return label


def _checked_label(record: dict, key: str, choices: list[str]) -> int:
    label = expect(record, key, int)
    if not 0 <= label < len(choices):
        raise BadRecord(f"field {key!r} = {label} is out of range for {len(choices)} choices")
    return label


def read_vsr(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """VSR ``splits/{zeroshot,random}/{split}.jsonl``: statement in ``caption``, ``label`` 1 = true."""
    dataset, path = "vsr", paths[split]
    skips = counter_for(skips, dataset)

    def convert(line_number: int | str, record: Any) -> Sample:
        image = expect_str(record, "image")
        statement = expect_str(record, "caption")
        label = _binary_label(record)
        extra = {key: record[key] for key in ("relation", "subj", "obj") if key in record}
        return Sample(
            dataset,
            f"{split}-{str(line_number).removeprefix('line ')}",
            image=media_path(paths["images"], image),
            question=statement,
            answers=[TRUE_FALSE[label]],
            target=TRUE_FALSE[label],
            candidates=list(TRUE_FALSE),
            label=label,
            extra=extra,
        )

    records = [(f"line {n}", record) for n, record in load_jsonl(path, dataset, skips)]
    return convert_records(records, path, skips, convert, id_keys=("image",))


def _pid_list(pid_splits: Any, key: str, path: Path, dataset: str) -> list[str] | None:
    if not isinstance(pid_splits, dict):
        raise AnnotationFileError(f"{dataset}: {path}: expected a JSON object of pid lists")
    pids = pid_splits.get(key)
    if pids is None:
        return None
    if not isinstance(pids, list):
        raise AnnotationFileError(f"{dataset}: {path}: {key!r} should be a list of problem ids")
    return [str(pid) for pid in pids]


def _choice_sample(
    dataset: str, pid: int | str, image: str, question: str, choices: list[str], label: int, **fields: Any
) -> Sample:
    """A multiple-choice record: the correct choice is both the answer and the training target."""
    return Sample(
        dataset, str(pid), image=image, question=question, answers=[choices[label]], target=choices[label],
        candidates=choices, label=label, **fields,
    )


def read_iconqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """IconQA ``problems.json`` + ``pid_splits.json``, the ``choose_txt`` sub-task (as in the paper)."""
    dataset, path = "iconqa", paths[split]
    skips = counter_for(skips, dataset)
    problems = expect_top(load_json(path, dataset), dict, path, dataset)
    pids = _pid_list(
        load_json(paths["pid_splits"], dataset), f"choose_txt_{split}", paths["pid_splits"], dataset
    )
    if pids is None:  # fall back to the per-problem split and type fields
        pids = [
            pid
            for pid, p in problems.items()
            if isinstance(p, dict) and p.get("split") == split and p.get("ques_type") == "choose_txt"
        ]

    def convert(pid: int | str, record: Any) -> Sample:
        if record is None:
            raise BadRecord(f"problem id {pid} (from pid_splits.json) is not in problems.json")
        question = expect_str(record, "question")
        choices = expect_str_list(record, "choices")
        label = _checked_label(record, "answer", choices)
        problem_split = record.get("split", split)
        image = under(paths["images"], problem_split, "choose_txt", str(pid), "image.png")
        extra = {key: record[key] for key in ("grade", "label", "ques_type") if key in record}
        return _choice_sample(dataset, pid, image, question, choices, label, extra=extra)

    return convert_records(((pid, problems.get(pid)) for pid in pids), path, skips, convert)


def read_scienceqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """ScienceQA ``problems.json`` + ``pid_splits.json``; only questions with an image (the paper's subset)."""
    dataset, path = "scienceqa", paths[split]
    skips = counter_for(skips, dataset)
    problems = expect_top(load_json(path, dataset), dict, path, dataset)
    pids = _pid_list(load_json(paths["pid_splits"], dataset), split, paths["pid_splits"], dataset)
    if pids is None:
        pids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]

    def convert(pid: int | str, record: Any) -> Sample | None:
        if record is None:
            raise BadRecord(f"problem id {pid} (from pid_splits.json) is not in problems.json")
        if not isinstance(record, dict):
            raise BadRecord(f"expected an object, got {type(record).__name__}")
        if not record.get("image"):
            return None  # text-only question: not part of the image subset
        question = expect_str(record, "question")
        choices = expect_str_list(record, "choices")
        label = _checked_label(record, "answer", choices)
        hint = record.get("hint") or ""
        if not isinstance(hint, str):
            raise BadRecord("field 'hint' should be a string")
        image = under(paths["images"], str(record.get("split", split)), str(pid), expect_str(record, "image"))
        extra = {
            key: record[key]
            for key in ("lecture", "solution", "subject", "topic", "category", "skill", "grade", "task")
            if key in record
        }
        return _choice_sample(dataset, pid, image, question, choices, label, context=hint, extra=extra)

    return convert_records(((pid, problems.get(pid)) for pid in pids), path, skips, convert)


def read_hatefulmemes(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """Hateful Memes ``{split}.jsonl``: ``{"id", "img": "img/01235.png", "label": 0|1, "text"}``."""
    dataset, path = "hatefulmemes", paths[split]
    skips = counter_for(skips, dataset)

    def convert(line_number: int | str, record: Any) -> Sample:
        meme_id = expect(record, "id", (int, str))
        text = expect(record, "text", str)
        image = media_path(paths["images"], expect_str(record, "img"))
        label = _binary_label(record) if "label" in record else None  # test files carry no label
        answers = [NO_YES[label]] if label is not None else []
        return Sample(
            dataset,
            str(meme_id),
            image=image,
            question=text,
            answers=answers,
            target=answers[0] if answers else None,
            candidates=list(NO_YES),
            label=label,
        )

    records = [(f"line {n}", record) for n, record in load_jsonl(path, dataset, skips)]
    return convert_records(records, path, skips, convert, id_keys=("id",))
