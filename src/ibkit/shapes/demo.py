"""``ibkit demo`` / ``make demo``: the whole method end to end on the CPU, on the built-in shapes data.

Stage 1 trains a small model from scratch on captions (every part trainable: the LM learns a language);
stage 2 freezes its encoder and LM and instruction-tunes the Q-Former on the held-in shapes tasks;
stage 3 evaluates both models zero-shot on the held-out tasks and sets them beside chance. Every step is
a public ``ibkit`` command over the YAML files in ``configs/`` beside this module (package data); the
equivalent shell lines are printed so a user can run the same with real data.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from ibkit.data.tokenize import QFORMER_TOKENIZER_DIR

CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped with the package
# Stage 1 (rendering the data, training, export) takes about 45% of the demo on the 2-core Xeon the
# README's numbers come from (its 1,000 steps at ~137 samples/s, about 4 of the 9 min 20 s); after stage 1
# the demo projects its total from that share. An estimate: stages scale differently on other CPUs
# (stage 2 runs its frozen parts in bf16 where bf16 is fast), so the per-stage times are printed too.
STAGE1_SHARE = 0.45
HELD_OUT = ["shapes_nocaps", "shapes_vsr", "shapes_iconqa", "shapes_scienceqa", "shapes_hatefulmemes",
            "shapes_visdial", "shapes_msvdqa"]


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


class StageClock:
    """Elapsed time per stage of the demo, printed as each ends, and after the first a projected total."""

    def __init__(self, share_of_first: float = STAGE1_SHARE) -> None:
        self.share_of_first = share_of_first
        self.started = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 1)
        self.last = now
        print(f"\n[demo] {stage}: {_minutes(self.seconds[stage])} (total so far {_minutes(now - self.started)})",
              flush=True)
        if len(self.seconds) == 1:
            projected = (now - self.started) / self.share_of_first
            print(f"[demo] projected total: about {_minutes(projected)} (stage 1 is about {self.share_of_first:.0%} "
                  "of the demo on the machine the README's numbers come from; other CPUs differ)", flush=True)

    @property
    def total(self) -> float:
        return round(self.last - self.started, 1)


def _ibkit(args: list[str]) -> None:
    from ibkit.app import main

    print("\n$ ibkit " + " ".join(shlex.quote(a) for a in args), flush=True)
    code = main(args)
    if code:
        raise SystemExit(f"ibkit {args[0]} failed with exit code {code}")


def _common(out: Path, seed: int, data_seed: int | None = None, sizes: str | None = None) -> list[str]:
    """Arguments every stage shares: the data root, the run seed and the seed the data is rendered from."""
    args = [f"--data.init_args.root={out}", f"--seed_everything={seed}",
            f"--data.init_args.data_seed={seed if data_seed is None else data_seed}"]
    return args + ([f"--data.init_args.sizes={sizes}"] if sizes else [])


def _stage(out: Path, name: str, seed: int, extra: list[str], steps: int | None, run: Path | None = None,
           common: list[str] | None = None) -> Path:
    config = str(CONFIGS / f"{name}.yaml")
    run = run or out / name
    args = ["--config", config, *(common or _common(out, seed)), f"--trainer.default_root_dir={run}",
            f"--trainer.logger.init_args.save_dir={run}", *extra]
    if steps is not None:
        args.append(f"--trainer.max_steps={steps}")
    _ibkit(["fit", *args])
    _ibkit(["export", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--output", str(run / "model")])
    return run / "model"


def _stage1(out: Path, seed: int, steps: int | None, common: list[str]) -> Path:
    """Stage 1 from scratch, with the word-level tokenizers the data module builds under ``out``."""
    tokenizers = out / "tokenizers"
    return _stage(out, "stage1", seed, [f"--model.qformer_tokenizer={tokenizers / 'qformer'}",
                                        f"--model.llm_tokenizer={tokenizers / 'llm'}"], steps, common=common)


def _stage2_args(out: Path, stage1: Path) -> list[str]:
    """Stage 2 starts from the stage-1 export; its frozen-feature cache lives beside the run's outputs."""
    # the cache callback is the last of configs/stage2.yaml's callbacks, which is what this targets
    return [f"--model.pretrained={stage1}", f"--trainer.callbacks.init_args.cache_dir={out / 'cache'}"]


