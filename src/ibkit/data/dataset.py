"""Map-style datasets: ``Sample`` -> a dict with pixel values and instruction text, ready to collate.

Bad input (missing or unreadable image, truncated JPEG, video with too few frames, malformed record)
does not stop a run: the item comes back with ``pixel_values=None`` and a skip record
``(dataset, reason, path, sample_id)``; the collator drops it and forwards the record, and the main
process tallies the records (:class:`BadInputTally`) because counters inside DataLoader workers
would never be seen. ``strict=True`` raises instead, naming the file and the record.

Training items may be replaced: when sample ``i`` is bad, samples ``i+1, i+2, ...`` of the same
dataset are tried (each failure counted), so training batches keep their size and the mixture stays
deterministic. Evaluation items are never replaced (every test sample is scored once or skipped).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import Dataset

from ibkit.data.sample import Sample
from ibkit.data.templates import fill_instruction, template_rng, with_zero_shot_instructions
from ibkit.data.transforms import BadInputError, ImageTransform, load_image
from ibkit.data.video import load_video

log = logging.getLogger(__name__)

SkipRecord = tuple[str, str, "str | None", str]  # (dataset, reason, path, sample_id)


class InstructionDataset(Dataset):
    """One dataset's samples with their media loaded and their instruction filled.

    Instruction text: with ``template_set`` (training) a template is drawn with a generator seeded by
    (seed, dataset, index, draw position), so repeats of a sample get varied templates and a resumed
    run draws the same ones; otherwise an existing ``sample.instruction`` is kept, else the dataset's
    zero-shot prompt (``spec``) is filled. ``require_target`` (training) treats a sample without an
    answer as a malformed record; ``max_retries`` > 0 replaces bad samples by the following ones.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: ImageTransform,
        *,
        name: str | None = None,
        template_set: str | None = None,
        spec: Any = None,
        seed: int = 0,
        num_frames: int = 4,
        strict: bool = False,
        max_retries: int = 0,
        require_target: bool = False,
    ) -> None:
        if template_set is None and spec is None and any(s.instruction is None for s in samples):
            raise ValueError(f"{name}: samples without instruction need a template_set or a dataset spec")
        self.samples = list(samples)
        self.transform = transform
        self.name = name or (self.samples[0].dataset if self.samples else "dataset")
        self.template_set = template_set
        self.spec = spec
        self.seed = seed
        self.num_frames = num_frames
        self.strict = strict
        self.max_retries = max_retries
        self.require_target = require_target

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    # --------------------------------------------------------------------------------------------
    def _pixels(self, sample: Sample, rng_seed: int | None) -> torch.Tensor:
        if rng_seed is None:
            return self._load_media(sample)
        # Random crops drawn from a per-draw seed: a resumed run sees the same augmentation.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed)
            return self._load_media(sample)

    def _load_media(self, sample: Sample) -> torch.Tensor:
        if sample.video is not None:
            # iVQA-style records ask about a clip: extra["start"/"end"] in seconds
            start, end = sample.extra.get("start"), sample.extra.get("end")
            return load_video(sample.video, self.transform, self.num_frames, start, end)
        if isinstance(sample.image, str):
            return self.transform(load_image(sample.image))
        if isinstance(sample.image, (list, tuple)) and sample.image:
            # Several images of one record are treated like video frames: (T, 3, H, W).
            return torch.stack([self.transform(load_image(path)) for path in sample.image])
        raise BadInputError("malformed_record", None, "the sample has neither an image nor a video")

    def _prepare(self, index: int, position: int | None) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            if self.template_set is not None:
                rng = template_rng(self.seed, self.name, index, -1 if position is None else position)
                clean = self.spec.clean_captions if self.spec is not None else True
                sample = fill_instruction(sample, self.template_set, rng, clean_captions=clean)
                augment_seed = rng.getrandbits(63)
            else:
                if sample.instruction is None:
                    sample = with_zero_shot_instructions(sample, self.spec)
                elif sample.qformer_question is not None and sample.qformer_instruction is None:
                    sample = replace(sample, qformer_instruction=sample.qformer_question)  # as written
                augment_seed = None
        except (KeyError, ValueError, TypeError, IndexError) as error:
            raise BadInputError(
                "malformed_record", _media_path(sample), f"cannot fill the instruction: {error}"
            ) from error
        if self.require_target and not sample.target:
            raise BadInputError("malformed_record", _media_path(sample), "no answer to train on")
        pixel_values = self._pixels(sample, augment_seed)
        return {
            "pixel_values": pixel_values,
            "instruction": sample.instruction,
            "qformer_instruction": sample.qformer_instruction,
            "target": sample.target,
            "sample_id": sample.sample_id,
            "dataset": sample.dataset,
            "answers": list(sample.answers),
            "candidates": sample.candidates,
            "label": sample.label,
            "image": _media_path(sample),  # the same file = the same image (BLIP-2's ITM negatives)
        }

    def get(self, index: int, position: int | None = None) -> dict[str, Any]:
        """Item ``index``; ``position`` is the training-stream position (seeds templates and crops)."""
        if not 0 <= index < len(self.samples):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self.samples)})")
        skipped: list[SkipRecord] = []
        for attempt in range(self.max_retries + 1):
            current = (index + attempt) % len(self.samples)
            try:
                item = self._prepare(current, position)
            except BadInputError as error:
                sample = self.samples[current]
                if self.strict:
                    raise BadInputError(
                        error.reason,
                        error.path,
                        f"{self.name} record {sample.sample_id!r} (index {current}): {error.detail}",
                    ) from error
                skipped.append((self.name, error.reason, error.path, str(sample.sample_id)))
                continue
            item["skipped"] = skipped
            return item
        sample = self.samples[index]
        return {"pixel_values": None, "sample_id": sample.sample_id, "dataset": self.name, "skipped": skipped}


