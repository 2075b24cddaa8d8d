"""Tables and figures of the pipeline demo (``results.json``) and of ``make ablation`` (``ablation.json``).

``results.json``::

    {"models": {"blip2": {"label": "BLIP-2 (stage 2)"}, "instructblip": {"label": "InstructBLIP"}},
     "heldout": {model: {dataset: {"metric": "accuracy", "value": v, "stderr": se, "n": n}}},
     "chance": {dataset: value},
     "heldin_vqa_by_type": {model: {question_type: {"value": v, "stderr": se, "n": n}}},  # optional
     "heldin_questions": 1500,                                                           # optional
     "steps": {key: {"label": str, "seconds": s, "curve": folder or null}},              # optional
     "seconds": total, "machine": "free text"}                                           # optional

``ablation.json``::

    {"seeds": [0, 1, 2], "arms": {arm: {"label": str, "per_seed": [{dataset: {"metric", "value"}}]}},
     "chance": {dataset: value}}

(the demo's ablation adds a held-in cell per VQA question type, e.g. ``"shapes_vqa color"``, beside the
overall ``"shapes_vqa"``: a task name without a chance level is held in, so it is a row and a panel but
never part of the mean held-out score.)

Standard errors come from :mod:`ibkit.eval.uncertainty`. Figures are drawn on a bare ``Figure`` with
the Agg canvas (never ``pyplot``), as :mod:`ibkit.shapes.plotting` draws them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ibkit.shapes.plotting import Curve, check_curves, running_mean
from ibkit.shapes.runner import format_minutes

TUNED = "instructblip"  # the model whose "above chance by 2 SE" the held-out table reports
CIDER_SCALE = 10.0  # CIDEr-D lies in [0, 10] (pycocoevalcap scale): / 10 puts it on 0-1 with the accuracies
COLORS = ("#7f8fa6", "#e1812c", "#3a923a", "#c03d3e", "#9372b2", "#845b53")
CURVE_WINDOW = 10  # logged points per running mean of a training curve (10 steps apart in the demo configs)


# -------------------------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mapping(value: Any, where: str, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be {what}, got {type(value).__name__}")
    return value


def _check_cell(cell: Any, where: str, needs_metric: bool) -> None:
    _mapping(cell, where, "{'value', 'stderr', 'n'" + (", 'metric'}" if needs_metric else "}"))
    if needs_metric and not isinstance(cell.get("metric"), str):
        raise ValueError(f"{where}['metric'] must be a metric name, got {cell.get('metric')!r}")
    for key in ("value", "stderr"):
        if not _is_number(cell.get(key)):
            raise ValueError(f"{where}[{key!r}] must be a number, got {cell.get(key)!r}")
    if not isinstance(cell.get("n"), int) or isinstance(cell.get("n"), bool) or cell["n"] < 1:
        raise ValueError(f"{where}['n'] must be a positive integer, got {cell.get('n')!r}")


def _check_by_shapes(types: Any, where: str) -> None:
    """``{type: {number of shapes: cell}}``, as held-in VQA by number of shapes is kept."""
    for kind, counts in _mapping(types, where, "type -> number of shapes -> cell").items():
        inner = f"{where}[{kind!r}]"
        for count, cell in _mapping(counts, inner, "number of shapes -> cell").items():
            if not str(count).isdigit():
                raise ValueError(f"{inner}: key {count!r} is not a number of shapes")
            _check_cell(cell, f"{inner}[{count!r}]", needs_metric=False)


def check_results(results: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``results.json`` that breaks the layout."""
    results = _mapping(results, "results", "a dict")
    models = _mapping(results.get("models"), "results['models']", "model -> {'label'}")
    if not models:
        raise ValueError("results['models'] names no model")
    for model, info in models.items():
        if not isinstance(_mapping(info, f"results['models'][{model!r}]", "{'label': str}").get("label"), str):
            raise ValueError(f"results['models'][{model!r}]['label'] must be a string")
    chance = _mapping(results.get("chance"), "results['chance']", "dataset -> number")
    for dataset, value in chance.items():
        if not _is_number(value):
            raise ValueError(f"results['chance'][{dataset!r}] must be a number, got {value!r}")
    heldout = _mapping(results.get("heldout"), "results['heldout']", "model -> dataset -> cell")
    for model, datasets in heldout.items():
        if model not in models:
            raise ValueError(f"results['heldout'][{model!r}]: not a model of results['models']")
        for dataset, cell in _mapping(datasets, f"results['heldout'][{model!r}]", "dataset -> cell").items():
            _check_cell(cell, f"results['heldout'][{model!r}][{dataset!r}]", needs_metric=True)
            if dataset not in chance:
                raise ValueError(f"results['chance'][{dataset!r}] is missing (results['heldout'] has it)")
    by_type = _mapping(results.get("heldin_vqa_by_type", {}), "results['heldin_vqa_by_type']", "model -> type -> cell")
    for model, types in by_type.items():
        if model not in models:
            raise ValueError(f"results['heldin_vqa_by_type'][{model!r}]: not a model of results['models']")
        for kind, cell in _mapping(types, f"results['heldin_vqa_by_type'][{model!r}]", "type -> cell").items():
            _check_cell(cell, f"results['heldin_vqa_by_type'][{model!r}][{kind!r}]", needs_metric=False)
    by_shapes = _mapping(results.get("heldin_vqa_by_shapes", {}), "results['heldin_vqa_by_shapes']",
                         "model -> type -> number of shapes -> cell")
    for model, types in by_shapes.items():
        if model not in models:
            raise ValueError(f"results['heldin_vqa_by_shapes'][{model!r}]: not a model of results['models']")
        _check_by_shapes(types, f"results['heldin_vqa_by_shapes'][{model!r}]")
    _check_by_shapes(results.get("lm_text_by_shapes", {}), "results['lm_text_by_shapes']")
    steps = _mapping(results.get("steps", {}), "results['steps']", "step -> {'label', 'seconds', 'curve'}")
    for step, info in steps.items():
        where = f"results['steps'][{step!r}]"
        _mapping(info, where, "{'label', 'seconds', 'curve'}")
        if not isinstance(info.get("label"), str):
            raise ValueError(f"{where}['label'] must be a string, got {info.get('label')!r}")
        if not _is_number(info.get("seconds")):
            raise ValueError(f"{where}['seconds'] must be a number, got {info.get('seconds')!r}")
        if info.get("curve") is not None and not isinstance(info["curve"], str):
            raise ValueError(f"{where}['curve'] must be a folder name or null, got {info['curve']!r}")
    for key in ("seconds", "heldin_questions"):
        if key in results and not _is_number(results[key]):
            raise ValueError(f"results[{key!r}] must be a number, got {results[key]!r}")


