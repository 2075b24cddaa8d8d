"""The shapes datasets as registry entries, and the score of random guessing on each.

Importing this module registers the 12 specs with :mod:`ibkit.data.registry` (the registry imports it
when it lists datasets), so the shapes datasets load like any real dataset.
"""

from __future__ import annotations

from ibkit.data.registry import (
    PROMPT_CAPTION,
    PROMPT_OCR_QA,
    PROMPT_SHORT_QA,
    PROMPT_VQG,
    DatasetSpec,
    list_specs,
    register,
)
from ibkit.shapes.reader import read_shapes
from ibkit.shapes.tasks import (
    HATEFUL_QUESTION,
    NUM_CLIP_FRAMES,
    NUM_DIALOG_CANDIDATES,
    NUM_ICONQA_OPTIONS,
    NUM_MC_OPTIONS,
    TRUE_FALSE,
    VIDEO_VOCAB,
)

SUITE = "shapes"

# The shapes suite keeps its own generation settings, not LAVIS's for the paper's data (no repetition
# penalty: answers are one or two words from a small vocabulary). ``min_new_tokens`` is LAVIS's min_length,
# which counts the T5 decoder start token: 2 is one answer token for the demo's T5.
GEN_SHAPES_CAPTION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 2, "length_penalty": 1.0}
# Like the real caption setting but without its 10-token minimum: a one-shape caption is ~4 tokens long.
GEN_SHORT = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 2, "length_penalty": -1.0}
GEN_QUESTION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 2, "length_penalty": 1.0}

_MC_PROMPT = "Question: {question} Options: {options}. Short answer:"


def _spec(name: str, held_in: bool, modality: str = "image", **kwargs) -> DatasetSpec:
    splits = ("train", "val") if held_in else ("val", "test")
    media = "videos" if modality == "video" else "images"
    files = {split: f"{SUITE}/{name}/{split}.json" for split in splits} | {media: f"{SUITE}/{name}/{media}"}
    return DatasetSpec(
        name=name,
        held_in=held_in,
        files=files,
        reader=read_shapes,
        splits=splits,
        modality=modality,
        suite=SUITE,
        clean_captions=False,  # generated captions: already the text the suite means to teach
        media_layout=(f"<split>/<index:06d>.{'mp4' if modality == 'video' else 'png'}  (written by the demo)",),
        **kwargs,
    )


