"""`ibkit bench`: runs end to end at the tiny size and writes a complete, consistent report (never timed).

The report is made twice, with the fp32 and the bf16 policy forced (``IBKIT_CPU_BF16``), so both code
paths run whatever bf16 support the CPU has.
"""

from __future__ import annotations

import json

import pytest
import torch

from ibkit.app import main
from ibkit.bench.runner import TARGETS, ratios
from ibkit.bench.sizes import FULL, SIZES, SMALL
from ibkit.bench.workloads import Bench
from ibkit.models.precision import CPU_BF16_ENV

EXPECTED_KEYS = {
    "size", "size_config", "device", "machine", "versions", "matmul_peak_tflops", "matmul_size", "fast_bf16",
    "fast_bf16_forced", "policy", "settings", "parameters", "results", "ratios", "checks", "wall_time_s", "phase_seconds",
}
ROW_KEYS = {
    "workload", "setting", "impl", "label", "times_s", "median_s", "min_s", "time_s", "throughput",
    "throughput_unit", "resident_bytes", "memory_delta_bytes", "peak_memory_bytes", "memory_method", "flops",
    "achieved_tflops", "peak_fraction", "compute_dtype",
}


# the value of IBKIT_CPU_BF16 that forces each policy
FORCED_POLICIES = {"fp32": "0", "bf16": "1"}


@pytest.fixture(scope="module", params=sorted(FORCED_POLICIES))
def report(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"bench-{request.param}")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CPU_BF16_ENV, FORCED_POLICIES[request.param])
        try:
            code = main(["bench", "--size", "tiny", "--repeats", "1", "--output_dir", str(out), "--threads", "1",
                         "--candidates", "6", "--no_progress", "true"])
        finally:
            torch.set_num_threads(threads)
    assert code == 0
    assert (out / "bench.md").read_text().startswith("# ibkit bench: size `tiny`")
    result = json.loads((out / "bench.json").read_text())
    assert result["fast_bf16"] is result["fast_bf16_forced"] is (request.param == "bf16")
    return result


def test_report_has_every_section_and_workload(report):
    assert set(report) >= EXPECTED_KEYS
    assert report["size"] == "tiny" and report["device"] == "cpu"
    assert report["matmul_peak_tflops"]["fp32"] > 0 and report["matmul_peak_tflops"]["bf16"] > 0
    assert report["matmul_size"] == {"fp32": 256, "bf16": 256}  # the tiny size fixes it
    assert {"torch", "transformers", "ibkit", "python"} <= set(report["versions"])
    assert report["machine"]["cpu"] and report["machine"]["torch_threads"] == 1
    rows = report["results"]
    assert all(set(r) >= ROW_KEYS for r in rows)
    by = {(r["workload"], r["impl"]) for r in rows}
    assert {("train", k) for k in ("hf_fp32", "hf_bf16", "hf_bf16_eval", "ibkit", "ibkit_cached")} <= by
    assert {("rank", k) for k in ("hf_fp32", "hf_bf16", "hf_bf16_batched", "ibkit")} <= by
    assert {("pretrain", "ibkit_stage1"), ("pretrain", "ibkit")} <= by  # stage 1 beside the instruction step
    # BLIP-2 stage 1 has no transformers baseline, so no ratio
    assert not any(r["workload"] == "pretrain" for r in report["ratios"])
    settings = {r["setting"] for r in rows if r["workload"] == "generate"}
    assert settings == {f"batch {b}, {m}" for b in SIZES["tiny"].gen_batches for m in ("greedy", "beam 5")}
    assert "6 candidates" in next(r["setting"] for r in rows if r["workload"] == "rank")


def test_rows_are_internally_consistent(report):
    for r in report["results"]:
        assert len(r["times_s"]) == 1 and r["time_s"] == min(r["times_s"]) == r["min_s"] > 0
        assert r["peak_memory_bytes"] == r["resident_bytes"] + r["memory_delta_bytes"] and r["resident_bytes"] > 0
        assert r["flops"] > 0
        assert r["achieved_tflops"] == pytest.approx(r["flops"] / r["time_s"] / 1e12)
        peak = report["matmul_peak_tflops"][r["compute_dtype"]]
        assert r["peak_fraction"] == pytest.approx(r["achieved_tflops"] / peak)
    train = {r["impl"]: r for r in report["results"] if r["workload"] == "train"}
    batch = report["size_config"]["train_batch"]
    assert train["ibkit"]["throughput"] == pytest.approx(batch / train["ibkit"]["time_s"])
    stage1 = next(r for r in report["results"] if r["impl"] == "ibkit_stage1")
    assert stage1["throughput"] == pytest.approx(batch / stage1["time_s"]) and stage1["throughput_unit"] == "samples/s"
    # the cache skips the encoder: fewer FLOPs for the same step
    assert train["ibkit_cached"]["flops"] < train["ibkit"]["flops"]
    # fp32 and bf16 transformers do the same arithmetic
    assert train["hf_bf16"]["flops"] == train["hf_fp32"]["flops"]
    if report["fast_bf16"]:  # frozen parts stored in bf16: less resident than fp32 transformers
        assert train["ibkit"]["resident_bytes"] < train["hf_fp32"]["resident_bytes"]
    else:
        assert {r["compute_dtype"] for r in report["results"] if r["impl"].startswith("ibkit")} == {"fp32"}


