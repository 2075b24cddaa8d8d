"""Load the original LAVIS InstructBLIP checkpoints into ibkit (and from there, the transformers layout).

A LAVIS model comes in three pieces:

- ``instruct_blip_*_trimmed.pth``: a dict whose ``"model"`` entry holds the trained parts: ``query_tokens``,
  ``ln_vision.*``, ``Qformer.bert.*`` and the projection (``t5_proj.*`` for FlanT5, ``llm_proj.*`` for
  Vicuna); sometimes ``visual_encoder.*`` and ``t5_model.*``/``llm_model.*`` too;
- ``eva_vit_g.pth``: the EVA-CLIP ViT-g state dict without prefix (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.{i}.*``; 40 blocks, of which InstructBLIP uses the first 39);
- the LLM as a transformers directory (FlanT5-XL/XXL or Vicuna v1.1 7B/13B).

LAVIS details reproduced here (salesforce/LAVIS ``blip2.py``, ``blip2_t5_instruct.py``,
``blip2_vicuna_instruct.py``, ``eva_vit.py``, ``Qformer.py``): the qkv bias of the ViT is stored as
``q_bias``/``v_bias``; ``ln_vision`` is a LayerNorm with eps 1e-5; the Q-Former vocabulary is
bert-base-uncased plus ``[DEC]`` (30523 rows); its MLM head ``Qformer.cls.*`` and the
``position_ids`` buffer are not used; FlanT5 runs with exact GELU in its gated FFN (``dense_act_fn="gelu"``);
Vicuna's tokenizer gets a ``[PAD]`` token (vocab 32001, the LLM embeddings are resized) and uses ``</s>``
as BOS, EOS and UNK.

Every file is read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ibkit.models.instructblip import InstructBLIP
from ibkit.models.language import LanguageModel, resolve_dtype
from ibkit.models.qformer import QFormerConfig
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig
from ibkit.processor import DEC_TOKEN, Processor, load_qformer_tokenizer

log = logging.getLogger(__name__)

#: variant -> (projection prefix, LLM prefix) in the LAVIS state dict
VARIANTS = {"flant5": ("t5_proj", "t5_model"), "vicuna": ("llm_proj", "llm_model")}
#: LAVIS builds ``ln_vision`` as a default ``nn.LayerNorm``
LAVIS_LN_VISION_EPS = 1e-5

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "norm1.": "layer_norm1.",
    "norm2.": "layer_norm2.",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.q_bias": "self_attn.q_bias",
    "attn.v_bias": "self_attn.v_bias",
    "attn.proj.": "self_attn.projection.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_QFORMER_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


# -- key mapping ------------------------------------------------------------------------------------
def vit_key_to_ibkit(key: str) -> str | None:
    """``eva_vit_g.pth`` name (no prefix) -> ibkit ``vision_encoder.*`` name; None for tensors ibkit has no use for."""
    if key == "cls_token":
        return "vision_encoder.embeddings.class_embedding"
    if key == "pos_embed":
        return "vision_encoder.embeddings.position_embedding"
    if key.startswith("patch_embed.proj."):
        return "vision_encoder.embeddings.patch_embedding." + key.removeprefix("patch_embed.proj.")
    if m := _BLOCK.match(key):
        index, rest = m.groups()
        for old, new in _BLOCK_PARTS.items():
            if rest.startswith(old):
                return f"vision_encoder.encoder.layers.{index}.{new}{rest.removeprefix(old)}"
    return None


def lavis_key_to_ibkit(key: str) -> str | None:
    """LAVIS InstructBLIP state-dict name -> ibkit name (LLM weights excluded); None when ibkit drops it."""
    if key.startswith("visual_encoder."):
        return vit_key_to_ibkit(key.removeprefix("visual_encoder."))
    if key == "query_tokens" or key.startswith("ln_vision."):
        return key
    if key.startswith("Qformer.bert."):
        rest = key.removeprefix("Qformer.bert.")
        if rest.endswith("position_ids") or rest.startswith("pooler."):
            return None
        if rest.startswith("embeddings.LayerNorm."):
            rest = "embeddings.layernorm." + rest.removeprefix("embeddings.LayerNorm.")
        rest = re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", rest)
        return "qformer." + rest
    for proj, _ in VARIANTS.values():
        if key.startswith(proj + "."):
            return "language_projection." + key.removeprefix(proj + ".")
    return None


# -- files ------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True ({err})") from err


def _tensor_dict(obj: Any, path: Path, wrappers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: under one of ``wrappers`` or the object itself."""
    if isinstance(obj, Mapping):
        for key in wrappers:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (under {' or '.join(map(repr, wrappers))} or at the top)")
    return dict(obj)


