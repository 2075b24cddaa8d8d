"""Multi-turn readers: Visual Dialog v1.0 and LLaVA-Instruct-150K.

Every answered turn becomes one sample whose ``context`` holds the earlier turns, so the model learns
(and is evaluated on) answering in the middle of a conversation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ibkit.data.errors import SkipCounter
from ibkit.data.readers.common import (
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

_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")


def _as_question(text: str) -> str:
    text = text.strip()
    return text if text.endswith("?") else text + "?"


def _visdial_image(images_root: Path, split: str, image_id: int) -> str:
    """val/test use VisualDialog_{split}2018 images; train reuses COCO 2014 (train2014 or val2014)."""
    if split in ("val", "test"):
        folder = f"VisualDialog_{split}2018"
        return under(images_root, folder, f"{folder}_{image_id:012d}.jpg")
    train_name = under(images_root, "train2014", f"COCO_train2014_{image_id:012d}.jpg")
    val_name = under(images_root, "val2014", f"COCO_val2014_{image_id:012d}.jpg")
    return val_name if not Path(train_name).exists() and Path(val_name).exists() else train_name


def read_visdial(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """``visdial_1.0_{split}.json``: questions/answers are indices into ``data.questions`` / ``data.answers``.

    One sample per round with ``answer_options`` (all 10 rounds on train/val, the last round on test);
    ``context`` = caption + earlier rounds, ``candidates`` = the 100 options, ``label`` = ``gt_index``.
    """
    dataset, path = "visdial", paths[split]
    skips = counter_for(skips, dataset)
    data = expect_top(load_json(path, dataset), dict, path, dataset, key="data")
    questions = expect_top(data, list, path, dataset, key="questions")
    answers = expect_top(data, list, path, dataset, key="answers")
    dialogs = expect_top(data, list, path, dataset, key="dialogs")

    def text(table: list, index: Any, what: str) -> str:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(table):
            raise BadRecord(f"{what} index {index!r} is outside data.{what}s ({len(table)} entries)")
        return table[index]

    def convert(index: int | str, record: Any) -> list[Sample]:
        image_id = expect(record, "image_id", int)
        caption = expect(record, "caption", str)
        rounds = expect(record, "dialog", list)
        history = [caption.strip().rstrip(".") + "."] if caption.strip() else []
        samples = []
        for round_index, turn in enumerate(rounds):
            question = _as_question(text(questions, expect(turn, "question", int), "question"))
            answer = text(answers, turn["answer"], "answer") if turn.get("answer") is not None else None
            if "answer_options" in turn:
                options = [text(answers, option, "answer") for option in expect(turn, "answer_options", list)]
                label = turn.get("gt_index")
                if label is not None and not (isinstance(label, int) and 0 <= label < len(options)):
                    raise BadRecord(f"round {round_index}: gt_index {label!r} out of range")
                samples.append(
                    Sample(
                        dataset,
                        f"{image_id}_{round_index}",
                        image=_visdial_image(paths["images"], split, image_id),
                        question=question,
                        answers=[answer] if answer else [],
                        target=answer,
                        candidates=options,
                        label=label,
                        context=" ".join(history),
                        extra={"image_id": image_id, "round": round_index},
                    )
                )
            if answer is not None:
                history.append(f"Q: {question} A: {answer}.")
        return samples

    return convert_records(enumerate(dialogs), path, skips, convert, id_keys=("image_id",))


def _llava_image(images_root: Path, image: str) -> str:
    """LLaVA-Instruct-150K names COCO train2017 images by file name; other releases use relative paths."""
    return under(images_root, image) if "/" in image else under(images_root, "train2017", image)


LLAVA_SUBSETS = ("conversation", "detail", "reasoning")
# The requests of detail_23k (LLaVA's fixed list for detailed descriptions), lowercased, without "<image>"
# and trailing punctuation: a one-turn record of the merged file asking one of them is a "detail" record.
LLAVA_DETAIL_REQUESTS = frozenset({
    "what do you see happening in this image",
    "what do you think is going on in this snapshot",
    "can you elaborate on the elements of the picture provided",
    "describe the following image",
    "write a detailed description of the given image",
    "explain the visual content of the image in great detail",
    "analyze the image in a comprehensive and detailed manner",
    "can you describe the main features of this image for me",
    "what are the key elements in this picture",
    "what is this photo about",
    "what's happening in the scene",
})


def _request_key(text: str) -> str:
    return _IMAGE_TOKEN.sub(" ", text).strip().lower().rstrip("?.!'\" ")


def llava_subset(record: Any) -> str:
    """Which of LLaVA-Instruct-150K's three files a record of the merged ``llava_instruct_150k.json`` comes from.

    The merged file's ids are COCO image ids, shared by the subsets (one image has records in several),
    so the record's shape decides: several human/gpt pairs -> conversation; one pair asking one of
    :data:`LLAVA_DETAIL_REQUESTS` -> detail; any other single pair -> reasoning.
    """
    turns = expect(record, "conversations", list)
    if len(turns) > 2:
        return "conversation"
    first = turns[0].get("value") if turns and isinstance(turns[0], dict) else None
    if isinstance(first, str) and _request_key(first) in LLAVA_DETAIL_REQUESTS:
        return "detail"
    return "reasoning"


def read_llava_file(
    paths: dict[str, Path],
    split: str,
    skips: SkipCounter | None,
    dataset: str,
    image_path: Callable[[Path, str], str] = _llava_image,
    subset: str | None = None,
) -> list[Sample]:
    """LLaVA ``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``.

    Reads the file of role ``split`` or, for a LLaVA-Instruct ``subset`` whose own file is absent while the
    merged ``llava_instruct_150k.json`` (role ``merged``, what LAVIS reads) is there, that file's records
    of the subset (:func:`llava_subset`). One sample per (human, gpt) pair; ``<image>`` is removed (the
    visual prompt has its own place) and earlier turns go into ``context`` as ``User: ...`` /
    ``Assistant: ...`` lines. ``image_path``: the media root and the record's ``image`` -> the file
    (custom datasets: relative to their image root).
    """
    path = paths[split]
    merged = paths.get("merged")
    from_merged = subset is not None and not path.is_file() and merged is not None and merged.is_file()
    if from_merged:
        path = merged
    skips = counter_for(skips, dataset)
    records = expect_top(load_json(path, dataset), list, path, dataset)

    def convert(index: int | str, record: Any) -> list[Sample] | None:
        if from_merged and llava_subset(record) != subset:
            return None
        record_id = str(expect(record, "id", (str, int)))
        image = image_path(paths["images"], expect_str(record, "image"))
        turns = expect(record, "conversations", list)
        if len(turns) < 2 or len(turns) % 2:
            raise BadRecord(f"'conversations' should hold human/gpt pairs, got {len(turns)} turns")
        history: list[str] = []
        samples = []
        for turn_index in range(0, len(turns), 2):
            human, gpt = turns[turn_index], turns[turn_index + 1]
            if expect(human, "from", str) != "human" or expect(gpt, "from", str) != "gpt":
                raise BadRecord(f"turns {turn_index}/{turn_index + 1} are not a human/gpt pair")
            question = _IMAGE_TOKEN.sub(" ", expect_str(human, "value")).strip()
            answer = expect_str(gpt, "value").strip()
            samples.append(
                Sample(
                    dataset,
                    f"{record_id}_{turn_index // 2}",
                    image=image,
                    question=question,
                    answers=[answer],
                    target=answer,
                    context="\n".join(history) or None,
                    extra={"turn": turn_index // 2},
                )
            )
            history += [f"User: {question}", f"Assistant: {answer}"]
        return samples

    return convert_records(enumerate(records), path, skips, convert, id_keys=("id",))


def read_llava_conversation(
    paths: dict[str, Path], split: str, skips: SkipCounter | None = None
) -> list[Sample]:
    """``conversation_58k.json``: multi-turn conversations."""
    return read_llava_file(paths, split, skips, "llava_conversation", subset="conversation")


def read_llava_detail(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """``detail_23k.json``: one request for a detailed description per image."""
    return read_llava_file(paths, split, skips, "llava_detail", subset="detail")


def read_llava_reasoning(
    paths: dict[str, Path], split: str, skips: SkipCounter | None = None
) -> list[Sample]:
    """``complex_reasoning_77k.json``: one reasoning question per image."""
    return read_llava_file(paths, split, skips, "llava_reasoning", subset="reasoning")
