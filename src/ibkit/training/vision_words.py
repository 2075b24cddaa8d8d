"""An auxiliary loss for training a vision encoder from scratch: detect the target's words in the image.

Captioning alone teaches a freshly initialised encoder slowly: its only signal comes back through the
Q-Former and the LM, a few tokens per image. This loss adds a direct one (multiple-instance learning
of caption words, Fang et al. 2015, "From captions to visual concepts and back"; SuperClass, Huang et
al. 2024, classifies caption tokens the same way): a linear head scores every image token for every
word, the image's score for a word is its best token's, and a softmax loss asks it to name the words
(and hashed word n-grams, which bind e.g. a colour to its shape) of the training target. Because the
score is the max over tokens, each object's own tokens must carry what the text says about it, which
is exactly what the Q-Former's cross-attention can read. The paper has no such stage: its EVA-CLIP
encoder comes pretrained; the head lives in the training module and is never exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ibkit.data.collate import IGNORE_INDEX

_PRIME = 1_000_003  # n-gram hashing: (previous hash * prime + token) mod buckets


@dataclass
class VisionWordSettings:
    """``weight``: of the loss beside the LM loss (0: off). ``ngrams``: longest n-gram (1: words only).
    ``buckets``: hash buckets for the n-grams of 2 or more tokens (collisions only add noise)."""

    weight: float = 0.0
    ngrams: int = 2
    buckets: int = 1024

    def __post_init__(self) -> None:
        if self.weight < 0 or self.ngrams < 1 or self.buckets < 1:
            raise ValueError(f"vision_words: weight >= 0, ngrams >= 1 and buckets >= 1 needed, got {self}")


def word_targets(labels: torch.Tensor, vocab_size: int, settings: VisionWordSettings,
                 special_ids: set[int]) -> torch.Tensor:
    """(B, vocab_size + buckets) multi-hot: each row's target tokens, then its hashed n-grams (2..ngrams).

    ``labels`` are the LM's training labels (``IGNORE_INDEX`` where no target); ``special_ids`` (pad,
    eos) are not words and break n-grams.
    """
    extra = settings.buckets if settings.ngrams > 1 else 0
    targets = torch.zeros(labels.shape[0], vocab_size + extra)
    for row, ids in enumerate(labels.tolist()):
        words = [t for t in ids if t != IGNORE_INDEX and t not in special_ids and 0 <= t < vocab_size]
        targets[row, words] = 1.0
        for n in range(2, settings.ngrams + 1):
            for start in range(len(words) - n + 1):
                key = 0
                for token in words[start:start + n]:
                    key = (key * _PRIME + token + 1) % settings.buckets
                targets[row, vocab_size + key] = 1.0
    return targets


class VisionWordHead(nn.Module):
    """Scores every image token for every word; an image's score is its best token's (max over tokens)."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, num_classes)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, width) tokens (after ``ln_vision``) -> (B, num_classes) logits."""
        return self.proj(image_tokens).amax(dim=1)


def vision_word_loss(head: VisionWordHead, image_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the target's words as a distribution (multi-hot / count, as SuperClass does):
    its size does not depend on the vocabulary, and the gradient stays bounded while the words that vary
    between phrasings of the same image cannot be predicted. Rows without words do not count."""
    logits = head(image_tokens).float()
    targets = targets.to(logits.device)
    counts = targets.sum(-1)
    keep = counts > 0
    if not keep.any():
        return logits.sum() * 0.0
    log_probs = F.log_softmax(logits[keep], dim=-1)
    return -((targets[keep] / counts[keep, None]) * log_probs).sum(-1).mean()


def word_detection_metrics(word_logits: torch.Tensor, word_targets: torch.Tensor) -> dict[str, float]:
    """How well images name their words: ``word_logits`` / ``word_targets`` (N images, V words), targets 0/1.

    * ``word_map``: mean over words of the average precision of ranking the N images by that word's score
      (the visual-concept metric of Fang et al.), over the words that some images have and some lack (a word
      every caption has, such as "a", says nothing); ``word_map_chance`` is what random scores get (the mean
      share of positives);
    * ``word_recall``: per image, the share of its words among its top-|words| scores (R-precision), averaged.
    """
    logits, targets = word_logits.float(), word_targets.float()
    positives = targets.sum(0)
    informative = (positives > 0) & (positives < targets.shape[0])
    results: dict[str, float] = {}
    if informative.any():
        scores, labels = logits[:, informative], targets[:, informative]
        order = scores.argsort(dim=0, descending=True)
        ranked = labels.gather(0, order)
        ranks = torch.arange(1, ranked.shape[0] + 1, dtype=ranked.dtype)[:, None]
        precision = ranked.cumsum(0) / ranks
        average_precision = (precision * ranked).sum(0) / ranked.sum(0)
        results["word_map"] = float(average_precision.mean())
        results["word_map_chance"] = float((positives[informative] / targets.shape[0]).mean())
    counts = targets.sum(1).long()
    rows = counts > 0
    if rows.any():
        top = logits.argsort(dim=1, descending=True)
        hits = targets.gather(1, top)
        within = torch.arange(targets.shape[1])[None, :] < counts[:, None]
        results["word_recall"] = float(((hits * within).sum(1)[rows] / counts[rows]).mean())
    return results
