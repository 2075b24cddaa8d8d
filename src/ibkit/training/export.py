"""Training checkpoint -> a transformers ``InstructBlipForConditionalGeneration`` folder.

The checkpoint holds only the trainable weights, so the model is rebuilt from the same training
configuration (frozen parts from their pretrained files), the trainable weights are loaded strictly,
LoRA is merged, and the folder is written with the tokenizers when the configuration names them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ibkit.training.checkpoint import resolve_checkpoint

log = logging.getLogger(__name__)


def build_from_config(config_args: Sequence[str]) -> tuple[Any, Any]:
    """(module, datamodule) instantiated from ``ibkit fit``-style arguments, without running anything."""
    from ibkit.cli import build_cli

    args = [a for a in config_args if a not in ("fit", "validate", "test", "predict")]
    cli = build_cli(args, run=False)
    return cli.model, cli.datamodule


def processor_for(module: Any, datamodule: Any) -> Any:
    """The Processor (tokenizers + image settings): the model's own tokenizers, else the datamodule's folders."""
    from transformers import AutoTokenizer

    from ibkit.processor import Processor

    processor = module.processor()
    if processor is not None:
        return processor
    qformer_path = getattr(datamodule, "qformer_tokenizer_path", None)
    llm_path = getattr(datamodule, "llm_tokenizer_path", None)
    if qformer_path is None and llm_path is not None and (Path(llm_path) / "qformer_tokenizer").is_dir():
        qformer_path = str(Path(llm_path) / "qformer_tokenizer")
    if not (qformer_path and llm_path):
        return None
    vision = module.model.vision_encoder
    return Processor(
        AutoTokenizer.from_pretrained(qformer_path), AutoTokenizer.from_pretrained(llm_path),
        image_size=vision.image_size, mean=vision.mean, std=vision.std,
    )


def export_checkpoint(
    config_args: Sequence[str], ckpt_path: str | Path, output: str | Path, with_processor: bool = True
) -> Path:
    """Rebuild the model of ``config_args``, load ``ckpt_path``'s trainable weights, save to ``output``."""
    module, datamodule = build_from_config(config_args)
    module.configure_model()
    checkpoint = resolve_checkpoint(ckpt_path, prefer="best")
    log.info("exporting %s", checkpoint)
    module.load_trainable_weights(checkpoint)
    processor = processor_for(module, datamodule) if with_processor else None
    if with_processor and processor is None:
        log.warning("no tokenizers in the configuration: %s gets the model only", output)
    return module.model.save_pretrained(output, processor=processor)
