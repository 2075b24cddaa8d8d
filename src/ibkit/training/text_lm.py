"""Instruction-tuning a language model on text alone: the demo's miniature of FlanT5.

:class:`TextLMModule` trains an :class:`ibkit.LanguageModel` (built from YAML, ``frozen: false``) on
(prompt, target) batches of :class:`ibkit.data.text.TextDataModule`: T5's seq2seq loss, or a causal LM's
loss on the target tokens only. Validation logs ``val/loss`` (token-weighted) and the exact-match accuracy
of greedy answers, overall (``val/acc``) and per instruction kind (``val/acc_<kind>``). ``ibkit export``
writes a transformers folder (``save_pretrained`` + the tokenizer) that ``ibkit.LanguageModel(name_or_path=
folder)`` loads as the frozen LLM of the next stages.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from ibkit.models.instructblip import LOSS_REDUCTIONS, per_sample_cross_entropy
from ibkit.models.language import LanguageModel
from ibkit.models.precision import training_autocast
from ibkit.models.state import persistent_keys
from ibkit.training.checkpoint import (
    AtomicCheckpointIO,
    check_trainable_state,
    load_trainable_weights,
    save_trainable_state,
)
from ibkit.training.optim import OptimSettings, configure_warmup_cosine

log = logging.getLogger(__name__)

#: a small model from scratch learns fast: a higher peak than the InstructBLIP recipe's 1e-5
TEXT_LM_OPTIM = OptimSettings(lr=1e-3, warmup_start_lr=1e-6, warmup_steps=100, weight_decay=0.01)
_WORDS = re.compile(r"\w+|[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-cased words and punctuation marks, one space apart: a word-level tokenizer's decoding
    ("two shapes : a ...") and the reference ("two shapes: a ...") compare equal."""
    return " ".join(_WORDS.findall(text.lower()))


