"""One held-out pass (validation or test), without Lightning: the LM loss and the zero-shot protocol.

The training module makes an :class:`Evaluator` when an evaluation epoch starts, hands it every batch,
logs what :meth:`Evaluator.compute` returns and, after ``ibkit test``, lets it write the result files.
Per dataset it accumulates the token-weighted LM loss of the samples that have an answer (their
generate-mode batches re-tokenized train-style) and, with the protocol on, the predictions and metric.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torchmetrics.aggregation import MeanMetric

from ibkit.data.collate import IGNORE_INDEX, InstructionCollator, is_empty, model_inputs
from ibkit.data.registry import get_spec
from ibkit.eval.protocol import EvaluationRun, predict_batch, write_results

log = logging.getLogger(__name__)


def eval_target(target: Any, answers: Any, candidates: Any, label: Any) -> str | None:
    """The answer the validation loss scores: the target, else the labelled candidate, else the most
    frequent reference answer."""
    if isinstance(target, str):
        return target
    if candidates and isinstance(label, int) and 0 <= label < len(candidates):
        return candidates[label]
    if answers:
        from ibkit.data.templates import most_frequent

        return most_frequent(list(answers))
    return None


def encoded_once(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with the image encoder's output (``image_features``) in place of its pixels.

    An evaluation batch feeds the model twice, for its loss and for its predictions; given the pixels, each
    pass would run the image encoder on the same images again (on the demo's CPU that second pass was half of
    the evaluation's time). The features go through ``ln_vision`` and everything after it exactly as the
    pixels' would. A model without ``image_tokens`` (or a batch without pixels) is left as it is."""
    pixels = batch.get("pixel_values")
    if not isinstance(pixels, torch.Tensor) or "image_features" in batch or not hasattr(model, "image_tokens"):
        return batch
    with torch.no_grad():
        features = model.image_tokens(pixels).features
    return {**{k: v for k, v in batch.items() if k != "pixel_values"}, "image_features": features}


def predict_records(
    model: Any, batch: dict[str, Any], dataset: str, llm_tokenizer: Any, generation_overrides: dict | None = None
) -> list[dict[str, Any]]:
    """Prediction records (generated text or ranked candidates) of one held-out batch of ``dataset``."""
    if is_empty(batch):
        return []
    return predict_batch(model, batch, get_spec(dataset), llm_tokenizer, generation_overrides)


