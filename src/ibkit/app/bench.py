"""``ibkit bench``: the command side of :mod:`ibkit.bench`."""

from __future__ import annotations

import logging
from typing import Literal

from ibkit.app.commands import UsageError

WORKLOADS = ("train", "pretrain", "generate", "rank")


def bench(
    size: str = "small",
    output_dir: str = "outputs/bench",
    device: str | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    workloads: str = ",".join(WORKLOADS),
    candidates: int | None = None,
    compile: bool = False,
    threads: int | None = None,
    seed: int = 0,
    statistic: Literal["min", "median"] = "min",
    no_progress: bool = False,
) -> int:
    """ibkit against transformers' InstructBLIP on identical weights: throughput and memory.

    Writes bench.json and bench.md (see docs/bench.md).

    Args:
        size: model size: tiny (tests), small (CPU, real proportions), full (ViT-g + FlanT5-XL, GPU).
        output_dir: where bench.json and bench.md go.
        device: cpu | cuda | cuda:N (default: cuda if available).
        repeats: timed rounds per workload (default: per size).
        warmup: warm-up runs per implementation.
        workloads: comma list of train, pretrain (BLIP-2 stage-1 step), generate, rank.
        candidates: candidates per ranking question.
        compile: torch.compile ibkit's encoder and Q-Former.
        threads: torch CPU threads (default: torch's).
        seed: random seed of the weights and inputs.
        statistic: which timed round throughputs and ratios use (default: the best; both are recorded).
        no_progress: no progress bar.
    """
    from ibkit.bench import SIZES, run_bench, write_report

    if size not in SIZES:
        raise UsageError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    chosen = tuple(w.strip() for w in workloads.split(",") if w.strip())
    unknown = sorted(set(chosen) - set(WORKLOADS))
    if unknown:
        raise UsageError(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    if repeats is not None and repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if threads:
        import torch

        torch.set_num_threads(threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    report = run_bench(
        size, device=device, warmup=warmup, repeats=repeats, workloads=chosen, candidates=candidates,
        compile_ibkit=compile, progress=not no_progress, seed=seed, statistic=statistic,
    )
    json_path, md_path = write_report(report, output_dir)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


def memory(prompt_len: int = 128, target_len: int = 256) -> int:
    """Expected memory per GPU of the paper's InstructBLIP models (built on the meta device, no weights).

    Args:
        prompt_len: longest instruction, in LLM tokens.
        target_len: longest answer, in LLM tokens.
    """
    from ibkit.training.memory import paper_table

    if prompt_len < 1 or target_len < 1:
        raise UsageError("--prompt_len and --target_len must be positive")
    print(paper_table(prompt_len, target_len))
    return 0
