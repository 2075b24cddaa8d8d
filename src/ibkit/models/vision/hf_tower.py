"""A transformers CLIP or SigLIP vision model as an ibkit vision encoder: read from a local directory, or
built with random weights from a config dict (a small tower to pretrain, e.g. the demo's swapped backbone).

Layer semantics. transformers' ``hidden_states`` tuple has ``num_layers + 1`` entries:
``hidden_states[0]`` is the input of the first block (for CLIP that is *after* ``pre_layrnorm``;
SigLIP has no pre-norm) and ``hidden_states[k + 1]`` is the output of block ``k``. Here ``layer`` is a
block index, Python-style, so ``layer=k`` returns ``hidden_states[k + 1]`` and the default ``layer=-2``
returns ``hidden_states[-2]``, the output of the second-to-last block, as BLIP-2 does. No
``post_layernorm`` or pooling head is applied. Blocks after the chosen one are removed at construction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD, VisionEncoder
from ibkit.models.vision.open_clip_tower import (
    cast_with_fp32_norms,
    frozen_half_dtype,
    resolve_layer,
    run_tower,
    three_floats,
)

logger = logging.getLogger(__name__)

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# model_type in config.json -> (family, has a class token); full CLIP/SigLIP directories work too, the
# vision model reads its sub-config and weights from them.
_SUPPORTED = {
    "clip_vision_model": ("clip", True),
    "clip": ("clip", True),
    "siglip_vision_model": ("siglip", False),
    "siglip": ("siglip", False),
}


def _vision_model_class(family: str) -> type[nn.Module]:
    from transformers import CLIPVisionModel, SiglipVisionModel

    return CLIPVisionModel if family == "clip" else SiglipVisionModel


def _vision_config_class(family: str) -> type:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    return CLIPVisionConfig if family == "clip" else SiglipVisionConfig


#: ``config`` model types: the vision towers only (a full CLIP config nests its tower under vision_config)
_CONFIG_TYPES = ("clip_vision_model", "siglip_vision_model")


def vision_model_from_config(config: dict[str, Any]) -> tuple[nn.Module, str]:
    """A random-weight fp32 ``CLIPVisionModel``/``SiglipVisionModel`` from a config dict, and its family.

    transformers' configs accept any keyword silently; here an unknown field is an error naming it, so a
    typo in YAML does not build a default-sized tower.
    """
    if not isinstance(config, dict):
        raise TypeError(f"HFVisionEncoder config: expected a mapping, got {type(config).__name__}")
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if model_type not in _CONFIG_TYPES:
        raise ValueError(f"HFVisionEncoder config.model_type: {model_type!r} is not supported; expected one of "
                         f"{list(_CONFIG_TYPES)}")
    family = _SUPPORTED[model_type][0]
    config_class = _vision_config_class(family)
    known = set(config_class().to_dict()) - {"model_type", "transformers_version", "architectures", "_name_or_path"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"HFVisionEncoder config: unknown field(s) {unknown} for {model_type}; known: {sorted(known)}")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size"):
        value = fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"HFVisionEncoder config.{name}: expected a positive int, got {value!r}")
    image, patch = fields.get("image_size"), fields.get("patch_size")
    if image is not None and patch is not None and image % patch:
        raise ValueError(f"HFVisionEncoder config.image_size: {image} is not a multiple of patch_size {patch}")
    try:
        hf_config = config_class(**fields)
    except Exception as error:  # noqa: BLE001 - transformers' own checks (heads dividing hidden_size, types)
        raise ValueError(f"HFVisionEncoder config: {error}") from error
    model = _vision_model_class(family)(hf_config)
    return model.float(), family


def _fp32_load_kwargs() -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


class HFVisionEncoder(VisionEncoder):
    """Token features from a chosen block of a local transformers ``CLIPVisionModel``/``SiglipVisionModel``.

    Args:
        path: directory written by ``save_pretrained`` (a vision model or a full CLIP/SigLIP model). Read
            with ``local_files_only``: never touches the network. Exclusive with ``config``.
        config: a transformers vision config as a dict, ``model_type`` ``clip_vision_model`` or
            ``siglip_vision_model`` plus its fields (``hidden_size``, ``patch_size``, ...): a tower with random
            weights, to train (``frozen: false``) or to fill with ``init_from`` (e.g. a pretrained
            ``encoder.safetensors``). Unknown fields are errors.
        layer: block whose output is returned, Python-style (``-2`` = second-to-last); see the module doc.
        keep_cls: keep CLIP's class token in front of the patch tokens (SigLIP has none).
        frozen: no gradients and eval mode for good.
        compute_dtype: ``bf16``/``fp16``: store and run the frozen tower in half precision with fp32 norms.
        mean, std: override the normalisation; by default it comes from the directory's
            ``preprocessor_config.json`` (``image_mean``/``image_std``), else the family's defaults.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        layer: int = -2,
        keep_cls: bool = True,
        frozen: bool = True,
        compute_dtype: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(frozen=frozen, compute_dtype=compute_dtype)
        if (path is None) == (config is None):
            raise ValueError("HFVisionEncoder needs exactly one of path (a save_pretrained directory) or config "
                             "(a transformers vision config dict, random weights)")
        where = f"HFVisionEncoder({path!r})" if path is not None else "HFVisionEncoder(config)"
        half = frozen_half_dtype(compute_dtype, frozen, where)
        self.path = str(path) if path is not None else None
        self.config = dict(config) if config is not None else None
        self.keep_cls = keep_cls
        file_mean = file_std = None
        if config is not None:
            model, family = vision_model_from_config(config)
        else:
            model, family = self._load(Path(path), where)
            file_mean, file_std = self._read_preprocessor(Path(path) / "preprocessor_config.json")
        self.has_cls = family == "clip"
        self.model = model
        vision = getattr(model, "vision_model", model)  # transformers < 5 nests the tower one level deeper
        layers = vision.encoder.layers
        self.num_layers = len(layers)
        self.layer = resolve_layer(layer, self.num_layers, where)
        self.block_class = type(layers[0])
        vision.encoder.layers = layers[: self.layer + 1]
        model.config.num_hidden_layers = self.layer + 1

        self.width = int(model.config.hidden_size)
        self.image_size = int(model.config.image_size)
        default_mean, default_std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
        self.mean = three_floats(mean if mean is not None else file_mean or default_mean, f"{where} mean")
        self.std = three_floats(std if std is not None else file_std or default_std, f"{where} std")

        if half is not None:
            cast_with_fp32_norms(self.model, half)
        if frozen:
            self.freeze()

    def _load(self, directory: Path, where: str) -> tuple[nn.Module, str]:
        """The vision model of a save_pretrained directory (every parameter must be in its weights)."""
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{where}: {config_file} does not exist (expected a save_pretrained directory)"
            )
        model_type = self._read_model_type(config_file)
        if model_type not in _SUPPORTED:
            raise ValueError(
                f"{config_file}: model_type {model_type!r} is not supported; expected one of {sorted(_SUPPORTED)}"
            )
        family = _SUPPORTED[model_type][0]
        model, info = _vision_model_class(family).from_pretrained(
            str(directory), local_files_only=True, output_loading_info=True, **_fp32_load_kwargs()
        )
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(
                f"{where}: the weights in {directory} lack {len(missing)} parameters of the vision model, "
                f"e.g. {missing[:5]} (they would be random)"
            )
        return model, family

    @staticmethod
    def _read_model_type(config_file: Path) -> str | None:
        try:
            return json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{config_file}: not a JSON object ({err})") from err

    @staticmethod
    def _read_preprocessor(file: Path) -> tuple[Any, Any]:
        """``image_mean``/``image_std`` from a preprocessor config, or ``(None, None)`` when absent."""
        if not file.is_file():
            return None, None
        try:
            cfg = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from err
        if not isinstance(cfg, dict):
            raise ValueError(f"{file}: expected a JSON object")
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if mean is not None:
            three_floats(mean, f"{file} image_mean")
        if std is not None:
            three_floats(std, f"{file} image_std")
        return mean, std

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        hidden_states = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        tokens = hidden_states[self.layer + 1]
        return tokens[:, 1:] if self.has_cls and not self.keep_cls else tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, N, width) tokens of block ``layer`` (no post-norm, no head)."""
        dtype = self.model.get_input_embeddings().weight.dtype
        return run_tower(self, pixel_values, self._tokens, dtype)

    def extra_repr(self) -> str:
        source = f"path={self.path!r}" if self.path is not None else f"config={self.config!r}"
        return f"{source}, layer={self.layer}, keep_cls={self.keep_cls}"
