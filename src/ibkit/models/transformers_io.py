"""Read and write the transformers ``InstructBlipForConditionalGeneration`` directory layout.

ibkit's EVA-ViT and Q-Former use transformers' parameter names, so the mapping is a handful of
prefix renames plus the qkv bias (transformers stores ``cat(q_bias, k_bias, v_bias)``; EVA has no k
bias) and ``ln_vision`` (transformers calls it ``vision_model.post_layernorm``).

:class:`ibkit.models.instructblip.InstructBLIP` reads and writes this format through its
``from_pretrained`` / ``save_pretrained``, which call the functions here; so this module never imports
the model class: the loader is handed the class to build (``load_pretrained(cls, path)``) and the other
functions work on the model's attributes.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ibkit.models.language import LanguageModel, resolve_dtype
from ibkit.models.lora import has_lora, merged_copy
from ibkit.models.qformer import QFormerConfig
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

#: the model class a folder is loaded into (InstructBLIP or a subclass)
ModelT = TypeVar("ModelT", bound=nn.Module)

log = logging.getLogger(__name__)

TRANSFORMERS_MODEL_TYPES = ("instructblip", "instructblipvideo")
_QKV_BIAS = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")


# -- configs ----------------------------------------------------------------------------------------
def vision_config_from_hf(cfg: dict[str, Any]) -> EVAViTConfig:
    fields = EVAViTConfig.__dataclass_fields__
    values = {k: cfg[k] for k in fields if k in cfg}
    for key in ("image_size", "patch_size"):
        if isinstance(values.get(key), (list, tuple)):
            values[key] = int(values[key][0])
    return EVAViTConfig(**values)


def qformer_config_from_hf(cfg: dict[str, Any], instruction_aware: bool = True) -> QFormerConfig:
    fields = QFormerConfig.__dataclass_fields__
    values = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
    values["cross_attention_freq"] = cfg.get("cross_attention_frequency", 2)
    values["instruction_aware"] = instruction_aware
    return QFormerConfig(**values)


def hf_config_dict(model: nn.Module, image_token_index: int | None = None) -> dict[str, Any]:
    """The transformers ``config.json`` content describing ``model`` (an InstructBLIP)."""
    if not isinstance(model.vision_encoder, EVAViT):
        raise NotImplementedError(
            f"the transformers InstructBlip layout holds an EVA-ViT encoder, not {type(model.vision_encoder).__name__}"
        )
    v, q = model.vision_encoder.config, model.qformer_config
    vision = {k: getattr(v, k) for k in EVAViTConfig.__dataclass_fields__}
    if v.stem_channels:
        log.warning("the vision encoder has a convolutional stem (stem_channels %s): the folder loads in ibkit, "
                    "transformers' InstructBlip cannot load its patch embedding", list(v.stem_channels))
    else:
        for key in ("stem_channels", "stem_batchnorm"):  # transformers' own layout, key for key
            vision.pop(key)
    qformer = {k: getattr(q, k) for k in QFormerConfig.__dataclass_fields__ if k not in ("cross_attention_freq", "instruction_aware")}
    qformer.update(cross_attention_frequency=q.cross_attention_freq, encoder_hidden_size=v.hidden_size)
    text = model.language_model.hf_config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures"):
        text.pop(key, None)
    return {
        "model_type": "instructblip",
        "architectures": ["InstructBlipForConditionalGeneration"],
        "vision_config": vision,
        "qformer_config": qformer,
        "text_config": text,
        "num_query_tokens": model.num_query_tokens,
        "image_token_index": image_token_index,
        "use_decoder_only_language_model": not model.is_encoder_decoder,
        "ibkit": {"ln_vision_eps": model.ln_vision.eps, "instruction_aware": q.instruction_aware},
    }


# -- state dicts ------------------------------------------------------------------------------------
def hf_to_ibkit_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _QKV_BIAS.match(key):
            q, k, v = value.chunk(3)
            if k.abs().max() > 0:
                warnings.warn(f"{key}: nonzero k bias ignored (EVA-ViT has no k bias)", stacklevel=2)
            prefix = f"vision_encoder.encoder.layers.{m.group(1)}.self_attn"
            out[f"{prefix}.q_bias"], out[f"{prefix}.v_bias"] = q, v
        elif key.startswith("vision_model.post_layernorm."):
            out["ln_vision." + key.removeprefix("vision_model.post_layernorm.")] = value
        elif key.startswith("vision_model."):
            out["vision_encoder." + key.removeprefix("vision_model.")] = value
        elif key.startswith("language_model."):
            out["language_model.model." + key.removeprefix("language_model.")] = value
        elif key.endswith("embeddings.position_ids"):
            continue  # a buffer, not a weight
        else:
            out[key] = value
    return out


def ibkit_to_hf_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """An InstructBLIP's tensors under transformers' names (the LLM's from its base model, without adapters)."""
    out: dict[str, torch.Tensor] = {}
    lm_state = model.language_model.base_model.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("language_model."):
            continue
        if key.startswith("vision_encoder."):
            name = "vision_model." + key.removeprefix("vision_encoder.")
            if name.endswith(".q_bias"):
                v_bias = model.state_dict()[key.replace(".q_bias", ".v_bias")]
                out[name.replace(".q_bias", ".qkv.bias")] = torch.cat((value, torch.zeros_like(value), v_bias))
                continue
            if name.endswith(".v_bias"):
                continue
            out[name] = value
        elif key.startswith("ln_vision."):
            out["vision_model.post_layernorm." + key.removeprefix("ln_vision.")] = value
        else:
            out[key] = value
    for key, value in lm_state.items():
        out["language_model." + key] = value
    return out


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first name only."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            continue
        seen[ident] = key
        out[key] = value.contiguous()
    return out


# -- files ------------------------------------------------------------------------------------------
def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory: single or sharded safetensors, or ``.bin`` files."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
    state = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _resolve(path: str | Path) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    if local.suffix in (".pth", ".pt"):
        raise ValueError(f"{path}: a LAVIS checkpoint, not a model directory; load it with "
                         "ibkit.convert.lavis.load_lavis (or convert it once: ibkit convert lavis)")
    if local.exists() or str(path).startswith((".", "/")):
        raise FileNotFoundError(f"{path}: not a model directory")
    from huggingface_hub import snapshot_download  # a hub id: the user asked for the network

    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


_QFORMER_TEXT_ONLY = re.compile(
    r"^qformer\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)"
)


def load_pretrained(
    cls: type[ModelT],
    path: str | Path,
    dtype: str | None = None,
    strict: bool = True,
    instruction_aware: bool | None = None,
) -> ModelT:
    """Load a transformers/ibkit InstructBLIP directory into a new ``cls`` (``InstructBLIP.from_pretrained``
    passes its class, so this module does not import it).

    ``instruction_aware`` overrides the saved Q-Former mode, e.g. to run the BLIP-2 ablation from an
    InstructBLIP checkpoint: False drops the Q-Former's text-only weights (word/position embeddings and
    the text feed-forward layers); True on a BLIP-2 checkpoint leaves them freshly initialised.
    The model comes back in eval mode, as transformers' ``from_pretrained`` returns it.
    """
    directory = _resolve(path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory}: config.json is missing; not a transformers/ibkit model directory")
    cfg = json.loads(config_file.read_text())
    model_type = cfg.get("model_type")
    if model_type not in TRANSFORMERS_MODEL_TYPES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not one of {TRANSFORMERS_MODEL_TYPES}")
    extra = cfg.get("ibkit", {})
    vision_cfg = vision_config_from_hf(cfg.get("vision_config", {}))
    saved_mode = extra.get("instruction_aware", True)
    mode = saved_mode if instruction_aware is None else instruction_aware
    qformer_cfg = qformer_config_from_hf(cfg.get("qformer_config", {}), mode)
    text_cfg = dict(cfg["text_config"])
    text_cfg.setdefault("model_type", "t5" if not cfg.get("use_decoder_only_language_model", False) else "llama")
    model = cls(
        vision_encoder=EVAViT(vision_cfg),
        language_model=LanguageModel(config=text_cfg),
        qformer=qformer_cfg,
        num_query_tokens=cfg.get("num_query_tokens", 32),
        ln_vision_eps=extra.get("ln_vision_eps", vision_cfg.layer_norm_eps),
    )
    state = hf_to_ibkit_state(read_weights(directory))
    if not mode and saved_mode:
        dropped = [k for k in state if _QFORMER_TEXT_ONLY.match(k)]
        state = {k: v for k, v in state.items() if k not in dropped}
        log.info("%s: BLIP-2 Q-Former requested; %d text-only Q-Former tensors not loaded", directory, len(dropped))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if mode and not saved_mode:
        fresh = [k for k in missing if _QFORMER_TEXT_ONLY.match(k)]
        missing = [k for k in missing if k not in fresh]
        log.warning("%s: a BLIP-2 Q-Former loaded as instruction-aware; %d text-only tensors are freshly "
                    "initialised", directory, len(fresh))
    model.language_model.base_model.tie_weights()
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if strict and (missing or unexpected):
        raise ValueError(f"{directory}: weights do not match the config: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.image_token_index = cfg.get("image_token_index")
    if dtype is not None:
        model.language_model.to(resolve_dtype(dtype))
    return model.eval()  # as transformers returns it: no dropout until a trainer calls train()


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that transformers ties to another (e.g. lm_head <-> input embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


# -- the image placeholder token ---------------------------------------------------------------------
#: the placeholder transformers' InstructBlipProcessor puts ``num_query_tokens`` times in front of the prompt
IMAGE_TOKEN = "<image>"


def export_image_token(model: nn.Module, llm_tokenizer: Any = None) -> tuple[int, Any]:
    """(``image_token_index``, the LLM tokenizer to save) for a transformers folder.

    ibkit prepends the visual vectors itself; transformers' InstructBlip scatters them into placeholder
    positions and fails without a placeholder id. The id is ``<image>``'s in the tokenizer, added to a
    copy of it when missing (the caller's tokenizer is left as it is), as transformers' own LAVIS
    conversion does; without a tokenizer, the model's saved index, else a new row after the vocabulary.
    """
    saved = getattr(model, "image_token_index", None)
    if llm_tokenizer is None:
        if saved is not None:
            return int(saved), None
        return model.language_model.base_model.get_input_embeddings().weight.shape[0], None
    tokenizer = llm_tokenizer
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        import copy

        from transformers import AddedToken

        tokenizer = copy.deepcopy(llm_tokenizer)
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    index = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if saved is not None and int(saved) != index:
        raise ValueError(f"the model's image_token_index is {saved}, but the LLM tokenizer numbers {IMAGE_TOKEN} "
                         f"{index}: save with the tokenizer the model was loaded with")
    return index, tokenizer


def _grow_vocabulary(model: nn.Module, state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """``state`` with the LLM's input and output embeddings grown to ``rows`` rows (the mean row appended,
    as transformers' ``resize_token_embeddings``); tensors that share storage stay shared."""
    base = model.language_model.base_model
    embeddings = {id(m.weight) for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None}
    pointers = {p.data_ptr() for n, p in base.named_parameters(remove_duplicate=False) if id(p) in embeddings}
    grown: dict[int, torch.Tensor] = {}
    out = dict(state)
    for key, value in state.items():
        if not key.startswith("language_model.") or value.dim() != 2 or value.data_ptr() not in pointers:
            continue
        if value.data_ptr() not in grown:
            extra = value.float().mean(0, keepdim=True).to(value.dtype).expand(rows - value.shape[0], -1)
            grown[value.data_ptr()] = torch.cat((value.detach(), extra))
        out[key] = grown[value.data_ptr()]
    return out


def save_pretrained(model: nn.Module, path: str | Path, processor: Any = None, merge_lora: bool = True) -> Path:
    """Write ``model`` (and ``processor``'s tokenizers) as a folder transformers' InstructBlip runs: an image
    placeholder token in the config and the saved LLM tokenizer, the LLM embeddings grown to hold it."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    if model.language_model.lora is not None or has_lora(model.qformer):
        if not merge_lora:
            raise ValueError("the transformers layout has no LoRA adapters: save with merge_lora=True")
        model = merged_copy(model)  # the user's model keeps its adapters
    index, llm_tokenizer = export_image_token(model, getattr(processor, "llm_tokenizer", None))
    config = hf_config_dict(model, index)
    if model.ln_vision.eps != model.vision_encoder.config.layer_norm_eps:
        log.info("ln_vision eps %s differs from the encoder's; transformers uses the encoder's", model.ln_vision.eps)
    state = ibkit_to_hf_state(model)
    rows = model.language_model.base_model.get_input_embeddings().weight.shape[0]
    if index >= rows:
        log.info("%s: LLM vocabulary %d -> %d for the image token %s (id %d)", directory, rows, index + 1, IMAGE_TOKEN, index)
        state = _grow_vocabulary(model, state, index + 1)
        config["text_config"]["vocab_size"] = index + 1
    if processor is None:
        log.info("%s: no tokenizer saved; transformers' image placeholder id is %d", directory, index)
    state = _dedupe_shared({k: v.detach().cpu() for k, v in state.items()})
    tmp = directory / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if processor is not None:
        processor.save_pretrained(directory, llm_tokenizer=llm_tokenizer, num_query_tokens=model.num_query_tokens)
    return directory
