"""``ibkit predict``: answer a file of questions (or one question over a folder of images) with a model.

The file is read by the custom-dataset readers (LLaVA JSON or JSONL, :mod:`ibkit.data.readers.custom`),
batched by the evaluation data path (same transform, collator and prompt) and answered by the
evaluation protocol, so the generation settings are those ``ibkit test`` uses for such a dataset
unless ``--generation`` overrides them. Records with ``choices`` are ranked and get one score per
choice. Output: JSONL ``{id, image, question, answer}`` (+ ``choices``, ``scores``), appended batch by
batch; a second run skips the ids already written, so an interrupted run resumes without duplicates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ibkit.app.assistant import ModelSource, load_model
from ibkit.app.commands import UsageError
from ibkit.data.readers.common import IMAGE_SUFFIXES
from ibkit.data.sample import Sample

log = logging.getLogger(__name__)


def written_ids(output: Path) -> set[str]:
    """Ids already in ``output``; a torn last line (the run was killed mid-write) is cut off."""
    if not output.is_file():
        return set()
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    done, kept = set(), []
    for number, line in enumerate(lines, start=1):
        try:
            done.add(str(json.loads(line)["id"]))
            kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            if number != len(lines):
                raise ValueError(f"{output}: line {number} is not a prediction record; not appending to it") from None
            log.warning("%s: dropping a torn last line (an interrupted run)", output)
    if "".join(kept) != "".join(lines):
        output.write_text("".join(kept), encoding="utf-8")
    return done


def folder_samples(images: Path, question: str) -> list[Sample]:
    """One sample per image file under ``images`` (sorted; id = the path relative to the folder)."""
    files = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [Sample("predict", str(p.relative_to(images)), image=str(p), question=question) for p in files]


def _file_spec(questions: Path, file_format: str, image_root: str | None, prompt: str | None,
               template_set: str, metric: str) -> Any:
    from ibkit.data.registry.custom import CustomDataset

    if file_format == "auto":
        file_format = "llava" if questions.suffix.lower() == ".json" else "jsonl"
    return CustomDataset(
        name=questions.stem, format=file_format, path=str(questions.absolute()), image_root=image_root,
        held_in=False, metric=metric, prompt=prompt, template_set=template_set,
    ).spec()


def _record(sample: Sample, result: dict[str, Any]) -> dict[str, Any]:
    media = sample.video if sample.video is not None else sample.image
    record = {"id": sample.sample_id, "image": media, "question": sample.question, "answer": result["prediction"]}
    if "scores" in result:
        record.update(choices=result["candidates"], scores=result["scores"])
    return record


def predict(
    output: Path,
    model: ModelSource,
    questions: Path | None = None,
    images: Path | None = None,
    question: str | None = None,
    format: str = "auto",
    image_root: str | None = None,
    prompt: str | None = None,
    template_set: str = "none",
    metric: str = "none",
    batch_size: int = 8,
    num_workers: int = 2,
    generation: dict[str, Any] | None = None,
    strict: bool = False,
    progress: bool = True,
) -> int:
    """Answer a file of questions (or one --question over a folder of --images) and write a JSONL of answers.

    Example: ibkit predict answers.jsonl --model.pretrained outputs/demo/instruct/model --questions questions.jsonl

    Args:
        output: the JSONL written (appended to: ids already in it are skipped, so a rerun resumes).
        model: the model (--model.pretrained FOLDER, --model.checkpoint FILE, --model.llm_dtype, --model.device).
        questions: a LLaVA JSON (.json) or JSONL (.jsonl) file of questions, as custom datasets have them.
        images: a folder of images, all asked --question.
        question: the question for --images.
        format: auto (by the file's suffix) | llava | jsonl.
        image_root: folder the file's image paths are relative to (default: the file's folder).
        prompt: instruction template ({question}, {context}, {options}); default: the question as written.
        template_set: the template set whose evaluation prompt to use when --prompt is not given (none:
            the question as written).
        metric: the metric such a file would be evaluated with; it picks the evaluation's generation
            settings (vqa_accuracy, exact_match: short answers; cider: captions; none: long answers).
        batch_size: questions per model call.
        num_workers: image loading workers.
        generation: generation settings over the evaluation's, e.g. '{num_beams: 3, max_new_tokens: 20}'.
        strict: stop at the first malformed record or missing image instead of skipping and counting it.
        progress: show a progress bar.
    """
    from ibkit.data.collate import InstructionCollator, is_empty
    from ibkit.data.dataset import BadInputTally, InstructionDataset
    from ibkit.data.errors import SkipCounter
    from ibkit.data.registry import resolve_paths
    from ibkit.data.registry.custom import CustomDataset
    from ibkit.eval.protocol import predict_batch

    if (questions is None) == (images is None):
        raise UsageError("give --questions FILE, or --images FOLDER with --question TEXT")
    if images is not None:
        if not question:
            raise UsageError("--images needs --question")
        if not Path(images).is_dir():
            raise UsageError(f"--images {images} is not a folder")
        spec = CustomDataset("predict", "jsonl", path=str(images), held_in=False, metric=metric,
                             prompt=prompt, template_set=template_set).spec()
        samples = folder_samples(Path(images), question)
    else:
        if not Path(questions).is_file():
            raise UsageError(f"--questions {questions}: file not found")
        spec = _file_spec(Path(questions), format, image_root, prompt, template_set, metric)
        skips = SkipCounter(spec.name, strict=strict)
        samples = spec.reader(resolve_paths(spec, Path(".")), spec.splits[0], skips=skips)
        skips.log_summary()
        if skips.total:
            print(skips.summary())
    output = Path(output)
    done = written_ids(output)
    todo = [s for s in samples if s.sample_id not in done]
    print(f"{len(samples)} question(s), {len(samples) - len(todo)} already answered in {output}, {len(todo)} to go")
    if not todo:
        return 0

    net, processor = load_model(model)
    tally = BadInputTally()
    collator = InstructionCollator(
        processor.qformer_tokenizer, processor.llm_tokenizer, net.is_encoder_decoder, mode="generate",
        max_qformer_len=processor.max_qformer_length, max_prompt_len=processor.max_prompt_length,
    )
    by_id = {s.sample_id: s for s in todo}
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = _progress(len(todo), progress)
    # ranked (with choices) and generated questions go in separate passes: a batch has one mode
    for mode, group in (("rank", [s for s in todo if s.candidates]), ("generate", [s for s in todo if not s.candidates])):
        if not group:
            continue
        group_spec = replace(spec, eval_mode=mode)
        dataset = InstructionDataset(group, processor.image_transform, name=spec.name, spec=group_spec, strict=strict)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collator)
        with open(output, "a", encoding="utf-8") as handle:
            for batch in loader:
                skipped = batch.pop("skipped", [])
                tally.add(skipped)
                if not is_empty(batch):
                    batch = {k: v.to(net.query_tokens.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    for result in predict_batch(net, batch, group_spec, processor.llm_tokenizer, generation):
                        handle.write(json.dumps(_record(by_id[result["sample_id"]], result)) + "\n")
                    handle.flush()
                bar.update(len(batch.get("sample_ids", [])) + len(skipped))
    bar.close()
    if tally.total:
        print(tally.summary())
    print(f"wrote {output}")
    return 0


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="question", disable=not enabled)
