"""The mixing sampler: weights, observed mixture, rank/worker splitting, exact resume."""

from __future__ import annotations

import math
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ibkit.data.sampler import (
    DEFAULT_MULTIPLIERS,
    FeistelPermutation,
    MixtureSampler,
    MixtureStream,
    describe_mixture,
    mixture_weights,
    split_position,
)

SIZES = {"coco_caption": 400, "vqav2": 100, "textcaps": 25}


def test_sqrt_weights_before_multipliers():
    weights = mixture_weights(SIZES, "sqrt", use_default_multipliers=False)
    roots = {name: math.sqrt(size) for name, size in SIZES.items()}  # 20, 10, 5
    total = sum(roots.values())
    for name in SIZES:
        assert weights[name] == pytest.approx(roots[name] / total)
    assert weights["coco_caption"] == pytest.approx(20 / 35)


def test_other_modes_and_multipliers():
    proportional = mixture_weights(SIZES, "proportional", use_default_multipliers=False)
    assert proportional["vqav2"] == pytest.approx(100 / 525)
    uniform = mixture_weights(SIZES, "uniform", use_default_multipliers=False)
    assert all(w == pytest.approx(1 / 3) for w in uniform.values())
    # sqrt(100)=10 and sqrt(25)=5; okvqa x2 -> 10, aokvqa x0.5 -> 2.5 (the default multipliers)
    sizes = {"okvqa": 25, "aokvqa": 25, "vqav2": 100}
    assert DEFAULT_MULTIPLIERS["okvqa"] == 2.0 and DEFAULT_MULTIPLIERS["aokvqa"] == 0.5
    weights = mixture_weights(sizes, "sqrt")
    assert weights == pytest.approx({"okvqa": 10 / 22.5, "aokvqa": 2.5 / 22.5, "vqav2": 10 / 22.5})
    # overrides replace the defaults per dataset
    weights = mixture_weights(sizes, "sqrt", multipliers={"aokvqa": 1.0, "vqav2": 3.0})
    assert weights == pytest.approx({"okvqa": 10 / 45, "aokvqa": 5 / 45, "vqav2": 30 / 45})
    assert "vqav2" in describe_mixture(sizes, weights)


