"""RunCheckpoint: ``last.ckpt`` always holds the weights of the last step (the next pipeline stage reads it)."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from ibkit.training.checkpoint import RunCheckpoint


def test_last_checkpoint_is_the_final_step_when_max_steps_is_not_a_multiple_of_the_interval(tmp_path):
    trainer = Trainer(default_root_dir=tmp_path, max_steps=5, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0,
                      callbacks=[RunCheckpoint(save_top_k=0, save_last=True, every_n_train_steps=3)])
    model = BoringModel()
    trainer.fit(model)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 5
    assert torch.equal(saved["state_dict"]["layer.weight"], model.layer.weight.detach())
