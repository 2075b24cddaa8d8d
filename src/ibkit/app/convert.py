"""``ibkit convert lavis``: LAVIS checkpoint files -> a transformers InstructBlip folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)


def convert_lavis(
    checkpoint: Path,
    llm: Path,
    output: Path,
    vit_checkpoint: Path | None = None,
    variant: Literal["flant5", "vicuna"] | None = None,
    qformer_tokenizer: Path | None = None,
    image_size: int | None = None,
    llm_dtype: str | None = None,
    llm_vocab_size: int | None = None,
    no_t5_exact_gelu: bool = False,
    qformer_config: Path | None = None,
    vision_config: Path | None = None,
) -> int:
    """Convert a LAVIS InstructBLIP checkpoint to a transformers InstructBlip directory.

    The folder runs in transformers' InstructBlipForConditionalGeneration: its config names an image
    placeholder token (``<image>``, added to the saved LLM tokenizer; without tokenizers, a new row after
    the LLM vocabulary), the LLM embeddings grown to hold it, as transformers' own LAVIS conversion does.

    Args:
        checkpoint: instruct_blip_*_trimmed.pth.
        llm: transformers directory of FlanT5-XL/XXL or Vicuna-7B/13B v1.1.
        output: directory to write (transformers layout).
        vit_checkpoint: eva_vit_g.pth.
        variant: default: from the checkpoint.
        qformer_tokenizer: bert-base-uncased tokenizer directory; with it the processor is saved too.
        image_size: default 224.
        llm_dtype: dtype of the LLM (bf16, fp16, fp32); default: as stored.
        llm_vocab_size: LLM vocabulary after LAVIS's added tokens (Vicuna: 32001); default: checkpoint/tokenizer.
        no_t5_exact_gelu: keep T5's tanh GELU instead of LAVIS's exact GELU.
        qformer_config: JSON file of QFormerConfig fields (non-standard shapes).
        vision_config: JSON file of EVAViTConfig fields (non-standard shapes).
    """
    from ibkit.convert.lavis import has_tokenizer, lavis_processor, load_lavis_with_report
    from ibkit.models import EVAViTConfig, QFormerConfig

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    qformer = QFormerConfig(**json.loads(Path(qformer_config).read_text())) if qformer_config else None
    vision = EVAViTConfig(**json.loads(Path(vision_config).read_text())) if vision_config else None
    model, report = load_lavis_with_report(
        checkpoint,
        vit_checkpoint,
        llm,
        variant=variant,
        qformer_tokenizer_dir=qformer_tokenizer,
        vision_config=vision,
        qformer_config=qformer,
        image_size=image_size,
        llm_dtype=llm_dtype,
        llm_vocab_size=llm_vocab_size,
        t5_exact_gelu=not no_t5_exact_gelu,
    )
    processor = None
    if qformer_tokenizer is not None:
        if has_tokenizer(Path(llm)):
            kind = "flant5" if model.is_encoder_decoder else "vicuna"
            processor = lavis_processor(llm, kind, qformer_tokenizer, model.vision_encoder.image_size)
        else:
            log.warning("%s has no tokenizer files: the processor is not saved", llm)
    out = model.save_pretrained(output, processor=processor)
    log.info("wrote %s (%d tensors mapped from LAVIS)", out, len(report.mapped))
    return 0
