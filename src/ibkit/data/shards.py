"""img2dataset's webdataset shards as a streaming training source that mixes with the registry's datasets.

BLIP-2 pre-trains on ~129M web images, kept as img2dataset output: tar shards of ``KEY.jpg`` +
``KEY.txt`` (the caption) + ``KEY.json`` (metadata), with an ``NNNNN_stats.json`` per shard. The
``webdataset`` library streams the tars (local paths, brace patterns, any fsspec URL); this module decides
which process reads which shard, and where a resumed run continues.

The stream is cut into *slots*, one per (rank, DataLoader worker). In epoch ``e`` the shards are permuted
by a generator seeded with (seed, e), and slot ``s`` of ``S`` reads shards ``s, s + S, ...`` of that
order, each from start to end, through an optional shuffle buffer seeded by (seed, epoch, shard) and
emptied at the shard's end. Entry ``k`` of a slot is therefore a pure function of (seed, S, k, shard
sizes); the sizes come from img2dataset's stats files (or one counting pass). A resumed reader opens the
shard that holds entry ``k`` and streams up to it without decoding: at most one shard is read twice.

Resume guarantee: exact to the sample, with or without the shuffle buffer, when the shard list, their
sizes, the seed and the number of slots (world size x workers) are unchanged. With another number of
slots the shards are split differently: the run continues as a run with that many slots would have,
so within the current epoch some samples repeat and others are missed (a warning says so).

Every tar sample keeps its place in the stream even when it is bad (no image, no or empty caption,
undecodable image, a tar that ends before its declared size): in the training mixture the draw that
hits it moves on to the slot's next entries, as map-style datasets do, and each bad entry is counted;
``strict=True`` raises instead, naming the shard and the key.

Finding and reading the shard files is :mod:`ibkit.data.shard_files`; the datamodule's ``shards`` entries
and the slotted training mixture are :mod:`ibkit.data.shard_mixture`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from webdataset.filters import shuffle as buffer_shuffle

from ibkit.data.errors import SkipCounter
from ibkit.data.sample import Sample
from ibkit.data.shard_files import IMAGE_KEYS, expand_shard_urls, read_shard, shard_sizes
from ibkit.data.templates import fill_instruction, template_rng
from ibkit.data.transforms import BadInputError, ImageTransform, decode_image

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the stream
@dataclass
class ShardEntry:
    """One place in a slot's stream: a tar sample, or the reason the tar had none there."""

    url: str
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)  # member suffix -> content
    problem: str | None = None


@dataclass(frozen=True)
class ShardCursor:
    """Where entry ``index`` of a slot lies: epoch, position in the slot's shard list, shard, offset."""

    epoch: int
    position: int
    shard: int
    offset: int


