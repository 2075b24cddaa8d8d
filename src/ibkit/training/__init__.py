"""Lightning side of ibkit: the training module, optimizer/schedule, FSDP plan, checkpoints, callbacks."""

from ibkit.training.module import InstructBLIPModule
from ibkit.training.optim import OptimSettings, WarmupCosineSchedule, warmup_cosine_lr

__all__ = ["InstructBLIPModule", "OptimSettings", "WarmupCosineSchedule", "warmup_cosine_lr"]
