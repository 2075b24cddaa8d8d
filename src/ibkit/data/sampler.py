"""The training mixture: which dataset and which sample each training draw takes.

InstructBLIP samples dataset ``d`` with probability ``sqrt(S_d) / sum_i sqrt(S_i)`` and then adjusts a
few datasets by hand (A-OKVQA down, OKVQA up). Here the whole training stream is a *pure function of
(seed, position)*: draw ``p`` is computed from generators seeded by ``(seed, p // block_size)``, so a
run resumed at position ``p`` continues exactly where it stopped, on any number of ranks and workers.
The dataset is drawn per sample, or (``run_length``) once per batch as LAVIS's ``MultiIterLoader`` does.

Within one dataset the draws walk through a seeded permutation of its samples, epoch by epoch (every
sample is seen once before any repeats), like the per-dataset shuffled loaders of the original code.
The permutation is a keyed Feistel network with cycle walking: a bijection on ``[0, S)`` that needs
no O(S) memory, which matters for the 14M-sample CapFilt set.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

MIXING_MODES = ("sqrt", "proportional", "uniform")

# The paper lowers A-OKVQA (its multiple-choice answers are easy to overfit) and raises OKVQA; the
# exact factors are unpublished, these are ibkit's defaults (override them in YAML).
DEFAULT_MULTIPLIERS: dict[str, float] = {"aokvqa": 0.5, "okvqa": 2.0}


def mixture_weights(
    sizes: Mapping[str, int],
    mode: str = "sqrt",
    multipliers: Mapping[str, float] | None = None,
    use_default_multipliers: bool = True,
) -> dict[str, float]:
    """Sampling probability of each dataset, summing to 1.

    ``mode`` sets the base weights (``sqrt``: sqrt(S_d), ``proportional``: S_d, ``uniform``: 1), then
    each dataset's weight is multiplied by its multiplier (defaults from :data:`DEFAULT_MULTIPLIERS`,
    overridden per name by ``multipliers``) and the result is renormalised.
    """
    if mode not in MIXING_MODES:
        raise ValueError(f"unknown mixing mode {mode!r}; choose one of {MIXING_MODES}")
    if not sizes:
        raise ValueError("the training mixture is empty: no datasets given")
    for name, size in sizes.items():
        if size < 0:
            raise ValueError(f"dataset {name!r} has a negative size {size}")
        if size == 0:
            raise ValueError(f"dataset {name!r} has no training samples; remove it from the mixture")
    base = {
        name: math.sqrt(size) if mode == "sqrt" else float(size) if mode == "proportional" else 1.0
        for name, size in sizes.items()
    }
    factors: dict[str, float] = dict(DEFAULT_MULTIPLIERS) if use_default_multipliers else {}
    for name, factor in (multipliers or {}).items():
        if name not in sizes:
            log.warning(
                "mixing multiplier for %r ignored: it is not in the training mixture %s", name, sorted(sizes)
            )
        factors[name] = float(factor)
    for name, factor in factors.items():
        if factor < 0 or not math.isfinite(factor):
            raise ValueError(f"mixing multiplier for {name!r} must be finite and >= 0, got {factor}")
    raw = {name: weight * factors.get(name, 1.0) for name, weight in base.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"all mixing weights are zero (multipliers {factors})")
    return {name: weight / total for name, weight in raw.items()}


def describe_mixture(sizes: Mapping[str, int], weights: Mapping[str, float]) -> str:
    """A small table (dataset, size, weight) for the log, so a run shows what it trained on."""
    width = max(len("dataset"), *(len(n) for n in sizes))
    lines = [f"{'dataset':<{width}}  {'samples':>10}  {'weight':>7}"]
    for name in sizes:
        lines.append(f"{name:<{width}}  {sizes[name]:>10,}  {weights[name]:>7.4f}")
    return "\n".join(lines)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixing function (uint64 array in and out; the arithmetic wraps)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """Seeded bijections of ``[0, n)``, one per epoch, evaluated index by index in O(1) memory.

    A balanced Feistel network permutes ``[0, 4^h)`` for the smallest ``4^h >= n``; values that land
    outside ``[0, n)`` are fed through again (cycle walking), which keeps the map a bijection of
    ``[0, n)``. The domain is under 4n, so fewer than four passes are needed on average. Round keys
    depend on (key, epoch), so many epochs are evaluated in one vectorised call.
    """

    def __init__(self, n: int, key: Sequence[int], rounds: int = 6) -> None:
        if n <= 0:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half_bits = np.uint64((bits + 1) // 2)
        self.half_mask = np.uint64((1 << int(self.half_bits)) - 1)
        self.base_keys = np.random.SeedSequence([int(k) for k in key]).generate_state(rounds, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray, epoch_keys: np.ndarray) -> np.ndarray:
        left, right = x >> self.half_bits, x & self.half_mask
        for base_key in self.base_keys:
            round_key = _splitmix64(epoch_keys ^ base_key)
            left, right = right, left ^ (_splitmix64(right ^ round_key) & self.half_mask)
        return (left << self.half_bits) | right

    def __call__(self, index: np.ndarray | int, epoch: np.ndarray | int = 0) -> np.ndarray:
        signed = np.asarray(index, dtype=np.int64)
        if signed.size and (int(signed.min()) < 0 or int(signed.max()) >= self.n):
            raise IndexError(f"index outside [0, {self.n}): {signed}")
        if self.n == 1:
            return np.zeros_like(signed)
        flat = signed.reshape(-1).astype(np.uint64)
        epochs = np.broadcast_to(np.asarray(epoch, dtype=np.int64), signed.shape).reshape(-1)
        with np.errstate(over="ignore"):
            epoch_keys = _splitmix64(epochs.astype(np.uint64))
            out = self._encrypt(flat, epoch_keys)
            outside = np.flatnonzero(out >= np.uint64(self.n))
            while outside.size:
                out[outside] = self._encrypt(out[outside], epoch_keys[outside])
                outside = outside[out[outside] >= np.uint64(self.n)]
        return out.astype(np.int64).reshape(signed.shape)


class MixtureStream:
    """The infinite training stream: position ``p`` -> (dataset index, sample index).

    Positions are grouped in blocks of ``block_size``; block ``b``'s dataset choices come from a
    generator seeded by ``(seed, b)`` alone, so any draw can be recomputed without replaying the run.
    The k-th draw of dataset ``d`` takes sample ``perm_{seed,d,epoch}(k mod S_d)`` with
    ``epoch = k // S_d`` (``shuffle=False`` keeps file order inside each epoch).

    ``run_length`` > 1 draws one dataset for each run of that many consecutive positions, as LAVIS's
    ``MultiIterLoader`` draws one dataset per batch: with ``run_length`` = batch size x ranks every
    batch holds one dataset, so a batch of short answers is not padded to a long caption. It must
    divide ``block_size``; 1 (the default) draws per sample.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        seed: int = 0,
        block_size: int = 4096,
        shuffle: bool = True,
        run_length: int = 1,
    ) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(
                f"need one weight per dataset, got {len(sizes)} sizes and {len(weights)} weights"
            )
        probabilities = np.asarray(weights, dtype=np.float64)
        if (probabilities < 0).any() or probabilities.sum() <= 0:
            raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {list(weights)}")
        for index, (size, weight) in enumerate(zip(sizes, weights)):
            if weight > 0 and size <= 0:
                raise ValueError(f"dataset #{index} has weight {weight} but no samples")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if run_length <= 0 or block_size % run_length:
            raise ValueError(f"run_length must be positive and divide block_size {block_size}, got {run_length}")
        self.run_length = int(run_length)
        self.sizes = [int(s) for s in sizes]
        self.probabilities = probabilities / probabilities.sum()
        self._cdf = np.cumsum(self.probabilities)
        self.seed = int(seed)
        self.block_size = int(block_size)
        self.shuffle = shuffle
        # _prefix_counts[b][d]: how many draws of dataset d happened before block b.
        self._prefix_counts: list[np.ndarray] = [np.zeros(len(self.sizes), dtype=np.int64)]
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._permutations = [
            FeistelPermutation(size, key=(self.seed, d, 0x5A17)) if size > 0 else None
            for d, size in enumerate(self.sizes)
        ]

    @property
    def num_datasets(self) -> int:
        return len(self.sizes)

    def _block_datasets(self, block: int) -> np.ndarray:
        """Dataset choices of one block: inverse-CDF sampling of uniforms seeded by (seed, block), one
        uniform per run of ``run_length`` positions."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, block, 0x4D1C])))
        uniforms = rng.random(self.block_size // self.run_length)
        chosen = np.searchsorted(self._cdf, uniforms * self._cdf[-1], side="right")
        return np.repeat(np.minimum(chosen, self.num_datasets - 1), self.run_length)

    def _counts_before(self, block: int) -> np.ndarray:
        while len(self._prefix_counts) <= block:
            done = len(self._prefix_counts) - 1
            counts = np.bincount(self._block_datasets(done), minlength=self.num_datasets)
            self._prefix_counts.append(self._prefix_counts[done] + counts)
        return self._prefix_counts[block]

    def block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, sample indices) of every position in ``block``."""
        if block < 0:
            raise IndexError(f"negative block {block}")
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        datasets = self._block_datasets(block)
        before = self._counts_before(block)
        samples = np.empty(self.block_size, dtype=np.int64)
        for d in range(self.num_datasets):
            where = np.flatnonzero(datasets == d)
            if where.size == 0:
                continue
            occurrence = before[d] + np.arange(where.size, dtype=np.int64)
            epochs, offsets = np.divmod(occurrence, self.sizes[d])
            samples[where] = self._permutations[d](offsets, epochs) if self.shuffle else offsets
        self._blocks[block] = (datasets, samples)
        if len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return datasets, samples

    def __getitem__(self, position: int) -> tuple[int, int]:
        if position < 0:
            raise IndexError(f"negative stream position {position}")
        block, offset = divmod(int(position), self.block_size)
        datasets, samples = self.block(block)
        return int(datasets[offset]), int(samples[offset])

    def iter_positions(self, start: int, step: int = 1) -> Iterator[tuple[int, int, int]]:
        """Yield (dataset index, sample index, position) for positions start, start+step, ... forever."""
        if start < 0 or step <= 0:
            raise ValueError(f"need start >= 0 and step > 0, got start={start}, step={step}")
        position = start
        while True:
            block, offset = divmod(position, self.block_size)
            datasets, samples = self.block(block)
            while offset < self.block_size:
                yield int(datasets[offset]), int(samples[offset]), position
                offset += step
                position += step


