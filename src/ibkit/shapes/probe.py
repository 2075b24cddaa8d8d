"""Does a language model bind? Its answers from a scene's perfect description, per question kind and number of
objects.

The demo's frozen T5 answers every held-in question behind a soft prompt: where the picture's answers are no
better than the T5's from the scene's whole description, the T5 is the first suspect (a reference, not a
bound: a soft prompt need not read like the description). This probe separates two failures with fresh
records of the text corpus (:mod:`ibkit.shapes.text_corpus`): one object (reading an attribute) against two to
four (binding the attribute to the object the question names), e.g. for the demo's LM::

    python -m ibkit.shapes.probe outputs/demo/lm/model
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ibkit.shapes.scenes import QA_TYPES, TRAIN_PAIRS, describe, sample_scene
from ibkit.shapes.text_corpus import KINDS, make_item
from ibkit.training.text_lm import greedy_answers, normalize_answer

#: the kinds the probe asks by default: one-word answers, each decided by the description
PROBE_KINDS = ("qa_color", "qa_shape", "qa_size", "qa_side", "qa_exists", "qa_count", "true_false")
OBJECT_COUNTS = (1, 2, 3, 4)
Answerer = Callable[[list[str]], list[str]]  # prompts -> greedy answers


def probe_records(kind: str, objects: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` records of ``kind`` about fresh scenes of exactly ``objects`` objects (held-in shape/colour
    pairs, as the corpus has them); ``[]`` where no scene of that size has such a question (true/false
    needs two objects)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {list(KINDS)}")
    if not 1 <= objects <= 4:
        raise ValueError(f"objects: {objects}; a shapes scene has 1 to 4")
    rng = random.Random(f"ibkit-shapes-probe:{seed}:{kind}:{objects}")
    records: list[dict[str, Any]] = []
    for _ in range(50 * count):
        if len(records) == count:
            break
        scene = sample_scene(rng, objects, TRAIN_PAIRS)
        item = make_item(rng, scene, kind)
        if item is not None:
            instruction, _, answers = item
            records.append({"prompt": f"{describe(scene)} {instruction}", "answers": answers,
                            "kind": kind, "objects": len(scene.objects)})
    return records


def score(answer: Answerer, records: Sequence[dict[str, Any]], batch_size: int = 100) -> dict[str, float]:
    """Exact-match accuracy (word by word, as the LM step's validation) with its binomial standard error."""
    right = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        for said, record in zip(answer([r["prompt"] for r in chunk]), chunk):
            right += normalize_answer(said) in {normalize_answer(a) for a in record["answers"]}
    n = len(records)
    value = right / n if n else math.nan
    return {"value": value, "stderr": math.sqrt(value * (1 - value) / n) if n else math.nan, "n": n}


def binding_table(answer: Answerer, kinds: Sequence[str] = PROBE_KINDS, objects: Sequence[int] = OBJECT_COUNTS,
                  per_cell: int = 200, seed: int = 0) -> dict[str, dict[int, dict[str, float]]]:
    """``{kind: {objects: {value, stderr, n}}}``; cells without a question are left out."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for kind in kinds:
        for n in objects:
            records = probe_records(kind, n, per_cell, seed)
            if records:
                table.setdefault(kind, {})[n] = score(answer, records)
    return table


def held_in_from_text(lm_dir: str | Path, per_cell: int = 200) -> dict[str, dict[str, dict[str, float]]]:
    """The demo's T5 on each held-in VQA question type from descriptions instead of pictures, ``{type: {"1":
    cell, ...}}`` as the demo keeps held-in VQA by number of shapes: the reference for the image path."""
    table = binding_table(language_model_answerer(str(lm_dir)), kinds=[f"qa_{kind}" for kind in QA_TYPES],
                          per_cell=per_cell)
    return {kind.removeprefix("qa_"): {str(count): cell for count, cell in row.items()} for kind, row in table.items()}


def format_table(table: dict[str, dict[int, dict[str, float]]]) -> str:
    """A Markdown table: a row per kind, a column per number of objects, accuracy ± standard error."""
    counts = sorted({n for row in table.values() for n in row})
    lines = ["| kind | " + " | ".join(f"{n} object{'s' if n > 1 else ''}" for n in counts) + " |",
             "|---|" + "---:|" * len(counts)]
    for kind, row in table.items():
        cells = [f"{row[n]['value']:.2f} ± {row[n]['stderr']:.2f}" if n in row else "-" for n in counts]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def language_model_answerer(model_dir: str, max_new_tokens: int = 8) -> Answerer:
    """Greedy answers of the language model folder ``model_dir`` (what ``ibkit export`` writes), loaded as
    the later stages load it (``ibkit.LanguageModel(name_or_path=...)``)."""
    from transformers import AutoTokenizer

    from ibkit.models.language import LanguageModel

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a language model folder (no config.json); the demo writes its T5 to "
                                "<output_dir>/lm/model, `ibkit export` of a text LM run writes one where it is told")
    model = LanguageModel(name_or_path=model_dir, frozen=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not model.is_encoder_decoder:
        tokenizer.padding_side = "left"  # a causal LM continues the prompt's last token

    def answer(prompts: list[str]) -> list[str]:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        return greedy_answers(model, tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens)

    return answer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ibkit.shapes.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a language model folder, e.g. outputs/demo/lm/model")
    parser.add_argument("--per-cell", type=int, default=200, help="records per (kind, number of objects)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", default=list(PROBE_KINDS), choices=list(KINDS))
    args = parser.parse_args(argv)
    try:
        answer = language_model_answerer(args.model_dir)
    except FileNotFoundError as error:
        parser.error(str(error))
    table = binding_table(answer, args.kinds, per_cell=args.per_cell, seed=args.seed)
    print(format_table(table))


if __name__ == "__main__":
    main()
