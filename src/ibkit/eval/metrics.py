"""Evaluation metrics of the InstructBLIP protocol as torchmetrics ``Metric``s (they sync under DDP).

* :class:`CIDEr` - CIDEr-D exactly as pycocoevalcap computes it (PTB tokenisation in pure Python);
  in :mod:`ibkit.eval.caption_metrics`.
* :class:`VQAAccuracy` - the official VQA accuracy (answer normalisation of ``vqaEval.py``) and
  :class:`IVQAAccuracy` - iVQA: ``min(1, matches / 2)`` over the (five) reference answers; in
  :mod:`ibkit.eval.vqa_metrics`.
* :class:`TopOneAccuracy` - exact match of generated text, or argmax of candidate scores.
* :class:`BinaryAUC` - ROC AUC of scores (HatefulMemes).
* :class:`MeanReciprocalRank` - rank of the ground truth among scored candidates (Visual Dialog).

The classification and ranking metrics live here, with :func:`build_metric` (registry metric names ->
metrics); every metric is importable from this module. The shared state handling (strings as tensors,
sums of scores) is :mod:`ibkit.eval.metric_states`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC

from ibkit.eval.caption_metrics import CIDEr, cider_d
from ibkit.eval.metric_states import MeanScoreMetric, check_texts
from ibkit.eval.vqa_metrics import (
    IVQAAccuracy,
    VQAAccuracy,
    ivqa_accuracy,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_process_punctuation,
)

__all__ = [
    "CIDEr",
    "VQAAccuracy",
    "IVQAAccuracy",
    "TopOneAccuracy",
    "BinaryAUC",
    "MeanReciprocalRank",
    "METRIC_NAMES",
    "build_metric",
    "cider_d",
    "normalize_vqa_answer",
    "vqa_process_punctuation",
    "vqa_accuracy",
    "ivqa_accuracy",
]


# --------------------------------------------------------------------------------------------------------
# Classification-style metrics
# --------------------------------------------------------------------------------------------------------
def _light_normalize(text: str) -> str:
    return " ".join(text.lower().split())


class TopOneAccuracy(MeanScoreMetric):
    """Top-1 accuracy, for generated text or for ranked candidates.

    * ``update(preds: list[str], targets: list[str] | list[list[str]])``: exact match after normalisation
      (with several references: a match with any of them). ``normalize="vqa"`` (default, GQA's
      "VQA-style exact match"): the VQA answer normalisation on both sides; ``"light"``: lower-case and
      collapse whitespace; ``"none"``.
    * ``update(preds: Tensor, targets: Tensor)``: ``preds`` of shape (N, C) are per-candidate scores
      (argmax is the choice; the first index wins ties) or of shape (N,) chosen indices; ``targets`` (N,)
      the correct indices.
    """

    def __init__(self, normalize: str = "vqa", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if normalize not in ("light", "vqa", "none"):
            raise ValueError(f"normalize must be 'light', 'vqa' or 'none', got {normalize!r}")
        self.normalize = normalize

    def _norm(self, text: str) -> str:
        if self.normalize == "light":
            return _light_normalize(text)
        if self.normalize == "vqa":
            return normalize_vqa_answer(text)
        return text

    def update(self, preds: Sequence[str] | Tensor, targets: Sequence[str] | Tensor) -> None:
        if isinstance(preds, Tensor) or isinstance(targets, Tensor):
            preds_t, targets_t = torch.as_tensor(preds), torch.as_tensor(targets)
            if preds_t.ndim == 2:
                if preds_t.shape[0] != targets_t.shape[0]:
                    raise ValueError(
                        f"preds has {preds_t.shape[0]} rows but targets has {targets_t.shape[0]}"
                    )
                choice = preds_t.argmax(dim=1)
            elif preds_t.ndim == 1:
                choice = preds_t.long()
            else:
                raise ValueError(f"preds must have shape (N, C) or (N,), got {tuple(preds_t.shape)}")
            if targets_t.ndim != 1 or targets_t.shape[0] != choice.shape[0]:
                raise ValueError(
                    f"targets must have shape ({choice.shape[0]},), got {tuple(targets_t.shape)}"
                )
            correct = (choice.to(targets_t.device) == targets_t.long()).double()
            self.score_sum += correct.sum().to(self.score_sum.device)
            self.count += int(correct.numel())
            return
        preds = check_texts(preds, "preds")
        if isinstance(targets, str) or not isinstance(targets, Sequence):
            raise TypeError(
                f"targets must be a list of strings or of lists of strings, got {type(targets).__name__}"
            )
        if len(targets) != len(preds):
            raise ValueError(f"targets has {len(targets)} entries but preds has {len(preds)}")
        references = []
        for index, target in enumerate(targets):
            refs = [target] if isinstance(target, str) else check_texts(target, f"targets[{index}]")
            if not refs:
                raise ValueError(f"targets[{index}] is empty: every sample needs at least one reference")
            references.append(refs)
        self._add_scores(
            [float(self._norm(p) in {self._norm(r) for r in refs}) for p, refs in zip(preds, references)]
        )


class BinaryAUC(BinaryAUROC):
    """ROC AUC over scores (HatefulMemes): torchmetrics' exact ``BinaryAUROC`` (ties count one half).

    ``update(scores, labels)`` takes lists or tensors; scores may be probabilities or any monotone score
    (logits outside [0, 1] pass through a sigmoid, which leaves the AUC unchanged).
    """

    def update(self, preds: Sequence[float] | Tensor, target: Sequence[int] | Tensor) -> None:  # type: ignore[override]
        preds_t = torch.as_tensor(preds, dtype=torch.float32)
        target_t = torch.as_tensor(target).long()
        if preds_t.shape != target_t.shape or preds_t.ndim != 1:
            raise ValueError(
                f"scores and labels must be 1-D of the same length, got {tuple(preds_t.shape)} and "
                f"{tuple(target_t.shape)}"
            )
        if not bool(((target_t == 0) | (target_t == 1)).all()):
            raise ValueError("labels must be 0 or 1")
        super().update(preds_t.to(self.device), target_t.to(self.device))


class MeanReciprocalRank(MeanScoreMetric):
    """Mean reciprocal rank of the ground-truth candidate (Visual Dialog's MRR, in (0, 1]).

    ``update(scores, targets)``: ``scores`` (N, C) per-candidate scores (higher is better), ``targets``
    (N,) the index of the ground-truth candidate. The rank is the ground truth's position in a stable
    descending sort: candidates with a higher score come first, and of equal scores the lower index.
    """

    def update(self, scores: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        scores_t, targets_t = torch.as_tensor(scores), torch.as_tensor(targets).long()
        if scores_t.ndim != 2:
            raise ValueError(f"scores must have shape (N, C), got {tuple(scores_t.shape)}")
        if targets_t.ndim != 1 or targets_t.shape[0] != scores_t.shape[0]:
            raise ValueError(f"targets must have shape ({scores_t.shape[0]},), got {tuple(targets_t.shape)}")
        if bool(((targets_t < 0) | (targets_t >= scores_t.shape[1])).any()):
            raise ValueError(f"targets must index one of the {scores_t.shape[1]} candidates")
        if bool(torch.isnan(scores_t).any()):
            raise ValueError("scores contain NaN")
        gt_scores = scores_t.gather(1, targets_t.unsqueeze(1))
        index = torch.arange(scores_t.shape[1], device=scores_t.device).unsqueeze(0)
        ahead = (scores_t > gt_scores) | ((scores_t == gt_scores) & (index < targets_t.unsqueeze(1)))
        ranks = ahead.sum(dim=1).double() + 1.0
        self.score_sum += (1.0 / ranks).sum().to(self.score_sum.device)
        self.count += int(ranks.numel())


# --------------------------------------------------------------------------------------------------------
# Registry names -> metrics
# --------------------------------------------------------------------------------------------------------
_FACTORIES: dict[str, type[Metric]] = {
    "cider": CIDEr,
    "vqa_accuracy": VQAAccuracy,
    "accuracy": TopOneAccuracy,
    "auc": BinaryAUC,
    "mrr": MeanReciprocalRank,
    "ivqa_accuracy": IVQAAccuracy,
}
METRIC_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def build_metric(name: str, **kwargs: Any) -> Metric:
    """A fresh metric for a dataset registry metric name (``"cider"``, ``"vqa_accuracy"``, ...)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRIC_NAMES)}") from None
    return factory(**kwargs)
