"""The demo's steps as ``ibkit demo`` knows them: their names and labels, their lengths under each precision
policy, the check of ``--steps``, and where a run writes by default."""

from __future__ import annotations

STEP_LABELS = {"data": "rendering the data, tokenizers",  # in the pipeline's order
               "encoder": "encoder pretraining (vision words; beside the T5)",
               "qformer_text": "the Q-Former's BERT: masked LM on the text (beside the encoder; stage 1 starts from it)",
               "lm": "T5 on the text instruction corpus (beside the encoder and stage 1)",
               "blip2_stage1": "BLIP-2 stage 1 (ITC + ITM + ITG; beside the T5)",
               "features": "instruction tuning's image features, cached (after the T5, beside stage 1)",
               "blip2_stage2": "BLIP-2 stage 2 (prefix LM)",
               "instruct_side": "side warm-up (side questions only)",
               "instruct_relation": "relation phase (side, side statements, relation questions)",
               "instruct": "instruction tuning",
               "evaluate": "evaluation of InstructBLIP",
               "evaluate_blip2": "evaluation of BLIP-2 (stage 2; beside instruction tuning)",
               "probe": "the T5 alone, held-in questions from the scenes' descriptions"}
LM_BINDING_LABEL = "T5: binding phase, then the text instruction corpus (beside the encoder and stage 1)"
INSTRUCTION_TUNING = ("instruct_side", "instruct_relation", "instruct")  # the steps an ablation arm runs itself
TEXT_STEPS = ("qformer_text", "lm_binding", "lm")  # trained once per output directory, shared by every arm and seed
OPTIONAL_STEPS = ("qformer_text", "lm_binding")  # off unless --steps gives them a length; 0 leaves one out
TRAINED_STEPS = ("encoder", *TEXT_STEPS, "blip2_stage1", "blip2_stage2", *INSTRUCTION_TUNING)  # what --steps sets
# The relation recipe (--relations, docs/demo.md "The relation recipe, in the framework"): its steps' lengths
# unless --steps says otherwise. The Q-Former's BERT, stage 2 four times as long, and a second phase on the side
# and relation questions; each was measured to be needed (docs/demo.md, "Six T5 draws ...")
RELATION_STEPS: dict[str, int | None] = {"qformer_text": 2500, "blip2_stage2": 960, "instruct_relation": 2000}


# Where bf16 is slow (the fp32 policy), the encoder, T5 and stage 1 take about a minute longer: the encoder, the
# T5, the side warm-up and the mixture give up steps so that the demo keeps its 10 minutes (2-core AMD EPYC,
# IBKIT_CPU_BF16=0: an fp32 encoder step of 32 took 0.33 s against 0.19 s, so 1,050 steps of 16 would lengthen
# the encoder lane by about a minute; with these steps the forced demo took 8 min 21 s, and 9 min 09 s in a slower
# hour; 9 min 00 s with instruction tuning on one thread beside BLIP-2's evaluation; docs/demo.md).
FP32_STEPS: dict[str, int | None] = {"encoder": 700, "lm": 900, "instruct_side": 1000, "instruct": 800}


def precision_steps(steps: dict[str, int | None], fast_bf16: bool) -> dict[str, int | None]:
    """The demo's step lengths under the precision policy: ``steps`` as given, over :data:`FP32_STEPS` where
    bf16 is slow (what ``--steps`` sets always wins)."""
    return dict(steps) if fast_bf16 else {**FP32_STEPS, **steps}


def check_steps(steps: dict[str, int | None] | None, relations: bool = False) -> dict[str, int | None]:
    """``--steps`` as given, refused with the step names when one is not a training step (a typo would
    otherwise train the configs' length silently) or a length is not a positive whole number; with ``relations``
    the relation recipe's lengths (:data:`RELATION_STEPS`) under it."""
    steps = dict(steps or {})
    if "instruct_relation" in steps and not relations:
        raise ValueError("--steps: instruct_relation is the relation recipe's step; add --relations true")
    unknown = sorted(set(steps) - set(TRAINED_STEPS))
    if unknown:
        raise ValueError(f"--steps: unknown step(s) {unknown}; the training steps are {list(TRAINED_STEPS)}")
    bad = {name: n for name, n in steps.items() if n is not None and (
        not isinstance(n, int) or isinstance(n, bool) or n < (0 if name in OPTIONAL_STEPS else 1))}
    if bad:
        raise ValueError(f"--steps: {bad}: each a positive whole number of training steps ({' and '.join(OPTIONAL_STEPS)}: "
                         "0 leaves it out)")
    return {**RELATION_STEPS, **steps} if relations else steps


def default_output_dir(ablation: bool = False, seed: int = 0, relations: bool = False) -> str:
    """outputs/demo for seed 0 (what ``make demo`` writes), outputs/demo_seed<N> for another seed, so that a
    second draw never replaces the first one's results; outputs/ablation for the ablation (all its seeds);
    ``_relations`` after either for the relation recipe."""
    name = "outputs/ablation" if ablation else "outputs/demo" if seed == 0 else f"outputs/demo_seed{seed}"
    return f"{name}_relations" if relations else name
