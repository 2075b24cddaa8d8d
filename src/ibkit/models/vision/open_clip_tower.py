"""Any open_clip image tower as an ibkit vision encoder.

BLIP-2 and InstructBLIP feed the Q-Former the patch tokens of the *second-to-last* block of a frozen
CLIP ViT, with no final norm or projection. This module does the same for any open_clip model name:
open_clip's own ``VisionTransformer`` (``ViT-L-14``, ``ViT-B-16``, ...) and timm-based towers
(``EVA01-g-14``, SigLIP, ...). Blocks after the chosen layer, the final norm and the pooling head are
removed at construction, so they cost neither memory nor compute (BLIP-2 drops EVA's 40th block the
same way).

The helpers at the top (dtype parsing, layer resolution, fp32 LayerNorms inside a half-precision
tower, the frozen forward) are shared with :mod:`ibkit.models.vision.hf_tower`.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ibkit.models.dtypes import FULL_DTYPE_NAMES, HALF_DTYPES
from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD, VisionEncoder

logger = logging.getLogger(__name__)


# -- helpers shared by the tower wrappers ---------------------------------------------------------------
def frozen_half_dtype(compute_dtype: str | None, frozen: bool, where: str) -> torch.dtype | None:
    """The half dtype a tower is stored in; only frozen towers may be (training needs fp32 weights)."""
    half = parse_compute_dtype(compute_dtype)
    if half is not None and not frozen:
        raise ValueError(
            f"{where}: compute_dtype={compute_dtype!r} stores the weights in half precision and is only for "
            "frozen towers; train the tower in fp32 and pick the precision with the trainer instead"
        )
    return half


def parse_compute_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"`` (and long spellings) -> torch dtype; ``None``/``"fp32"`` -> ``None`` (no cast)."""
    if name is None:
        return None
    key = str(name).lower().removeprefix("torch.")
    if key in FULL_DTYPE_NAMES:
        return None
    if key not in HALF_DTYPES:
        raise ValueError(
            f"compute_dtype={name!r} is not supported; use one of {sorted(HALF_DTYPES) + list(FULL_DTYPE_NAMES)} or null"
        )
    return HALF_DTYPES[key]


def resolve_layer(layer: int, num_layers: int, where: str) -> int:
    """Python-style block index (``-2`` = second-to-last block) -> index in ``[0, num_layers)``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{where}: layer must be an int, got {layer!r}")
    if not -num_layers <= layer < num_layers:
        raise ValueError(
            f"{where}: layer={layer} is out of range for a tower with {num_layers} blocks "
            f"(use 0..{num_layers - 1} or -{num_layers}..-1)"
        )
    return layer % num_layers


def _norm_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [nn.LayerNorm, nn.GroupNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    return tuple(types)


def _norm_input_to_weight_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Forward pre-hook: remember the caller's dtype and compute the norm in the norm's own (fp32) dtype.
    x = args[0]
    module._ibkit_io_dtype = x.dtype
    weight = getattr(module, "weight", None)
    target = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    return (x.to(target), *args[1:])


def _norm_output_to_input_dtype(
    module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
) -> torch.Tensor:
    return output.to(module._ibkit_io_dtype)


def cast_with_fp32_norms(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``module`` to ``dtype`` in place but keep every normalisation layer (and its math) in fp32.

    This is what LAVIS does for the frozen EVA ViT (fp16 weights, fp32 LayerNorms). Norm inputs are
    cast up to fp32 and outputs back to the caller's dtype by hooks, so the module code is untouched
    and state-dict names stay the same.
    """
    module.to(dtype)
    for sub in module.modules():
        if isinstance(sub, _norm_types()):
            sub.float()
            if not getattr(sub, "_ibkit_fp32_norm", False):
                sub.register_forward_pre_hook(_norm_input_to_weight_dtype)
                sub.register_forward_hook(_norm_output_to_input_dtype)
                sub._ibkit_fp32_norm = True


