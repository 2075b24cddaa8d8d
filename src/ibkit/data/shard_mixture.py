"""Shard streams in the training mixture: the datamodule's ``shards`` entries as datasets, and the
mixture stream that numbers their draws per slot (rank x DataLoader worker) so a resumed run continues
exactly where it stopped. The stream itself: :mod:`ibkit.data.shards`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ibkit.data.sampler import MixtureStream
from ibkit.data.shards import ShardCaptionDataset, ShardStream
from ibkit.data.templates import TEMPLATES
from ibkit.data.transforms import ImageTransform

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ in the mixture
class SlottedMixtureStream(MixtureStream):
    """The training mixture where streamed datasets' draws are numbered per slot.

    Position ``p`` belongs to rank ``p % W``; that rank's local draw ``q = p // W`` falls in batch
    ``q // B``, which the DataLoader hands to worker ``batch % workers``: that is the slot
    ``rank * workers + worker``. A streamed dataset's draw at ``p`` is its ``k``-th draw on that slot,
    returned as sample index ``k * num_slots + slot`` (what :class:`ShardCaptionDataset` decodes).
    Everything stays a pure function of the position, so resuming from a position needs no state.
    Map-style datasets keep :class:`MixtureStream`'s indices.
    """

    _CHECKPOINT_EVERY = 256  # blocks between stored per-slot counts (memory: num_slots ints each)

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        *,
        streamed: Sequence[int],
        world_size: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        block_size: int = 4096,
        shuffle: bool = True,
        run_length: int = 1,
    ) -> None:
        super().__init__(sizes, weights, seed=seed, block_size=block_size, shuffle=shuffle, run_length=run_length)
        if world_size <= 0 or batch_size <= 0 or num_workers < 0:
            raise ValueError(
                f"invalid world_size {world_size}, batch_size {batch_size}, workers {num_workers}"
            )
        self.streamed = sorted(int(d) for d in streamed)
        self.world_size, self.batch_size = int(world_size), int(batch_size)
        self.workers = max(1, int(num_workers))  # 0 workers: the main process is the rank's one slot
        self.num_slots = self.world_size * self.workers
        self._row = np.full(self.num_datasets, -1, dtype=np.int64)
        self._row[self.streamed] = np.arange(len(self.streamed))
        empty = np.zeros((len(self.streamed), self.num_slots), dtype=np.int64)
        self._slot_checkpoints: dict[int, np.ndarray] = {0: empty}
        self._slot_last: tuple[int, np.ndarray] = (0, empty)
        self._slotted: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def slot_of(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        rank, local = positions % self.world_size, positions // self.world_size
        return rank * self.workers + (local // self.batch_size) % self.workers

    def _positions(self, block: int) -> np.ndarray:
        return block * self.block_size + np.arange(self.block_size, dtype=np.int64)

    def _slot_counts(self, block: int) -> np.ndarray:
        datasets = self._block_datasets(block)
        rows = self._row[datasets]
        keep = rows >= 0
        keys = rows[keep] * self.num_slots + self.slot_of(self._positions(block))[keep]
        counts = np.bincount(keys, minlength=len(self.streamed) * self.num_slots)
        return counts.reshape(len(self.streamed), self.num_slots)

    def _slot_counts_before(self, block: int) -> np.ndarray:
        start = max(b for b in self._slot_checkpoints if b <= block)
        counts = self._slot_checkpoints[start]
        if start < self._slot_last[0] <= block:
            start, counts = self._slot_last
        counts = counts.copy()
        for b in range(start, block):
            counts += self._slot_counts(b)
            if (b + 1) % self._CHECKPOINT_EVERY == 0:
                self._slot_checkpoints[b + 1] = counts.copy()
        self._slot_last = (block, counts.copy())
        return counts

    def block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        if block in self._slotted:
            self._slotted.move_to_end(block)
            return self._slotted[block]
        datasets, samples = super().block(block)
        samples = samples.copy()
        slots = self.slot_of(self._positions(block))
        before = self._slot_counts_before(block)
        for d in self.streamed:
            where = np.flatnonzero(datasets == d)
            if where.size == 0:
                continue
            slot = slots[where]
            order = np.argsort(slot, kind="stable")
            ranked = slot[order]
            within = np.empty(where.size, dtype=np.int64)
            within[order] = np.arange(where.size) - np.searchsorted(ranked, ranked, side="left")
            samples[where] = (before[self._row[d], slot] + within) * self.num_slots + slot
        self._slotted[block] = (datasets, samples)
        if len(self._slotted) > 4:
            self._slotted.popitem(last=False)
        return datasets, samples


SHARD_OPTIONS = ("urls", "buffer_size", "shuffle_shards", "template_set", "caption_key")


def shard_dataset(
    name: str, config: str | Sequence[str] | Mapping[str, Any], transform: ImageTransform, **kwargs: Any
) -> ShardCaptionDataset:
    """A mixture dataset from a datamodule ``shards`` entry: a pattern, a list, or ``{urls: ..., ...}``.

    ``kwargs`` (seed, strict, max_retries) come from the datamodule; the entry may set ``buffer_size``
    (default 0), ``shuffle_shards`` (True), ``template_set`` ("caption"; null for an empty instruction)
    and ``caption_key`` ("txt").
    """
    options = dict(config) if isinstance(config, Mapping) else {"urls": config}
    unknown = sorted(set(options) - set(SHARD_OPTIONS))
    if unknown or "urls" not in options:
        raise ValueError(
            f"shards entry {name!r}: needs 'urls', may set {SHARD_OPTIONS[1:]}; got {sorted(options)}"
        )
    template_set = options.get("template_set", "caption")
    if template_set is not None and template_set not in TEMPLATES:
        raise ValueError(f"shards entry {name!r}: unknown template_set {template_set!r}")
    stream = ShardStream.from_patterns(
        options["urls"],
        seed=kwargs.get("seed", 0),
        shuffle_shards=bool(options.get("shuffle_shards", True)),
        buffer_size=int(options.get("buffer_size", 0)),
    )
    log.info("%s: %d samples in %d shards", name, stream.total, len(stream.urls))
    return ShardCaptionDataset(
        stream,
        transform,
        name=name,
        template_set=template_set,
        caption_key=options.get("caption_key", "txt"),
        **kwargs,
    )


def training_stream(
    datasets: Sequence[Any],
    weights: Sequence[float],
    *,
    seed: int,
    block_size: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    one_dataset_per_batch: bool = False,
) -> MixtureStream:
    """The mixture stream for these datasets: plain, or slotted when some are shard streams.

    ``one_dataset_per_batch``: every global batch (``batch_size`` x ``world_size`` consecutive positions)
    draws from one dataset; ``block_size`` is then rounded up to a multiple of that."""
    streamed = [i for i, dataset in enumerate(datasets) if isinstance(dataset, ShardCaptionDataset)]
    sizes = [len(dataset) for dataset in datasets]
    run_length = batch_size * world_size if one_dataset_per_batch else 1
    block_size = -(-block_size // run_length) * run_length
    if not streamed:
        return MixtureStream(sizes, weights, seed=seed, block_size=block_size, run_length=run_length)
    stream = SlottedMixtureStream(
        sizes,
        weights,
        streamed=streamed,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        block_size=block_size,
        run_length=run_length,
    )
    for i in streamed:
        datasets[i].num_slots = stream.num_slots
    return stream
