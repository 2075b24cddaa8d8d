"""ibkit's precision policy and optional compilation: the fast paths that keep results within tolerance.

The policy (what ``ibkit bench`` measures as "ibkit"):

* trainable parts (Q-Former, queries, projection, ``ln_vision``, LoRA) keep fp32 master weights;
  on hardware with fast bf16 the training forward runs under bf16 autocast (as Lightning's
  ``bf16-mixed``); inference (generation, ranking) runs without autocast, which would add per-op
  overhead to every decoding step (see :func:`inference_model` below);
* the frozen encoder is stored and run in bf16 with fp32 LayerNorms (LAVIS runs it in half precision),
  without autograd; the frozen LLM is stored in bf16 (LAVIS runs FlanT5 in bf16) where bf16 is fast;
* on CPU, the EVA ViT's attention is computed explicitly (matmul, softmax, matmul): for its
  257-token sequences PyTorch's CPU flash-attention kernel is about 2.5x slower than that (measured
  in bf16: 2.4 ms vs 0.9 ms per layer at width 176, batch 8), with the same bf16 error; GPUs keep
  SDPA;
* on CPU, T5's attention runs the eager kernel in training: its additive position bias sends SDPA to
  a masked CPU kernel whose backward is slow for prompt-length sequences; inference keeps SDPA, one
  fused call per attention, which wins while decoding (:meth:`PrecisionPolicy.set_mode` switches;
  both kernels agree within 1e-4 in fp32);
* for inference only (generation, ranking, ``ibkit test``/``predict``), :func:`inference_model` also
  stores the small bridge (Q-Former, queries, projection, ``ln_vision``) in bf16, as transformers' bf16
  model does: the frozen weights are shared, not copied, so inference memory is the all-bf16 model's;
* hardware without fast bf16 keeps everything in fp32: the policy never slows a machine down.

"Fast bf16" is measured, not assumed: :func:`matmul_probe` times square matmuls in both precisions (on a CPU
sized so that emulated bf16 costs a fraction of a second, not minutes). On
CPU the environment variable ``IBKIT_CPU_BF16`` (``1`` or ``0``) forces the decision instead, so that
tests and CI run either policy on any machine (:func:`forced_fast_bf16`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ibkit.models.dtypes import HALF_DTYPE_NAMES, resolve_dtype
from ibkit.models.vision.eva_vit import EVAAttention

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)
# bf16 counts as "fast" when a bf16 matmul beats fp32 by this factor
FAST_BF16_FACTOR = 1.5
# "1" / "0" force the CPU's fast-bf16 decision (unset or empty: measure it)
CPU_BF16_ENV = "IBKIT_CPU_BF16"
# the CPU probe's smallest and largest matmul side, and the most one of its matmuls should take
CPU_PROBE_SIZES = (256, 2048)
PROBE_SECONDS = 0.1


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    """Seconds of one ``a @ b`` (every matmul of the probe goes through here: tests replace it)."""
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    return time.perf_counter() - start


def matmul_probe(
    dtype: torch.dtype, device: torch.device | str = "cpu", size: int | None = None, repeats: int = 5,
    max_size: int | None = None,
) -> tuple[float, int]:
    """(best achieved TFLOP/s, the size timed) of a square matmul in ``dtype``: the machine's practical peak.

    ``size`` fixes the matrices' side. Without it a GPU times 8192; a CPU starts at
    :data:`CPU_PROBE_SIZES`' first and doubles while the next size's matmul would take under
    :data:`PROBE_SECONDS` (up to ``max_size`` and the last of them): where bf16 is emulated (an AVX2-only
    CPU) one 2048^2 bf16 matmul takes the better part of a minute (53 s on a 2-core AMD EPYC, 0.16 s in
    fp32), so a fixed 2048 made the probe alone cost minutes, while 256 already tells it apart (27 ms).
    """
    device = torch.device(device)
    if size is None and device.type == "cuda":
        size = 8192
    if size is None:
        smallest, largest = CPU_PROBE_SIZES
        size, largest = smallest, min(largest, max_size or largest)
        while size < largest:
            a, b = _operands(size, dtype, device)
            _matmul_seconds(a, b, device)  # the first call at a size pays allocation and kernel choice
            if 8 * _matmul_seconds(a, b, device) > PROBE_SECONDS:  # doubling the side costs 8x
                break
            size *= 2
    a, b = _operands(size, dtype, device)
    for _ in range(2):
        _matmul_seconds(a, b, device)
    best = min(_matmul_seconds(a, b, device) for _ in range(repeats))
    return 2 * size**3 / best / 1e12, size


def _operands(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype)


@dataclass
class PrecisionPolicy:
    """Which precision and kernels each part of InstructBLIP runs with (``None``: fp32 / unchanged).

    ``frozen_dtype``: storage/compute of the frozen encoder and the frozen LLM; ``autocast_dtype``: the
    autocast precision of the training forward (trainable parts keep fp32 weights); ``inference_dtype``:
    the bridge's storage in an inference-only copy (:func:`inference_model`); ``llm_attention``
    and ``llm_inference_attention``: the transformers attention implementation of the LLM in training
    and in inference (``None`` keeps the model's); ``vision_attention``: ``"explicit"`` computes the EVA
    ViT's attention with plain matmuls instead of SDPA (:func:`use_explicit_attention`);
    ``inference_encoder_chunk``: images per frozen-encoder call in the inference copy (bounds the
    encoder's activation memory in batched generation; None: the whole batch).
    """

    frozen_dtype: str | None = "bf16"
    autocast_dtype: str | None = "bf16"
    inference_dtype: str | None = "bf16"
    llm_attention: str | None = None
    llm_inference_attention: str | None = None
    vision_attention: str | None = None
    inference_encoder_chunk: int | None = None

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The training forward's autocast context (a no-op when the policy computes in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=resolve_dtype(self.autocast_dtype))

    def set_mode(self, model: nn.Module, training: bool) -> None:
        """Select the LLM attention kernel for training or inference (cheap; a no-op when unchanged)."""
        self.set_llm_mode(model.language_model, training)

    def set_llm_mode(self, language_model: nn.Module, training: bool) -> None:
        """:meth:`set_mode` for a bare :class:`ibkit.LanguageModel` (one trained on text alone)."""
        wanted = self.llm_attention if training else self.llm_inference_attention
        base = language_model.base_model
        if wanted is not None and base.config._attn_implementation != wanted:
            base.set_attn_implementation(wanted)

    def as_dict(self) -> dict:
        return asdict(self)


def forced_fast_bf16(device: torch.device | str) -> bool | None:
    """The fast-bf16 decision forced by ``IBKIT_CPU_BF16`` on a CPU ``device``; ``None``: measure it.

    Lets one machine run both policies (the suite forces each in turn) and lets users pin one.
    """
    if torch.device(device).type != "cpu":
        return None
    value = os.environ.get(CPU_BF16_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{CPU_BF16_ENV} must be 1 (fast bf16) or 0 (fp32), or unset to measure; got {value!r}")
    return value == "1"


def fast_bf16(device: torch.device | str, peaks: dict[str, float] | None = None, rounds: int = 1) -> bool:
    """Whether bf16 pays on ``device``: forced by ``IBKIT_CPU_BF16`` on CPU, else from the matmul peaks
    (``{"fp32": ..., "bf16": ...}``, measured here when not given: the best of ``rounds`` alternating
    timings of each, so that a stall of a shared machine during one timing does not decide)."""
    device = torch.device(device)
    forced = forced_fast_bf16(device)
    if forced is not None:
        return forced
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return False
    if peaks is None:
        peaks = {"fp32": 0.0, "bf16": 0.0}
        for _ in range(rounds):
            # bf16 no larger than fp32's size: where it is fast, both are then timed at the same size
            fp32, size = matmul_probe(torch.float32, device)
            peaks["fp32"] = max(peaks["fp32"], fp32)
            peaks["bf16"] = max(peaks["bf16"], matmul_probe(torch.bfloat16, device, max_size=size)[0])
    return peaks["bf16"] >= FAST_BF16_FACTOR * peaks["fp32"]


@contextlib.contextmanager
def pinned_cpu_bf16(peaks: dict[str, float] | None = None):
    """Decide fast bf16 on the CPU once and force that decision (``IBKIT_CPU_BF16``) until the block ends.

    A pipeline of several runs in one process (``ibkit demo``) would otherwise time matmuls at every
    step; one noisy timing would switch a step's precision and change its numbers, and a seed would no
    longer fix the results. Yields the decision; a decision already forced is kept as it is.
    """
    before = os.environ.get(CPU_BF16_ENV)
    decision = fast_bf16("cpu", peaks, rounds=3)
    os.environ[CPU_BF16_ENV] = "1" if decision else "0"
    try:
        yield decision
    finally:
        if before is None:
            os.environ.pop(CPU_BF16_ENV, None)
        else:
            os.environ[CPU_BF16_ENV] = before


def default_policy(
    device: torch.device | str, peaks: dict[str, float] | None = None, encoder_decoder: bool = True
) -> PrecisionPolicy:
    """ibkit's default policy for ``device`` (see the module docstring)."""
    device = torch.device(device)
    cpu_t5 = device.type == "cpu" and encoder_decoder
    attention: dict[str, Any] = dict(llm_attention="eager", llm_inference_attention="sdpa") if cpu_t5 else {}
    if device.type == "cpu":
        # chunks of 2 images: the ViT's transients at batch 8 drop from ~7 to ~2 MiB at the bench's "small"
        # size, at a cost within the timing noise (its matmuls still have 2 x 257 rows)
        attention.update(vision_attention="explicit", inference_encoder_chunk=2)
    if not fast_bf16(device, peaks):
        return PrecisionPolicy(frozen_dtype=None, autocast_dtype=None, inference_dtype=None, **attention)
    return PrecisionPolicy(frozen_dtype="bf16", autocast_dtype="bf16", inference_dtype="bf16", **attention)


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Store a frozen module's weights in ``dtype``, keeping normalisation layers in fp32."""
    for child in module.modules():
        keep = isinstance(child, NORM_TYPES)
        for name, param in child.named_parameters(recurse=False):
            if param.requires_grad:
                raise ValueError(f"{type(child).__name__}.{name} trains: only frozen weights may be stored in {dtype}")
            param.data = param.data.to(torch.float32 if keep else dtype)
        for name, buffer in child.named_buffers(recurse=False):
            if buffer.is_floating_point() and not keep:
                setattr(child, name, buffer.to(dtype))


def apply_precision_policy(model: nn.Module, policy: PrecisionPolicy) -> nn.Module:
    """Apply ``policy`` to an :class:`ibkit.InstructBLIP` in place; trainable weights stay fp32."""
    frozen = resolve_dtype(policy.frozen_dtype)
    encoder = model.vision_encoder
    if frozen is not None and getattr(encoder, "frozen", False):
        cast_frozen(encoder, frozen)
        encoder.compute_dtype = HALF_DTYPE_NAMES.get(frozen)
    lm = model.language_model
    if frozen is not None and lm.frozen and lm.lora is None:
        lm.base_model.to(frozen)
    if policy.vision_attention == "explicit":
        use_explicit_attention(encoder)
    policy.set_mode(model, training=False)  # a model at rest is ready for inference
    return model


BRIDGE_PARTS = ("qformer", "language_projection", "ln_vision")


def inference_model(model: nn.Module, policy: PrecisionPolicy) -> nn.Module:
    """A copy of ``model`` for generation and ranking only, computing wholly in ``policy.inference_dtype``.

    The frozen encoder's and LLM's weights are shared with ``model`` (same tensors, no extra memory);
    the bridge (about 5% of the weights) and the encoder's LayerNorms are copied and cast, so the copy
    runs in bf16 end to end without autocast, as transformers' bf16 model does (no fp32 activations
    between blocks). Nothing in the copy trains; ``model`` keeps its fp32 master weights. Returns
    ``model`` when the policy keeps fp32 for inference.
    """
    dtype = resolve_dtype(policy.inference_dtype)
    if dtype is None:
        return model
    encoder_norms = [m for m in model.vision_encoder.modules() if isinstance(m, NORM_TYPES)]
    owned = [model.get_submodule(name) for name in BRIDGE_PARTS] + encoder_norms
    copied = {id(t) for module in owned for t in (*module.parameters(), *module.buffers())}
    copied.add(id(model.query_tokens))
    memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in copied}
    clone = copy.deepcopy(model, memo)
    owned_copies = [clone.get_submodule(name) for name in BRIDGE_PARTS]
    owned_copies += [m for m in clone.vision_encoder.modules() if isinstance(m, NORM_TYPES)]
    for module in owned_copies:
        module.to(dtype)  # safe: these tensors belong to the copy alone
    clone.query_tokens.data = clone.query_tokens.data.to(dtype)
    clone.frozen_encoder_chunk = policy.inference_encoder_chunk
    if getattr(clone.vision_encoder, "compute_dtype", None) is not None:
        clone.vision_encoder.compute_dtype = None  # every weight is in dtype now: no autocast
    for param in (*(p for module in owned_copies for p in module.parameters()), clone.query_tokens):
        param.requires_grad_(False)  # only the copy's own tensors: shared ones (LoRA included) stay as they are
    return clone.eval()


class ExplicitEVAAttention(EVAAttention):
    """EVA attention as matmul, softmax, matmul (same parameters and names; results within rounding).

    Scores and probabilities stay in the compute dtype (PyTorch's CPU softmax accumulates in fp32). The
    batch is processed in chunks of at most ``SCORE_BUDGET`` score elements, so the transient memory is
    two score blocks of that size however large the batch (SDPA never holds the full (B, heads, N, N)
    scores either: at batch 8 those would be 4 MiB per layer for the "small" bench ViT).
    """

    SCORE_BUDGET = 1 << 18  # elements of one (chunk, heads, N, N) block: 512 KiB in bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.head_dim**-0.5
        rows = max(1, self.SCORE_BUDGET // (self.num_heads * n * n))
        chunks = [
            torch.matmul(torch.matmul(q[i : i + rows], k[i : i + rows].transpose(-2, -1)).softmax(-1), v[i : i + rows])
            for i in range(0, b, rows)
        ]
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return self.projection(out.transpose(1, 2).reshape(b, n, d))


def use_explicit_attention(encoder: nn.Module) -> int:
    """Switch every EVA attention layer of ``encoder`` to :class:`ExplicitEVAAttention`; returns how many.

    The layers keep their parameters (and state-dict names); only the kernel changes.
    """
    count = 0
    for module in encoder.modules():
        if type(module) is EVAAttention:
            module.__class__ = ExplicitEVAAttention
            count += 1
    return count


def compile_model(
    model: nn.Module, parts: Iterable[str] = ("vision_encoder", "qformer"), **compile_kwargs
) -> nn.Module:
    """``torch.compile`` the named submodules in place (``nn.Module.compile``: parameter names unchanged).

    Off by default: compiling takes tens of seconds and, measured on CPU, buys nothing for the ViT
    (its time is in bf16 matmuls already near the peak). ``compile_kwargs`` go to ``torch.compile``;
    a new instruction length recompiles once with dynamic shapes (torch's automatic dynamic).
    """
    for name in parts:
        module = model.get_submodule(name)
        module.compile(**compile_kwargs)
    return model


def training_autocast(policy: PrecisionPolicy | None, device_type: str) -> contextlib.AbstractContextManager:
    """The training forward's autocast under ``policy``; none without a policy (``fast_paths`` off)."""
    return policy.autocast(device_type) if policy is not None else contextlib.nullcontext()

