"""What the evaluation metrics share: input checks, strings as tensor states, a mean-of-scores state.

Text metrics keep their strings as UTF-8 bytes in ``uint8`` list states, so torchmetrics' own gather
moves them between processes; corpus-level statistics (CIDEr's document frequencies) are then computed
over every process's samples. Mean-of-score metrics keep two sums, so their DDP sync is an all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors


# --------------------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------------------
def check_texts(values: Any, field: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{field} must be a list of strings, got {type(values).__name__}")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{field}[{index}] must be a string, got {type(value).__name__}")
    return list(values)


def check_reference_lists(values: Any, field: str, expected_len: int) -> list[list[str]]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{field} must be a list of lists of strings, got {type(values).__name__}")
    if len(values) != expected_len:
        raise ValueError(f"{field} has {len(values)} entries but preds has {expected_len}")
    checked = []
    for index, refs in enumerate(values):
        refs = check_texts(refs, f"{field}[{index}]")
        if not refs:
            raise ValueError(f"{field}[{index}] is empty: every sample needs at least one reference")
        checked.append(refs)
    return checked


# --------------------------------------------------------------------------------------------------------
# Strings as tensor states
# --------------------------------------------------------------------------------------------------------
class TextStateMetric(Metric):
    """A Metric that keeps lists of strings as ``uint8`` byte states plus ``int64`` lengths.

    torchmetrics concatenates list states and gathers the tensors across processes (padding uneven sizes),
    so bytes and lengths travel together in the same rank order and decode back to the same strings.
    """

    def _add_text_state(self, name: str) -> None:
        self.add_state(f"{name}_bytes", default=[], dist_reduce_fx="cat")
        self.add_state(f"{name}_lengths", default=[], dist_reduce_fx="cat")
        self._text_state_names = [*getattr(self, "_text_state_names", []), name]

    def _append_texts(self, name: str, texts: Sequence[str]) -> None:
        encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
        data = b"".join(encoded)
        byte_tensor = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
            if data
            else torch.zeros(0, dtype=torch.uint8)
        )
        lengths = torch.tensor([len(item) for item in encoded], dtype=torch.long)
        getattr(self, f"{name}_bytes").append(byte_tensor.to(self.device))
        getattr(self, f"{name}_lengths").append(lengths.to(self.device))

    def _texts(self, name: str) -> list[str]:
        data = cat_or_empty(getattr(self, f"{name}_bytes"), torch.uint8)
        lengths = cat_or_empty(getattr(self, f"{name}_lengths"), torch.long)
        raw = data.to(torch.uint8).cpu().numpy().tobytes()
        texts, start = [], 0
        for length in lengths.long().cpu().tolist():
            texts.append(raw[start : start + length].decode("utf-8", "surrogatepass"))
            start += length
        return texts

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        # A process that saw no samples must still take part in every gather, with tensors of the right
        # dtype (torchmetrics would fill in a float tensor); sync() restores the real state afterwards.
        for name in getattr(self, "_text_state_names", []):
            for suffix, dtype in (("bytes", torch.uint8), ("lengths", torch.long)):
                if not getattr(self, f"{name}_{suffix}"):
                    setattr(self, f"{name}_{suffix}", [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)


def cat_or_empty(state: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    """A list state as one tensor (before sync it is a list, after it a tensor; empty: a 0-length one)."""
    if isinstance(state, Tensor):
        return state
    if not state:
        return torch.zeros(0, dtype=dtype)
    return dim_zero_cat(state)


# --------------------------------------------------------------------------------------------------------
# Mean of per-sample scores
# --------------------------------------------------------------------------------------------------------
class MeanScoreMetric(Metric):
    """Mean of per-sample scores; two scalar sum states, so DDP sync is a plain all-reduce."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add_scores(self, scores: Sequence[float]) -> None:
        self.score_sum += torch.tensor(math.fsum(scores), dtype=torch.float64, device=self.device)
        self.count += len(scores)

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update()")
        return (self.score_sum / self.count).to(torch.float64)
