"""The dataset registry: what each dataset is, where its files live, how it is read and evaluated.

One ``DatasetSpec`` per dataset ties together the task family, whether it is held-in (training
mixture) or held-out (zero-shot evaluation), the annotation files (relative to one data root), the
reader for the official format, the zero-shot prompt, metric, evaluation split and mode and generation
settings. Everything downstream (sampler, datamodule, evaluation, ``ibkit data list/check``) looks
datasets up here instead of hard-coding them.

The paper's 26 datasets (13 held-in, 13 held-out) and their finetuning variants are declared one
module per reader family (``captions``, ``vqa``, ``choice``, ``dialog``, ``video``), each spec with all
of its facts; this package holds the registry itself and registers them in that order.

File roles: a role named after a split (``"train"``) or starting with ``"<split>."``
(``"train.questions"``) holds that split's annotations; ``"images"`` / ``"videos"`` are media
folders; any other role (``"pid_splits"``) is an auxiliary file every split needs. Roles listed in
``optional`` may be absent.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ibkit.data.errors import SkipCounter
from ibkit.data.registry import captions, choice, dialog, video, vqa
from ibkit.data.registry.common import (
    COCO_IMAGES,
    GEN_CAPTION,
    GEN_LONG,
    GEN_QUESTION,
    GEN_SHORT,
    PROMPT_CAPTION,
    PROMPT_LLAVA,
    PROMPT_MULTIPLE_CHOICE,
    PROMPT_OCR_QA,
    PROMPT_SHORT_QA,
    PROMPT_VQG,
)
from ibkit.data.registry.spec import (
    EVAL_MODES,
    FAMILIES,
    MEDIA_ROLES,
    METRICS,
    SUITES,
    DatasetSpec,
    LazyReader,
    annotation_sources,
    required_roles,
    resolve_paths,
    shared_roles,
    split_roles,
)
from ibkit.data.sample import Sample

__all__ = [
    "COCO_IMAGES",
    "EVAL_MODES",
    "FAMILIES",
    "GEN_CAPTION",
    "GEN_LONG",
    "GEN_QUESTION",
    "GEN_SHORT",
    "MEDIA_ROLES",
    "METRICS",
    "OPTIONAL_SUITE_MODULES",
    "PROMPT_CAPTION",
    "PROMPT_LLAVA",
    "PROMPT_MULTIPLE_CHOICE",
    "PROMPT_OCR_QA",
    "PROMPT_SHORT_QA",
    "PROMPT_VQG",
    "SUITES",
    "DatasetSpec",
    "LazyReader",
    "annotation_sources",
    "get_spec",
    "list_specs",
    "load_samples",
    "register",
    "required_roles",
    "resolve_paths",
    "shared_roles",
    "split_roles",
]

_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, replace_custom: bool = False) -> None:
    """Add a dataset; a second spec under the same name is an error (no silent shadowing), except that
    with ``replace_custom`` a custom spec replaces an earlier custom spec of that name (a config read again)."""
    if replace_custom and spec.name not in _REGISTRY:
        _import_optional_suites()  # a custom name must not shadow a suite registered on demand either
    earlier = _REGISTRY.get(spec.name)
    if earlier is not None and not (replace_custom and spec.suite == earlier.suite == "custom"):
        raise ValueError(
            f"dataset {spec.name!r} is already registered (suite {_REGISTRY[spec.name].suite!r})"
        )
    _REGISTRY[spec.name] = spec


# modules that register their own specs at import; imported lazily so the registry has no hard dependency
OPTIONAL_SUITE_MODULES: tuple[str, ...] = ("ibkit.shapes.specs",)


def _import_optional_suites() -> None:
    """Import suites that register themselves (the synthetic ``shapes`` set) if they exist."""
    for module in OPTIONAL_SUITE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # the suite exists but one of its own imports is missing: say so
                raise


def get_spec(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        _import_optional_suites()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown dataset {name!r}; known datasets: {known}")
    return _REGISTRY[name]


def list_specs(suite: str | None = None) -> list[DatasetSpec]:
    """All registered specs (held-in first, then by name), optionally of one suite."""
    _import_optional_suites()
    specs = [spec for spec in _REGISTRY.values() if suite is None or spec.suite == suite]
    return sorted(specs, key=lambda spec: (spec.suite, not spec.held_in, spec.name))


def _reader_takes_skips(reader: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(reader).parameters
    except (TypeError, ValueError):
        return False
    return "skips" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def load_samples(
    name: str,
    root: Path,
    split: str,
    overrides: dict[str, str] | None = None,
    strict: bool = False,
    skips: SkipCounter | None = None,
) -> list[Sample]:
    """Read one split of one dataset into ``Sample``s (images are not opened).

    Missing annotation files raise ``FileNotFoundError`` naming the dataset and the expected path;
    malformed records are skipped and counted (``strict=True`` raises on the first one instead).
    Pass ``skips`` to read the counts afterwards (its own ``strict`` setting then applies).
    """
    spec = get_spec(name)
    if split not in spec.splits:
        raise ValueError(f"{name}: unknown split {split!r}; available splits: {list(spec.splits)}")
    paths = resolve_paths(spec, root, overrides)
    _, missing = annotation_sources(spec, split, paths)
    if missing:
        expected = "; ".join(" or ".join(map(str, options)) for options in missing)
        raise FileNotFoundError(f"{name}: annotation file for split {split!r} not found: expected {expected}")
    skips = skips if skips is not None else SkipCounter(name, strict=strict)
    if _reader_takes_skips(spec.reader):
        samples = spec.reader(paths, split, skips=skips)
    else:
        samples = spec.reader(paths, split)
    skips.log_summary()
    return samples


for _family in (captions, vqa, dialog, choice, video):
    for _spec in _family.SPECS:
        register(_spec)
