"""Reading a shapes dataset back: annotation JSON -> checked Samples (the registry's reader for the suite)."""

from __future__ import annotations

import json
from pathlib import Path

from ibkit.data.errors import SkipCounter
from ibkit.data.sample import Sample
from ibkit.shapes.render import Scene


def _check_record(record: object) -> str | None:
    """Why ``record`` cannot become a Sample, or None if it can."""
    if not isinstance(record, dict):
        return "record is not an object"
    if not isinstance(record.get("id"), str):
        return "missing or non-string 'id'"
    media = [key for key in ("image", "video") if key in record]
    if len(media) != 1 or not isinstance(record[media[0]], str):
        return "needs exactly one of 'image' / 'video' as a string"
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "'answers' must be a non-empty list of strings"
    for key in ("question", "qformer_question", "context", "target"):
        if key in record and not isinstance(record[key], str):
            return f"'{key}' must be a string"
    if "qformer_question" in record and "question" not in record:
        return "'qformer_question' (the Q-Former's wording of the question) needs 'question'"
    for key in ("candidates", "ocr_tokens"):
        if key in record and not (
            isinstance(record[key], list) and all(isinstance(v, str) for v in record[key])
        ):
            return f"'{key}' must be a list of strings"
    if "label" in record:
        label, candidates = record["label"], record.get("candidates")
        if not isinstance(label, int) or isinstance(label, bool) or candidates is None:
            return "'label' must be an integer index into 'candidates'"
        if not 0 <= label < len(candidates):
            return f"'label' {label} is out of range for {len(candidates)} candidates"
    for key in ("extra", "scene"):
        if key in record and not isinstance(record[key], dict):
            return f"'{key}' must be an object"
    return None


def read_shapes(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """Read one split of a shapes dataset (the registry reader; media paths become absolute)."""
    file = Path(paths[split])
    try:
        document = json.loads(file.read_text())
    except ValueError as error:
        raise ValueError(f"{file}: not valid JSON: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("records"), list):
        raise ValueError(f"{file}: expected an object with a 'records' list (a shapes annotation file)")
    info = document.get("info") if isinstance(document.get("info"), dict) else {}
    dataset = str(info.get("dataset", file.parent.name))
    skips = skips if skips is not None else SkipCounter(dataset, strict=True)
    media_root = Path(paths["videos"] if "videos" in paths else paths["images"])
    samples = []
    for index, record in enumerate(document["records"]):
        problem = _check_record(record)
        if problem is not None:
            record_name = record.get("id", index) if isinstance(record, dict) else index
            skips.skip(file, record_name, problem)
            continue
        extra = dict(record.get("extra", {}))
        if "scene" in record:
            extra["scene"] = record["scene"]
        samples.append(
            Sample(
                dataset=dataset,
                sample_id=record["id"],
                image=str(media_root / record["image"]) if "image" in record else None,
                video=str(media_root / record["video"]) if "video" in record else None,
                question=record.get("question"),
                qformer_question=record.get("qformer_question"),
                answers=list(record["answers"]),
                target=record.get("target"),
                candidates=list(record["candidates"]) if "candidates" in record else None,
                label=record.get("label"),
                ocr_tokens=list(record["ocr_tokens"]) if "ocr_tokens" in record else None,
                context=record.get("context"),
                extra=extra,
            )
        )
    return samples


def scene_of(sample: Sample) -> Scene:
    """The scene a shapes sample was drawn from (for checks and visualisation)."""
    if "scene" not in sample.extra:
        raise KeyError(f"{sample.dataset} {sample.sample_id}: no 'scene' in extra (not a shapes sample?)")
    return Scene.from_json(sample.extra["scene"])

