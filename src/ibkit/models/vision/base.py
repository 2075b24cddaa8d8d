"""The one interface every image encoder implements.

An encoder turns pixel values (B, 3, H, W) into token features (B, N, D). Everything else in ibkit
(the Q-Former's cross-attention width, the image transform, the FSDP wrapping policy) reads what it
needs from these attributes, so swapping an encoder is a YAML change.
"""

from __future__ import annotations

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionEncoder(nn.Module):
    """Base class of frozen (or trainable) image towers.

    Subclasses set ``width``, ``image_size``, ``mean``, ``std`` and ``block_class`` and implement
    :meth:`forward`. Frozen encoders run under ``torch.no_grad`` in ``compute_dtype`` when asked.
    """

    width: int
    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    block_class: type[nn.Module] | None = None

    def __init__(self, frozen: bool = True, compute_dtype: str | None = None) -> None:
        super().__init__()
        self.frozen = frozen
        self.compute_dtype = compute_dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def freeze(self) -> None:
        """Stop gradients and put the tower in eval mode (dropout off) for good."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        # A frozen encoder stays in eval mode even when the surrounding model trains.
        return super().train(mode and not self.frozen)
