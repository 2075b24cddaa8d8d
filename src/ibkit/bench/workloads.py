"""The benchmark's models, inputs and workloads: identical weights in ibkit and transformers.

Implementations (all in one process, with the same random weights):

* ``hf_fp32``: transformers' ``InstructBlipForConditionalGeneration`` in fp32, trained the way its
  users train it (``model.train()``, frozen parts by ``requires_grad=False``, AdamW);
* ``hf_bf16``: the same model cast to bf16 as a whole (AdamW on bf16 weights);
* ``hf_bf16_eval`` (training only): ``hf_bf16`` with its frozen parts kept in eval mode as ibkit
  does (no dropout in the frozen LLM): not how transformers is run by default, it shows how much of
  the difference is dropout;
* ``ibkit``: :class:`ibkit.InstructBLIP` under its default precision policy
  (:mod:`ibkit.models.precision`);
* ``ibkit_cached`` (training only): ``ibkit`` fed ``image_features`` read from a
  :class:`~ibkit.data.feature_cache.FeatureStore` on disk instead of running the encoder;
* ``ibkit_stage1`` (``pretrain`` workload): a BLIP-2 stage-1 step (ITC + ITM + ITG,
  :class:`ibkit.models.blip2.Blip2Stage1`) on the same frozen encoder and Q-Former shapes; transformers
  has no pre-training losses, so it has no baseline;
* ranking baselines: transformers scoring candidate by candidate (``hf_fp32``, ``hf_bf16``) and
  batched over the candidates of a question (``hf_bf16_batched``).

How they are measured and reported is :mod:`ibkit.bench.runner`.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ibkit.bench.measure import count_flops, resident_bytes
from ibkit.bench.sizes import BenchSize
from ibkit.models.instructblip import InstructBLIP
from ibkit.models.language import LanguageModel
from ibkit.models.precision import (
    PrecisionPolicy,
    apply_precision_policy,
    default_policy,
    inference_model,
)
from ibkit.models.vision.eva_vit import EVAViT

log = logging.getLogger(__name__)

LABELS = {
    "hf_fp32": "transformers fp32",
    "hf_bf16": "transformers bf16",
    "hf_bf16_eval": "transformers bf16, frozen parts in eval mode",
    "ibkit": "ibkit (default policy)",
    "ibkit_cached": "ibkit + feature cache",
    "hf_bf16_batched": "transformers bf16, candidates batched",
    "ibkit_stage1": "ibkit BLIP-2 stage 1 (ITC + ITM + ITG)",
}


# -- models -----------------------------------------------------------------------------------------------
@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_ibkit(size: BenchSize, device: torch.device, seed: int) -> InstructBLIP:
    torch.manual_seed(seed)
    with torch.device(device):
        model = InstructBLIP(
            EVAViT(size.vision), LanguageModel(config=dict(size.t5)), copy.deepcopy(size.qformer), size.num_query_tokens
        )
    return model


def build_transformers(model: InstructBLIP, dtype: torch.dtype, image_token_index: int):
    """transformers' InstructBlipForConditionalGeneration holding ``model``'s weights, in ``dtype``."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    from ibkit.models.transformers_io import hf_config_dict, ibkit_to_hf_state

    cfg = hf_config_dict(model, image_token_index=image_token_index)
    config = InstructBlipConfig(
        vision_config=cfg["vision_config"], qformer_config=cfg["qformer_config"], text_config=cfg["text_config"],
        num_query_tokens=cfg["num_query_tokens"], image_token_index=image_token_index,
    )
    device = model.query_tokens.device
    with torch.device(device), _default_dtype(dtype):
        hf = InstructBlipForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(ibkit_to_hf_state(model), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.to(dtype).eval()


def freeze_transformers(hf) -> list[torch.nn.Parameter]:
    """InstructBLIP's recipe on the transformers model: ViT and LLM frozen, ``post_layernorm`` (ln_vision) trains."""
    trainable = []
    for name, p in hf.named_parameters():
        frozen = name.startswith("language_model.") or (
            name.startswith("vision_model.") and not name.startswith("vision_model.post_layernorm.")
        )
        p.requires_grad_(not frozen)
        if not frozen:
            trainable.append(p)
    return trainable


def adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """transformers users' optimizer: torch's AdamW as it comes."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)


def ibkit_adamw(named: dict[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``ibkit fit`` builds (:func:`ibkit.training.optim.build_optimizer`: fused on the CPU)."""
    from ibkit.training.optim import OptimSettings, build_optimizer

    return build_optimizer(named.items(), OptimSettings(lr=1e-5, weight_decay=0.05))


# -- inputs -----------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    pixel_values: torch.Tensor
    qformer_input_ids: torch.Tensor
    qformer_attention_mask: torch.Tensor
    input_ids: torch.Tensor  # ibkit: the prompt only
    attention_mask: torch.Tensor
    hf_input_ids: torch.Tensor  # transformers: image placeholders + prompt
    hf_attention_mask: torch.Tensor
    labels: torch.Tensor

    def rows(self, n: int) -> Inputs:
        return Inputs(**{k: v[:n] for k, v in self.__dict__.items()})


def make_inputs(size: BenchSize, batch: int, device: torch.device, seed: int) -> Inputs:
    """Random pixels and token ids with realistic lengths; a few rows padded so that masks matter."""
    g = torch.Generator().manual_seed(seed)
    vocab, qvocab = size.t5["vocab_size"], size.qformer.vocab_size
    image_token = vocab - 1
    eos = size.t5["eos_token_id"]
    pixels = torch.randn(batch, 3, size.vision.image_size, size.vision.image_size, generator=g)
    qids = torch.randint(1, qvocab, (batch, size.qformer_len), generator=g)
    ids = torch.randint(2, image_token, (batch, size.prompt_len), generator=g)
    ids[:, -1] = eos
    qmask, mask = torch.ones_like(qids), torch.ones_like(ids)
    for row in range(1, batch, 2):  # right padding on every other row
        cut = size.prompt_len // 4
        qmask[row, -cut:] = 0
        qids[row, -cut:] = 0
        mask[row, -cut:] = 0
        ids[row, -cut:] = size.t5["pad_token_id"]
        ids[row, -cut - 1] = eos
    labels = torch.randint(2, image_token, (batch, size.target_len), generator=g)
    labels[:, -1] = eos
    placeholders = torch.full((batch, size.num_query_tokens), image_token)
    hf_ids = torch.cat((placeholders, ids), 1)
    hf_mask = torch.cat((torch.ones_like(placeholders), mask), 1)
    out = Inputs(pixels, qids, qmask, ids, mask, hf_ids, hf_mask, labels)
    return Inputs(**{k: v.to(device) for k, v in out.__dict__.items()})


def make_candidates(size: BenchSize, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, C, L) right-padded candidate ids ending with EOS, 1..candidate_len tokens each, and their mask."""
    g = torch.Generator().manual_seed(seed)
    q, c, length = size.rank_questions, size.rank_candidates, size.candidate_len + 1
    ids = torch.zeros(q, c, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    vocab = size.t5["vocab_size"]
    lengths = torch.randint(1, size.candidate_len + 1, (q, c), generator=g)
    for i in range(q):
        for j in range(c):
            n = int(lengths[i, j])
            ids[i, j, :n] = torch.randint(2, vocab - 1, (n,), generator=g)
            ids[i, j, n] = size.t5["eos_token_id"]
            mask[i, j, : n + 1] = 1
    return ids.to(device), mask.to(device)


# -- implementations --------------------------------------------------------------------------------------
@dataclass
class Impl:
    key: str
    run: Callable[[], Any]
    resident: Callable[[], int]
    compute_dtype: str  # which matmul peak its FLOP/s are compared with
    flops: Callable[[], int] | None = None  # a cheaper exact count than counting a whole run

    @property
    def label(self) -> str:
        return LABELS[self.key]


def _sum_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    return (logp * mask).sum(-1)


class Bench:
    """Holds the models and inputs of one size and runs the workloads."""

    def __init__(
        self,
        size: BenchSize,
        device: torch.device,
        policy: PrecisionPolicy | None = None,
        peaks: dict[str, float] | None = None,
        seed: int = 0,
        compile_ibkit: bool = False,
    ) -> None:
        self.size, self.device, self.seed = size, device, seed
        self.image_token = size.t5["vocab_size"] - 1
        self.ours = build_ibkit(size, device, seed)
        self.hf = {
            "hf_fp32": build_transformers(self.ours, torch.float32, self.image_token),
            "hf_bf16": build_transformers(self.ours, torch.bfloat16, self.image_token),
        }
        self.policy = policy or default_policy(device, peaks)
        apply_precision_policy(self.ours, self.policy)
        if compile_ibkit:
            from ibkit.models.precision import compile_model

            compile_model(self.ours)
        self.ours.eval()
        # generation and ranking run the inference copy: frozen weights shared, the bridge in bf16
        self.ours_infer = inference_model(self.ours, self.policy)
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "ibkit": ibkit_adamw(self.ours.trainable_parameters())
        }
        for key, hf in self.hf.items():
            self.optimizers[key] = adamw(freeze_transformers(hf))
        self.cache_dir: tempfile.TemporaryDirectory | None = None
        self.checks: dict[str, Any] = {}

    def close(self) -> None:
        if self.cache_dir is not None:
            self.cache_dir.cleanup()

    # -- resident memory of each implementation
    def _resident(self, key: str, training: bool = False) -> Callable[[], int]:
        """Weights and buffers (+ gradients and optimizer state when training) of one implementation."""
        base = "ibkit" if key.startswith("ibkit") else key.replace("_eval", "").replace("_batched", "")
        model = (self.ours if training else self.ours_infer) if base == "ibkit" else self.hf[base]
        return lambda: resident_bytes(model, self.optimizers[base] if training else None)

    # -- identical weights for every workload
    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        models = {"ibkit": self.ours, **self.hf}
        return {k: {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad} for k, m in models.items()}

    def restore(self, snapshot: dict[str, dict[str, torch.Tensor]]) -> None:
        """Undo the training workload: weights, optimizer state and modes back as built.

        Without fast bf16 ``ours_infer`` is ``ours`` itself, so this is what later workloads run: left in
        training mode it would rank and generate with dropout on.
        """
        models = {"ibkit": self.ours, **self.hf}
        with torch.no_grad():
            for key, params in snapshot.items():
                named = dict(models[key].named_parameters())
                for name, value in params.items():
                    named[name].copy_(value)
        for optimizer in self.optimizers.values():
            optimizer.state.clear()
        for model in models.values():
            model.eval()
        self.policy.set_mode(self.ours, training=False)

    def _hf_pixels(self, key: str, x: Inputs) -> torch.Tensor:
        return x.pixel_values.to(torch.bfloat16 if "bf16" in key else torch.float32)

    # -- training step
    def train_impls(self, with_cache: bool = True) -> tuple[list[Impl], str]:
        x = make_inputs(self.size, self.size.train_batch, self.device, self.seed + 1)
        impls = []
        for key in ("hf_fp32", "hf_bf16", "hf_bf16_eval"):
            hf = self.hf[key.replace("_eval", "")]
            opt = self.optimizers[key.replace("_eval", "")]
            pixels = self._hf_pixels(key, x)
            eval_frozen = key.endswith("_eval")

            def step(hf=hf, opt=opt, pixels=pixels, eval_frozen=eval_frozen) -> None:
                hf.train()
                if eval_frozen:
                    hf.vision_model.eval()
                    hf.language_model.eval()
                out = hf(
                    pixel_values=pixels, qformer_input_ids=x.qformer_input_ids,
                    qformer_attention_mask=x.qformer_attention_mask, input_ids=x.hf_input_ids,
                    attention_mask=x.hf_attention_mask, labels=x.labels,
                )
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            impls.append(Impl(key, step, self._resident(key, True), "bf16" if "bf16" in key else "fp32"))
        dtype = "bf16" if self.policy.autocast_dtype or self.policy.frozen_dtype else "fp32"
        impls.append(Impl("ibkit", lambda: self._ibkit_step(x, None), self._resident("ibkit", True), dtype))
        if with_cache:
            store, keys = self._feature_store(x)

            def cached_step() -> None:
                feats = torch.stack([store.get(k)[0] for k in keys]).to(self.device, non_blocking=True)
                self._ibkit_step(x, feats)

            impls.append(Impl("ibkit_cached", cached_step, self._resident("ibkit", True), dtype))
        return impls, f"batch {self.size.train_batch}"

    def _ibkit_step(self, x: Inputs, features: torch.Tensor | None) -> None:
        model, opt = self.ours, self.optimizers["ibkit"]
        model.train()
        self.policy.set_mode(model, training=True)
        with self.policy.autocast(self.device.type):
            out = model(
                pixel_values=None if features is not None else x.pixel_values,
                image_features=features,
                qformer_input_ids=x.qformer_input_ids, qformer_attention_mask=x.qformer_attention_mask,
                input_ids=x.input_ids, attention_mask=x.attention_mask, labels=x.labels,
            )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _feature_store(self, x: Inputs):
        """The training batch's encoder outputs in a real on-disk feature cache (what the cached run reads)."""
        from ibkit.data.feature_cache import FeatureStore, feature_fingerprint, resolve_store_dtype

        self.cache_dir = tempfile.TemporaryDirectory(prefix="ibkit-bench-cache-")
        encoder = self.ours.vision_encoder
        dtype = resolve_store_dtype("auto", encoder)
        identity = feature_fingerprint(encoder, "synthetic pixels (no transform)", dtype, num_frames=1)
        store = FeatureStore(self.cache_dir.name, "bench", identity)
        keys = [f"image-{i}" for i in range(x.pixel_values.shape[0])]
        with torch.inference_mode():
            feats = encoder(x.pixel_values)
        with store.writer() as writer:
            for i, key in enumerate(keys):
                writer.add(key, feats[i : i + 1])
        return store, keys

    # -- BLIP-2 stage-1 training step
    def pretrain_impls(self) -> tuple[list[Impl], str]:
        """One ITC + ITM + ITG step of a stage-1 model sharing ``ours``' frozen encoder (no transformers
        baseline), and ibkit's instruction-tuning step on the same images as the reference."""
        from ibkit.models.blip2 import Blip2Stage1
        from ibkit.models.qformer import QFormerConfig

        qformer = QFormerConfig(**{**self.size.qformer.__dict__, "instruction_aware": True})
        torch.manual_seed(self.seed + 5)
        stage1 = Blip2Stage1(self.ours.vision_encoder, qformer, num_query_tokens=self.size.num_query_tokens,
                             embed_dim=max(16, qformer.hidden_size // 3), dec_token_id=qformer.vocab_size - 1)
        stage1.to(self.device)
        opt = ibkit_adamw(stage1.trainable_parameters())
        x = make_inputs(self.size, self.size.train_batch, self.device, self.seed + 5)
        generator = torch.Generator(device=self.device)

        def step() -> None:
            stage1.train()
            stage1.vision_encoder.eval()  # frozen: no dropout, as in the instruction-tuning step
            generator.manual_seed(self.seed)
            with self.policy.autocast(self.device.type):
                out = stage1(pixel_values=x.pixel_values, input_ids=x.qformer_input_ids,
                             attention_mask=x.qformer_attention_mask, generator=generator)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dtype = "bf16" if self.policy.autocast_dtype or self.policy.frozen_dtype else "fp32"
        resident = lambda: resident_bytes(stage1, opt)  # noqa: E731
        # the instruction-tuning step on the same inputs alternates with it: their peak fractions compare
        # under the same load (restore ``ours`` afterwards, as after the training workload)
        reference = Impl("ibkit", lambda: self._ibkit_step(x, None), self._resident("ibkit", True), dtype)
        return [Impl("ibkit_stage1", step, resident, dtype), reference], f"batch {self.size.train_batch}"

    # -- generation
    def generate_impls(self, batch: int, beams: int) -> tuple[list[Impl], str]:
        x = make_inputs(self.size, max(self.size.gen_batches), self.device, self.seed + 2).rows(batch)
        kwargs = dict(max_new_tokens=self.size.new_tokens, min_new_tokens=self.size.new_tokens, num_beams=beams,
                      do_sample=False)
        impls = []
        for key, hf in self.hf.items():
            pixels = self._hf_pixels(key, x)

            def gen(hf=hf, pixels=pixels) -> torch.Tensor:
                hf.eval()
                return hf.generate(
                    pixel_values=pixels, qformer_input_ids=x.qformer_input_ids,
                    qformer_attention_mask=x.qformer_attention_mask, input_ids=x.hf_input_ids,
                    attention_mask=x.hf_attention_mask, **kwargs,
                )

            impls.append(Impl(key, gen, self._resident(key), "bf16" if "bf16" in key else "fp32"))

        def ours() -> torch.Tensor:
            self.ours_infer.eval()  # the trained model itself under the fp32 policy
            self.policy.set_mode(self.ours_infer, training=False)  # stored precisions, no autocast (see ibkit.models.precision)
            return self.ours_infer.generate(
                x.pixel_values, x.qformer_input_ids, x.qformer_attention_mask, x.input_ids, x.attention_mask, **kwargs
            )

        dtype = "bf16" if self.policy.frozen_dtype else "fp32"
        impls.append(Impl("ibkit", ours, self._resident("ibkit"), dtype))
        return impls, f"batch {batch}, {'greedy' if beams == 1 else f'beam {beams}'}"

    # -- candidate ranking
    def rank_impls(self) -> tuple[list[Impl], str]:
        size = self.size
        x = make_inputs(size, size.rank_questions, self.device, self.seed + 3)
        cand_ids, cand_mask = make_candidates(size, self.device, self.seed + 4)
        q, c = cand_ids.shape[:2]
        impls = []
        for key, hf in self.hf.items():
            pixels = self._hf_pixels(key, x)

            @torch.no_grad()
            def one_by_one(hf=hf, pixels=pixels) -> torch.Tensor:
                hf.eval()
                scores = torch.empty(q, c)
                for i in range(q):
                    for j in range(c):
                        n = int(cand_mask[i, j].sum())
                        out = hf(
                            pixel_values=pixels[i : i + 1], qformer_input_ids=x.qformer_input_ids[i : i + 1],
                            qformer_attention_mask=x.qformer_attention_mask[i : i + 1],
                            input_ids=x.hf_input_ids[i : i + 1], attention_mask=x.hf_attention_mask[i : i + 1],
                            labels=cand_ids[i, j : j + 1, :n],
                        )
                        scores[i, j] = -float(out.loss) * n  # what a user reads out, candidate by candidate
                return scores

            def forward_one(hf, pixels, i: int, j: int, n: int) -> None:
                with torch.no_grad():
                    hf(
                        pixel_values=pixels[i : i + 1], qformer_input_ids=x.qformer_input_ids[i : i + 1],
                        qformer_attention_mask=x.qformer_attention_mask[i : i + 1],
                        input_ids=x.hf_input_ids[i : i + 1], attention_mask=x.hf_attention_mask[i : i + 1],
                        labels=cand_ids[i, j : j + 1, :n],
                    )

            def flops(hf=hf, pixels=pixels) -> int:
                # one forward per distinct candidate length, weighted by how many candidates have it
                lengths = cand_mask.sum(-1).flatten().tolist()
                total = 0
                for n in sorted(set(lengths)):
                    i, j = divmod(lengths.index(n), c)
                    total += lengths.count(n) * count_flops(partial(forward_one, hf, pixels, i, j, n))
                return total

            impls.append(Impl(key, one_by_one, self._resident(key), "bf16" if "bf16" in key else "fp32", flops))

        hf16 = self.hf["hf_bf16"]
        pixels16 = self._hf_pixels("hf_bf16", x)

        @torch.no_grad()
        def batched() -> torch.Tensor:
            hf16.eval()
            rows = []
            for i in range(q):
                labels = cand_ids[i].masked_fill(cand_mask[i] == 0, -100)
                out = hf16(
                    pixel_values=pixels16[i : i + 1].expand(c, -1, -1, -1),
                    qformer_input_ids=x.qformer_input_ids[i : i + 1].expand(c, -1),
                    qformer_attention_mask=x.qformer_attention_mask[i : i + 1].expand(c, -1),
                    input_ids=x.hf_input_ids[i : i + 1].expand(c, -1),
                    attention_mask=x.hf_attention_mask[i : i + 1].expand(c, -1), labels=labels,
                )
                rows.append(_sum_logprobs(out.logits, cand_ids[i], cand_mask[i]).cpu())
            return torch.stack(rows)

        impls.append(Impl("hf_bf16_batched", batched, self._resident("hf_bf16_batched"), "bf16"))

        def ours() -> torch.Tensor:
            self.ours_infer.eval()  # the trained model itself under the fp32 policy
            self.policy.set_mode(self.ours_infer, training=False)
            return self.ours_infer.score_candidates(
                x.pixel_values, x.qformer_input_ids, x.qformer_attention_mask, x.input_ids, x.attention_mask,
                cand_ids, cand_mask,
            ).cpu()

        dtype = "bf16" if self.policy.frozen_dtype else "fp32"
        impls.append(Impl("ibkit", ours, self._resident("ibkit"), dtype))
        return impls, f"{q} question(s) x {c} candidates"

    @staticmethod
    def check_ranking(outputs: dict[str, Any]) -> dict[str, Any]:
        """How far each implementation's scores are from fp32 transformers (precision, not speed)."""
        scores = {key: out.float().cpu() for key, out in outputs.items()}
        reference = scores["hf_fp32"]
        out = {}
        for key, s in scores.items():
            if key == "hf_fp32":
                continue
            out[key] = {
                "max_abs_diff_vs_hf_fp32": round(float((s - reference).abs().max()), 5),
                "max_rel_diff_vs_hf_fp32": round(float(((s - reference).abs() / reference.abs().clamp(min=1e-6)).max()), 6),
                "same_best_candidate": bool((s.argmax(-1) == reference.argmax(-1)).all()),
            }
        return out
