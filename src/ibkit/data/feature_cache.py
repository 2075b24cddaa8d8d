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
* each item's media: the files' real paths (symbolic links resolved) with their size and modification time
  (and the clip range and frame count for videos), so an edited image file is a cache miss, not a stale hit,
  and one image reached through two links (two workspaces linking one image folder) is cached once.

Random transforms (``train_augment=True``: random crops) are refused: their output changes every draw.

The files (one folder per dataset and fingerprint, one set of shards and index per writer) are
:class:`~ibkit.data.feature_store.FeatureStore`'s; this module decides what is cached under which key,
builds the missing entries and serves them to a dataset or a datamodule.

Entry points: :func:`cached_dataset` (one dataset) and :func:`enable_feature_cache` (an
:class:`~ibkit.data.datamodule.InstructionDataModule`); Lightning runs use
:class:`ibkit.training.callbacks.FeatureCacheCallback` (YAML), ahead of time ``ibkit data cache-features``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ibkit.data.dataset import InstructionDataset, MixtureDataset
from ibkit.data.feature_store import DEFAULT_SHARD_BYTES, STORE_DTYPES, FeatureCacheError, FeatureStore
from ibkit.data.sample import Sample
from ibkit.data.transforms import BadInputError

log = logging.getLogger(__name__)

# in the fingerprint, so a cache of an older format is replaced, not read or kept beside the new one.
# 2: media keys name the real file (links resolved); version 1 keyed the path as given.
FORMAT_VERSION = 2
# torchvision transforms whose output depends on a random draw
_RANDOM_TRANSFORMS = {
    "ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
    "GaussianBlur", "GaussianNoise", "ScaleJitter", "RandomShortestSize", "RandomResize",
}


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
    """[real path, size, mtime]: the file a link resolves to, so that links to one file share its entry."""
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return [path, None, None]  # missing: the build records it as bad input
    return [real, stat.st_size, stat.st_mtime_ns]


def media_key(sample: Sample, num_frames: int) -> str:
    """The cache key of a sample's media: real paths with size and mtime (and clip range and frames for video)."""
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
    # its own generator: a loader draws its workers' base seed from the global RNG otherwise, and a run
    # that built its cache would then draw other dropout masks than one that found it built
    loader = torch.utils.data.DataLoader(
        _MediaItems(dataset, todo, samples), batch_size=1, num_workers=num_workers, collate_fn=_first,
        generator=torch.Generator().manual_seed(0),
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
        streamed = [getattr(d, "name", type(d).__name__) for d in train.datasets if not isinstance(d, InstructionDataset)]
        if streamed:
            raise FeatureCacheError(
                f"{type(datamodule).__name__}: the streamed training sources {streamed} (data.shards) have no fixed "
                "list of images to cache; remove the feature cache or train on map-style datasets only"
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
