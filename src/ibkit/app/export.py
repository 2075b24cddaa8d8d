"""Training checkpoint -> a transformers ``InstructBlipForConditionalGeneration`` folder (BLIP-2 pre-training:
stage 1 -> ``Blip2ForImageTextRetrieval``, stage 2 -> ``Blip2ForConditionalGeneration``).

The checkpoint holds only the trainable weights, so the model is rebuilt from the same training
configuration (frozen parts from their pretrained files), the trainable weights are loaded strictly,
LoRA is merged, and the folder is written with the tokenizers when the configuration names them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def processor_for(module: Any, datamodule: Any) -> Any:
    """The Processor (tokenizers + image settings): the model's own tokenizers, else the datamodule's folders."""
    from transformers import AutoTokenizer

    from ibkit.data.tokenize import nested_qformer_tokenizer
    from ibkit.processor import Processor

    processor = module.processor()
    if processor is not None:
        return processor
    qformer_path = getattr(datamodule, "qformer_tokenizer_path", None)
    llm_path = getattr(datamodule, "llm_tokenizer_path", None)
    if qformer_path is None and llm_path is not None:
        qformer_path = nested_qformer_tokenizer(llm_path)
    if not (qformer_path and llm_path):
        return None
    vision = module.model.vision_encoder
    return Processor(
        AutoTokenizer.from_pretrained(qformer_path), AutoTokenizer.from_pretrained(llm_path),
        image_size=vision.image_size, mean=vision.mean, std=vision.std,
    )


def export_checkpoint(
    module: Any, datamodule: Any, ckpt_path: str | Path, output: str | Path, with_processor: bool = True
) -> Path:
    """Load ``ckpt_path``'s trainable weights into ``module`` (built from the run's configuration), save to ``output``."""
    from ibkit.training.checkpoint import resolve_checkpoint

    module.configure_model()
    checkpoint = resolve_checkpoint(ckpt_path, prefer="best")
    log.info("exporting %s", checkpoint)
    module.load_trainable_weights(checkpoint)
    processor = processor_for(module, datamodule) if with_processor else None
    if with_processor and processor is None:
        log.warning("no tokenizers in the configuration: %s gets the model only", output)
    if hasattr(module, "save_model"):  # BLIP-2 pre-training: a Blip2ForImageTextRetrieval / ...ConditionalGeneration folder
        return module.save_model(output, processor=processor)
    return module.model.save_pretrained(output, processor=processor)


def export(module: Any, datamodule: Any, ckpt_path: str, output: Path, no_processor: bool = False) -> Path:
    """Write a training checkpoint as a transformers-loadable model folder.

    Every other option (--config FILE, --model.x=..., --data.y=...) is the training
    configuration, as given to ibkit fit; it builds module and datamodule.

    Args:
        module: the training module of the run's configuration.
        datamodule: the datamodule of the run's configuration (tokenizer folders).
        ckpt_path: a .ckpt file, or a checkpoint folder (its best checkpoint, else last.ckpt).
        output: folder to write.
        no_processor: do not save the tokenizers/processor.
    """
    out = export_checkpoint(module, datamodule, ckpt_path, output, with_processor=not no_processor)
    print(f"wrote {out}")
    return out
