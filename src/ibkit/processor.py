"""Images + text -> model inputs: the eval image transform and both tokenizers in one object.

The Processor owns the tokenizers: it finds and loads them for a model (:meth:`Processor.for_model`),
saves them with it, and checks that a datamodule's own tokenizers number the model's tokens alike
(:meth:`Processor.check_data_tokenizers`). Text goes through :func:`ibkit.data.tokenize.tokenize_prompts`,
the function the training collator uses too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ibkit.data.tokenize import (
    QFORMER_TOKENIZER_DIR,
    nested_qformer_tokenizer,
    pad_id,
    pad_rows,
    row_mask,
    tokenize_prompts,
)
from ibkit.data.transforms import eval_transform
from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD

#: BLIP-2's decoder token, added to bert-base-uncased as BOS (LAVIS's ``init_tokenizer``)
DEC_TOKEN = "[DEC]"


def load_qformer_tokenizer(folder: str | Path) -> Any:
    """bert-base-uncased's tokenizer plus ``[DEC]`` (as BOS), truncating on the left, as in LAVIS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, truncation_side="left")
    if DEC_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


class Processor:
    """Turns PIL images (or CHW tensors) and prompts into the keyword arguments of ``InstructBLIP``.

    Both texts are truncated on the left (the end of an instruction matters most), 128 tokens each.
    The LLM prompt carries no image placeholder tokens: the model prepends the visual vectors itself.
    ``source`` names where the tokenizers came from (for error messages).
    """

    def __init__(
        self,
        qformer_tokenizer: Any,
        llm_tokenizer: Any,
        image_size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        max_qformer_length: int = 128,
        max_prompt_length: int = 128,
        source: str | None = None,
    ) -> None:
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.max_qformer_length = max_qformer_length
        self.max_prompt_length = max_prompt_length
        self.image_transform = eval_transform(image_size, mean, std)
        self.source = source

    def images(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() in (4, 5):
            return images
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.image_transform(img.convert("RGB") if hasattr(img, "convert") else img) for img in images])

    def tokenize(self, tokenizer: Any, text: list[str], max_length: int, padding_side: str) -> dict[str, torch.Tensor]:
        """Each text inside the tokenizer's special tokens, cut on the left, padded to the longest."""
        rows = tokenize_prompts(tokenizer, text, max_length)
        left = padding_side == "left"
        pad = pad_id(tokenizer, "prompt", allow_eos=True)
        return {"input_ids": pad_rows(rows, pad, left), "attention_mask": row_mask(rows, left)}

    def __call__(self, images: Any = None, text: str | list[str] | None = None, padding_side: str = "right",
                 qformer_text: str | list[str] | None = None) -> dict[str, torch.Tensor]:
        """Pixels and both tokenizations of ``text``; ``qformer_text`` (one per text) gives the Q-Former another
        wording to read instead, as a record's ``qformer_question`` does in training."""
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if qformer_text is not None and text is None:
            raise ValueError("qformer_text is the Q-Former's wording of `text`: give `text` as well")
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
            own = text if qformer_text is None else [qformer_text] if isinstance(qformer_text, str) else list(qformer_text)
            if len(own) != len(text):
                raise ValueError(f"qformer_text has {len(own)} text(s) for {len(text)} prompt(s): give one per prompt")
            q = self.tokenize(self.qformer_tokenizer, own, self.max_qformer_length, "right")
            out["qformer_input_ids"], out["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
            p = self.tokenize(self.llm_tokenizer, text, self.max_prompt_length, padding_side)
            out["input_ids"], out["attention_mask"] = p["input_ids"], p["attention_mask"]
        return out

    # -- persistence: the transformers InstructBlipProcessor layout ---------------------------------------
    def save_pretrained(self, path: str | Path, llm_tokenizer: Any = None, num_query_tokens: int | None = None) -> None:
        """The InstructBlipProcessor layout. ``llm_tokenizer``: saved instead of this processor's (the model's
        export passes one with the image placeholder token); ``num_query_tokens``: how many placeholders
        transformers' processor puts in front of a prompt (written to ``processor_config.json``)."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        (llm_tokenizer or self.llm_tokenizer).save_pretrained(directory)
        self.qformer_tokenizer.save_pretrained(directory / QFORMER_TOKENIZER_DIR)
        if num_query_tokens is not None:
            (directory / "processor_config.json").write_text(json.dumps(
                {"processor_class": "InstructBlipProcessor", "num_query_tokens": int(num_query_tokens)}, indent=2
            ))
        (directory / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "BlipImageProcessor",
                    "do_resize": True,
                    "size": {"height": self.image_size, "width": self.image_size},
                    "resample": 3,
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                    "do_normalize": True,
                    "image_mean": list(self.mean),
                    "image_std": list(self.std),
                    "do_convert_rgb": True,
                },
                indent=2,
            )
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Processor:
        from transformers import AutoTokenizer

        kwargs.setdefault("source", str(path))
        directory = Path(path)
        qformer_dir = nested_qformer_tokenizer(directory)
        if qformer_dir is None:
            raise FileNotFoundError(f"{directory}: no {QFORMER_TOKENIZER_DIR}/ folder (InstructBlipProcessor layout)")
        image_size, mean, std = 224, CLIP_MEAN, CLIP_STD
        pre = directory / "preprocessor_config.json"
        if pre.exists():
            cfg = json.loads(pre.read_text())
            size = cfg.get("size", {})
            image_size = size.get("height", size.get("shortest_edge", image_size)) if isinstance(size, dict) else size
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        return cls(
            AutoTokenizer.from_pretrained(qformer_dir),
            AutoTokenizer.from_pretrained(directory),
            image_size=image_size,
            mean=mean,
            std=std,
            **kwargs,
        )

    # -- the tokenizers of a model ---------------------------------------------------------------------
    @classmethod
    def for_model(
        cls,
        model: Any,
        qformer_tokenizer: str | None = None,
        llm_tokenizer: str | None = None,
        pretrained: str | None = None,
    ) -> Processor | None:
        """The Processor of ``model`` (image settings from its encoder), None when no tokenizers are known.

        Tokenizers come from the named folders (the Q-Former's gets ``[DEC]``; the LLM's defaults to the
        folder the LLM was loaded from), else from the ``pretrained`` model folder's InstructBlipProcessor
        layout.
        """
        from transformers import AutoTokenizer

        llm_path = llm_tokenizer
        if llm_path is None:
            source = getattr(model.language_model.hf_config, "_name_or_path", "") or ""
            llm_path = source if source and Path(source).is_dir() else None
        if qformer_tokenizer and llm_path:
            tokenizers = (load_qformer_tokenizer(qformer_tokenizer), AutoTokenizer.from_pretrained(llm_path))
        elif pretrained and nested_qformer_tokenizer(pretrained) is not None:
            saved = cls.from_pretrained(pretrained)
            tokenizers = (saved.qformer_tokenizer, saved.llm_tokenizer)
        else:
            return None
        vision = model.vision_encoder
        return cls(*tokenizers, image_size=vision.image_size, mean=vision.mean, std=vision.std,
                   source=pretrained or llm_tokenizer)

    def check_data_tokenizers(self, qformer_tokenizer: Any, llm_tokenizer: Any,
                              paths: tuple[str | None, str | None] = (None, None)) -> None:
        """Refuse data tokenizers that give the model's tokens other ids: every prediction would be garbage.

        Extra tokens (a pad token appended, as LAVIS does for Vicuna) are fine; a token both know under two
        ids is not (e.g. word-level vocabularies built from differently rendered data). ``paths``: the data's
        tokenizer folders, for the message.
        """
        for role, mine, theirs, path in (
            ("Q-Former", self.qformer_tokenizer, qformer_tokenizer, paths[0]),
            ("LLM", self.llm_tokenizer, llm_tokenizer, paths[1]),
        ):
            if theirs is None or theirs is mine:
                continue
            vocab, data_vocab = mine.get_vocab(), theirs.get_vocab()
            moved = sorted(t for t, i in vocab.items() if data_vocab.get(t, i) != i)
            if moved:
                raise ValueError(
                    f"the data's {role} tokenizer ({path or 'set by the datamodule'}) gives {len(moved)} of the model's "
                    f"{len(vocab)} tokens other ids than the model's own (e.g. {moved[:3]}); point the data config's "
                    f"tokenizer at the model's ({self.source}) or leave it unset"
                )
