"""Caption metrics: :class:`CIDEr`, CIDEr-D exactly as pycocoevalcap computes it (PTB tokenisation in
pure Python), as a torchmetrics ``Metric`` that syncs its strings under DDP."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from ibkit.eval.metric_states import TextStateMetric, cat_or_empty, check_reference_lists, check_texts
from ibkit.eval.ptb_tokenizer import tokenize_captions

__all__ = ["CIDEr", "cider_d"]


# --------------------------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------------------------
def _ngram_counts(sentence: str, n: int) -> Counter[tuple[str, ...]]:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised ``candidates`` against tokenised ``references`` (one list per candidate).

    Follows pycocoevalcap's ``CiderScorer`` step by step: document frequencies over the evaluated
    references, idf ``log(N_images) - log(max(1, df))``, per-n cosine similarity with the candidate's
    tf-idf clipped by the reference's, a Gaussian length penalty, the mean over n = 1..4, the mean over
    references, times 10. Its length is the number of bigrams (not words); kept for parity.
    Returns ``(corpus score, per-candidate scores)``.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr needs at least one candidate")
    cand_counts = [_ngram_counts(c, n) for c in candidates]
    ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]

    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts in refs for gram in counts})
    log_num_images = math.log(float(len(ref_counts)))

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norms = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_num_images - math.log(max(1.0, float(doc_freq.get(gram, 0)))))
            vectors[order][gram] = weight
            norms[order] += weight * weight
            if order == 1:
                bigrams += tf
        return vectors, [math.sqrt(v) for v in norms], bigrams

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = tfidf(cand)
        total = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = tfidf(ref)
            penalty = math.e ** (-(float(length - length_ref) ** 2) / (2 * sigma**2))
            for order in range(n):
                value = 0.0
                for gram, weight in vec[order].items():
                    ref_weight = vec_ref[order].get(gram, 0.0)
                    value += min(weight, ref_weight) * ref_weight
                if norm[order] != 0 and norm_ref[order] != 0:
                    value /= norm[order] * norm_ref[order]
                total[order] += value * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


class CIDEr(TextStateMetric):
    """Corpus CIDEr-D as pycocoevalcap's ``Cider`` after its ``PTBTokenizer`` (no Java needed).

    ``update(preds, targets)``: ``preds`` one generated caption per image, ``targets`` that image's
    reference captions. ``compute()`` tokenises all references and all predictions (each set as one
    text, as pycocoevalcap does) and returns the corpus score as a float64 tensor (pycocoevalcap scale:
    1.05 is the "105" of papers). ``tokenize=False`` takes captions as already tokenised.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 4, sigma: float = 6.0, tokenize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"CIDEr n must be >= 1, got {n}")
        if sigma <= 0:
            raise ValueError(f"CIDEr sigma must be > 0, got {sigma}")
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        self._add_text_state("preds")
        self._add_text_state("refs")
        self.add_state("ref_counts", default=[], dist_reduce_fx="cat")

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        if not self.ref_counts:
            self.ref_counts = [torch.zeros(0, dtype=torch.long, device=self.device)]
        super()._sync_dist(dist_sync_fn, process_group)

    def update(self, preds: Sequence[str], targets: Sequence[Sequence[str]]) -> None:
        preds = check_texts(preds, "preds")
        targets = check_reference_lists(targets, "targets", len(preds))
        self._append_texts("preds", preds)
        self._append_texts("refs", [ref for refs in targets for ref in refs])
        self.ref_counts.append(
            torch.tensor([len(refs) for refs in targets], dtype=torch.long, device=self.device)
        )

    def compute(self) -> Tensor:
        preds = self._texts("preds")
        flat_refs = self._texts("refs")
        counts = cat_or_empty(self.ref_counts, torch.long).long().cpu().tolist()
        if not preds:
            raise RuntimeError("CIDEr.compute() called before any update()")
        if self.tokenize:
            preds, flat_refs = tokenize_captions(preds), tokenize_captions(flat_refs)
        refs, start = [], 0
        for count in counts:
            refs.append(flat_refs[start : start + count])
            start += count
        score, _ = cider_d(preds, refs, n=self.n, sigma=self.sigma)
        return torch.tensor(score, dtype=torch.float64)