@torch.no_grad()
def greedy_answers(language_model: LanguageModel, tokenizer: Any, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, max_new_tokens: int) -> list[str]:
    """The decoded greedy answers to prompt rows (left-padded for a causal LM, whose prompt is cut off)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = language_model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1, do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    if not language_model.is_encoder_decoder:
        out = out[:, input_ids.shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


class TextModule(LightningModule):
    """What the demo's text-only models share: a tokenizer (its folder, else the datamodule's through ``connect``),
    checkpoints that hold the trainable weights only, the training loss and learning rate logged, AdamW with
    warm-up and cosine. ``checkpoint_name`` names the module in its checkpoints."""

    checkpoint_name = "text"

    def __init__(self, tokenizer: str | None, optim: OptimSettings) -> None:
        super().__init__()
        self.tokenizer_path = tokenizer
        self.optim = optim
        self.strict_loading = False  # checked strictly by check_trainable_state
        self._tokenizer: Any = None
        self._val: dict[str, Any] = {}

    def processor(self) -> Any:
        """The tokenizer (``ibkit export`` saves it beside the model)."""
        if self._tokenizer is None and self.tokenizer_path is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    def _connect(self, vocab_size: int, **kind: bool) -> None:
        """Take the datamodule's tokenizer (``connect(tokenizer, **kind)``) and refuse one with more tokens than
        the model has rows."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "connect"):
            self._tokenizer = datamodule.connect(self.processor(), **kind)
        tokenizer = self._tokenizer
        if tokenizer is not None and len(tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model only {vocab_size} rows: set the "
                             "model's vocab_size")

    def setup(self, stage: str) -> None:
        if type(self.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _log_training(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        size = int(batch["input_ids"].shape[0])
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=size)
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=size)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_warmup_cosine(self.named_parameters(), self.optim, self.trainer)

    def trainable_state_keys(self) -> set[str]:
        return persistent_keys(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_trainable_state(self, checkpoint, {"pretrained": None, "module": self.checkpoint_name})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_state(self, checkpoint, None)

    def load_trainable_weights(self, checkpoint: dict[str, Any] | str | Path) -> None:
        load_trainable_weights(self, checkpoint)


class TextLMModule(TextModule):
    """Train a language model on (prompt, target) text.

    Args:
        language_model: the LM from YAML (``ibkit.LanguageModel``, ``frozen: false``).
        tokenizer: the LM's tokenizer folder (also saved by ``ibkit export``); unset, the datamodule's.
        optim: AdamW + warm-up/cosine (:data:`TEXT_LM_OPTIM` by default).
        max_new_tokens: length limit of the greedy validation answers.
        fast_paths: the training half of ibkit's precision policy (:mod:`ibkit.models.precision`): where
            bf16 is fast, the training forward runs under bf16 autocast (fp32 master weights, as Lightning's
            ``bf16-mixed``); on CPU a T5 trains with eager attention (its position bias sends SDPA to a slow
            masked kernel) and validates with SDPA. Measured on the 2-core AMD EPYC (AVX512-BF16), one thread,
            the demo's T5 step: 0.24 s -> 0.15 s. Where bf16 is slow only the kernels change.
        loss_reduction: ``"token"`` (transformers' loss): the mean over every target token of the batch, so a
            36-token description outweighs 36 one-word answers; ``"sample"``: each sample's mean first, then
            the samples, as :class:`ibkit.training.module.InstructBLIPModule` can.
    """

    def __init__(self, language_model: LanguageModel, tokenizer: str | None = None,
                 optim: OptimSettings | None = None, max_new_tokens: int = 32, fast_paths: bool = False,
                 loss_reduction: str = "token") -> None:
        super().__init__(tokenizer, optim or TEXT_LM_OPTIM)
        if not any(p.requires_grad for p in language_model.parameters()):
            raise ValueError("TextLMModule trains the language model: build it with frozen: false (or LoRA)")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: {loss_reduction!r}; choose one of {list(LOSS_REDUCTIONS)}")
        self.loss_reduction = loss_reduction
        self.language_model = language_model
        self.max_new_tokens = max_new_tokens
        self.fast_paths = fast_paths
        self._policy: Any = None  # the PrecisionPolicy, chosen at setup for the trainer's device

    checkpoint_name = "text_lm"

    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        self._connect(self.language_model.vocab_size, is_encoder_decoder=self.language_model.is_encoder_decoder)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.fast_paths and self._policy is None:
            from ibkit.models.precision import default_policy

            device = self.trainer.strategy.root_device
            self._policy = default_policy(device, encoder_decoder=self.language_model.is_encoder_decoder)
            log.info("fast paths on %s: autocast %s, training attention %s", device, self._policy.autocast_dtype,
                     self._policy.llm_attention)

    # ----------------------------------------------------------------------------------- training
    def _loss(self, batch: dict[str, Any], reduction: str = "token") -> torch.Tensor:
        labels = batch["labels"]
        out = self.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        if reduction == "token":
            return out.loss
        if self.language_model.is_encoder_decoder:
            return per_sample_cross_entropy(out.logits, labels)
        return per_sample_cross_entropy(out.logits[:, :-1], labels[:, 1:])  # a causal LM predicts the next token

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._policy is not None:
            self._policy.set_llm_mode(self.language_model, training=True)  # a no-op unless validation switched it

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with training_autocast(self._policy, self.device.type):
            loss = self._loss(batch, self.loss_reduction)
        self._log_training(loss, batch)
        return loss

    # ----------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def answer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Greedy answers to prompt rows (left-padded for a causal LM)."""
        return greedy_answers(self.language_model, self._tokenizer, input_ids, attention_mask, self.max_new_tokens)

    def on_validation_epoch_start(self) -> None:
        if self._policy is not None:
            self._policy.set_llm_mode(self.language_model, training=False)
        self._val = {"loss": 0.0, "tokens": 0, "right": defaultdict(int), "seen": defaultdict(int)}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        tokens = int((batch["labels"] != -100).sum())
        self._val["loss"] += float(self._loss(batch)) * tokens
        self._val["tokens"] += tokens
        answers = self.answer(batch["gen_input_ids"], batch["gen_attention_mask"])
        for kind, said, accepted in zip(batch["kinds"], answers, batch["answers"]):
            self._val["seen"][kind] += 1
            self._val["right"][kind] += normalize_answer(said) in {normalize_answer(a) for a in accepted}

    def on_validation_epoch_end(self) -> None:
        val = self._val
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, val)
            val = {"loss": sum(p["loss"] for p in parts), "tokens": sum(p["tokens"] for p in parts),
                   "right": defaultdict(int), "seen": defaultdict(int)}
            for part in parts:
                for key in ("right", "seen"):
                    for kind, count in part[key].items():
                        val[key][kind] += count
        if not val.get("tokens"):
            return
        self.log("val/loss", val["loss"] / val["tokens"], sync_dist=False)
        for kind in sorted(val["seen"]):
            self.log(f"val/acc_{kind}", val["right"][kind] / val["seen"][kind], sync_dist=False)
        self.log("val/acc", sum(val["right"].values()) / sum(val["seen"].values()), sync_dist=False)

    # ----------------------------------------------------------------------------------- export
    def save_model(self, output: str | Path, processor: Any = None) -> Path:
        """``ibkit export``: the LM as a transformers folder (LoRA merged) + the tokenizer, loadable by
        ``LanguageModel(name_or_path=output)``."""
        self.language_model.merge_lora()
        model = self.language_model.base_model
        config = model.config
        if getattr(config, "model_type", None) == "t5" and getattr(config, "dense_act_fn", None) == "gelu_new":
            log.warning("%s: this T5 computes the tanh GELU, which LanguageModel(name_or_path=...) replaces by the "
                        "exact one unless it is given t5_exact_gelu=False; train with dense_act_fn: gelu to avoid it",
                        output)
        output = Path(output)
        model.save_pretrained(output)
        if processor is not None:
            processor.save_pretrained(output)
        return output
