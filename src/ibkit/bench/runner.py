"""Running the benchmark: alternating timed runs of the workloads' implementations, one report.

The implementations and their models are :mod:`ibkit.bench.workloads`. Every workload warms each
implementation up, measures peak memory and FLOPs in untimed runs, then times ``repeats`` rounds in which
the implementations alternate (rotating the order), so slow drifts of a shared machine hit all of them
alike. Each round's time is kept; throughputs and ratios use the best round by default
(``statistic="median"`` for the median).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ibkit.bench.measure import PeakMemory, count_flops, machine_info, timed, versions
from ibkit.bench.sizes import SIZES, BenchSize
from ibkit.bench.workloads import Bench, Impl
from ibkit.models.precision import forced_fast_bf16, matmul_probe

__all__ = ["Bench", "measure", "ratios", "run_bench", "write_report"]

# The ways transformers' users run it: the ratio targets compare ibkit with the faster of these.
USER_BASELINES = ("hf_fp32", "hf_bf16")
MEMORY_RUNS = 5  # peak-memory runs per implementation (median kept; RSS peaks of one setting vary by ~3 MiB)
TARGETS = {"train": 1.3, "train_cached": 2.0, "generate": 1.0, "rank": 3.0, "memory": 1.0}


# -- running ----------------------------------------------------------------------------------------------
def measure(
    workload: str,
    setting: str,
    impls: list[Impl],
    device: torch.device,
    warmup: int,
    repeats: int,
    tick: Callable[[int], Any],
    outputs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Warm up, MEMORY_RUNS alternating memory runs (median) and one FLOP count each, then ``repeats`` timed rounds.

    ``outputs`` (if given) receives what each implementation's first memory run returned.
    """
    for impl in impls:
        for _ in range(warmup):
            impl.run()
            tick(1)
    # CPU peak growth is read from the process's RSS, which moves by allocator noise of a few MiB between
    # identical runs: each implementation is measured MEMORY_RUNS times, alternating, and the median kept.
    deltas: dict[str, list[int]] = {impl.key: [] for impl in impls}
    methods: dict[str, str] = {}
    for r in range(MEMORY_RUNS):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
            with PeakMemory(device) as peak:
                result = impl.run()
            if outputs is not None and r == 0:
                outputs[impl.key] = result
            deltas[impl.key].append(peak.delta)
            methods[impl.key] = peak.method
            tick(1)
    memory = {impl.key: (impl.resident(), int(statistics.median(deltas[impl.key])), methods[impl.key],
                         deltas[impl.key]) for impl in impls}
    counted = {}
    for impl in impls:
        counted[impl.key] = impl.flops() if impl.flops is not None else count_flops(impl.run)
        tick(1)
    times: dict[str, list[float]] = {impl.key: [] for impl in impls}
    for r in range(repeats):
        shift = r % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            times[impl.key].append(timed(impl.run, device))
            tick(1)
    rows = []
    for impl in impls:
        ts = sorted(times[impl.key])
        median = ts[len(ts) // 2] if len(ts) % 2 else (ts[len(ts) // 2 - 1] + ts[len(ts) // 2]) / 2
        resident, delta, method, all_deltas = memory[impl.key]
        rows.append({
            "workload": workload,
            "setting": setting,
            "impl": impl.key,
            "label": impl.label,
            "times_s": times[impl.key],
            "median_s": median,
            "min_s": ts[0],
            "resident_bytes": resident,
            "memory_delta_bytes": delta,
            "memory_delta_runs_bytes": all_deltas,
            "peak_memory_bytes": resident + delta,
            "memory_method": method,
            "flops": counted[impl.key],
            "compute_dtype": impl.compute_dtype,
        })
    return rows


def _ticks(size: BenchSize, warmup: int, repeats: int, rank_repeats: int, workloads: set[str]) -> int:
    per = 1 + MEMORY_RUNS + warmup
    total = 0
    if "train" in workloads:
        total += 5 * (per + repeats)
    if "pretrain" in workloads:
        total += 2 * (per + repeats)
    if "generate" in workloads:
        total += len(size.gen_batches) * len(size.gen_beams) * 3 * (per + repeats)
    if "rank" in workloads:
        total += 4 * (1 + MEMORY_RUNS + rank_repeats)  # no separate warm-up: the memory runs warm up
    return total


def run_bench(
    size: str | BenchSize = "small",
    device: str | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    workloads: tuple[str, ...] = ("train", "pretrain", "generate", "rank"),
    candidates: int | None = None,
    compile_ibkit: bool = False,
    progress: bool = True,
    seed: int = 0,
    statistic: str = "min",
) -> dict[str, Any]:
    """Run the benchmark and return the result dictionary (what ``bench.json`` holds).

    ``statistic`` (``min`` or ``median`` of the timed rounds) gives the times that throughputs and
    ratios use: on a shared machine other processes only ever slow a run down, so the best round is
    the least disturbed estimate; both are always recorded.
    """
    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', got {statistic!r}")
    from tqdm.auto import tqdm

    spec = SIZES[size] if isinstance(size, str) else size
    if candidates is not None:
        spec = replace(spec, rank_candidates=candidates)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec.name == "full" and dev.type != "cuda":
        raise SystemExit("ibkit bench --size full needs a GPU (ViT-g + FlanT5-XL); use --size small on CPU")
    warmup = spec.warmup if warmup is None else warmup
    repeats = spec.repeats if repeats is None else repeats
    rank_repeats = min(spec.rank_repeats, repeats)
    started = time.perf_counter()
    info = machine_info(dev)
    probes = {name: matmul_probe(dtype, dev, spec.matmul_size)
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    peaks = {name: peak for name, (peak, _) in probes.items()}
    phases: dict[str, float] = {}
    mark = time.perf_counter()
    bench = Bench(spec, dev, peaks=peaks, seed=seed, compile_ibkit=compile_ibkit)
    phases["build"] = time.perf_counter() - mark
    chosen = set(workloads)
    bar = tqdm(total=_ticks(spec, warmup, repeats, rank_repeats, chosen), desc=f"ibkit bench {spec.name}",
               unit="run", disable=not progress)
    results: list[dict[str, Any]] = []
    # Every measurement starts with a full collection (PeakMemory), which walks every tracked object: with the
    # libraries and the models (about half a million objects) 0.2 s a call on the 2-core AMD EPYC, 115 calls at
    # the tiny size (27 of its 33 s). What exists now lives for the whole run: freeze it, so that a collection
    # walks only what the measurements make.
    gc.collect()
    gc.freeze()
    try:
        if "train" in chosen:
            mark = time.perf_counter()
            bar.set_postfix_str("training step")
            impls, setting = bench.train_impls()
            snapshot = bench.snapshot()
            results += measure("train", setting, impls, dev, warmup, repeats, bar.update)
            bench.restore(snapshot)
            del snapshot
            phases["train"] = time.perf_counter() - mark
        if "pretrain" in chosen:
            mark = time.perf_counter()
            bar.set_postfix_str("BLIP-2 stage-1 step")
            snapshot = bench.snapshot()
            impls, setting = bench.pretrain_impls()
            results += measure("pretrain", setting, impls, dev, warmup, repeats, bar.update)
            bench.restore(snapshot)  # the reference step trained ``ours``; modes back to evaluation
            del snapshot
            phases["pretrain"] = time.perf_counter() - mark
        if "generate" in chosen:
            mark = time.perf_counter()
            for batch in spec.gen_batches:
                for beams in spec.gen_beams:
                    impls, setting = bench.generate_impls(batch, beams)
                    bar.set_postfix_str(f"generate {setting}")
                    results += measure("generate", setting, impls, dev, warmup, repeats, bar.update)
            phases["generate"] = time.perf_counter() - mark
        if "rank" in chosen:
            mark = time.perf_counter()
            impls, setting = bench.rank_impls()
            bar.set_postfix_str(f"rank {setting}")
            outputs: dict[str, Any] = {}
            # no separate warm-up: the (untimed) memory run warms every implementation up
            results += measure("rank", setting, impls, dev, 0, rank_repeats, bar.update, outputs)
            bench.checks["rank"] = bench.check_ranking(outputs)
            phases["rank"] = time.perf_counter() - mark
    finally:
        gc.unfreeze()
        bar.close()
        bench.close()
    _add_throughput(results, spec, peaks, statistic)
    report = {
        "size": spec.name,
        "size_config": spec.as_dict(),
        "device": str(dev),
        "machine": info,
        "versions": versions(),
        "matmul_peak_tflops": peaks,
        "matmul_size": {name: size for name, (_, size) in probes.items()},  # per precision: a CPU probe sizes each
        "fast_bf16": bool(bench.policy.frozen_dtype),
        "fast_bf16_forced": forced_fast_bf16(dev),  # None: decided from the measured peaks
        "policy": bench.policy.as_dict(),
        "compile_ibkit": compile_ibkit,
        "settings": {
            "warmup": warmup, "repeats": repeats, "rank_repeats": rank_repeats, "seed": seed, "statistic": statistic,
        },
        "parameters": {
            "vision_encoder": sum(p.numel() for p in bench.ours.vision_encoder.parameters()),
            "qformer": sum(p.numel() for p in bench.ours.qformer.parameters()),
            "language_model": sum(p.numel() for p in bench.ours.language_model.parameters()),
            "trainable": bench.ours.num_parameters(trainable_only=True),
        },
        "results": results,
        "ratios": ratios(results),
        "checks": bench.checks,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
    }
    with suppress(OSError):
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _add_throughput(
    results: list[dict[str, Any]], size: BenchSize, peaks: dict[str, float], statistic: str
) -> None:
    for row in results:
        t = row["time_s"] = row[f"{statistic}_s"]
        if row["workload"] in ("train", "pretrain"):
            row["throughput"], row["throughput_unit"] = size.train_batch / t, "samples/s"
        elif row["workload"] == "generate":
            batch = int(row["setting"].split(",")[0].split()[1])
            row["throughput"], row["throughput_unit"] = batch * size.new_tokens / t, "tokens/s"
        else:
            row["throughput"], row["throughput_unit"] = size.rank_questions * size.rank_candidates / t, "candidates/s"
        achieved = row["flops"] / t / 1e12
        row["achieved_tflops"] = achieved
        row["peak_fraction"] = achieved / peaks[row["compute_dtype"]] if peaks[row["compute_dtype"]] else None


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ibkit vs transformers per workload setting: speed (baseline time / ibkit time) and peak memory."""
    out = []
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for row in results:
        groups.setdefault((row["workload"], row["setting"]), {})[row["impl"]] = row
    for (workload, setting), rows in groups.items():
        users = {k: rows[k] for k in USER_BASELINES if k in rows}
        if not users:
            continue
        fastest = min(users, key=lambda k: users[k]["time_s"])
        for ours in ("ibkit", "ibkit_cached"):
            if ours not in rows:
                continue
            target_key = {"train": "train_cached" if ours == "ibkit_cached" else "train"}.get(workload, workload)
            baselines = [fastest] + [k for k in rows if k not in (fastest, "ibkit", "ibkit_cached")]
            for base in baselines:
                is_target = base == fastest
                ratio = rows[base]["time_s"] / rows[ours]["time_s"]
                target = TARGETS[target_key] if is_target else None
                out.append({
                    "workload": workload, "setting": setting, "kind": "speed", "impl": ours, "baseline": base,
                    "baseline_is_fastest_user_variant": is_target, "ratio": round(ratio, 3), "target": target,
                    "met": None if target is None else ratio >= target,
                })
            for base in users:
                ratio = rows[ours]["peak_memory_bytes"] / max(1, rows[base]["peak_memory_bytes"])
                target = TARGETS["memory"] if base == fastest else None
                out.append({
                    "workload": workload, "setting": setting, "kind": "memory", "impl": ours, "baseline": base,
                    "baseline_is_fastest_user_variant": base == fastest, "ratio": round(ratio, 3), "target": target,
                    "met": None if target is None else ratio <= target,
                })
    return out


def write_report(report: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    from ibkit.bench.report import markdown

    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "bench.json", directory / "bench.md"
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(markdown(report))
    return json_path, md_path

