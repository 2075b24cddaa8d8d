"""The zero-shot evaluation protocol: per held-out dataset, generate or rank, then score.

Pure PyTorch + torchmetrics (no Lightning): the LightningModule's validation/test steps and any
notebook call the same functions. Each dataset's prompt, metric, mode and generation settings come
from its :class:`ibkit.data.registry.DatasetSpec`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ibkit.data.registry import DatasetSpec, get_spec

# Paper Table 1 (zero-shot, held-out), keyed by ibkit's dataset names.
_T1_COLUMNS = (
    "nocaps", "flickr30k", "gqa", "vsr", "iconqa", "textvqa", "visdial", "hatefulmemes", "vizwiz",
    "scienceqa", "msvd_qa", "msrvtt_qa", "ivqa",
)
_T1_ROWS = {
    "Flamingo-80B": (None, 67.2, None, None, None, 35.0, None, 46.4, 31.6, None, 35.6, 17.4, 40.7),
    "BLIP-2 FlanT5-XL": (104.5, 76.1, 44.0, 60.5, 45.5, 43.1, 45.7, 53.0, 29.8, 54.9, 33.7, 16.2, 40.4),
    "InstructBLIP FlanT5-XL": (119.9, 84.5, 48.4, 64.8, 50.0, 46.6, 46.6, 56.6, 32.7, 70.4, 43.4, 25.0, 53.1),
    "InstructBLIP FlanT5-XXL": (120.0, 83.5, 47.9, 65.6, 51.2, 46.6, 48.5, 54.1, 30.9, 70.6, 44.3, 25.6, 53.8),
    "InstructBLIP Vicuna-7B": (123.1, 82.4, 49.2, 54.3, 43.1, 50.1, 45.2, 59.6, 34.5, 60.5, 41.8, 22.1, 52.2),
    "InstructBLIP Vicuna-13B": (121.9, 82.8, 49.5, 52.1, 44.8, 50.7, 45.4, 57.5, 33.4, 63.1, 41.2, 24.8, 51.0),
}
PAPER_TABLE1: dict[str, dict[str, float | None]] = {
    model: dict(zip(_T1_COLUMNS, values)) for model, values in _T1_ROWS.items()
}
# Metrics reported x100 in the paper (CIDEr is already on its x100-like scale in pycocoevalcap x 100).
PERCENT_METRICS = ("cider", "vqa_accuracy", "accuracy", "auc", "mrr", "ivqa_accuracy")


def candidate_tensors(
    tokenizer: Any, candidates: list[list[str]], is_encoder_decoder: bool, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise each sample's candidates to (B, C, L) ids + mask, as LAVIS scores them.

    No BOS (the candidate continues the prompt). T5 candidates end with EOS (LAVIS's T5 tokenizer adds
    ``</s>``); decoder-only candidates do not (LAVIS's Vicuna ranking drops the BOS and adds no EOS), so
    a decoder-only LLM is never charged for stopping. Samples with fewer candidates (and, decoder-only,
    a candidate that tokenizes to nothing) get all-zero rows, which ``score_candidates`` scores ``-inf``.
    """
    suffix: list[int] = []
    if is_encoder_decoder:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no EOS token; T5 ranking ends candidates with one")
        suffix = [tokenizer.eos_token_id]
    flat = [c for row in candidates for c in row]
    encoded = tokenizer(flat, add_special_tokens=False)["input_ids"]
    rows, k = [], 0
    for row in candidates:
        rows.append([list(ids) + suffix for ids in encoded[k : k + len(row)]])
        k += len(row)
    num_cands = max(len(r) for r in rows)
    length = max(len(ids) for r in rows for ids in r)
    out = torch.zeros(len(rows), num_cands, length, dtype=torch.long)
    mask = torch.zeros_like(out)
    for b, row in enumerate(rows):
        for c, ids in enumerate(row):
            out[b, c, : len(ids)] = torch.tensor(ids)
            mask[b, c, : len(ids)] = 1
    return out.to(device), mask.to(device)


def generation_settings(spec: DatasetSpec, is_encoder_decoder: bool, overrides: dict | None = None) -> dict:
    """The dataset's beam settings as LAVIS runs them for this kind of LLM, then ``overrides``.

    Decoder-only LLMs use length penalty 0 instead of -1. The spec's ``min_new_tokens`` is LAVIS's
    ``min_length``, which for T5 counts the decoder start token: one fewer new token for T5.
    """
    settings = dict(spec.generation)
    if not is_encoder_decoder and settings.get("length_penalty", 0) < 0:
        settings["length_penalty"] = 0.0
    if is_encoder_decoder and "min_new_tokens" in settings:
        settings["min_new_tokens"] = max(0, int(settings["min_new_tokens"]) - 1)
    settings.update(overrides or {})
    return settings


