"""``ibkit bench``: ibkit against transformers' InstructBLIP on identical weights, in one process.

Training step (instruction tuning, and a BLIP-2 stage-1 step), generation latency (greedy and beam 5, batch 1 and 8) and candidate ranking, each with
peak memory and achieved FLOP/s as a fraction of the machine's measured matmul peak; writes
``bench.json`` and ``bench.md``. Sizes: ``tiny`` (tests), ``small`` (CPU, real proportions), ``full``
(ViT-g + Q-Former + FlanT5-XL, GPU). See ``docs/bench.md``.
"""

from __future__ import annotations

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
    "run_bench",
    "write_report",
]
