"""Short import path for the evaluation metrics: ``from ibkit.metrics import CIDEr, VQAAccuracy``."""

from ibkit.eval.metrics import (
    METRIC_NAMES,
    BinaryAUC,
    CIDEr,
    IVQAAccuracy,
    MeanReciprocalRank,
    TopOneAccuracy,
    VQAAccuracy,
    build_metric,
    cider_d,
    ivqa_accuracy,
    normalize_vqa_answer,
    vqa_accuracy,
)
from ibkit.eval.ptb_tokenizer import ptb_tokenize_lines, tokenize_captions

__all__ = [
    "METRIC_NAMES",
    "BinaryAUC",
    "CIDEr",
    "IVQAAccuracy",
    "MeanReciprocalRank",
    "TopOneAccuracy",
    "VQAAccuracy",
    "build_metric",
    "cider_d",
    "ivqa_accuracy",
    "normalize_vqa_answer",
    "ptb_tokenize_lines",
    "tokenize_captions",
    "vqa_accuracy",
]
