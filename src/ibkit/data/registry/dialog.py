"""Dialog and instruction datasets (read by ``ibkit.data.readers.dialog``): LLaVA-Instruct-150K
(held-in, training only) and Visual Dialog (held-out)."""

from __future__ import annotations

from ibkit.data.registry.common import COCO_IMAGES, GEN_LONG, PROMPT_LLAVA
from ibkit.data.registry.spec import DatasetSpec, LazyReader

# LLaVA-Instruct-150K as LAVIS reads it: the three files merged; each spec reads its own file when it is
# there and otherwise its records of the merged one (ibkit.data.readers.dialog.llava_subset)
LLAVA_MERGED = "llava_instruct/llava_instruct_150k.json"
LLAVA_LAYOUT = ("train2017/<image>  (COCO 2017 file name of the record; a path with / is taken as given)",)

SPECS: list[DatasetSpec] = [
    # ---------------------------------------------------------------- held-in
    DatasetSpec(
        name="llava_conversation",
        family="llava_visual_instruction",
        held_in=True,
        files={"train": "llava_instruct/conversation_58k.json", "merged": LLAVA_MERGED, "images": COCO_IMAGES},
        alternatives={"train": "merged"},
        reader=LazyReader("ibkit.data.readers.dialog:read_llava_conversation"),
        splits=("train",),
        eval_split=None,
        metric="none",
        eval_mode="generate",
        prompt=PROMPT_LLAVA,
        templates="llava",
        generation=GEN_LONG,
        description="LLaVA-Instruct-150K conversations (every turn a sample, earlier turns as context)",
        media_layout=LLAVA_LAYOUT,
    ),
    DatasetSpec(
        name="llava_detail",
        family="llava_visual_instruction",
        held_in=True,
        files={"train": "llava_instruct/detail_23k.json", "merged": LLAVA_MERGED, "images": COCO_IMAGES},
        alternatives={"train": "merged"},
        reader=LazyReader("ibkit.data.readers.dialog:read_llava_detail"),
        splits=("train",),
        eval_split=None,
        metric="none",
        eval_mode="generate",
        prompt=PROMPT_LLAVA,
        templates="llava",
        generation=GEN_LONG,
        description="LLaVA-Instruct-150K detailed image descriptions",
        media_layout=LLAVA_LAYOUT,
    ),
    DatasetSpec(
        name="llava_reasoning",
        family="llava_visual_instruction",
        held_in=True,
        files={"train": "llava_instruct/complex_reasoning_77k.json", "merged": LLAVA_MERGED, "images": COCO_IMAGES},
        alternatives={"train": "merged"},
        reader=LazyReader("ibkit.data.readers.dialog:read_llava_reasoning"),
        splits=("train",),
        eval_split=None,
        metric="none",
        eval_mode="generate",
        prompt=PROMPT_LLAVA,
        templates="llava",
        generation=GEN_LONG,
        description="LLaVA-Instruct-150K complex reasoning",
        media_layout=LLAVA_LAYOUT,
    ),
    # ---------------------------------------------------------------- held-out
    DatasetSpec(
        name="visdial",
        family="visual_conversational_qa",
        held_in=False,
        files={s: f"visdial/visdial_1.0_{s}.json" for s in ("train", "val", "test")}
        | {"images": "visdial/images"},
        reader=LazyReader("ibkit.data.readers.dialog:read_visdial"),
        splits=("train", "val", "test"),
        eval_split="val",
        metric="mrr",
        eval_mode="rank",
        prompt="Dialog history: {context} Question: {question} Short answer:",
        templates="dialog",
        generation={},
        description="Visual Dialog v1.0 (rank 100 candidate answers)",
        media_layout=(
            "VisualDialog_val2018/VisualDialog_val2018_<image_id:012d>.jpg",
            "VisualDialog_test2018/VisualDialog_test2018_<image_id:012d>.jpg",
            "train2014/COCO_train2014_<image_id:012d>.jpg  (train; val2014/COCO_val2014_... when only that exists)",
        ),
    ),
]
