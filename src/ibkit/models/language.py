"""Adapters over transformers language models: encoder-decoder (T5/FlanT5) and decoder-only (any causal LM).

The composite model only needs a handful of things from an LM: its width, its token embeddings, a
forward on ``inputs_embeds``, ``generate`` and, for ranking, the encoder (seq2seq) or a KV cache
(decoder-only). This class gives exactly that, plus freezing, dtype, LoRA (peft) and gradient
checkpointing switches that YAML can set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ibkit.models.dtypes import resolve_dtype  # also imported from here by training/ and convert/


@dataclass
class LoraSettings:
    """LoRA on the LLM through peft. ``target_modules=None`` lets peft pick the model's defaults."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LanguageModel(nn.Module):
    """A transformers ``AutoModelForSeq2SeqLM`` or ``AutoModelForCausalLM`` behind one small interface.

    Build from a directory or hub id (``name_or_path``), from a transformers config dict (``config``,
    random weights: tests, benchmarks, meta-device sizing), or wrap an existing model
    (:meth:`from_model`).

    ``t5_exact_gelu``: a T5 loaded from ``name_or_path`` whose config names the tanh GELU runs it exact
    (``dense_act_fn="gelu"``), as LAVIS trained and evaluated FlanT5, instead of the tanh approximation
    its hub config names; a ``config`` dict is taken literally.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        dtype: str | None = None,
        frozen: bool = True,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        model: nn.Module | None = None,
        t5_exact_gelu: bool = True,
    ) -> None:
        super().__init__()
        if model is None:
            model = self._build(name_or_path, config, resolve_dtype(dtype), t5_exact_gelu)
        self.model = model
        self.frozen = frozen
        if frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.lora = None
        if lora is not None:
            self.apply_lora(lora)
        if gradient_checkpointing:
            self.enable_activation_checkpointing()

    @staticmethod
    def _build(
        name_or_path: str | None, config: dict[str, Any] | None, dtype: torch.dtype | None, t5_exact_gelu: bool = True
    ) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        if (name_or_path is None) == (config is None):
            raise ValueError("LanguageModel needs exactly one of name_or_path (weights) or config (random init)")
        if config is not None:
            cfg = dict(config)
            hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            auto = AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else AutoModelForCausalLM
            model = auto.from_config(hf_config)
            return model.to(dtype) if dtype is not None else model
        hf_config = AutoConfig.from_pretrained(name_or_path)
        if t5_exact_gelu and hf_config.model_type == "t5" and getattr(hf_config, "dense_act_fn", None) == "gelu_new":
            hf_config.dense_act_fn = "gelu"  # LAVIS's FlanT5: exact GELU in the gated FFN (ReLU T5s keep theirs)
        auto = AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else AutoModelForCausalLM
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return auto.from_pretrained(name_or_path, config=hf_config, **kwargs)

    @classmethod
    def from_model(cls, model: nn.Module, frozen: bool = True, lora: LoraSettings | None = None) -> LanguageModel:
        return cls(model=model, frozen=frozen, lora=lora)

    @classmethod
    def from_config(cls, config: Any, frozen: bool = True, **kwargs: Any) -> LanguageModel:
        """Random-weight LM from a transformers config object or dict (must contain ``model_type``)."""
        if not isinstance(config, dict):
            config = config.to_dict()
        return cls(config=config, frozen=frozen, **kwargs)

    # -- what the composite model reads -------------------------------------------------------------
    @property
    def hf_config(self):
        return self.base_model.config

    @property
    def base_model(self) -> nn.Module:
        """The transformers model underneath (LoRA wrappers removed)."""
        return self.model.get_base_model() if self.lora is not None else self.model

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.hf_config.is_encoder_decoder)

    @property
    def hidden_size(self) -> int:
        cfg = self.hf_config
        for name in ("hidden_size", "d_model", "n_embd"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        return self.base_model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer: the width of every logit vector."""
        return int(self.base_model.get_output_embeddings().weight.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.get_input_embeddings().weight.dtype

    @property
    def block_classes(self) -> set[type[nn.Module]]:
        """Transformer block classes (from transformers' ``_no_split_modules``) for FSDP wrapping."""
        names = set(getattr(self.base_model, "_no_split_modules", None) or [])
        return {type(m) for m in self.base_model.modules() if type(m).__name__ in names}

    def enable_activation_checkpointing(self) -> int:
        """Recompute every transformer block's activations in backward; returns how many were wrapped.

        transformers' own switch only acts in training mode, but a frozen LLM stays in eval mode while
        the soft prompt's gradient flows through it, so the blocks are wrapped here instead.
        """
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        classes = tuple(self.block_classes)
        if not classes:
            return 0
        count = sum(1 for m in self.model.modules() if isinstance(m, classes))
        apply_activation_checkpointing(
            self.model,
            checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, classes),
        )
        return count

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_model.get_input_embeddings()(input_ids)

    def forward(self, **kwargs: Any):
        return self.model(**kwargs)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**kwargs)

    def train(self, mode: bool = True) -> LanguageModel:
        # A frozen LLM keeps dropout off; LoRA adapters still train.
        super().train(mode)
        if self.frozen and self.lora is None:
            self.model.eval()
        return self

    # -- LoRA -----------------------------------------------------------------------------------------
    def apply_lora(self, settings: LoraSettings) -> None:
        from peft import LoraConfig, TaskType, get_peft_model

        task = TaskType.SEQ_2_SEQ_LM if self.is_encoder_decoder else TaskType.CAUSAL_LM
        cfg = LoraConfig(
            task_type=task,
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules,
            **settings.extra,
        )
        self.model = get_peft_model(self.model, cfg)
        self.lora = settings

    def merge_lora(self) -> None:
        """Fold the LoRA deltas into the base weights (export); the adapters are gone afterwards."""
        if self.lora is not None:
            self.model = self.model.merge_and_unload()
            self.lora = None
