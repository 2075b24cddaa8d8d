"""What a dataset is (``DatasetSpec``) and how its file roles resolve; no registry state lives here.

Kept apart from the package ``__init__`` so the per-family spec modules can import it while the
package registers them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ibkit.data.sample import Sample

FAMILIES = (
    "image_captioning",
    "image_captioning_reading_comprehension",
    "visual_reasoning",
    "image_qa",
    "knowledge_grounded_image_qa",
    "image_qa_reading_comprehension",
    "image_question_generation",
    "video_qa",
    "visual_conversational_qa",
    "image_classification",
    "llava_visual_instruction",
)
CUSTOM_FAMILY = "custom"  # datasets declared in YAML (ibkit.data.registry.custom), not one of the paper's 11
METRICS = ("cider", "vqa_accuracy", "accuracy", "auc", "mrr", "ivqa_accuracy", "none")
EVAL_MODES = ("generate", "rank")
MEDIA_ROLES = ("images", "videos")
SUITES = ("instructblip", "finetune", "shapes", "custom")  # finetune: evaluation variants of the 26 (Table 3)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the rest of ibkit needs to know about one dataset."""

    name: str
    family: str
    held_in: bool
    files: dict[str, str]
    reader: Callable[..., list[Sample]]
    splits: tuple[str, ...]
    metric: str
    eval_mode: str
    prompt: str
    templates: str
    generation: dict = field(default_factory=dict)
    modality: str = "image"
    suite: str = "instructblip"
    optional: tuple[str, ...] = ()  # roles whose files may be missing (e.g. OCR tokens)
    # role -> another role whose file can stand in for it (LLaVA: a per-type file or the merged one)
    alternatives: dict[str, str] = field(default_factory=dict)
    eval_split: str | None = None  # the split the paper evaluates on (held-out) or validates on (held-in)
    # caption targets cleaned as LAVIS's blip_caption processor (the paper's data); generated text keeps its own
    clean_captions: bool = True
    description: str = ""
    # file names under the media folder as the reader builds them (``<field>``: a field of the record);
    # not derivable from ``files``, so ``ibkit data list --layout`` and docs/data.md read them here
    media_layout: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"DatasetSpec {self.name!r}"
        if self.family not in (*FAMILIES, CUSTOM_FAMILY):
            raise ValueError(f"{where}: unknown family {self.family!r}; expected one of {FAMILIES}")
        if self.metric not in METRICS:
            raise ValueError(f"{where}: unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"{where}: unknown eval_mode {self.eval_mode!r}; expected one of {EVAL_MODES}")
        if self.modality not in ("image", "video"):
            raise ValueError(f"{where}: modality must be 'image' or 'video', got {self.modality!r}")
        for split in self.splits:
            if not split_roles(self, split):
                raise ValueError(f"{where}: split {split!r} has no file role ({split!r} or '{split}.<x>')")
        if self.eval_split is not None and self.eval_split not in self.splits:
            raise ValueError(
                f"{where}: eval_split {self.eval_split!r} is not one of the splits {self.splits}"
            )
        if self.media_layout and not any(role in self.files for role in MEDIA_ROLES):
            raise ValueError(f"{where}: media_layout given but no media role ({MEDIA_ROLES}) in files")
        unknown = [role for role in self.optional if role not in self.files]
        unknown += [r for pair in self.alternatives.items() for r in pair if r not in self.files]
        if unknown:
            raise ValueError(f"{where}: optional/alternative roles {unknown} are not in files {sorted(self.files)}")


def split_roles(spec: DatasetSpec, split: str) -> list[str]:
    """The annotation roles that belong to ``split``."""
    return [role for role in spec.files if role == split or role.startswith(split + ".")]


def shared_roles(spec: DatasetSpec) -> list[str]:
    """Auxiliary annotation roles every split needs (neither media nor tied to a split nor a stand-in)."""
    stand_ins = set(spec.alternatives.values())
    return [
        role
        for role in spec.files
        if role not in MEDIA_ROLES and role not in stand_ins
        and not any(role == s or role.startswith(s + ".") for s in spec.splits)
    ]


def required_roles(spec: DatasetSpec, split: str) -> list[str]:
    """Annotation roles that must be present to read ``split`` (each one or its alternative's file)."""
    return [role for role in split_roles(spec, split) + shared_roles(spec) if role not in spec.optional]


def annotation_sources(
    spec: DatasetSpec, split: str, paths: dict[str, Path]
) -> tuple[list[Path], list[list[Path]]]:
    """(the files ``split`` is read from, the missing requirements): a required role whose own file is
    absent is read from its alternative's file when that exists; a missing requirement lists the role's
    path and, where it has one, its alternative's."""
    found: list[Path] = []
    missing: list[list[Path]] = []
    for role in required_roles(spec, split):
        alternative = spec.alternatives.get(role)
        if paths[role].is_file():
            found.append(paths[role])
        elif alternative is not None and paths[alternative].is_file():
            found.append(paths[alternative])
        else:
            missing.append([paths[role]] + ([paths[alternative]] if alternative is not None else []))
    return found, missing


def resolve_paths(spec: DatasetSpec, root: Path, overrides: dict[str, str] | None = None) -> dict[str, Path]:
    """Absolute path for every role; ``overrides`` replace single roles (absolute or root-relative)."""
    root = Path(root).expanduser()
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(spec.files))
    if unknown:
        raise KeyError(
            f"{spec.name}: unknown file role(s) {unknown} in overrides; roles are {sorted(spec.files)}"
        )
    paths: dict[str, Path] = {}
    for role, relative in spec.files.items():
        path = Path(overrides.get(role, relative)).expanduser()
        paths[role] = (path if path.is_absolute() else root / path).absolute()
    return paths


class LazyReader:
    """A reader named by ``"module:function"``, imported on first call so the registry stays light."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._function: Callable[..., list[Sample]] | None = None

    def _resolve(self) -> Callable[..., list[Sample]]:
        if self._function is None:
            module_name, _, attribute = self.target.partition(":")
            self._function = getattr(importlib.import_module(module_name), attribute)
        return self._function

    @property
    def __signature__(self) -> inspect.Signature:  # lets load_samples see the real parameters
        return inspect.signature(self._resolve())

    def __call__(self, paths: dict[str, Path], split: str, **kwargs: Any) -> list[Sample]:
        return self._resolve()(paths, split, **kwargs)

    def __repr__(self) -> str:
        return f"LazyReader({self.target!r})"
