"""``ibkit demo`` / ``make demo``: InstructBLIP's whole pipeline in miniature, on the CPU, on the shapes data.

The paper starts from a pretrained image encoder (EVA-CLIP) and an instruction-following LLM (FlanT5),
aligns them with BLIP-2's two pre-training stages, then instruction-tunes the Q-Former. The demo does
each step itself, every one a public ``ibkit`` command over the YAML files in ``configs/`` beside this
module (package data), printed as it runs:

1. ``encoder``: an image encoder pretrained on shapes images (caption words detected in image tokens);
2. ``lm``: a small T5 trained on a text-only instruction corpus about scene descriptions (the FlanT5 stand-in),
   after an optional binding phase (``--steps '{lm_binding: 3000}'``, ``configs/lm_binding.yaml``);
3. ``blip2_stage1``: BLIP-2 stage 1 (ITC + ITM + ITG) with the encoder frozen, the Q-Former afresh or from a BERT
   (the optional step ``qformer_text``: masked LM on the text, ``configs/qformer_text.yaml``);
4. ``blip2_stage2``: BLIP-2 stage 2 (prefix LM on captions) with encoder and T5 frozen;
5. ``instruct_side``: a warm-up of the Q-Former on the held-in side questions alone (the demo's departure
   from the paper, see ``configs/instruct_side.yaml``), then ``instruct``: instruction tuning of the
   Q-Former on the held-in shapes tasks (with ``--relations true``, the relation recipe of docs/demo.md, the
   relation phase ``instruct_relation`` comes between them, on data of :mod:`ibkit.shapes.relations`);
6. ``evaluate``: the BLIP-2 stage-2 model and the instruction-tuned model, zero-shot on the held-out
   families and on held-in VQA, with the same prompts, with standard errors; ``probe``: the T5 from text.

Step 2 depends on neither step 1 nor step 3: it runs beside them (step 1, then step 3, in one lane), then caches
step 5's image features; BLIP-2's evaluation (step 6, which needs step 4 only) runs beside step 5 and
InstructBLIP's evaluation (:func:`run_side_by_side`: one process each, an equal share of the cores).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from ibkit.shapes.folders import claimed
from ibkit.shapes.pipeline import Pipeline
from ibkit.shapes.runner import (
    Commands,
    StepClock,
    WorkLedger,
    command_processes,
    format_minutes,
    machine_description,
    run_commands,
    run_side_by_side,
)
from ibkit.shapes.settings import (
    LM_BINDING_LABEL,
    STEP_LABELS,
    TRAINED_STEPS,
    check_steps,
    default_output_dir,
    precision_steps,
)

log = logging.getLogger(__name__)
HELD_OUT = ["shapes_nocaps", "shapes_vsr", "shapes_iconqa", "shapes_scienceqa", "shapes_hatefulmemes",
            "shapes_visdial", "shapes_msvdqa"]
HELD_IN_VQA = "shapes_vqa"
MODELS = {"blip2": "BLIP-2 (stage 2)", "instructblip": "InstructBLIP"}


def scored_results(results_dir: Path, out: Path) -> tuple[dict, dict]:
    """(held-out {dataset: {metric, value, stderr, n}}, held-in VQA {question type: {value, stderr, n}}) of an
    evaluation, from its prediction records (the values are the ones ``ibkit test`` reported)."""
    from ibkit.data.registry import load_samples
    from ibkit.eval.uncertainty import dataset_with_error, grouped_with_error, read_predictions

    held_out = {name: dataset_with_error(results_dir, name) for name in HELD_OUT
                if (results_dir / "predictions" / f"{name}.jsonl").exists()}
    kinds = {s.sample_id: s.extra.get("question_type", "?") for s in load_samples(HELD_IN_VQA, out, "val")}
    records = read_predictions(results_dir / "predictions" / f"{HELD_IN_VQA}.jsonl")
    held_in = grouped_with_error(records, "vqa_accuracy", lambda record: kinds[record["sample_id"]])
    return held_out, held_in


def heldin_by_shapes(results_dir: Path, out: Path) -> dict[str, dict[str, dict]]:
    """Held-in VQA accuracy per question type and number of shapes in the picture: ``{type: {"1": cell, ...}}``.

    Separates two failures: a type right with one shape and wrong with more does not bind an attribute to
    the object the question names; a type wrong with a single shape never gets the attribute through."""
    from ibkit.data.registry import load_samples
    from ibkit.eval.uncertainty import grouped_with_error, read_predictions

    groups = {s.sample_id: (s.extra.get("question_type", "?"), len(s.extra["scene"]["objects"]))
              for s in load_samples(HELD_IN_VQA, out, "val")}
    records = read_predictions(results_dir / "predictions" / f"{HELD_IN_VQA}.jsonl")
    cells = grouped_with_error(records, "vqa_accuracy", lambda record: "{}|{}".format(*groups[record["sample_id"]]))
    nested: dict[str, dict[str, dict]] = {}
    for key, cell in cells.items():
        kind, count = key.rsplit("|", 1)
        nested.setdefault(kind, {})[count] = cell
    return nested


def _curve_folders(pipeline: Pipeline) -> dict[str, Path]:
    bert = {"qformer_text": pipeline.qformer_bert.parent} if pipeline.qformer_bert else {}
    return {"encoder": pipeline.run("encoder"), "lm": pipeline.lm.parent, **bert,
            "blip2_stage1": pipeline.run("blip2_stage1"), "blip2_stage2": pipeline.run("blip2_stage2"),
            **{step: pipeline.run(step) for step in pipeline.tuning()}}


def _curves(pipeline: Pipeline) -> dict[str, list[tuple[int, float]]]:
    from ibkit.shapes.plotting import read_loss_curve

    curves = {}
    for name, folder in _curve_folders(pipeline).items():
        try:
            curves[name] = read_loss_curve(folder)
        except (FileNotFoundError, ValueError):  # a run too short to log a single step
            curves[name] = []
    return curves


def run_demo(output_dir: str | Path, seed: int = 0, steps: dict[str, int | None] | None = None,
             max_eval_samples: int | None = None, sizes: str | None = None, relations: bool = False) -> dict:
    """The six steps once (seed ``seed``; ``relations``: the relation recipe's), then ``results.json``,
    ``results.md`` and ``demo.png`` in ``output_dir``, which no other demo may write meanwhile
    (:func:`~ibkit.shapes.folders.claimed`)."""
    out = Path(output_dir).resolve()
    with claimed(out):
        return _run_demo(out, seed, steps, max_eval_samples, sizes, relations)


def _run_demo(out: Path, seed: int, steps: dict[str, int | None] | None, max_eval_samples: int | None,
              sizes: str | None, relations: bool) -> dict:
    from ibkit.shapes.probe import held_in_from_text
    from ibkit.shapes.report import plot_pipeline, results_markdown
    from ibkit.shapes.specs import chance_level

    pipeline = Pipeline(out, out, seed=seed, data_seed=seed, sizes=sizes, steps=dict(steps or {}),
                        max_eval_samples=max_eval_samples, relations=relations)
    labels = {**STEP_LABELS, **({"lm": LM_BINDING_LABEL} if pipeline.steps.get("lm_binding") else {})}
    clock = StepClock(labels)
    command_processes()  # the side-by-side commands' server imports on the other core while the data renders
    print("[demo] rendering the shapes data and writing the tokenizers", flush=True)
    pipeline.prepare_data()
    clock.done("data")
    # the T5 needs neither the encoder nor stage 1 (stage 2 needs all three): one lane beside the other, an
    # equal share of the cores each; the T5's, shorter, then caches instruction tuning's features (after the encoder);
    # the Q-Former's BERT, where asked for, opens the T5's lane, and stage 1 waits for it
    bert = {"qformer_text": pipeline.qformer_text()} if pipeline.qformer_bert else {}
    text_lane = {**bert, "lm": pipeline.language_model(), "features": pipeline.instruction_features()}
    pretrained = run_side_by_side({"encoder": {"encoder": pipeline.encoder(), "blip2_stage1": pipeline.blip2_stage1()},
                                   "lm": text_lane}, {"lm": pipeline.lm.parent / "log.txt"},
                                  after={"features": "encoder", **({"blip2_stage1": "qformer_text"} if bert else {})})
    clock.done("encoder", f"{labels['encoder']}, then {labels['blip2_stage1']} | "
                          + ", then ".join(labels[step] for step in text_lane))  # side by side: each step its own time
    clock.seconds.update({step: pretrained[step] for step in STEP_LABELS if step in pretrained})
    run_commands(pipeline.blip2_stage2())
    clock.done("blip2_stage2")
    # BLIP-2's evaluation needs stage 2 only: it runs beside instruction tuning and InstructBLIP's evaluation,
    # one thread each (one runs the instruction-tuning steps about as fast as two: docs/bench.md)
    lane = {**pipeline.tuning(export=True), "evaluate": pipeline.evaluate("instructblip")}
    tuned = run_side_by_side({"instruct": lane, "evaluate_blip2": pipeline.evaluate("blip2")},
                             {"evaluate_blip2": pipeline.results_dir("blip2").parent / "blip2.log.txt"})
    clock.done("instruct_side", ", then ".join(labels[step] for step in lane) + f" | {labels['evaluate_blip2']}")
    # they ran at the same time: each step gets its own wall time, in the order of the pipeline
    clock.seconds.update({step: tuned[step] for step in (*lane, "evaluate_blip2")})
    heldout, heldin, by_shapes = {}, {}, {}
    for model in MODELS:
        heldout[model], heldin[model] = scored_results(pipeline.results_dir(model), out)
        by_shapes[model] = heldin_by_shapes(pipeline.results_dir(model), out)
    lm_by_shapes = held_in_from_text(pipeline.lm)
    clock.done("probe")
    results = {
        "models": {key: {"label": label} for key, label in MODELS.items()},
        "heldout": heldout,
        "chance": {name: chance_level(name) for name in heldout["instructblip"]},
        "heldin_vqa_by_type": heldin,
        "heldin_vqa_by_shapes": by_shapes,
        "lm_text_by_shapes": lm_by_shapes,
        "heldin_questions": sum(v["n"] for v in heldin["instructblip"].values()),
        "steps": {key: {"label": labels[key], "seconds": seconds,
                        "curve": key if key in TRAINED_STEPS else None}
                  for key, seconds in clock.seconds.items()},
        "seconds": clock.total,
        "machine": machine_description(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    markdown = results_markdown(results)
    (out / "results.md").write_text(markdown)
    plot_pipeline(results, _curves(pipeline), out / "demo.png")
    print("\n" + markdown)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'demo.png'} in {format_minutes(results['seconds'])}")
    return results


# The paper's ablations of instruction tuning (Table 3 in miniature) and a component swap: each arm is the
# demo's instruction tuning with one change, from the same BLIP-2 stages (seed 0), evaluated the same way.
ABLATIONS: dict[str, tuple[str, list[str]]] = {  # arm: (label, instruction-tuning arguments)
    "default": ("InstructBLIP (instruction-aware, sqrt mixing)", []),
    "blip2_qformer": ("BLIP-2 Q-Former (no instruction input)",
                      ["--model.init_args.model.init_args.qformer.instruction_aware=false"]),
    "uniform_mixing": ("uniform mixing", ["--data.init_args.mixing=uniform"]),
    "swapped_encoder": ("swapped encoder (CLIP ViT, aligned by stages 1-2)", []),
}
SWAP = {"encoder_config": "encoder_clip", "swap": "swap_clip"}  # the swapped arm's encoder and stage-config fragment


def run_ablation(output_dir: str | Path, seeds: tuple[int, ...] = (0, 1, 2), steps: dict[str, int | None] | None = None,
                 max_eval_samples: int | None = None, sizes: str | None = None, relations: bool = False) -> dict:
    """Pre-training once per encoder (seed 0), then instruction tuning + evaluation per arm and seed.

    The seed changes the instruction-tuning run (mixture order, initial state of the random generators)
    while the data stays the one rendered from seed 0. Finished runs are kept: a rerun skips every step
    whose checkpoint exists and every (arm, seed) whose ``results.json`` exists, so an interrupted
    ablation resumes where it stopped. No other demo may write ``output_dir`` meanwhile.
    """
    out = Path(output_dir).resolve()
    with claimed(out):
        return _run_ablation(out, seeds, steps, max_eval_samples, sizes, relations)


def _run_ablation(out: Path, seeds: tuple[int, ...], steps: dict[str, int | None] | None,
                  max_eval_samples: int | None, sizes: str | None, relations: bool) -> dict:
    from ibkit.shapes.report import ablation_markdown, plot_ablation
    from ibkit.shapes.specs import chance_level

    started = time.perf_counter()
    base = Pipeline(out, out, sizes=sizes, steps=dict(steps or {}), max_eval_samples=max_eval_samples,
                    relations=relations)
    swapped = Pipeline(out, out / "swapped_encoder", sizes=sizes, steps=dict(steps or {}),
                       max_eval_samples=max_eval_samples, relations=relations, **SWAP)
    ledger = WorkLedger(out / "ablation_seconds.json")
    command_processes()  # its server imports while the data renders
    with ledger.timing("data"):
        base.prepare_data()

    def encoder_lane(pipeline: Pipeline) -> dict[str, Commands]:  # what is left of encoder, then stage 1
        return {step: commands for step, commands, done in (
            ("encoder", pipeline.encoder(), pipeline.encoder_weights.exists()),
            ("blip2_stage1", pipeline.blip2_stage1(), pipeline.ckpt("blip2_stage1").exists())) if not done}

    pretraining: dict[str, Commands | dict[str, Commands]] = {"encoder": encoder_lane(base),
                                                              "swapped encoder": encoder_lane(swapped)}
    if not (base.lm / "config.json").exists():
        pretraining["lm"] = base.language_model()
    if base.qformer_bert and not (base.qformer_bert / "config.json").exists():  # both arms' stage 1 start from it
        with ledger.timing("qformer_text"):
            run_commands(base.qformer_text())
    pretraining = {name: lane for name, lane in pretraining.items() if lane}
    if pretraining:  # independent of each other: side by side
        with ledger.timing("pre-training (encoders, T5, stage 1)"):
            run_side_by_side(pretraining, {name: out / f"{name.replace(' ', '_')}.log.txt" for name in pretraining})
    for name, pipeline in (("", base), (" (swapped encoder)", swapped)):
        if not pipeline.ckpt("blip2_stage2").exists():
            with ledger.timing(f"blip2_stage2{name}"):
                run_commands(pipeline.blip2_stage2())
    runs: dict[str, list[Pipeline]] = {}  # each arm's run per seed
    pending: list[tuple[str, Pipeline, list[str]]] = []
    for arm, (_, extra) in ABLATIONS.items():
        source = swapped if arm == "swapped_encoder" else base
        for seed in seeds:
            pipeline = Pipeline(out, source.runs / f"{arm}_seed{seed}", seed=seed, sizes=sizes, steps=source.steps,
                                max_eval_samples=max_eval_samples, encoder_config=source.encoder_config, swap=source.swap,
                                pretrained_runs=source.runs, relations=relations)
            runs.setdefault(arm, []).append(pipeline)
            if not (pipeline.results_dir("instructblip") / "results.json").exists():
                pending.append((f"{arm} seed {seed}", pipeline, [*extra, f"--data.init_args.seed={seed}"]))
    # two (arm, seed) runs at a time, side by side with half the cores each: the instruction-tuning step is
    # bound by per-operation overhead, and one thread runs it about as fast as two (docs/bench.md), so pairs
    # nearly halve the ablation's time
    for start in range(0, len(pending), 2):
        pair = pending[start:start + 2]
        with ledger.timing(" + ".join(name for name, _, _ in pair)):
            run_side_by_side({name: _arm_lane(pipeline, extra) for name, pipeline, extra in pair},
                             {name: pipeline.runs / "log.txt" for name, pipeline, _ in pair})
    arms: dict[str, dict] = {}
    for arm, (label, _) in ABLATIONS.items():
        per_seed = []
        for pipeline in runs[arm]:
            heldout, heldin = scored_results(pipeline.results_dir("instructblip"), out)
            per_seed.append({**{d: {"metric": v["metric"], "value": v["value"]} for d, v in heldout.items()},
                             HELD_IN_VQA: {"metric": "vqa_accuracy", "value": _overall(heldin)},
                             **{f"{HELD_IN_VQA} {kind}": {"metric": "vqa_accuracy", "value": cell["value"]}
                                for kind, cell in sorted(heldin.items())}})
        arms[arm] = {"label": label, "per_seed": per_seed}
    ablation = {"seeds": list(seeds), "arms": arms, "chance": {name: chance_level(name) for name in HELD_OUT},
                # every finished unit's time, over every invocation of an interrupted and resumed run
                "seconds": ledger.total, "seconds_this_invocation": round(time.perf_counter() - started, 1),
                "machine": machine_description()}
    (out / "ablation.json").write_text(json.dumps(ablation, indent=2, sort_keys=True))
    markdown = ablation_markdown(ablation)
    (out / "ablation.md").write_text(markdown)
    plot_ablation(ablation, out / "ablation.png")
    print("\n" + markdown)
    took = format_minutes(ablation["seconds"])
    if ablation["seconds"] > ablation["seconds_this_invocation"] + 1:  # resumed: say what this invocation took too
        took += f" ({format_minutes(ablation['seconds_this_invocation'])} in this invocation)"
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}; the ablation took {took}")
    return ablation


def _arm_lane(pipeline: Pipeline, tuning: list[str]) -> dict[str, Commands]:
    """One ablation run's steps in order: the side warm-up and the relation recipe's phase (each unless its
    checkpoint exists), the mixture with ``tuning`` (the arm's arguments and seed), then InstructBLIP's evaluation
    (an arm without the instruction input is evaluated without it)."""
    name = pipeline.runs.name
    lane = {f"{name} {step}": commands for step, commands in pipeline.tuning(tuning).items()
            if step == "instruct" or not pipeline.ckpt(step).exists()}
    lane[f"{name} evaluate"] = pipeline.evaluate("instructblip", [a for a in tuning if "instruction_aware" in a])
    return lane


def _overall(by_type: dict[str, dict]) -> float:
    """Held-in VQA accuracy over all questions from the per-type values and counts."""
    total = sum(v["n"] for v in by_type.values())
    return sum(v["value"] * v["n"] for v in by_type.values()) / total if total else float("nan")


def demo(output_dir: str | None = None, seed: int = 0, steps: dict[str, int] | None = None,
         max_eval_samples: int | None = None, ablation: bool = False, seeds: Sequence[int] = (0, 1, 2),
         sizes: str | None = None, relations: bool = False) -> None:
    """InstructBLIP's pipeline end to end on the CPU: pretrained encoder and instruction-trained T5 (both
    trained here), BLIP-2 stages 1 and 2, instruction tuning, zero-shot evaluation of BLIP-2 and InstructBLIP.

    Args:
        output_dir: where runs, models and results go; default: outputs/demo, outputs/demo_seed<N> for another
            ``seed``, outputs/ablation with ``ablation``.
        seed: the run seed of the demo, also the seed its shapes data is rendered from.
        steps: training steps per pipeline step, e.g. ``'{encoder: 300, instruct: 1000}'`` (default: the configs');
            ``lm_binding: 3000`` adds the T5's binding phase (``configs/lm_binding.yaml``, off by default);
            ``qformer_text: 2500`` the Q-Former's BERT (``configs/qformer_text.yaml``, off by default).
        max_eval_samples: evaluate at most this many samples per dataset (default: all).
        ablation: run the instruction-tuning ablations (BLIP-2 Q-Former, uniform mixing, swapped encoder) over
            ``seeds`` instead.
        seeds: the seeds of ``ablation``.
        sizes: split sizes of the shapes data, e.g. ``'{train: 64, val: 8, test: 8}'``.
        relations: the relation recipe (docs/demo.md): its data (:mod:`ibkit.shapes.relations`), the Q-Former's
            BERT, a longer stage 2 and the relation phase (``configs/instruct_relation.yaml``); by default in
            outputs/demo_relations.
    """
    from ibkit.models.precision import pinned_cpu_bf16

    output_dir = output_dir or default_output_dir(ablation, seed, relations)
    steps = check_steps(steps, relations)
    with pinned_cpu_bf16() as bf16:  # one precision for every step: a noisy timing must not change a result
        print(f"[demo] fast bf16 on this CPU: {'yes' if bf16 else 'no'} (decided once for every step)", flush=True)
        adjusted = precision_steps(steps, bf16)
        if adjusted != steps:
            print(f"[demo] fp32 policy: {adjusted} steps instead of the configs' (the 10-minute budget, at lower "
                  "held-in accuracy: README, 'On a CPU without fast bf16'; --steps overrides)", flush=True)
        steps = adjusted
        if ablation:
            run_ablation(output_dir, tuple(seeds), steps, max_eval_samples, sizes, relations)
        else:
            run_demo(output_dir, seed, steps, max_eval_samples, sizes, relations)
