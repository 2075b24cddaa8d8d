"""``ibkit demo`` / ``make demo``: the whole method end to end on the CPU, on the built-in shapes data.

Stage 1 trains a small model from scratch on captions (every part trainable: the LM learns a language);
stage 2 freezes its encoder and LM and instruction-tunes the Q-Former on the held-in shapes tasks;
stage 3 evaluates both models zero-shot on the held-out tasks and sets them beside chance. Every step is
a public ``ibkit`` command over the YAML files in ``configs/demo/``; the equivalent shell lines are
printed so a user can run the same with real data.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
HELD_OUT = ["shapes_nocaps", "shapes_vsr", "shapes_iconqa", "shapes_scienceqa", "shapes_hatefulmemes",
            "shapes_visdial", "shapes_msvdqa"]


def _ibkit(args: list[str]) -> None:
    from ibkit.cli import main

    print("\n$ ibkit " + " ".join(shlex.quote(a) for a in args), flush=True)
    code = main(args)
    if code:
        raise SystemExit(f"ibkit {args[0]} failed with exit code {code}")


def _common(out: Path, seed: int) -> list[str]:
    return [f"--data.init_args.root={out}", f"--seed_everything={seed}", f"--data.init_args.data_seed={seed}"]


def _stage(out: Path, name: str, seed: int, extra: list[str], steps: int | None) -> Path:
    config = str(CONFIGS / f"{name}.yaml")
    run = out / name
    args = ["--config", config, *_common(out, seed), f"--trainer.default_root_dir={run}",
            f"--trainer.logger.init_args.save_dir={run}", *extra]
    if steps is not None:
        args.append(f"--trainer.max_steps={steps}")
    _ibkit(["fit", *args])
    _ibkit(["export", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--output", str(run / "model")])
    return run / "model"


def _evaluate(out: Path, model: Path, tag: str, seed: int, max_samples: int | None) -> dict:
    results_dir = out / "eval" / tag
    args = ["test", "--config", str(CONFIGS / "eval.yaml"), *_common(out, seed), f"--model.pretrained={model}",
            f"--model.results_dir={results_dir}", f"--trainer.default_root_dir={out / 'eval'}"]
    if max_samples:
        args.append(f"--data.init_args.max_eval_samples={max_samples}")
    _ibkit(args)
    return json.loads((results_dir / "results.json").read_text())


def _vqa_by_type(out: Path, tag: str) -> dict[str, float]:
    """Held-in VQA accuracy per question type (colour, shape, ...) from the prediction records."""
    from ibkit.data.registry import load_samples
    from ibkit.eval.metrics import vqa_accuracy

    kinds = {s.sample_id: s.extra.get("question_type") for s in load_samples("shapes_vqa", out, "val")}
    scores: dict[str, list[float]] = {}
    for line in (out / "eval" / tag / "predictions" / "shapes_vqa.jsonl").read_text().splitlines():
        record = json.loads(line)
        scores.setdefault(kinds.get(record["sample_id"], "?"), []).append(vqa_accuracy(record["prediction"], record["answers"]))
    return {k: sum(v) / len(v) for k, v in sorted(scores.items())}


def _curve(run: Path) -> list[tuple[int, float]]:
    from ibkit.plotting import read_loss_curve

    try:
        return read_loss_curve(run)
    except FileNotFoundError:  # a run too short to log a single step
        return []


def table(results: dict) -> str:
    """The paper's Table 1 in miniature: held-out metric per task beside stage 1 and chance."""
    lines = ["| held-out task | metric | chance | stage 1 (captions only) | stage 2 (instruction-tuned) |",
             "|---|---|---:|---:|---:|"]
    for name in HELD_OUT:
        if name not in results["stage2"]:
            continue
        (metric, value), = results["stage2"][name].items()
        before = results["stage1"].get(name, {}).get(metric, float("nan"))
        lines.append(f"| {name} | {metric} | {results['chance'][name]:.3f} | {before:.3f} | {value:.3f} |")
    held = results.get("heldin_vqa_by_type", {})
    if held:
        lines += ["", "| held-in VQA (shapes_vqa val) by question type | stage 1 | stage 2 |", "|---|---:|---:|"]
        for kind, value in held["stage2"].items():
            lines.append(f"| {kind} | {held['stage1'].get(kind, float('nan')):.3f} | {value:.3f} |")
    return "\n".join(lines) + "\n"


def run_demo(output_dir: str | Path, seed: int = 0, stage1_steps: int | None = None,
             stage2_steps: int | None = None, max_eval_samples: int | None = None) -> dict:
    from ibkit.data.shapes import chance_level
    from ibkit.plotting import plot_demo

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stage1 = _stage(out, "stage1", seed, [f"--model.qformer_tokenizer={out / 'tokenizers' / 'qformer'}",
                                           f"--model.llm_tokenizer={out / 'tokenizers' / 'llm'}"], stage1_steps)
    stage2 = _stage(out, "stage2", seed, [f"--model.pretrained={stage1}"], stage2_steps)
    results: dict = {
        "stage1": _evaluate(out, stage1, "stage1", seed, max_eval_samples),
        "stage2": _evaluate(out, stage2, "stage2", seed, max_eval_samples),
    }
    results["chance"] = {name: chance_level(name) for name in results["stage2"] if name != "shapes_vqa"}
    results["heldin_vqa_by_type"] = {tag: _vqa_by_type(out, tag) for tag in ("stage1", "stage2")}
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(table(results))
    curves = {"stage1": _curve(out / "stage1"), "stage2": _curve(out / "stage2")}
    plot_results = {k: v for k, v in results.items() if k in ("stage1", "stage2", "chance")}
    plot_results = {k: {d: m for d, m in v.items() if d != "shapes_vqa"} for k, v in plot_results.items()}
    plot_demo(plot_results, curves, out / "demo.png")
    print("\n" + table(results))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'demo.png'} in {results['seconds']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ibkit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1_steps", type=int, default=None, help="override configs/demo/stage1.yaml")
    parser.add_argument("--stage2_steps", type=int, default=None, help="override configs/demo/stage2.yaml")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    args = parser.parse_args(argv)
    run_demo(args.output_dir, args.seed, args.stage1_steps, args.stage2_steps, args.max_eval_samples)
    return 0
