"""Video question answering datasets (read by ``ibkit.data.readers.video``): MSVD-QA, MSRVTT-QA, iVQA;
all held-out, 4 frames each."""

from __future__ import annotations

from ibkit.data.registry.common import GEN_SHORT, PROMPT_SHORT_QA
from ibkit.data.registry.spec import DatasetSpec, LazyReader

SPECS: list[DatasetSpec] = [
    DatasetSpec(
        name="msvd_qa",
        family="video_qa",
        held_in=False,
        modality="video",
        files={s: f"msvd_qa/{s}_qa.json" for s in ("train", "val", "test")}
        | {
            "youtube_mapping": "msvd_qa/youtube_mapping.txt",
            "vocab": "msvd_qa/train_ans2label.json",
            "videos": "msvd_qa/videos",
        },
        optional=("vocab",),
        reader=LazyReader("ibkit.data.readers.video:read_msvd_qa"),
        splits=("train", "val", "test"),
        eval_split="test",
        metric="accuracy",
        eval_mode="rank",
        prompt=PROMPT_SHORT_QA,
        templates="video_qa",
        generation={},
        description="MSVD-QA (rank LAVIS's answer vocabulary, train_ans2label.json; 4 frames)",
        media_layout=(
            "<youtube_id>_<start>_<end>.avi  (MSVD YouTubeClips; the clip of vid<video_id> in youtube_mapping.txt)",
        ),
    ),
    DatasetSpec(
        name="msrvtt_qa",
        family="video_qa",
        held_in=False,
        modality="video",
        files={s: f"msrvtt_qa/{s}_qa.json" for s in ("train", "val", "test")}
        | {"vocab": "msrvtt_qa/train_ans2label.json", "videos": "msrvtt_qa/videos"},
        optional=("vocab",),
        reader=LazyReader("ibkit.data.readers.video:read_msrvtt_qa"),
        splits=("train", "val", "test"),
        eval_split="test",
        metric="accuracy",
        eval_mode="rank",
        prompt=PROMPT_SHORT_QA,
        templates="video_qa",
        generation={},
        description="MSRVTT-QA (rank LAVIS's answer vocabulary, train_ans2label.json; 4 frames)",
        media_layout=("video<video_id>.mp4  (TrainValVideo/ and TestVideo/ merged)",),
    ),
    DatasetSpec(
        name="ivqa",
        family="video_qa",
        held_in=False,
        modality="video",
        files={s: f"ivqa/{s}.csv" for s in ("train", "val", "test")} | {"videos": "ivqa/videos"},
        reader=LazyReader("ibkit.data.readers.video:read_ivqa"),
        splits=("train", "val", "test"),
        eval_split="test",
        metric="ivqa_accuracy",
        eval_mode="generate",
        prompt=PROMPT_SHORT_QA,
        templates="video_qa",
        generation=GEN_SHORT,
        description="iVQA (5 answers each; 4 frames)",
        media_layout=("<video_id>.mp4  (the clip is the csv row's start/end seconds)",),
    ),
]