def shapes_specs() -> list[DatasetSpec]:
    """The 12 shapes datasets: 5 held-in task families, 7 held-out ones (their real counterparts' settings)."""
    short_rank = {"eval_mode": "rank", "generation": {}}
    return [
        _spec(
            "shapes_caption",
            True,
            family="image_captioning",
            metric="cider",
            eval_mode="generate",
            prompt=PROMPT_CAPTION,
            templates="caption",
            generation=GEN_SHAPES_CAPTION,
            description="captions of 1-4 shapes (COCO Caption-like)",
        ),
        _spec(
            "shapes_vqa",
            True,
            family="image_qa",
            metric="vqa_accuracy",
            eval_mode="generate",
            prompt=PROMPT_SHORT_QA,
            templates="vqa",
            generation=GEN_SHORT,
            description="colour / shape / count / yes-no / size / side questions (VQAv2-like: several per "
                        "training picture, one per validation picture)",
        ),
        _spec(
            "shapes_vqg",
            True,
            family="image_question_generation",
            metric="none",
            eval_mode="generate",
            prompt=PROMPT_VQG,
            templates="vqg",
            generation=GEN_QUESTION,
            description="answer in, question out (VQG from VQAv2-like data)",
        ),
        _spec(
            "shapes_ocrvqa",
            True,
            family="image_qa_reading_comprehension",
            metric="accuracy",
            eval_mode="generate",
            prompt=PROMPT_OCR_QA,
            templates="vqa_ocr",
            generation=GEN_SHORT,
            description="what word is written (OCR tokens given; OCR-VQA-like)",
        ),
        _spec(
            "shapes_mcvqa",
            True,
            family="knowledge_grounded_image_qa",
            metric="accuracy",
            prompt=_MC_PROMPT,
            templates="multiple_choice",
            **short_rank,
            description="4-option multiple-choice questions (A-OKVQA MC-like)",
        ),
        _spec(
            "shapes_vsr",
            False,
            family="visual_reasoning",
            metric="accuracy",
            prompt="Based on the image, is this statement true or false? {question}",
            templates="true_false",
            **short_rank,
            description="spatial statements, rank false/true (VSR-like)",
        ),
        _spec(
            "shapes_iconqa",
            False,
            family="visual_reasoning",
            metric="accuracy",
            prompt=_MC_PROMPT,
            templates="multiple_choice",
            **short_rank,
            description="counting with 3 options (IconQA choose_txt-like)",
        ),
        _spec(
            "shapes_scienceqa",
            False,
            family="knowledge_grounded_image_qa",
            metric="accuracy",
            prompt="Context: {context} Question: {question} Options: {options}. Answer:",
            templates="multiple_choice",
            **short_rank,
            description="a context sentence + question + 4 options (ScienceQA-IMG-like)",
        ),
        _spec(
            "shapes_hatefulmemes",
            False,
            family="image_classification",
            metric="auc",
            prompt='This is an image with: "{text}" written on it. ' + HATEFUL_QUESTION + " Answer:",
            templates="classification",
            **short_rank,
            description="is the written colour the colour of a shape? rank no/yes, AUC (HatefulMemes-like)",
        ),
        _spec(
            "shapes_visdial",
            False,
            family="visual_conversational_qa",
            metric="mrr",
            prompt="Dialog history: {context} Question: {question} Short answer:",
            templates="dialog",
            **short_rank,
            description=f"dialog history + question, rank {NUM_DIALOG_CANDIDATES} candidates",
        ),
        _spec(
            "shapes_msvdqa",
            False,
            modality="video",
            family="video_qa",
            metric="accuracy",
            prompt=PROMPT_SHORT_QA,
            templates="video_qa",
            **short_rank,
            description=f"{NUM_CLIP_FRAMES}-frame clips of a moving shape, rank the answer vocabulary",
        ),
        _spec(
            "shapes_nocaps",
            False,
            family="image_captioning",
            metric="cider",
            eval_mode="generate",
            prompt=PROMPT_CAPTION,
            templates="caption",
            generation=GEN_SHAPES_CAPTION,
            description="captions of colour-shape pairs never seen in held-in data (NoCaps-like)",
        ),
    ]


def _harmonic(n: int) -> float:
    return sum(1.0 / k for k in range(1, n + 1))


_CHANCE = {
    "shapes_caption": 0.0,
    "shapes_vqa": 0.0,
    "shapes_vqg": 0.0,
    "shapes_ocrvqa": 0.0,
    "shapes_mcvqa": 1.0 / NUM_MC_OPTIONS,
    "shapes_vsr": 1.0 / len(TRUE_FALSE),
    "shapes_iconqa": 1.0 / NUM_ICONQA_OPTIONS,
    "shapes_scienceqa": 1.0 / NUM_MC_OPTIONS,
    "shapes_hatefulmemes": 0.5,  # AUC of a random score
    "shapes_visdial": _harmonic(NUM_DIALOG_CANDIDATES) / NUM_DIALOG_CANDIDATES,  # E[1/rank], rank uniform
    "shapes_msvdqa": 1.0 / len(VIDEO_VOCAB),
    "shapes_nocaps": 0.0,  # CIDEr of unrelated text
}


def chance_level(name: str) -> float:
    """The expected score of random guessing on ``name`` in its own metric (generated text scores 0)."""
    if name not in _CHANCE:
        raise KeyError(f"no chance level for {name!r}; shapes datasets: {', '.join(sorted(_CHANCE))}")
    return _CHANCE[name]


SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in shapes_specs()}


def register_shapes() -> None:
    """Register the shapes specs that the registry lacks (idempotent: safe after a registry reset)."""
    registered = {spec.name for spec in list_specs(SUITE)}
    for spec in SPECS.values():
        if spec.name not in registered:
            register(spec)


register_shapes()