class ShardStream:
    """The deterministic, slot-split order of a list of shards (see the module docstring).

    Args:
        urls: shard URLs (see :func:`expand_shard_urls`).
        sizes: samples per shard (:func:`shard_sizes`); a shard with fewer samples than declared is
            padded with bad entries, extra samples are ignored, empty shards are dropped.
        seed: shard order per epoch and shuffle buffers derive from it.
        shuffle_shards: permute the shards every epoch (else file order every epoch).
        buffer_size: in-shard shuffle buffer (webdataset's), 0 for tar order.
    """

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Sequence[int],
        *,
        seed: int = 0,
        shuffle_shards: bool = True,
        buffer_size: int = 0,
    ) -> None:
        if len(urls) != len(sizes):
            raise ValueError(f"need one size per shard, got {len(urls)} shards and {len(sizes)} sizes")
        empty = [url for url, size in zip(urls, sizes) if size <= 0]
        if empty:
            log.warning("dropping %d empty shard(s), e.g. %s", len(empty), empty[0])
        kept = [(url, int(size)) for url, size in zip(urls, sizes) if size > 0]
        if not kept:
            raise ValueError(f"no samples in {len(urls)} shard(s)")
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}")
        self.urls = [url for url, _ in kept]
        self.sizes = np.asarray([size for _, size in kept], dtype=np.int64)
        self.seed = int(seed)
        self.shuffle_shards = shuffle_shards
        self.buffer_size = int(buffer_size)

    @classmethod
    def from_patterns(cls, patterns: str | Sequence[str], **kwargs: Any) -> ShardStream:
        urls = expand_shard_urls(patterns)
        return cls(urls, shard_sizes(urls), **kwargs)

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    def shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle_shards:
            return np.arange(len(self.urls))
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, 0x5EA2D])))
        return rng.permutation(len(self.urls))

    def slot_shards(self, slot: int, num_slots: int, epoch: int) -> np.ndarray:
        """Shard indices slot ``slot`` of ``num_slots`` reads in ``epoch``, in order."""
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} outside [0, {num_slots})")
        if num_slots > len(self.urls):
            raise ValueError(
                f"{len(self.urls)} shard(s) cannot feed {num_slots} slots (ranks x loader workers): "
                "write more, smaller shards or use fewer workers"
            )
        return self.shard_order(epoch)[slot::num_slots]

    def locate(self, slot: int, num_slots: int, index: int) -> ShardCursor:
        """The cursor of entry ``index`` of a slot's stream (epochs follow each other without end)."""
        if index < 0:
            raise IndexError(f"negative stream index {index}")
        epoch, remaining = 0, int(index)
        while True:
            shards = self.slot_shards(slot, num_slots, epoch)
            ends = np.cumsum(self.sizes[shards])
            if remaining < ends[-1]:
                position = int(np.searchsorted(ends, remaining, side="right"))
                start = int(ends[position - 1]) if position else 0
                return ShardCursor(epoch, position, int(shards[position]), remaining - start)
            remaining -= int(ends[-1])
            epoch += 1

    def shard_entries(self, shard: int, epoch: int) -> Iterator[ShardEntry]:
        """Exactly ``sizes[shard]`` entries of one shard, in tar or seeded buffer order."""
        url, size = self.urls[shard], int(self.sizes[shard])
        problems: list[str] = []
        raw_samples = read_shard(url, problems)
        samples: Iterator[dict[str, Any]] = raw_samples
        if self.buffer_size > 1:
            rng = random.Random(f"{self.seed}:{epoch}:{shard}")
            samples = buffer_shuffle(self.buffer_size, initial=self.buffer_size, rng=rng)(raw_samples)
        produced = 0
        try:
            for raw in samples:
                if produced == size:
                    break  # more samples than the stats declared: positions stay those of the stats
                fields = {k: v for k, v in raw.items() if not k.startswith("__")}
                yield ShardEntry(url, str(raw["__key__"]), fields)
                produced += 1
        finally:
            raw_samples.close()  # closes the tar stream at once, also when the reader stops early
        if produced < size:
            why = problems[0] if problems else f"the shard ended after {produced} of {size} declared samples"
            for missing in range(produced, size):
                yield ShardEntry(url, f"#{missing}", problem=why)

    def entries(
        self, slot: int, num_slots: int, start: int = 0, epochs: int | None = None
    ) -> Iterator[ShardEntry]:
        """Slot ``slot``'s entries from index ``start`` on; ``epochs`` stops after that many epochs."""
        cursor = self.locate(slot, num_slots, start)
        epoch, position, skip = cursor.epoch, cursor.position, cursor.offset
        while epochs is None or epoch < epochs:
            shards = self.slot_shards(slot, num_slots, epoch)
            for shard in shards[position:]:
                entries = self.shard_entries(int(shard), epoch)
                for _ in range(skip):  # the resumed shard: stream to the offset, decoding nothing
                    next(entries)
                skip = 0
                yield from entries
            epoch, position = epoch + 1, 0


def entry_sample(
    name: str, entry: ShardEntry, image_keys: Sequence[str] = IMAGE_KEYS, caption_key: str = "txt"
) -> Sample:
    """A training Sample (caption as target, encoded image in ``extra["image_bytes"]``) or BadInputError."""
    where = f"key {entry.key}"
    if entry.problem is not None:
        raise BadInputError("broken_shard", entry.url, f"{where}: {entry.problem}")
    image_key = next((k for k in image_keys if k in entry.fields), None)
    if image_key is None:
        raise BadInputError("missing_image", entry.url, f"{where}: no {'/'.join(image_keys)} member")
    if caption_key not in entry.fields:
        raise BadInputError("missing_caption", entry.url, f"{where}: no .{caption_key} member")
    try:
        caption = entry.fields[caption_key].decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadInputError(
            "malformed_record", entry.url, f"{where}: caption is not UTF-8 ({error})"
        ) from error
    if not caption:
        raise BadInputError("empty_caption", entry.url, f"{where}: the caption is empty")
    extra: dict[str, Any] = {"image_bytes": entry.fields[image_key], "shard": entry.url, "key": entry.key}
    if "json" in entry.fields:  # informative only: a broken .json does not make the sample unusable
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            extra["metadata"] = json.loads(entry.fields["json"])
    return Sample(
        name,
        entry.key,
        image=f"{entry.url}#{entry.key}.{image_key}",
        answers=[caption],
        target=caption,
        extra=extra,
    )