MODEL_INPUTS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")


@torch.no_grad()
def predict_batch(
    model: Any, batch: dict[str, Any], spec: DatasetSpec, llm_tokenizer: Any, generation_overrides: dict | None = None
) -> list[dict[str, Any]]:
    """One record per sample: generated text, or per-candidate log-likelihoods and the chosen candidate.

    Every record also says what was asked: ``prompt`` (the text the LLM was given, after any truncation)
    and ``generation`` (the settings ``generate`` ran with) or ``ranking`` (how candidates were scored),
    so the protocol can be checked from the prediction files alone.
    """
    if not batch.get("sample_ids"):
        return []
    prompts = batch.get("prompts") or batch.get("instructions") or [None] * len(batch["sample_ids"])
    own = _qformer_own_texts(batch)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "image_features" in batch:
        inputs["image_features"] = batch["image_features"]
        inputs.pop("pixel_values", None)
    records = []
    if spec.eval_mode == "generate":
        kwargs = generation_settings(spec, model.is_encoder_decoder, generation_overrides)
        ids = model.generate(**inputs, **kwargs)
        texts = [t.strip() for t in llm_tokenizer.batch_decode(ids, skip_special_tokens=True)]
        for i, text in enumerate(texts):
            records.append(
                {"sample_id": batch["sample_ids"][i], "prediction": text, "answers": batch["answers"][i],
                 "prompt": prompts[i], **own[i], "generation": dict(kwargs)}
            )
        return records
    candidates = batch["candidates"]
    if any(not c for c in candidates):
        raise ValueError(f"{spec.name}: ranking needs candidates for every sample")
    device = inputs["input_ids"].device
    cand_ids, cand_mask = candidate_tensors(llm_tokenizer, candidates, model.is_encoder_decoder, device)
    ranking = {"score": "sum of candidate token log-likelihoods",
               "candidate_ends_with_eos": bool(model.is_encoder_decoder)}
    scores = model.score_candidates(
        inputs.get("pixel_values"), inputs.get("qformer_input_ids"), inputs.get("qformer_attention_mask"),
        inputs["input_ids"], inputs.get("attention_mask"), cand_ids, cand_mask,
        image_features=inputs.get("image_features"),
    )
    for i, row in enumerate(candidates):
        s = scores[i, : len(row)].float().cpu()
        best = int(s.argmax())
        records.append(
            {
                "sample_id": batch["sample_ids"][i],
                "prediction": row[best],
                "prediction_index": best,
                "label": batch["labels_idx"][i],
                "candidates": list(row),
                "scores": [round(float(v), 5) for v in s],
                "prompt": prompts[i],
                **own[i],
                "ranking": ranking,
            }
        )
    return records


def _qformer_own_texts(batch: dict[str, Any]) -> list[dict[str, str]]:
    """Per row, ``{"qformer_prompt": text}`` where the Q-Former read a wording of its own (a record's
    ``qformer_question``), else nothing: prediction files of records without one keep their keys."""
    own = batch.get("qformer_instructions") or [None] * len(batch["sample_ids"])
    llm = batch.get("instructions") or [None] * len(batch["sample_ids"])
    return [{"qformer_prompt": q} if q is not None and q != t else {} for q, t in zip(own, llm)]


