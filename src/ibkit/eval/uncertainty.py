"""Per-sample scores and the standard error of a dataset metric, from the prediction records ``ibkit test``
writes (``<results_dir>/predictions/<dataset>.jsonl``).

A test set is a sample: a metric of 400 answers is known to within a few points, and a claim such as
"above chance" or "beats BLIP-2" needs that spread. Each value here is computed the way the protocol's
metric computes it (:class:`ibkit.eval.protocol.DatasetEvaluator`), so it equals the number in
``results.json`` for the same records; the standard error comes with it:

* mean-of-sample metrics (``accuracy``, ``vqa_accuracy``, ``ivqa_accuracy``, ``mrr``, ``cider``): the
  value is the mean of per-sample scores, the standard error ``s / sqrt(n)`` with ``s`` the sample standard
  deviation (``n - 1`` in its denominator). For 0/1 scores this is ``sqrt(p (1 - p) / (n - 1))``.
  CIDEr-D's corpus value is exactly the mean of its per-image scores (pycocoevalcap averages them), but
  those scores share the corpus's document frequencies, so its standard error treats the idf weights as
  fixed (a slight underestimate).
* ``auc`` (binary ROC AUC): the Mann-Whitney statistic, ties counted one half, which is what
  torchmetrics' exact ``BinaryAUROC`` computes; the standard error is Hanley & McNeil (1982), eq. 1-3.
  The score of a sample is the softmax probability of its ``yes`` candidate, as the protocol ranks it.

With fewer than two samples the standard error is NaN. Records come from one dataset; ``metric`` is its
registry metric (``get_spec(dataset).metric``).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ibkit.eval.caption_metrics import cider_d
from ibkit.eval.ptb_tokenizer import tokenize_captions
from ibkit.eval.vqa_metrics import ivqa_accuracy, normalize_vqa_answer, vqa_accuracy

Record = Mapping[str, Any]
MEAN_METRICS = ("accuracy", "vqa_accuracy", "ivqa_accuracy", "mrr", "cider")
METRICS = (*MEAN_METRICS, "auc")


# ----------------------------------------------------------------------------------------------- reading


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of one ``predictions/<dataset>.jsonl``; a bad line names the file and line number."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path} line {number}: not JSON ({error})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: a record must be a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _field(record: Record, name: str, index: int) -> Any:
    if name not in record:
        where = record.get("sample_id", f"#{index}")
        raise ValueError(f"record {where}: no {name!r} field (keys: {', '.join(sorted(record))})")
    return record[name]


def _where(record: Record, index: int) -> str:
    return f"record {record.get('sample_id', f'#{index}')}"


# ------------------------------------------------------------------------------------------ per sample


def _references(record: Record, index: int) -> list[str]:
    answers = _field(record, "answers", index)
    refs = [answers] if isinstance(answers, str) else list(answers or [])
    if not refs or not all(isinstance(a, str) for a in refs):
        raise ValueError(f"{_where(record, index)}: 'answers' must be a non-empty list of strings, got {answers!r}")
    return refs


def _prediction(record: Record, index: int) -> str:
    prediction = _field(record, "prediction", index)
    if not isinstance(prediction, str):
        raise ValueError(f"{_where(record, index)}: 'prediction' must be a string, got {prediction!r}")
    return prediction


def _is_ranked(records: Sequence[Record]) -> bool:
    """Ranking records carry ``prediction_index``; generation records do not."""
    return bool(records) and "prediction_index" in records[0]


def _rank_accuracy(record: Record, index: int) -> float:
    label = _field(record, "label", index)
    # a label outside the candidates (open-ended video QA vocabularies) can never be matched
    return float(label is not None and int(_field(record, "prediction_index", index)) == int(label))


def _reciprocal_rank(record: Record, index: int) -> float:
    """1 / rank of the label in a stable descending sort (ties: the lower index first), as the metric."""
    label, scores = _field(record, "label", index), _field(record, "scores", index)
    if label is None or not 0 <= int(label) < len(scores):
        raise ValueError(f"{_where(record, index)}: label {label!r} does not index one of {len(scores)} scores")
    target = scores[int(label)]
    ahead = sum(s > target or (s == target and i < int(label)) for i, s in enumerate(scores))
    return 1.0 / (ahead + 1)


def _cider_scores(records: Sequence[Record]) -> list[float]:
    """Per-image CIDEr-D after PTB tokenisation, with the corpus's document frequencies (as :class:`CIDEr`)."""
    preds = [_prediction(r, i) for i, r in enumerate(records)]
    refs = [_references(r, i) for i, r in enumerate(records)]
    tokenized_preds = tokenize_captions(preds)
    flat = tokenize_captions([ref for group in refs for ref in group])
    grouped, start = [], 0
    for group in refs:
        grouped.append(flat[start : start + len(group)])
        start += len(group)
    _, scores = cider_d(tokenized_preds, grouped)
    return scores


def per_sample_scores(records: Sequence[Record], metric: str) -> list[float]:
    """One score per record whose mean is the dataset's ``metric`` (not ``auc``: not a mean of samples)."""
    if metric not in MEAN_METRICS:
        raise ValueError(
            f"metric {metric!r} is not a mean of per-sample scores; per-sample metrics: {', '.join(MEAN_METRICS)}"
        )
    if not records:
        raise ValueError(f"no records to score with {metric!r}")
    ranked = _is_ranked(records)
    if metric == "cider":
        if ranked:
            raise ValueError("cider scores generated captions, but these records rank candidates")
        return _cider_scores(records)
    if metric == "mrr":
        if not ranked:
            raise ValueError("mrr needs ranking records (label, scores), but these records hold generated text")
        return [_reciprocal_rank(r, i) for i, r in enumerate(records)]
    if metric == "accuracy" and ranked:
        return [_rank_accuracy(r, i) for i, r in enumerate(records)]
    if ranked:
        raise ValueError(f"{metric} scores generated text, but these records rank candidates")
    if metric == "accuracy":  # TopOneAccuracy's default: VQA normalisation on both sides, any reference
        return [
            float(normalize_vqa_answer(_prediction(r, i)) in {normalize_vqa_answer(a) for a in _references(r, i)})
            for i, r in enumerate(records)
        ]
    if metric == "vqa_accuracy":
        return [vqa_accuracy(_prediction(r, i), _references(r, i)) for i, r in enumerate(records)]
    return [ivqa_accuracy(_prediction(r, i), _references(r, i)) for i, r in enumerate(records)]


