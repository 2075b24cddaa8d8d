"""The LightningModule of instruction tuning: steps, optimizer, schedule, checkpoint contents.

The network is an injected :class:`ibkit.InstructBLIP` (YAML ``class_path``/``init_args`` for every
part) or a pretrained directory loaded in ``configure_model`` (so FSDP/DDP build it inside the
strategy's init context). What trains is decided by the parts themselves (frozen encoder, frozen
LLM, LoRA adapters); by default that is the paper's recipe: Q-Former, queries, projection and
``ln_vision``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torchmetrics.aggregation import MeanMetric

from ibkit.models.instructblip import InstructBLIP
from ibkit.models.language import LoraSettings, resolve_dtype
from ibkit.training.checkpoint import (
    CHECKPOINT_FORMAT,
    AtomicCheckpointIO,
    check_keys,
    clean_name,
    filter_state_dict,
    persistent_keys,
)
from ibkit.training.optim import OptimSettings, WarmupCosineSchedule, build_optimizer
from ibkit.training.vision_words import VisionWordHead, VisionWordSettings, vision_word_loss, word_targets

log = logging.getLogger(__name__)

MODEL_INPUTS = (
    "pixel_values",
    "qformer_input_ids",
    "qformer_attention_mask",
    "input_ids",
    "attention_mask",
    "labels",
    "decoder_input_ids",
    "decoder_attention_mask",
    "image_features",
)
IGNORE_INDEX = -100


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``InstructBLIP.forward`` that a collated batch carries."""
    return {k: batch[k] for k in MODEL_INPUTS if isinstance(batch.get(k), torch.Tensor)}


def is_empty(batch: dict[str, Any]) -> bool:
    """A batch whose every sample was skipped as bad input carries no tensors."""
    return not isinstance(batch.get("pixel_values"), torch.Tensor) and not isinstance(
        batch.get("image_features"), torch.Tensor
    )


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


def load_initial_weights(model: InstructBLIP, path: str | Path) -> dict[str, list[str]]:
    """Copy weights into ``model`` from a transformers/ibkit directory, an ibkit ``.safetensors`` file,
    an ibkit training ``.ckpt``, a LAVIS ``.pth`` (EVA ViT, BLIP-2 or InstructBLIP) or a BERT folder
    (the Q-Former starts from BERT, as in BLIP-2 pre-training).

    Keys the file does not have keep their current values (the frozen LLM usually comes from its own
    folder); a key with another shape is an error. Returns ``{"loaded", "missing", "unexpected"}``.
    """
    path = Path(path)
    if path.is_dir() and _model_type(path) == "bert":
        from ibkit.models.bert_init import init_qformer_from_bert

        report = init_qformer_from_bert(model.qformer, path)
        log.info("init_from %s: Q-Former from BERT (%d tensors copied, %d initialised)",
                 path, len(report.copied), len(report.initialised))
        return {"loaded": ["qformer." + k for k in report.copied], "missing": [], "unexpected": report.unused}
    if path.is_dir():
        from ibkit.convert.transformers_io import hf_to_ibkit_state, read_weights

        state = hf_to_ibkit_state(read_weights(path))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix == ".ckpt":
        from ibkit.training.checkpoint import load_checkpoint_file

        raw = load_checkpoint_file(path)["state_dict"]
        state = {clean_name(k).removeprefix("model."): v for k, v in raw.items()}
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = _lavis_state(path)
    elif not path.exists():
        raise FileNotFoundError(f"init_from: {path} does not exist")
    else:
        raise ValueError(f"init_from: {path}: expected a model folder, .safetensors, .ckpt or a LAVIS .pth file")
    own = model.state_dict()
    loaded, unexpected = [], []
    with torch.no_grad():
        for key, value in state.items():
            if key not in own:
                unexpected.append(key)
                continue
            if tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"init_from {path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
                )
            own[key].copy_(value.to(own[key].dtype))
            loaded.append(key)
    missing = sorted(set(own) - set(loaded))
    trainable_missing = sorted(set(missing) & persistent_keys(model))
    log.info("init_from %s: loaded %d tensors, %d not in the file (%d of them trainable), %d unused",
             path, len(loaded), len(missing), len(trainable_missing), len(unexpected))
    if trainable_missing:
        log.warning("init_from %s: trainable weights left at their initial values: %s", path, trainable_missing[:10])
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected}