class DatasetEvaluator:
    """Feeds prediction records of one dataset into its torchmetrics metric (DDP-synced)."""

    def __init__(self, spec: DatasetSpec) -> None:
        from ibkit.eval.metrics import build_metric

        self.spec = spec
        self.metric = build_metric(spec.metric)

    def to(self, device: torch.device) -> DatasetEvaluator:
        self.metric = self.metric.to(device)
        return self

    def update(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        name = self.spec.metric
        device = self.metric.device
        if self.spec.eval_mode == "generate":
            self.metric.update([r["prediction"] for r in records], [r["answers"] for r in records])
            return
        if name == "accuracy":
            # an answer outside the candidate list (open-ended video QA vocabularies) can never be right
            labels = torch.tensor([-1 if r["label"] is None else r["label"] for r in records], device=device)
            preds = torch.tensor([r["prediction_index"] for r in records], device=device)
            self.metric.update(preds, labels)
            return
        missing = [r["sample_id"] for r in records if r["label"] is None]
        if missing:
            raise ValueError(f"{self.spec.name}: samples {missing[:5]} have no ground-truth label for {name}")
        labels = torch.tensor([r["label"] for r in records], device=device)
        if name == "auc":
            probs, targets = [], []
            for r in records:
                lowered = [c.lower() for c in r["candidates"]]
                if "yes" not in lowered:
                    raise ValueError(f"{self.spec.name}: AUC ranking needs a 'yes' candidate, got {r['candidates']}")
                yes = lowered.index("yes")
                probs.append(torch.softmax(torch.tensor(r["scores"]), 0)[yes].item())
                targets.append(int(r["label"] == yes))
            self.metric.update(torch.tensor(probs, device=device), torch.tensor(targets, device=device))
        elif name == "mrr":
            width = max(len(r["scores"]) for r in records)
            scores = torch.full((len(records), width), -math.inf)
            for i, r in enumerate(records):
                scores[i, : len(r["scores"])] = torch.tensor(r["scores"])
            self.metric.update(scores.to(device), labels)
        else:
            raise ValueError(f"{self.spec.name}: metric {name!r} does not apply to ranking")

    def compute(self) -> float:
        return float(self.metric.compute())


class EvaluationRun:
    """Evaluators + prediction records for several datasets; writes the three result files."""

    def __init__(self, dataset_names: list[str]) -> None:
        self.specs = {name: get_spec(name) for name in dataset_names}
        # datasets without a metric (VQG, LLaVA) still get prediction records
        self.evaluators = {name: DatasetEvaluator(spec) for name, spec in self.specs.items() if spec.metric != "none"}
        self.records: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def to(self, device: torch.device) -> EvaluationRun:
        for ev in self.evaluators.values():
            ev.to(device)
        return self

    def step(self, model: Any, batch: dict[str, Any], dataset: str, llm_tokenizer: Any, **overrides: Any) -> list[dict]:
        records = predict_batch(model, batch, self.specs[dataset], llm_tokenizer, overrides or None)
        if dataset in self.evaluators:
            self.evaluators[dataset].update(records)
        self.records[dataset].extend(records)
        return records

    def compute(self) -> dict[str, dict[str, float]]:
        """dataset -> {metric: value} for datasets with predictions (under DDP: on any rank; all ranks call)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return {
            name: {self.specs[name].metric: ev.compute()}
            for name, ev in self.evaluators.items()
            if distributed or self.records.get(name)
        }


def results_markdown(
    results: dict[str, dict[str, float]],
    paper_model: str | None = None,
    baselines: dict[str, dict[str, float]] | None = None,
) -> str:
    """A table of our metric per dataset beside the paper's Table 1 row (x100 scale) and the difference."""
    header = "| dataset | metric | ibkit |"
    sep = "|---|---|---|"
    extra_cols = list((baselines or {}).keys())
    for col in extra_cols:
        header += f" {col} |"
        sep += "---|"
    if paper_model:
        header += f" paper ({paper_model}) | difference |"
        sep += "---|---|"
    lines = [header, sep]
    paper = PAPER_TABLE1.get(paper_model or "", {})
    for name, metrics in results.items():
        for metric, value in metrics.items():
            ours = 100 * value if metric in PERCENT_METRICS else value
            row = f"| {name} | {metric} | {ours:.1f} |"
            for col in extra_cols:
                other = (baselines or {})[col].get(name, {}).get(metric)
                row += " - |" if other is None else f" {100 * other:.1f} |"
            if paper_model:
                ref = paper.get(name)
                row += " - | - |" if ref is None else f" {ref:.1f} | {ours - ref:+.1f} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | Path,
    results: dict[str, dict[str, float]],
    records: dict[str, list[dict[str, Any]]],
    paper_model: str | None = None,
    baselines: dict[str, dict[str, float]] | None = None,
) -> Path:
    """predictions/<dataset>.jsonl, results.json (dataset -> metric -> value), results.md."""
    out = Path(out_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    for name, recs in records.items():
        with open(out / "predictions" / f"{name}.jsonl", "w") as f:
            for r in sorted(recs, key=lambda r: str(r["sample_id"])):
                f.write(json.dumps(r) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(results_markdown(results, paper_model, baselines))
    return out
