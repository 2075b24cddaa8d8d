"""The one table of dtype spellings a config may use, so every module accepts the same names.

The language model, the vision towers, the precision policy and the feature cache all read it; the
short name of each dtype comes first, since it is the one written back (``encoder.compute_dtype``).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
HALF_DTYPES: dict[str, torch.dtype] = {
    name: dtype for name, dtype in DTYPES.items() if dtype in (torch.bfloat16, torch.float16)
}
FULL_DTYPE_NAMES: tuple[str, ...] = tuple(name for name, dtype in DTYPES.items() if dtype == torch.float32)
# the short (first) spelling of each half dtype: iterate backwards so the first spelling wins
HALF_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in reversed(HALF_DTYPES.items())}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A spelling from :data:`DTYPES` -> torch dtype; a torch dtype or ``None`` passes through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]