def split_position(position: int, world_size: int, num_workers: int = 1) -> tuple[int, int]:
    """Which (rank, worker) owns global position ``position``.

    Global position ``p`` goes to rank ``p % world_size``; that rank's ``j``-th position
    (``j = p // world_size``) goes to worker ``j % num_workers``. Only needed by iterable-style
    loaders: :class:`MixtureSampler` runs in the main process and the DataLoader hands its indices
    to workers itself, which already gives each worker disjoint draws.
    """
    rank = position % world_size
    worker = (position // world_size) % num_workers
    return rank, worker


class MixtureSampler(Sampler):
    """Infinite sampler over the mixture for one rank, resumable from a global position.

    Yields ``(dataset_index, sample_index, position)`` for global positions ``position + rank``,
    ``position + rank + world_size``, ... Global batch ``k`` (all ranks together) is the stream's
    positions ``[k * B * W, (k + 1) * B * W)``, so after ``n`` optimizer steps exactly
    ``n * B * W * accumulation`` positions were consumed; :meth:`set_position` with that number
    resumes the identical stream. Prefetching by DataLoader workers does not move the position.
    """

    def __init__(self, stream: MixtureStream, rank: int = 0, world_size: int = 1, position: int = 0) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.stream = stream
        self.rank = rank
        self.world_size = world_size
        self.position = int(position)

    def set_position(self, consumed: int) -> None:
        """Start the next iteration after ``consumed`` globally consumed samples."""
        if consumed < 0:
            raise ValueError(f"consumed samples must be >= 0, got {consumed}")
        self.position = int(consumed)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return self.stream.iter_positions(self.position + self.rank, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.stream.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "position" not in state:
            raise KeyError(f"sampler state has no 'position' (keys: {sorted(state)})")
        seed = state.get("seed")
        if seed is not None and int(seed) != self.stream.seed:
            log.warning(
                "resuming the mixture with seed %d, but the checkpoint used seed %d: the data "
                "order will differ",
                self.stream.seed,
                int(seed),
            )
        self.set_position(int(state["position"]))
