"""A model, its processor and generation settings: what ``ibkit predict``, ``ibkit chat`` and ``ibkit serve`` share.

Generation and ranking go through the library's own paths (``InstructBLIP.generate_text`` for one
question, the evaluation protocol's :func:`ibkit.eval.protocol.predict_batch` for files), so an answer
here is the answer ``ibkit test`` would score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ibkit.data.registry.common import GEN_LONG
from ibkit.data.templates import PROMPT_AS_WRITTEN

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """Which model to load.

    Args:
        pretrained: an InstructBLIP folder (transformers layout, as ``ibkit export`` or ``save_pretrained``
            write it, tokenizers included).
        checkpoint: a Lightning checkpoint of ``ibkit fit`` (its trained weights over ``pretrained``, or
            over the folder it was trained from when ``pretrained`` is not given).
        llm_dtype: dtype of the LLM (e.g. bfloat16 on a GPU); default: as saved.
        device: cuda or cpu (default: cuda when available).
    """

    pretrained: str | None = None
    checkpoint: str | None = None
    llm_dtype: str | None = None
    device: str | None = None


def load_model(source: ModelSource) -> tuple[Any, Any]:
    """(InstructBLIP in eval mode on its device, Processor) of ``source``."""
    from ibkit import InstructBLIP, Processor

    folder = source.pretrained
    state = None
    if source.checkpoint is not None:
        from ibkit.training.checkpoint import load_checkpoint_file

        state = load_checkpoint_file(source.checkpoint)
        folder = folder or state.get("ibkit", {}).get("pretrained")
        if folder is None:
            raise ValueError(f"{source.checkpoint}: the run was not trained from a folder; give --model.pretrained")
    if folder is None:
        raise ValueError("no model: give --model.pretrained FOLDER and/or --model.checkpoint FILE")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if state is None:
        model = InstructBLIP.from_pretrained(folder, dtype=source.llm_dtype)
    else:
        from ibkit.training.module import InstructBLIPModule

        module = InstructBLIPModule(pretrained=folder, llm_dtype=source.llm_dtype)
        module.configure_model()
        module.load_trainable_weights(state)
        model = module.model
    device = source.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), Processor.from_pretrained(folder)


def parse_value(text: str) -> Any:
    """``3`` -> 3, ``0.5`` -> 0.5, ``true`` -> True, ``none`` -> None, anything else stays text."""
    import yaml

    value = yaml.safe_load(text)
    return None if isinstance(value, str) and value.lower() == "none" else value


class Assistant:
    """Answers questions about images with one model.

    Args:
        model: an :class:`ibkit.InstructBLIP` (eval mode, on its device).
        processor: its :class:`ibkit.Processor`.
        generation: generation settings over ``GEN_LONG`` (the released InstructBLIP demo's: 5 beams,
            up to 256 new tokens, repetition penalty 1.5).
        prompt: how a question becomes the instruction (``{question}``; ``{context}`` when given).
    """

    def __init__(self, model: Any, processor: Any, generation: dict[str, Any] | None = None,
                 prompt: str = PROMPT_AS_WRITTEN) -> None:
        self.model, self.processor = model, processor
        self.generation = {**GEN_LONG, **(generation or {})}
        if not model.is_encoder_decoder and self.generation.get("length_penalty", 0) < 0:
            self.generation["length_penalty"] = 0.0  # as the evaluation protocol does for decoder-only LLMs
        self.prompt = prompt

    @classmethod
    def load(cls, source: ModelSource, generation: dict[str, Any] | None = None) -> Assistant:
        model, processor = load_model(source)
        return cls(model, processor, generation)

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    def settings(self) -> dict[str, Any]:
        """What the next answer is generated with (shown by chat and the web page)."""
        return {**self.generation, "prompt": self.prompt}

    def set(self, key: str, value: Any) -> None:
        """Change one setting (``prompt`` or a generation argument; None removes a generation argument)."""
        if key == "prompt":
            if not isinstance(value, str) or "{question}" not in value:
                raise ValueError("prompt must contain {question}")
            self.prompt = value
        elif value is None:
            self.generation.pop(key, None)
        else:
            self.generation[key] = value

    def instruction(self, question: str, context: str | None = None) -> str:
        from ibkit.data.templates import render

        return render(self.prompt, {"question": question.strip(), "context": context or "", "text": question})

    @torch.no_grad()
    def ask(self, images: list[Any], questions: list[str], **overrides: Any) -> list[str]:
        """One answer per (PIL image, question)."""
        prompts = [self.instruction(q) for q in questions]
        return self.model.generate_text(self.processor, images, prompts, **{**self.generation, **overrides})