def _evaluate(out: Path, model: Path, tag: str, seed: int, max_samples: int | None,
              common: list[str] | None = None) -> dict:
    results_dir = out / "eval" / tag
    args = ["test", "--config", str(CONFIGS / "eval.yaml"), *(common or _common(out, seed)), f"--model.pretrained={model}",
            f"--model.results_dir={results_dir}", f"--trainer.default_root_dir={out / 'eval'}"]
    if max_samples:
        args.append(f"--data.init_args.max_eval_samples={max_samples}")
    _ibkit(args)
    return json.loads((results_dir / "results.json").read_text())


def _vqa_scores(out: Path, tag: str) -> dict[str, list[float]]:
    """Held-in VQA accuracy of each prediction record, grouped by question type (colour, shape, ...)."""
    from ibkit.data.registry import load_samples
    from ibkit.eval.metrics import vqa_accuracy

    kinds = {s.sample_id: s.extra.get("question_type") for s in load_samples("shapes_vqa", out, "val")}
    scores: dict[str, list[float]] = {}
    for line in (out / "eval" / tag / "predictions" / "shapes_vqa.jsonl").read_text().splitlines():
        record = json.loads(line)
        scores.setdefault(kinds.get(record["sample_id"], "?"), []).append(vqa_accuracy(record["prediction"], record["answers"]))
    return dict(sorted(scores.items()))


def _vqa_by_type(out: Path, tag: str) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in _vqa_scores(out, tag).items()}


def run_heldin_check(model: str | Path, output_dir: str | Path = "outputs/heldin_check", questions: int = 1500,
                     data_seed: int = 7) -> dict[str, dict[str, float]]:
    """Held-in VQA accuracy per question type on ``questions`` fresh validation questions.

    The demo's table rests on 300 validation questions, about 50 per type (a standard error near 0.07);
    this renders another held-in VQA validation set from ``data_seed`` (the training sets' scenes are not
    reused) and evaluates ``model`` on it with the demo's protocol. Returns ``{type: {"accuracy", "n"}}``.
    """
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = f"{{train: 1, val: 1, test: 1, shapes_vqa.val: {questions}}}"  # only the VQA split is rendered in full
    model = Path(model).resolve()
    common = [*_common(out, 0, data_seed, sizes), "--data.init_args.eval_datasets=[shapes_vqa]",
              # the model's own tokenizers: the ones built from this root's data number words differently
              f"--data.init_args.qformer_tokenizer={model / QFORMER_TOKENIZER_DIR}", f"--data.init_args.llm_tokenizer={model}"]
    _evaluate(out, model, "check", 0, None, common)
    scores = _vqa_scores(out, "check")
    result = {kind: {"accuracy": sum(v) / len(v), "n": len(v)} for kind, v in scores.items()}
    lines = [f"| held-in VQA, {questions} questions (data seed {data_seed}) | accuracy | questions |", "|---|---:|---:|"]
    lines += [f"| {kind} | {r['accuracy']:.3f} | {r['n']} |" for kind, r in result.items()]
    (out / "heldin_check.json").write_text(json.dumps({"model": str(model), "data_seed": data_seed, "by_type": result},
                                                      indent=2, sort_keys=True))
    (out / "heldin_check.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return result


def _curve(run: Path) -> list[tuple[int, float]]:
    from ibkit.shapes.plotting import read_loss_curve

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
             stage2_steps: int | None = None, max_eval_samples: int | None = None, sizes: str | None = None) -> dict:
    from ibkit.shapes.plotting import plot_demo
    from ibkit.shapes.specs import chance_level

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    common = _common(out, seed, sizes=sizes)
    stage1 = _stage1(out, seed, stage1_steps, common)
    clock.done("stage 1 (render the data, train, export)")
    stage2 = _stage(out, "stage2", seed, _stage2_args(out, stage1), stage2_steps, common=common)
    clock.done("stage 2 (feature cache, train, export)")
    results: dict = {"stage1": _evaluate(out, stage1, "stage1", seed, max_eval_samples, common)}
    clock.done("evaluate stage 1")
    results["stage2"] = _evaluate(out, stage2, "stage2", seed, max_eval_samples, common)
    clock.done("evaluate stage 2")
    results["chance"] = {name: chance_level(name) for name in results["stage2"] if name != "shapes_vqa"}
    results["heldin_vqa_by_type"] = {tag: _vqa_by_type(out, tag) for tag in ("stage1", "stage2")}
    results["seconds"], results["stage_seconds"] = clock.total, clock.seconds  # the only fields that vary
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(table(results))
    curves = {"stage1": _curve(out / "stage1"), "stage2": _curve(out / "stage2")}
    plot_results = {k: v for k, v in results.items() if k in ("stage1", "stage2", "chance")}
    plot_results = {k: {d: m for d, m in v.items() if d != "shapes_vqa"} for k, v in plot_results.items()}
    plot_demo(plot_results, curves, out / "demo.png")
    print("\n" + table(results))
    print("time per stage: " + ", ".join(f"{stage} {_minutes(s)}" for stage, s in clock.seconds.items()))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'demo.png'} in {_minutes(results['seconds'])}")
    return results


