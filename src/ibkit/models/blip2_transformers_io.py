"""Read and write transformers' BLIP-2 folders: ``Blip2ForImageTextRetrieval`` (stage 1) and
``Blip2ForConditionalGeneration`` (stage 2, T5 or decoder-only LLM).

The BLIP-2 layout differs from InstructBlip's (whose mapping ``transformers_io`` owns and this module
reuses) only in the Q-Former: transformers keeps the embedding LayerNorm as ``qformer.layernorm`` and, in
the retrieval model, the text embeddings at the top level (``embeddings.*``); ibkit keeps both under
``qformer.embeddings``. Stage 1's ITG head and temperature have no place in transformers' retrieval model:
they go to a side file (``SIDE_FILE``) that transformers never opens and ibkit reads back.

:class:`ibkit.models.blip2.Blip2Stage1` reads and writes its folders through its ``from_pretrained`` /
``save_pretrained``, which call this module; so this module does not import it: the retrieval loader is
handed the class to build, and the rest works on the model's attributes.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from ibkit.models import transformers_io
from ibkit.models.instructblip import InstructBLIP
from ibkit.models.language import LanguageModel, resolve_dtype
from ibkit.models.lora import has_lora, merged_copy
from ibkit.models.qformer import BERT_DEC_TOKEN_ID
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

#: the stage-1 model class a retrieval folder is loaded into (Blip2Stage1 or a subclass)
Stage1T = TypeVar("Stage1T", bound=nn.Module)

log = logging.getLogger(__name__)

RETRIEVAL = "Blip2ForImageTextRetrieval"
GENERATION = "Blip2ForConditionalGeneration"
#: stage-1 tensors transformers has no place for (ITG head, temperature), in ibkit names
SIDE_FILE = "ibkit_blip2_stage1.safetensors"
_SIDE_KEYS = re.compile(r"^(lm_head\.|temp$)")
_TEXT_ONLY = re.compile(r"^qformer\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)")

# transformers name prefix <-> ibkit name prefix, for the Q-Former parts the InstructBlip mapping lacks
_QFORMER_RENAMES = (
    ("qformer.layernorm.", "qformer.embeddings.layernorm."),
    ("embeddings.word_embeddings.", "qformer.embeddings.word_embeddings."),
    ("embeddings.position_embeddings.", "qformer.embeddings.position_embeddings."),
)


def _rename(key: str, to_ibkit: bool) -> str:
    for hf, ours in _QFORMER_RENAMES:
        old, new = (hf, ours) if to_ibkit else (ours, hf)
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def hf_to_ibkit_blip2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers BLIP-2 tensor names -> ibkit names (either model class)."""
    return {_rename(k, True): v for k, v in transformers_io.hf_to_ibkit_state(state).items()}


def ibkit_to_hf_blip2_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """ibkit tensors -> transformers BLIP-2 names; for a stage-1 model the side-file tensors are left out."""
    if not hasattr(model, "language_model"):  # stage 1, no LLM: hand the InstructBlip mapping an empty one
        model = SimpleNamespace(state_dict=model.state_dict, language_model=SimpleNamespace(base_model=nn.Module()))
    state = transformers_io.ibkit_to_hf_state(model)
    return {_rename(k, False): v for k, v in state.items() if not _SIDE_KEYS.match(k)}


# -- configs ----------------------------------------------------------------------------------------
def _vision_config(encoder: nn.Module) -> dict[str, Any]:
    if not isinstance(encoder, EVAViT) or encoder.config.stem_channels:
        raise NotImplementedError(
            "transformers' BLIP-2 folders hold an EVA-ViT with a linear patch embedding, not "
            f"{type(encoder).__name__}; save an ibkit checkpoint instead"
        )
    values = {k: getattr(encoder.config, k) for k in EVAViTConfig.__dataclass_fields__}
    for key in ("stem_channels", "stem_batchnorm"):
        values.pop(key)
    return values


def _qformer_config(cfg: Any, encoder_width: int, text_input: bool) -> dict[str, Any]:
    values = {k: v for k, v in cfg.__dict__.items() if k not in ("cross_attention_freq", "instruction_aware")}
    values.update(cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=encoder_width,
                  use_qformer_text_input=text_input)
    return values


