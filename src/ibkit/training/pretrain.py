"""The LightningModule of BLIP-2 pre-training, both stages, chosen by the network it is given.

* stage 1 (``model: ibkit.models.blip2.Blip2Stage1``): ITC + ITM + ITG on (image, caption) pairs;
* stage 2 (``model: ibkit.InstructBLIP`` with ``qformer.instruction_aware: false``, i.e.
  :func:`ibkit.models.blip2.build_stage2`): the caption's language-modelling loss through the frozen LLM,
  BLIP-2's prefix LM for an encoder-decoder LLM (FlanT5).

Batches come from :class:`ibkit.data.pretrain.PretrainDataModule` (captions tokenised in the workers). The
random draws of a step (ITM hard negatives, prefix split points) come from a generator seeded by (run
seed, step, micro-batch, rank), so a resumed run draws what the uninterrupted one would have. Checkpoints,
``init_from`` and the optimiser are the instruction-tuning module's (:mod:`ibkit.training.checkpoint`,
:mod:`ibkit.convert.weights`, :mod:`ibkit.training.optim`); held-out validation reports zero-shot
retrieval recall@1/5 (ITC, and ITM re-ranking of the top k, stage 1), caption CIDEr (both stages) and
``val/loss``, the token-weighted caption loss (stage 1: ITG without label smoothing; stage 2: the LM loss),
which the trainer presets' best-checkpoint callback monitors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule

from ibkit.convert.weights import load_initial_weights_in_order
from ibkit.data.tokenize import special_token_frame
from ibkit.eval.metrics import CIDEr
from ibkit.eval.retrieval import reranked_recall, retrieval_recall
from ibkit.models.blip2 import Blip2Stage1, caption_lm_batch, prefix_lm_batch
from ibkit.models.blip2_losses import max_query_similarity
from ibkit.models.instructblip import InstructBLIP
from ibkit.models.language import resolve_dtype
from ibkit.models.precision import training_autocast
from ibkit.models.state import persistent_keys
from ibkit.processor import Processor, load_qformer_tokenizer
from ibkit.training.checkpoint import (
    AtomicCheckpointIO,
    check_trainable_state,
    load_trainable_weights,
    save_trainable_state,
)
from ibkit.training.fsdp import refuse_fast_paths_under_fsdp
from ibkit.training.optim import OptimSettings, configure_warmup_cosine

log = logging.getLogger(__name__)

#: BLIP-2's recipe (paper; LAVIS pretrain_stage1.yaml): AdamW (0.9, 0.98), wd 0.05, warm-up 1e-6 -> 1e-4
#: over 2k steps, cosine to 1e-5 (stage 1); stage 2 ends at 5e-5 (set ``optim.min_lr``).
PRETRAIN_OPTIM = OptimSettings(lr=1e-4, warmup_start_lr=1e-6, warmup_steps=2000, min_lr=1e-5, betas=(0.9, 0.98))


def step_generator(base_seed: int, step: int, micro: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that depends only on (run seed, optimizer step, micro-batch, rank)."""
    seed = int(np.random.SeedSequence((base_seed, step, micro, rank)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


class Blip2PretrainModule(LightningModule):
    """BLIP-2 pre-training (stage 1 or 2, from the class of ``model``).

    Args:
        model: the network from YAML: a ``Blip2Stage1`` (stage 1) or a BLIP-2-mode ``InstructBLIP`` (stage 2).
            Exclusive with ``pretrained``.
        pretrained: a transformers ``Blip2ForImageTextRetrieval`` (stage 1) or ``Blip2ForConditionalGeneration``
            (stage 2) folder, loaded in ``configure_model`` (e.g. to continue a stage).
        init_from: weights copied in after building, in order: an earlier stage's ``.ckpt`` or exported folder,
            LAVIS ``eva_vit_g.pth`` / ``blip2_pretrained.pth``, a BERT folder for the Q-Former (stage 1).
        qformer_tokenizer / llm_tokenizer: tokenizer folders (the Q-Former's gets ``[DEC]``; the LLM's defaults
            to the LLM's folder); handed to the datamodule.
        llm_dtype: dtype of the frozen LLM of a ``pretrained`` folder. vision_dtype: compute dtype of a
            frozen vision encoder.
        optim: AdamW + warm-up/cosine, BLIP-2's by default (:data:`PRETRAIN_OPTIM`).
        retrieval_k: candidates re-ranked by ITM per query in validation (BLIP-2: 128; 0: ITC only).
        caption_max_new_tokens: length of validation captions (CIDEr).
        max_prefix_length: prefix LM (stage 2, FlanT5): longest encoder prefix (tokens, eos included).
        fast_paths: ibkit's precision policy (:mod:`ibkit.models.precision`), as instruction tuning applies it:
            where bf16 is fast the training forward runs under bf16 autocast (trainable weights keep fp32
            masters) and stage 2 stores the frozen encoder and LLM in bf16; plus the CPU attention kernels.
            Single device and DDP (under FSDP use the strategy's mixed precision).
    """

    def __init__(
        self,
        model: Blip2Stage1 | InstructBLIP | None = None,
        pretrained: str | None = None,
        init_from: str | list[str] | None = None,
        qformer_tokenizer: str | None = None,
        llm_tokenizer: str | None = None,
        llm_dtype: str | None = None,
        vision_dtype: str | None = None,
        optim: OptimSettings | None = None,
        retrieval_k: int = 128,
        caption_max_new_tokens: int = 30,
        max_prefix_length: int | None = None,
        fast_paths: bool = False,
    ) -> None:
        super().__init__()
        if (model is None) == (pretrained is None):
            raise ValueError("Blip2PretrainModule needs exactly one of `model` (built from YAML) or `pretrained` (folder)")
        for dtype in (llm_dtype, vision_dtype):
            if dtype is not None:
                resolve_dtype(dtype)
        self.model = model
        self.pretrained = pretrained
        self.init_from = init_from
        self.qformer_tokenizer_path, self.llm_tokenizer_path = qformer_tokenizer, llm_tokenizer
        self.llm_dtype, self.vision_dtype = llm_dtype, vision_dtype
        self.optim = optim or PRETRAIN_OPTIM
        self.retrieval_k = retrieval_k
        self.caption_max_new_tokens = caption_max_new_tokens
        self.max_prefix_length = max_prefix_length
        self.fast_paths = fast_paths
        self._policy: Any = None  # the PrecisionPolicy once applied
        self.strict_loading = False  # frozen weights are not in the checkpoint; checked strictly ourselves
        self._prepared = False
        self._processor: Processor | None = None
        self._text: dict[str, Any] | None = None
        self._base_seed: int | None = None
        self._val: dict[str, list] | None = None
        self._cider = CIDEr()
        if model is not None:
            self._prepare()

    # ----------------------------------------------------------------------------------- building
    @property
    def stage(self) -> int:
        return 1 if isinstance(self.model, Blip2Stage1) else 2

    def configure_model(self) -> None:
        if self.model is None:
            from ibkit.models.blip2 import load_blip2
            from ibkit.models.blip2_transformers_io import RETRIEVAL, blip2_architecture

            log.info("loading %s", self.pretrained)
            kwargs = {} if blip2_architecture(self.pretrained) == RETRIEVAL else {"dtype": self.llm_dtype}
            self.model = load_blip2(self.pretrained, **kwargs).train(self.training)
        if not self._prepared:
            self._prepare()
        self._apply_fast_paths()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "connect"):
            self._text = datamodule.connect(self.processor(), self.stage == 2 and self.model.is_encoder_decoder)

    def _apply_fast_paths(self) -> None:
        """The precision policy, once, after the feature cache (a callback's setup) has read the encoder in
        fp32: stage 2 casts the frozen parts as instruction tuning does, stage 1 (no LLM) only autocasts."""
        if not self.fast_paths or self._policy is not None:
            return
        from ibkit.models.precision import apply_precision_policy, default_policy, use_explicit_attention

        trainer = self._trainer
        refuse_fast_paths_under_fsdp(trainer)
        device = trainer.strategy.root_device if trainer is not None else self.device
        self._policy = default_policy(device, encoder_decoder=self.stage == 2 and self.model.is_encoder_decoder)
        if self.stage == 2:
            apply_precision_policy(self.model, self._policy)
        elif self._policy.vision_attention == "explicit":
            use_explicit_attention(self.model.vision_encoder)
        log.info("fast paths on %s: %s", device, self._policy.as_dict())

    def _prepare(self) -> None:
        if isinstance(self.model, InstructBLIP) and self.model.qformer_config.instruction_aware:
            raise ValueError("BLIP-2 stage 2 has no instructions: give the InstructBLIP a BLIP-2 Q-Former "
                             "(qformer.instruction_aware: false, configs/model/qformer/blip2.yaml)")
        if not isinstance(self.model, (Blip2Stage1, InstructBLIP)):
            raise TypeError(f"Blip2PretrainModule trains a Blip2Stage1 or an InstructBLIP, not {type(self.model).__name__}")
        if self.vision_dtype is not None:
            self.model.vision_encoder.compute_dtype = self.vision_dtype
        load_initial_weights_in_order(self.model, self.init_from)
        self._prepared = True
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("BLIP-2 stage %d: %s trainable parameters", self.stage, f"{trainable:,}")

    def processor(self) -> Processor | None:
        """The model's tokenizers (+ image settings); stage 1 has only the Q-Former's."""
        if self._processor is None and self.model is not None:
            if self.stage == 2:
                self._processor = Processor.for_model(self.model, self.qformer_tokenizer_path, self.llm_tokenizer_path,
                                                      self.pretrained)
            elif self.qformer_tokenizer_path is not None:
                vision = self.model.vision_encoder
                self._processor = Processor(load_qformer_tokenizer(self.qformer_tokenizer_path), None,
                                            image_size=vision.image_size, mean=vision.mean, std=vision.std,
                                            source=self.qformer_tokenizer_path)
        return self._processor

    def setup(self, stage: str) -> None:
        if type(self.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self._base_seed is None:
            self._base_seed = torch.initial_seed()

    def _generator(self, batch_idx: int, device: torch.device | str) -> torch.Generator:
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        return step_generator(self._base_seed or 0, self.global_step, micro, self.global_rank, device)

    # ----------------------------------------------------------------------------------- training
    def _tokenizer(self) -> Any:
        if self._text is None or self._text.get("llm_tokenizer") is None:
            raise ValueError("stage 2 needs the LLM tokenizer: set model.llm_tokenizer or the data's llm_tokenizer")
        return self._text["llm_tokenizer"]

    def lm_batch(self, caption_ids: list[list[int]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Stage 2's LLM inputs: caption LM (decoder-only) or prefix LM (encoder-decoder)."""
        tok = self._tokenizer()
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if self.model.is_encoder_decoder:
            return prefix_lm_batch(caption_ids, eos, pad, generator=generator, max_prefix_length=self.max_prefix_length)
        prefix, _ = special_token_frame(tok)
        return caption_lm_batch(caption_ids, eos, pad, bos_token_id=prefix[0] if prefix else None)

    @staticmethod
    def images(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's images as the model takes them: ``pixel_values``, or the frozen encoder's cached
        outputs as ``image_features`` (:class:`ibkit.training.callbacks.FeatureCacheCallback`); {} if none."""
        for key in ("image_features", "pixel_values"):
            if isinstance(batch.get(key), torch.Tensor):
                return {key: batch[key]}
        return {}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._policy is not None and self.stage == 2:
            self._policy.set_mode(self.model, training=True)  # a no-op unless validation switched it

    def on_validation_epoch_start(self) -> None:
        if self._policy is not None and self.stage == 2:
            self._policy.set_mode(self.model, training=False)
        self._start_validation()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = self.images(batch)
        if not images:
            log.warning("step %d: empty batch (all samples skipped)", self.global_step)
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        with training_autocast(self._policy, self.device.type):
            return self._training_loss(batch, batch_idx, images)

    def _training_loss(self, batch: dict[str, Any], batch_idx: int, images: dict[str, torch.Tensor]) -> torch.Tensor:
        size = int(next(iter(images.values())).shape[0])
        if self.stage == 1:
            out = self.model(**images, input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"], image_ids=batch.get("image_ids"),
                             generator=self._generator(batch_idx, self.device))
            for name in ("itc", "itm", "itg"):
                self.log(f"train/loss_{name}", getattr(out, f"loss_{name}"), on_step=True, batch_size=size)
            self.log("train/temperature", self.model.temp.detach(), on_step=True, batch_size=size)
            loss = out.loss
        else:
            lm = self.lm_batch(batch["caption_ids"], self._generator(batch_idx, "cpu"))
            loss = self.model(**images, **{k: v.to(self.device) for k, v in lm.items()}).loss
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=size)
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_warmup_cosine(self.named_parameters(), self.optim, self.trainer)

    # ----------------------------------------------------------------------------------- validation
    def _start_validation(self) -> None:
        self._val = {"images": [], "tokens": [], "texts": [], "ids": [], "masks": [], "text_image": [], "loss": []}
        self._cider = CIDEr().to("cpu")
        self._images_seen = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.images(batch):
            return
        if self.stage == 1:
            self._stage1_eval(batch)
        else:
            self._stage2_eval(batch, batch_idx)

    def _stage1_eval(self, batch: dict[str, Any]) -> None:
        model, val = self.model, self._val
        features = model.encode_images(**self.images(batch))  # ln_vision'd tokens
        val["images"].append(model.image_embeds(features).float().cpu())
        val["tokens"].append(features.cpu())
        ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
        val["texts"].append(model.text_embeds(ids, mask).float().cpu())
        val["ids"].extend(ids.cpu().unbind(0))
        val["masks"].extend(mask.cpu().unbind(0))
        val["text_image"].append(batch["text_image"].cpu() + self._images_seen)
        self._images_seen += features.shape[0]
        # val/loss: the ITG caption loss (no cross-rank gathers, so ranks may see unequal batch counts)
        dec_ids, labels = model.decoder_inputs(batch["input_ids"], batch["attention_mask"])
        logits = model.itg_logits(features, dec_ids, batch["attention_mask"])
        tokens = int((labels[:, 1:] != -100).sum())
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
        val["loss"].append((float(loss), tokens))
        qtok = self._text["qformer_tokenizer"] if self._text else None
        if qtok is not None:
            tokens = self._caption_tokens(features)
            self._cider.update(qtok.batch_decode(tokens, skip_special_tokens=True), batch["answers"])

    def _caption_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Greedy ITG captions from ``ln_vision``'d tokens (``Blip2Stage1.generate`` without re-encoding)."""
        model, qtok = self.model, self._text["qformer_tokenizer"]
        eos = qtok.sep_token_id if qtok.sep_token_id is not None else qtok.eos_token_id
        ids = torch.full((image_tokens.shape[0], 1), model.dec_token_id, dtype=torch.long, device=image_tokens.device)
        done = torch.zeros(image_tokens.shape[0], dtype=torch.bool, device=image_tokens.device)
        for _ in range(self.caption_max_new_tokens):
            nxt = model.itg_logits(image_tokens, ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, model.qformer_config.pad_token_id), nxt)
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            done |= nxt == eos
            if done.all():
                break
        return ids[:, 1:]

    def _stage2_eval(self, batch: dict[str, Any], batch_idx: int) -> None:
        lm = self.lm_batch(batch["caption_ids"], step_generator(0, 0, batch_idx, self.global_rank))  # fixed splits
        images = self.images(batch)
        out = self.model(**images, **{k: v.to(self.device) for k, v in lm.items()})
        tokens = int((lm["labels"] != -100).sum())
        self._val["loss"].append((float(out.loss) * tokens, tokens))  # (sum, count): token-weighted over batches
        tok = self._tokenizer()
        size = next(iter(images.values())).shape[0]
        if self.model.is_encoder_decoder:  # the empty prompt: "" + </s> into the encoder
            prompt = torch.full((size, 1), tok.eos_token_id, dtype=torch.long, device=self.device)
        else:
            prefix, _ = special_token_frame(tok)
            prompt = torch.tensor([prefix] * size, dtype=torch.long, device=self.device).view(size, len(prefix))
        generated = self.model.generate(**images, input_ids=prompt,
                                        attention_mask=torch.ones_like(prompt), num_beams=1,
                                        max_new_tokens=self.caption_max_new_tokens, eos_token_id=tok.eos_token_id)
        self._cider.update([t.strip() for t in tok.batch_decode(generated, skip_special_tokens=True)], batch["answers"])

    def on_validation_epoch_end(self) -> None:
        results = self._compute_validation()
        for key, value in results.items():
            self.log(key, value, rank_zero_only=False, sync_dist=False)

    def _gathered(self) -> dict[str, list]:
        """This rank's validation records, or all ranks' (every rank then computes the same metrics)."""
        val = self._val or {}
        if self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return val
        parts: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, val)
        merged: dict[str, list] = {key: [] for key in val}
        offset = 0
        for part in parts:
            merged["text_image"].extend(t + offset for t in part["text_image"])
            offset += sum(x.shape[0] for x in part["images"])
            for key in merged:
                if key != "text_image":
                    merged[key].extend(part[key])
        return merged

    def _compute_validation(self) -> dict[str, float]:
        results: dict[str, float] = {}
        if self._cider.update_count:
            results["val/cider"] = float(self._cider.compute()) * 100.0
        val = self._gathered()
        if val.get("loss"):
            total = sum(tokens for _, tokens in val["loss"])
            results["val/loss"] = sum(loss for loss, _ in val["loss"]) / max(1, total)
        if self.stage == 1 and val.get("images"):
            results.update(self._retrieval(val))
        return results

    @torch.no_grad()
    def _retrieval(self, val: dict[str, list]) -> dict[str, float]:
        images, texts = torch.cat(val["images"]), torch.cat(val["texts"])
        text_image = torch.cat(val["text_image"])
        similarity = max_query_similarity(images, texts)
        results = {f"val/itc_{k}": v for k, v in retrieval_recall(similarity, text_image).items()}
        if self.retrieval_k > 0:
            tokens = torch.cat(val["tokens"])
            width = max(t.shape[0] for t in val["ids"])
            pad = self.model.qformer_config.pad_token_id
            ids = torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[0]), value=pad) for t in val["ids"]])
            masks = torch.stack([torch.nn.functional.pad(m, (0, width - m.shape[0])) for m in val["masks"]])

            def itm_match(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
                out = [self.model.itm_logits(tokens[r].to(self.device), ids[c].to(self.device), masks[c].to(self.device))[:, 1]
                       for r, c in zip(rows.split(64), cols.split(64))]
                return torch.cat(out).float().cpu()

            reranked = reranked_recall(similarity, text_image, self.retrieval_k, itm_match)
            results.update({f"val/itm_{k}": v for k, v in reranked.items()})
        return results

    # ----------------------------------------------------------------------------------- checkpoints, export
    def trainable_state_keys(self) -> set[str]:
        return persistent_keys(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_trainable_state(self, checkpoint, {"pretrained": self.pretrained, "init_from": self.init_from,
                                                "blip2_stage": self.stage})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_state(self, checkpoint, self.pretrained)

    def load_trainable_weights(self, checkpoint: dict[str, Any] | str | Path) -> None:
        load_trainable_weights(self, checkpoint)

    def save_model(self, output: str | Path, processor: Any = None) -> Path:
        """``ibkit export``: stage 1 as a ``Blip2ForImageTextRetrieval`` folder (+ the Q-Former tokenizer),
        stage 2 as a ``Blip2ForConditionalGeneration`` folder (+ the processor)."""
        from ibkit.models.blip2_transformers_io import save_blip2_generation, save_blip2_retrieval

        if self.stage == 1:
            out = save_blip2_retrieval(self.model, output)
            tokenizer = getattr(processor, "qformer_tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(Path(out) / "qformer_tokenizer")
            return out
        return save_blip2_generation(self.model, output, processor=processor)