def check_pixel_values(pixel_values: torch.Tensor, where: str) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"{where}: pixel_values must be a (B, 3, H, W) tensor, got {shape}")


def run_tower(
    encoder: VisionEncoder,
    pixel_values: torch.Tensor,
    tokens_fn: Callable[[torch.Tensor], torch.Tensor],
    input_dtype: torch.dtype,
) -> torch.Tensor:
    """Cast pixels to the tower's dtype, run ``tokens_fn`` (without autograd when frozen), cast back.

    The output has the dtype of ``pixel_values`` (fp32 in the usual fp32-pixels setup), so the caller
    never sees the tower's compute dtype.
    """
    check_pixel_values(pixel_values, type(encoder).__name__)
    x = pixel_values.to(input_dtype)
    if encoder.frozen:
        with torch.no_grad():
            tokens = tokens_fn(x)
    else:
        tokens = tokens_fn(x)
    return tokens.to(pixel_values.dtype)


def _square_size(size: Any, where: str) -> int:
    if isinstance(size, int):
        return size
    height, width = tuple(size)
    if height != width:
        raise ValueError(f"{where}: only square image sizes are supported, got {height}x{width}")
    return int(height)


def three_floats(value: Any, where: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected three numbers, got {value!r}") from None
    if len(values) != 3:
        raise ValueError(f"{where}: expected three numbers (one per RGB channel), got {value!r}")
    return values  # type: ignore[return-value]


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` or torch file (``weights_only``), unwrapping common nesting."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors, truncated files, ...
            raise ValueError(
                f"checkpoint file {path!r} could not be read as a torch state dict: {err}"
            ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint file {path!r} does not hold a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


# -- open_clip --------------------------------------------------------------------------------------------
def _is_open_clip_vit(visual: nn.Module) -> bool:
    return all(
        hasattr(visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer")
    )


def _is_timm_vit(visual: nn.Module) -> bool:
    trunk = getattr(visual, "trunk", None)
    return (
        trunk is not None
        and hasattr(trunk, "blocks")
        and hasattr(trunk, "forward_intermediates")
        and hasattr(trunk, "prune_intermediate_layers")
    )


def _resize_grid_positions(pos: torch.Tensor, new_grid: int, where: str) -> torch.Tensor:
    """(1 + g*g, D) class + grid position embeddings -> (1 + n*n, D), bicubic on the grid part."""
    old_grid = math.isqrt(pos.shape[0] - 1)
    if old_grid * old_grid != pos.shape[0] - 1:
        raise ValueError(f"{where}: positional embedding of length {pos.shape[0]} is not 1 + a square grid")
    if old_grid == new_grid:
        return pos
    cls_pos, grid_pos = pos[:1], pos[1:]
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid_pos = F.interpolate(grid_pos, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat((cls_pos, grid_pos), dim=0)


class OpenCLIPVisionEncoder(VisionEncoder):
    """Token features from a chosen block of an open_clip image tower.

    Args:
        model_name: an open_clip model name (``open_clip.list_models()``), e.g. ``EVA01-g-14``, ``ViT-L-14``.
        pretrained: an open_clip pretrained tag (downloaded into the hub cache on first use: network only
            here) or a local full-CLIP checkpoint file. ``None``: random weights, unless ``checkpoint_path``.
        checkpoint_path: a local file with the weights (a full open_clip checkpoint with ``visual.*`` keys, or
            the image tower's own state dict; a bare timm trunk state dict is accepted for timm towers).
            When both are given the file supplies the weights and the tag only the mean/std (no download).
        layer: block whose output is returned, Python-style (``-2`` = second-to-last, as in BLIP-2).
        keep_cls: keep the class token (and any other prefix tokens such as registers) in front of the
            patch tokens. Towers without a class token (SigLIP) return patch tokens either way.
        image_size: run at another square resolution; position embeddings are interpolated bicubically.
        frozen: no gradients and eval mode for good (see :meth:`VisionEncoder.freeze`).
        compute_dtype: ``bf16``/``fp16``: store and run the frozen tower in half precision with fp32 norms.
        mean, std: override the normalisation read from the pretrained tag (needed for local SigLIP files,
            whose mean/std open_clip only knows through the tag).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        checkpoint_path: str | None = None,
        layer: int = -2,
        keep_cls: bool = True,
        image_size: int | None = None,
        frozen: bool = True,
        compute_dtype: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(frozen=frozen, compute_dtype=compute_dtype)
        where = f"OpenCLIPVisionEncoder({model_name!r})"
        half = frozen_half_dtype(compute_dtype, frozen, where)
        self.model_name = model_name
        self.keep_cls = keep_cls

        visual, preprocess = self._create_visual(model_name, pretrained, checkpoint_path, where)
        if _is_open_clip_vit(visual):
            self._kind = "open_clip_vit"
            blocks = visual.transformer.resblocks
            self.num_layers = len(blocks)
            self.layer = resolve_layer(layer, self.num_layers, where)
        elif _is_timm_vit(visual):
            self._kind = "timm"
            blocks = visual.trunk.blocks
            self.num_layers = len(blocks)
            self.layer = resolve_layer(layer, self.num_layers, where)
        else:
            raise TypeError(
                f"{where}: image tower {type(visual).__name__} has no sequence of transformer blocks to take tokens "
                "from; supported are open_clip's VisionTransformer and timm ViT-style trunks (EVA, SigLIP, ...)"
            )
        full_tower_keys = set(visual.state_dict())
        self.tower = self._prune(visual)
        if checkpoint_path is not None:
            self._load_checkpoint(checkpoint_path, full_tower_keys)
        if image_size is not None:
            self._set_image_size(image_size, where)

        self.block_class = type(blocks[0])
        if self._kind == "open_clip_vit":
            self.width = int(self.tower.transformer.width)
            self.image_size = _square_size(self.tower.image_size, where)
        else:
            self.width = int(self.tower.embed_dim)
            self.image_size = _square_size(self.tower.patch_embed.img_size, where)
        self.mean = three_floats(
            mean if mean is not None else preprocess.get("mean", CLIP_MEAN), f"{where} mean"
        )
        self.std = three_floats(std if std is not None else preprocess.get("std", CLIP_STD), f"{where} std")

        if half is not None:
            cast_with_fp32_norms(self.tower, half)
        if frozen:
            self.freeze()

    # -- construction ------------------------------------------------------------------------------------
    @staticmethod
    def _create_visual(
        model_name: str, pretrained: str | None, checkpoint_path: str | None, where: str
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Build the CLIP model with open_clip, keep its image tower, return it with its mean/std config."""
        import open_clip

        has_schema = model_name.startswith(
            ("hf-hub:", "local-dir:")
        )  # open_clip reads config + weights there
        if not has_schema and model_name not in open_clip.list_models():
            raise ValueError(f"{where}: unknown open_clip model name; see open_clip.list_models()")
        tag_cfg = (
            open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained and not has_schema else {}
        )
        if pretrained and not has_schema and not tag_cfg and not os.path.isfile(pretrained):
            raise ValueError(
                f"{where}: pretrained={pretrained!r} is neither an open_clip tag for this model "
                f"(known: {open_clip.list_pretrained_tags_by_model(model_name)}) nor an existing file"
            )
        weights = None if checkpoint_path is not None else pretrained
        kwargs: dict[str, Any] = {"pretrained": weights}
        if "pretrained_text" in inspect.signature(open_clip.create_model).parameters:
            kwargs["pretrained_text"] = False  # never fetch a hub text tower we are about to throw away
        model = open_clip.create_model(model_name, **kwargs)
        visual = model.visual
        preprocess = dict(getattr(visual, "preprocess_cfg", None) or {})
        if "mean" not in preprocess and hasattr(visual, "image_mean"):
            preprocess.update(mean=visual.image_mean, std=visual.image_std)
        if tag_cfg:
            preprocess.update({k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg})
        for key in ("mean", "std"):
            if preprocess.get(key) is None:
                preprocess.pop(key, None)
        return visual, preprocess

    def _prune(self, visual: nn.Module) -> nn.Module:
        """Drop the blocks after ``self.layer``, the final norm and the pooling/projection head."""
        if self._kind == "open_clip_vit":
            visual.transformer.resblocks = visual.transformer.resblocks[: self.layer + 1]
            visual.ln_post = nn.Identity()
            visual.proj = None
            for name in ("attn_pool", "attn_pool_contrastive"):
                if getattr(visual, name, None) is not None:
                    setattr(visual, name, None)
            return visual
        trunk = visual.trunk
        trunk.prune_intermediate_layers(indices=[self.layer], prune_norm=True, prune_head=True)
        return trunk

    def _load_checkpoint(self, path: str, full_tower_keys: set[str]) -> None:
        state = read_state_dict(path)
        if any(k.startswith("visual.") for k in state):
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        if self._kind == "timm":
            # the kept module is the timm trunk: accept open_clip tower keys (trunk.*) and bare timm keys
            if any(k.startswith("trunk.") for k in state):
                state = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
            full_tower_keys = {k.removeprefix("trunk.") for k in full_tower_keys if k.startswith("trunk.")}
        own_keys = set(self.tower.state_dict())
        missing = sorted(own_keys - set(state))
        foreign = sorted(set(state) - full_tower_keys)
        if missing or foreign:
            raise ValueError(
                f"checkpoint file {path!r} does not match the {self.model_name} image tower: "
                f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unknown keys {foreign[:5]}{' ...' if len(foreign) > 5 else ''}"
            )
        try:
            self.tower.load_state_dict({k: state[k] for k in own_keys}, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"checkpoint file {path!r} does not fit the {self.model_name} image tower: {err}"
            ) from err

    def _set_image_size(self, image_size: int, where: str) -> None:
        if self._kind == "timm":
            self.tower.set_input_size(img_size=image_size)
            return
        patch = _square_size(self.tower.patch_size, where)
        if image_size % patch:
            raise ValueError(f"{where}: image_size={image_size} is not a multiple of the patch size {patch}")
        grid = image_size // patch
        old = self.tower.positional_embedding
        new = _resize_grid_positions(old.detach(), grid, where)
        self.tower.positional_embedding = nn.Parameter(new, requires_grad=old.requires_grad)
        self.tower.image_size = (image_size, image_size)
        self.tower.grid_size = (grid, grid)

    # -- forward ---------------------------------------------------------------------------------------
    def _input_dtype(self) -> torch.dtype:
        patch_embed = self.tower.conv1 if self._kind == "open_clip_vit" else self.tower.patch_embed.proj
        return patch_embed.weight.dtype

    def _open_clip_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        x = tower.conv1(x).flatten(2).transpose(1, 2)  # (B, grid*grid, D)
        cls = tower.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat((cls, x), dim=1) + tower.positional_embedding.to(x.dtype)
        x = tower.patch_dropout(x)
        x = tower.ln_pre(x)
        batch_first = getattr(tower.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in tower.transformer.resblocks:  # pruned: the last one is the chosen layer
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        return x if self.keep_cls else x[:, 1:]

    def _timm_tokens(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.tower
        with_prefix = bool(getattr(trunk, "num_prefix_tokens", 0))
        out = trunk.forward_intermediates(
            x,
            indices=[len(trunk.blocks) - 1],
            return_prefix_tokens=with_prefix,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
        if not with_prefix:
            return out
        patches, prefix = out
        return torch.cat((prefix, patches), dim=1) if self.keep_cls else patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, N, width) tokens of block ``layer`` (no final norm)."""
        tokens_fn = self._open_clip_tokens if self._kind == "open_clip_vit" else self._timm_tokens
        return run_tower(self, pixel_values, tokens_fn, self._input_dtype())

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, layer={self.layer}, keep_cls={self.keep_cls}"