def retrieval_config_dict(model: nn.Module, image_token_index: int | None = None) -> dict[str, Any]:
    """``config.json`` of a ``Blip2ForImageTextRetrieval`` folder describing ``model``."""
    return {
        "model_type": "blip-2",
        "architectures": [RETRIEVAL],
        "vision_config": _vision_config(model.vision_encoder),
        "qformer_config": _qformer_config(model.qformer_config, model.vision_encoder.width, text_input=True),
        "num_query_tokens": model.num_query_tokens,
        "image_text_hidden_size": model.embed_dim,
        "image_token_index": image_token_index,
        "ibkit": {
            "ln_vision_eps": model.ln_vision.eps,
            "dec_token_id": model.dec_token_id,
            "tie_lm_head": model.lm_head.decoder is None,
            "temperature_range": list(model.temperature_range),
        },
    }


def generation_config_dict(model: InstructBLIP) -> dict[str, Any]:
    """``config.json`` of a ``Blip2ForConditionalGeneration`` folder describing a BLIP-2-mode InstructBLIP."""
    cfg = transformers_io.hf_config_dict(model, getattr(model, "image_token_index", None))
    cfg["qformer_config"]["use_qformer_text_input"] = False
    cfg.update(model_type="blip-2", architectures=[GENERATION])
    return cfg


# -- loading ----------------------------------------------------------------------------------------
def _read_config(directory: Path, architecture: str) -> dict[str, Any]:
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory}: config.json is missing; not a transformers/ibkit model directory")
    cfg = json.loads(config_file.read_text())
    if cfg.get("model_type") != "blip-2":
        raise ValueError(f"{config_file}: model_type {cfg.get('model_type')!r} is not 'blip-2'")
    found = cfg.get("architectures") or []
    if architecture not in found:
        raise ValueError(f"{config_file}: architectures {found} do not include {architecture}")
    return cfg