def read_lavis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of an ``instruct_blip_*.pth`` file."""
    path = Path(path)
    return _tensor_dict(_torch_load(path), path, ("model",))


def read_vit_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The EVA ViT state dict of ``eva_vit_g.pth`` (plain names; a ``visual_encoder.`` prefix is removed)."""
    path = Path(path)
    state = _tensor_dict(_torch_load(path), path, ("model", "state_dict", "module"))
    return {k.removeprefix("visual_encoder."): v for k, v in state.items()}


# -- shapes from the checkpoint ---------------------------------------------------------------------
def infer_qformer_config(
    state: Mapping[str, torch.Tensor], path: str | Path, num_attention_heads: int | None = None
) -> tuple[QFormerConfig, int, int]:
    """Q-Former shape, number of queries and encoder width read off the tensors of a LAVIS state dict.

    The number of heads is in no shape: without ``num_attention_heads`` BERT's 64-wide heads are assumed.
    """
    bert = {k.removeprefix("Qformer.bert."): v for k, v in state.items() if k.startswith("Qformer.bert.")}
    if "query_tokens" not in state or not bert:
        raise ValueError(f"{path}: no query_tokens / Qformer.bert.* tensors; not an InstructBLIP/BLIP-2 LAVIS checkpoint")
    num_queries, hidden = state["query_tokens"].shape[1:]
    layers = sorted({int(m.group(1)) for k in bert if (m := _QFORMER_LAYER.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{path}: Q-Former layers {layers} are not numbered 0..n-1")
    key = "encoder.layer.0.intermediate_query.dense.weight"
    if key not in bert:
        raise ValueError(f"{path}: missing Qformer.bert.{key}")
    cross = sorted({int(m.group(1)) for k in bert if (m := _QFORMER_LAYER.match(k)) and ".crossattention." in k})
    if not cross or cross[0] != 0:
        raise ValueError(f"{path}: the Q-Former must cross-attend in layer 0, found cross-attention in {cross}")
    freq = cross[1] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), freq)):
        raise ValueError(f"{path}: cross-attention layers {cross} do not follow a fixed frequency")
    encoder_width = bert["encoder.layer.0.crossattention.self.key.weight"].shape[1]
    if num_attention_heads is None:
        if hidden % 64:
            raise ValueError(f"{path}: Q-Former width {hidden} is not a multiple of 64; pass qformer_config with the head count")
        num_attention_heads = int(hidden) // 64
    values: dict[str, Any] = dict(
        hidden_size=int(hidden),
        num_hidden_layers=len(layers),
        num_attention_heads=num_attention_heads,
        intermediate_size=int(bert[key].shape[0]),
        cross_attention_freq=freq,
        instruction_aware="embeddings.word_embeddings.weight" in bert,
    )
    if values["instruction_aware"]:
        values["vocab_size"] = int(bert["embeddings.word_embeddings.weight"].shape[0])
        values["max_position_embeddings"] = int(bert["embeddings.position_embeddings.weight"].shape[0])
    return QFormerConfig(**values), int(num_queries), int(encoder_width)


