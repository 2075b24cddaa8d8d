"""LAVIS BLIP-2 stage-1 checkpoints (``blip2_pretrained.pth``, ``blip2_pretrained_vitL.pth``) -> :class:`Blip2Stage1`.

Stage 1 adds to the InstructBLIP names that ``ibkit.convert.lavis`` maps: the ITG head
``Qformer.cls.predictions.*`` (its ``decoder.weight`` is tied to the word embeddings in LAVIS, and
``decoder.bias`` is ``bias``), ``vision_proj``/``text_proj``, ``itm_head`` and ``temp``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ibkit.convert.lavis import (
    LAVIS_LN_VISION_EPS,
    infer_qformer_config,
    lavis_key_to_ibkit,
    read_lavis_checkpoint,
    read_vit_checkpoint,
)
from ibkit.models.blip2 import BERT_DEC_TOKEN_ID, Blip2Stage1
from ibkit.models.vision.base import VisionEncoder
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

log = logging.getLogger(__name__)

_STAGE1_PREFIXES = {
    "Qformer.cls.predictions.transform.": "lm_head.transform.",
    "Qformer.cls.predictions.decoder.weight": "lm_head.decoder.weight",
    "Qformer.cls.predictions.bias": "lm_head.bias",
    "vision_proj.": "vision_projection.",
    "text_proj.": "text_projection.",
    "itm_head.": "itm_head.",
    "temp": "temp",
}


def lavis_stage1_key_to_ibkit(key: str) -> str | None:
    """LAVIS stage-1 name -> :class:`Blip2Stage1` name; None for tensors without a place (e.g. the copy
    ``decoder.bias`` of ``bias``)."""
    for old, new in _STAGE1_PREFIXES.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key.removeprefix(old)
    return lavis_key_to_ibkit(key)


def load_lavis_stage1(
    checkpoint: str | Path,
    vit_checkpoint: str | Path | None = None,
    vision_encoder: VisionEncoder | None = None,
    num_attention_heads: int | None = None,
    strict: bool = True,
    **stage1_kwargs: Any,
) -> Blip2Stage1:
    """A :class:`Blip2Stage1` from LAVIS files, in eval mode.

    The image encoder: ``vision_encoder`` as given (its weights from ``visual_encoder.*`` in the checkpoint
    or ``vit_checkpoint`` when those hold any), else EVA ViT-g with 39 blocks from those files.
    ``stage1_kwargs`` go to :class:`Blip2Stage1` (e.g. ``dec_token_id``, ``gather_with_grad``).
    """
    checkpoint = Path(checkpoint)
    state = read_lavis_checkpoint(checkpoint)
    if vit_checkpoint is not None:
        for key, value in read_vit_checkpoint(vit_checkpoint).items():
            state.setdefault("visual_encoder." + key, value)
    qcfg, num_queries, width = infer_qformer_config(state, checkpoint, num_attention_heads)
    if not qcfg.instruction_aware:
        raise ValueError(f"{checkpoint}: no Q-Former text embeddings; a stage-2 checkpoint, not stage 1")
    encoder = vision_encoder or EVAViT(EVAViTConfig())
    if encoder.width != width:
        raise ValueError(f"{checkpoint}: the Q-Former cross-attends to width {width}, the encoder has {encoder.width}")
    tied = "Qformer.cls.predictions.decoder.weight" not in state or torch.equal(
        state["Qformer.cls.predictions.decoder.weight"], state["Qformer.bert.embeddings.word_embeddings.weight"]
    )
    options = dict(num_query_tokens=num_queries, embed_dim=state["vision_proj.weight"].shape[0],
                   ln_vision_eps=LAVIS_LN_VISION_EPS, dec_token_id=min(BERT_DEC_TOKEN_ID, qcfg.vocab_size - 1),
                   tie_lm_head=tied)
    model = Blip2Stage1(encoder, qcfg, **{**options, **stage1_kwargs})
    mapped: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in state.items():
        name = lavis_stage1_key_to_ibkit(key)
        if name == "lm_head.decoder.weight" and tied:
            continue  # the word embeddings themselves
        if name is None:
            unused.append(key)
        else:
            mapped[name] = value
    own = model.state_dict()
    has_vit = any(k.startswith("vision_encoder.") for k in mapped)
    missing = [k for k in own if k not in mapped and (has_vit or not k.startswith("vision_encoder."))]
    # ViT blocks beyond the encoder's depth (EVA-CLIP's 40th block: BLIP-2 reads the 39th's output) go unused
    unused += [k for k in mapped if k not in own and k.startswith("vision_encoder.")]
    unexpected = [k for k in mapped if k not in own and not k.startswith("vision_encoder.")]
    if strict and (missing or unexpected):
        raise ValueError(f"{checkpoint}: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)
    if not has_vit:
        log.warning("%s: no visual_encoder weights (pass vit_checkpoint); the image encoder keeps its own", checkpoint)
    ignored = [k for k in unused if not k.endswith(("position_ids", "decoder.bias"))]
    if ignored:
        log.info("%s: %d tensors not used, e.g. %s", checkpoint, len(ignored), ignored[:5])
    return model.eval()
