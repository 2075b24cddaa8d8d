"""Frozen-feature cache: the frozen image encoder's outputs, computed once and read from disk afterwards.

With a frozen encoder and a deterministic image transform, the encoder output of an image never
changes, yet a training run recomputes it at every epoch; for InstructBLIP that is most of the compute
of a training step. This module stores the outputs (before ``ln_vision``, which trains) in
half precision in safetensors shards that are memory-mapped when read, and serves them to the model as
``image_features`` in place of ``pixel_values``.

Safety: a cache is keyed by

* the dataset (one folder per dataset),
* the encoder fingerprint: a hash of the encoder's class, configuration, compute precision and every
  weight, of the transform's parameters (its ``repr``) and of the storage precision; a different
  fingerprint is a different cache: stale caches of the same dataset are deleted and rebuilt, never
  read,
* each item's media: file paths with their size and modification time (and the clip range and frame
  count for videos), so an edited image file is a cache miss, not a stale hit.

Random transforms (``train_augment=True``: random crops) are refused: their output changes every draw.

Layout under ``cache_dir/<dataset>/<fingerprint[:20]>/``: ``meta.json`` (full fingerprint and what it
was made from), ``shard-<writer>-<n>.safetensors`` (one tensor ``features`` of shape (rows, N, D)) and
``index-<writer>.json`` (item key -> shard, first row, row count; or the reason a bad input was
skipped). Each writer (a process, a rank) writes its own files, so ranks build disjoint slices in
parallel and an interrupted build resumes where it stopped.

Entry points: :func:`cached_dataset` (one dataset) and :func:`enable_feature_cache` (an
:class:`~ibkit.data.datamodule.InstructionDataModule`); Lightning runs use
:class:`ibkit.training.callbacks.FeatureCacheCallback` (YAML), ahead of time ``ibkit data cache-features``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ibkit.data.dataset import InstructionDataset, MixtureDataset
from ibkit.data.sample import Sample
from ibkit.data.transforms import BadInputError
from ibkit.models.dtypes import HALF_DTYPES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORE_DTYPES = HALF_DTYPES  # the cache stores half precision only
DEFAULT_SHARD_BYTES = 1 << 30
# torchvision transforms whose output depends on a random draw
_RANDOM_TRANSFORMS = {
    "ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
    "GaussianBlur", "GaussianNoise", "ScaleJitter", "RandomShortestSize", "RandomResize",
}


class FeatureCacheError(RuntimeError):
    """The cache cannot be used as asked (random transform, missing entry, unusable settings)."""


# -- fingerprints ---------------------------------------------------------------------------------------
def _describe(value: Any) -> Any:
    """A JSON-able description of a config object (dataclass, dict, transformers config, plain value)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (dict, list, tuple, str, int, float, bool)) or value is None:
        return value
    return repr(value)


def encoder_description(encoder: nn.Module) -> dict[str, Any]:
    """What, besides its weights, decides an encoder's outputs: class, config, precision, input settings."""
    return {
        "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "config": _describe(getattr(encoder, "config", None)),
        "compute_dtype": str(getattr(encoder, "compute_dtype", None)),
        "width": getattr(encoder, "width", None),
        "image_size": getattr(encoder, "image_size", None),
    }