def _check_qformer_config(given: QFormerConfig, inferred: QFormerConfig, path: str | Path) -> None:
    fields = ["hidden_size", "num_hidden_layers", "intermediate_size", "cross_attention_freq", "instruction_aware"]
    if inferred.instruction_aware:
        fields += ["vocab_size", "max_position_embeddings"]
    for name in fields:
        if getattr(given, name) != getattr(inferred, name):
            raise ValueError(
                f"{path}: qformer_config.{name}={getattr(given, name)!r} but the checkpoint has {getattr(inferred, name)!r}"
            )


def _interpolate_positions(pos: torch.Tensor, num_positions: int, source: str) -> torch.Tensor:
    """LAVIS's ``interpolate_pos_embed``: bicubic resize of the patch grid, CLS position kept."""
    old_side, new_side = int((pos.shape[1] - 1) ** 0.5), int((num_positions - 1) ** 0.5)
    if old_side**2 + 1 != pos.shape[1] or new_side**2 + 1 != num_positions:
        raise ValueError(f"{source}: pos_embed with {pos.shape[1]} positions cannot be resized to {num_positions}")
    log.info("%s: interpolating pos_embed from %dx%d to %dx%d", source, old_side, old_side, new_side, new_side)
    grid = pos[:, 1:].float().reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1).to(pos.dtype)
    return torch.cat((pos[:, :1], grid), dim=1)


