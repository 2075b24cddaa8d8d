"""The feature cache's files: :class:`FeatureStore` reads one dataset's cached encoder features for one
fingerprint, :class:`FeatureWriter` appends to it.

Layout under ``cache_dir/<dataset>/<fingerprint[:20]>/``: ``meta.json`` (full fingerprint and what it
was made from), ``shard-<writer>-<n>.safetensors`` (one tensor ``features`` of shape (rows, N, D)) and
``index-<writer>.json`` (item key -> shard, first row, row count; or the reason a bad input was
skipped). Each writer (a process, a rank) writes its own files, so ranks build disjoint slices in
parallel and an interrupted build resumes where it stopped.

What a key and a fingerprint are, and how a cache is built and used: :mod:`ibkit.data.feature_cache`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import socket
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ibkit.data.transforms import BadInputError
from ibkit.models.dtypes import HALF_DTYPES

log = logging.getLogger(__name__)

STORE_DTYPES = HALF_DTYPES  # the cache stores half precision only
DEFAULT_SHARD_BYTES = 1 << 30


class FeatureCacheError(RuntimeError):
    """The cache cannot be used as asked (random transform, missing entry, unusable settings)."""


# -- the store ------------------------------------------------------------------------------------------
class FeatureStore:
    """Cached features of one dataset for one fingerprint: key -> tensor (frames, N, D).

    Opening a store whose folder holds another fingerprint (or caches of older fingerprints) deletes
    them (a mismatch always means rebuild), except a fingerprint that a live store still reads: each open
    store leaves a lease file (host and pid) in its folder until it is garbage-collected or its process
    exits, so two runs with different encoders on one ``cache_dir`` at the same time keep each other's
    features (a lease of a dead process on this host does not count; one from another host always does).
    Opening is serialised per dataset folder (``flock`` on its ``.lock``), so no opener deletes a folder
    whose lease is about to be written.
    Reads are memory-mapped and safe in DataLoader workers (file handles are opened lazily per process).
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
        self.dataset_dir.mkdir(parents=True, exist_ok=True)
        with _folder_lock(self.dataset_dir):  # one opener at a time: nobody deletes a folder whose lease is on its way
            self._open_folder()

    def _open_folder(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lease = _take_lease(self.directory)
        if self._lease is not None:
            weakref.finalize(self, _release_lease, self._lease)
        for other in self.dataset_dir.iterdir():
            if not other.is_dir() or other.name == self.directory.name:
                continue
            holders = _live_leases(other)
            if holders:
                log.warning("%s: keeping the feature cache %s of another encoder/transform: %s still read(s) it; "
                            "it is removed by the first open after they finish", self.dataset, other, ", ".join(holders))
                continue
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
                for stale in self.directory.iterdir():
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    elif stale != self._lease:
                        stale.unlink(missing_ok=True)
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
        return state  # a worker's copy holds no lease of its own: the opener's covers it


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


# -- leases: which stores are open where ----------------------------------------------------------------
LEASE_PREFIX = ".in-use-"
_LEASE_NUMBERS = itertools.count()  # one process may open a store several times: one lease each


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` (POSIX ``flock``) for opening a store; none where the folder is
    read-only or the platform has no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, only the leases
        yield
        return
    try:
        handle = open(folder / ".lock", "a")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _take_lease(directory: Path) -> Path | None:
    """The lease file of a newly opened store; None where the folder is read-only (a shared, prebuilt cache:
    reading it needs no lease, and whoever may delete it is not stopped by one)."""
    lease = directory / f"{LEASE_PREFIX}{_safe_name(socket.gethostname())}-{os.getpid()}-{next(_LEASE_NUMBERS)}"
    try:
        lease.touch()
    except OSError as error:
        log.warning("%s: cannot leave a lease file (%s); other encoders' runs may delete this cache while it is read",
                    directory, error)
        return None
    return lease


def _release_lease(lease: Path) -> None:
    lease.unlink(missing_ok=True)


def _live_leases(directory: Path) -> list[str]:
    """'host pid N' of each lease in ``directory`` whose holder may still run; removes those of dead processes."""
    host = _safe_name(socket.gethostname())
    holders = []
    for lease in directory.glob(f"{LEASE_PREFIX}*"):
        lease_host, _, rest = lease.name[len(LEASE_PREFIX):].rpartition("-")[0].rpartition("-")
        pid = int(rest) if rest.isdigit() else -1
        if lease_host == host and pid > 0 and not process_alive(pid):
            with contextlib.suppress(OSError):  # a read-only folder: the dead lease stays, and still does not count
                lease.unlink(missing_ok=True)
            continue
        holders.append(f"{lease_host} pid {pid}")
    return holders


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists (signal 0 only asks; another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "dataset"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