def mean_with_error(scores: Sequence[float]) -> dict[str, float | int]:
    """``{"value": mean, "stderr": s / sqrt(n), "n"}`` with ``s`` the sample standard deviation."""
    n = len(scores)
    if n == 0:
        raise ValueError("no scores")
    mean = math.fsum(scores) / n
    if n < 2:
        return {"value": mean, "stderr": math.nan, "n": n}
    variance = math.fsum((s - mean) ** 2 for s in scores) / (n - 1)
    return {"value": mean, "stderr": math.sqrt(variance / n), "n": n}


# ------------------------------------------------------------------------------------------------- AUC


def yes_probabilities(records: Sequence[Record]) -> tuple[list[float], list[int]]:
    """Per record the softmax probability of its ``yes`` candidate and whether ``yes`` is the label."""
    probs, targets = [], []
    for index, record in enumerate(records):
        candidates = [str(c).lower() for c in _field(record, "candidates", index)]
        if "yes" not in candidates:
            raise ValueError(f"{_where(record, index)}: AUC needs a 'yes' candidate, got {candidates}")
        label = _field(record, "label", index)
        if label is None:
            raise ValueError(f"{_where(record, index)}: AUC needs a ground-truth label")
        yes = candidates.index("yes")
        probs.append(torch.softmax(torch.tensor(_field(record, "scores", index)), 0)[yes].item())
        targets.append(int(int(label) == yes))
    return probs, targets


def auc_with_error(scores: Sequence[float], targets: Sequence[int]) -> dict[str, float | int]:
    """ROC AUC (Mann-Whitney, ties one half) and its Hanley & McNeil (1982) standard error.

    ``SE^2 = (A (1 - A) + (n_pos - 1)(Q1 - A^2) + (n_neg - 1)(Q2 - A^2)) / (n_pos n_neg)`` with
    ``Q1 = A / (2 - A)`` and ``Q2 = 2 A^2 / (1 + A)``.
    """
    positives = [s for s, t in zip(scores, targets) if t == 1]
    negatives = [s for s, t in zip(scores, targets) if t == 0]
    if len(positives) + len(negatives) != len(targets):
        raise ValueError(f"AUC targets must be 0 or 1, got {sorted(set(targets))}")
    if not positives or not negatives:
        raise ValueError(
            f"AUC needs both classes: {len(positives)} positive and {len(negatives)} negative samples"
        )
    ordered = sorted(negatives)
    wins = 0.0
    for p in positives:  # negatives below p count 1, equal to p one half
        below, upto = bisect.bisect_left(ordered, p), bisect.bisect_right(ordered, p)
        wins += below + 0.5 * (upto - below)
    n_pos, n_neg = len(positives), len(negatives)
    auc = wins / (n_pos * n_neg)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return {"value": auc, "stderr": math.sqrt(max(variance, 0.0)), "n": n_pos + n_neg}


# ------------------------------------------------------------------------------------------- the API


def metric_with_error(records: Sequence[Record], metric: str) -> dict[str, float | int]:
    """``{"value", "stderr", "n"}`` of ``metric`` over one dataset's prediction records.

    ``value`` equals what ``ibkit test`` reports in ``results.json`` for these records.
    """
    if metric not in METRICS:
        raise ValueError(f"no standard error for metric {metric!r}; metrics: {', '.join(METRICS)}")
    if not records:
        raise ValueError(f"no records to score with {metric!r}")
    if metric == "auc":
        if not _is_ranked(records):
            raise ValueError("auc needs ranking records (candidates, scores), but these hold generated text")
        return auc_with_error(*yes_probabilities(records))
    return mean_with_error(per_sample_scores(records, metric))


def grouped_with_error(
    records: Sequence[Record], metric: str, group_of: Callable[[Record], str]
) -> dict[str, dict[str, float | int]]:
    """:func:`metric_with_error` per group (e.g. question type), groups in sorted order.

    Per-sample scores are computed over all records first (CIDEr's document frequencies are the whole
    test set's), then averaged per group; AUC is computed within each group.
    """
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(str(group_of(record)), []).append(index)
    if metric == "auc":
        return {g: metric_with_error([records[i] for i in rows], metric) for g, rows in sorted(groups.items())}
    scores = per_sample_scores(records, metric)
    return {g: mean_with_error([scores[i] for i in rows]) for g, rows in sorted(groups.items())}


def dataset_with_error(results_dir: str | Path, dataset: str, metric: str | None = None) -> dict[str, Any]:
    """``{"metric", "value", "stderr", "n"}`` of ``dataset`` from ``<results_dir>/predictions/<dataset>.jsonl``;
    ``metric`` defaults to the dataset's registry metric."""
    if metric is None:
        from ibkit.data.registry import get_spec

        metric = get_spec(dataset).metric
    path = Path(results_dir) / "predictions" / f"{dataset}.jsonl"
    try:
        return {"metric": metric, **metric_with_error(read_predictions(path), metric)}
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
