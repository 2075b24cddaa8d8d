"""Bookkeeping for malformed annotation records.

Real annotation dumps contain the odd broken record; one bad line should not kill a week-long run,
but it must not vanish silently either. Readers report every skipped record here; the counter logs
one summary per dataset, and ``strict=True`` turns the first bad record into an error that names the
file and the record.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> bool:
    """Log ``message`` as a warning the first time ``key`` is seen in this process; True when logged.

    For facts about the data root that hold for every read (a missing optional file), so that a
    reader called once per split, per worker or per evaluation does not repeat itself.
    """
    if key in _WARNED:
        return False
    _WARNED.add(key)
    logger.warning(message)
    return True


class MalformedRecordError(ValueError):
    """A record in an annotation file lacks a field or has one of the wrong type."""


class SkipCounter:
    """Counts skipped records per (dataset, reason); raises instead when strict."""

    def __init__(self, dataset: str, strict: bool = False, max_examples: int = 3) -> None:
        self.dataset = dataset
        self.strict = strict
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def skip(self, file: str | Path, record: object, reason: str) -> None:
        """Record that ``record`` (an index or id) of ``file`` was skipped because of ``reason``."""
        where = f"{self.dataset}: {file}: record {record}: {reason}"
        if self.strict:
            raise MalformedRecordError(where)
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{file}: record {record}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason, with the first few offending records."""
        if not self.counts:
            return f"{self.dataset}: no records skipped"
        lines = [f"{self.dataset}: skipped {self.total} malformed record(s)"]
        for reason, count in self.counts.most_common():
            lines.append(f"  {count} x {reason} (e.g. {'; '.join(self.examples[reason])})")
        return "\n".join(lines)

    def log_summary(self) -> None:
        if self.counts:
            logger.warning(self.summary())
