"""EVA-CLIP ViT in the LAVIS/transformers layout (the encoder of BLIP-2 and InstructBLIP).

Pre-norm ViT blocks, a q bias and a v bias but no k bias, absolute position embeddings that are
bicubically interpolated for other image sizes, no final norm (``ln_vision`` lives in the composite
model because it trains with the Q-Former).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ibkit.models.dtypes import HALF_DTYPES
from ibkit.models.vision.base import VisionEncoder


@dataclass
class EVAViTConfig:
    """Shape of an EVA ViT; the defaults are ViT-g/14 with the 40th block dropped (39 blocks)."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    # () : EVA's linear patch embedding. Channels of a convolutional stem instead (Xiao et al. 2021, "Early
    # convolutions help transformers see better"): a 3x3 convolution at full resolution, then one 3x3 stride-2
    # convolution per further entry, then a convolution to hidden_size over what is left of the patch. For
    # ViTs trained from scratch on little data (the demo): local nonlinear features that attention can read.
    # Not part of transformers' layout: such a model saves and loads in ibkit only.
    stem_channels: tuple[int, ...] = ()
    # BatchNorm after each 3x3 stem convolution, as in Xiao et al.: the stem learns shapes several times
    # faster from scratch (running statistics serve frozen and eval use).
    stem_batchnorm: bool = False

    def __post_init__(self) -> None:
        self.stem_channels = tuple(int(c) for c in self.stem_channels)
        if self.stem_batchnorm and not self.stem_channels:
            raise ValueError("stem_batchnorm needs a convolutional stem (stem_channels)")
        if self.stem_channels:
            downsample = 2 ** (len(self.stem_channels) - 1)
            if self.patch_size % downsample:
                raise ValueError(f"stem_channels {list(self.stem_channels)} halve the resolution {downsample}x, which "
                                 f"does not divide patch_size {self.patch_size}")


class EVAAttention(nn.Module):
    """Multi-head self-attention with a fused qkv weight and separate q/v biases (k has none)."""

    def __init__(self, cfg: EVAViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
            self.v_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.projection(out.transpose(1, 2).reshape(b, n, d))


class EVAMLP(nn.Module):
    def __init__(self, cfg: EVAViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.hidden_act in ("gelu_new", "gelu_pytorch_tanh") else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class EVABlock(nn.Module):
    """One pre-norm transformer block; also the FSDP wrapping unit of the encoder."""

    def __init__(self, cfg: EVAViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = EVAAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = EVAMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ConvStem(nn.Sequential):
    """The convolutional stem; on the CPU it runs in the channels-last layout.

    oneDNN's CPU convolutions are faster on NHWC tensors: the demo encoder's stem (32-64-128 channels at
    64 px, batch 32) took ~0.17 s per forward + backward in NCHW and ~0.11 s in NHWC on a 2-core AMD EPYC,
    about a fifth of the encoder pre-training step. Same parameters (names, shapes), same result within
    float rounding; GPUs keep the layout they are given."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.device.type == "cpu" and pixels.dim() == 4:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return super().forward(pixels)


def conv_stem(channels: tuple[int, ...], hidden_size: int, patch_size: int, batchnorm: bool = False) -> ConvStem:
    """Convolutions from pixels to one ``hidden_size`` vector per ``patch_size`` square (see ``stem_channels``)."""
    layers: list[nn.Module] = []
    in_channels, stride = 3, 1
    for index, out_channels in enumerate(channels):
        step = 1 if index == 0 else 2
        layers.append(nn.Conv2d(in_channels, out_channels, 3, step, 1))
        layers += [nn.BatchNorm2d(out_channels), nn.GELU()] if batchnorm else [nn.GELU()]
        in_channels, stride = out_channels, stride * step
    rest = patch_size // stride
    layers.append(nn.Conv2d(in_channels, hidden_size, rest, rest))
    return ConvStem(*layers)


class EVAEmbeddings(nn.Module):
    def __init__(self, cfg: EVAViTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding: nn.Module = (
            conv_stem(cfg.stem_channels, cfg.hidden_size, cfg.patch_size, cfg.stem_batchnorm) if cfg.stem_channels
            else nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        )
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, cfg.hidden_size))

    def positions_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid, bicubically interpolated when it differs from training."""
        pos = self.position_embedding
        side = int(math.isqrt(pos.shape[1] - 1))
        if grid_h == side and grid_w == side:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.class_embedding.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], -1, -1)
        return torch.cat((cls, patches), dim=1) + self.positions_for(grid_h, grid_w).to(dtype)


class EVAEncoderStack(nn.Module):
    def __init__(self, cfg: EVAViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EVABlock(cfg) for _ in range(cfg.num_hidden_layers))


class EVAViT(VisionEncoder):
    """EVA ViT image encoder. Returns all tokens (CLS + patches) of the last block, before any norm.

    Parameter names follow transformers' ``InstructBlipVisionModel`` (``embeddings.*``,
    ``encoder.layers.{i}.*``) except that the qkv bias is stored as ``q_bias``/``v_bias``.
    """

    block_class = EVABlock

    def __init__(
        self,
        config: EVAViTConfig | None = None,
        frozen: bool = True,
        compute_dtype: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(frozen=frozen, compute_dtype=compute_dtype)
        self.config = config or EVAViTConfig()
        self.width = self.config.hidden_size
        self.image_size = self.config.image_size
        self.embeddings = EVAEmbeddings(self.config)
        self.encoder = EVAEncoderStack(self.config)
        self.gradient_checkpointing = gradient_checkpointing
        self.reset_parameters()
        if frozen:
            self.freeze()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.config.stem_channels:  # GELU stacks keep PyTorch's fan-in init (0.02 would starve the stem)
            for module in self.embeddings.patch_embedding.modules():
                if isinstance(module, nn.Conv2d):
                    module.reset_parameters()
        nn.init.trunc_normal_(self.embeddings.position_embedding, std=0.02)
        nn.init.trunc_normal_(self.embeddings.class_embedding, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = HALF_DTYPES.get(self.compute_dtype or "")
        if dtype is not None and pixel_values.device.type != "meta":
            with torch.autocast(pixel_values.device.type, dtype=dtype):
                return self._forward(pixel_values).float()
        return self._forward(pixel_values)

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)
        for block in self.encoder.layers:
            if self.gradient_checkpointing and self.training and hidden.requires_grad:
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=False)
            else:
                hidden = block(hidden)
        return hidden