def test_ranking_reuse_does_far_less_work_and_agrees(report):
    rank = {r["impl"]: r for r in report["results"] if r["workload"] == "rank"}
    # transformers recomputes image, Q-Former and prompt for each of the candidates
    assert rank["hf_fp32"]["flops"] > 3 * rank["ibkit"]["flops"]
    checks = report["checks"]["rank"]
    assert set(checks) == {"hf_bf16", "hf_bf16_batched", "ibkit"}
    assert all(c["max_rel_diff_vs_hf_fp32"] < 0.05 for c in checks.values())
    if not report["fast_bf16"]:  # the fp32 policy computes what transformers fp32 computes, after training too
        assert checks["ibkit"]["max_rel_diff_vs_hf_fp32"] < 1e-4 and checks["ibkit"]["same_best_candidate"]


@pytest.mark.parametrize("policy", sorted(FORCED_POLICIES))
def test_training_workload_leaves_no_trace(policy, monkeypatch):
    """After the training workload every model is back as built: same weights and buffers, eval mode."""
    monkeypatch.setenv(CPU_BF16_ENV, FORCED_POLICIES[policy])
    bench = Bench(SIZES["tiny"], torch.device("cpu"))
    models = {"ibkit": bench.ours, "ibkit inference": bench.ours_infer, **bench.hf}
    assert (bench.ours_infer is bench.ours) is (policy == "fp32")  # fp32: ranking runs the trained model
    before = {key: {k: v.clone() for k, v in m.state_dict().items()} for key, m in models.items()}
    impls, _ = bench.train_impls(with_cache=False)
    snapshot = bench.snapshot()
    for impl in impls:
        impl.run()
    bench.restore(snapshot)
    for key, model in models.items():
        assert not [name for name, m in model.named_modules() if m.training], f"{key} left in training mode"
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in before[key].items()), f"{key}'s weights changed"
    llm = bench.ours.language_model.base_model.config
    assert llm._attn_implementation == bench.policy.llm_inference_attention


def test_ratio_entries_follow_the_results(report):
    rows = {(r["workload"], r["setting"], r["impl"]): r for r in report["results"]}
    targeted = [x for x in report["ratios"] if x["target"] is not None]
    assert {x["workload"] for x in targeted} == {"train", "generate", "rank"}
    for x in report["ratios"]:
        ours, base = rows[(x["workload"], x["setting"], x["impl"])], rows[(x["workload"], x["setting"], x["baseline"])]
        if x["kind"] == "speed":
            assert x["ratio"] == pytest.approx(base["time_s"] / ours["time_s"], rel=1e-2)
        else:
            assert x["ratio"] == pytest.approx(ours["peak_memory_bytes"] / base["peak_memory_bytes"], rel=1e-2)


def _row(workload, impl, seconds, memory=100):
    return {"workload": workload, "setting": "s", "impl": impl, "time_s": seconds, "peak_memory_bytes": memory}


def test_ratios_target_the_faster_user_variant():
    rows = [
        _row("train", "hf_fp32", 4.0, 400), _row("train", "hf_bf16", 2.0, 200), _row("train", "hf_bf16_eval", 1.8),
        _row("train", "ibkit", 1.0, 150), _row("train", "ibkit_cached", 1.5, 150),
    ]
    out = {(x["impl"], x["baseline"], x["kind"]): x for x in ratios(rows)}
    speed = out[("ibkit", "hf_bf16", "speed")]
    assert speed["ratio"] == 2.0 and speed["target"] == TARGETS["train"] and speed["met"] is True
    assert out[("ibkit", "hf_fp32", "speed")]["target"] is None  # only the faster variant carries the target
    assert out[("ibkit", "hf_bf16_eval", "speed")]["ratio"] == 1.8
    cached = out[("ibkit_cached", "hf_bf16", "speed")]
    assert cached["target"] == TARGETS["train_cached"] and cached["met"] is False  # 1.33x < 2x
    memory = out[("ibkit", "hf_bf16", "memory")]
    assert memory["ratio"] == 0.75 and memory["met"] is True


def test_sizes_keep_the_real_proportions():
    ratio_vit_t5 = SMALL.vision.hidden_size / SMALL.t5["d_model"]
    assert ratio_vit_t5 == FULL.vision.hidden_size / FULL.t5["d_model"]
    assert SMALL.qformer.hidden_size * 8 == FULL.qformer.hidden_size
    assert SMALL.vision.num_hidden_layers * 3 == FULL.vision.num_hidden_layers
    assert SMALL.qformer.num_hidden_layers * 3 == FULL.qformer.num_hidden_layers
    assert SMALL.t5["num_layers"] * 3 == FULL.t5["num_layers"]
    assert SMALL.vision.image_size == FULL.vision.image_size and SMALL.num_query_tokens == FULL.num_query_tokens


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--size", "tiny", "--workloads", "train,fly", "--output_dir", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a GPU"):
            main(["bench", "--size", "full", "--output_dir", str(tmp_path), "--no_progress", "true"])
