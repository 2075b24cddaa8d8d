"""Figures and tables for the demo and ``notebooks/results.ipynb``: training curves and held-out metrics.

The demo's ``results.json`` holds ``{"stage1": {dataset: {metric: value}}, "stage2": {...},
"chance": {dataset: value}, "ablations": {name: {dataset: {"mean": v, "std": s}}}}`` (``ablations``
optional; any ``stage<N>`` key is a stage). Training curves come from Lightning's ``CSVLogger``
(``metrics.csv`` with a ``step`` column and one column per logged key).

Figures are drawn on a bare ``Figure`` with the Agg canvas, never through ``pyplot``: no window opens,
no global backend changes, and a notebook's inline backend is left alone.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Curve = list[tuple[int, float]]

STAGE_KEY = re.compile(r"^stage(\d+)$")
CHANCE_KEY = "chance"
ABLATIONS_KEY = "ablations"


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


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a demo ``results.json`` and check its layout; errors name the file and the field."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
        check_results(results)
    except ValueError as error:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"{path}: {error}") from error
    return results


# -------------------------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stage_names(results: Mapping[str, Any]) -> list[str]:
    """The ``stage<N>`` keys of ``results`` in numeric order."""
    stages = [key for key in results if STAGE_KEY.match(str(key))]
    return sorted(stages, key=lambda key: int(STAGE_KEY.match(key).group(1)))


def check_results(results: Any) -> None:
    """Raise ``ValueError`` naming the first field that does not follow the documented layout."""
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    for stage in stage_names(results):
        datasets = results[stage]
        if not isinstance(datasets, Mapping):
            raise ValueError(f"results[{stage!r}] must map dataset -> {{metric: value}}")
        for dataset, metrics in datasets.items():
            if not isinstance(metrics, Mapping) or not metrics:
                raise ValueError(
                    f"results[{stage!r}][{dataset!r}] must be a non-empty {{metric: value}} dict"
                )
            for metric, value in metrics.items():
                if not _is_number(value):
                    raise ValueError(
                        f"results[{stage!r}][{dataset!r}][{metric!r}] must be a number, got {value!r}"
                    )
    chance = results.get(CHANCE_KEY, {})
    if not isinstance(chance, Mapping):
        raise ValueError(f"results[{CHANCE_KEY!r}] must map dataset -> value")
    for dataset, value in chance.items():
        if not _is_number(value):
            raise ValueError(f"results[{CHANCE_KEY!r}][{dataset!r}] must be a number, got {value!r}")
    ablations = results.get(ABLATIONS_KEY, {})
    if not isinstance(ablations, Mapping):
        raise ValueError(f"results[{ABLATIONS_KEY!r}] must map name -> {{dataset: {{'mean', 'std'}}}}")
    reserved = {"dataset", "metric", CHANCE_KEY, *stage_names(results)}
    for name, datasets in ablations.items():
        if name in reserved:
            raise ValueError(
                f"results[{ABLATIONS_KEY!r}]: an ablation may not be called {name!r} (a table column)"
            )
        if not isinstance(datasets, Mapping):
            raise ValueError(f"results[{ABLATIONS_KEY!r}][{name!r}] must map dataset -> {{'mean', 'std'}}")
        for dataset, stats in datasets.items():
            where = f"results[{ABLATIONS_KEY!r}][{name!r}][{dataset!r}]"
            if not isinstance(stats, Mapping) or not _is_number(stats.get("mean")):
                raise ValueError(f"{where} must be {{'mean': number, 'std': number}}, got {stats!r}")
            if "std" in stats and not _is_number(stats["std"]):
                raise ValueError(f"{where}['std'] must be a number, got {stats['std']!r}")


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


# ------------------------------------------------------------------------------------------------ tables


def primary_metrics(results: Mapping[str, Any]) -> dict[str, str]:
    """dataset -> the metric that chance and ablations refer to (the last stage's first metric)."""
    primary: dict[str, str] = {}
    for stage in stage_names(results):
        for dataset, metrics in results[stage].items():
            primary[dataset] = next(iter(metrics))
    return primary


def results_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (dataset, metric): each stage's value, chance and ablation mean/std (None when absent).

    Datasets keep their first appearance order (stages first, then ablations); ablation-only datasets
    get the metric name ``"mean"``.
    """
    check_results(results)
    stages = stage_names(results)
    chance = results.get(CHANCE_KEY, {})
    ablations = results.get(ABLATIONS_KEY, {})
    primary = primary_metrics(results)
    pairs: list[tuple[str, str]] = []
    for stage in stages:
        for dataset, metrics in results[stage].items():
            pairs.extend((dataset, metric) for metric in metrics if (dataset, metric) not in pairs)
    for datasets in ablations.values():
        pairs.extend(
            (dataset, "mean")
            for dataset in datasets
            if dataset not in primary and (dataset, "mean") not in pairs
        )
    rows = []
    for dataset, metric in pairs:
        is_primary = primary.get(dataset, "mean") == metric
        row: dict[str, Any] = {"dataset": dataset, "metric": metric}
        for stage in stages:
            row[stage] = results[stage].get(dataset, {}).get(metric)
        row[CHANCE_KEY] = chance.get(dataset) if is_primary else None
        for name, datasets in ablations.items():
            stats = datasets.get(dataset) if is_primary else None
            row[name] = None if stats is None else (stats["mean"], stats.get("std", 0.0))
        rows.append(row)
    return rows


def results_table(results: Mapping[str, Any], digits: int = 3) -> str:
    """A Markdown table of :func:`results_rows` (ablations as ``mean ± std``)."""
    rows = results_rows(results)
    columns = ["dataset", "metric", *stage_names(results), CHANCE_KEY, *results.get(ABLATIONS_KEY, {})]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, tuple):
            return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
        return f"{value:.{digits}f}" if _is_number(value) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- figures


def _draw_curves(ax: Any, curves: Mapping[str, Curve]) -> None:
    drawn = False
    for stage, points in curves.items():
        if not points:
            continue
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="." if len(points) < 40 else None, label=stage)
        drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training curves", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training step (per stage)")
    ax.set_ylabel("training loss")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)


def _draw_bars(ax: Any, results: Mapping[str, Any]) -> None:
    rows = results_rows(results)
    if not rows:
        ax.text(0.5, 0.5, "no held-out results", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("Held-out metrics")
        return
    series: list[tuple[str, list[float], list[float] | None, dict[str, Any]]] = []
    for stage in stage_names(results):
        series.append((stage, [_value(row[stage]) for row in rows], None, {}))
    if any(row[CHANCE_KEY] is not None for row in rows):
        series.append(
            ("chance", [_value(row[CHANCE_KEY]) for row in rows], None, {"color": "0.75", "hatch": "//"})
        )
    for name in results.get(ABLATIONS_KEY, {}):
        means = [_value(row[name][0] if row[name] else None) for row in rows]
        stds = [row[name][1] if row[name] else 0.0 for row in rows]
        series.append((name, means, stds, {"capsize": 3}))
    width = 0.8 / len(series)
    centres = range(len(rows))
    for index, (label, values, errors, style) in enumerate(series):
        offsets = [c - 0.4 + width * (index + 0.5) for c in centres]
        ax.bar(offsets, values, width, yerr=errors, label=label, **style)
    ax.set_xticks(list(centres))
    ax.set_xticklabels(
        [f"{row['dataset']} ({row['metric']})" for row in rows], rotation=25, ha="right", fontsize=8
    )
    ax.set_ylabel("metric value (each dataset's own metric)")
    ax.set_title("Held-out metrics")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _value(value: Any) -> float:
    """A bar height; missing values become NaN, which matplotlib leaves out."""
    return math.nan if value is None else float(value)


def plot_demo(results: Mapping[str, Any], curves: Mapping[str, Curve], out_png: str | Path) -> Path:
    """Two panels, written to ``out_png``: loss vs step per stage, and grouped bars of held-out metrics.

    Bars: every stage, chance, and each ablation's mean with its std as an error bar (see the module
    docstring for the layouts). Returns the path of the PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_results(results)
    check_curves(curves)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(13, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    curve_ax, bar_ax = figure.subplots(1, 2, width_ratios=(2, 3))
    _draw_curves(curve_ax, curves)
    _draw_bars(bar_ax, results)
    figure.savefig(out_png, dpi=110)
    return out_png
