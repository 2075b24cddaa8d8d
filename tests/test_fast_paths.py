"""Every fast path keeps results: within 1e-4 of the reference in fp32, within documented bounds in bf16."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from tiny_models import NUM_QUERIES, QFORMER, T5_TEXT, VISION, hf_inputs, with_placeholders

from ibkit import InstructBLIP, LanguageModel
from ibkit.bench.workloads import build_transformers
from ibkit.models import EVAViT, EVAViTConfig
from ibkit.models.precision import (
    CPU_BF16_ENV,
    PrecisionPolicy,
    apply_precision_policy,
    compile_model,
    default_policy,
    fast_bf16,
    inference_model,
    matmul_probe,
    pinned_cpu_bf16,
)
from ibkit.models.transformers_io import qformer_config_from_hf

FP32 = dict(rtol=1e-4, atol=1e-4)
# bf16 policy (frozen encoder + LLM stored in bf16, bf16 autocast): documented in docs/bench.md
BF16_PROMPT_TOL = 0.05  # max |delta| of the soft prompt relative to its max |value|
BF16_LOSS_TOL = 0.02  # relative change of the LM loss


@pytest.fixture(scope="module")
def model() -> InstructBLIP:
    torch.manual_seed(0)
    lm = LanguageModel(config=T5_TEXT)
    return InstructBLIP(EVAViT(EVAViTConfig(**VISION)), lm, qformer_config_from_hf(QFORMER), NUM_QUERIES).eval()


def _labels(batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 90, (batch, 4), generator=torch.Generator().manual_seed(5))


def _explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    assert dropout_p == 0.0 and not is_causal
    scores = q @ k.transpose(-2, -1) * (scale or q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(-1) @ v


def test_vit_and_qformer_use_sdpa_and_it_matches_explicit_attention(model, monkeypatch):
    x = hf_inputs()
    with torch.no_grad():
        reference = model.visual_prompt(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"])
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return _explicit_attention(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        explicit = model.visual_prompt(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"])
    vit_layers = VISION["num_hidden_layers"]
    qformer_layers = QFORMER["num_hidden_layers"]
    cross = len(range(0, qformer_layers, QFORMER["cross_attention_frequency"]))
    assert len(calls) == vit_layers + qformer_layers + cross  # every attention goes through SDPA
    torch.testing.assert_close(explicit, reference, **FP32)


def test_explicit_vit_attention_matches_sdpa(model, monkeypatch):
    from ibkit.models.precision import ExplicitEVAAttention, use_explicit_attention

    x = hf_inputs()
    fast = copy.deepcopy(model)
    assert use_explicit_attention(fast.vision_encoder) == VISION["num_hidden_layers"]
    assert isinstance(fast.vision_encoder.encoder.layers[0].self_attn, ExplicitEVAAttention)
    assert list(fast.state_dict()) == list(model.state_dict())
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or _explicit_attention(*a, **k))
    with torch.no_grad():
        features = fast.vision_encoder(x["pixel_values"])
    assert not calls  # the ViT no longer goes through SDPA
    monkeypatch.undo()
    with torch.no_grad():
        reference = model.vision_encoder(x["pixel_values"])
        torch.testing.assert_close(features, reference, **FP32)
        bf16_fast, bf16_ref = copy.deepcopy(fast.vision_encoder), copy.deepcopy(model.vision_encoder)
        for enc in (bf16_fast, bf16_ref):
            enc.compute_dtype = "bf16"
        # in bf16 both kernels round alike: each within the documented bound of the fp32 result
        scale = reference.abs().max()
        assert ((bf16_fast(x["pixel_values"]) - reference).abs().max() / scale) < BF16_PROMPT_TOL
        assert ((bf16_ref(x["pixel_values"]) - reference).abs().max() / scale) < BF16_PROMPT_TOL



def test_explicit_vit_attention_chunks_the_batch_without_changing_results(model, monkeypatch):
    from ibkit.models.precision import ExplicitEVAAttention, use_explicit_attention

    fast = copy.deepcopy(model)
    use_explicit_attention(fast.vision_encoder)
    pixels = torch.randn(5, 3, VISION["image_size"], VISION["image_size"], requires_grad=True)
    whole = fast.vision_encoder(pixels)
    tokens = whole.shape[1]
    # a budget of two samples' scores: chunks of 2, 2 and 1
    monkeypatch.setattr(ExplicitEVAAttention, "SCORE_BUDGET", 2 * VISION["num_attention_heads"] * tokens**2)
    softmax_rows = []
    real_softmax = torch.Tensor.softmax
    monkeypatch.setattr(torch.Tensor, "softmax", lambda t, *a: softmax_rows.append(t.shape[0]) or real_softmax(t, *a))
    chunked = fast.vision_encoder(pixels)
    monkeypatch.undo()
    assert softmax_rows[: 3] == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, **FP32)
    grad_chunked, = torch.autograd.grad(chunked.sum(), pixels)  # still differentiable (no out= writes)
    grad_whole, = torch.autograd.grad(whole.sum(), pixels)
    torch.testing.assert_close(grad_chunked, grad_whole, **FP32)

def test_frozen_parts_get_no_gradient_buffers_or_optimizer_state(model):
    from ibkit.training.optim import OptimSettings, build_optimizer

    trained = copy.deepcopy(model)
    optimizer = build_optimizer(trained.named_parameters(), OptimSettings())
    frozen = [p for n, p in trained.named_parameters() if n.startswith(("vision_encoder.", "language_model."))]
    assert frozen and not any(p.requires_grad for p in frozen)
    x = hf_inputs()
    trained.train()
    features = trained.encode_images(x["pixel_values"])
    assert features.requires_grad  # ln_vision trains ...
    assert trained.vision_encoder(x["pixel_values"]).grad_fn is None  # ... but no graph through the encoder
    trained(**x, labels=_labels()).loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in frozen)
    assert trained.query_tokens.grad is not None
    stateful = {id(p) for p in optimizer.state}
    assert stateful == {id(p) for p in trained.trainable_parameters().values()}
    assert not stateful & {id(p) for p in frozen}


def test_inference_mode_encoder_equals_no_grad(model):
    x = hf_inputs()
    with torch.no_grad():
        reference = model.vision_encoder(x["pixel_values"])
    with torch.inference_mode():
        fast = model.vision_encoder(x["pixel_values"])
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)


def test_ranking_reuse_matches_transformers_candidate_by_candidate(model):
    """score_candidates encodes image, Q-Former and prompt once; transformers recomputes them per candidate."""
    hf = build_transformers(model, torch.float32, image_token_index=98)
    x = hf_inputs(batch=2)
    eos = T5_TEXT["eos_token_id"]
    g = torch.Generator().manual_seed(2)
    ids = torch.zeros(2, 5, 4, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b in range(2):
        for c in range(5):
            n = 1 + (b + c) % 3
            ids[b, c, :n] = torch.randint(3, 90, (n,), generator=g)
            ids[b, c, n] = eos
            mask[b, c, : n + 1] = 1
    encoder_calls = []
    handle = model.vision_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    try:
        scores = model.score_candidates(
            x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"], x["input_ids"],
            x["attention_mask"], ids, mask, chunk_size=2,
        )
    finally:
        handle.remove()
    assert len(encoder_calls) == 1  # one encoder pass for the whole batch and all candidates
    hf_ids, hf_mask = with_placeholders(x["input_ids"], x["attention_mask"])
    with torch.no_grad():
        for b in range(2):
            for c in range(5):
                n = int(mask[b, c].sum())
                out = hf(
                    pixel_values=x["pixel_values"][b : b + 1], qformer_input_ids=x["qformer_input_ids"][b : b + 1],
                    qformer_attention_mask=x["qformer_attention_mask"][b : b + 1], input_ids=hf_ids[b : b + 1],
                    attention_mask=hf_mask[b : b + 1], labels=ids[b, c : c + 1, :n],
                )
                torch.testing.assert_close(scores[b, c], -out.loss * n, **FP32)


def test_eager_llm_attention_matches_sdpa(model):
    x = hf_inputs()
    eager = copy.deepcopy(model)
    policy = PrecisionPolicy(frozen_dtype=None, autocast_dtype=None, llm_attention="eager", llm_inference_attention="sdpa")
    apply_precision_policy(eager, policy)
    assert eager.language_model.hf_config._attn_implementation == "sdpa"  # at rest: ready for inference
    policy.set_mode(eager, training=True)
    assert eager.language_model.hf_config._attn_implementation == "eager"
    with torch.no_grad():
        reference = model(**x, labels=_labels())
        fast = eager(**x, labels=_labels())
    torch.testing.assert_close(fast.logits, reference.logits, **FP32)
    torch.testing.assert_close(fast.loss, reference.loss, **FP32)
    policy.set_mode(eager, training=False)
    assert eager.language_model.hf_config._attn_implementation == "sdpa"


def test_compiled_parts_match_eager_and_keep_parameter_names(model):
    compiled = copy.deepcopy(model)
    # aot_eager: dynamo capture + AOT autograd without C++ code generation (inductor is `ibkit bench --compile`)
    compile_model(compiled, parts=("vision_encoder", "qformer"), backend="aot_eager")
    assert list(compiled.state_dict()) == list(model.state_dict())
    x = hf_inputs()
    with torch.no_grad():
        reference = model.visual_prompt(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"])
        fast = compiled.visual_prompt(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"])
        # another instruction length recompiles (automatic dynamic shapes) instead of failing
        shorter = compiled.visual_prompt(x["pixel_values"], x["qformer_input_ids"][:, :4], None)
    torch.testing.assert_close(fast, reference, **FP32)
    assert shorter.shape == reference.shape


def test_bf16_policy_stores_frozen_parts_in_bf16_and_stays_within_tolerance(model):
    x = hf_inputs()
    fast = copy.deepcopy(model)
    policy = PrecisionPolicy(frozen_dtype="bf16", autocast_dtype="bf16", llm_attention="eager")
    apply_precision_policy(fast, policy)
    policy.set_mode(fast, training=True)
    vit = fast.vision_encoder
    assert vit.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert vit.encoder.layers[0].layer_norm1.weight.dtype == torch.float32  # norms stay fp32
    assert fast.language_model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in fast.trainable_parameters().values())  # fp32 master weights
    with torch.no_grad():
        reference = model.visual_prompt(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"])
        ref_loss = model(**x, labels=_labels()).loss
        with policy.autocast("cpu"):
            prompt = fast.visual_prompt(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"])
            loss = fast(**x, labels=_labels()).loss
    prompt_error = ((prompt.float() - reference).abs().max() / reference.abs().max()).item()
    assert prompt_error < BF16_PROMPT_TOL
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < BF16_LOSS_TOL
    # training through the policy still reaches every trainable weight, in fp32
    fast.train()
    with policy.autocast("cpu"):
        fast(**x, labels=_labels()).loss.backward()
    assert fast.query_tokens.grad is not None and fast.query_tokens.grad.dtype == torch.float32
    assert all(p.grad is None for p in fast.vision_encoder.parameters())


def test_frozen_encoder_chunks_give_the_whole_batch_result(model):
    pixels = torch.randn(5, 3, VISION["image_size"], VISION["image_size"])
    chunked = copy.deepcopy(model)
    chunked.frozen_encoder_chunk = 2
    calls = []
    chunked.vision_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        torch.testing.assert_close(chunked.encode_images(pixels), model.encode_images(pixels), **FP32)
    assert calls == [2, 2, 1]
    policy = PrecisionPolicy(frozen_dtype="bf16", autocast_dtype="bf16", inference_encoder_chunk=2)
    base = copy.deepcopy(model)
    apply_precision_policy(base, policy)
    assert inference_model(base, policy).frozen_encoder_chunk == 2 and base.frozen_encoder_chunk is None


def test_default_policy_follows_measured_bf16_speed(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)  # measured, not forced
    slow = default_policy("cpu", peaks={"fp32": 1.0, "bf16": 1.2})
    assert slow.frozen_dtype is None and slow.autocast_dtype is None  # bf16 would not pay: all fp32
    fast = default_policy("cpu", peaks={"fp32": 1.0, "bf16": 4.0})
    assert fast.frozen_dtype == "bf16" and fast.autocast_dtype == "bf16"
    assert fast.llm_attention == "eager" and fast.llm_inference_attention == "sdpa" and fast.vision_attention == "explicit"
    assert fast.inference_encoder_chunk == 2
    assert default_policy("cpu", {"fp32": 1, "bf16": 4}, encoder_decoder=False).llm_attention is None


def test_cpu_bf16_env_forces_the_policy_whatever_the_peaks(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    forced_fp32 = default_policy("cpu", peaks={"fp32": 1.0, "bf16": 4.0})
    assert forced_fp32.frozen_dtype is forced_fp32.autocast_dtype is forced_fp32.inference_dtype is None
    assert forced_fp32.vision_attention == "explicit"  # the CPU kernels do not depend on bf16
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    forced_bf16 = default_policy("cpu", peaks={"fp32": 1.0, "bf16": 1.0})
    assert forced_bf16.frozen_dtype == forced_bf16.autocast_dtype == forced_bf16.inference_dtype == "bf16"
    assert fast_bf16("cpu")  # forced: no matmul is timed
    monkeypatch.setenv(CPU_BF16_ENV, "")
    assert not fast_bf16("cpu", peaks={"fp32": 1.0, "bf16": 1.0})  # empty: measured again
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=CPU_BF16_ENV):
        fast_bf16("cpu")


@pytest.mark.parametrize("peaks, decision", [({"fp32": 1.0, "bf16": 4.0}, True), ({"fp32": 1.0, "bf16": 1.2}, False)])
def test_pinned_cpu_bf16_decides_once_for_every_run_inside_and_restores_the_environment(monkeypatch, peaks, decision):
    import ibkit.models.precision as precision

    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    with pinned_cpu_bf16(peaks) as pinned:
        assert pinned is decision

        def no_timing(*args, **kwargs):
            raise AssertionError("the pinned decision must not time matmuls again")

        monkeypatch.setattr(precision, "_matmul_seconds", no_timing)
        policy = default_policy("cpu")  # a later step of the pipeline
        assert (policy.autocast_dtype == "bf16") is decision and fast_bf16("cpu") is decision
    assert CPU_BF16_ENV not in os.environ  # unset again: the next process measures afresh
    monkeypatch.setenv(CPU_BF16_ENV, "0")  # a decision the user forced is kept, inside and after
    with pinned_cpu_bf16({"fp32": 1.0, "bf16": 4.0}) as pinned:
        assert pinned is False
    assert os.environ[CPU_BF16_ENV] == "0"


FP32_SECONDS_PER_FLOP = 1 / 100e9  # about what a 2-core AVX2 EPYC reaches in fp32


@pytest.mark.parametrize("bf16_cost, fast", [(100.0, False), (0.4, True)])
def test_the_cpu_probe_keeps_emulated_bf16_small_and_times_fast_bf16_like_fp32(monkeypatch, bf16_cost, fast):
    """Both sides of the CPU's bf16 forced by a cost model of each matmul (nothing is timed): emulated bf16
    (AVX2: 100x slower than fp32, measured 53 s for one 2048^2 matmul) is timed at 256 only, and fast bf16
    at the size fp32 reached, so that both peaks compare like for like."""
    import ibkit.models.precision as precision

    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    sizes: dict[torch.dtype, list[int]] = {torch.float32: [], torch.bfloat16: []}
    modelled = {torch.float32: 0.0, torch.bfloat16: 0.0}

    def modelled_seconds(a, b, device):
        assert a.shape == b.shape and a.dtype == b.dtype
        sizes[a.dtype].append(a.shape[0])
        seconds = 2 * a.shape[0] ** 3 * FP32_SECONDS_PER_FLOP * (bf16_cost if a.dtype == torch.bfloat16 else 1)
        modelled[a.dtype] += seconds
        return seconds

    monkeypatch.setattr(precision, "_matmul_seconds", modelled_seconds)
    assert fast_bf16("cpu", rounds=3) is fast
    assert max(sizes[torch.float32]) == 1024  # 2048 would take 0.17 s a matmul
    assert max(sizes[torch.bfloat16]) == (256 if not fast else 1024)
    assert modelled[torch.bfloat16] < 3.0  # three rounds; a fixed 2048 would be 21 matmuls of 17 s each here
    peak, size = matmul_probe(torch.bfloat16, "cpu", size=512, repeats=1)  # a given size is kept
    assert size == 512 and peak == pytest.approx(1e-12 / (FP32_SECONDS_PER_FLOP * bf16_cost))


def test_the_cpu_probe_times_real_matmuls_within_its_sizes():
    for dtype in (torch.float32, torch.bfloat16):
        peak, size = matmul_probe(dtype, "cpu", max_size=512, repeats=1)
        assert peak > 0 and size in (256, 512)


def test_inference_copy_shares_frozen_weights_and_stores_the_bridge_in_bf16(model):
    x = hf_inputs()
    base = copy.deepcopy(model)
    policy = PrecisionPolicy(frozen_dtype="bf16", autocast_dtype="bf16")
    apply_precision_policy(base, policy)
    infer = inference_model(base, policy)
    assert infer is not base
    norms = {n for n, _ in base.named_parameters() if "layer_norm" in n and n.startswith("vision_encoder.")}
    assert norms
    frozen_before = {n: p.data_ptr() for n, p in base.named_parameters() if not p.requires_grad and n not in norms}
    shared = {n: p.data_ptr() for n, p in infer.named_parameters() if n in frozen_before}
    assert shared == frozen_before  # the frozen encoder and LLM are the same tensors, not copies
    # the encoder's LayerNorms are the copy's own, in bf16; the trained model's stay fp32
    assert all(dict(infer.named_parameters())[n].dtype == torch.bfloat16 for n in norms)
    assert all(dict(base.named_parameters())[n].dtype == torch.float32 for n in norms)
    assert all(p.dtype == torch.bfloat16 for p in infer.qformer.parameters())
    assert infer.query_tokens.dtype == torch.bfloat16 and infer.ln_vision.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in infer.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in base.trainable_parameters().values())
    with torch.no_grad():
        reference = model.visual_prompt(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"])
        prompt = infer.visual_prompt(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"])
        ref_loss = model(**x, labels=_labels()).loss
        loss = infer(**x, labels=_labels()).loss
    assert ((prompt.float() - reference).abs().max() / reference.abs().max()).item() < BF16_PROMPT_TOL
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < BF16_LOSS_TOL
    out = infer.generate(x["pixel_values"], x["qformer_input_ids"], x["qformer_attention_mask"], x["input_ids"],
                         x["attention_mask"], max_new_tokens=3, num_beams=2)
    assert out.shape[0] == x["pixel_values"].shape[0]
    assert inference_model(base, PrecisionPolicy(inference_dtype=None)) is base
