"""What datasets exist and which ones a data root holds (``ibkit data list`` / ``ibkit data check``).

``check`` answers the first question of every new user ("did I put the files where ibkit looks?"):
per dataset and split it says found (with the sample count, read from the annotations without
opening a single image), missing (with the exact paths expected), or error (unreadable file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ibkit.data.errors import SkipCounter
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


@dataclass
class DatasetCheck:
    name: str
    held_in: bool
    splits: list[SplitCheck]
    media: dict[str, Path]
    media_found: dict[str, bool]

    @property
    def status(self) -> str:
        """found (every split), missing (no split), partial, or error."""
        statuses = {split.status for split in self.splits}
        if "error" in statuses:
            return "error"
        if statuses == {"found"}:
            return "found"
        return "missing" if "found" not in statuses else "partial"


def check_dataset(spec: DatasetSpec, root: Path, overrides: dict[str, str] | None = None) -> DatasetCheck:
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
        results.append(SplitCheck(split, "found", count=len(samples), skipped=skips.total, sources=source))
    media = {role: paths[role] for role in MEDIA_ROLES if role in paths}
    return DatasetCheck(
        spec.name, spec.held_in, results, media, {role: p.is_dir() for role, p in media.items()}
    )


def check_root(
    root: Path,
    names: list[str] | None = None,
    suite: str | None = "instructblip",
    overrides: dict[str, dict[str, str]] | None = None,
) -> list[DatasetCheck]:
    """Check ``names`` (default: every dataset of ``suite``) under ``root``."""
    specs = [get_spec(name) for name in names] if names else list_specs(suite)
    overrides = overrides or {}
    return [check_dataset(spec, Path(root), overrides.get(spec.name)) for spec in specs]


def format_check(results: list[DatasetCheck]) -> str:
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
        for role, path in result.media.items():
            if not result.media_found[role]:
                lines.append(f"  {role}: folder not found: {path}")
    found = sum(result.status == "found" for result in results)
    partial = sum(result.status == "partial" for result in results)
    lines.append(
        f"{found} found, {partial} partial, {len(results) - found - partial} missing or broken "
        f"(of {len(results)})"
    )
    return "\n".join(lines)

