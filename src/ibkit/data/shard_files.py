"""img2dataset's shard files: expanding shard patterns to URLs, their sizes, and reading a tar's samples.

Local paths, brace patterns (``{00000..00099}.tar``), globs and any fsspec URL are accepted; a shard's
size comes from img2dataset's ``NNNNN_stats.json`` next to it, or from one counting pass.
How the shards become a resumable stream: :mod:`ibkit.data.shards`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB = re.compile(r"[*?\[]")


# ------------------------------------------------------------------------------------------ shard lists
def expand_shard_urls(patterns: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns (``shards/{00000..00099}.tar``), globs, folders or plain URLs.

    A URL ending in ``.tar`` is a shard; one with ``*``/``?``/``[`` is globbed (fsspec, any filesystem);
    anything else is a folder whose ``*.tar`` files are the shards. Order: as written, globs sorted.
    """
    urls: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        for url in expand_urls(pattern):
            if url.startswith("pipe:") or (url.endswith(SHARD_SUFFIXES) and not _GLOB.search(url)):
                urls.append(url)
                continue
            glob = url if _GLOB.search(url) else url.rstrip("/") + "/*.tar"
            found = _glob(glob)
            if not found:
                raise FileNotFoundError(f"no shards match {glob!r} (from {pattern!r})")
            urls.extend(found)
    if not urls:
        raise ValueError(f"no shard URLs in {patterns!r}")
    return urls


def _glob(pattern: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(pattern)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return sorted(path if local else fs.unstrip_protocol(path) for path in fs.glob(path))


def _open(url: str) -> Any:
    return gopen(url) if url.startswith("pipe:") else fsspec.open(url, "rb").open()


def stats_url(url: str) -> str:
    """img2dataset's stats file of a shard: ``00042.tar`` -> ``00042_stats.json``."""
    for suffix in SHARD_SUFFIXES:
        if url.endswith(suffix):
            return url[: -len(suffix)] + "_stats.json"
    return url + "_stats.json"


def _declared_size(url: str) -> int | None:
    if url.startswith("pipe:"):
        return None
    try:
        with fsspec.open(stats_url(url), "rt") as handle:
            return int(json.load(handle)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_shard(url: str, problems: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard (``{"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}``).

    webdataset reads the tar; an unopenable or broken tar ends the shard early and its error is
    appended to ``problems`` (the caller decides whether that is a skip or an error).
    """
    problems = problems if problems is not None else []

    def stop(error: Exception) -> bool:
        problems.append(f"{type(error).__name__}: {error.args[0] if error.args else error}")
        return False  # after a broken member the tar stream position is unknown: end the shard

    try:
        stream = _open(url)
    except OSError as error:
        stop(error)
        return
    try:
        members = tar_file_expander([{"url": url, "stream": stream}], handler=stop)
        yield from group_by_keys(members, handler=stop)
    finally:
        stream.close()


def shard_sizes(urls: Sequence[str], threads: int = 16) -> list[int]:
    """Samples per shard: img2dataset's ``successes`` from the stats files, else counted by reading."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        declared = list(pool.map(_declared_size, urls))
    missing = [i for i, size in enumerate(declared) if size is None]
    if missing:
        log.warning(
            "%d of %d shards have no img2dataset stats file (e.g. %s): counting their samples by reading them",
            len(missing),
            len(urls),
            stats_url(urls[missing[0]]),
        )
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(missing)))) as pool:
            counted = list(pool.map(lambda i: sum(1 for _ in read_shard(urls[i])), missing))
        for i, count in zip(missing, counted):
            declared[i] = count
    return [int(size) for size in declared]  # type: ignore[arg-type]
