"""The LightningModule of instruction tuning: steps, optimizer, schedule, checkpoint contents.

The network is an injected :class:`ibkit.InstructBLIP` (YAML ``class_path``/``init_args`` for every
part) or a pretrained directory loaded in ``configure_model`` (so FSDP/DDP build it inside the
strategy's init context). What trains is decided by the parts themselves (frozen encoder, frozen
LLM, LoRA adapters); by default that is the paper's recipe: Q-Former, queries, projection and
``ln_vision``. The rest is delegated: ``init_from`` files to :mod:`ibkit.convert.weights`, the
tokenizers to :class:`ibkit.processor.Processor` (handed to the datamodule by its ``connect``), and
held-out evaluation to :class:`ibkit.eval.evaluator.Evaluator`; logging stays here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule

from ibkit.convert.weights import check_qformer_initialised, load_initial_weights_in_order
from ibkit.data.collate import IGNORE_INDEX, is_empty, model_inputs
from ibkit.eval.evaluator import Evaluator, predict_records
from ibkit.models.instructblip import LOSS_REDUCTIONS, InstructBLIP
from ibkit.models.language import LoraSettings, resolve_dtype
from ibkit.models.precision import training_autocast
from ibkit.models.state import persistent_keys
from ibkit.processor import Processor
from ibkit.training.checkpoint import (
    AtomicCheckpointIO,
    check_trainable_state,
    load_trainable_weights,
    save_trainable_state,
)
from ibkit.training.fsdp import refuse_fast_paths_under_fsdp
from ibkit.training.optim import OptimSettings, configure_warmup_cosine
from ibkit.training.vision_words import VisionWordHead, VisionWordSettings, vision_word_loss, word_targets

log = logging.getLogger(__name__)


class InstructBLIPModule(LightningModule):
    """Instruction tuning of InstructBLIP.

    Args:
        model: the network, built from YAML (``class_path: ibkit.InstructBLIP``). Exclusive with ``pretrained``.
        pretrained: a transformers/ibkit InstructBLIP folder or a BLIP-2 ``Blip2ForConditionalGeneration`` folder
            (a stage-2 export; ``qformer_instruction_aware: true`` for InstructBLIP's Q-Former), loaded in
            ``configure_model``.
        init_from: weights copied in after building, in order (LAVIS ``eva_vit_g.pth`` / BLIP-2 or
            InstructBLIP ``.pth``, a BERT folder for the Q-Former, a model folder, ``.safetensors``, a ``.ckpt``);
            missing keys keep their values. When it names files, every Q-Former tensor must come from one of them
            (or be drawn afresh by BERT initialisation, as LAVIS's cross-attention): otherwise the start fails,
            listing the tensors. None: the model trains from its random construction values.
        allow_uninitialized: opt in to Q-Former tensors that ``init_from`` leaves at random values: True for
            all, or a list of fnmatch patterns of names (e.g. ``["qformer.embeddings.*"]``).
        fold_bert_token_type: when ``init_from`` names a BERT folder, add BERT's token-type vector to the
            position embeddings (BERT's exact text path); False drops it, as LAVIS does (the recipes).
        qformer_instruction_aware: override the Q-Former mode saved in ``pretrained`` (False: BLIP-2's
            Q-Former, for the "no instruction-aware features" ablation from an InstructBLIP checkpoint).
        llm_dtype: dtype of the frozen LLM loaded from ``pretrained`` (e.g. ``bfloat16``).
        vision_dtype: compute dtype of a frozen vision encoder (``bfloat16``/``float16``; None: as stored).
        lora: LoRA on the LLM when loading ``pretrained`` (with ``model``, set it on the LanguageModel).
        qformer_tokenizer: folder of the Q-Former's tokenizer (bert-base-uncased; ``[DEC]`` is added as in LAVIS).
        llm_tokenizer: folder of the LLM's tokenizer; default: the LLM's own folder. The tokenizers belong
            to the model: the datamodule gets them unless its own config names tokenizer folders, and
            ``ibkit export`` saves them with the model.
        optim: AdamW + warmup-cosine settings (paper defaults).
        checkpoint_llm_blocks: recompute the LLM blocks' activations in backward (single GPU / DDP; the FSDP
            strategy does it itself). Gradients reach the soft prompt through the frozen LLM, so its
            activations are kept otherwise: this trades ~30% more compute for most of that memory.
        val_protocol: also run the per-dataset zero-shot protocol (generate/rank + metric) in validation;
            the token-weighted LM loss on held-out batches is always computed.
        generation_overrides: generation settings over each dataset's (e.g. ``{max_new_tokens: 10}``).
        results_dir: where ``ibkit test`` writes ``predictions/<dataset>.jsonl``, ``results.json`` and
            ``results.md`` (default: ``<trainer.default_root_dir>/results``).
        paper_model: the paper's Table 1 row that ``results.md`` sets beside ours (e.g.
            ``InstructBLIP FlanT5-XL``); None: no paper column.
        fast_paths: apply ibkit's measured precision policy (:mod:`ibkit.models.precision`): where bf16
            is fast, the frozen encoder and LLM are stored in bf16 (LayerNorms fp32), the training forward
            runs under bf16 autocast while trainable weights keep fp32 masters, and ``ibkit test``/``predict``
            run an inference copy whose bridge is bf16 too; plus the CPU attention kernels. Single device
            and DDP (FSDP shards uniform dtypes: use its mixed precision instead).
        compile: ``torch.compile`` the vision encoder and the Q-Former (parameter names unchanged).
        reseed_every_step: seed the random generators (dropout) from (run seed, step, rank) before every
            training batch, so a resumed run draws exactly what the uninterrupted run would have drawn
            (Lightning does not checkpoint RNG states, and loaders/validation consume random numbers).
        vision_words: an auxiliary loss that trains a from-scratch vision encoder to detect the target's
            words in its own tokens (:mod:`ibkit.training.vision_words`); needs a trainable encoder.
        loss_reduction: ``"token"`` (LAVIS, the default): the LM loss is the mean over every target token of
            the batch, so a long caption outweighs many one-word answers; ``"sample"``: each sample's tokens
            are averaged first, so every sample of the mixture weighs the same.
    """

    def __init__(
        self,
        model: InstructBLIP | None = None,
        pretrained: str | None = None,
        init_from: str | list[str] | None = None,
        allow_uninitialized: bool | list[str] = False,
        fold_bert_token_type: bool = True,
        qformer_instruction_aware: bool | None = None,
        llm_dtype: str | None = None,
        vision_dtype: str | None = None,
        lora: LoraSettings | None = None,
        qformer_tokenizer: str | None = None,
        llm_tokenizer: str | None = None,
        optim: OptimSettings | None = None,
        checkpoint_llm_blocks: bool = False,
        val_protocol: bool = True,
        results_dir: str | None = None,
        paper_model: str | None = None,
        generation_overrides: dict[str, Any] | None = None,
        reseed_every_step: bool = True,
        fast_paths: bool = False,
        compile: bool = False,
        vision_words: VisionWordSettings | None = None,
        loss_reduction: str = "token",
    ) -> None:
        super().__init__()
        if (model is None) == (pretrained is None):
            raise ValueError("InstructBLIPModule needs exactly one of `model` (built from YAML) or `pretrained` (folder)")
        if llm_dtype is not None:
            resolve_dtype(llm_dtype)  # fail at parse time on a typo
        if qformer_instruction_aware is not None and pretrained is None:
            raise ValueError("qformer_instruction_aware overrides a `pretrained` folder's Q-Former; with `model`, "
                             "set instruction_aware in the model's qformer config")
        self.qformer_instruction_aware = qformer_instruction_aware
        self.model = model
        self.pretrained = pretrained
        self.init_from = init_from
        self.allow_uninitialized = allow_uninitialized
        self.fold_bert_token_type = fold_bert_token_type
        self.llm_dtype = llm_dtype
        self.vision_dtype = vision_dtype
        self.lora = lora
        self.qformer_tokenizer_path = qformer_tokenizer
        self.llm_tokenizer_path = llm_tokenizer
        self._processor: Processor | None = None
        self._text: dict[str, Any] | None = None  # the datamodule's text settings, from connect()
        self.optim = optim or OptimSettings()
        self.checkpoint_llm_blocks = checkpoint_llm_blocks
        self.val_protocol = val_protocol
        self.results_dir = results_dir
        self.paper_model = paper_model
        self.generation_overrides = dict(generation_overrides or {})
        self.reseed_every_step = reseed_every_step
        self.fast_paths = fast_paths
        self.compile = compile
        self.vision_words = vision_words if vision_words is not None and vision_words.weight > 0 else None
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: {loss_reduction!r}; choose one of {list(LOSS_REDUCTIONS)}")
        self.loss_reduction = loss_reduction
        self.vision_word_head: VisionWordHead | None = None
        self._compiled = False
        self._policy: Any = None  # the PrecisionPolicy once applied
        self._inference: InstructBLIP | None = None  # test/predict copy (bridge in the policy's dtype)
        self._base_seed: int | None = None
        # Frozen weights are not in the checkpoint: Lightning must not demand them; we check strictly ourselves.
        self.strict_loading = False
        self._prepared = False
        self._last_step_end: float | None = None
        self._evaluator: Evaluator | None = None
        if model is not None:
            self._prepare()

    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load ``pretrained`` (once), then apply dtype/LoRA/init settings; runs before checkpoint restore."""
        if self.model is None:
            from ibkit.convert.weights import load_model_folder

            log.info("loading %s", self.pretrained)
            model = load_model_folder(self.pretrained, dtype=self.llm_dtype, instruction_aware=self.qformer_instruction_aware)
            model.train(self.training)  # loaded in eval mode; Lightning keeps whatever mode it finds
            if self.lora is not None:
                model.language_model.apply_lora(self.lora)
            self.model = model
        if not self._prepared:
            self._prepare()
        self._apply_fast_paths()
        self._connect_datamodule()

    def _apply_fast_paths(self) -> None:
        if self.fast_paths and self._policy is None:
            from ibkit.models.precision import apply_precision_policy, default_policy

            trainer = self._trainer
            refuse_fast_paths_under_fsdp(trainer)
            device = trainer.strategy.root_device if trainer is not None else self.device
            self._policy = default_policy(device, encoder_decoder=self.model.is_encoder_decoder)
            apply_precision_policy(self.model, self._policy)
            log.info("fast paths on %s: %s", device, self._policy.as_dict())
        if self.compile and not self._compiled:
            from ibkit.models.precision import compile_model

            compile_model(self.model)
            self._compiled = True

    @property
    def inference_model(self) -> InstructBLIP:
        """The network that test/predict run: with fast paths, a copy whose bridge is stored in bf16."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if self._policy is None or fitting:  # validation inside fit sees the weights being trained
            return self.model
        if self._inference is None:
            from ibkit.models.precision import inference_model

            self._inference = inference_model(self.model, self._policy)
            self._policy.set_mode(self._inference, training=False)
        return self._inference

    def _prepare(self) -> None:
        if self.vision_dtype is not None:
            resolve_dtype(self.vision_dtype)
            self.model.vision_encoder.compute_dtype = self.vision_dtype
        sources = [self.init_from] if isinstance(self.init_from, str) else list(self.init_from or [])
        covered = load_initial_weights_in_order(self.model, sources, fold_token_type=self.fold_bert_token_type)
        if sources and self.pretrained is None:  # a pretrained folder brought the whole Q-Former
            check_qformer_initialised(self.model, covered, [str(s) for s in sources], self.allow_uninitialized)
        if self.checkpoint_llm_blocks:
            self.model.language_model.enable_activation_checkpointing()
        if self.vision_words is not None:
            if self.model.vision_encoder.frozen:
                raise ValueError("vision_words trains the vision encoder, which is frozen here (set the encoder's "
                                 "frozen: false, or drop vision_words)")
            extra = self.vision_words.buckets if self.vision_words.ngrams > 1 else 0
            vocab = self.model.language_model.hf_config.vocab_size
            self.vision_word_head = VisionWordHead(self.model.vision_encoder.width, vocab + extra)
        self._prepared = True
        trainable = self.model.num_parameters(trainable_only=True)
        log.info("InstructBLIP: %s parameters, %s trainable", f"{self.model.num_parameters():,}", f"{trainable:,}")

    def processor(self) -> Processor | None:
        """The model's ``ibkit.Processor`` (tokenizers + the encoder's image settings), None without tokenizers."""
        if self._processor is None and self.model is not None:
            self._processor = Processor.for_model(
                self.model, self.qformer_tokenizer_path, self.llm_tokenizer_path, self.pretrained
            )
        return self._processor

    def _connect_datamodule(self) -> None:
        """Hand the model's tokenizers to the datamodule (it keeps checked tokenizers of its own)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "connect"):
            self._text = datamodule.connect(self.processor(), self.model.is_encoder_decoder)

    def setup(self, stage: str) -> None:
        # Atomic, weights_only checkpoint files unless the strategy was given a custom IO.
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self._base_seed is None:
            self._base_seed = torch.initial_seed()  # seed_everything's seed, before any per-step reseeding

    def on_fit_start(self) -> None:
        if self._policy is not None:
            self._policy.set_mode(self.model, training=True)  # once: nothing switches it back during fit

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.reseed_every_step:
            micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
            key = (self._base_seed or 0, self.global_step, micro, self.global_rank)
            torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1))

    # ----------------------------------------------------------------------------------- training
    def forward(self, **inputs: torch.Tensor):
        return self.model(**inputs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if is_empty(batch):
            # Every sample was bad input: a zero loss still reaches every trainable parameter, so DDP's
            # gradient all-reduce (and all other ranks) proceed normally.
            log.warning("step %d: empty batch (all samples skipped)", self.global_step)
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        inputs = model_inputs(batch)
        batch_size = int(inputs["input_ids"].shape[0])
        with training_autocast(self._policy, self.device.type):
            loss, lm_loss = self._training_loss(inputs, batch_size)
        # train/loss is the LM loss alone, comparable between runs with and without auxiliary losses
        self.log("train/loss", lm_loss, on_step=True, prog_bar=True, batch_size=batch_size)
        self._log_throughput(inputs, batch_size)
        return loss

    def _training_loss(self, inputs: dict[str, torch.Tensor], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to optimise, LM loss): the LM loss plus, when it is on, the weighted vision-word loss (one
        encoder pass serves both)."""
        pixels = inputs.get("pixel_values")
        if self.vision_word_head is None or pixels is None or "image_features" in inputs:
            loss = self.model(**inputs, loss_reduction=self.loss_reduction).loss
            return loss, loss
        images = self.model.image_tokens(pixels)
        tokens = images.tokens.reshape(batch_size, -1, images.tokens.shape[-1])  # every frame's tokens are instances
        lm_loss = self.model(**{k: v for k, v in inputs.items() if k != "pixel_values"}, image_features=images.features,
                             loss_reduction=self.loss_reduction).loss
        config = self.model.language_model.hf_config
        special = {t for t in (config.pad_token_id, config.eos_token_id) if t is not None}
        targets = word_targets(inputs["labels"], config.vocab_size, self.vision_words, special)
        word_loss = vision_word_loss(self.vision_word_head, tokens, targets)
        self.log("train/vision_word_loss", word_loss, on_step=True, batch_size=batch_size)
        return lm_loss + self.vision_words.weight * word_loss, lm_loss

    def _count_tokens(self, inputs: dict[str, torch.Tensor], batch_size: int) -> int:
        """Positions the LLM processes: soft-prompt vectors + prompt tokens (+ decoder tokens for T5)."""
        frames = max(1, self.model.num_frames(inputs.get("pixel_values"), inputs.get("image_features")))
        tokens = batch_size * frames * self.model.num_query_tokens
        mask = inputs.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        labels = inputs.get("labels")
        if labels is not None and self.model.is_encoder_decoder:
            tokens += int((labels != IGNORE_INDEX).sum())
        return tokens

    def _log_throughput(self, inputs: dict[str, torch.Tensor], batch_size: int) -> None:
        now = time.perf_counter()
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0
        self.log("train/lr", lr, on_step=True, batch_size=batch_size)
        if self._last_step_end is not None:
            elapsed = max(now - self._last_step_end, 1e-9)
            world = self.trainer.world_size
            self.log("train/samples_per_s", batch_size * world / elapsed, on_step=True, batch_size=batch_size)
            tokens = self._count_tokens(inputs, batch_size)
            self.log("train/tokens_per_s", tokens * world / elapsed, on_step=True, batch_size=batch_size)
        self._last_step_end = now

    def on_train_epoch_start(self) -> None:
        self._last_step_end = None

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_warmup_cosine(self.named_parameters(), self.optim, self.trainer)

    # ----------------------------------------------------------------------------------- evaluation
    def _eval_names(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = list(getattr(datamodule, "eval_dataset_names", None) or [])
        count = len(self.trainer.num_test_batches if self.trainer.testing else self.trainer.num_val_batches)
        return names if len(names) >= count else [f"dl{i}" for i in range(count)]

    def _llm_tokenizer(self) -> Any:
        """The LLM tokenizer the held-out batches were made with (the model's when the data has none)."""
        if self._text is not None:
            return self._text["llm_tokenizer"]
        processor = self.processor()
        return processor.llm_tokenizer if processor is not None else None

    def _eval_step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        if self._evaluator is None:
            self._evaluator = Evaluator(
                self._eval_names(), self.device, self._llm_tokenizer(), text=self._text,
                protocol=self.val_protocol, generation_overrides=self.generation_overrides,
            )
        self._evaluator.step(self.inference_model, batch, dataloader_idx)

    def _end_eval(self, prefix: str) -> dict[str, float]:
        evaluator, self._evaluator = self._evaluator, None
        if evaluator is None:
            return {}
        results = evaluator.compute(prefix)
        for key, value in results.items():
            self.log(key, value, rank_zero_only=False, sync_dist=False, add_dataloader_idx=False)
        if prefix == "test":
            out = Path(self.results_dir or Path(self.trainer.default_root_dir) / "results")
            evaluator.write_results(out, self.paper_model, write=self.global_rank == 0)
        return results

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._evaluator = None

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self._evaluator = None

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Prediction records (generated text or ranked candidates) of one held-out batch."""
        if is_empty(batch):
            return []
        names = list(getattr(self.trainer.datamodule, "eval_dataset_names", None) or [])
        return predict_records(self.inference_model, batch, names[dataloader_idx], self._llm_tokenizer(),
                               self.generation_overrides)

    # ----------------------------------------------------------------------------------- checkpoints
    def trainable_state_keys(self) -> set[str]:
        """Checkpoint keys: trainable weights (and buffers of fully trainable modules), Lightning-prefixed."""
        return persistent_keys(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_trainable_state(self, checkpoint, {"pretrained": self.pretrained, "init_from": self.init_from})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_state(self, checkpoint, self.pretrained)

    def load_trainable_weights(self, checkpoint: dict[str, Any] | str | Path) -> None:
        """Strictly load the trainable weights of a checkpoint (file or dict) into the built model."""
        load_trainable_weights(self, checkpoint)
