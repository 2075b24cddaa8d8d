"""The dataset registry: what each dataset is, where its files live, how it is read and evaluated.

One ``DatasetSpec`` per dataset ties together the task family, whether it is held-in (training
mixture) or held-out (zero-shot evaluation), the annotation files (relative to one data root), the
reader for the official format, the zero-shot prompt, metric, evaluation mode and generation
settings. Everything downstream (sampler, datamodule, evaluation, ``ibkit data list/check``) looks
datasets up here instead of hard-coding them.

File roles: a role named after a split (``"train"``) or starting with ``"<split>."``
(``"train.questions"``) holds that split's annotations; ``"images"`` / ``"videos"`` are media
folders; any other role (``"pid_splits"``) is an auxiliary file every split needs. Roles listed in
``optional`` may be absent.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ibkit.data.errors import SkipCounter
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
METRICS = ("cider", "vqa_accuracy", "accuracy", "auc", "mrr", "ivqa_accuracy", "none")
EVAL_MODES = ("generate", "rank")
MEDIA_ROLES = ("images", "videos")
SUITES = ("instructblip", "finetune", "shapes")  # finetune: evaluation variants of the 26 (Table 3)


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
    eval_split: str | None = None  # the split the paper evaluates on (held-out) or validates on (held-in)
    description: str = ""

    def __post_init__(self) -> None:
        where = f"DatasetSpec {self.name!r}"
        if self.family not in FAMILIES:
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
        unknown = [role for role in self.optional if role not in self.files]
        if unknown:
            raise ValueError(f"{where}: optional roles {unknown} are not in files {sorted(self.files)}")


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> None:
    """Add a dataset; a second spec under the same name is an error (no silent shadowing)."""
    if spec.name in _REGISTRY:
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


def split_roles(spec: DatasetSpec, split: str) -> list[str]:
    """The annotation roles that belong to ``split``."""
    return [role for role in spec.files if role == split or role.startswith(split + ".")]


def shared_roles(spec: DatasetSpec) -> list[str]:
    """Auxiliary annotation roles every split needs (neither media nor tied to a split)."""
    return [
        role
        for role in spec.files
        if role not in MEDIA_ROLES and not any(role == s or role.startswith(s + ".") for s in spec.splits)
    ]


def required_roles(spec: DatasetSpec, split: str) -> list[str]:
    """Annotation files that must exist to read ``split``."""
    return [role for role in split_roles(spec, split) + shared_roles(spec) if role not in spec.optional]


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
    for role in required_roles(spec, split):
        if not paths[role].is_file():
            raise FileNotFoundError(
                f"{name}: annotation file for split {split!r} (role {role!r}) not found: expected {paths[role]}"
            )
    skips = skips if skips is not None else SkipCounter(name, strict=strict)
    if _reader_takes_skips(spec.reader):
        samples = spec.reader(paths, split, skips=skips)
    else:
        samples = spec.reader(paths, split)
    skips.log_summary()
    return samples


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


# --------------------------------------------------------------------------------------------------
# The 26 datasets of the paper (13 held-in, 13 held-out).
# Generation settings follow LAVIS (reference/instructblip.md): length_penalty -1 is the FlanT5 value
# for short answers (Vicuna uses 0; the evaluation code may override it per LLM).
# --------------------------------------------------------------------------------------------------

_R = "ibkit.data.readers."
GEN_CAPTION = {"num_beams": 5, "max_new_tokens": 80, "min_new_tokens": 10, "length_penalty": 1.0}
GEN_SHORT = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}
GEN_QUESTION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0}
GEN_LONG = {
    "num_beams": 5,
    "max_new_tokens": 256,
    "min_new_tokens": 1,
    "length_penalty": 1.0,
    "repetition_penalty": 1.5,
}
PROMPT_CAPTION = "A short image description:"
PROMPT_SHORT_QA = "Question: {question} Short answer:"
PROMPT_OCR_QA = "[[OCR tokens: {ocr}. ]]Question: {question} Short answer:"
PROMPT_VQG = "Given the image, generate a question whose answer is: {answer}. Question:"
PROMPT_LLAVA = "[[{context}\n]]{question}"

_COCO_IMAGES = "coco/images"  # holds train2014/ val2014/ (VQAv2, OKVQA, COCO Caption) and train2017/ val2017/


def _builtin_specs() -> list[DatasetSpec]:
    def vqa_pair_files(folder: str, question_pattern: str, annotation_pattern: str) -> dict[str, str]:
        files = {}
        for split in ("train", "val"):
            files[f"{split}.questions"] = f"{folder}/{question_pattern.format(split=split)}"
            files[f"{split}.annotations"] = f"{folder}/{annotation_pattern.format(split=split)}"
        files["images"] = _COCO_IMAGES
        return files

    vqav2_files = vqa_pair_files(
        "vqav2", "v2_OpenEnded_mscoco_{split}2014_questions.json", "v2_mscoco_{split}2014_annotations.json"
    )
    okvqa_files = vqa_pair_files(
        "okvqa", "OpenEnded_mscoco_{split}2014_questions.json", "mscoco_{split}2014_annotations.json"
    )
    aokvqa_files = {s: f"aokvqa/aokvqa_v1p0_{s}.json" for s in ("train", "val", "test")} | {
        "images": _COCO_IMAGES
    }
    llava_common = dict(
        family="llava_visual_instruction",
        held_in=True,
        splits=("train",),
        metric="none",
        eval_mode="generate",
        prompt=PROMPT_LLAVA,
        templates="llava",
        generation=GEN_LONG,
    )
    vqg_common = dict(
        family="image_question_generation",
        held_in=True,
        splits=("train", "val"),
        metric="none",
        eval_mode="generate",
        prompt=PROMPT_VQG,
        templates="vqg",
        generation=GEN_QUESTION,
    )
    textvqa_ocr = {f"{s}.ocr": f"textvqa/TextVQA_Rosetta_OCR_v0.2_{s}.json" for s in ("train", "val", "test")}
    mc_prompt = "Question: {question} Options: {options}. Short answer:"
    specs = [
        # ---------------------------------------------------------------- held-in (13)
        DatasetSpec(
            name="coco_caption",
            family="image_captioning",
            held_in=True,
            files={
                "train": "coco_caption/coco_karpathy_train.json",
                "val": "coco_caption/coco_karpathy_val.json",
                "test": "coco_caption/coco_karpathy_test.json",
                "images": _COCO_IMAGES,
            },
            reader=LazyReader(_R + "captions:read_coco_caption"),
            splits=("train", "val", "test"),
            metric="cider",
            eval_mode="generate",
            prompt=PROMPT_CAPTION,
            templates="caption",
            generation=GEN_CAPTION,
            description="COCO Caption, Karpathy split (or captions_*2014.json)",
        ),
        DatasetSpec(
            name="capfilt",
            family="image_captioning",
            held_in=True,
            files={"train": "capfilt/ccs_synthetic_filtered_large.json", "images": "capfilt/images"},
            reader=LazyReader(_R + "captions:read_capfilt"),
            splits=("train",),
            metric="none",
            eval_mode="generate",
            prompt=PROMPT_CAPTION,
            templates="caption",
            generation=GEN_CAPTION,
            description="Web CapFilt (BLIP synthetic captions); images at images/<sha1(url)>.jpg",
        ),
        DatasetSpec(
            name="textcaps",
            family="image_captioning_reading_comprehension",
            held_in=True,
            files={
                "train": "textcaps/TextCaps_0.1_train.json",
                "val": "textcaps/TextCaps_0.1_val.json",
                "test": "textcaps/TextCaps_0.1_test.json",
                "ocr_train": "textvqa/TextVQA_Rosetta_OCR_v0.2_train.json",
                "ocr_val": "textvqa/TextVQA_Rosetta_OCR_v0.2_val.json",
                "ocr_test": "textvqa/TextVQA_Rosetta_OCR_v0.2_test.json",
                "images": "textvqa/images",
            },
            optional=("ocr_train", "ocr_val", "ocr_test"),
            reader=LazyReader(_R + "captions:read_textcaps"),
            splits=("train", "val", "test"),
            metric="cider",
            eval_mode="generate",
            prompt="[[OCR tokens: {ocr}. ]]" + PROMPT_CAPTION,
            templates="caption_ocr",
            generation=GEN_CAPTION,
            description="TextCaps 0.1 (images and Rosetta OCR shared with TextVQA)",
        ),
        DatasetSpec(
            name="vqav2",
            family="image_qa",
            held_in=True,
            files=vqav2_files,
            reader=LazyReader(_R + "vqa:read_vqav2"),
            splits=("train", "val"),
            metric="vqa_accuracy",
            eval_mode="generate",
            prompt=PROMPT_SHORT_QA,
            templates="vqa",
            generation=GEN_SHORT,
            description="VQAv2 official questions + annotations pair",
        ),
        DatasetSpec(
            name="okvqa",
            family="knowledge_grounded_image_qa",
            held_in=True,
            files=okvqa_files,
            reader=LazyReader(_R + "vqa:read_okvqa"),
            splits=("train", "val"),
            metric="vqa_accuracy",
            eval_mode="generate",
            prompt=PROMPT_SHORT_QA,
            templates="vqa",
            generation=GEN_SHORT,
            description="OK-VQA v1.1 (VQA-style questions + annotations pair)",
        ),
        DatasetSpec(
            name="aokvqa",
            family="knowledge_grounded_image_qa",
            held_in=True,
            files=aokvqa_files,
            reader=LazyReader(_R + "vqa:read_aokvqa"),
            splits=("train", "val", "test"),
            metric="vqa_accuracy",
            eval_mode="generate",
            prompt=PROMPT_SHORT_QA,
            templates="vqa",
            generation=GEN_SHORT,
            description="A-OKVQA v1.0 (direct answers; choices kept as candidates)",
        ),
        DatasetSpec(
            name="ocrvqa",
            family="image_qa_reading_comprehension",
            held_in=True,
            files={s: "ocrvqa/dataset.json" for s in ("train", "val", "test")} | {"images": "ocrvqa/images"},
            reader=LazyReader(_R + "vqa:read_ocrvqa"),
            splits=("train", "val", "test"),
            metric="accuracy",
            eval_mode="generate",
            prompt=PROMPT_OCR_QA,
            templates="vqa_ocr",
            generation=GEN_SHORT,
            description="OCR-VQA dataset.json (split codes 1/2/3)",
        ),
        DatasetSpec(
            name="llava_conversation",
            files={"train": "llava_instruct/conversation_58k.json", "images": _COCO_IMAGES},
            reader=LazyReader(_R + "dialog:read_llava_conversation"),
            description="LLaVA-Instruct-150K conversations (every turn a sample, earlier turns as context)",
            **llava_common,
        ),
        DatasetSpec(
            name="llava_detail",
            files={"train": "llava_instruct/detail_23k.json", "images": _COCO_IMAGES},
            reader=LazyReader(_R + "dialog:read_llava_detail"),
            description="LLaVA-Instruct-150K detailed image descriptions",
            **llava_common,
        ),
        DatasetSpec(
            name="llava_reasoning",
            files={"train": "llava_instruct/complex_reasoning_77k.json", "images": _COCO_IMAGES},
            reader=LazyReader(_R + "dialog:read_llava_reasoning"),
            description="LLaVA-Instruct-150K complex reasoning",
            **llava_common,
        ),
        DatasetSpec(
            name="vqg_vqav2",
            files=vqav2_files,
            reader=LazyReader(_R + "vqa:read_vqg_vqav2"),
            description="question generation from VQAv2 (answer in, question out)",
            **vqg_common,
        ),
        DatasetSpec(
            name="vqg_okvqa",
            files=okvqa_files,
            reader=LazyReader(_R + "vqa:read_vqg_okvqa"),
            description="question generation from OK-VQA",
            **vqg_common,
        ),
        DatasetSpec(
            name="vqg_aokvqa",
            files={k: v for k, v in aokvqa_files.items() if k != "test"},
            reader=LazyReader(_R + "vqa:read_vqg_aokvqa"),
            description="question generation from A-OKVQA",
            **vqg_common,
        ),
        # ---------------------------------------------------------------- held-out (13)
        DatasetSpec(
            name="nocaps",
            family="image_captioning",
            held_in=False,
            files={
                "val": "nocaps/nocaps_val_4500_captions.json",
                "test": "nocaps/nocaps_test_image_info.json",
                "images": "nocaps/images",
            },
            reader=LazyReader(_R + "captions:read_nocaps"),
            splits=("val", "test"),
            metric="cider",
            eval_mode="generate",
            prompt=PROMPT_CAPTION,
            templates="caption",
            generation=GEN_CAPTION,
            description="NoCaps (images at images/<split>/<open_images_id>.jpg)",
        ),
        DatasetSpec(
            name="flickr30k",
            family="image_captioning",
            held_in=False,
            files={s: "flickr30k/dataset_flickr30k.json" for s in ("train", "val", "test")}
            | {"images": "flickr30k/flickr30k-images"},
            reader=LazyReader(_R + "captions:read_flickr30k"),
            splits=("train", "val", "test"),
            metric="cider",
            eval_mode="generate",
            prompt=PROMPT_CAPTION,
            templates="caption",
            generation=GEN_CAPTION,
            description="Flickr30K, Karpathy split (dataset_flickr30k.json)",
        ),
        DatasetSpec(
            name="gqa",
            family="visual_reasoning",
            held_in=False,
            files={
                "train": "gqa/train_balanced_questions.json",
                "val": "gqa/val_balanced_questions.json",
                "testdev": "gqa/testdev_balanced_questions.json",
                "images": "gqa/images",
            },
            reader=LazyReader(_R + "vqa:read_gqa"),
            splits=("train", "val", "testdev"),
            metric="accuracy",
            eval_mode="generate",
            prompt=PROMPT_SHORT_QA,
            templates="vqa",
            generation=GEN_SHORT,
            description="GQA balanced questions (official dict or LAVIS list)",
        ),
        DatasetSpec(
            name="vsr",
            family="visual_reasoning",
            held_in=False,
            files={s: f"vsr/splits/zeroshot/{s}.jsonl" for s in ("train", "dev", "test")}
            | {"images": "vsr/images"},
            reader=LazyReader(_R + "choice:read_vsr"),
            splits=("train", "dev", "test"),
            metric="accuracy",
            eval_mode="rank",
            prompt="Based on the image, is this statement true or false? {question}",
            templates="true_false",
            generation={},
            description="Visual Spatial Reasoning, zero-shot split",
        ),
        DatasetSpec(
            name="iconqa",
            family="visual_reasoning",
            held_in=False,
            files={s: "iconqa/iconqa_data/problems.json" for s in ("train", "val", "test")}
            | {"pid_splits": "iconqa/iconqa_data/pid_splits.json", "images": "iconqa/iconqa_data/iconqa"},
            reader=LazyReader(_R + "choice:read_iconqa"),
            splits=("train", "val", "test"),
            metric="accuracy",
            eval_mode="rank",
            prompt=mc_prompt,
            templates="multiple_choice",
            generation={},
            description="IconQA choose_txt sub-task (problems.json + pid_splits.json)",
        ),
        DatasetSpec(
            name="textvqa",
            family="image_qa_reading_comprehension",
            held_in=False,
            files={s: f"textvqa/TextVQA_0.5.1_{s}.json" for s in ("train", "val", "test")}
            | textvqa_ocr
            | {"images": "textvqa/images"},
            optional=tuple(textvqa_ocr),
            reader=LazyReader(_R + "vqa:read_textvqa"),
            splits=("train", "val", "test"),
            metric="vqa_accuracy",
            eval_mode="generate",
            prompt=PROMPT_OCR_QA,
            templates="vqa_ocr",
            generation=GEN_SHORT,
            description="TextVQA 0.5.1 with Rosetta OCR tokens (first 30)",
        ),
        DatasetSpec(
            name="vizwiz",
            family="image_qa",
            held_in=False,
            files={s: f"vizwiz/{s}.json" for s in ("train", "val", "test")} | {"images": "vizwiz/images"},
            reader=LazyReader(_R + "vqa:read_vizwiz"),
            splits=("train", "val", "test"),
            metric="vqa_accuracy",
            eval_mode="generate",
            prompt=PROMPT_SHORT_QA,
            templates="vqa",
            generation=GEN_SHORT,
            description="VizWiz-VQA (images at images/<split>/VizWiz_<split>_*.jpg)",
        ),
        DatasetSpec(
            name="scienceqa",
            family="knowledge_grounded_image_qa",
            held_in=False,
            files={s: "scienceqa/problems.json" for s in ("train", "val", "test", "minival")}
            | {"pid_splits": "scienceqa/pid_splits.json", "images": "scienceqa/images"},
            reader=LazyReader(_R + "choice:read_scienceqa"),
            splits=("train", "val", "test", "minival"),
            metric="accuracy",
            eval_mode="rank",
            prompt="Context: {context} Question: {question} Options: {options}. Answer:",
            templates="multiple_choice",
            generation={},
            description="ScienceQA, questions with an image only",
        ),
        DatasetSpec(
            name="visdial",
            family="visual_conversational_qa",
            held_in=False,
            files={s: f"visdial/visdial_1.0_{s}.json" for s in ("train", "val", "test")}
            | {"images": "visdial/images"},
            reader=LazyReader(_R + "dialog:read_visdial"),
            splits=("train", "val", "test"),
            metric="mrr",
            eval_mode="rank",
            prompt="Dialog history: {context} Question: {question} Short answer:",
            templates="dialog",
            generation={},
            description="Visual Dialog v1.0 (rank 100 candidate answers)",
        ),
        DatasetSpec(
            name="hatefulmemes",
            family="image_classification",
            held_in=False,
            files={
                s: f"hatefulmemes/{s}.jsonl"
                for s in ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
            }
            | {"images": "hatefulmemes"},
            reader=LazyReader(_R + "choice:read_hatefulmemes"),
            splits=("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen"),
            metric="auc",
            eval_mode="rank",
            prompt='This is an image with: "{text}" written on it. Is it hateful? Answer:',
            templates="classification",
            generation={},
            description="Hateful Memes (candidates no/yes = label 0/1)",
        ),
        DatasetSpec(
            name="msvd_qa",
            family="video_qa",
            held_in=False,
            modality="video",
            files={s: f"msvd_qa/{s}_qa.json" for s in ("train", "val", "test")}
            | {
                "youtube_mapping": "msvd_qa/youtube_mapping.txt",
                "vocab": "msvd_qa/answer_vocab.json",
                "videos": "msvd_qa/videos",
            },
            optional=("vocab",),
            reader=LazyReader(_R + "video:read_msvd_qa"),
            splits=("train", "val", "test"),
            metric="accuracy",
            eval_mode="rank",
            prompt=PROMPT_SHORT_QA,
            templates="video_qa",
            generation={},
            description="MSVD-QA (rank the answer vocabulary; 4 frames)",
        ),
        DatasetSpec(
            name="msrvtt_qa",
            family="video_qa",
            held_in=False,
            modality="video",
            files={s: f"msrvtt_qa/{s}_qa.json" for s in ("train", "val", "test")}
            | {"vocab": "msrvtt_qa/answer_vocab.json", "videos": "msrvtt_qa/videos"},
            optional=("vocab",),
            reader=LazyReader(_R + "video:read_msrvtt_qa"),
            splits=("train", "val", "test"),
            metric="accuracy",
            eval_mode="rank",
            prompt=PROMPT_SHORT_QA,
            templates="video_qa",
            generation={},
            description="MSRVTT-QA (rank the answer vocabulary; 4 frames)",
        ),
        DatasetSpec(
            name="ivqa",
            family="video_qa",
            held_in=False,
            modality="video",
            files={s: f"ivqa/{s}.csv" for s in ("train", "val", "test")} | {"videos": "ivqa/videos"},
            reader=LazyReader(_R + "video:read_ivqa"),
            splits=("train", "val", "test"),
            metric="ivqa_accuracy",
            eval_mode="generate",
            prompt=PROMPT_SHORT_QA,
            templates="video_qa",
            generation=GEN_SHORT,
            description="iVQA (5 answers each; 4 frames)",
        ),
        # ---------------------------------------------------------------- finetuning variants (Table 3)
        DatasetSpec(
            name="aokvqa_mc",
            family="knowledge_grounded_image_qa",
            held_in=True,
            files=aokvqa_files,
            reader=LazyReader(_R + "vqa:read_aokvqa"),
            splits=("train", "val", "test"),
            metric="accuracy",
            eval_mode="rank",
            prompt=mc_prompt,
            templates="multiple_choice",
            generation={},
            suite="finetune",
            description="A-OKVQA multiple choice: the same files, ranking the 4 choices (paper Table 3)",
        ),
    ]
    return [replace(spec, eval_split=_EVAL_SPLITS.get(spec.name)) for spec in specs]


# The paper's zero-shot evaluation split per held-out dataset (VizWiz: the paper used the test-dev
# server; val is the local stand-in with public answers) and the validation split per held-in dataset.
_EVAL_SPLITS = {
    "coco_caption": "val",
    "textcaps": "val",
    "vqav2": "val",
    "okvqa": "val",
    "aokvqa": "val",
    "aokvqa_mc": "val",
    "ocrvqa": "val",
    "vqg_vqav2": "val",
    "vqg_okvqa": "val",
    "vqg_aokvqa": "val",
    "nocaps": "val",
    "flickr30k": "test",
    "gqa": "testdev",
    "vsr": "test",
    "iconqa": "test",
    "textvqa": "val",
    "vizwiz": "val",
    "scienceqa": "test",
    "visdial": "val",
    "hatefulmemes": "dev_seen",
    "msvd_qa": "test",
    "msrvtt_qa": "test",
    "ivqa": "test",
}


for _spec in _builtin_specs():
    register(_spec)
