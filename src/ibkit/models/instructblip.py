"""InstructBLIP: frozen image encoder -> instruction-aware Q-Former -> soft prompt for a frozen LLM.

A plain ``nn.Module`` (no Lightning). ``input_ids`` never contain image placeholder tokens: the
model puts the projected query vectors in front of the prompt, as LAVIS does. Keyword names follow
transformers' ``InstructBlipForConditionalGeneration`` so code moves between the two.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ibkit.models import transformers_io
from ibkit.models.language import LanguageModel
from ibkit.models.qformer import QFormer, QFormerConfig
from ibkit.models.vision.base import VisionEncoder

# Logits (rows x vocabulary) one ranking chunk may hold, per device type. CPU: one short candidate at a
# 4k-word vocabulary (the bench's "small" LLM), as transformers' candidate-by-candidate loop holds, so
# ranking needs no more memory than that loop; small vocabularies still batch many candidates. GPUs:
# 100 FlanT5 candidates at once (384 MiB with the fp32 copy).
RANK_LOGIT_BUDGET = {"cpu": 1 << 16, "cuda": 1 << 26}


@dataclass
class InstructBLIPOutput:
    """``loss`` (mean token cross-entropy) and ``logits`` (decoder logits, or text-position logits)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclass
class ImageTokens:
    """:meth:`InstructBLIP.image_tokens`: ``features`` the encoder's output in the input's layout ((B, N, Dv)
    or (B, T, N, Dv), what ``image_features`` takes), ``tokens`` after ``ln_vision`` with frames flattened
    into the batch ((B*T, N, Dv)), ``frames`` per sample (0 for images)."""

    features: torch.Tensor
    tokens: torch.Tensor
    frames: int


