"""Images + text -> model inputs: the eval image transform and both tokenizers in one object."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ibkit.data.transforms import eval_transform
from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD


class Processor:
    """Turns PIL images (or CHW tensors) and prompts into the keyword arguments of ``InstructBLIP``.

    Both texts are truncated on the left (the end of an instruction matters most), 128 tokens each.
    The LLM prompt carries no image placeholder tokens: the model prepends the visual vectors itself.
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
    ) -> None:
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.max_qformer_length = max_qformer_length
        self.max_prompt_length = max_prompt_length
        self.image_transform = eval_transform(image_size, mean, std)

    def images(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() in (4, 5):
            return images
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.image_transform(img.convert("RGB") if hasattr(img, "convert") else img) for img in images])

    def tokenize(self, tokenizer: Any, text: list[str], max_length: int, padding_side: str) -> dict[str, torch.Tensor]:
        tokenizer.truncation_side = "left"
        tokenizer.padding_side = padding_side
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(text, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, images: Any = None, text: str | list[str] | None = None, padding_side: str = "right") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
            q = self.tokenize(self.qformer_tokenizer, text, self.max_qformer_length, "right")
            out["qformer_input_ids"], out["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
            p = self.tokenize(self.llm_tokenizer, text, self.max_prompt_length, padding_side)
            out["input_ids"], out["attention_mask"] = p["input_ids"], p["attention_mask"]
        return out

    # -- persistence: the transformers InstructBlipProcessor layout ---------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.llm_tokenizer.save_pretrained(directory)
        self.qformer_tokenizer.save_pretrained(directory / "qformer_tokenizer")
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

        directory = Path(path)
        qformer_dir = directory / "qformer_tokenizer"
        if not qformer_dir.is_dir():
            raise FileNotFoundError(f"{directory}: no qformer_tokenizer/ folder (InstructBlipProcessor layout)")
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
