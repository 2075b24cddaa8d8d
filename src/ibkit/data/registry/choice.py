"""Datasets answered by ranking given choices (read by ``ibkit.data.readers.choice``): VSR, IconQA,
ScienceQA, Hateful Memes; all held-out."""

from __future__ import annotations

from ibkit.data.registry.common import PROMPT_MULTIPLE_CHOICE
from ibkit.data.registry.spec import DatasetSpec, LazyReader

SPECS: list[DatasetSpec] = [
    DatasetSpec(
        name="vsr",
        family="visual_reasoning",
        held_in=False,
        files={s: f"vsr/splits/zeroshot/{s}.jsonl" for s in ("train", "dev", "test")}
        | {"images": "vsr/images"},
        reader=LazyReader("ibkit.data.readers.choice:read_vsr"),
        splits=("train", "dev", "test"),
        eval_split="test",
        metric="accuracy",
        eval_mode="rank",
        prompt="Based on the image, is this statement true or false? {question}",
        templates="true_false",
        generation={},
        description="Visual Spatial Reasoning, zero-shot split",
        media_layout=("<image>  (the record's COCO 2017 file name, e.g. 000000085637.jpg)",),
    ),
    DatasetSpec(
        name="iconqa",
        family="visual_reasoning",
        held_in=False,
        files={s: "iconqa/iconqa_data/problems.json" for s in ("train", "val", "test")}
        | {"pid_splits": "iconqa/iconqa_data/pid_splits.json", "images": "iconqa/iconqa_data/iconqa"},
        reader=LazyReader("ibkit.data.readers.choice:read_iconqa"),
        splits=("train", "val", "test"),
        eval_split="test",
        metric="accuracy",
        eval_mode="rank",
        prompt=PROMPT_MULTIPLE_CHOICE,
        templates="multiple_choice",
        generation={},
        description="IconQA choose_txt sub-task (problems.json + pid_splits.json)",
        media_layout=("<split>/choose_txt/<pid>/image.png",),
    ),
    DatasetSpec(
        name="scienceqa",
        family="knowledge_grounded_image_qa",
        held_in=False,
        files={s: "scienceqa/problems.json" for s in ("train", "val", "test", "minival")}
        | {"pid_splits": "scienceqa/pid_splits.json", "images": "scienceqa/images"},
        reader=LazyReader("ibkit.data.readers.choice:read_scienceqa"),
        splits=("train", "val", "test", "minival"),
        eval_split="test",
        metric="accuracy",
        eval_mode="rank",
        prompt="Context: {context} Question: {question} Options: {options}. Answer:",
        templates="multiple_choice",
        generation={},
        description="ScienceQA, questions with an image only",
        media_layout=("<split>/<pid>/<image>  (image.png)",),
    ),
    DatasetSpec(
        name="hatefulmemes",
        family="image_classification",
        held_in=False,
        files={
            s: f"hatefulmemes/{s}.jsonl"
            for s in ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
        }
        | {"images": "hatefulmemes"},
        reader=LazyReader("ibkit.data.readers.choice:read_hatefulmemes"),
        splits=("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen"),
        eval_split="dev_seen",
        metric="auc",
        eval_mode="rank",
        prompt='This is an image with: "{text}" written on it. Is it hateful? Answer:',
        templates="classification",
        generation={},
        description="Hateful Memes (candidates no/yes = label 0/1)",
        media_layout=("img/<id:05d>.png  (the record's img)",),
    ),
]
