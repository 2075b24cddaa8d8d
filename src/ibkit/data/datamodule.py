"""The LightningDataModule: held-in mixture for training, held-out datasets for validation and test.

Training draws come from :class:`~ibkit.data.sampler.MixtureSampler`, which splits one global stream
across ranks itself, so the Trainer must run with ``use_distributed_sampler=False`` (otherwise
Lightning would wrap the sampler in a ``DistributedSampler``). The training loader is infinite: run
with ``max_steps`` and an integer ``val_check_interval`` (``check_val_every_n_epoch=None``).

Resuming: the position in the stream is ``samples consumed = optimizer steps x accumulation x batch
size x world size``, computed from the Trainer's ``global_step`` when a checkpoint is written (never
from how far prefetching workers ran); Lightning stores :meth:`state_dict` in the checkpoint and
the next run continues the identical stream.

Evaluation: one DataLoader per held-out dataset (``eval_dataset_names[i]`` is dataloader ``i``),
each split across ranks without padding or duplicates (ranks may get one batch more or less:
do not call collectives per step; torchmetrics sync at ``compute``).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, Sampler

from ibkit.data.collate import InstructionCollator
from ibkit.data.dataset import BadInputTally, InstructionDataset, MixtureDataset
from ibkit.data.media_check import MediaCheckOptions, require_clean_media
from ibkit.data.registry import get_spec, load_samples
from ibkit.data.registry.custom import register_custom, with_custom_roles
from ibkit.data.sampler import MixtureSampler, MixtureStream, describe_mixture, mixture_weights
from ibkit.data.shard_mixture import shard_dataset, training_stream
from ibkit.data.tokenize import nested_qformer_tokenizer
from ibkit.data.transforms import image_transform
from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)


def eval_split_for(spec: Any, overrides: dict[str, str] | None = None) -> str:
    """The split a dataset is evaluated on: override, else the registry's (the paper's), else test/val."""
    if overrides and spec.name in overrides:
        return overrides[spec.name]
    split = spec.eval_split  # the registry holds the paper's split per dataset
    if split:
        return split
    for candidate in ("test", "testdev", "val", "dev"):
        if candidate in spec.splits:
            return candidate
    return spec.splits[-1]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``[0, n)``: every sample on exactly one rank, no padding."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class InstructionDataModule(LightningDataModule):
    """Instruction-tuning data from the dataset registry, configured from YAML.

    Args:
        datasets: training datasets (held-in registry names), mixed by ``mixing``.
        eval_datasets: held-out datasets served as validation and test loaders (one each).
        data_root: folder that the registry's relative file paths start from.
        paths: per-dataset file role overrides, e.g. ``{"vqav2": {"images": "/fast/coco"}}``.
        mixing: ``sqrt`` (paper), ``proportional`` or ``uniform`` base weights.
        multipliers: per-dataset weight factors over the defaults (A-OKVQA 0.5, OKVQA 2.0).
        one_dataset_per_batch: draw the dataset once per batch (LAVIS's ``MultiIterLoader``), not per sample:
            a batch of short answers is then not padded to the longest caption of the mixture.
        eval_splits: split per eval dataset, over the paper's defaults.
        train_augment / crop_scale: RandomResizedCrop(scale) for training; ``train_augment=False`` trains
            on the deterministic eval transform (counting/spatial data, the frozen-feature cache).
        strict: raise on the first bad record/file instead of skipping and counting it; a strict run also
            decodes every training and evaluation image/video in ``setup`` (before the first step).
        strict_media_sample: the seeded fraction of each set's media files that strict check decodes (0: none).
        max_eval_samples: evaluate a seeded random subset of at most this many samples per dataset.
        skip_missing_eval: drop (with a warning) eval datasets whose annotation files are not under the
            data root, instead of failing: "evaluate every held-out dataset present".
        qformer_tokenizer / llm_tokenizer: the data's own tokenizer folders (``llm_tokenizer`` alone also
            finds an InstructBlipProcessor's ``qformer_tokenizer/``); unset, the model's come through :meth:`connect`.
        is_encoder_decoder: the LLM kind; read from the LLM folder's config.json when left ``None``.
        max_qformer_len / max_prompt_len / max_target_len: training token limits (LAVIS: 128 / 128 / 256).
        eval_max_qformer_len / eval_max_prompt_len: the evaluation batches' limits; by default LAVIS's
            inference: the Q-Former text cut (on the left) as in training (``None``: ``max_qformer_len``),
            the LLM prompt never cut (``None``).
        shards: streamed training sources mixed like ``datasets``: ``{name: pattern}`` or ``{name: {urls:
            pattern, buffer_size, shuffle_shards, template_set, caption_key}}`` of img2dataset webdataset
            shards (local, brace pattern, any fsspec URL); see :mod:`ibkit.data.shards`.
        custom_datasets: datasets declared here (``[{name, format: llava|jsonl, path, task, metric, ...}]``,
            :class:`ibkit.data.registry.custom.CustomDataset`): registered, then trained on (held-in) or evaluated.
    """

    def __init__(
        self,
        datasets: list[str] | None = None,
        eval_datasets: list[str] | None = None,
        data_root: str = "data",
        paths: dict[str, dict[str, str]] | None = None,
        train_split: str = "train",
        eval_splits: dict[str, str] | None = None,
        mixing: str = "sqrt",
        multipliers: dict[str, float] | None = None,
        use_default_multipliers: bool = True,
        one_dataset_per_batch: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        image_size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        horizontal_flip: bool = False,
        train_augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        num_frames: int = 4,
        seed: int = 42,
        strict: bool = False,
        strict_media_sample: float = 1.0,
        max_eval_samples: int | None = None,
        skip_missing_eval: bool = False,
        qformer_tokenizer: str | None = None,
        llm_tokenizer: str | None = None,
        is_encoder_decoder: bool | None = None,
        max_qformer_len: int = 128,
        max_prompt_len: int = 128,
        max_target_len: int = 256,
        eval_max_qformer_len: int | None = None,
        eval_max_prompt_len: int | None = None,
        max_retries: int = 8,
        block_size: int = 4096,
        pin_memory: bool = True,
        shards: dict[str, Any] | None = None,
        custom_datasets: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset_names, self.eval_dataset_names, multipliers = with_custom_roles(
            register_custom(custom_datasets), datasets or [], eval_datasets or [], multipliers or {})
        self.shards = dict(shards or {})
        if not self.dataset_names and not self.eval_dataset_names and not self.shards:
            raise ValueError("InstructionDataModule needs `datasets`/`shards` (training) and/or `eval_datasets`")
        if set(self.shards) & set(self.dataset_names):
            raise ValueError(f"names in both datasets and shards: {sorted(set(self.shards) & set(self.dataset_names))}")
        for name in self.dataset_names + self.eval_dataset_names:
            get_spec(name)  # fails early, listing the known names
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data_root = Path(data_root)
        self.paths = dict(paths or {})
        unknown = sorted(set(self.paths) - set(self.dataset_names) - set(self.eval_dataset_names))
        if unknown:
            raise ValueError(f"path overrides for datasets not in datasets/eval_datasets: {unknown}")
        self.train_split = train_split
        self.eval_splits = dict(eval_splits or {})
        self.mixing = mixing
        self.multipliers = multipliers
        self.use_default_multipliers = use_default_multipliers
        self.one_dataset_per_batch = one_dataset_per_batch
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.horizontal_flip = horizontal_flip
        self.train_augment = train_augment  # False: training uses the deterministic eval transform
        self.crop_scale = tuple(crop_scale)
        self.num_frames = num_frames
        self.seed = seed
        self.strict = strict
        if not 0 <= strict_media_sample <= 1:
            raise ValueError(f"strict_media_sample must be in [0, 1], got {strict_media_sample}")
        self.strict_media_sample = strict_media_sample
        self._media_checked: set[tuple[str, str]] = set()  # (dataset, split) sets the strict check passed
        self.max_eval_samples = max_eval_samples
        self.skip_missing_eval = skip_missing_eval
        self.qformer_tokenizer_path, self.llm_tokenizer_path = qformer_tokenizer, llm_tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.max_lengths = dict(
            max_qformer_len=max_qformer_len, max_prompt_len=max_prompt_len, max_target_len=max_target_len
        )
        self.eval_max_lengths = dict(max_qformer_len=eval_max_qformer_len or max_qformer_len,
                                     max_prompt_len=eval_max_prompt_len)
        self.max_retries = max_retries
        self.block_size = block_size
        self.pin_memory = pin_memory

        self.qformer_tokenizer: Any = None
        self.llm_tokenizer: Any = None
        self.train_dataset: MixtureDataset | None = None
        self.mixture: dict[str, float] = {}
        self.sampler: MixtureSampler | None = None
        self.eval_datasets: list[InstructionDataset] | None = None
        self.bad_input = BadInputTally()
        # Resume bookkeeping: stream position and Trainer.global_step when the position was recorded.
        self._base_position = 0
        self._base_step = 0
        self._saved_stream_slots: int | None = None  # shard streams: slots of the checkpointed run

    # ------------------------------------------------------------------------------------ tokenizers
    def connect(self, processor: Any | None, is_encoder_decoder: bool) -> dict[str, Any] | None:
        """The one hand-over from the model (its LightningModule calls it in ``configure_model``).

        ``processor`` (an ``ibkit.Processor``, None when the model names no tokenizers) carries the model's
        tokenizers; ``is_encoder_decoder`` its LLM kind. A datamodule with tokenizers of its own (folders in
        its config, e.g. the tiny preset's built from its data, or :meth:`setup_tokenizers`) keeps them, and
        the processor refuses them if they number the model's tokens differently; otherwise it takes the
        model's. Returns the text settings its batches are made with (the keyword arguments of
        :class:`InstructionCollator` but ``mode``), None while no tokenizers are known.
        """
        own = self.qformer_tokenizer is not None or self.llm_tokenizer_path or self.qformer_tokenizer_path
        if own:
            if self.is_encoder_decoder is None:
                self.is_encoder_decoder = is_encoder_decoder
            self.ensure_tokenizers()
            if processor is not None:
                processor.check_data_tokenizers(
                    self.qformer_tokenizer, self.llm_tokenizer, (self.qformer_tokenizer_path, self.llm_tokenizer_path)
                )
        elif processor is not None:
            self.setup_tokenizers(processor.qformer_tokenizer, processor.llm_tokenizer, is_encoder_decoder)
        else:
            return None
        return self.text_settings()

    def text_settings(self) -> dict[str, Any]:
        """The tokenizers, LLM kind and length limits batches are collated with."""
        self.ensure_tokenizers()
        return dict(
            qformer_tokenizer=self.qformer_tokenizer,
            llm_tokenizer=self.llm_tokenizer,
            is_encoder_decoder=bool(self.is_encoder_decoder),
            **self.max_lengths,
        )

    def setup_tokenizers(self, qformer_tokenizer: Any, llm_tokenizer: Any, is_encoder_decoder: bool) -> None:
        """Use these tokenizers (before the loaders are made)."""
        self.qformer_tokenizer, self.llm_tokenizer = qformer_tokenizer, llm_tokenizer
        self.is_encoder_decoder = bool(is_encoder_decoder)

    def ensure_tokenizers(self) -> None:
        """Load the tokenizers from the configured folders unless ``setup_tokenizers`` gave them."""
        if self.qformer_tokenizer is not None and self.llm_tokenizer is not None:
            if self.is_encoder_decoder is None:
                raise ValueError("setup_tokenizers needs is_encoder_decoder")
            return
        from transformers import AutoConfig, AutoTokenizer

        qformer_path = self.qformer_tokenizer_path
        if qformer_path is None and self.llm_tokenizer_path is not None:
            nested = nested_qformer_tokenizer(self.llm_tokenizer_path)
            qformer_path = str(nested) if nested is not None else None
        if qformer_path is None or self.llm_tokenizer_path is None:
            raise ValueError(
                "no tokenizers: connect the datamodule to a model (datamodule.connect(processor, is_encoder_decoder)), "
                "call datamodule.setup_tokenizers(qformer_tok, llm_tok, is_encoder_decoder) "
                "or set qformer_tokenizer and llm_tokenizer (folders) in the data config"
            )
        self.qformer_tokenizer = AutoTokenizer.from_pretrained(qformer_path)
        self.llm_tokenizer = AutoTokenizer.from_pretrained(self.llm_tokenizer_path)
        if self.is_encoder_decoder is None:
            try:
                config = AutoConfig.from_pretrained(self.llm_tokenizer_path)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"is_encoder_decoder not set and {self.llm_tokenizer_path} has no readable config.json: {error}"
                ) from error
            text_config = getattr(config, "text_config", None) or config
            self.is_encoder_decoder = bool(getattr(text_config, "is_encoder_decoder", False))

    def _collator(self, mode: str) -> InstructionCollator:
        """Training batches with the training limits; evaluation ("generate") batches with the evaluation ones."""
        settings = self.text_settings() | (self.eval_max_lengths if mode == "generate" else {})
        return InstructionCollator(**settings, mode=mode)

    # ------------------------------------------------------------------------------------ datasets
    def _load(self, name: str, split: str) -> list:
        return load_samples(name, self.data_root, split, overrides=self.paths.get(name), strict=self.strict)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None and (self.dataset_names or self.shards):
            self._setup_train()
        if self.eval_datasets is None and self.eval_dataset_names:
            self._setup_eval()
        if self.strict and self.strict_media_sample > 0:
            self._check_media()

    def _check_media(self) -> None:
        """Strict runs: a bad file stops the run now, naming it, not when training reaches it hours in."""
        sets = [(d.name, self.train_split, d.samples) for d in getattr(self.train_dataset, "datasets", [])
                if isinstance(d, InstructionDataset)]  # streamed shards are checked as they are read
        sets += [(d.name, eval_split_for(d.spec, self.eval_splits), d.samples) for d in self.eval_datasets or []]
        todo = [entry for entry in sets if entry[:2] not in self._media_checked]
        options = MediaCheckOptions(self.strict_media_sample, self.seed, self.num_frames, max(1, self.num_workers))
        require_clean_media(todo, options, progress=True)
        self._media_checked.update(entry[:2] for entry in todo)

    def _setup_train(self) -> None:
        transform = image_transform(
            self.train_augment, self.image_size, self.mean, self.std,
            horizontal_flip=self.horizontal_flip, scale=self.crop_scale,
        )
        parts = []
        for name in self.dataset_names:
            spec = get_spec(name)
            if not spec.held_in:
                log.warning(
                    "training on %s, a held-out dataset: its zero-shot results will not be zero-shot", name
                )
            samples = self._load(name, self.train_split)
            if not samples:
                raise ValueError(
                    f"{name}: split {self.train_split!r} has no usable samples under {self.data_root}"
                )
            parts.append(InstructionDataset(
                samples, transform, name=name, template_set=spec.templates, seed=self.seed,
                num_frames=self.num_frames, strict=self.strict, max_retries=self.max_retries, require_target=True,
            ))
        for name, config in self.shards.items():
            parts.append(shard_dataset(
                name, config, transform, seed=self.seed, strict=self.strict, max_retries=self.max_retries
            ))
        self.train_dataset = MixtureDataset(parts)
        sizes = dict(zip(self.train_dataset.names, self.train_dataset.sizes))
        self.mixture = mixture_weights(sizes, self.mixing, self.multipliers, self.use_default_multipliers)
        log.info("training mixture (%s weights, seed %d):\n%s", self.mixing, self.seed,
                 describe_mixture(sizes, self.mixture))

    def _setup_eval(self) -> None:
        transform = image_transform(False, self.image_size, self.mean, self.std)
        self.eval_datasets = []
        present = []
        for name in self.eval_dataset_names:
            spec = get_spec(name)
            try:
                samples = self._load(name, eval_split_for(spec, self.eval_splits))
            except FileNotFoundError as error:
                if not self.skip_missing_eval:
                    raise
                log.warning("skipping %s: %s", name, error)
                continue
            present.append(name)
            if self.max_eval_samples is not None and len(samples) > self.max_eval_samples:
                keep = sorted(
                    random.Random(f"{self.seed}:{name}").sample(range(len(samples)), self.max_eval_samples)
                )
                samples = [samples[i] for i in keep]
            self.eval_datasets.append(InstructionDataset(
                samples, transform, name=name, spec=spec, num_frames=self.num_frames, strict=self.strict
            ))
        self.eval_dataset_names = present  # dataloader i is eval_dataset_names[i]

    # ------------------------------------------------------------------------------------ distribution
    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _trainer_or_none(self) -> Trainer | None:
        return getattr(self, "trainer", None)

    def _check_trainer_sampler_flag(self, world_size: int) -> None:
        trainer = self._trainer_or_none()
        connector = getattr(trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "InstructionDataModule splits the data across ranks itself: create the Trainer with "
                "use_distributed_sampler=False (trainer.use_distributed_sampler: false in YAML)"
            )

    # ------------------------------------------------------------------------------------ position
    def consumed_samples(self) -> int:
        """Training samples consumed globally, from the Trainer's optimizer steps when attached."""
        trainer = self._trainer_or_none()
        if trainer is None:
            return self._base_position
        _, world_size = self._rank_world()
        steps = max(0, trainer.global_step - self._base_step)
        return self._base_position + steps * trainer.accumulate_grad_batches * self.batch_size * world_size

    def set_consumed_samples(self, consumed: int, global_step: int | None = None) -> None:
        """Continue the stream after ``consumed`` samples (``global_step``: the step they correspond to)."""
        trainer = self._trainer_or_none()
        self._base_position = int(consumed)
        self._base_step = int(
            global_step if global_step is not None else (trainer.global_step if trainer else 0)
        )
        if self.sampler is not None:
            self.sampler.set_position(self._base_position)

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer_or_none()
        return {
            "position": self.consumed_samples(),
            "global_step": trainer.global_step if trainer is not None else self._base_step,
            "seed": self.seed,
            "mixture": dict(self.mixture),
            "bad_input": self.bad_input.state_dict(),
            "stream_slots": getattr(getattr(self.sampler, "stream", None), "num_slots", None),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "position" not in state_dict:
            raise KeyError(f"datamodule state has no 'position' (keys: {sorted(state_dict)})")
        if int(state_dict.get("seed", self.seed)) != self.seed:
            log.warning("resuming with data seed %d, the checkpoint used %s: the data order changes",
                        self.seed, state_dict.get("seed"))
        # Loops (and so global_step) are restored after the datamodule: store the step the position
        # belongs to, and count only steps taken after it.
        self._base_position = int(state_dict["position"])
        self._base_step = int(state_dict.get("global_step", 0))
        self.bad_input.load_state_dict(state_dict.get("bad_input", {}))
        self._saved_stream_slots = state_dict.get("stream_slots")
        if self.sampler is not None:
            self.sampler.set_position(self._base_position)

    # ------------------------------------------------------------------------------------ loaders
    def _loader(self, dataset, sampler, batch_size: int, collate_fn) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        if self.train_dataset is None:
            raise ValueError("no training datasets configured (datamodule.datasets is empty)")
        rank, world_size = self._rank_world()
        self._check_trainer_sampler_flag(world_size)
        stream = training_stream(
            self.train_dataset.datasets,
            [self.mixture[n] for n in self.train_dataset.names],
            seed=self.seed,
            block_size=self.block_size,
            world_size=world_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            one_dataset_per_batch=self.one_dataset_per_batch,
        )
        slots = getattr(stream, "num_slots", None)
        if slots is not None and self._saved_stream_slots not in (None, slots):
            log.warning(
                "resuming shard streams with %d slots (ranks x workers), the checkpoint had %d: shards are "
                "split anew and this epoch may repeat or miss samples",
                slots,
                self._saved_stream_slots,
            )
        self.sampler = _TrainerPositionSampler(stream, self, rank=rank, world_size=world_size)
        return self._loader(self.train_dataset, self.sampler, self.batch_size, self._collator("train"))

    def _eval_loaders(self) -> list[DataLoader]:
        if self.eval_datasets is None:
            self.setup("validate")
        rank, world_size = self._rank_world()
        collate = self._collator("generate")
        return [
            self._loader(dataset, ShardSampler(len(dataset), rank, world_size), self.eval_batch_size, collate)
            for dataset in self.eval_datasets or []
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    # ------------------------------------------------------------------------------------ bad input
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tally the skip records of bad input (they travel in the batch from the workers)."""
        if isinstance(batch, dict) and "skipped" in batch:
            self.bad_input.add(batch.pop("skipped"))
        return batch

    def teardown(self, stage: str) -> None:
        if self.bad_input.total:
            log.warning("%s", self.bad_input.summary())


class _TrainerPositionSampler(MixtureSampler):
    """A MixtureSampler that asks the datamodule for the position each time iteration starts."""

    def __init__(
        self, stream: MixtureStream, datamodule: InstructionDataModule, rank: int, world_size: int
    ) -> None:
        super().__init__(stream, rank=rank, world_size=world_size, position=datamodule.consumed_samples())
        self.datamodule = datamodule

    def __iter__(self):
        self.position = self.datamodule.consumed_samples()
        return super().__iter__()

