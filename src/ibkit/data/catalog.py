"""What datasets exist and which ones a data root holds (``ibkit data list`` / ``ibkit data check``).

``check`` answers the first question of every new user ("did I put the files where ibkit looks?"):
per dataset and split it says found (with the sample count, read from the annotations without
opening a single image), missing (with the exact paths expected and the dataset's whole expected
layout), or error (unreadable file). With media options it also decodes every referenced image and
video (:mod:`ibkit.data.media_check`) and counts the missing, empty, unreadable and truncated ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ibkit.data.errors import SkipCounter
from ibkit.data.layout import layout_lines
from ibkit.data.media_check import MediaCheckOptions, MediaReport, check_media, format_media_report
from ibkit.data.registry import (
    MEDIA_ROLES,
    DatasetSpec,
    annotation_sources,
    get_spec,
    list_specs,
    load_samples,
    resolve_paths,
)


def dataset_rows(suite: str | None = "instructblip") -> list[dict[str, str]]:
    """One row per dataset: name, family, held-in/out, metric, eval mode, modality, splits."""
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "split": "held-in" if spec.held_in else "held-out",
            "metric": spec.metric,
            "eval": spec.eval_mode,
            "modality": spec.modality,
            "splits": ",".join(spec.splits),
        }
        for spec in list_specs(suite)
    ]


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no datasets)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() for row in rows]
    return "\n".join(lines)


@dataclass
class SplitCheck:
    split: str
    status: str  # "found" | "missing" | "error"
    count: int | None = None
    skipped: int = 0
    missing: list[Path] = field(default_factory=list)
    error: str | None = None
    sources: list[Path] = field(default_factory=list)  # the annotation files read
    media: MediaReport | None = None  # when the media were checked


@dataclass
class DatasetCheck:
    name: str
    held_in: bool
    splits: list[SplitCheck]
    media: dict[str, Path]
    media_found: dict[str, bool]
    layout: list[str] = field(default_factory=list)  # the expected files, absolute under the root

    @property
    def media_clean(self) -> bool:
        """No split's media check found a bad file (True when none was checked)."""
        return all(split.media is None or split.media.clean for split in self.splits)

    @property
    def media_missing(self) -> bool:
        """A media folder, or a media file the annotations name, is not where the layout says."""
        return not all(self.media_found.values()) or any(
            split.media is not None and split.media.counts()["missing"] for split in self.splits
        )

    @property
    def status(self) -> str:
        """found (every split), missing (no split), partial, or error."""
        statuses = {split.status for split in self.splits}
        if "error" in statuses:
            return "error"
        if statuses == {"found"}:
            return "found"
        return "missing" if "found" not in statuses else "partial"


def check_dataset(
    spec: DatasetSpec,
    root: Path,
    overrides: dict[str, str] | None = None,
    media: MediaCheckOptions | None = None,
) -> DatasetCheck:
    """One dataset's splits under ``root``; ``media`` options also decode each found split's media."""
    paths = resolve_paths(spec, root, overrides)
    results = []
    for split in spec.splits:
        sources, missing = annotation_sources(spec, split, paths)
        if missing:
            results.append(SplitCheck(split, "missing", missing=[p for options in missing for p in options]))
            continue
        skips = SkipCounter(spec.name)
        try:
            samples = load_samples(spec.name, root, split, overrides=overrides, skips=skips)
        except Exception as error:  # report every broken file instead of stopping at the first
            results.append(SplitCheck(split, "error", error=f"{type(error).__name__}: {error}"))
            continue
        source = sources if spec.alternatives else []  # say which file where a split has a choice
        report = check_media(samples, spec.name, split, media) if media is not None else None
        results.append(SplitCheck(split, "found", count=len(samples), skipped=skips.total, sources=source,
                                  media=report))
    folders = {role: paths[role] for role in MEDIA_ROLES if role in paths}
    return DatasetCheck(
        spec.name, spec.held_in, results, folders, {role: p.is_dir() for role, p in folders.items()},
        layout=layout_lines(spec, root, overrides),
    )


def check_root(
    root: Path,
    names: list[str] | None = None,
    suite: str | None = "instructblip",
    overrides: dict[str, dict[str, str]] | None = None,
    media: MediaCheckOptions | None = None,
) -> list[DatasetCheck]:
    """Check ``names`` (default: every dataset of ``suite``) under ``root``; ``media``: decode the media too."""
    specs = [get_spec(name) for name in names] if names else list_specs(suite)
    overrides = overrides or {}
    return [check_dataset(spec, Path(root), overrides.get(spec.name), media) for spec in specs]


def format_check(results: list[DatasetCheck], show: int = 3, named: bool = False) -> str:
    """The report: per dataset its status, per split found/missing/error (and the media check's
    counts with the first ``show`` paths of each kind), and the expected layout when media are missing
    or, for datasets the user ``named``, any file is (a whole root usually holds few of the 26)."""
    lines = []
    for result in results:
        lines.append(f"{result.name} [{'held-in' if result.held_in else 'held-out'}]: {result.status}")
        for split in result.splits:
            if split.status == "found":
                skipped = f", {split.skipped} malformed record(s) skipped" if split.skipped else ""
                source = f" (from {', '.join(str(p) for p in split.sources)})" if split.sources else ""
                lines.append(f"  {split.split}: found, {split.count} samples{skipped}{source}")
            elif split.status == "missing":
                lines.append(f"  {split.split}: missing " + ", ".join(str(path) for path in split.missing))
            else:
                lines.append(f"  {split.split}: error {split.error}")
            if split.media is not None:
                lines += format_media_report(split.media, show, indent="  ")
        for role, path in result.media.items():
            if not result.media_found[role]:
                lines.append(f"  {role}: folder not found: {path}")
        annotations_missing = any(split.status == "missing" for split in result.splits)
        if (named and annotations_missing) or (result.media_missing and (named or result.status != "missing")):
            lines.append("  expected layout:")
            lines += [f"    {line}" for line in result.layout]
    found = sum(result.status == "found" for result in results)
    partial = sum(result.status == "partial" for result in results)
    lines.append(
        f"{found} found, {partial} partial, {len(results) - found - partial} missing or broken "
        f"(of {len(results)})"
    )
    if not named and any(result.status == "missing" for result in results):
        lines.append("where each dataset's files go: ibkit data list --layout (or docs/data.md)")
    checked = [split.media for result in results for split in result.splits if split.media is not None]
    if checked:
        bad = sum(len(report.problems) for report in checked)
        files = sum(report.checked for report in checked)
        lines.append(f"media: {files} file(s) checked, {bad} bad" if bad else f"media: {files} file(s) checked, all decode")
    return "\n".join(lines)

