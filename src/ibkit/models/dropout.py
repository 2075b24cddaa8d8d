"""Dropout with a cheaper random mask on the CPU.

``F.dropout`` on the CPU draws one Bernoulli sample per element from the 32-bit Mersenne Twister, and that
draw, not the multiply, is its cost: on a Q-Former training step (BERT's 0.1 dropout on every attention
probability and residual) it takes an eighth of the step. Here each 64-bit draw gives four 16-bit uniforms,
an element is kept when its uniform clears ``round(p * 65536)``: dropout probability ``p`` to within
1/131072 (0.1 -> 0.100006), the kept values scaled by ``1 / (1 - p)`` as ``F.dropout`` does. The draws
come from torch's default CPU generator, so ``torch.manual_seed`` and activation checkpointing (which
restores that generator) replay the same masks. Other devices use ``F.dropout``.

The multiplier (0 or ``1 / (1 - p)``) is built without a boolean tensor: CPU kernels that read or write
``bool`` (``>=``, ``torch.where``, ``bool -> float``) are not vectorised and cost 4-10x an ``int16`` clamp
or an ``int16 -> float`` conversion of the same size (measured on the 2-core Xeon VM: a 394k-element
mask 0.31 ms via ``>=`` + ``where``, 0.07 ms via clamp, subtract, convert, scale). Draws use the full
64-bit range (``random_(-2**63, None)``), which skips the modulo of a bounded range: 20% cheaper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # a 16-bit uniform
_INT16_MIN = -(1 << 15)


def _uniforms(numel: int, generator: torch.Generator | None) -> torch.Tensor:
    """``numel`` independent uniforms on [-32768, 32767] (int16), four per 64-bit draw."""
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    return draws.view(torch.int16)[:numel]


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask of ``shape`` on the CPU, each element True with probability ``1 - round(p * 65536) / 65536``
    (the mask :func:`keep_multiplier` scales; for tests and callers that want the mask itself)."""
    return keep_multiplier(shape, p, torch.float32, generator) != 0


def keep_multiplier(
    shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``dtype`` tensor of ``shape`` on the CPU: ``1 / (1 - p)`` where an element is kept (probability
    ``1 - round(p * 65536) / 65536``), 0 where it is dropped."""
    numel = 1
    for size in shape:
        numel *= size
    levels = round(p * _LEVELS)  # how many of the 65536 uniform values drop an element
    scale = 1.0 / (1.0 - p)
    if levels == 0:  # p < 1/131072: nothing drops (the draws are still made, so later masks stay in step)
        _uniforms(numel, generator)
        return torch.full(tuple(shape), scale, dtype=dtype)
    if levels == _LEVELS:  # p > 1 - 1/131072: everything drops
        _uniforms(numel, generator)
        return torch.zeros(tuple(shape), dtype=dtype)
    threshold = _INT16_MIN + levels  # kept: uniform >= threshold
    uniforms = _uniforms(numel, generator)
    # clamp to {threshold - 1, threshold}, shift to {0, 1}: int16 ops, no bool tensor
    keep = uniforms.clamp(threshold - 1, threshold).sub_(threshold - 1)
    return keep.to(dtype).mul_(scale).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with :func:`keep_multiplier` on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    # one multiplier tensor (0 or 1/(1-p)) in x's dtype: one pass forward, one backward (grad * multiplier)
    return x * keep_multiplier(x.shape, p, x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that calls :func:`dropout` (same arguments, same state: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
