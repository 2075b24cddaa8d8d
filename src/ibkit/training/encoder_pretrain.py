"""Pre-training an image encoder on image-caption pairs: the stand-in for a pretrained EVA-CLIP / CLIP tower.

The real pipeline starts from an encoder someone else pretrained; the demo trains its own first, on the
caption pairs BLIP-2 pre-training reads (:class:`ibkit.data.pretrain.PretrainDataModule` batches). The
objective is :mod:`ibkit.training.vision_words` alone: a LayerNorm and a linear head score every image
token for every caption word (and hashed word pair), an image's score for a word is its best token's, and
a softmax loss asks the image to name its caption's words. Max-pooling over tokens makes each object's
own tokens carry its words, which is what a Q-Former's cross-attention reads later. Optionally
(``position_weight``) each patch token also names its own grid cell, position prediction as a pretext task
(Zhai et al. 2022): word detection alone lets the tokens forget where they are (a linear probe of the demo's
encoder told an object's side from its centre token at 0.57, a random encoder at 0.99), and a Q-Former can
only answer "left or right" from tokens that know.

The caption words are the batch's Q-Former token ids (``input_ids``, the tokenizer the datamodule holds),
special tokens excluded. ``ibkit export`` writes ``encoder.safetensors`` (the encoder's state dict under
``vision_encoder.``, the attribute name of ``Blip2Stage1`` and ``InstructBLIP``, so later stages take it
with ``init_from``) and ``encoder.json`` (what it is); the norm and head stay behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from ibkit.data.collate import IGNORE_INDEX
from ibkit.models.precision import training_autocast
from ibkit.models.state import persistent_keys
from ibkit.models.vision.base import VisionEncoder
from ibkit.processor import Processor
from ibkit.training.checkpoint import (
    AtomicCheckpointIO,
    check_trainable_state,
    load_checkpoint_file,
    load_trainable_weights,
    save_trainable_state,
)
from ibkit.training.optim import OptimSettings, configure_warmup_cosine
from ibkit.training.vision_words import (
    VisionWordHead,
    VisionWordSettings,
    vision_word_loss,
    word_detection_metrics,
    word_targets,
)

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"
ENCODER_INFO = "encoder.json"
#: the attribute that holds the image encoder in Blip2Stage1 and InstructBLIP: the exported keys' prefix
ENCODER_PREFIX = "vision_encoder."


def describe_encoder(encoder: VisionEncoder) -> dict[str, Any]:
    """``class_path`` and the constructor arguments that rebuild ``encoder``'s shape (for ``encoder.json``)."""
    init_args: dict[str, Any] = {}
    config = getattr(encoder, "config", None)
    if dataclasses.is_dataclass(config):
        init_args["config"] = dataclasses.asdict(config)
    elif isinstance(config, dict):
        init_args["config"] = dict(config)
    for name in ("path", "layer", "keep_cls"):
        if getattr(encoder, name, None) is not None:
            init_args[name] = getattr(encoder, name)
    kind = type(encoder)
    return {
        "class_path": f"{kind.__module__}.{kind.__qualname__}",
        "init_args": init_args,
        "width": int(encoder.width),
        "image_size": int(encoder.image_size),
        "mean": list(encoder.mean),
        "std": list(encoder.std),
    }