class Evaluator:
    """Accumulates one evaluation epoch over the held-out datasets ``names`` (dataloader ``i`` is ``names[i]``).

    Args:
        names: the datasets, in dataloader order.
        device: where the metric states live (the module's device).
        llm_tokenizer: decodes generations and tokenizes ranking candidates.
        text: the datamodule's text settings (:meth:`InstructionDataModule.connect`'s result); None: no LM
            loss for batches collated without labels.
        protocol: also run the zero-shot protocol (generate/rank + metric); skipped, with a warning, when
            a dataset is not in the registry.
        generation_overrides: generation settings over each dataset's.
    """

    def __init__(
        self,
        names: list[str],
        device: torch.device,
        llm_tokenizer: Any,
        text: dict[str, Any] | None = None,
        protocol: bool = True,
        generation_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.names = list(names)
        self.device = device
        self.llm_tokenizer = llm_tokenizer
        self.text = text
        self.generation_overrides = dict(generation_overrides or {})
        self.losses = [MeanMetric(sync_on_compute=True).to(device) for _ in self.names]
        self.total = MeanMetric(sync_on_compute=True).to(device)
        self.run = self._protocol_run() if protocol else None
        self.metrics: dict[str, dict[str, float]] = {}  # the protocol's, after compute()
        self._loss_collator: InstructionCollator | None = None

    def _protocol_run(self) -> EvaluationRun | None:
        try:
            for name in self.names:
                get_spec(name)
            return EvaluationRun(self.names).to(self.device)
        except KeyError as error:
            log.warning("validation without the zero-shot protocol (LM loss only): %s", error)
            return None

    def loss_inputs(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Train-style inputs (prompt + answer with labels) for the held-out samples that have an answer."""
        if "labels" in batch:
            return model_inputs(batch)
        if self.text is None:
            return None
        n = len(batch.get("instructions", []))
        targets = [
            eval_target(
                batch.get("targets", [None] * n)[i], batch.get("answers", [None] * n)[i],
                batch.get("candidates", [None] * n)[i], batch.get("labels_idx", [None] * n)[i],
            )
            for i in range(n)
        ]
        rows = [i for i, t in enumerate(targets) if t]
        if not rows:
            return None
        if self._loss_collator is None:
            settings = {**self.text, "is_encoder_decoder": bool(model.is_encoder_decoder)}
            self._loss_collator = InstructionCollator(**settings, mode="train")
        text = self._loss_collator.tokenize_llm([batch["instructions"][i] for i in rows], [targets[i] for i in rows])
        index = torch.tensor(rows, device=self.device)
        inputs = {k: v.index_select(0, index) for k, v in model_inputs(batch).items() if k not in text}
        inputs.update({k: v.to(self.device) for k, v in text.items()})
        return inputs

    def step(self, model: Any, batch: dict[str, Any], dataloader_idx: int) -> None:
        """One batch of dataset ``names[dataloader_idx]``: its loss and (protocol) its predictions."""
        if is_empty(batch):
            return
        batch = encoded_once(model, batch)
        inputs = self.loss_inputs(model, batch)
        if inputs is not None:
            out = model(**inputs)
            tokens = (inputs["labels"] != IGNORE_INDEX).sum().to(out.loss.dtype)
            self.losses[dataloader_idx].update(out.loss.detach().float(), tokens.float())
            self.total.update(out.loss.detach().float(), tokens.float())
        if self.run is not None:
            self.run.step(model, batch, self.names[dataloader_idx], self.llm_tokenizer, **self.generation_overrides)

    def compute(self, prefix: str) -> dict[str, float]:
        """``{prefix}/{dataset}/loss``, ``{prefix}/loss``, ``{prefix}/{dataset}/{metric}``, ``{prefix}/score``
        (the mean metric) and ``{prefix}/heldin_score`` (the mean metric of the held-in datasets: the paper
        selects checkpoints "based on held-in validation performance"; a ModelCheckpoint ``monitor``).
        Every rank calls it (metrics sync here)."""
        distributed = torch.distributed.is_initialized()
        results: dict[str, float] = {}
        for name, metric in zip(self.names, self.losses):
            if metric.update_count or distributed:
                results[f"{prefix}/{name}/loss"] = float(metric.compute())
        if self.total.update_count or distributed:
            results[f"{prefix}/loss"] = float(self.total.compute())
        if self.run is not None:
            self.metrics = self.run.compute()
            scores, held_in = [], []
            for name, metrics in self.metrics.items():
                for metric, value in metrics.items():
                    results[f"{prefix}/{name}/{metric}"] = float(value)
                    if metric != "none":
                        scores.append(float(value))
                        if self.run.specs[name].held_in:
                            held_in.append(float(value))
            if scores:
                results[f"{prefix}/score"] = sum(scores) / len(scores)
            if held_in:
                results[f"{prefix}/heldin_score"] = sum(held_in) / len(held_in)
        return results

    def write_results(self, out_dir: str | Path, paper_model: str | None = None, write: bool = True) -> Path | None:
        """Gather every rank's prediction records (all ranks call); where ``write`` (rank 0), write
        ``predictions/<dataset>.jsonl``, ``results.json`` and ``results.md`` under ``out_dir``."""
        if self.run is None:
            return None
        records = dict(self.run.records)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = {}
            for part in gathered:
                for name, recs in part.items():
                    records.setdefault(name, []).extend(recs)
        if not write:
            return None
        out = write_results(out_dir, self.metrics, records, paper_model=paper_model)
        log.info("wrote %s", Path(out) / "results.md")
        return out
