"""``bench.md``: the benchmark result as markdown tables (what docs/bench.md quotes)."""

from __future__ import annotations

from typing import Any


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _time(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _side(report: dict[str, Any], dtype: str) -> str:
    """"2048^2": the matmul size timed for ``dtype`` (one size for both in reports written before the CPU probe
    sized each)."""
    size = report["matmul_size"]
    return f"{size[dtype] if isinstance(size, dict) else size}^2"


def markdown(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["versions"]
    peaks = report["matmul_peak_tflops"]
    lines = [
        f"# ibkit bench: size `{report['size']}` on {m['device']}",
        "",
        f"- model: {report['size_config']['description']}",
        "- parameters: " + ", ".join(f"{k} {n / 1e6:,.1f}M" for k, n in report["parameters"].items()),
        f"- machine: {m.get('gpu') or m['cpu']}; {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads"
        + (f", {m['ram_gib']} GiB RAM" if "ram_gib" in m else "")
        + (f"; load average {m.get('load_average_start')} at start, {m.get('load_average_end')} at end"
           if "load_average_start" in m else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- measured matmul peak: fp32 {peaks['fp32']:.3f} TFLOP/s ({_side(report, 'fp32')}), "
        f"bf16 {peaks['bf16']:.3f} TFLOP/s ({_side(report, 'bf16')}; bf16 {'is' if report['fast_bf16'] else 'is not'} fast here"
        + (", forced by IBKIT_CPU_BF16)" if report.get("fast_bf16_forced") is not None else ")"),
        f"- ibkit policy: {report['policy']}" + (" + torch.compile" if report.get("compile_ibkit") else ""),
        f"- {report['settings']['warmup']} warm-up run(s), then {report['settings']['repeats']} alternating timed "
        f"rounds ({report['settings']['rank_repeats']} for ranking); times, throughputs and ratios use the "
        f"{'best round' if report['settings']['statistic'] == 'min' else 'median round'}; wall time "
        f"{report['wall_time_s']} s ({', '.join(f'{k} {v} s' for k, v in report.get('phase_seconds', {}).items())})",
        f"- peak memory: {report['results'][0]['memory_method'] if report['results'] else '-'}, plus the "
        "implementation's resident weights, gradients and optimizer state",
        "",
        "## Results",
        "",
        "| workload | setting | implementation | time | median | throughput | TFLOP/s | of peak | peak memory (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['workload']} | {r['setting']} | {r['label']} | {_time(r['time_s'])} | {_time(r['median_s'])} | "
            f"{r['throughput']:,.1f} {r['throughput_unit']} | {r['achieved_tflops']:.3f} | "
            f"{_pct(r['peak_fraction'])} ({r['compute_dtype']}) | {_mib(r['peak_memory_bytes'])} |"
        )
    lines += [
        "",
        "## ibkit / transformers",
        "",
        "Speed ratio = transformers time / ibkit time (above 1: ibkit faster); memory ratio = ibkit peak / "
        "transformers peak (below 1: ibkit smaller). Targets apply against the faster of the two ways "
        "transformers is usually run (fp32, bf16).",
        "",
        "| workload | setting | ibkit | vs | kind | ratio | target | met |",
        "|---|---|---|---|---|---:|---:|:---:|",
    ]
    labels = {r["impl"]: r["label"] for r in report["results"]}
    for r in report["ratios"]:
        target = "-" if r["target"] is None else (f">= {r['target']}" if r["kind"] == "speed" else f"<= {r['target']}")
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['workload']} | {r['setting']} | {labels.get(r['impl'], r['impl'])} | "
            f"{labels.get(r['baseline'], r['baseline'])} | {r['kind']} | {r['ratio']:.2f}x | {target} | {met} |"
        )
    rank = report.get("checks", {}).get("rank")
    if rank:
        lines += ["", "## Ranking scores vs transformers fp32 (precision check)", "",
                  "Random weights make every candidate's log-likelihood large (hundreds of nats), so the relative "
                  "difference is the meaningful one.", "",
                  "| implementation | max abs difference (nats) | max relative difference | same best candidate |",
                  "|---|---:|---:|:---:|"]
        for key, c in rank.items():
            lines.append(
                f"| {labels.get(key, key)} | {c['max_abs_diff_vs_hf_fp32']} | {c['max_rel_diff_vs_hf_fp32']:.2e} | "
                f"{c['same_best_candidate']} |"
            )
    return "\n".join(lines) + "\n"