# The paper's ablations of stage 2 (Table 3 in miniature): each variant is the demo's stage 2 with one
# change, trained from the same stage-1 model, evaluated the same way.
ABLATIONS: dict[str, tuple[str, list[str]]] = {  # run folder: (label, stage-2 arguments)
    "default": ("default (instruction-aware, sqrt mixing)", []),
    "blip2_qformer": ("BLIP-2 Q-Former (no instruction input)", ["--model.qformer_instruction_aware=false"]),
    "uniform_mixing": ("uniform mixing", ["--data.init_args.mixing=uniform"]),
}


def summarize(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{dataset: {"mean", "std", "min", "max", "n"}} over seeds of ``{dataset: {metric: value}}`` results.

    ``std`` is the sample standard deviation (0 for one seed); datasets missing from a seed are averaged
    over the seeds that have them.
    """
    values: dict[str, list[float]] = {}
    for result in per_seed:
        for dataset, metrics in result.items():
            (value,) = metrics.values()
            values.setdefault(dataset, []).append(float(value))
    summary = {}
    for dataset, xs in values.items():
        mean = sum(xs) / len(xs)
        std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
        summary[dataset] = {"mean": mean, "std": std, "min": min(xs), "max": max(xs), "n": len(xs)}
    return summary


def ablation_table(summaries: dict[str, dict[str, dict[str, float]]], chance: dict[str, float]) -> str:
    names = list(summaries)
    datasets = [d for d in ["shapes_vqa", *HELD_OUT] if any(d in summaries[n] for n in names)]
    lines = ["| task | chance | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for dataset in datasets:
        cells = []
        for name in names:
            cell = summaries[name].get(dataset)
            cells.append("-" if cell is None else f"{cell['mean']:.3f} ± {cell['std']:.3f}")
        level = "-" if dataset not in chance else f"{chance[dataset]:.3f}"
        label = "shapes_vqa (held-in, val)" if dataset == "shapes_vqa" else dataset
        lines.append(f"| {label} | {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(output_dir: str | Path, seeds: tuple[int, ...] = (0, 1, 2), stage1_steps: int | None = None,
                 stage2_steps: int | None = None, max_eval_samples: int | None = None,
                 sizes: str | None = None) -> dict:
    """Stage 1 once (seed 0), then stage 2 + 3 per ablation and seed; mean ± std over seeds.

    The seed changes the training run (mixture order, initial state of the random generators) while
    the data stays the one rendered from seed 0. Finished runs are kept: a rerun skips every
    (variant, seed) whose ``results.json`` exists, so an interrupted ablation resumes where it stopped.
    """
    from ibkit.shapes.plotting import plot_demo
    from ibkit.shapes.specs import chance_level

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    common0 = _common(out, 0, 0, sizes)
    stage1 = out / "stage1" / "model"
    if not (stage1 / "config.json").exists():
        stage1 = _stage1(out, 0, stage1_steps, common0)
    per_variant: dict[str, list[dict]] = {}
    for folder, (name, extra) in ABLATIONS.items():
        for seed in seeds:
            tag = f"{folder}_seed{seed}"
            done = out / "eval" / tag / "results.json"
            if not done.exists():
                common = [*_common(out, seed, 0, sizes), f"--data.init_args.seed={seed}"]
                model = _stage(out, "stage2", seed, [*_stage2_args(out, stage1), *extra], stage2_steps,
                               run=out / tag, common=common)
                _evaluate(out, model, tag, seed, max_eval_samples, common=common)
            per_variant.setdefault(name, []).append(json.loads(done.read_text()))
    summaries = {name: summarize(results) for name, results in per_variant.items()}
    chance = {name: chance_level(name) for name in HELD_OUT}
    results = {"seeds": list(seeds), "variants": {label: args for label, args in ABLATIONS.values()},
               "ablations": summaries,
               "per_seed": per_variant, "chance": chance, "seconds": round(time.perf_counter() - started, 1)}
    (out / "ablation.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "ablation.md").write_text(ablation_table(summaries, chance))
    held_out = {n: {d: v for d, v in s.items() if d in HELD_OUT} for n, s in summaries.items()}
    plot_demo({"chance": chance, "ablations": held_out},
              {"stage1": _curve(out / "stage1"), **{f"stage2 {label}": _curve(out / f"{folder}_seed{seeds[0]}")
                                                    for folder, (label, _) in ABLATIONS.items()}}, out / "ablation.png")
    print("\n" + ablation_table(summaries, chance))
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'} in {results['seconds']:.0f} s")
    return results


def demo(output_dir: str | None = None, seed: int = 0, stage1_steps: int | None = None,
         stage2_steps: int | None = None, max_eval_samples: int | None = None, ablation: bool = False,
         seeds: Sequence[int] = (0, 1, 2), sizes: str | None = None, check: str | None = None,
         check_questions: int = 1500, check_seed: int = 7) -> None:
    """The whole method end to end on the CPU: stage 1, stage 2, zero-shot evaluation beside chance.

    Args:
        output_dir: where runs, models and results go; default: outputs/demo (outputs/heldin_check with
            ``check``).
        seed: the run seed of the demo, also the seed its shapes data is rendered from.
        stage1_steps: training steps of stage 1 (default: those of configs/stage1.yaml).
        stage2_steps: training steps of stage 2 (default: those of configs/stage2.yaml).
        max_eval_samples: evaluate at most this many samples per dataset (default: all).
        ablation: run the stage-2 ablations (BLIP-2 Q-Former, uniform mixing) over ``seeds`` instead.
        seeds: the seeds of ``ablation``.
        sizes: split sizes of the shapes data, e.g. ``'{train: 64, val: 8, test: 8}'``.
        check: instead, held-in VQA accuracy per question type of this model folder on
            ``check_questions`` fresh questions.
        check_questions: how many fresh questions ``check`` asks.
        check_seed: the data seed of the fresh questions (the demo's is 0).
    """
    output_dir = output_dir or ("outputs/heldin_check" if check else "outputs/demo")
    if check:
        run_heldin_check(check, output_dir, check_questions, check_seed)
    elif ablation:
        run_ablation(output_dir, tuple(seeds), stage1_steps, stage2_steps, max_eval_samples, sizes)
    else:
        run_demo(output_dir, seed, stage1_steps, stage2_steps, max_eval_samples, sizes)

