"""Optimizer and learning-rate schedule of the InstructBLIP recipe.

AdamW with betas (0.9, 0.999) and weight decay 0.05 on matrices only (biases and 1-D parameters such
as LayerNorm weights are not decayed), a linear warmup from 1e-8 to 1e-5 over 1,000 steps, then a
cosine decay to ``min_lr`` at ``max_steps`` (LAVIS ``linear_warmup_cosine_lr``, stepped per
optimizer step here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)


@dataclass
class OptimSettings:
    """Everything the optimizer and the schedule read; ``max_steps=None`` takes the trainer's."""

    lr: float = 1e-5
    warmup_start_lr: float = 1e-8
    warmup_steps: int = 1000
    min_lr: float = 0.0
    max_steps: int | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_lr < 0 or self.warmup_start_lr < 0:
            raise ValueError("optim.min_lr and optim.warmup_start_lr must be >= 0")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"optim.max_steps must be > 0 (or null for the trainer's), got {self.max_steps}")


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to weight matrices (and embeddings/queries), never to biases or 1-D tensors."""
    return param.ndim >= 2 and not name.endswith("bias")


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: decayed and not decayed (empty groups dropped)."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if is_decayed(name, param):
            decay.append(param)
            decay_names.append(name)
        else:
            no_decay.append(param)
            no_decay_names.append(name)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen, there is nothing to optimise")
    return groups


def fused_on_cpu(params: Iterable[torch.Tensor]) -> bool:
    """Whether AdamW should run its fused kernel: every parameter a plain floating CPU tensor.

    On the CPU torch's default AdamW loops over the tensors one op at a time (its multi-tensor kernel is
    for GPUs), which costs a small Q-Former's training step about a tenth of its time; the fused kernel
    updates each tensor in one pass. On GPUs (and for sharded FSDP parameters) torch's default stays.
    """
    params = list(params)
    return bool(params) and all(
        p.device.type == "cpu" and p.dtype.is_floating_point and type(p) in (torch.Tensor, nn.Parameter)
        for p in params
    )


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], settings: OptimSettings) -> torch.optim.AdamW:
    groups = param_groups(named_params, settings.weight_decay)
    for group in groups:
        group.pop("names")  # AdamW keeps unknown keys in its state_dict; names would only bloat it
    fused = fused_on_cpu(p for group in groups for p in group["params"]) or None
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, fused=fused)


def warmup_cosine_lr(
    step: int, peak_lr: float, warmup_steps: int, max_steps: int, warmup_start_lr: float = 1e-8, min_lr: float = 0.0
) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup, then cosine to ``min_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule(LRScheduler):
    """:func:`warmup_cosine_lr` as a scheduler; every group follows it scaled by its own base lr.

    Its state is plain numbers (no lambdas), so checkpoints load with ``weights_only=True``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        max_steps: int,
        warmup_start_lr: float = 1e-8,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if max_steps < warmup_steps:
            raise ValueError(f"max_steps ({max_steps}) is shorter than the warmup ({warmup_steps} steps)")
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.warmup_start_lr = float(warmup_start_lr)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        out = []
        for base_lr in self.base_lrs:
            # warmup_start_lr and min_lr are absolute for the peak group; other groups scale with their base lr
            scale = base_lr / max(self.base_lrs)
            out.append(
                warmup_cosine_lr(
                    self.last_epoch, base_lr, self.warmup_steps, self.max_steps,
                    self.warmup_start_lr * scale, self.min_lr * scale,
                )
            )
        return out


def configure_warmup_cosine(
    named_params: Iterable[tuple[str, nn.Parameter]], settings: OptimSettings, trainer: Any
) -> dict[str, Any]:
    """A LightningModule's ``configure_optimizers`` result: AdamW + this schedule stepped per optimizer step,
    over ``settings.max_steps`` or the trainer's length."""
    max_steps = settings.max_steps or (trainer.max_steps if trainer.max_steps > 0 else None)
    if max_steps is None:
        estimate = trainer.estimated_stepping_batches
        if estimate == float("inf"):
            raise ValueError(
                "the cosine schedule needs a length: set trainer.max_steps (the training stream is infinite) "
                "or model.optim.max_steps"
            )
        max_steps = int(estimate)
    warmup = settings.warmup_steps
    if warmup > max_steps:
        log.warning("warmup_steps %d > max_steps %d: warming up over the whole run", warmup, max_steps)
        warmup = max_steps
    optimizer = build_optimizer(named_params, settings)
    scheduler = WarmupCosineSchedule(
        optimizer, warmup, max_steps, warmup_start_lr=settings.warmup_start_lr, min_lr=settings.min_lr
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
