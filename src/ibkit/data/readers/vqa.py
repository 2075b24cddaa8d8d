"""Open-ended VQA readers (VQAv2, OK-VQA, A-OKVQA, OCR-VQA, GQA, TextVQA, VizWiz) and the VQG views.

``answers`` keeps every reference answer (duplicates included: VQA accuracy counts them);
``target`` is the most frequent one, ties going to the first given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ibkit.data.errors import SkipCounter, warn_once
from ibkit.data.readers.common import (
    BadRecord,
    as_int,
    coco2014_name,
    convert_records,
    counter_for,
    expect,
    expect_str,
    expect_str_list,
    expect_top,
    image_suffix,
    load_json,
    media_path,
    under,
)
from ibkit.data.readers.ocr import load_ocr_tokens
from ibkit.data.sample import Sample
from ibkit.data.templates import most_frequent


def _read_vqa_pair(paths: dict[str, Path], split: str, skips: SkipCounter, dataset: str) -> list[Sample]:
    """The VQA-API pair: ``{split}.questions`` (``{"questions": [...]}``) + ``{split}.annotations``."""
    questions_path, annotations_path = paths[f"{split}.questions"], paths[f"{split}.annotations"]
    questions_data = load_json(questions_path, dataset)
    questions = expect_top(questions_data, list, questions_path, dataset, key="questions")
    annotations = expect_top(
        load_json(annotations_path, dataset), list, annotations_path, dataset, key="annotations"
    )
    subset = questions_data.get("data_subtype") or f"{split}2014"
    by_question: dict[int, dict] = {}

    def index_annotation(index: int | str, record: Any) -> None:
        by_question[expect(record, "question_id", int)] = record

    convert_records(
        enumerate(annotations), annotations_path, skips, index_annotation, id_keys=("question_id",)
    )

    def convert(index: int | str, record: Any) -> Sample:
        question_id = expect(record, "question_id", int)
        image_id = expect(record, "image_id", int)
        question = expect_str(record, "question")
        annotation = by_question.get(question_id)
        if annotation is None:
            raise BadRecord(f"no annotation with question_id {question_id} in {annotations_path.name}")
        answers = [
            a for a in (expect(x, "answer", str) for x in expect(annotation, "answers", list)) if a.strip()
        ]
        if not answers:
            raise BadRecord("empty 'answers'")
        extra = {"image_id": image_id, "question_id": question_id}
        extra |= {
            k: annotation[k]
            for k in ("question_type", "answer_type", "multiple_choice_answer")
            if k in annotation
        }
        return Sample(
            dataset,
            str(question_id),
            image=under(paths["images"], coco2014_name(subset, image_id)),
            question=question,
            answers=answers,
            target=most_frequent(answers),
            extra=extra,
        )

    return convert_records(enumerate(questions), questions_path, skips, convert, id_keys=("question_id",))


def read_vqav2(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """VQAv2 ``v2_OpenEnded_mscoco_{split}2014_questions.json`` + ``v2_mscoco_{split}2014_annotations.json``."""
    return _read_vqa_pair(paths, split, counter_for(skips, "vqav2"), "vqav2")


def read_okvqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """OK-VQA ``OpenEnded_mscoco_{split}2014_questions.json`` + ``mscoco_{split}2014_annotations.json``."""
    return _read_vqa_pair(paths, split, counter_for(skips, "okvqa"), "okvqa")


def _read_aokvqa(paths: dict[str, Path], split: str, skips: SkipCounter, dataset: str) -> list[Sample]:
    path = paths[split]
    records = expect_top(load_json(path, dataset), list, path, dataset)

    def convert(index: int | str, record: Any) -> Sample:
        question_id = str(expect(record, "question_id", (str, int)))
        question = expect_str(record, "question")
        if isinstance(record.get("image"), str):  # LAVIS re-hosted copy
            image = media_path(paths["images"], record["image"])
        else:
            subset = f"{record.get('split', split)}2017"
            image = under(paths["images"], subset, f"{expect(record, 'image_id', int):012d}.jpg")
        choices = expect_str_list(record, "choices")
        label = None
        if record.get("correct_choice_idx") is not None:
            label = expect(record, "correct_choice_idx", int)
            if not 0 <= label < len(choices):
                raise BadRecord(f"correct_choice_idx {label} out of range for {len(choices)} choices")
        answers = expect_str_list(record, "direct_answers") if "direct_answers" in record else []
        extra = {
            "image_id": record.get("image_id"),
            "rationales": record.get("rationales", []),
            "difficult_direct_answer": record.get("difficult_direct_answer"),
        }
        return Sample(
            dataset,
            question_id,
            image=image,
            question=question,
            answers=answers,
            target=most_frequent(answers) if answers else None,
            candidates=choices,
            label=label,
            extra=extra,
        )

    return convert_records(enumerate(records), path, skips, convert, id_keys=("question_id",))


def read_aokvqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """A-OKVQA ``aokvqa_v1p0_{split}.json``: direct answers (target) plus choices as ranking candidates."""
    return _read_aokvqa(paths, split, counter_for(skips, "aokvqa"), "aokvqa")


_OCRVQA_SPLITS = {1: "train", 2: "val", 3: "test"}


def read_ocrvqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """OCR-VQA ``dataset.json``: ``{book_id: {imageURL, questions, answers, split: 1|2|3, ...}}``."""
    dataset, path = "ocrvqa", paths[split]
    skips = counter_for(skips, dataset)
    books = expect_top(load_json(path, dataset), dict, path, dataset)

    def convert(book_id: int | str, record: Any) -> list[Sample] | None:
        book_split = _OCRVQA_SPLITS.get(as_int(expect(record, "split", (int, str)), "split"))
        if book_split is None:
            raise BadRecord(f"unknown split code {record['split']!r} (expected 1, 2 or 3)")
        if book_split != split:
            return None
        questions = expect_str_list(record, "questions")
        answers = expect(record, "answers", list)
        if len(questions) != len(answers):
            raise BadRecord(f"{len(questions)} questions but {len(answers)} answers")
        image = under(paths["images"], f"{book_id}{image_suffix(str(record.get('imageURL', '')))}")
        extra = {key: record[key] for key in ("title", "authorName", "genre") if key in record}
        samples = []
        for k, (question, answer) in enumerate(zip(questions, answers)):
            if not isinstance(answer, str) or not answer.strip():
                raise BadRecord(f"answer {k} is not a non-empty string")
            samples.append(
                Sample(
                    dataset,
                    f"{book_id}_{k}",
                    image=image,
                    question=question,
                    answers=[answer],
                    target=answer,
                    extra=dict(extra, book_id=book_id),
                )
            )
        return samples

    return convert_records(books.items(), path, skips, convert)


def read_gqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """GQA ``*_balanced_questions.json``: official ``{qid: {...}}`` or the LAVIS list of the same name."""
    dataset, path = "gqa", paths[split]
    skips = counter_for(skips, dataset)
    data = load_json(path, dataset)
    if isinstance(data, dict):
        records: Any = data.items()
    else:
        records = [(index, record) for index, record in enumerate(expect_top(data, list, path, dataset))]

    def convert(key: int | str, record: Any) -> Sample:
        question = expect_str(record, "question")
        if isinstance(data, dict):
            question_id, image = str(key), f"{expect_str(record, 'imageId')}.jpg"
        else:
            question_id, image = str(expect(record, "question_id", (str, int))), expect_str(record, "image")
        answer = record.get("answer")
        answers = [answer] if isinstance(answer, str) and answer.strip() else []
        extra = {key: record[key] for key in ("fullAnswer", "types", "isBalanced") if key in record}
        return Sample(
            dataset,
            question_id,
            image=media_path(paths["images"], image),
            question=question,
            answers=answers,
            target=answers[0] if answers else None,
            extra=extra,
        )

    return convert_records(records, path, skips, convert, id_keys=("question_id",))


def read_textvqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """TextVQA ``TextVQA_0.5.1_{split}.json`` + Rosetta OCR tokens (``{split}.ocr``, optional)."""
    dataset, path = "textvqa", paths[split]
    skips = counter_for(skips, dataset)
    records = expect_top(load_json(path, dataset), list, path, dataset, key="data")
    ocr_path = paths.get(f"{split}.ocr")
    ocr = load_ocr_tokens([ocr_path] if ocr_path else [], dataset)
    if (ocr_path is None or not ocr_path.is_file()) and any(
        isinstance(r, dict) and not isinstance(r.get("ocr_tokens"), list) for r in records
    ):
        warn_once(
            f"{dataset}:no-ocr:{ocr_path}",
            f"{dataset} {split}: no Rosetta OCR file (expected {ocr_path}); questions without inline "
            "'ocr_tokens' are asked WITHOUT the paper's 'OCR tokens: ...' prompt",
        )

    def convert(index: int | str, record: Any) -> Sample:
        question_id = expect(record, "question_id", (int, str))
        image_id = expect_str(record, "image_id")
        question = expect_str(record, "question")
        answers = expect_str_list(record, "answers") if "answers" in record else []
        folder = "test_images" if record.get("set_name", split) == "test" else "train_images"
        tokens = record.get("ocr_tokens") if isinstance(record.get("ocr_tokens"), list) else ocr.get(image_id)
        return Sample(
            dataset,
            str(question_id),
            image=under(paths["images"], folder, f"{image_id}.jpg"),
            question=question,
            answers=answers,
            target=most_frequent(answers) if answers else None,
            ocr_tokens=tokens,
            extra={"image_id": image_id},
        )

    return convert_records(enumerate(records), path, skips, convert, id_keys=("question_id",))


def read_vizwiz(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """VizWiz ``{split}.json``: ``[{"image": "VizWiz_val_00000000.jpg", "question", "answers": [...]}]``."""
    dataset, path = "vizwiz", paths[split]
    skips = counter_for(skips, dataset)
    records = expect_top(load_json(path, dataset), list, path, dataset)

    def convert(index: int | str, record: Any) -> Sample:
        image = expect_str(record, "image")
        parts = Path(image).name.split("_")
        folder = parts[1] if len(parts) >= 3 and parts[0] == "VizWiz" else split
        question = expect_str(record, "question")
        answers = [expect(answer, "answer", str) for answer in record.get("answers") or []]
        extra = {key: record[key] for key in ("answer_type", "answerable") if key in record}
        return Sample(
            dataset,
            Path(image).stem,
            image=under(paths["images"], folder, Path(image).name),
            question=question,
            answers=answers,
            target=most_frequent(answers) if answers else None,
            extra=extra,
        )

    return convert_records(enumerate(records), path, skips, convert, id_keys=("image",))


def _as_vqg(samples: list[Sample], dataset: str) -> list[Sample]:
    """Question generation: the answer goes in (``extra["answer"]``), the question is the target."""
    vqg = []
    for sample in samples:
        if sample.target is None or not sample.question:
            continue  # unanswered questions (test splits) give nothing to condition on
        extra = dict(sample.extra, answer=sample.target)
        vqg.append(
            Sample(
                dataset,
                sample.sample_id,
                image=sample.image,
                answers=[sample.question],
                target=sample.question,
                extra=extra,
            )
        )
    return vqg


def read_vqg_vqav2(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    return _as_vqg(_read_vqa_pair(paths, split, counter_for(skips, "vqg_vqav2"), "vqg_vqav2"), "vqg_vqav2")


def read_vqg_okvqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    return _as_vqg(_read_vqa_pair(paths, split, counter_for(skips, "vqg_okvqa"), "vqg_okvqa"), "vqg_okvqa")


def read_vqg_aokvqa(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    return _as_vqg(_read_aokvqa(paths, split, counter_for(skips, "vqg_aokvqa"), "vqg_aokvqa"), "vqg_aokvqa")