class _SlotReader:
    """Sequential access to one slot's entries with a small window of recent ones (for retries)."""

    def __init__(self, stream: ShardStream, slot: int, num_slots: int, window: int) -> None:
        self.stream, self.slot, self.num_slots, self.window = stream, slot, num_slots, window
        self._entries: Iterator[ShardEntry] | None = None
        self._next = 0
        self._recent: OrderedDict[int, ShardEntry] = OrderedDict()

    def get(self, index: int) -> ShardEntry:
        if index in self._recent:
            return self._recent[index]
        if self._entries is None or index < self._next or index > self._next + self.window:
            self._entries = self.stream.entries(self.slot, self.num_slots, start=index)
            self._next = index
            self._recent.clear()
        while self._next <= index:
            self._recent[self._next] = next(self._entries)
            self._next += 1
            if len(self._recent) > self.window:
                self._recent.popitem(last=False)
        return self._recent[index]


# ------------------------------------------------------------------------------------------ as a source
def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank or 0, world_size or 1


class ShardSamples(IterableDataset):
    """The shards as a standalone stream of :class:`Sample` for this rank and DataLoader worker.

    Slot = ``rank * workers + worker`` of ``world_size * workers`` (rank/world size as given, else from
    torch.distributed; the worker from ``get_worker_info``). Images stay encoded in
    ``sample.extra["image_bytes"]`` (decode with :func:`~ibkit.data.transforms.decode_image`); bad
    entries are skipped and counted in ``skips`` (per process), or raise when strict.

    Resuming: :meth:`state_dict` holds, per slot, the index after the last sample handed out in this
    process; with DataLoader workers the main process does not see that, so pass consumed samples to
    :meth:`record` (each sample carries ``extra["stream"] = (slot, num_slots, index)``). A resumed
    stream starts right after the last recorded sample: nothing repeats or goes missing (bad entries
    between that sample and the interruption are read, and counted, again).
    ``epochs`` ends the stream after that many epochs per slot (None: endless).
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        name: str = "shards",
        rank: int | None = None,
        world_size: int | None = None,
        epochs: int | None = None,
        strict: bool = False,
        image_keys: Sequence[str] = IMAGE_KEYS,
        caption_key: str = "txt",
    ) -> None:
        self.stream = stream
        self.name = name
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        self.image_keys, self.caption_key = tuple(image_keys), caption_key
        self.skips = SkipCounter(name, strict=strict)
        self.num_slots: int | None = None
        self.next_index: dict[int, int] = {}

    def slot(self) -> tuple[int, int]:
        """(slot, number of slots) of the calling process."""
        rank, world_size = _rank_world(self.rank, self.world_size)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker, world_size * workers

    def _check_slots(self, num_slots: int) -> None:
        if self.num_slots is not None and self.num_slots != num_slots and self.next_index:
            log.warning(
                "%s: the stream state is for %d slots, this run has %d (ranks x workers): shards are split "
                "anew, so this epoch may repeat or miss samples",
                self.name,
                self.num_slots,
                num_slots,
            )
            self.next_index = {}
        self.num_slots = num_slots

    def __iter__(self) -> Iterator[Sample]:
        slot, num_slots = self.slot()
        self._check_slots(num_slots)
        index = self.next_index.get(slot, 0)
        for entry in self.stream.entries(slot, num_slots, start=index, epochs=self.epochs):
            index += 1
            try:
                sample = entry_sample(self.name, entry, self.image_keys, self.caption_key)
            except BadInputError as error:
                self.skips.skip(entry.url, f"key {entry.key}", f"{error.reason}: {error.detail}")
                continue
            sample.extra["stream"] = (slot, num_slots, index - 1)
            self.next_index[slot] = index
            yield sample

    def record(self, sample: Sample) -> None:
        """Mark ``sample`` (from any worker) as consumed, for :meth:`state_dict`."""
        slot, num_slots, index = sample.extra["stream"]
        self._check_slots(num_slots)
        self.next_index[slot] = max(self.next_index.get(slot, 0), index + 1)

    def state_dict(self) -> dict[str, Any]:
        cursors = {}
        for slot, index in self.next_index.items():
            cursor = self.stream.locate(slot, self.num_slots or 1, index)
            cursors[slot] = [cursor.epoch, self.stream.urls[cursor.shard], cursor.offset]
        return {
            "seed": self.stream.seed,
            "num_slots": self.num_slots,
            "next_index": dict(self.next_index),
            "cursors": cursors,  # (epoch, shard, offset) of each slot's next entry, for people
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("seed", self.stream.seed)) != self.stream.seed:
            log.warning(
                "%s: resuming with seed %d, the state used %s", self.name, self.stream.seed, state["seed"]
            )
        self.num_slots = state.get("num_slots")
        self.next_index = {int(slot): int(index) for slot, index in state.get("next_index", {}).items()}


class ShardCaptionDataset(Dataset):
    """The shard stream as one dataset of the training mixture (what :class:`MixtureDataset` indexes).

    Index ``i`` is entry ``i // num_slots`` of slot ``i % num_slots``; :class:`~ibkit.data.shard_mixture.SlottedMixtureStream`
    hands each slot's draws out in order, so every worker reads its own shards sequentially. Items are
    those of :class:`~ibkit.data.dataset.InstructionDataset` (template and crop seeded by (seed, name,
    index, position)); a bad entry is replaced by the slot's following ones (``max_retries``), each
    counted as a skip record, or raises in strict mode. ``len()`` is the number of samples (the
    mixture's weight); ``template_set=None`` trains with an empty instruction (BLIP-2 pre-training).
    """

    def __init__(
        self,
        stream: ShardStream,
        transform: ImageTransform,
        *,
        name: str,
        template_set: str | None = "caption",
        seed: int = 0,
        strict: bool = False,
        max_retries: int = 8,
        image_keys: Sequence[str] = IMAGE_KEYS,
        caption_key: str = "txt",
    ) -> None:
        self.stream = stream
        self.transform = transform
        self.name = name
        self.template_set = template_set
        self.seed = seed
        self.strict = strict
        self.max_retries = max_retries
        self.image_keys, self.caption_key = tuple(image_keys), caption_key
        self.num_slots = 1  # world size x loader workers, set by shard_mixture.training_stream()
        self._readers: dict[tuple[int, int], _SlotReader] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}  # open tar streams stay in the process that opened them
        return state

    def __len__(self) -> int:
        return self.stream.total

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def _entry(self, slot: int, index: int) -> ShardEntry:
        reader = self._readers.get((slot, self.num_slots))
        if reader is None:
            reader = _SlotReader(self.stream, slot, self.num_slots, window=2 * (self.max_retries + 1))
            self._readers[(slot, self.num_slots)] = reader
        return reader.get(index)

    def _prepare(self, entry: ShardEntry, index: int, position: int | None) -> dict[str, Any]:
        sample = entry_sample(self.name, entry, self.image_keys, self.caption_key)
        rng = template_rng(self.seed, self.name, index, -1 if position is None else position)
        if self.template_set is not None:
            sample = fill_instruction(sample, self.template_set, rng)
        else:
            sample = replace(sample, instruction="")
        image = decode_image(sample.extra["image_bytes"], str(sample.image))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))  # a resumed run draws the same crop
            pixel_values = self.transform(image)
        return {
            "pixel_values": pixel_values,
            "instruction": sample.instruction,
            "target": sample.target,
            "sample_id": sample.sample_id,
            "dataset": sample.dataset,
            "answers": list(sample.answers),
            "candidates": None,
            "label": None,
        }

    def get(self, index: int, position: int | None = None) -> dict[str, Any]:
        """Draw ``index`` (entry ``index // num_slots`` of slot ``index % num_slots``)."""
        if index < 0:
            raise IndexError(f"{self.name}: negative index {index}")
        slot, entry_index = index % self.num_slots, index // self.num_slots
        skipped: list[tuple[str, str, str | None, str]] = []
        first_key = ""
        for attempt in range(self.max_retries + 1):
            entry = self._entry(slot, entry_index + attempt)
            first_key = first_key or entry.key
            try:
                item = self._prepare(entry, (entry_index + attempt) * self.num_slots + slot, position)
            except BadInputError as error:
                if self.strict:
                    raise BadInputError(
                        error.reason,
                        entry.url,
                        f"{self.name}: shard {entry.url}, key {entry.key}: {error.detail}",
                    ) from error
                skipped.append((self.name, error.reason, entry.url, entry.key))
                continue
            item["skipped"] = skipped
            return item
        return {"pixel_values": None, "sample_id": first_key, "dataset": self.name, "skipped": skipped}
