"""Datasets declared in YAML (``InstructionDataModule(custom_datasets=[...])``), registered like the built-in ones.

A custom entry becomes a :class:`DatasetSpec` of suite ``custom``, so everything a registered dataset has
works unchanged: templates (or ``none``: the instruction is the record's own text), a mixing weight,
training (held-in) or evaluation use, strict or lenient bad input, ``ibkit data check --custom FILE``.

Formats: ``llava`` (``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``) and ``jsonl``
(one object a line: ``image``/``video``, ``question``/``instruction``, ``answer``/``answers``, optional
``choices`` + ``label``); see :mod:`ibkit.data.readers.custom`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

from ibkit.data.registry.common import (
    GEN_CAPTION,
    GEN_LONG,
    GEN_SHORT,
    PROMPT_LLAVA,
    PROMPT_MULTIPLE_CHOICE,
    PROMPT_SHORT_QA,
)
from ibkit.data.registry.spec import CUSTOM_FAMILY, DatasetSpec

FORMATS = ("llava", "jsonl")
TASKS = ("generate", "rank")
#: the metric names a custom entry may give -> (the registry's metric, the task it needs; None: either)
METRIC_NAMES: dict[str, tuple[str, str | None]] = {
    "vqa_accuracy": ("vqa_accuracy", "generate"),
    "exact_match": ("accuracy", "generate"),  # generated text == an answer, after VQA normalisation
    "cider": ("cider", "generate"),
    "accuracy": ("accuracy", None),  # rank: the top-scored choice is the label; generate: exact match
    "auc": ("auc", "rank"),  # choices must include "yes" (its probability is the score)
    "mrr": ("mrr", "rank"),
    "none": ("none", None),  # predictions only (e.g. long free-form answers)
}
_PROMPTS = {"none": PROMPT_LLAVA, "llava": PROMPT_LLAVA, "vqa": PROMPT_SHORT_QA, "multiple_choice": PROMPT_MULTIPLE_CHOICE}
_GENERATION = {"cider": GEN_CAPTION, "vqa_accuracy": GEN_SHORT, "accuracy": GEN_SHORT, "none": GEN_LONG}


@dataclass(frozen=True)
class CustomDataset:
    """One dataset declared in YAML.

    Args:
        name: the dataset's name (in ``datasets``, ``eval_datasets``, results and predictions).
        format: ``llava`` or ``jsonl``.
        path: one annotation file (the ``train`` split when held-in, ``test`` otherwise), or
        files: ``{split: file}`` for several splits. Relative paths start at the datamodule's ``data_root``.
        image_root: folder the records' image/video paths are relative to (default: the first file's folder).
        task: ``generate`` (free text) or ``rank`` (score the record's ``choices``).
        metric: vqa_accuracy | exact_match | cider | accuracy | auc | mrr | none (default: none for llava,
            vqa_accuracy for jsonl generate, accuracy for rank).
        template_set: ``none`` (the record's own instruction, earlier turns as context) or a template set
            of :mod:`ibkit.data.templates` (``vqa``, ``llava``, ``multiple_choice`` ...).
        prompt: the evaluation / prediction prompt (``{question}``, ``{context}``, ``{options}``); default
            follows ``template_set``.
        weight: mixing multiplier over the mixing mode's base weight.
        held_in: True: trained on (and evaluated on ``eval_split`` when given); False: evaluation only.
        eval_split: the split evaluated on.
        generation: generation settings over the metric's defaults (e.g. ``{num_beams: 3}``).
        modality: ``image`` or ``video`` (frames sampled as for the registered video datasets).
    """

    name: str
    format: str
    path: str | None = None
    files: Mapping[str, str] | None = None
    image_root: str | None = None
    task: str = "generate"
    metric: str | None = None
    template_set: str = "none"
    prompt: str | None = None
    weight: float | None = None
    held_in: bool = True
    eval_split: str | None = None
    generation: Mapping[str, Any] | None = None
    modality: str = "image"
    description: str = ""

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any] | CustomDataset) -> CustomDataset:
        if isinstance(entry, CustomDataset):
            return entry
        if not isinstance(entry, Mapping):
            raise ValueError(f"a custom dataset is a mapping with name, format and path, got {entry!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(entry) - known)
        where = f"custom dataset {entry.get('name', '?')!r}"
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        missing = [key for key in ("name", "format") if not entry.get(key)]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        return cls(**dict(entry))

    def split_files(self) -> dict[str, str]:
        where = f"custom dataset {self.name!r}"
        if (self.path is None) == (self.files is None):
            raise ValueError(f"{where}: give exactly one of `path` (one file) and `files` ({{split: file}})")
        if self.path is not None:
            return {"train" if self.held_in else "test": str(self.path)}
        if not self.files or any(role in ("images", "videos") for role in self.files):
            raise ValueError(f"{where}: `files` maps split names to annotation files, got {dict(self.files or {})}")
        return {str(split): str(file) for split, file in self.files.items()}

    def spec(self) -> DatasetSpec:
        """The registry entry: reader, splits, metric, mode, prompt, templates and generation settings."""
        from ibkit.data.readers.custom import read_custom_jsonl, read_custom_llava
        from ibkit.data.templates import NO_TEMPLATES, PROMPT_AS_WRITTEN, TEMPLATES

        where = f"custom dataset {self.name!r}"
        if self.format not in FORMATS:
            raise ValueError(f"{where}: unknown format {self.format!r}; choose one of {FORMATS}")
        if self.task not in TASKS:
            raise ValueError(f"{where}: unknown task {self.task!r}; choose one of {TASKS}")
        if self.format == "llava" and self.task != "generate":
            raise ValueError(f"{where}: LLaVA conversations are answered by generation (task: generate)")
        default = "accuracy" if self.task == "rank" else "none" if self.format == "llava" else "vqa_accuracy"
        metric_name = self.metric or default
        if metric_name not in METRIC_NAMES:
            raise ValueError(f"{where}: unknown metric {metric_name!r}; choose one of {list(METRIC_NAMES)}")
        metric, needs = METRIC_NAMES[metric_name]
        if needs is not None and needs != self.task:
            raise ValueError(f"{where}: metric {metric_name!r} needs task {needs!r}, the task is {self.task!r}")
        if self.template_set != NO_TEMPLATES and self.template_set not in TEMPLATES:
            raise ValueError(
                f"{where}: unknown template_set {self.template_set!r}; choose none or one of {sorted(TEMPLATES)}"
            )
        files = self.split_files()
        first = next(iter(files.values()))
        image_root = self.image_root if self.image_root is not None else str(Path(first).parent)
        splits = tuple(files)
        eval_split = self.eval_split
        if eval_split is None and not self.held_in:
            eval_split = next((s for s in ("test", "val") if s in splits), splits[-1])
        if self.format == "llava":
            reader = partial(read_custom_llava, dataset=self.name)
        else:
            reader = partial(read_custom_jsonl, dataset=self.name, task=self.task)
        generation = dict(_GENERATION.get(metric, {}) if self.task == "generate" else {})
        generation.update(self.generation or {})
        template_set = self.template_set
        return DatasetSpec(
            name=self.name,
            family=CUSTOM_FAMILY,
            held_in=bool(self.held_in),
            files={**files, "images": image_root},
            reader=reader,
            splits=splits,
            eval_split=eval_split,
            metric=metric,
            eval_mode=self.task,
            prompt=self.prompt or _PROMPTS.get(template_set) or (TEMPLATES.get(template_set) or (PROMPT_AS_WRITTEN,))[0],
            templates=template_set,
            generation=generation,
            modality=self.modality,
            suite="custom",
            description=self.description or f"custom {self.format} dataset {first}",
            media_layout=(f"<the record's {'video' if self.modality == 'video' else 'image'} path>  (relative to "
                          "image_root unless absolute)",),
        )


def register_custom(entries: Sequence[Mapping[str, Any] | CustomDataset] | None) -> list[CustomDataset]:
    """Build and register the specs of ``entries`` (a name declared again replaces its earlier custom spec)."""
    from ibkit.data.registry import register

    datasets = [CustomDataset.from_dict(entry) for entry in entries or []]
    names = [d.name for d in datasets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"custom datasets declared twice: {repeated}")
    for dataset in datasets:
        register(dataset.spec(), replace_custom=True)
    return datasets


def with_custom_roles(
    datasets: Sequence[CustomDataset],
    train: Sequence[str],
    evaluate: Sequence[str],
    multipliers: Mapping[str, float],
) -> tuple[list[str], list[str], dict[str, float]]:
    """The datamodule's training and evaluation names and multipliers with the custom datasets added:
    held-in ones train (and are evaluated on their ``eval_split`` when it is given), held-out ones are
    evaluated; names listed already stay where they are; ``weight`` is the mixing multiplier."""
    train, evaluate, multipliers = list(train), list(evaluate), dict(multipliers)
    for dataset in datasets:
        listed = dataset.name in train or dataset.name in evaluate
        if dataset.held_in and not listed:
            train.append(dataset.name)
        if not listed and (not dataset.held_in or dataset.eval_split is not None):
            evaluate.append(dataset.name)
        if dataset.weight is not None:
            multipliers.setdefault(dataset.name, float(dataset.weight))
    return train, evaluate, multipliers


def entries_from_yaml(path: str | Path) -> list[dict[str, Any]]:
    """Custom entries from a YAML file: a list of entries, ``custom_datasets: [...]``, or a training config
    (``data.init_args.custom_datasets``)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    for key in ("data", "init_args"):
        if isinstance(data, dict) and key in data and "custom_datasets" not in data:
            data = data[key]
    if isinstance(data, dict):
        data = data.get("custom_datasets")
    if not isinstance(data, list):
        raise ValueError(f"{path}: no custom datasets (a list, `custom_datasets:` or `data.init_args.custom_datasets:`)")
    return data
