"""The one record type every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One instruction-tuning or evaluation example.

    Readers fill the raw fields (``question``, ``answers`` ...); the template stage fills
    ``instruction`` (the text both the Q-Former and the LLM see) and ``target`` (the training answer).
    A record may give the Q-Former a question of its own (``qformer_question``: another wording of the
    same request); the same template then fills ``qformer_instruction`` from it, and the LLM still reads
    ``instruction``.
    """

    dataset: str
    sample_id: str
    image: str | list[str] | None = None  # path(s) to image file(s); a list for multi-image records
    video: str | None = None  # path to a video file (video QA)
    question: str | None = None  # raw question / statement / caption seed, before templating
    answers: list[str] = field(default_factory=list)  # all reference answers (captions, VQA answers)
    target: str | None = None  # the answer the model is trained to produce
    instruction: str | None = None  # the filled template, without the visual prompt
    candidates: list[str] | None = None  # options / answer vocabulary for ranking
    label: int | None = None  # index of the correct candidate, or class label (HatefulMemes)
    ocr_tokens: list[str] | None = None  # scene-text tokens (TextCaps, TextVQA, OCR-VQA)
    context: str | None = None  # ScienceQA lecture/hint, dialog history, earlier conversation turns
    extra: dict[str, Any] = field(default_factory=dict)  # dataset-specific fields (e.g. question_type)
    qformer_question: str | None = None  # the Q-Former's own wording of ``question``; None: it reads the LLM's
    qformer_instruction: str | None = None  # ``qformer_question`` in the template of ``instruction``
