"""Opening every image and video a split references before a run needs them.

Annotation files can be complete while the media folder is not: images in the wrong sub-folder,
zero-byte downloads, cut-off JPEGs. The loaders meet those only when training reaches the item,
hours in. :func:`check_media` decodes each distinct media file once, through the same loaders the
dataset uses (``load_image``: a full decode, so truncation shows; ``load_video_frames``: the frames
the loader would take), and sorts the failures by their :class:`BadInputError` reason into
missing / empty / unreadable / truncated. ``ibkit data check --media`` prints the result and strict
runs call :func:`require_clean_media` in the datamodule's ``setup``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from ibkit.data.sample import Sample
from ibkit.data.transforms import BadInputError, load_image
from ibkit.data.video import load_video_frames

PROBLEM_KINDS = ("missing", "empty", "unreadable", "truncated")
_KIND_OF_REASON = {
    "missing_file": "missing",
    "truncated_image": "truncated",
    "too_few_frames": "truncated",  # fewer frames than the loader takes: a cut-off or too-short clip
}


@dataclass(frozen=True)
class MediaFile:
    """One file (a video: one clip of it) as the loader opens it, and the first record that needs it."""

    path: str
    video: bool
    record: str
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class MediaProblem:
    kind: str  # one of PROBLEM_KINDS
    path: str
    record: str
    reason: str  # the loader's BadInputError reason (missing_file, truncated_image, ...)
    detail: str


@dataclass(frozen=True)
class MediaCheckOptions:
    """How much to check: a seeded ``fraction`` of each split's distinct files, ``num_frames`` per video
    (the datamodule's), ``workers`` decoding threads, a tqdm bar on stderr when ``progress``."""

    fraction: float = 1.0
    seed: int = 0
    num_frames: int = 4
    workers: int = 4
    progress: bool = False


@dataclass
class MediaReport:
    """What checking one split's media found: ``checked`` of ``total`` distinct files, and the bad ones."""

    dataset: str
    split: str
    total: int
    checked: int
    problems: list[MediaProblem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        return {kind: sum(p.kind == kind for p in self.problems) for kind in PROBLEM_KINDS}

    def first(self, kind: str, limit: int = 3) -> list[MediaProblem]:
        return [p for p in self.problems if p.kind == kind][:limit]


def media_files(samples: Iterable[Sample]) -> list[MediaFile]:
    """The distinct media the samples reference, in first-use order (many questions share one image)."""
    seen: dict[tuple, MediaFile] = {}
    for sample in samples:
        if sample.video is not None:
            start, end = sample.extra.get("start"), sample.extra.get("end")
            key: tuple = (sample.video, start, end)
            if key not in seen:
                seen[key] = MediaFile(sample.video, True, str(sample.sample_id), start, end)
            continue
        images = [sample.image] if isinstance(sample.image, str) else list(sample.image or [])
        for image in images:
            if (image, None, None) not in seen:
                seen[(image, None, None)] = MediaFile(image, False, str(sample.sample_id))
    return list(seen.values())


def problem_kind(error: BadInputError) -> str:
    """The check's category of a loader failure (a video whose stream ends early counts as truncated)."""
    if error.reason in _KIND_OF_REASON:
        return _KIND_OF_REASON[error.reason]
    if error.reason == "unreadable_video" and (
        "End of file" in error.detail or "decoding failed after" in error.detail
    ):
        return "truncated"
    return "unreadable"


def check_file(item: MediaFile, num_frames: int = 4) -> MediaProblem | None:
    """Decode ``item`` as the dataset would; the problem, or None when it loads."""
    path = Path(item.path)
    if not path.is_file():
        what = "video" if item.video else "image"
        return MediaProblem("missing", item.path, item.record, "missing_file", f"{what} file not found")
    if path.stat().st_size == 0:
        return MediaProblem("empty", item.path, item.record, "empty_file", "zero-byte file")
    try:
        if item.video:
            load_video_frames(path, num_frames, item.start, item.end)
        else:
            load_image(path)
    except BadInputError as error:
        return MediaProblem(problem_kind(error), item.path, item.record, error.reason, error.detail)
    return None


def select(items: Sequence[MediaFile], fraction: float, seed: int, label: str) -> list[MediaFile]:
    """A seeded ``fraction`` of ``items`` (at least one), in their order; all of them for fraction 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the media sample fraction must be in (0, 1], got {fraction}")
    if fraction == 1 or not items:
        return list(items)
    count = max(1, math.ceil(fraction * len(items)))
    keep = sorted(random.Random(f"{seed}:{label}").sample(range(len(items)), count))
    return [items[i] for i in keep]


def check_media(
    samples: Sequence[Sample],
    dataset: str,
    split: str,
    options: MediaCheckOptions | None = None,
) -> MediaReport:
    """Decode the media of one split (a seeded fraction of its distinct files); the bad ones by kind.

    Threads decode in parallel (PIL and PyAV release the GIL while decoding).
    """
    options = options or MediaCheckOptions()
    items = media_files(samples)
    chosen = select(items, options.fraction, options.seed, f"{dataset}:{split}")
    bar = None
    if options.progress and chosen:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), desc=f"{dataset}/{split} media", unit="file", leave=False)

    def one(item: MediaFile) -> MediaProblem | None:
        result = check_file(item, options.num_frames)
        if bar is not None:
            bar.update()
        return result

    try:
        if options.workers > 1 and len(chosen) > 1:
            with ThreadPoolExecutor(max_workers=options.workers) as pool:
                results = list(pool.map(one, chosen))
        else:
            results = [one(item) for item in chosen]
    finally:
        if bar is not None:
            bar.close()
    return MediaReport(dataset, split, len(items), len(chosen), [r for r in results if r is not None])


def format_media_report(report: MediaReport, show: int = 3, indent: str = "  ") -> list[str]:
    """``split media: N of M files checked, clean`` or the counts per kind and the first ``show`` paths."""
    if report.total == 0:
        return [f"{indent}{report.split} media: none referenced"]
    if report.checked < report.total:
        head = (
            f"{report.checked} of {report.total} files checked (a {report.checked / report.total:.0%} sample)"
        )
    else:
        head = f"{report.total} file{'s' * (report.total != 1)}"
    head = f"{indent}{report.split} media: {head}"
    if report.clean:
        return [head + ", all decode"]
    counts = report.counts()
    lines = [head + ": " + ", ".join(f"{counts[kind]} {kind}" for kind in PROBLEM_KINDS)]
    for kind in PROBLEM_KINDS:
        for problem in report.first(kind, show):
            lines.append(
                f"{indent}  {kind}: {problem.path} (record {problem.record}; {problem.reason}: {problem.detail})"
            )
        if counts[kind] > show:
            lines.append(f"{indent}  ... and {counts[kind] - show} more {kind}")
    return lines


def require_clean_media(
    datasets: Iterable[tuple[str, str, Sequence[Sample]]],
    options: MediaCheckOptions | None = None,
    progress: bool = False,
) -> list[MediaReport]:
    """Strict runs: check every (name, split, samples) set, then raise naming the first bad file, its
    dataset and record, with the counts of all (so one failed start lists everything to fix).

    Under DDP every rank checks the same files and so fails alike: no rank is left waiting in a collective.
    """
    options = replace(
        options or MediaCheckOptions(), progress=progress or (options is not None and options.progress)
    )
    reports = [check_media(samples, name, split, options) for name, split, samples in datasets]
    bad = [report for report in reports if not report.clean]
    if bad:
        first = bad[0].problems[0]
        summary = "; ".join(
            f"{r.dataset}: " + ", ".join(f"{n} {kind}" for kind, n in r.counts().items() if n) for r in bad
        )
        raise BadInputError(
            first.reason,
            first.path,
            f"{bad[0].dataset} ({bad[0].split}) record {first.record!r}: {first.kind}: {first.detail} "
            f"(the strict media check before the first step found {summary}; `ibkit data check --media` lists them)",
        )
    return reports
