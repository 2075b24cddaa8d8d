"""Video QA readers: MSVD-QA, MSRVTT-QA (answer-vocabulary ranking) and iVQA (5 answers, generated).

``Sample.video`` is the clip path; frames are sampled later by the video transform. For the
ranking datasets ``candidates`` is the answer vocabulary (one list shared by all samples) and
``label`` the index of the answer in it (None when the answer is outside the vocabulary, which then
counts as wrong, as in the usual open-ended protocol).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ibkit.data.errors import SkipCounter, warn_once
from ibkit.data.readers.common import (
    AnnotationFileError,
    BadRecord,
    convert_records,
    counter_for,
    expect,
    expect_str,
    expect_top,
    load_json,
    under,
)
from ibkit.data.sample import Sample
from ibkit.data.templates import most_frequent

_MAPPING_LINE = re.compile(r"^(?P<clip>\S+)\s+vid(?P<number>\d+)$")
IVQA_ANSWER_COLUMNS = tuple(f"answer{k}" for k in range(1, 6))


def _qa_records(path: Path, dataset: str) -> list:
    return expect_top(load_json(path, dataset), list, path, dataset)


def answer_vocabulary(paths: dict[str, Path], split: str, dataset: str) -> list[str]:
    """The ranking vocabulary.

    From the ``vocab`` role when present: LAVIS's ``train_ans2label.json`` (``{answer: index}``, the
    vocabulary the paper's numbers were ranked over) or a JSON list. Otherwise, with a warning (once),
    every answer of the train split, most frequent first; when the train file is missing too, the
    answers of ``split`` itself (an optimistic closed-vocabulary setting: say so in reports).
    """
    vocab_path = paths.get("vocab")
    if vocab_path is not None and vocab_path.is_file():
        data = load_json(vocab_path, dataset)
        if isinstance(data, list) and all(isinstance(answer, str) for answer in data):
            return list(data)
        if isinstance(data, dict) and all(isinstance(index, int) for index in data.values()):
            return [answer for answer, _ in sorted(data.items(), key=lambda item: item[1])]
        raise AnnotationFileError(f"{dataset}: {vocab_path}: expected a list of answers or {{answer: index}}")
    train = paths.get("train")
    source = train if train is not None and train.is_file() else paths[split]
    warn_once(
        f"{dataset}:vocab:{vocab_path}:{source}",
        f"{dataset}: no answer vocabulary file (expected LAVIS's {vocab_path}); ranking over every answer "
        f"of {source} instead" + ("" if source == train else " (the evaluated split itself: optimistic)"),
    )
    counts = Counter(
        record["answer"]
        for record in _qa_records(source, dataset)
        if isinstance(record, dict) and isinstance(record.get("answer"), str)
    )
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def _ranked_video_qa(
    paths: dict[str, Path], split: str, skips: SkipCounter, dataset: str, video_name: Any
) -> list[Sample]:
    path = paths[split]
    records = _qa_records(path, dataset)
    vocabulary = answer_vocabulary(paths, split, dataset)
    index_of = {answer: index for index, answer in enumerate(vocabulary)}

    def convert(index: int | str, record: Any) -> Sample:
        question_id = expect(record, "id", (int, str))
        video_id = expect(record, "video_id", int)
        question = expect_str(record, "question")
        answer = expect_str(record, "answer")
        extra = {"video_id": video_id} | (
            {"category_id": record["category_id"]} if "category_id" in record else {}
        )
        return Sample(
            dataset,
            str(question_id),
            video=under(paths["videos"], video_name(video_id)),
            question=question,
            answers=[answer],
            target=answer,
            candidates=vocabulary,
            label=index_of.get(answer),
            extra=extra,
        )

    return convert_records(enumerate(records), path, skips, convert, id_keys=("id",))


def read_youtube_mapping(path: Path, dataset: str) -> dict[int, str]:
    """MSVD ``youtube_mapping.txt``: ``<youtubeid>_<start>_<end> vid<N>`` per line -> {N: clip name}."""
    mapping: dict[int, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            match = _MAPPING_LINE.match(line.strip())
            if match is None:
                raise AnnotationFileError(
                    f"{dataset}: {path}: line {line_number} is not '<clip> vid<N>': {line!r}"
                )
            mapping[int(match.group("number"))] = match.group("clip")
    return mapping


def read_msvd_qa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """MSVD-QA ``{split}_qa.json`` (``[{"answer", "id", "question", "video_id"}]``) + ``youtube_mapping.txt``.

    Videos: ``videos/<youtubeid>_<start>_<end>.avi`` (the ``YouTubeClips`` folder of MSVD).
    """
    dataset = "msvd_qa"
    skips = counter_for(skips, dataset)
    mapping = read_youtube_mapping(paths["youtube_mapping"], dataset)

    def video_name(video_id: int) -> str:
        if video_id not in mapping:
            raise BadRecord(
                f"video_id {video_id} has no line 'vid{video_id}' in {paths['youtube_mapping'].name}"
            )
        return f"{mapping[video_id]}.avi"

    return _ranked_video_qa(paths, split, skips, dataset, video_name)


def read_msrvtt_qa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """MSRVTT-QA ``{split}_qa.json``; videos ``videos/video<N>.mp4`` (TrainValVideo + TestVideo merged)."""
    return _ranked_video_qa(
        paths, split, counter_for(skips, "msrvtt_qa"), "msrvtt_qa", lambda n: f"video{n}.mp4"
    )


def read_ivqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """iVQA ``{split}.csv``: ``video_id,start,end,question,answer1..answer5[,type]``.

    Videos: ``videos/<video_id>.mp4`` with the clip bounds in ``extra["start"/"end"]`` (seconds); the
    media naming of iVQA is not fixed by its authors, override the ``videos`` role to point elsewhere.
    """
    dataset, path = "ivqa", paths[split]
    skips = counter_for(skips, dataset)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise FileNotFoundError(f"{dataset}: annotation file not found: expected {path}") from None
    missing = [column for column in ("video_id", "question") if column not in columns]
    if missing:
        raise AnnotationFileError(f"{dataset}: {path}: header lacks column(s) {missing}; header is {columns}")

    def convert(row_label: int | str, row: Any) -> Sample:
        video_id = expect_str(row, "video_id")
        question = expect_str(row, "question")
        answers = [
            row[c].strip() for c in IVQA_ANSWER_COLUMNS if isinstance(row.get(c), str) and row[c].strip()
        ]
        extra: dict[str, Any] = {"video_id": video_id}
        for bound in ("start", "end"):
            if row.get(bound) not in (None, ""):
                try:
                    extra[bound] = float(row[bound])
                except ValueError:
                    raise BadRecord(
                        f"column {bound!r} should be a number of seconds, got {row[bound]!r}"
                    ) from None
        return Sample(
            dataset,
            f"{video_id}_{str(row_label).removeprefix('line ')}",
            video=under(paths["videos"], f"{video_id}.mp4"),
            question=question,
            answers=answers,
            target=most_frequent(answers) if answers else None,
            extra=extra,
        )

    # row labels count the header as line 1, so they match what an editor shows
    return convert_records(((f"line {n}", row) for n, row in enumerate(rows, start=2)), path, skips, convert)