def weights_digest(module: nn.Module) -> str:
    """blake2b over every parameter and buffer (name, dtype, shape, bytes): any changed weight changes it."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        if tensor.device.type == "meta":
            raise FeatureCacheError(f"cannot fingerprint {name}: the encoder weights are not materialised (meta)")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def transform_description(transform: Callable) -> str:
    """The transform's parameters as text (torchvision's ``repr`` lists every size, mode, mean and std)."""
    text = repr(transform)
    if " at 0x" in text:
        log.warning(
            "the image transform %s has no parameter-listing repr: its cache is rebuilt in every new process", text
        )
    return text


def random_steps(transform: Any) -> list[str]:
    """Names of the random steps inside a (possibly nested) torchvision transform."""
    found = []
    name = type(transform).__name__
    if name.startswith("Random") or name in _RANDOM_TRANSFORMS:
        found.append(name)
    for child in getattr(transform, "transforms", None) or []:
        found += random_steps(child)
    return found


def feature_fingerprint(encoder: nn.Module, transform: Callable, dtype: torch.dtype, num_frames: int) -> dict:
    """``{"fingerprint": hex, ...parts}``: the identity of every feature an (encoder, transform) makes."""
    parts = {
        "format": FORMAT_VERSION,
        "encoder": encoder_description(encoder),
        "weights": weights_digest(encoder),
        "transform": transform_description(transform),
        "dtype": str(dtype).removeprefix("torch."),
        "num_frames": num_frames,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return {"fingerprint": hashlib.blake2b(blob, digest_size=20).hexdigest(), **parts}


def _file_identity(path: str) -> list:
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None, None]  # missing: the build records it as bad input
    return [path, stat.st_size, stat.st_mtime_ns]


def media_key(sample: Sample, num_frames: int) -> str:
    """The cache key of a sample's media: paths with size and mtime (and clip range and frames for video)."""
    if sample.video is not None:
        start, end = sample.extra.get("start"), sample.extra.get("end")
        return json.dumps({"video": _file_identity(sample.video), "frames": num_frames, "clip": [start, end]})
    if isinstance(sample.image, str):
        return json.dumps({"image": _file_identity(sample.image)})
    if isinstance(sample.image, (list, tuple)) and sample.image:
        return json.dumps({"images": [_file_identity(p) for p in sample.image]})
    return json.dumps({"none": sample.sample_id})


def default_store_dtype(encoder: nn.Module) -> torch.dtype:
    """bf16 when the encoder computes in bf16 (lossless); otherwise fp16 (more mantissa bits)."""
    compute = str(getattr(encoder, "compute_dtype", None) or "").lower()
    first = next(iter(encoder.parameters()), None)
    if compute in ("bf16", "bfloat16") or (first is not None and first.dtype == torch.bfloat16):
        return torch.bfloat16
    return torch.float16


def resolve_store_dtype(dtype: str | torch.dtype | None, encoder: nn.Module) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_store_dtype(encoder)
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16):
            raise FeatureCacheError(f"the feature cache stores half precision (float16/bfloat16), not {dtype}")
        return dtype
    if dtype not in STORE_DTYPES:
        raise FeatureCacheError(f"unknown cache dtype {dtype!r}; use one of {sorted(STORE_DTYPES)} or 'auto'")
    return STORE_DTYPES[dtype]


