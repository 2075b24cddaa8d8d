"""Lightning callbacks of ibkit runs (named by ``class_path`` in ``trainer.callbacks``).

They live with training so that data/ stays free of Lightning's Trainer and module types.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ibkit.data.feature_cache import FeatureCacheError, enable_feature_cache

log = logging.getLogger(__name__)


def frozen_encoder_to_cache(module: LightningModule) -> torch.nn.Module:
    """The frozen image encoder whose features a run of ``module`` caches, as that run's training will see it.

    A module given its network already (``model: {class_path: ...}``, weights from ``init_from``) is used as it
    is: its precision policy comes later, in Lightning's ``configure_model``, so features are encoded from the
    stored weights. One that loads its network in ``configure_model`` (``model.pretrained``) is built here.
    ``ibkit data cache-features`` goes through this too, so that a cache built beforehand is the one a fit finds
    (same encoder weights and dtype: the same fingerprint). A trainable encoder is refused."""
    model = getattr(module, "model", None)
    if model is None and callable(getattr(module, "configure_model", None)):
        module.configure_model()  # e.g. model.pretrained: the encoder is needed now
        model = getattr(module, "model", None)
    if model is None:
        raise FeatureCacheError(
            f"feature cache: {type(module).__name__} has no model after configure_model(); "
            "build it in __init__ or configure_model"
        )
    encoder = model.vision_encoder
    if not getattr(encoder, "frozen", False) or any(p.requires_grad for p in encoder.parameters()):
        raise FeatureCacheError(
            f"feature cache: the vision encoder of {type(module).__name__} trains (frozen: false), so its "
            "features change at every step and cached ones would leave it without gradient. Freeze the encoder, "
            "or train without the feature cache (FeatureCacheCallback in trainer.callbacks)."
        )
    return encoder


class FeatureCacheCallback(Callback):
    """Lightning callback: train and evaluate from cached frozen-encoder features.

    Works with instruction tuning (:class:`~ibkit.training.module.InstructBLIPModule`) and BLIP-2
    pre-training (:class:`~ibkit.training.pretrain.Blip2PretrainModule`, both stages): each image is
    encoded once, and the model reads ``image_features`` instead of ``pixel_values``. A trainable
    encoder is refused.

    In YAML: ``trainer.callbacks: [{class_path: ibkit.training.callbacks.FeatureCacheCallback,
    init_args: {cache_dir: cache/features}}]`` together with ``data.train_augment: false``. Missing
    features are computed at ``setup`` on this rank's device (each rank a slice). A model that is
    loaded in ``configure_model`` (``model.pretrained``) is loaded here already, since its encoder is
    needed before the data loaders exist (``configure_model`` is idempotent, so Lightning's own call
    later finds it built); under FSDP that means one unsharded copy per rank, so there prefer
    ``ibkit data cache-features`` beforehand.
    """

    def __init__(
        self, cache_dir: str, dtype: str = "auto", batch_size: int = 32, num_workers: int = 0, progress: bool = True
    ) -> None:
        self.cache_dir = cache_dir
        self.dtype = dtype
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise FeatureCacheError("FeatureCacheCallback needs a datamodule (InstructionDataModule or PretrainDataModule)")
        encoder = frozen_encoder_to_cache(pl_module)
        device = trainer.strategy.root_device
        original = next(iter(encoder.parameters())).device
        encoder.to(device)
        try:
            enable_feature_cache(
                datamodule, encoder, self.cache_dir, stages=(getattr(stage, "value", stage),), dtype=self.dtype,
                batch_size=self.batch_size, num_workers=self.num_workers, rank=trainer.global_rank,
                world_size=trainer.world_size, barrier=lambda: trainer.strategy.barrier("feature_cache"),
                progress=self.progress and trainer.is_global_zero,
            )
        finally:
            encoder.to(original)


class BadInputReport(Callback):
    """Reports skipped bad input at the end of every validation/test epoch (and of finite train epochs).

    Each rank warns with its own per-dataset summary; ``bad_input/total`` is logged summed over ranks.
    """

    def _report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tally = getattr(getattr(trainer, "datamodule", None), "bad_input", None)
        if tally is None:
            return
        if tally.total:
            log.warning("rank %d: %s", trainer.global_rank, tally.summary())
        pl_module.log("bad_input/total", float(tally.total), sync_dist=True, reduce_fx="sum")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module)