@pytest.mark.parametrize(
    "sizes, kwargs, message",
    [
        (SIZES, {"mode": "log"}, "unknown mixing mode"),
        ({"a": 3, "b": 0}, {}, "no training samples"),
        ({"a": 3}, {"multipliers": {"a": -1.0}}, ">= 0"),
        ({"a": 3}, {"multipliers": {"a": 0.0}}, "all mixing weights are zero"),
        ({}, {}, "empty"),
    ],
)
def test_weight_errors(sizes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixture_weights(sizes, **kwargs)


def test_observed_mixture_matches_weights():
    weights = mixture_weights(SIZES, "sqrt", use_default_multipliers=False)
    stream = MixtureStream(list(SIZES.values()), list(weights.values()), seed=7, block_size=512)
    draws = 30_000
    counts = Counter(d for d, _, _ in islice(stream.iter_positions(0), draws))
    for index, p in enumerate(weights.values()):
        binomial_std = math.sqrt(draws * p * (1 - p))
        assert abs(counts[index] - draws * p) < 5 * binomial_std, (index, counts[index], draws * p)


def test_each_dataset_is_walked_as_a_permutation_per_epoch():
    sizes = [7, 50]
    stream = MixtureStream(sizes, [0.5, 0.5], seed=3, block_size=64)
    per_dataset: dict[int, list[int]] = {0: [], 1: []}
    for d, i, _ in islice(stream.iter_positions(0), 400):
        per_dataset[d].append(i)
    for d, size in enumerate(sizes):
        seen = per_dataset[d]
        full_epochs = len(seen) // size
        assert full_epochs >= 2
        for epoch in range(full_epochs):
            assert sorted(seen[epoch * size : (epoch + 1) * size]) == list(range(size))
        # consecutive epochs use different orders (a fresh permutation each epoch)
        assert seen[:size] != seen[size : 2 * size] or size < 3


def test_feistel_is_a_bijection():
    for n in (1, 2, 3, 10, 257, 1000):
        perm = FeistelPermutation(n, key=(1, 2))
        for epoch in (0, 1):
            out = perm(np.arange(n), epoch)
            assert sorted(out.tolist()) == list(range(n))
    perm = FeistelPermutation(1000, key=(5,))
    assert perm(np.arange(1000), 0).tolist() != list(range(1000))
    assert perm(np.arange(1000), 0).tolist() != perm(np.arange(1000), 1).tolist()
    with pytest.raises(IndexError):
        perm(1000)


def test_stream_is_a_pure_function_of_seed_and_position():
    a = MixtureStream([30, 20, 10], [0.2, 0.3, 0.5], seed=11, block_size=32)
    b = MixtureStream([30, 20, 10], [0.2, 0.3, 0.5], seed=11, block_size=32)
    sequential = [(d, i) for d, i, _ in islice(a.iter_positions(0), 300)]
    # random access on a fresh stream, out of order, reproduces the sequential draws
    for position in (299, 0, 150, 31, 32, 64, 200):
        assert b[position] == sequential[position]
    other_seed = MixtureStream([30, 20, 10], [0.2, 0.3, 0.5], seed=12, block_size=32)
    assert [other_seed[p] for p in range(300)] != sequential


def test_run_length_one_is_the_per_sample_stream():
    args = ([30, 20, 10], [0.2, 0.3, 0.5])
    plain = MixtureStream(*args, seed=5, block_size=64)
    runs_of_one = MixtureStream(*args, seed=5, block_size=64, run_length=1)
    assert [plain[p] for p in range(200)] == [runs_of_one[p] for p in range(200)]


def test_one_dataset_per_run_keeps_weights_permutations_and_random_access():
    sizes, weights, run = [11, 40, 23], [0.2, 0.3, 0.5], 8
    stream = MixtureStream(sizes, weights, seed=9, block_size=64, run_length=run)
    draws = [(d, i) for d, i, _ in islice(stream.iter_positions(0), 16_000)]
    runs = [draws[k : k + run] for k in range(0, len(draws), run)]
    assert all(len({d for d, _ in chunk}) == 1 for chunk in runs)  # every run draws one dataset
    assert len({chunk[0][0] for chunk in runs[:40]}) == 3  # ...and runs differ
    counts = Counter(chunk[0][0] for chunk in runs)
    for index, p in enumerate(weights):  # the runs follow the weights
        assert abs(counts[index] - len(runs) * p) < 5 * math.sqrt(len(runs) * p * (1 - p)), counts
    for d, size in enumerate(sizes):  # each dataset is still walked epoch by epoch, no repeats inside one
        seen = [i for dd, i in draws if dd == d]
        assert sorted(seen[:size]) == list(range(size)) and sorted(seen[size : 2 * size]) == list(range(size))
    fresh = MixtureStream(sizes, weights, seed=9, block_size=64, run_length=run)
    for position in (15_999, 0, 777, 64, 63):  # resuming anywhere reproduces the stream
        assert fresh[position] == draws[position]
    with pytest.raises(ValueError, match="run_length must be positive and divide block_size 64"):
        MixtureStream(sizes, weights, block_size=64, run_length=24)


def _take(sampler: MixtureSampler, count: int) -> list[tuple[int, int, int]]:
    return list(islice(iter(sampler), count))


def test_ranks_see_disjoint_draws_whose_union_is_the_single_stream():
    stream_args = ([40, 15, 5], [0.5, 0.3, 0.2])
    single = _take(MixtureSampler(MixtureStream(*stream_args, seed=1, block_size=16)), 120)
    rank0 = _take(
        MixtureSampler(MixtureStream(*stream_args, seed=1, block_size=16), rank=0, world_size=2), 60
    )
    rank1 = _take(
        MixtureSampler(MixtureStream(*stream_args, seed=1, block_size=16), rank=1, world_size=2), 60
    )
    positions0 = {p for _, _, p in rank0}
    positions1 = {p for _, _, p in rank1}
    assert not positions0 & positions1
    assert sorted(rank0 + rank1, key=lambda draw: draw[2]) == single
    assert all(split_position(p, 2)[0] == 0 for p in positions0)


class _Identity(Dataset):
    """Returns the draw and the worker that produced it."""

    def __getitem__(self, key):
        info = get_worker_info()
        return torch.tensor([*key, -1 if info is None else info.id])

    def __len__(self) -> int:  # pragma: no cover - the sampler is infinite
        return 0


def test_two_ranks_with_two_workers_each_cover_the_stream_once():
    stream_args = ([40, 15, 5], [0.5, 0.3, 0.2])
    single = _take(MixtureSampler(MixtureStream(*stream_args, seed=4, block_size=16)), 64)
    rows = []
    workers_used = set()
    for rank in range(2):
        sampler = MixtureSampler(MixtureStream(*stream_args, seed=4, block_size=16), rank=rank, world_size=2)
        loader = DataLoader(
            _Identity(), sampler=sampler, batch_size=4, num_workers=2, multiprocessing_context="fork"
        )
        for batch in islice(loader, 8):  # 8 batches x 4 = 32 draws per rank
            rows.extend(tuple(row[:3].tolist()) for row in batch)
            workers_used.update((rank, int(w)) for w in batch[:, 3])
    assert workers_used == {(0, 0), (0, 1), (1, 0), (1, 1)}
    positions = [p for _, _, p in rows]
    assert len(positions) == len(set(positions)) == 64
    assert sorted(rows, key=lambda draw: draw[2]) == single


def test_save_and_restore_continue_the_identical_stream():
    stream_args = ([40, 15, 5], [0.5, 0.3, 0.2])
    world = 2
    uninterrupted = {
        rank: _take(MixtureSampler(MixtureStream(*stream_args, seed=9, block_size=16), rank, world), 50)
        for rank in range(world)
    }
    # "train" 10 steps of per-rank batch 3 on 2 ranks: 60 samples consumed globally
    consumed = 10 * 3 * world
    first = MixtureSampler(MixtureStream(*stream_args, seed=9, block_size=16), 0, world)
    _take(first, 45)  # prefetching ran further than training consumed; it must not matter
    first.set_position(consumed)
    state = first.state_dict()
    assert state["position"] == consumed
    for rank in range(world):
        resumed = MixtureSampler(MixtureStream(*stream_args, seed=9, block_size=16), rank, world)
        resumed.load_state_dict(state)
        assert _take(resumed, 20) == uninterrupted[rank][consumed // world : consumed // world + 20]


def test_sampler_rejects_bad_arguments():
    stream = MixtureStream([5], [1.0])
    with pytest.raises(ValueError):
        MixtureSampler(stream, rank=2, world_size=2)
    with pytest.raises(ValueError):
        MixtureStream([5, 0], [0.5, 0.5])
    with pytest.raises(KeyError):
        MixtureSampler(stream).load_state_dict({})