# -- the store ------------------------------------------------------------------------------------------
class FeatureStore:
    """Cached features of one dataset for one fingerprint: key -> tensor (frames, N, D).

    Opening a store whose folder holds another fingerprint (or caches of older fingerprints) deletes
    them: a mismatch always means rebuild. Reads are memory-mapped and safe in DataLoader workers
    (file handles are opened lazily per process).
    """

    def __init__(self, root: str | Path, dataset: str, identity: dict[str, Any]) -> None:
        self.dataset = dataset
        self.identity = dict(identity)
        self.fingerprint = str(identity["fingerprint"])
        self.dtype = STORE_DTYPES[str(identity["dtype"])]
        self.dataset_dir = Path(root) / _safe_name(dataset)
        self.directory = self.dataset_dir / self.fingerprint[:20]
        self.entries: dict[str, dict[str, Any]] = {}
        self._handles: dict[str, Any] = {}
        self._prepare()
        self.reload()

    def _prepare(self) -> None:
        if self.dataset_dir.is_dir():
            for other in self.dataset_dir.iterdir():
                if other.is_dir() and other.name != self.directory.name:
                    log.warning("%s: removing a feature cache made by another encoder/transform (%s)", self.dataset, other)
                    shutil.rmtree(other, ignore_errors=True)
        meta_file = self.directory / "meta.json"
        if meta_file.exists():
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, json.JSONDecodeError):
                meta = {}
            if meta.get("fingerprint") != self.fingerprint:
                log.warning("%s: feature cache %s has another fingerprint; rebuilding it", self.dataset, self.directory)
                shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not meta_file.exists():
            _atomic_write(meta_file, json.dumps({**self.identity, "dataset": self.dataset}, indent=1, default=str))

    def reload(self) -> None:
        """Re-read every writer's index (after other processes or ranks added entries)."""
        entries: dict[str, dict[str, Any]] = {}
        for index_file in sorted(self.directory.glob("index-*.json")):
            try:
                entries.update(json.loads(index_file.read_text()))
            except (OSError, json.JSONDecodeError) as error:
                raise FeatureCacheError(f"{index_file}: unreadable cache index ({error}); delete {self.directory}") from error
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys not in the store, sorted and without duplicates (every rank gets the same list)."""
        return sorted({k for k in keys if k not in self.entries})

    def get(self, key: str) -> torch.Tensor:
        """Features (frames, N, D) in the storage dtype; raises :class:`BadInputError` for recorded bad input."""
        entry = self.entries.get(key)
        if entry is None:
            raise FeatureCacheError(
                f"{self.dataset}: no cached features for {key} in {self.directory} (the file changed after "
                "the cache was built, or it was not built: run `ibkit data cache-features` again)"
            )
        if "bad" in entry:
            reason, path, detail = entry["bad"]
            raise BadInputError(reason, path, detail)
        handle = self._handles.get(entry["shard"])
        if handle is None:
            handle = safe_open(str(self.directory / entry["shard"]), framework="pt")
            self._handles[entry["shard"]] = handle
        start = int(entry["row"])
        return handle.get_slice("features")[start : start + int(entry["rows"])]

    def writer(self, name: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> FeatureWriter:
        return FeatureWriter(self, name or f"{int(time.time() * 1000)}-{os.getpid()}", shard_bytes)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross into DataLoader worker processes
        return state


class FeatureWriter:
    """Appends features to a store in shards of about ``shard_bytes``; each flush is durable (resumable)."""

    def __init__(self, store: FeatureStore, name: str, shard_bytes: int) -> None:
        self.store = store
        self.name = _safe_name(name)
        self.shard_bytes = shard_bytes
        self.index: dict[str, dict[str, Any]] = {}
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.shards = 0

    def add(self, key: str, features: torch.Tensor) -> None:
        """Store (frames, N, D) features for ``key`` (converted to the store's half precision)."""
        stored = features.detach().to("cpu", self.store.dtype).contiguous()
        if not torch.isfinite(stored).all():
            raise FeatureCacheError(
                f"{self.store.dataset}: features of {key} are not finite in {self.store.dtype} "
                f"(encoder output range {features.float().abs().max().item():.3g}); use dtype='bfloat16'"
            )
        if self.pending and stored.shape[1:] != self.pending[0][1].shape[1:]:
            self.flush()  # one shard holds one token shape (e.g. another image size)
        self.pending.append((key, stored))
        self.pending_bytes += stored.numel() * stored.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def add_bad(self, key: str, error: BadInputError) -> None:
        """Remember that ``key`` is bad input, so readers skip it exactly as the uncached dataset would."""
        self.index[key] = {"bad": [error.reason, error.path, error.detail]}

    def flush(self) -> None:
        if self.pending:
            shard = f"shard-{self.name}-{self.shards:05d}.safetensors"
            tensor = torch.cat([t for _, t in self.pending])
            tmp = self.store.directory / (shard + ".tmp")
            save_file({"features": tensor}, str(tmp), metadata={"fingerprint": self.store.fingerprint})
            tmp.replace(self.store.directory / shard)
            row = 0
            for key, t in self.pending:
                self.index[key] = {"shard": shard, "row": row, "rows": int(t.shape[0])}
                row += int(t.shape[0])
            self.shards += 1
            self.pending, self.pending_bytes = [], 0
        if self.index:
            _atomic_write(self.store.directory / f"index-{self.name}.json", json.dumps(self.index))

    def close(self) -> None:
        self.flush()
        self.store.reload()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "dataset"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- building a dataset's cache ---------------------------------------------------------------------------
class _MediaItems(torch.utils.data.Dataset):
    """(key, pixels | BadInputError) for the first sample of each missing key, through the dataset's own loader."""

    def __init__(self, dataset: InstructionDataset, keys: Sequence[str], samples: dict[str, Sample]) -> None:
        self.dataset, self.keys, self.samples = dataset, list(keys), samples

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        key = self.keys[index]
        try:
            return key, self.dataset._load_media(self.samples[key])
        except BadInputError as error:
            return key, error


def _first(items: list) -> Any:
    return items[0]


def check_deterministic(transform: Callable, where: str) -> None:
    steps = random_steps(transform)
    if steps:
        raise FeatureCacheError(
            f"{where}: the image transform is random ({', '.join(steps)}): its encoder features change at every "
            "draw and cannot be cached. Train with the deterministic transform (data.train_augment: false) or "
            "turn the feature cache off."
        )


@torch.inference_mode()
def build_features(
    dataset: InstructionDataset,
    encoder: nn.Module,
    store: FeatureStore,
    batch_size: int = 32,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> int:
    """Encode this rank's share of the dataset's media missing from ``store``; returns how many were added.

    The media go through the dataset's own loader and transform, the encoder through its own forward
    (its ``compute_dtype``) under inference mode, in batches of ``batch_size`` frames.
    """
    samples: dict[str, Sample] = {}
    for sample in dataset.samples:
        samples.setdefault(media_key(sample, dataset.num_frames), sample)
    todo = store.missing(samples)[rank::world_size]
    if not todo:
        return 0
    device = next(iter(encoder.parameters())).device
    loader = torch.utils.data.DataLoader(
        _MediaItems(dataset, todo, samples), batch_size=1, num_workers=num_workers, collate_fn=_first
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"caching {dataset.name} features", unit="item", disable=not progress)
    was_training = encoder.training
    encoder.eval()
    with store.writer(f"{int(time.time() * 1000)}-{os.getpid()}-r{rank}", shard_bytes) as writer:
        batch: list[tuple[str, torch.Tensor]] = []

        def run() -> None:
            frames = [p if p.dim() == 4 else p[None] for _, p in batch]
            pixels = torch.cat(frames).to(device)
            features = encoder(pixels)
            row = 0
            for (key, _), f in zip(batch, frames):
                writer.add(key, features[row : row + f.shape[0]])
                row += f.shape[0]
            bar.update(len(batch))
            batch.clear()

        for key, media in loader:
            if isinstance(media, BadInputError):
                writer.add_bad(key, media)
                bar.update(1)
                continue
            if batch and (
                sum(p.shape[0] if p.dim() == 4 else 1 for _, p in batch) >= batch_size
                or media.shape[-3:] != batch[0][1].shape[-3:]
            ):
                run()
            batch.append((key, media))
        if batch:
            run()
    encoder.train(was_training)
    bar.close()
    return len(todo)


class CachedFeatureDataset(InstructionDataset):
    """An :class:`InstructionDataset` whose media come from a :class:`FeatureStore`.

    Items carry ``image_features`` ((N, D), or (T, N, D) for videos and multi-image records) instead of
    ``pixel_values``; instruction templates, retries of bad input and skip records are unchanged.
    Collate with :class:`FeatureCollator`.
    """

    store: FeatureStore

    @classmethod
    def wrap(cls, dataset: InstructionDataset, store: FeatureStore) -> CachedFeatureDataset:
        if isinstance(dataset, CachedFeatureDataset):
            dataset = dataset.uncached
        wrapped = cls.__new__(cls)
        wrapped.__dict__.update(dataset.__dict__)
        wrapped.store = store
        wrapped.uncached = dataset
        return wrapped

    def _load_media(self, sample: Sample) -> torch.Tensor:
        features = self.store.get(media_key(sample, self.num_frames))
        single_image = sample.video is None and isinstance(sample.image, str)
        return features[0] if single_image else features

    def get(self, index: int, position: int | None = None) -> dict[str, Any]:
        item = super().get(index, position)
        item["image_features"] = item.pop("pixel_values")
        return item


class FeatureCollator:
    """Wraps a collator so that items' ``image_features`` are batched (as the model's ``image_features``)."""

    def __init__(self, collator: Callable[[list], dict[str, Any]]) -> None:
        self.collator = collator

    def __getattr__(self, name: str) -> Any:  # tokenizers, mode, ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        moved = [
            {**item, "pixel_values": item["image_features"]} if item is not None and "image_features" in item else item
            for item in items
        ]
        batch = self.collator(moved)
        if "pixel_values" in batch:
            batch["image_features"] = batch.pop("pixel_values")
        return batch


def open_store(
    dataset: InstructionDataset, encoder: nn.Module, cache_dir: str | Path, dtype: str | torch.dtype | None = "auto"
) -> FeatureStore:
    """The store of ``dataset`` for this encoder and the dataset's transform (refuses random transforms)."""
    check_deterministic(dataset.transform, dataset.name)
    store_dtype = resolve_store_dtype(dtype, encoder)
    identity = feature_fingerprint(encoder, dataset.transform, store_dtype, dataset.num_frames)
    return FeatureStore(cache_dir, dataset.name, identity)


def cached_dataset(
    dataset: InstructionDataset,
    encoder: nn.Module,
    cache_dir: str | Path,
    dtype: str | torch.dtype | None = "auto",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> CachedFeatureDataset:
    """Build what is missing of ``dataset``'s cache (single process) and return the cached dataset."""
    store = open_store(dataset, encoder, cache_dir, dtype)
    build_features(dataset, encoder, store, batch_size=batch_size, num_workers=num_workers, progress=progress)
    return CachedFeatureDataset.wrap(dataset, store)


# -- datamodule / Lightning integration -------------------------------------------------------------------
def _datamodule_datasets(datamodule: Any, stages: Sequence[str]) -> list[tuple[str, list, int]]:
    """(role, container list, index) of every dataset of the datamodule the stages use."""
    found = []
    train = getattr(datamodule, "train_dataset", None)
    if "fit" in stages and isinstance(train, MixtureDataset):
        if getattr(datamodule, "train_augment", False):
            raise FeatureCacheError(
                f"{type(datamodule).__name__}: train_augment=True draws random crops, so training images have no "
                "fixed encoder features to cache. Set data.train_augment: false to train from cached features, "
                "or remove the feature cache."
            )
        found += [("train", train.datasets, i) for i in range(len(train.datasets))]
    evals = getattr(datamodule, "eval_datasets", None)
    if evals and set(stages) & {"fit", "validate", "test", "predict"}:
        found += [("eval", evals, i) for i in range(len(evals))]
    return found


def enable_feature_cache(
    datamodule: Any,
    encoder: nn.Module,
    cache_dir: str | Path,
    stages: Sequence[str] = ("fit", "validate", "test", "predict"),
    dtype: str | torch.dtype | None = "auto",
    batch_size: int = 32,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> int:
    """Serve ``image_features`` from the cache for every dataset of a set-up datamodule.

    Builds what is missing (each rank its slice, then ``barrier``), swaps the datasets for
    :class:`CachedFeatureDataset` and wraps the datamodule's collators in :class:`FeatureCollator`.
    Returns the number of items encoded. Call after ``datamodule.setup(...)`` and before loaders exist.
    """
    if not hasattr(datamodule, "_collator"):
        raise FeatureCacheError(
            f"{type(datamodule).__name__} has no _collator(mode) to wrap; the feature cache supports "
            "ibkit.data.datamodule.InstructionDataModule"
        )
    targets = _datamodule_datasets(datamodule, stages)
    stores = []
    added = 0
    for _, container, i in targets:
        dataset = container[i]
        base = dataset.uncached if isinstance(dataset, CachedFeatureDataset) else dataset
        store = open_store(base, encoder, cache_dir, dtype)
        added += build_features(base, encoder, store, batch_size, num_workers, rank, world_size, progress)
        stores.append((container, i, base, store))
    if barrier is not None:
        barrier()
    for container, i, base, store in stores:
        store.reload()
        container[i] = CachedFeatureDataset.wrap(base, store)
    if not getattr(datamodule, "_feature_cache_collator", False):
        plain = datamodule._collator

        def collator(mode: str) -> FeatureCollator:
            return FeatureCollator(plain(mode))

        datamodule._collator = collator
        datamodule._feature_cache_collator = True
    return added