# -- tokenizers -------------------------------------------------------------------------------------
def has_tokenizer(directory: Path) -> bool:
    """Whether a folder holds tokenizer files (an LLM folder may carry its weights only)."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "spiece.model")
    return any((directory / n).is_file() for n in names)


def lavis_llm_tokenizer(llm_dir: str | Path, variant: str) -> Any:
    """The LLM tokenizer as LAVIS sets it up: Vicuna gets ``[PAD]`` and ``</s>`` as BOS/EOS/UNK."""
    from transformers import AutoTokenizer

    if variant == "vicuna":
        tok = AutoTokenizer.from_pretrained(
            llm_dir, truncation_side="left", bos_token="</s>", eos_token="</s>", unk_token="</s>"
        )
        tok.add_special_tokens({"pad_token": "[PAD]"})
        if hasattr(tok, "update_post_processor"):  # make the new BOS the one prepended to prompts
            tok.update_post_processor()
        return tok
    return AutoTokenizer.from_pretrained(llm_dir, truncation_side="left")


def lavis_processor(llm_dir: str | Path, variant: str, qformer_tokenizer_dir: str | Path, image_size: int = 224):
    """An ``ibkit.Processor`` with the LAVIS tokenizers (saved next to a converted model)."""
    return Processor(
        load_qformer_tokenizer(qformer_tokenizer_dir), lavis_llm_tokenizer(llm_dir, variant), image_size=image_size
    )


# -- the LLM ----------------------------------------------------------------------------------------
def _build_llm(
    llm: str | Path | LanguageModel, variant: str, dtype: str | None, t5_exact_gelu: bool
) -> LanguageModel:
    if isinstance(llm, LanguageModel):
        return llm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    directory = Path(llm)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a transformers model directory (no config.json)")
    config = AutoConfig.from_pretrained(directory)
    if variant == "flant5" and t5_exact_gelu and hasattr(config, "dense_act_fn"):
        config.dense_act_fn = "gelu"  # LAVIS: exact GELU in T5's gated FFN
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": resolve_dtype(dtype)} if dtype is not None else {}
    model = auto.from_pretrained(directory, config=config, **kwargs)
    return LanguageModel.from_model(model)


def _target_llm_vocab(
    variant: str, llm: str | Path | LanguageModel, llm_state: Mapping[str, torch.Tensor], explicit: int | None
) -> tuple[int | None, int | None, str]:
    """(vocabulary size the LLM must have, pad id to set, why): ``explicit``, else the checkpoint's LLM
    embeddings, else the LAVIS tokenizer (Vicuna: ``[PAD]`` added); the pad id always from that tokenizer."""
    size, pad_id, why = None, None, ""
    if variant == "vicuna" and not isinstance(llm, LanguageModel) and has_tokenizer(Path(llm)):
        tok = lavis_llm_tokenizer(llm, variant)
        size, pad_id, why = len(tok), tok.pad_token_id, f"the LAVIS tokenizer of {llm} ([PAD] added)"
    for key, value in llm_state.items():
        if key.endswith(("embed_tokens.weight", "shared.weight")):
            size, why = int(value.shape[0]), f"the checkpoint's {key}"
            break
    if explicit is not None:
        size, why = explicit, "llm_vocab_size"
    return size, pad_id, why


def _resize_llm(lm: LanguageModel, size: int, pad_id: int | None, why: str) -> None:
    base = lm.base_model
    current = base.get_input_embeddings().weight.shape[0]
    if size < current:
        if pad_id is not None:  # a tokenizer shorter than the (padded) embedding matrix: nothing to add
            size = current
        else:
            raise ValueError(f"{why} asks for an LLM vocabulary of {size}, smaller than the LLM's {current}")
    if size > current:
        log.info("resizing the LLM vocabulary %d -> %d (%s)", current, size, why)
        base.resize_token_embeddings(size)
    if pad_id is not None:
        base.config.pad_token_id = pad_id
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.pad_token_id = pad_id


# -- loading ----------------------------------------------------------------------------------------
@dataclass
class LavisLoadReport:
    """What happened to every tensor: ``mapped`` (source key -> ibkit key), ``missing`` ibkit keys,
    ``unused`` source keys (with their file), and the LLM tensors found in the checkpoint."""

    mapped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    llm_loaded: list[str] = field(default_factory=list)
    llm_unused: list[str] = field(default_factory=list)

    def log(self) -> None:
        log.info("LAVIS keys mapped: %d", len(self.mapped))
        for src, dst in self.mapped.items():
            log.debug("  %s -> %s", src, dst)
        log.info("LLM tensors taken from the checkpoint: %d", len(self.llm_loaded))
        log.info("missing: %s", self.missing or "none")
        log.info("unused (dropped on purpose or unknown): %s", _summarise(self.unused + self.llm_unused) or "none")


def _summarise(keys: list[str], limit: int = 20) -> str:
    """Collapse repeated layer indices so a 40-block ViT does not print 600 lines."""
    groups: dict[str, int] = {}
    for key in keys:
        pattern = re.sub(r"\.\d+\.", ".*.", key)
        groups[pattern] = groups.get(pattern, 0) + 1
    items = [f"{k} (x{n})" if n > 1 else k for k, n in groups.items()]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _detect_variant(state: Mapping[str, torch.Tensor], variant: str | None, path: Path) -> str:
    found = [name for name, (proj, _) in VARIANTS.items() if any(k.startswith(proj + ".") for k in state)]
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")
    if len(found) > 1:
        raise ValueError(f"{path}: holds both t5_proj and llm_proj; cannot tell the variant")
    if variant is None:
        if not found:
            raise ValueError(f"{path}: missing the projection (t5_proj.* or llm_proj.*); pass variant to see all missing keys")
        return found[0]
    if found and found[0] != variant:
        raise ValueError(f"{path}: variant {variant!r} expects {VARIANTS[variant][0]}.* but the file holds {VARIANTS[found[0]][0]}.*")
    return variant


def load_lavis_with_report(
    checkpoint: str | Path,
    vit_checkpoint: str | Path | None,
    llm: str | Path | LanguageModel,
    variant: str | None = None,
    qformer_tokenizer_dir: str | Path | None = None,
    vision_config: EVAViTConfig | None = None,
    qformer_config: QFormerConfig | None = None,
    image_size: int | None = None,
    llm_dtype: str | None = None,
    llm_vocab_size: int | None = None,
    t5_exact_gelu: bool = True,
) -> tuple[InstructBLIP, LavisLoadReport]:
    """:func:`load_lavis`, also returning what was mapped, missing and unused."""
    checkpoint = Path(checkpoint)
    log.info("reading %s", checkpoint)
    state = read_lavis_checkpoint(checkpoint)
    variant = _detect_variant(state, variant, checkpoint)
    proj_prefix, llm_prefix = VARIANTS[variant]
    origin = {k: checkpoint for k in state}
    sources = dict(state)
    if vit_checkpoint is not None:
        vit_path = Path(vit_checkpoint)
        log.info("reading %s", vit_path)
        for key, value in read_vit_checkpoint(vit_path).items():
            name = "visual_encoder." + key
            if name not in sources:  # like LAVIS: the InstructBLIP checkpoint overrides the ViT file
                sources[name], origin[name] = value, vit_path
    vit_files = " / ".join(str(p) for p in (checkpoint, vit_checkpoint) if p is not None)

    # -- shapes
    heads = qformer_config.num_attention_heads if qformer_config is not None else None
    inferred, num_queries, encoder_width = infer_qformer_config(state, checkpoint, heads)
    if qformer_config is not None:
        _check_qformer_config(qformer_config, inferred, checkpoint)
    qcfg = qformer_config or inferred
    if qformer_tokenizer_dir is not None and qcfg.instruction_aware:
        tok = load_qformer_tokenizer(qformer_tokenizer_dir)
        if len(tok) != qcfg.vocab_size:
            raise ValueError(
                f"{qformer_tokenizer_dir}: the Q-Former tokenizer has {len(tok)} tokens (with {DEC_TOKEN}) "
                f"but {checkpoint} has {qcfg.vocab_size} word embeddings"
            )
    vcfg = vision_config or EVAViTConfig()
    if image_size is not None:
        vcfg = EVAViTConfig(**{**vcfg.__dict__, "image_size": image_size})
    cls_token = sources.get("visual_encoder.cls_token")
    if cls_token is not None and cls_token.shape[-1] != vcfg.hidden_size:
        raise ValueError(f"{origin['visual_encoder.cls_token']}: ViT width {cls_token.shape[-1]} != vision_config.hidden_size {vcfg.hidden_size}")
    if encoder_width != vcfg.hidden_size:
        raise ValueError(f"{checkpoint}: the Q-Former cross-attends to width {encoder_width}, the ViT has {vcfg.hidden_size}")

    # -- the LLM
    log.info("loading the LLM from %s", llm)
    llm_state = {k.removeprefix(llm_prefix + "."): v for k, v in state.items() if k.startswith(llm_prefix + ".")}
    lm = _build_llm(llm, variant, llm_dtype, t5_exact_gelu)
    if (variant == "flant5") != lm.is_encoder_decoder:
        raise ValueError(f"variant {variant!r} needs a {'T5 (encoder-decoder)' if variant == 'flant5' else 'decoder-only'} LLM; {llm} is not")
    size, pad_id, why = _target_llm_vocab(variant, llm, llm_state, llm_vocab_size)
    if size is not None:
        _resize_llm(lm, size, pad_id, why)
    elif variant == "vicuna":
        log.warning("vicuna: no tokenizer in %s and no llm_model weights in %s; the LLM keeps its vocabulary "
                    "(LAVIS adds [PAD]: pass llm_vocab_size=32001 for the released models)", llm, checkpoint)

    model = InstructBLIP(EVAViT(vcfg), lm, qcfg, num_query_tokens=num_queries, ln_vision_eps=LAVIS_LN_VISION_EPS)

    # -- the trained parts and the ViT
    report = LavisLoadReport()
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    filled: set[str] = set()
    with torch.no_grad():
        for key, value in sources.items():
            if key.startswith(llm_prefix + "."):
                continue
            name = lavis_key_to_ibkit(key)
            if name is None or name not in target:
                report.unused.append(f"{key} ({origin[key]})")
                continue
            if name == "vision_encoder.embeddings.position_embedding" and value.shape != target[name].shape:
                value = _interpolate_positions(value, target[name].shape[1], f"{origin[key]}")
            if value.shape != target[name].shape:
                raise ValueError(
                    f"{origin[key]}: {key} has shape {tuple(value.shape)}, the model needs {tuple(target[name].shape)} for {name}"
                )
            target[name].copy_(value.to(target[name].dtype))
            report.mapped[key] = name
            filled.add(name)
    report.missing = [k for k in target if k not in filled]
    if report.missing:
        vit_missing = [k for k in report.missing if k.startswith("vision_encoder.")]
        other_missing = [k for k in report.missing if k not in vit_missing]
        problems = []
        for keys, where in ((other_missing, str(checkpoint)), (vit_missing, vit_files)):
            if keys:
                hints = [_lavis_name_hint(k, proj_prefix) for k in keys[:8]]
                problems.append(f"{where}: missing required LAVIS keys for {len(keys)} tensors, e.g. {hints}")
        raise ValueError("; ".join(problems))

    # -- LLM weights stored in the checkpoint (not in the released trimmed files)
    if llm_state:
        base = lm.base_model
        expected = base.state_dict()
        matching = {k: v for k, v in llm_state.items() if k in expected}
        for key, value in matching.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"{checkpoint}: {llm_prefix}.{key} has shape {tuple(value.shape)}, the LLM needs {tuple(expected[key].shape)}")
        base.load_state_dict(matching, strict=False)
        report.llm_loaded = sorted(matching)
        report.llm_unused = [f"{llm_prefix}.{k} ({checkpoint})" for k in llm_state if k not in expected]

    report.log()
    return model.eval(), report


def _lavis_name_hint(ibkit_name: str, proj_prefix: str) -> str:
    """The LAVIS name a missing ibkit tensor would have had (for error messages)."""
    name = ibkit_name
    if name.startswith("vision_encoder."):
        for old, new in (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                         ("embeddings.patch_embedding.", "patch_embed.proj."), ("encoder.layers.", "blocks."),
                         ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."), ("self_attn.projection.", "attn.proj."),
                         ("self_attn.", "attn.")):
            name = name.replace(old, new)
        return "visual_encoder." + name.removeprefix("vision_encoder.")
    if name.startswith("qformer."):
        name = name.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
        name = re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", name)
        return "Qformer.bert." + name.removeprefix("qformer.")
    if name.startswith("language_projection."):
        return proj_prefix + "." + name.removeprefix("language_projection.")
    return name


def load_lavis(
    checkpoint: str | Path,
    vit_checkpoint: str | Path | None,
    llm: str | Path | LanguageModel,
    variant: str | None = None,
    qformer_tokenizer_dir: str | Path | None = None,
    **kwargs: Any,
) -> InstructBLIP:
    """An :class:`InstructBLIP` from LAVIS files (see the module docstring).

    Args:
        checkpoint: ``instruct_blip_*_trimmed.pth`` (state dict under ``"model"``).
        vit_checkpoint: ``eva_vit_g.pth``; may be None when ``checkpoint`` holds ``visual_encoder.*``.
        llm: a transformers LLM directory (FlanT5 or Vicuna) or a ready :class:`LanguageModel`.
        variant: ``"flant5"`` or ``"vicuna"``; read off the projection's name when None.
        qformer_tokenizer_dir: bert-base-uncased tokenizer directory; checks that it (plus ``[DEC]``) fits
            the Q-Former's vocabulary.
        **kwargs: ``vision_config`` (default ViT-g/14, 39 blocks), ``qformer_config`` (default: read off the
            tensors, 64-wide heads), ``image_size``, ``llm_dtype``, ``llm_vocab_size`` (default: from the
            checkpoint's LLM weights or the LAVIS tokenizer), ``t5_exact_gelu`` (default True, as LAVIS).
    """
    model, _ = load_lavis_with_report(checkpoint, vit_checkpoint, llm, variant, qformer_tokenizer_dir, **kwargs)
    return model
