"""Training curves for the demo's figures (:mod:`ibkit.shapes.report`) and ``notebooks/results.ipynb``:
``(step, loss)`` pairs read from Lightning's ``CSVLogger`` (``metrics.csv`` with a ``step`` column and one
column per logged key), and the check of such curves."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Curve = list[tuple[int, float]]


# ----------------------------------------------------------------------------------------------- reading


def find_metrics_csv(path: str | Path) -> Path:
    """``path`` itself if it is a file, else the newest ``metrics.csv`` below it (``version_N`` folders)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.rglob("metrics.csv"), key=lambda p: (p.stat().st_mtime, str(p)))
        if found:
            return found[-1]
        raise FileNotFoundError(
            f"{path}: no metrics.csv in this folder or below it (Lightning's CSVLogger writes one)"
        )
    raise FileNotFoundError(f"{path}: no such file or folder (expected a CSVLogger metrics.csv)")


def read_loss_curve(path: str | Path, column: str = "train/loss", step_column: str = "step") -> Curve:
    """``(step, value)`` pairs of ``column`` from a CSVLogger ``metrics.csv`` (or a folder holding one).

    Rows where ``column`` is empty (validation rows, other keys logged at another step) are skipped.
    """
    file = find_metrics_csv(path)
    with open(file, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for wanted in (step_column, column):
            if wanted not in columns:
                raise ValueError(f"{file}: no {wanted!r} column (columns: {', '.join(columns) or 'none'})")
        curve: Curve = []
        for line, row in enumerate(reader, start=2):
            raw = (row.get(column) or "").strip()
            if not raw:
                continue
            try:
                value = float(raw)
                step = int(float(row[step_column]))
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"{file} line {line}: {step_column!r}={row.get(step_column)!r}, {column!r}={raw!r} "
                    "are not numbers"
                ) from error
            curve.append((step, value))
    return curve


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_curves(curves: Any) -> None:
    if not isinstance(curves, Mapping):
        raise ValueError(f"curves must map stage -> [(step, loss), ...], got {type(curves).__name__}")
    for stage, points in curves.items():
        if not isinstance(points, Sequence) or isinstance(points, str):
            raise ValueError(f"curves[{stage!r}] must be a list of (step, loss) pairs")
        for index, point in enumerate(points):
            if not (isinstance(point, Sequence) and len(point) == 2 and all(_is_number(v) for v in point)):
                raise ValueError(
                    f"curves[{stage!r}][{index}] must be a (step, loss) pair of numbers, got {point!r}"
                )


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value with up to ``window - 1`` values before it: a curve logged from batches of
    different tasks (a caption's loss beside a one-word answer's) is readable only smoothed."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out

