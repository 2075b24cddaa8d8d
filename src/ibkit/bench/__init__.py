"""``ibkit bench``: ibkit against transformers' InstructBLIP on identical weights, in one process.

Training step, generation latency (greedy and beam 5, batch 1 and 8) and candidate ranking, each with
peak memory and achieved FLOP/s as a fraction of the machine's measured matmul peak; writes
``bench.json`` and ``bench.md``. Sizes: ``tiny`` (tests), ``small`` (CPU, real proportions), ``full``
(ViT-g + Q-Former + FlanT5-XL, GPU). See ``docs/bench.md``.
"""

from __future__ import annotations

import argparse
import logging

from ibkit.bench.runner import run_bench, write_report
from ibkit.bench.sizes import SIZES, BenchSize
from ibkit.models.precision import PrecisionPolicy, apply_precision_policy, compile_model, default_policy

__all__ = [
    "SIZES",
    "BenchSize",
    "PrecisionPolicy",
    "apply_precision_policy",
    "compile_model",
    "default_policy",
    "main",
    "run_bench",
    "write_report",
]

WORKLOADS = ("train", "generate", "rank")


def main(argv: list[str] | None = None) -> int:
    """``ibkit bench --size small --output_dir outputs/bench``."""
    parser = argparse.ArgumentParser(prog="ibkit bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default: small)")
    parser.add_argument("--output_dir", default="outputs/bench", help="where bench.json and bench.md go")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per workload (default: per size)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per implementation")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of train, generate, rank")
    parser.add_argument("--candidates", type=int, default=None, help="candidates per ranking question")
    parser.add_argument("--compile", action="store_true", help="torch.compile ibkit's encoder and Q-Former")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--statistic", choices=("min", "median"), default="min",
                        help="which timed round throughputs and ratios use (default: the best; both are recorded)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    report = run_bench(
        args.size, device=args.device, warmup=args.warmup, repeats=args.repeats, workloads=workloads,
        candidates=args.candidates, compile_ibkit=args.compile, progress=not args.no_progress, seed=args.seed,
        statistic=args.statistic,
    )
    json_path, md_path = write_report(report, args.output_dir)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0
