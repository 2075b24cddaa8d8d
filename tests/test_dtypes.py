"""One table of dtype spellings: every alias maps to its dtype everywhere, and a typo is an error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ibkit.data.feature_cache import FeatureCacheError, resolve_store_dtype
from ibkit.models.dtypes import HALF_DTYPE_NAMES, resolve_dtype
from ibkit.models.vision.open_clip_tower import parse_compute_dtype

FULL = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
HALF = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


@pytest.mark.parametrize("name, dtype", sorted((FULL | HALF).items()))
def test_resolve_dtype_maps_every_alias(name, dtype):
    assert resolve_dtype(name) is dtype


def test_resolve_dtype_passes_dtypes_and_none_through_and_rejects_typos():
    assert resolve_dtype(None) is None
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown dtype 'bf61'; use one of \[.*'bf16'.*'fp32'"):
        resolve_dtype("bf61")


@pytest.mark.parametrize("name, dtype", sorted(HALF.items()))
def test_tower_compute_dtype_and_cache_dtype_accept_every_half_alias(name, dtype):
    assert parse_compute_dtype(name) is dtype
    assert parse_compute_dtype(f"torch.{name}".upper()) is dtype  # case and a torch. prefix are forgiven
    assert resolve_store_dtype(name, nn.Linear(1, 1)) is dtype


def test_full_precision_means_no_cast_for_towers_and_is_refused_by_the_cache():
    for name in FULL:
        assert parse_compute_dtype(name) is None
        with pytest.raises(FeatureCacheError, match=f"unknown cache dtype '{name}'"):
            resolve_store_dtype(name, nn.Linear(1, 1))
    assert parse_compute_dtype(None) is None


def test_typos_are_refused_with_the_accepted_names():
    with pytest.raises(ValueError, match=r"compute_dtype='bf61' is not supported; use one of .*'fp32'.* or null"):
        parse_compute_dtype("bf61")
    with pytest.raises(FeatureCacheError, match=r"unknown cache dtype 'bf61'; use one of .*'bf16'.* or 'auto'"):
        resolve_store_dtype("bf61", nn.Linear(1, 1))


def test_half_dtypes_are_written_back_by_their_short_name():
    assert {torch.bfloat16: "bf16", torch.float16: "fp16"} == HALF_DTYPE_NAMES