def check_ablation(ablation: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``ablation.json`` that breaks the layout."""
    ablation = _mapping(ablation, "ablation", "a dict")
    seeds = ablation.get("seeds")
    if not isinstance(seeds, Sequence) or isinstance(seeds, str) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"ablation['seeds'] must be a list of integers, got {seeds!r}")
    arms = _mapping(ablation.get("arms"), "ablation['arms']", "arm -> {'label', 'per_seed'}")
    if not arms:
        raise ValueError("ablation['arms'] names no arm")
    for arm, info in arms.items():
        where = f"ablation['arms'][{arm!r}]"
        _mapping(info, where, "{'label', 'per_seed'}")
        if not isinstance(info.get("label"), str):
            raise ValueError(f"{where}['label'] must be a string, got {info.get('label')!r}")
        per_seed = info.get("per_seed")
        if not isinstance(per_seed, Sequence) or isinstance(per_seed, str) or not per_seed:
            raise ValueError(f"{where}['per_seed'] must be a non-empty list (one result per seed)")
        for index, result in enumerate(per_seed):
            for dataset, cell in _mapping(result, f"{where}['per_seed'][{index}]", "dataset -> cell").items():
                cell_where = f"{where}['per_seed'][{index}][{dataset!r}]"
                _mapping(cell, cell_where, "{'metric', 'value'}")
                if not isinstance(cell.get("metric"), str):
                    raise ValueError(f"{cell_where}['metric'] must be a metric name, got {cell.get('metric')!r}")
                if not _is_number(cell.get("value")):
                    raise ValueError(f"{cell_where}['value'] must be a number, got {cell.get('value')!r}")
    for dataset, value in _mapping(ablation.get("chance", {}), "ablation['chance']", "dataset -> number").items():
        if not _is_number(value):
            raise ValueError(f"ablation['chance'][{dataset!r}] must be a number, got {value!r}")


def _load(path: str | Path, check: Any) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        check(data)
    except ValueError as error:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"{path}: {error}") from error
    return data


def load_results(path: str | Path) -> dict[str, Any]:
    """Read the demo's ``results.json`` and check its layout; errors name the file and the field."""
    return _load(path, check_results)


def load_ablation(path: str | Path) -> dict[str, Any]:
    """Read ``ablation.json`` and check its layout; errors name the file and the field."""
    return _load(path, check_ablation)


# ------------------------------------------------------------------------------------------ arithmetic


def is_held_out(dataset: str, chance: Mapping[str, float]) -> bool:
    """Held out by the registry's word; a dataset it does not know is held out where it has a chance level."""
    from ibkit.data.registry import get_spec

    try:
        return not get_spec(dataset).held_in
    except KeyError:
        return dataset in chance


def unit_scale(metric: str, value: float) -> float:
    """A metric value on 0-1: CIDEr / 10, every other metric as it is."""
    return value / CIDER_SCALE if metric == "cider" else value


def heldout_mean(results: Mapping[str, Any], model: str) -> dict[str, float | int]:
    """Mean held-out score of ``model`` over its families (CIDEr / 10) and its standard error
    ``sqrt(sum SE_i^2) / k`` (the families' test sets are independent)."""
    cells = results["heldout"].get(model, {})
    if not cells:
        return {"value": math.nan, "stderr": math.nan, "n": 0}
    values = [unit_scale(c["metric"], c["value"]) for c in cells.values()]
    errors = [unit_scale(c["metric"], c["stderr"]) for c in cells.values()]
    k = len(values)
    return {"value": sum(values) / k, "stderr": math.sqrt(sum(e * e for e in errors)) / k, "n": k}


def above_chance(cell: Mapping[str, Any], chance: float, sigmas: float = 2.0) -> bool:
    """Whether ``value - sigmas * stderr`` clears chance (False when the standard error is unknown)."""
    return bool(cell["value"] - sigmas * cell["stderr"] > chance)


def summarize(per_seed: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """{dataset: {"metric", "mean", "std", "min", "max", "n"}} over seeds of ``{dataset: {"metric", "value"}}``.

    ``std`` is the sample standard deviation (0 for one seed); a dataset missing from a seed is averaged
    over the seeds that have it.
    """
    values: dict[str, list[float]] = {}
    metrics: dict[str, str] = {}
    for result in per_seed:
        for dataset, cell in result.items():
            values.setdefault(dataset, []).append(float(cell["value"]))
            metrics[dataset] = cell["metric"]
    summary = {}
    for dataset, xs in values.items():
        mean = sum(xs) / len(xs)
        std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
        summary[dataset] = {"metric": metrics[dataset], "mean": mean, "std": std, "min": min(xs), "max": max(xs),
                            "n": len(xs)}
    return summary


def summarize_ablation(ablation: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{arm: :func:`summarize` of its seeds}, after checking the layout."""
    check_ablation(ablation)
    return {arm: summarize(info["per_seed"]) for arm, info in ablation["arms"].items()}


# ---------------------------------------------------------------------------------------------- tables


def _pm(cell: Mapping[str, Any] | None, digits: int = 3) -> str:
    if cell is None:
        return "-"
    return f"{cell['value']:.{digits}f} ± {cell['stderr']:.{digits}f}"


def _datasets(per_model: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for cells in per_model.values():
        names.extend(d for d in cells if d not in names)
    return names


LM_TEXT_ROW = "lm_text"  # the held-in-by-shapes row of results['lm_text_by_shapes']


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the held-out table, the held-in VQA tables by question type and by number of shapes, the time
    per step (each once)."""
    check_results(results)
    models = list(results["models"])
    labels = [results["models"][m]["label"] for m in models]
    tuned = TUNED if TUNED in models else models[-1]
    heldout = results["heldout"]
    lines = ["## Held-out families (zero-shot)", "",
             "| family | metric | n | chance | " + " | ".join(labels)
             + f" | {results['models'][tuned]['label']} above chance by 2 SE |",
             "|---|---|---:|---:|" + "---:|" * len(models) + ":---:|"]
    for dataset in _datasets(heldout):
        cells = [heldout.get(m, {}).get(dataset) for m in models]
        first = next(c for c in cells if c is not None)
        ns = sorted({c["n"] for c in cells if c is not None})
        tuned_cell = heldout.get(tuned, {}).get(dataset)
        verdict = "-" if tuned_cell is None else ("yes" if above_chance(tuned_cell, results["chance"][dataset]) else "no")
        lines.append(f"| {dataset} | {first['metric']} | {' / '.join(map(str, ns))} | {results['chance'][dataset]:.3f} | "
                     + " | ".join(_pm(c) for c in cells) + f" | {verdict} |")
    means = [heldout_mean(results, m) for m in models]
    lines.append("| **mean held-out score** | (CIDEr / 10) | | | " + " | ".join(f"**{_pm(c)}**" for c in means) + " | |")
    lines += ["", "Values are ± one standard error of the test set. The mean held-out score is the mean of the "
              "per-family scores with CIDEr divided by 10 so every family lies on 0-1; its standard error is "
              "sqrt(sum SE²) / families.", ""]

    by_type = results.get("heldin_vqa_by_type") or {}
    if by_type:
        questions = results.get("heldin_questions")
        title = f"{questions:.0f} fresh questions" if questions is not None else "fresh questions"
        lines += [f"## Held-in VQA by question type ({title})", "",
                  "| question type | n | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(models)]
        for kind in _datasets(by_type):
            cells = [by_type.get(m, {}).get(kind) for m in models]
            ns = sorted({c["n"] for c in cells if c is not None})
            lines.append(f"| {kind} | {' / '.join(map(str, ns))} | " + " | ".join(_pm(c) for c in cells) + " |")
        lines += ["", "VQA accuracy ± one standard error.", ""]

    by_shapes = dict(results.get("heldin_vqa_by_shapes") or {})
    lm_text = results.get("lm_text_by_shapes") or {}
    rows = list(zip(models, labels))
    if by_shapes and lm_text:
        by_shapes[LM_TEXT_ROW] = lm_text
        rows.append((LM_TEXT_ROW, "the T5, from the description"))
    if by_shapes:
        counts = sorted({int(c) for types in by_shapes.values() for cells in types.values() for c in cells})
        lines += ["## Held-in VQA by number of shapes in the picture", "",
                  "| question type | model | " + " | ".join(f"{c} shape{'s' if c > 1 else ''}" for c in counts) + " |",
                  "|---|---|" + "---:|" * len(counts)]
        for kind in _datasets(by_shapes):
            for model, label in rows:
                cells = by_shapes.get(model, {}).get(kind)
                if cells:
                    row = [_pm(cells[str(c)], 2) + f" ({cells[str(c)]['n']})" if str(c) in cells else "-" for c in counts]
                    lines.append(f"| {kind} | {label} | " + " | ".join(row) + " |")
        lines += ["", "VQA accuracy ± one standard error (n). A type right with one shape and wrong with more fails "
                  "to bind the attribute to the object the question names; one wrong with a single shape never gets "
                  "the attribute through at all."]
        if LM_TEXT_ROW in by_shapes:
            lines += ["", "*The T5, from the description*: the frozen T5 alone, asked the same question types about fresh "
                      "scenes through their description instead of the picture (exact match, `ibkit.shapes.probe`): "
                      "what the T5 does with the whole scene as text, the reference for the picture's soft prompt."]
        lines.append("")

    steps = results.get("steps") or {}
    if steps:
        lines += ["## Time per step", "", "| step | time |", "|---|---:|"]
        lines += [f"| {info['label']} | {format_minutes(info['seconds'])} |" for info in steps.values()]
        if "seconds" in results:
            lines.append(f"| **total** | **{format_minutes(results['seconds'])}** |")
        if results.get("machine"):
            lines += ["", f"Machine: {results['machine']}."]
        lines.append("")
    return "\n".join(lines)


def ablation_markdown(ablation: Mapping[str, Any]) -> str:
    """ablation.md: per dataset and arm the mean ± std over seeds and the range; the mean held-out score
    (CIDEr / 10) per arm over seeds last."""
    summaries = summarize_ablation(ablation)
    arms = list(summaries)
    labels = [ablation["arms"][a]["label"] for a in arms]
    chance = ablation.get("chance", {})
    seeds = list(ablation["seeds"])
    lines = [f"## Ablation: mean ± std over seeds {seeds} (min-max)", "",
             "| task | metric | chance | " + " | ".join(labels) + " |", "|---|---|---:|" + "---:|" * len(arms)]
    for dataset in _datasets(summaries):
        cells = [summaries[a].get(dataset) for a in arms]
        metric = next(c for c in cells if c is not None)["metric"]
        level = f"{chance[dataset]:.3f}" if dataset in chance else "-"
        text = ["-" if c is None else f"{c['mean']:.3f} ± {c['std']:.3f} ({c['min']:.3f}-{c['max']:.3f})" for c in cells]
        name = dataset if is_held_out(dataset, chance) else f"{dataset} (held-in)"
        lines.append(f"| {name} | {metric} | {level} | " + " | ".join(text) + " |")
    means = []
    for arm in arms:
        per_seed = [[unit_scale(c["metric"], c["value"]) for d, c in r.items() if is_held_out(d, chance)]
                    for r in ablation["arms"][arm]["per_seed"]]
        means.append(summarize([{"mean": {"metric": "score", "value": sum(s) / len(s)}} for s in per_seed if s])
                     .get("mean"))
    lines.append("| **mean held-out score** | (CIDEr / 10) | | " + " | ".join(
        "-" if c is None else f"**{c['mean']:.3f} ± {c['std']:.3f}**" for c in means) + " |")
    lines += ["", "The mean held-out score averages the held-out tasks per seed with "
              "CIDEr divided by 10 (0-1 like the rest), then takes mean ± std over seeds.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _short(dataset: str) -> str:
    return dataset.removeprefix("shapes_")


def _bar_panel(ax: Any, title: str, metric: str, names: Sequence[str], values: Sequence[float],
               errors: Sequence[float], chance: float | None, points: Sequence[Sequence[float]] | None = None) -> None:
    """One small panel: a bar per name with error bars, chance dashed, its own y scale from 0."""
    xs = list(range(len(names)))
    clean_errors = [0.0 if not math.isfinite(e) else e for e in errors]
    ax.bar(xs, values, 0.7, yerr=clean_errors, capsize=4, color=[COLORS[i % len(COLORS)] for i in xs])
    if points:
        for x, ys in zip(xs, points):
            ax.plot([x] * len(ys), ys, "o", color="black", markersize=3, alpha=0.7)
    top = max([v + e for v, e in zip(values, clean_errors) if math.isfinite(v)] + [chance or 0.0, 1e-6])
    if chance is not None:
        ax.axhline(chance, color="black", linestyle="--", linewidth=1.2)
    for x, v in zip(xs, values):
        if math.isfinite(v) and v > 0:  # inside the bar, clear of the error bar
            ax.text(x, v / 2, f"{v:.2f}", ha="center", va="center", fontsize=10, color="white", fontweight="bold")
    ax.set_ylim(0, top * 1.18)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, fontsize=10)
    ax.set_title(title, fontsize=12)
    ax.set_ylabel(metric, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _draw_heldin(ax: Any, results: Mapping[str, Any]) -> None:
    models = list(results["models"])
    by_type = results["heldin_vqa_by_type"]
    kinds = _datasets(by_type)
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        cells = [by_type.get(model, {}).get(k) for k in kinds]
        xs = [k - 0.4 + width * (index + 0.5) for k in range(len(kinds))]
        ax.bar(xs, [math.nan if c is None else c["value"] for c in cells], width,
               yerr=[0.0 if c is None or not math.isfinite(c["stderr"]) else 2 * c["stderr"] for c in cells],
               capsize=3, color=COLORS[index % len(COLORS)], label=results["models"][model]["label"])
    ax.set_xticks(list(range(len(kinds))))
    ax.set_xticklabels(kinds, fontsize=10)
    ax.set_ylim(0, 1.1)
    questions = results.get("heldin_questions")
    ax.set_title("Held-in VQA by question type" + (f" ({questions:.0f} fresh questions)" if questions else ""), fontsize=12)
    ax.set_ylabel("VQA accuracy (±2 SE)", fontsize=10)
    ax.legend(fontsize=9, loc="lower right")
    ax.grid(axis="y", alpha=0.3)


def _draw_curves(ax: Any, results: Mapping[str, Any], curves: Mapping[str, Curve]) -> None:
    steps = results.get("steps") or {}
    drawn = [(steps.get(key, {}).get("label", key), points) for key, points in curves.items() if points]
    for label, points in drawn:
        xs, ys = zip(*points)
        (line,) = ax.plot(xs, running_mean(list(ys), CURVE_WINDOW), label=label, linewidth=1.5)
        ax.plot(xs, ys, color=line.get_color(), linewidth=0.5, alpha=0.25)
    positive = [y for _, points in drawn for _, y in points if y > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    if drawn:
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no training curves", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Training curves (faint: logged steps; solid: mean of {CURVE_WINDOW})", fontsize=12)
    ax.set_xlabel("training step (per pipeline step)", fontsize=10)
    ax.set_ylabel("training loss", fontsize=10)
    ax.grid(alpha=0.3)


def pipeline_figure(results: Mapping[str, Any], curves: Mapping[str, Curve]) -> Any:
    """The demo figure: a panel per held-out family (BLIP-2 vs InstructBLIP, ±2 SE, chance dashed), held-in
    VQA by question type, and the training curves (see :func:`plot_pipeline`)."""
    check_results(results)
    check_curves(curves)
    models = list(results["models"])
    heldout = results["heldout"]
    datasets = _datasets(heldout)
    columns = 4
    family_rows = max(1, math.ceil(len(datasets) / columns))
    figure = _figure(14, 8)
    grid = figure.add_gridspec(family_rows + 1, columns, height_ratios=[1] * family_rows + [1.15])
    short_labels = [results["models"][m]["label"].split(" (")[0] for m in models]
    for index, dataset in enumerate(datasets):
        ax = figure.add_subplot(grid[index // columns, index % columns])
        cells = [heldout.get(m, {}).get(dataset) for m in models]
        metric = next(c for c in cells if c is not None)["metric"]
        _bar_panel(ax, _short(dataset), metric + " (±2 SE)", short_labels,
                   [math.nan if c is None else c["value"] for c in cells],
                   [0.0 if c is None else 2 * c["stderr"] for c in cells], results["chance"][dataset])
    if results.get("heldin_vqa_by_type"):
        _draw_heldin(figure.add_subplot(grid[family_rows, : columns // 2]), results)
        _draw_curves(figure.add_subplot(grid[family_rows, columns // 2 :]), results, curves)
    else:
        _draw_curves(figure.add_subplot(grid[family_rows, :]), results, curves)
    figure.suptitle("Held-out families: BLIP-2 stage 2 vs InstructBLIP (dashed: chance)", fontsize=14)
    return figure


def plot_pipeline(results: Mapping[str, Any], curves: Mapping[str, Curve], out_png: str | Path) -> Path:
    """Write :func:`pipeline_figure` to ``out_png`` (about 14 x 8 inches); ``curves`` maps a key of
    ``results['steps']`` (its label names the line) to ``(step, loss)`` pairs. Returns the path."""
    figure = pipeline_figure(results, curves)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    return out_png


def ablation_figure(ablation: Mapping[str, Any]) -> Any:
    """Small multiples, one per task: a bar per arm (mean over seeds, ±1 std, each seed a dot), chance dashed."""
    summaries = summarize_ablation(ablation)
    arms = list(summaries)
    labels = [ablation["arms"][a]["label"] for a in arms]
    chance = ablation.get("chance", {})
    datasets = _datasets(summaries)
    columns = min(4, len(datasets))
    rows = math.ceil(len(datasets) / columns)
    figure = _figure(14, 3.4 * rows + 0.8)
    for index, dataset in enumerate(datasets):
        ax = figure.add_subplot(rows, columns, index + 1)
        cells = [summaries[a].get(dataset) for a in arms]
        points = [[float(r[dataset]["value"]) for r in ablation["arms"][a]["per_seed"] if dataset in r] for a in arms]
        metric = next(c for c in cells if c is not None)["metric"]
        title = _short(dataset) + ("" if is_held_out(dataset, chance) else " (held-in)")
        _bar_panel(ax, title, metric + " (±1 std over seeds)", [str(i + 1) for i in range(len(arms))],
                   [math.nan if c is None else c["mean"] for c in cells],
                   [0.0 if c is None else c["std"] for c in cells], chance.get(dataset), points)
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS[i % len(COLORS)], label=f"{i + 1}: {label}") for i, label in enumerate(labels)]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(arms), 4), fontsize=10)
    figure.suptitle(f"Ablation over seeds {list(ablation['seeds'])} (bars: arms; dots: seeds; dashed: chance)",
                    fontsize=13)
    return figure


def plot_ablation(ablation: Mapping[str, Any], out_png: str | Path) -> Path:
    """Write :func:`ablation_figure` to ``out_png``; returns the path."""
    figure = ablation_figure(ablation)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    return out_png
