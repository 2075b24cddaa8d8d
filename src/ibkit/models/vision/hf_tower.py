"""A transformers CLIP or SigLIP vision model, read from a local directory, as an ibkit vision encoder.

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


def _fp32_load_kwargs() -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


class HFVisionEncoder(VisionEncoder):
    """Token features from a chosen block of a local transformers ``CLIPVisionModel``/``SiglipVisionModel``.

    Args:
        path: directory written by ``save_pretrained`` (a vision model or a full CLIP/SigLIP model). Read
            with ``local_files_only``: never touches the network.
        layer: block whose output is returned, Python-style (``-2`` = second-to-last); see the module doc.
        keep_cls: keep CLIP's class token in front of the patch tokens (SigLIP has none).
        frozen: no gradients and eval mode for good.
        compute_dtype: ``bf16``/``fp16``: store and run the frozen tower in half precision with fp32 norms.
        mean, std: override the normalisation; by default it comes from the directory's
            ``preprocessor_config.json`` (``image_mean``/``image_std``), else the family's defaults.
    """

    def __init__(
        self,
        path: str,
        layer: int = -2,
        keep_cls: bool = True,
        frozen: bool = True,
        compute_dtype: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(frozen=frozen, compute_dtype=compute_dtype)
        where = f"HFVisionEncoder({path!r})"
        half = frozen_half_dtype(compute_dtype, frozen, where)
        directory = Path(path)
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
        family, self.has_cls = _SUPPORTED[model_type]
        self.path = str(directory)
        self.keep_cls = keep_cls

        model, info = _vision_model_class(family).from_pretrained(
            str(directory), local_files_only=True, output_loading_info=True, **_fp32_load_kwargs()
        )
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(
                f"{where}: the weights in {directory} lack {len(missing)} parameters of the vision model, "
                f"e.g. {missing[:5]} (they would be random)"
            )
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
        file_mean, file_std = self._read_preprocessor(directory / "preprocessor_config.json")
        self.mean = three_floats(mean if mean is not None else file_mean or default_mean, f"{where} mean")
        self.std = three_floats(std if std is not None else file_std or default_std, f"{where} std")

        if half is not None:
            cast_with_fp32_norms(self.model, half)
        if frozen:
            self.freeze()

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
        return f"path={self.path!r}, layer={self.layer}, keep_cls={self.keep_cls}"