LOSS_REDUCTIONS = ("token", "sample")


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's mean token cross-entropy (``labels`` -100: not a target; samples
    without a target are left out). ``logits`` (B, T, V) are aligned with ``labels`` (B, T)."""
    tokens = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    counted = (labels != -100).to(tokens.dtype)
    per_token = tokens.view(labels.shape) * counted
    counts = counted.sum(dim=1)
    has_target = counts > 0
    return (per_token.sum(dim=1)[has_target] / counts[has_target]).mean()


class InstructBLIP(nn.Module):
    """The composite model. Components are injected, so YAML can swap any of them."""

    def __init__(
        self,
        vision_encoder: VisionEncoder,
        language_model: LanguageModel,
        qformer: QFormerConfig | None = None,
        num_query_tokens: int = 32,
        ln_vision_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        qformer = qformer or QFormerConfig()
        self.qformer_config = qformer
        self.vision_encoder = vision_encoder
        self.ln_vision = nn.LayerNorm(vision_encoder.width, eps=ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer.hidden_size))
        nn.init.normal_(self.query_tokens, std=qformer.initializer_range)
        self.qformer = QFormer(qformer, encoder_width=vision_encoder.width)
        self.language_projection = nn.Linear(qformer.hidden_size, language_model.hidden_size)
        self.language_model = language_model
        # Images per call of a frozen encoder (None: the whole batch). Smaller chunks bound the encoder's
        # activation memory (its MLP and attention transients grow with the batch); results are unchanged.
        self.frozen_encoder_chunk: int | None = None

    # -- bookkeeping ----------------------------------------------------------------------------------
    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def is_encoder_decoder(self) -> bool:
        return self.language_model.is_encoder_decoder

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for everything that trains (Q-Former, queries, projection, ln_vision, LoRA)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = self.trainable_parameters().values() if trainable_only else self.parameters()
        return sum(p.numel() for p in params)

    # -- the visual prompt ----------------------------------------------------------------------------
    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's output for (B, C, H, W) images. Frozen encoders run without autograd."""
        if not self.vision_encoder.frozen:
            return self.vision_encoder(pixel_values)
        step = self.frozen_encoder_chunk
        with torch.no_grad():
            if step and step < pixel_values.shape[0]:
                return torch.cat([self.vision_encoder(chunk) for chunk in pixel_values.split(step)])
            return self.vision_encoder(pixel_values)

    def image_tokens(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> ImageTokens:
        """The image tokens the Q-Former attends to: encoder -> ``ln_vision``, frames flattened into the batch.

        ``pixel_values``: (B, C, H, W) images or (B, T, C, H, W) clips; ``image_features`` (they win): the
        encoder's OUTPUT ((B, N, Dv) or (B, T, N, Dv)), e.g. read from the frozen-feature cache, which
        skip the encoder but still go through ``ln_vision`` (it trains).
        """
        if image_features is None:
            if pixel_values is None:
                raise ValueError("InstructBLIP needs pixel_values or image_features")
            frames = self.num_frames(pixel_values)
            flat = self._encode(pixel_values.flatten(0, 1) if frames else pixel_values)
            features = flat.unflatten(0, (pixel_values.shape[0], frames)) if frames else flat
        else:
            if image_features.dim() not in (3, 4) or image_features.shape[-1] != self.ln_vision.normalized_shape[0]:
                raise ValueError(
                    f"image_features must be (B, N, {self.ln_vision.normalized_shape[0]}) or (B, T, N, "
                    f"{self.ln_vision.normalized_shape[0]}) encoder outputs, got {tuple(image_features.shape)}"
                )
            frames = self.num_frames(image_features=image_features)
            features = image_features
            flat = image_features.flatten(0, 1) if frames else image_features
        tokens = self.ln_vision(flat.to(self.ln_vision.weight.dtype))
        return ImageTokens(features=features, tokens=tokens, frames=frames)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens after ``ln_vision``: (B, N, Dv) (clips: (B*T, N, Dv))."""
        return self.image_tokens(pixel_values).tokens

    @staticmethod
    def num_frames(pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> int:
        """Frames per sample of a clip batch ((B, T, C, H, W) pixels or (B, T, N, D) cached features); 0 for images.

        ``image_features`` win when both are given, as in :meth:`visual_prompt`.
        """
        if image_features is not None:
            return image_features.shape[1] if image_features.dim() == 4 else 0
        return pixel_values.shape[1] if pixel_values is not None and pixel_values.dim() == 5 else 0

    def visual_prompt(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected query outputs (B, Q, D_llm); video (B, T, C, H, W) gives (B, T*Q, D_llm).

        ``image_features`` are the frozen encoder's OUTPUT ((B, N, Dv) or (B, T, N, Dv)), e.g. read from
        the frozen-feature cache: they skip the encoder but still go through ``ln_vision``, which trains
        (see :meth:`image_tokens`).
        """
        images = self.image_tokens(pixel_values, image_features)
        frames, image_tokens = images.frames, images.tokens
        if frames and qformer_input_ids is not None:
            # every frame sees the same instruction
            qformer_input_ids = qformer_input_ids.repeat_interleave(frames, dim=0)
            if qformer_attention_mask is not None:
                qformer_attention_mask = qformer_attention_mask.repeat_interleave(frames, dim=0)
        if qformer_input_ids is not None and qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        query_out = self.qformer(queries, image_tokens, qformer_input_ids, qformer_attention_mask)
        prompt = self.language_projection(query_out)
        if frames:
            prompt = prompt.reshape(-1, frames * prompt.shape[1], prompt.shape[-1])
        return prompt

    # -- training / scoring forward -------------------------------------------------------------------
    def _llm_inputs(
        self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.language_model.embed(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = torch.cat((visual.to(text.dtype), text), dim=1)
        mask = torch.cat((attention_mask.new_ones(visual.shape[:2]), attention_mask), dim=1)
        return embeds, mask

    def _accepts(self, name: str) -> bool:
        return name in inspect.signature(self.language_model.base_model.forward).parameters

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        loss_reduction: str = "token",
    ) -> InstructBLIPOutput:
        """``loss_reduction``: ``"token"`` averages the cross-entropy over every target token of the batch
        (LAVIS and transformers: a 36-token caption then weighs 36 one-word answers); ``"sample"`` averages
        each sample's target tokens first, then the samples (each sample weighs the same)."""
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: {loss_reduction!r}; choose one of {list(LOSS_REDUCTIONS)}")
        visual = self.visual_prompt(pixel_values, qformer_input_ids, qformer_attention_mask, image_features)
        embeds, mask = self._llm_inputs(visual, input_ids, attention_mask)
        if self.is_encoder_decoder:
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                labels=labels,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                use_cache=False,  # a training/scoring pass: a KV cache only costs memory (and breaks recompute)
            )
            loss = out.loss
            if labels is not None and loss_reduction == "sample":
                loss = per_sample_cross_entropy(out.logits, labels)
            return InstructBLIPOutput(loss=loss, logits=out.logits)
        extra = {}
        if self._accepts("position_ids"):
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **extra)
        num_visual = visual.shape[1]
        loss = None
        if labels is not None:
            full = torch.cat((labels.new_full((labels.shape[0], num_visual), -100), labels), dim=1)
            if loss_reduction == "sample":
                loss = per_sample_cross_entropy(out.logits[:, :-1], full[:, 1:])
            else:
                loss = F.cross_entropy(
                    out.logits[:, :-1].float().flatten(0, 1), full[:, 1:].flatten(), ignore_index=-100
                )
        return InstructBLIPOutput(loss=loss, logits=out.logits[:, num_visual:])

    # -- generation -----------------------------------------------------------------------------------
    @staticmethod
    def _pack_left(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move every padding position to the front of its row (keeps the order of real tokens)."""
        order = torch.sort(mask.long(), dim=1, stable=True).indices
        packed = torch.gather(embeds, 1, order[..., None].expand_as(embeds))
        return packed, torch.gather(mask, 1, order)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        """Generated token ids, continuation only (no prompt, no decoder start token)."""
        visual = self.visual_prompt(pixel_values, qformer_input_ids, qformer_attention_mask, image_features)
        if input_ids is None:
            input_ids = torch.zeros(visual.shape[0], 0, dtype=torch.long, device=visual.device)
        embeds, mask = self._llm_inputs(visual, input_ids, attention_mask)
        cfg = self.language_model.hf_config
        generation_kwargs.setdefault("pad_token_id", cfg.pad_token_id if cfg.pad_token_id is not None else 0)
        if self.is_encoder_decoder:
            out = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generation_kwargs)
            return out[:, 1:]  # drop the decoder start token
        embeds, mask = self._pack_left(embeds, mask)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generation_kwargs)

    # -- vocabulary ranking ---------------------------------------------------------------------------
    @torch.no_grad()
    def score_candidates(
        self,
        pixel_values: torch.Tensor | None,
        qformer_input_ids: torch.Tensor | None,
        qformer_attention_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        candidate_ids: torch.Tensor,
        candidate_attention_mask: torch.Tensor,
        chunk_size: int | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of log p(candidate tokens | image, prompt) for each candidate: (B, C).

        ``chunk_size`` candidates per sample are decoded at once: their logits (B x chunk x length x vocab,
        plus one fp32 copy) are the peak memory, so larger chunks trade memory for fewer, larger LLM calls.
        By default the chunk holds at most ``RANK_LOGIT_BUDGET`` logits for the device (on CPU about as
        many as transformers' one-candidate-at-a-time loop keeps, so ranking never needs more memory).

        ``candidate_ids``/``candidate_attention_mask`` are (B, C, L), right-padded; T5 candidates should end
        with EOS. The image, the Q-Former and the prompt are encoded once per sample (the T5 encoder
        output or the decoder-only KV cache is shared by all candidates). A row whose mask is all zero
        scores ``-inf``.
        """
        visual = self.visual_prompt(pixel_values, qformer_input_ids, qformer_attention_mask, image_features)
        embeds, mask = self._llm_inputs(visual, input_ids, attention_mask)
        batch, num_cands, length = candidate_ids.shape
        if chunk_size is None:
            budget = RANK_LOGIT_BUDGET.get(embeds.device.type, RANK_LOGIT_BUDGET["cuda"])
            chunk_size = max(1, budget // max(1, batch * length * self.language_model.vocab_size))
        scores = []
        if self.is_encoder_decoder:
            encoder = self.language_model.base_model.get_encoder()
            enc = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            for start in range(0, num_cands, chunk_size):
                ids = candidate_ids[:, start : start + chunk_size]
                cmask = candidate_attention_mask[:, start : start + chunk_size]
                c = ids.shape[1]
                labels = ids.flatten(0, 1).masked_fill(cmask.flatten(0, 1) == 0, -100)
                # decoder inputs rather than labels: the LLM's own loss would upcast every logit once more
                out = self.language_model(
                    encoder_outputs=(enc.repeat_interleave(c, 0),),
                    attention_mask=mask.repeat_interleave(c, 0),
                    decoder_input_ids=self.language_model.base_model.prepare_decoder_input_ids_from_labels(labels=labels),
                    decoder_attention_mask=cmask.flatten(0, 1),
                    use_cache=False,
                )
                scores.append(self._sum_logprobs(out.logits, ids.flatten(0, 1), cmask.flatten(0, 1)).view(batch, c))
        else:
            embeds, mask = self._pack_left(embeds, mask)
            extra = {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)} if self._accepts("position_ids") else {}
            prefix = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **extra)
            cache_kw = "cache" if self._accepts("cache") else "past_key_values"  # renamed in transformers 5.x
            prefix_cache = getattr(prefix, "cache", None) or prefix.past_key_values
            last_logits = prefix.logits[:, -1:]
            next_pos = mask.long().sum(-1, keepdim=True)
            for start in range(0, num_cands, chunk_size):
                ids = candidate_ids[:, start : start + chunk_size]
                cmask = candidate_attention_mask[:, start : start + chunk_size]
                c, length = ids.shape[1], ids.shape[2]
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(c)
                flat_ids, flat_mask = ids.flatten(0, 1), cmask.flatten(0, 1)
                full_mask = torch.cat((mask.repeat_interleave(c, 0), flat_mask), dim=1)
                step_extra = {}
                if extra:
                    pos = next_pos.repeat_interleave(c, 0) + torch.arange(length, device=ids.device)
                    step_extra["position_ids"] = pos
                out = self.language_model(
                    input_ids=flat_ids, attention_mask=full_mask, use_cache=True, **{cache_kw: cache}, **step_extra
                )
                # logits predicting candidate token t come from position t-1 (the prefix's last for t=0)
                logits = torch.cat((last_logits.repeat_interleave(c, 0), out.logits[:, :-1]), dim=1)
                scores.append(self._sum_logprobs(logits, flat_ids, flat_mask).view(batch, c))
        result = torch.cat(scores, dim=1)
        empty = candidate_attention_mask.sum(-1) == 0
        return result.masked_fill(empty, float("-inf"))

    @staticmethod
    def _sum_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # log p = logit - logsumexp(logits): one fp32 copy of the logits instead of two (log_softmax's output)
        picked = logits.gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1).float()
        logp = picked - torch.logsumexp(logits.float(), dim=-1)
        return (logp * mask).sum(-1)

    # -- text in, text out (notebooks) ----------------------------------------------------------------
    def generate_text(self, processor: Any, images: Any, prompts: str | list[str], **generation_kwargs: Any) -> list[str]:
        """Images (PIL or tensors) + prompts -> generated strings, through an ``ibkit.Processor``."""
        batch = processor(images=images, text=prompts, padding_side="left" if not self.is_encoder_decoder else "right")
        device = self.query_tokens.device
        batch = {k: v.to(device) for k, v in batch.items()}
        ids = self.generate(**batch, **generation_kwargs)
        return [s.strip() for s in processor.llm_tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- persistence ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> InstructBLIP:
        """Load a transformers InstructBlip(Video) directory (or hub id) or an ibkit-saved directory.

        The original LAVIS ``.pth`` files are a foreign format: :func:`ibkit.convert.lavis.load_lavis`
        (or ``ibkit convert lavis``) reads them. Options: ``dtype`` (the LLM's), ``strict``,
        ``instruction_aware`` (load in the other Q-Former mode); see
        :func:`ibkit.models.transformers_io.load_pretrained`.
        """
        return transformers_io.load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, path: str | Path, processor: Any = None, merge_lora: bool = True) -> Path:
        """Write a directory that transformers' InstructBlipForConditionalGeneration loads as is."""
        return transformers_io.save_pretrained(self, path, processor=processor, merge_lora=merge_lora)