def _model_type(directory: Path) -> str | None:
    import json

    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{config}: not a JSON object ({error})") from error


def _lavis_state(path: Path) -> dict[str, torch.Tensor]:
    """ibkit names of a LAVIS file: an InstructBLIP/BLIP-2 ``.pth`` or the EVA ViT's ``eva_vit_g.pth``."""
    try:
        from ibkit.convert.lavis import lavis_key_to_ibkit, vit_key_to_ibkit
    except ImportError as error:
        raise NotImplementedError(f"init_from {path}: LAVIS conversion (ibkit.convert.lavis) is not available") from error
    raw = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"init_from {path}: not a state dict of tensors")
    state = {}
    for key, value in raw.items():
        name = lavis_key_to_ibkit(key) or vit_key_to_ibkit(key)
        if name is not None:
            state[name] = value
    if not state:
        raise ValueError(f"init_from {path}: no tensor has a LAVIS InstructBLIP/BLIP-2/EVA-ViT name")
    return state


class InstructBLIPModule(LightningModule):
    """Instruction tuning of InstructBLIP.

    Args:
        model: the network, built from YAML (``class_path: ibkit.InstructBLIP``). Exclusive with ``pretrained``.
        pretrained: a transformers/ibkit InstructBLIP folder, loaded in ``configure_model``.
        init_from: weights copied in after building, in order (LAVIS ``eva_vit_g.pth`` / BLIP-2 or
            InstructBLIP ``.pth``, a model folder, ``.safetensors``, a ``.ckpt``); missing keys keep their values.
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
    """

    def __init__(
        self,
        model: InstructBLIP | None = None,
        pretrained: str | None = None,
        init_from: str | list[str] | None = None,
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
        self.llm_dtype = llm_dtype
        self.vision_dtype = vision_dtype
        self.lora = lora
        self.qformer_tokenizer_path = qformer_tokenizer
        self.llm_tokenizer_path = llm_tokenizer
        self._tokenizers: tuple[Any, Any] | None = None
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
        self.vision_word_head: VisionWordHead | None = None
        self._compiled = False
        self._policy: Any = None  # the PrecisionPolicy once applied
        self._inference: InstructBLIP | None = None  # test/predict copy (bridge in the policy's dtype)
        self._base_seed: int | None = None
        # Frozen weights are not in the checkpoint: Lightning must not demand them; we check strictly ourselves.
        self.strict_loading = False
        self._prepared = False
        self._last_step_end: float | None = None
        self._val: dict[str, Any] | None = None
        self._loss_collator: Any = None
        if model is not None:
            self._prepare()

    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load ``pretrained`` (once), then apply dtype/LoRA/init settings; runs before checkpoint restore."""
        if self.model is None:
            from ibkit.convert.transformers_io import load_pretrained

            log.info("loading %s", self.pretrained)
            model = load_pretrained(self.pretrained, dtype=self.llm_dtype, instruction_aware=self.qformer_instruction_aware)
            model.train(self.training)  # loaded in eval mode; Lightning keeps whatever mode it finds
            if self.lora is not None:
                model.language_model.apply_lora(self.lora)
            self.model = model
        if not self._prepared:
            self._prepare()
        self._apply_fast_paths()
        self._share_tokenizers()

    def _apply_fast_paths(self) -> None:
        if self.fast_paths and self._policy is None:
            from ibkit.models.precision import apply_precision_policy, default_policy

            trainer = self._trainer
            if trainer is not None and "fsdp" in type(trainer.strategy).__name__.lower():
                raise ValueError("fast_paths: FSDP shards flat parameters of one dtype; use the strategy's "
                                 "mixed precision (trainer.precision: bf16-mixed) instead")
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
        for source in sources:
            load_initial_weights(self.model, source)
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

    def tokenizers(self) -> tuple[Any, Any] | None:
        """(Q-Former tokenizer, LLM tokenizer) from the configured folders or ``pretrained``; None if unknown."""
        if self._tokenizers is not None:
            return self._tokenizers
        llm_path = self.llm_tokenizer_path
        if llm_path is None and self.model is not None:
            source = getattr(self.model.language_model.hf_config, "_name_or_path", "") or ""
            llm_path = source if source and Path(source).is_dir() else None
        if self.qformer_tokenizer_path and llm_path:
            from transformers import AutoTokenizer

            try:
                from ibkit.convert.lavis import lavis_qformer_tokenizer as load_qformer_tokenizer
            except ImportError:
                load_qformer_tokenizer = AutoTokenizer.from_pretrained
            self._tokenizers = (load_qformer_tokenizer(self.qformer_tokenizer_path), AutoTokenizer.from_pretrained(llm_path))
        elif self.pretrained and (Path(self.pretrained) / "qformer_tokenizer").is_dir():
            from ibkit.processor import Processor

            processor = Processor.from_pretrained(self.pretrained)
            self._tokenizers = (processor.qformer_tokenizer, processor.llm_tokenizer)
        return self._tokenizers

    def processor(self) -> Any:
        """An ``ibkit.Processor`` (tokenizers + the encoder's image settings), or None without tokenizers."""
        tokenizers = self.tokenizers()
        if tokenizers is None or self.model is None:
            return None
        from ibkit.processor import Processor

        vision = self.model.vision_encoder
        return Processor(*tokenizers, image_size=vision.image_size, mean=vision.mean, std=vision.std)

    def _share_tokenizers(self) -> None:
        """Give the datamodule the model's tokenizers unless its own config names tokenizer folders."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "setup_tokenizers"):
            return
        if getattr(datamodule, "qformer_tokenizer", None) is not None:
            self._check_data_tokenizers(datamodule)
            return
        if getattr(datamodule, "llm_tokenizer_path", None) or getattr(datamodule, "qformer_tokenizer_path", None):
            if hasattr(datamodule, "ensure_tokenizers"):  # its own folders: load them now to compare
                if getattr(datamodule, "is_encoder_decoder", False) is None:
                    datamodule.is_encoder_decoder = self.model.is_encoder_decoder
                datamodule.ensure_tokenizers()
                self._check_data_tokenizers(datamodule)
            return
        tokenizers = self.tokenizers()
        if tokenizers is not None:
            datamodule.setup_tokenizers(*tokenizers, self.model.is_encoder_decoder)

    def _check_data_tokenizers(self, datamodule: Any) -> None:
        """Refuse data tokenizers that give the model's tokens other ids: every prediction would be garbage.

        Extra tokens (a pad token appended, as LAVIS does for Vicuna) are fine; a token both know under two
        ids is not (e.g. word-level vocabularies built from differently rendered data).
        """
        own = self.tokenizers()
        if own is None:
            return
        for role, mine, theirs, path in (
            ("Q-Former", own[0], datamodule.qformer_tokenizer, getattr(datamodule, "qformer_tokenizer_path", None)),
            ("LLM", own[1], getattr(datamodule, "llm_tokenizer", None), getattr(datamodule, "llm_tokenizer_path", None)),
        ):
            if theirs is None or theirs is mine:
                continue
            vocab, data_vocab = mine.get_vocab(), theirs.get_vocab()
            moved = sorted(t for t, i in vocab.items() if data_vocab.get(t, i) != i)
            if moved:
                raise ValueError(
                    f"the data's {role} tokenizer ({path or 'set by the datamodule'}) gives {len(moved)} of the model's "
                    f"{len(vocab)} tokens other ids than the model's own (e.g. {moved[:3]}); point the data config's "
                    f"tokenizer at the model's ({self.pretrained or self.llm_tokenizer_path}) or leave it unset"
                )

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
        if self._policy is not None:
            with self._policy.autocast(self.device.type):
                loss, lm_loss = self._training_loss(inputs, batch_size)
        else:
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
            loss = self.model(**inputs).loss
            return loss, loss
        frames = self.model.num_frames(pixels)
        feats = self.model.vision_encoder(pixels.flatten(0, 1) if frames else pixels)
        tokens = self.model.ln_vision(feats.to(self.model.ln_vision.weight.dtype))
        if frames:
            feats = feats.unflatten(0, (batch_size, frames))
            tokens = tokens.reshape(batch_size, -1, tokens.shape[-1])  # every frame's tokens are instances
        lm_loss = self.model(**{k: v for k, v in inputs.items() if k != "pixel_values"}, image_features=feats).loss
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
        settings = self.optim
        max_steps = settings.max_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else None)
        if max_steps is None:
            estimate = self.trainer.estimated_stepping_batches
            if estimate == float("inf"):
                raise ValueError(
                    "the cosine schedule needs a length: set trainer.max_steps (the training stream is infinite) "
                    "or model.optim.max_steps"
                )
            max_steps = int(estimate)
        warmup = settings.warmup_steps
        if warmup > max_steps:
            log.warning("warmup_steps %d > max_steps %d: warming up over the whole run", warmup, max_steps)
            warmup = max_steps
        optimizer = build_optimizer(self.named_parameters(), settings)
        scheduler = WarmupCosineSchedule(
            optimizer, warmup, max_steps, warmup_start_lr=settings.warmup_start_lr, min_lr=settings.min_lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ----------------------------------------------------------------------------------- validation
    def _eval_names(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = list(getattr(datamodule, "eval_dataset_names", None) or [])
        count = len(self.trainer.num_test_batches if self.trainer.testing else self.trainer.num_val_batches)
        return names if len(names) >= count else [f"dl{i}" for i in range(count)]

    def _start_eval(self) -> None:
        names = self._eval_names()
        losses = [MeanMetric(sync_on_compute=True).to(self.device) for _ in names]
        run = None
        if self.val_protocol:
            run = self._protocol_run(names)
        self._val = {"names": names, "losses": losses, "total": MeanMetric(sync_on_compute=True).to(self.device),
                     "run": run}

    def _protocol_run(self, names: list[str]) -> Any:
        try:
            from ibkit.data.registry import get_spec
            from ibkit.eval.protocol import EvaluationRun

            for name in names:
                get_spec(name)
            return EvaluationRun(names).to(self.device)
        except (ImportError, KeyError) as error:
            log.warning("validation without the zero-shot protocol (LM loss only): %s", error)
            return None

    def _loss_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Train-style inputs (prompt + answer with labels) for the held-out samples that have an answer."""
        if "labels" in batch:
            return model_inputs(batch)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "llm_tokenizer", None) is None:
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
            from ibkit.data.collate import InstructionCollator

            self._loss_collator = InstructionCollator(
                datamodule.qformer_tokenizer, datamodule.llm_tokenizer, bool(self.model.is_encoder_decoder),
                mode="train", **getattr(datamodule, "max_lengths", {}),
            )
        text = self._loss_collator.tokenize_llm([batch["instructions"][i] for i in rows], [targets[i] for i in rows])
        index = torch.tensor(rows, device=self.device)
        inputs = {k: v.index_select(0, index) for k, v in model_inputs(batch).items() if k not in text}
        inputs.update({k: v.to(self.device) for k, v in text.items()})
        return inputs

    def _eval_step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        if self._val is None:
            self._start_eval()
        if is_empty(batch):
            return
        inputs = self._loss_inputs(batch)
        net = self.inference_model
        if inputs is not None:
            out = net(**inputs)
            labels = inputs["labels"]
            tokens = (labels != IGNORE_INDEX).sum().to(out.loss.dtype)
            self._val["losses"][dataloader_idx].update(out.loss.detach().float(), tokens.float())
            self._val["total"].update(out.loss.detach().float(), tokens.float())
        run = self._val["run"]
        if run is not None:
            datamodule = self.trainer.datamodule
            run.step(net, batch, self._val["names"][dataloader_idx], datamodule.llm_tokenizer,
                     **self.generation_overrides)

    def _end_eval(self, prefix: str) -> dict[str, float]:
        state, self._val = self._val, None
        if state is None:
            return {}
        results: dict[str, float] = {}
        for name, metric in zip(state["names"], state["losses"]):
            if metric.update_count or torch.distributed.is_initialized():
                results[f"{prefix}/{name}/loss"] = float(metric.compute())
        if state["total"].update_count or torch.distributed.is_initialized():
            results[f"{prefix}/loss"] = float(state["total"].compute())
        computed = state["run"].compute() if state["run"] is not None else {}
        if state["run"] is not None:
            scores = []
            for name, metrics in computed.items():
                for metric, value in metrics.items():
                    results[f"{prefix}/{name}/{metric}"] = float(value)
                    if metric != "none":
                        scores.append(float(value))
            if scores:
                results[f"{prefix}/score"] = sum(scores) / len(scores)
        for key, value in results.items():
            self.log(key, value, rank_zero_only=False, sync_dist=False, add_dataloader_idx=False)
        if prefix == "test" and state["run"] is not None:
            self._write_test_results(state["run"].records, computed)
        return results

    def _write_test_results(self, records: dict[str, list[dict[str, Any]]], metrics: dict[str, dict[str, float]]) -> None:
        """Gather every rank's prediction records; rank 0 writes the three result files."""
        from ibkit.eval.protocol import write_results

        records = dict(records)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = {}
            for part in gathered:
                for name, recs in part.items():
                    records.setdefault(name, []).extend(recs)
        if self.global_rank == 0:
            out = Path(self.results_dir or Path(self.trainer.default_root_dir) / "results")
            write_results(out, metrics, records, paper_model=self.paper_model)
            log.info("wrote %s", out / "results.md")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._val = None

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self._val = None

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Prediction records (generated text or ranked candidates) of one held-out batch."""
        if is_empty(batch):
            return []
        from ibkit.data.registry import get_spec
        from ibkit.eval.protocol import predict_batch

        datamodule = self.trainer.datamodule
        name = self._eval_names_for_predict()[dataloader_idx]
        return predict_batch(self.inference_model, batch, get_spec(name), datamodule.llm_tokenizer, self.generation_overrides)

    def _eval_names_for_predict(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return list(getattr(datamodule, "eval_dataset_names", None) or [])

    # ----------------------------------------------------------------------------------- checkpoints
    def trainable_state_keys(self) -> set[str]:
        """Checkpoint keys: trainable weights (and buffers of fully trainable modules), Lightning-prefixed."""
        return persistent_keys(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = filter_state_dict(checkpoint["state_dict"], keep)
        checkpoint["ibkit"] = {
            "format": CHECKPOINT_FORMAT,
            "trainable_keys": sorted(keep),
            "pretrained": self.pretrained,
            "init_from": self.init_from,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = self.trainable_state_keys()
        info = checkpoint.get("ibkit", {})
        if "state_dict" not in checkpoint:
            # FSDP's strategy loads the weights itself (non-strictly) and removes them before this hook:
            # compare the names the checkpoint recorded when it was written
            if "trainable_keys" not in info:
                raise ValueError("checkpoint: no state_dict and no record of its trainable weights")
            check_keys(set(info["trainable_keys"]), expected, "checkpoint")
            return
        state = checkpoint["state_dict"]
        found = {clean_name(k) for k in state}
        if not info:
            # a full checkpoint (frozen weights included, e.g. written elsewhere): keep the trainable part
            known = {clean_name(n) for n, _ in self.named_parameters(remove_duplicate=False)}
            known |= {clean_name(n) for n, _ in self.named_buffers(remove_duplicate=False)}
            unknown = sorted(found - known)
            if unknown:
                raise ValueError(f"checkpoint: weights this model does not have: {unknown[:8]}")
            checkpoint["state_dict"] = state = filter_state_dict(state, expected)
            found = {clean_name(k) for k in state}
        elif info.get("pretrained") != self.pretrained:
            log.warning("checkpoint was trained on top of %s, this model is %s: the frozen weights differ",
                        info.get("pretrained"), self.pretrained)
        check_keys(found, expected, "checkpoint")
        own = {clean_name(n): p for n, p in self.named_parameters()}
        wrong = [
            f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(own[clean_name(key)].shape)} here"
            for key, value in state.items()
            if clean_name(key) in own and own[clean_name(key)].numel() > 0  # (FSDP shards can be empty views)
            and tuple(value.shape) != tuple(own[clean_name(key)].shape)
        ]
        if wrong:
            raise ValueError(f"checkpoint: trainable weights of another shape (another configuration?): {wrong[:5]}")

    def load_trainable_weights(self, checkpoint: dict[str, Any] | str | Path) -> None:
        """Strictly load the trainable weights of a checkpoint (file or dict) into the built model."""
        if not isinstance(checkpoint, dict):
            from ibkit.training.checkpoint import load_checkpoint_file

            checkpoint = load_checkpoint_file(checkpoint)
        self.on_load_checkpoint(checkpoint)
        missing, unexpected = self.load_state_dict(checkpoint["state_dict"], strict=False)
        if unexpected:
            raise ValueError(f"checkpoint: unexpected weights {unexpected[:8]}")