def _media_path(sample: Sample) -> str | None:
    if sample.video is not None:
        return sample.video
    if isinstance(sample.image, str):
        return sample.image
    if isinstance(sample.image, (list, tuple)) and sample.image:
        return ",".join(sample.image)
    return None


class MixtureDataset(Dataset):
    """Several datasets behind one index: ``(dataset_index, sample_index, position)`` from the sampler."""

    def __init__(self, datasets: Sequence[InstructionDataset]) -> None:
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        self.datasets = list(datasets)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    @property
    def sizes(self) -> list[int]:
        return [len(d) for d in self.datasets]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, key: tuple[int, int, int] | tuple[int, int]) -> dict[str, Any]:
        dataset_index, sample_index, *rest = key
        return self.datasets[dataset_index].get(sample_index, rest[0] if rest else None)


class BadInputTally:
    """Main-process count of skipped inputs per (dataset, reason), with a few example paths.

    Warns at the first skip of each (dataset, reason), so a broken folder shows up at once and
    not only in the end-of-epoch summary.
    """

    def __init__(self, max_examples: int = 3) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], list[str]] = {}
        self.max_examples = max_examples

    def add(self, records: Iterable[Sequence[Any]]) -> None:
        for dataset, reason, path, sample_id in records:
            key = (str(dataset), str(reason))
            if key not in self.counts:
                log.warning(
                    "skipping bad input in %s (%s): record %s, file %s", dataset, reason, sample_id, path
                )
            self.counts[key] += 1
            examples = self.examples.setdefault(key, [])
            if len(examples) < self.max_examples:
                examples.append(f"{sample_id} ({path})")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def per_dataset(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (dataset, reason), count in sorted(self.counts.items()):
            out.setdefault(dataset, {})[reason] = count
        return out

    def summary(self) -> str:
        if not self.counts:
            return "no bad input skipped"
        lines = [f"skipped {self.total} bad input(s):"]
        for (dataset, reason), count in sorted(self.counts.items()):
            lines.append(
                f"  {dataset}: {count} x {reason} (e.g. {'; '.join(self.examples[(dataset, reason)])})"
            )
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": [[d, r, c] for (d, r), c in self.counts.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = Counter({(d, r): int(c) for d, r, c in state.get("counts", [])})
