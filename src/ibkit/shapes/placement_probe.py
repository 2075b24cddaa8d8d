"""Which named shape does a statement's soft prompt place? The Q-Former and the LLM given different texts.

A VSR-like statement names two shapes ("The red circle is to the left of the blue square."). The instruction-aware
Q-Former reads it and hands the frozen LLM a soft prompt; to judge the statement, that prompt has to carry where
the named shapes are. This probe asks: the Q-Former reads the statement under its held-out prompt, as the test
gives it, while the LLM reads the held-in side question about the statement's *subject* or its *object* ("Is the
red circle on the left or on the right of the picture?"), and ranks "left" against "right". As a reference the
Q-Former reads that side question too. A soft prompt that places the subject answers the subject's question
and not the object's; one that places neither answers both at chance. Only shapes as far from the middle as the
held-in side questions ask about count (:data:`ibkit.shapes.scenes.SIDE_THRESHOLD`). For the demo's model::

    python -m ibkit.shapes.placement_probe outputs/demo
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ibkit.data.registry import get_spec
from ibkit.shapes.scenes import SIDE_THRESHOLD

SIDES = ("left", "right")
ROLES = ("subject", "object")
READERS = ("statement", "side question")  # what the Q-Former reads
#: (Q-Former texts, LLM prompts, image paths) -> the LLM's choice among SIDES for each
SideAnswerer = Callable[[list[str], list[str], list[Path]], list[str]]


def side_question(obj: dict[str, Any]) -> str:
    """The held-in side question about ``obj`` (a scene object as stored), as :func:`qa_pool` asks it."""
    return f"Is the {obj['color']} {obj['shape']} on the left or on the right of the picture?"


def placement_items(root: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """One item per (VSR-like record, named shape) whose shape lies SIDE_THRESHOLD or more from the middle: the
    Q-Former's two texts, the LLM's prompt and the answer. ``root`` is a demo output folder (it holds shapes/)."""
    path = Path(root) / "shapes" / "shapes_vsr" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; give the demo's output folder (`make demo` renders shapes/ there)")
    statement_prompt, question_prompt = get_spec("shapes_vsr").prompt, get_spec("shapes_vqa").prompt
    items = []
    for record in json.loads(path.read_text())["records"]:
        try:
            objects, extra = record["scene"]["objects"], record["extra"]
            named = {"subject": objects[extra["subj"]], "object": objects[extra["obj"]]}
            statement = statement_prompt.format(question=record["question"])
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"{path}: record {record.get('id')!r} lacks its scene or its named shapes "
                             f"(scene.objects, extra.subj, extra.obj): {error!r}") from None
        for role, obj in named.items():
            if abs(obj["x"] - 0.5) < SIDE_THRESHOLD:
                continue
            question = question_prompt.format(question=side_question(obj))
            items.append({"id": record["id"], "role": role, "image": path.parent / "images" / record["image"],
                          "qformer": {"statement": statement, "side question": question}, "prompt": question,
                          "answer": SIDES[obj["x"] >= 0.5]})
    return items


def placement_table(answer: SideAnswerer, items: Sequence[dict[str, Any]],
                    batch_size: int = 50) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy (and its binomial standard error, n) per (what the Q-Former reads, whose side the LLM is asked)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for reader in READERS:
        right = {role: 0 for role in ROLES}
        count = {role: 0 for role in ROLES}
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            said = answer([i["qformer"][reader] for i in chunk], [i["prompt"] for i in chunk], [i["image"] for i in chunk])
            for item, side in zip(chunk, said):
                right[item["role"]] += side == item["answer"]
                count[item["role"]] += 1
        table[reader] = {}
        for role in ROLES:
            n = count[role]
            acc = right[role] / n if n else float("nan")
            table[reader][role] = {"accuracy": acc, "se": math.sqrt(acc * (1 - acc) / n) if n else float("nan"), "n": n}
    return table


def format_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| the Q-Former reads | the LLM asked where the subject is | ... where the object is |", "|---|---:|---:|"]
    for reader, roles in table.items():
        cells = [f"{c['accuracy']:.3f} ± {c['se']:.3f} ({c['n']})" for c in (roles[r] for r in ROLES)]
        lines.append(f"| the {reader} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_answerer(model_dir: str | Path) -> SideAnswerer:
    """Ranks "left" against "right" with the InstructBLIP folder ``model_dir`` (what the demo exports to
    <output_dir>/instruct/model), the Q-Former and the LLM each tokenised from its own text, in fp32."""
    import torch
    from PIL import Image

    from ibkit.eval.protocol import candidate_tensors
    from ibkit.models.instructblip import InstructBLIP
    from ibkit.processor import Processor

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not an InstructBLIP folder (no config.json); the demo exports its "
                                "instruction-tuned model to <output_dir>/instruct/model")
    model = InstructBLIP.from_pretrained(folder).eval()
    processor = Processor.from_pretrained(folder)

    @torch.no_grad()
    def answer(qformer_texts: list[str], prompts: list[str], images: list[Path]) -> list[str]:
        q = processor.tokenize(processor.qformer_tokenizer, qformer_texts, processor.max_qformer_length, "right")
        p = processor.tokenize(processor.llm_tokenizer, prompts, processor.max_prompt_length,
                               "right" if model.is_encoder_decoder else "left")
        ids, mask = candidate_tensors(processor.llm_tokenizer, [list(SIDES)] * len(prompts), model.is_encoder_decoder)
        pixels = processor.images([Image.open(path) for path in images])
        scores = model.score_candidates(pixels, q["input_ids"], q["attention_mask"], p["input_ids"],
                                        p["attention_mask"], ids, mask)
        return [SIDES[int(i)] for i in scores.argmax(dim=-1)]

    return answer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ibkit.shapes.placement_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the demo's output folder, e.g. outputs/demo (its shapes/ and model)")
    parser.add_argument("--model", help="an InstructBLIP folder (default: <output_dir>/instruct/model)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    args = parser.parse_args(argv)
    try:
        items = placement_items(args.output_dir, args.split)
        answer = model_answerer(args.model or Path(args.output_dir) / "instruct" / "model")
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(format_table(placement_table(answer, items)))


if __name__ == "__main__":
    main()