def patch_cells(encoder: VisionEncoder) -> int:
    """How many patch tokens ``encoder`` returns per image: (image_size / patch_size)^2 from its config."""
    config = getattr(encoder, "config", None)
    patch = config.get("patch_size") if isinstance(config, dict) else getattr(config, "patch_size", None)
    if not patch or encoder.image_size % patch:
        raise ValueError(f"position_weight: {type(encoder).__name__} has no patch_size dividing its image size "
                         f"({encoder.image_size}) in its config, so its patch grid is unknown")
    return (encoder.image_size // patch) ** 2


class EncoderPretrainModule(LightningModule):
    """Trains an image encoder to detect its captions' words in its own tokens.

    Args:
        vision_encoder: any :class:`ibkit.models.vision.VisionEncoder` built from YAML with ``frozen: false``
            (``ibkit.models.EVAViT``, ``ibkit.models.vision.hf_tower.HFVisionEncoder`` with ``config``).
        vocab_size: size of the word ids the head scores: at least the caption tokenizer's length
            (the shapes tokenizers: 1024, ``ibkit.shapes.datamodule.TINY_VOCAB_SIZE``).
        vision_words: n-grams and hash buckets of the targets; ``weight`` scales the loss (it is the only one).
        special_ids: token ids that are not words; None: the datamodule tokenizer's special tokens.
        optim: AdamW + warm-up/cosine (:mod:`ibkit.training.optim`).
        position_weight: weight of the position-prediction loss beside the vision-word loss (0: off); needs
            an encoder whose config has a ``patch_size`` (EVA ViT, CLIP/SigLIP towers).
        fast_paths: the training half of ibkit's precision policy (:mod:`ibkit.models.precision`): where
            bf16 is fast, the training forward runs under bf16 autocast (fp32 master weights, as Lightning's
            ``bf16-mixed``); on CPU an EVA ViT computes attention explicitly. Measured on the 2-core AMD EPYC
            (AVX512-BF16), one thread, the demo's encoder step: 0.33 s -> 0.19 s. Where bf16 is slow only the
            attention kernel changes.
    """

    def __init__(
        self,
        vision_encoder: VisionEncoder,
        vocab_size: int,
        vision_words: VisionWordSettings | None = None,
        special_ids: list[int] | None = None,
        optim: OptimSettings | None = None,
        position_weight: float = 0.0,
        fast_paths: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(vision_encoder, VisionEncoder):
            raise TypeError(f"vision_encoder: expected an ibkit VisionEncoder, got {type(vision_encoder).__name__}")
        if vision_encoder.frozen:
            raise ValueError(f"vision_encoder: {type(vision_encoder).__name__} is frozen, so there is nothing to "
                             "pretrain; set its frozen: false")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
        self.vision_words = vision_words or VisionWordSettings(weight=1.0)
        if self.vision_words.weight <= 0:
            raise ValueError("vision_words.weight: must be > 0 (the vision-word loss is this module's only loss)")
        self.vision_encoder = vision_encoder
        self.vocab_size = vocab_size
        extra = self.vision_words.buckets if self.vision_words.ngrams > 1 else 0
        self.token_norm = nn.LayerNorm(vision_encoder.width)  # the encoder has no final norm (EVA, CLIP's -2)
        self.word_head = VisionWordHead(vision_encoder.width, vocab_size + extra)
        self.special_ids = set(special_ids) if special_ids is not None else None
        if position_weight < 0:
            raise ValueError(f"position_weight: must be >= 0, got {position_weight}")
        self.position_weight = position_weight
        self.position_head = nn.Linear(vision_encoder.width, patch_cells(vision_encoder)) if position_weight > 0 else None
        self.optim = optim or OptimSettings()
        self.strict_loading = False  # checked strictly by check_trainable_state
        self.trained_steps: int | None = None  # the exported checkpoint's step
        self.fast_paths = fast_paths
        self._policy: Any = None  # the PrecisionPolicy, chosen at setup for the trainer's device
        self._val: dict[str, list[torch.Tensor]] | None = None
        self._last_step_end: float | None = None

    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Take the caption tokenizer from the datamodule: its special ids, and a vocabulary that fits."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "connect"):
            return
        text = datamodule.connect(None, False)  # the encoder brings no tokenizers: the data's are used
        tokenizer = (text or {}).get("qformer_tokenizer")
        if tokenizer is None:
            return
        if len(tokenizer) > self.vocab_size:
            raise ValueError(f"model.vocab_size={self.vocab_size} is smaller than the caption tokenizer "
                             f"({len(tokenizer)} tokens): raise it to at least {len(tokenizer)}")
        if self.special_ids is None:
            self.special_ids = set(tokenizer.all_special_ids)

    def processor(self) -> Processor:
        """The encoder's image settings (no tokenizers): what ``ibkit export`` hands to :meth:`save_model`."""
        encoder = self.vision_encoder
        return Processor(None, None, image_size=encoder.image_size, mean=encoder.mean, std=encoder.std)

    def setup(self, stage: str) -> None:
        if type(self.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.fast_paths and self._policy is None:
            from ibkit.models.precision import default_policy, use_explicit_attention

            device = self.trainer.strategy.root_device
            self._policy = default_policy(device, encoder_decoder=False)
            if self._policy.vision_attention == "explicit":
                use_explicit_attention(self.vision_encoder)
            log.info("fast paths on %s: autocast %s, vision attention %s", device, self._policy.autocast_dtype,
                     self._policy.vision_attention)

    # ----------------------------------------------------------------------------------- the loss
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, width) normalised image tokens, the instances the head scores."""
        return self.token_norm(self.vision_encoder(pixel_values))

    def caption_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Multi-hot (rows, vocab_size + buckets) of each caption's words and hashed word pairs."""
        if self.special_ids is None:
            raise ValueError("EncoderPretrainModule: no special token ids (no tokenizer connected): set special_ids")
        ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return word_targets(ids.cpu(), self.vocab_size, self.vision_words, self.special_ids)

    def caption_loss(self, batch: dict[str, Any], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted vision-word loss of a batch's images (or their ``tokens``, already computed) against its
        captions' words."""
        targets = self.caption_targets(batch["input_ids"], batch.get("attention_mask"))
        if tokens is None:
            tokens = self.image_tokens(batch["pixel_values"])
        return self.vision_words.weight * vision_word_loss(self.word_head, tokens, targets)

    def position_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each patch token names its own grid cell (cross-entropy over the cells; a leading [CLS] is left
        out): position prediction as a pretext task (Zhai et al. 2022). Word detection alone lets the
        tokens forget where they are, which side and spatial questions need later."""
        cells = self.position_head.out_features
        patches = tokens[:, -cells:]
        logits = self.position_head(patches).float().flatten(0, 1)
        target = torch.arange(cells, device=tokens.device).repeat(tokens.shape[0])
        return torch.nn.functional.cross_entropy(logits, target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        pixels = batch.get("pixel_values")
        if not isinstance(pixels, torch.Tensor):
            log.warning("step %d: empty batch (all samples skipped)", self.global_step)
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        size = int(pixels.shape[0])
        with training_autocast(self._policy, self.device.type):
            tokens = self.image_tokens(pixels)
            loss = self.caption_loss(batch, tokens)
            if self.position_head is not None:  # one encoder pass serves both losses
                where = self.position_loss(tokens)
                self.log("train/position_loss", where, on_step=True, batch_size=size)
                loss = loss + self.position_weight * where
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=size)
        self._log_throughput(size)
        return loss

    def _log_throughput(self, size: int) -> None:
        now = time.perf_counter()
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=size)
        if self._last_step_end is not None:
            elapsed = max(now - self._last_step_end, 1e-9)
            self.log("train/samples_per_s", size * self.trainer.world_size / elapsed, on_step=True, batch_size=size)
        self._last_step_end = now

    def on_train_epoch_start(self) -> None:
        self._last_step_end = None

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_warmup_cosine(self.named_parameters(), self.optim, self.trainer)

    # ----------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"logits": [], "targets": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Scores against every reference caption's words of an image (held-out batches carry them all)."""
        pixels = batch.get("pixel_values")
        if not isinstance(pixels, torch.Tensor):
            return
        if "text_input_ids" in batch:
            per_text = self.caption_targets(batch["text_input_ids"], batch.get("text_attention_mask"))
            targets = torch.zeros(pixels.shape[0], per_text.shape[1])
            targets.index_add_(0, batch["text_image"].cpu(), per_text).clamp_(max=1.0)
        else:
            targets = self.caption_targets(batch["input_ids"], batch.get("attention_mask"))
        logits = self.word_head(self.image_tokens(pixels)).float().cpu()
        self._val["logits"].append(logits)
        self._val["targets"].append(targets)

    def on_validation_epoch_end(self) -> None:
        val, self._val = self._val, None
        if not val or not val["logits"]:
            return
        logits, targets = torch.cat(val["logits"]), torch.cat(val["targets"])
        keep = targets.sum(1) > 0
        probs = torch.log_softmax(logits[keep], dim=-1)
        loss = -((targets[keep] / targets[keep].sum(1, keepdim=True)) * probs).sum(1).mean()
        words = logits[:, : self.vocab_size].clone()
        specials = [i for i in (self.special_ids or ()) if 0 <= i < self.vocab_size]
        words[:, specials] = float("-inf")
        results = {"val/loss": float(loss) * self.vision_words.weight}
        results.update({f"val/{k}": v for k, v in word_detection_metrics(words, targets[:, : self.vocab_size]).items()})
        for key, value in results.items():
            self.log(key, value, rank_zero_only=False, sync_dist=False)

    # ----------------------------------------------------------------------------------- checkpoints, export
    def trainable_state_keys(self) -> set[str]:
        return persistent_keys(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_trainable_state(self, checkpoint, {"pretrained": None, "encoder": describe_encoder(self.vision_encoder)})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_state(self, checkpoint, None)

    def load_trainable_weights(self, checkpoint: dict[str, Any] | str | Path) -> None:
        """Strictly load a checkpoint's weights (encoder, norm, head); remembers its step for the export."""
        if not isinstance(checkpoint, dict):
            checkpoint = load_checkpoint_file(checkpoint)
        self.trained_steps = checkpoint.get("global_step")
        load_trainable_weights(self, checkpoint)

    def save_model(self, output: str | Path, processor: Any = None) -> Path:
        """``ibkit export``: ``encoder.safetensors`` (``vision_encoder.<key>``, loadable by ``init_from`` into
        ``Blip2Stage1``/``InstructBLIP`` built with the same encoder config) and ``encoder.json``."""
        from safetensors.torch import save_file

        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        state = {ENCODER_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.vision_encoder.state_dict().items()}
        save_file(state, str(out / ENCODER_FILE))
        info = {
            "format": "ibkit pretrained image encoder",
            "weights": ENCODER_FILE,
            "key_prefix": ENCODER_PREFIX,
            "encoder": describe_encoder(self.vision_encoder),
            "objective": "vision words: multiple-instance detection of caption words and hashed word pairs"
            + (f"; position prediction of every patch token (weight {self.position_weight})" if self.position_head else ""),
            "vision_words": dataclasses.asdict(self.vision_words),
            "vocab_size": self.vocab_size,
            "steps": self.trained_steps,
        }
        (out / ENCODER_INFO).write_text(json.dumps(info, indent=2) + "\n")
        log.info("wrote %s (%d tensors) and %s", out / ENCODER_FILE, len(state), ENCODER_INFO)
        return out