def blip2_architecture(path: str | Path) -> str:
    """``Blip2ForImageTextRetrieval`` or ``Blip2ForConditionalGeneration`` for a local BLIP-2 folder."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    for name in (RETRIEVAL, GENERATION):
        if name in (cfg.get("architectures") or []):
            return name
    raise ValueError(f"{path}: not a BLIP-2 retrieval or generation folder (architectures {cfg.get('architectures')})")


def _check(directory: Path, missing: list[str], unexpected: list[str], strict: bool) -> None:
    if strict and (missing or unexpected):
        raise ValueError(f"{directory}: weights do not match the config: missing {missing[:10]}, unexpected {unexpected[:10]}")


def load_blip2_retrieval(cls: type[Stage1T], path: str | Path, strict: bool = True, **stage1_kwargs: Any) -> Stage1T:
    """A stage-1 model ``cls`` (``Blip2Stage1.from_pretrained`` passes its class) from a
    ``Blip2ForImageTextRetrieval`` folder (local or hub id, e.g. ``Salesforce/blip2-itm-vit-g``), in eval mode.

    Without ibkit's side file (any folder transformers wrote) the ITG head starts fresh (its vocabulary
    matrix is the tied word embeddings, so only its transform and bias are new) and the temperature is
    0.07; ``stage1_kwargs`` set the loss options (e.g. ``gather_with_grad``).
    """
    directory = transformers_io._resolve(path)
    cfg = _read_config(directory, RETRIEVAL)
    extra = cfg.get("ibkit", {})
    vision_cfg = transformers_io.vision_config_from_hf(cfg.get("vision_config", {}))
    qformer_cfg = transformers_io.qformer_config_from_hf(cfg.get("qformer_config", {}), instruction_aware=True)
    options = dict(
        num_query_tokens=cfg.get("num_query_tokens", 32),
        embed_dim=cfg.get("image_text_hidden_size", 256),
        ln_vision_eps=extra.get("ln_vision_eps", vision_cfg.layer_norm_eps),
        dec_token_id=extra.get("dec_token_id", min(BERT_DEC_TOKEN_ID, qformer_cfg.vocab_size - 1)),
        tie_lm_head=extra.get("tie_lm_head", True),
    )
    if "temperature_range" in extra:
        options["temperature_range"] = tuple(extra["temperature_range"])
    model = cls(EVAViT(vision_cfg), qformer_cfg, **{**options, **stage1_kwargs})
    state = hf_to_ibkit_blip2_state(transformers_io.read_weights(directory))  # the side file's names are ibkit's already
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = [k for k in missing if _SIDE_KEYS.match(k)]
    if fresh:
        log.info("%s: no ibkit side file; the ITG head and the temperature start fresh (%s)", directory, fresh)
    _check(directory, [k for k in missing if k not in fresh], unexpected, strict)
    model.image_token_index = cfg.get("image_token_index")
    return model.eval()


def save_blip2_retrieval(model: nn.Module, path: str | Path) -> Path:
    """Write a ``Blip2ForImageTextRetrieval`` folder (+ ibkit's side file with the ITG head and temperature)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    hf = transformers_io._dedupe_shared({k: v.detach().cpu() for k, v in ibkit_to_hf_blip2_state(model).items()})
    side = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if _SIDE_KEYS.match(k)}
    _write(directory / "model.safetensors", hf)
    _write(directory / SIDE_FILE, side)
    config = retrieval_config_dict(model, getattr(model, "image_token_index", None))
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def _write(file: Path, state: dict[str, torch.Tensor]) -> None:
    tmp = file.with_name(file.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(file)


def load_blip2_generation(
    path: str | Path, dtype: str | None = None, strict: bool = True, instruction_aware: bool = False
) -> InstructBLIP:
    """An InstructBLIP (BLIP-2 Q-Former) from a ``Blip2ForConditionalGeneration`` folder (local or hub id,
    e.g. ``Salesforce/blip2-flan-t5-xl``), in eval mode.

    ``instruction_aware=True`` gives the instruction-tuning starting point: the Q-Former's text side
    (absent from the folder) is freshly initialised; copy a stage-1 text side or BERT into it
    (:func:`ibkit.models.blip2.init_from_blip2`).
    """
    directory = transformers_io._resolve(path)
    cfg = _read_config(directory, GENERATION)
    extra = cfg.get("ibkit", {})
    vision_cfg = transformers_io.vision_config_from_hf(cfg.get("vision_config", {}))
    qformer_cfg = transformers_io.qformer_config_from_hf(cfg.get("qformer_config", {}), instruction_aware=instruction_aware)
    text_cfg = dict(cfg["text_config"])
    text_cfg.setdefault("model_type", "opt" if cfg.get("use_decoder_only_language_model", True) else "t5")
    model = InstructBLIP(
        vision_encoder=EVAViT(vision_cfg),
        language_model=LanguageModel(config=text_cfg),
        qformer=qformer_cfg,
        num_query_tokens=cfg.get("num_query_tokens", 32),
        ln_vision_eps=extra.get("ln_vision_eps", vision_cfg.layer_norm_eps),
    )
    state = hf_to_ibkit_blip2_state(transformers_io.read_weights(directory))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.language_model.base_model.tie_weights()
    tied = transformers_io._tied_names(model)
    fresh = [k for k in missing if instruction_aware and _TEXT_ONLY.match(k)]
    if fresh:
        log.info("%s: the Q-Former's text side (%d tensors) is freshly initialised", directory, len(fresh))
    _check(directory, [k for k in missing if k not in tied and k not in fresh], unexpected, strict)
    model.image_token_index = cfg.get("image_token_index")
    if dtype is not None:
        model.language_model.to(resolve_dtype(dtype))
    return model.eval()


def save_blip2_generation(model: InstructBLIP, path: str | Path, processor: Any = None, merge_lora: bool = True) -> Path:
    """Write a ``Blip2ForConditionalGeneration`` folder from a stage-2 (BLIP-2-mode) InstructBLIP."""
    if model.qformer_config.instruction_aware:
        raise ValueError("Blip2ForConditionalGeneration has no Q-Former text side: save an instruction-aware "
                         "model with InstructBLIP.save_pretrained (InstructBlip layout)")
    if model.language_model.lora is not None or has_lora(model.qformer):
        if not merge_lora:
            raise ValueError("the transformers layout has no LoRA adapters: save with merge_lora=True")
        model = merged_copy(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = transformers_io._dedupe_shared({k: v.detach().cpu() for k, v in ibkit_to_hf_blip2_state(model).items()})
    _write(directory / "model.safetensors", state)
    (directory / "config.json").write_text(json.dumps(generation_config_dict(model), indent=2, sort_keys=True))
    if processor is not None:
        processor.save_pretrained(directory)
    return directory

