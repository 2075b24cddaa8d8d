"""Checkpoints that keep only what cannot be recomputed, written atomically.

The frozen image encoder and LLM come back from their pretrained files on every run, so a training
checkpoint stores the trainable weights (Q-Former, queries, projection, ``ln_vision``, LoRA), the
optimizer and scheduler state, the loops, callbacks and the datamodule's stream position. Loading is
strict: the checkpoint must hold exactly the trainable keys of the model it is loaded into.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ibkit.models.state import clean_name

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def filter_state_dict(state_dict: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if clean_name(k) in keep}


def check_keys(found: set[str], expected: set[str], where: str) -> None:
    """Strict loading: the checkpoint's weight names must be exactly the model's trainable ones."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the checkpoint's trainable weights do not match this model "
            f"(missing {len(missing)}: {missing[:8]}; unexpected {len(unexpected)}: {unexpected[:8]}). "
            "Was it trained with another configuration (Q-Former kind, LoRA, frozen parts)?"
        )


def save_trainable_state(module: Any, checkpoint: dict[str, Any], info: dict[str, Any]) -> None:
    """Keep only ``module.trainable_state_keys()`` in a checkpoint Lightning is writing; record them and ``info``."""
    keep = module.trainable_state_keys()
    checkpoint["state_dict"] = filter_state_dict(checkpoint["state_dict"], keep)
    checkpoint["ibkit"] = {"format": CHECKPOINT_FORMAT, "trainable_keys": sorted(keep), **info}


def check_trainable_state(module: Any, checkpoint: dict[str, Any], pretrained: str | None) -> None:
    """Before Lightning loads ``checkpoint`` into ``module``: its weights must be exactly the trainable ones,
    with their shapes. A full checkpoint (frozen weights included, written elsewhere) is cut down to them."""
    expected = module.trainable_state_keys()
    info = checkpoint.get("ibkit", {})
    if "state_dict" not in checkpoint:
        # FSDP's strategy loads the weights itself (non-strictly) and removes them before this hook:
        # compare the names the checkpoint recorded when it was written
        if "trainable_keys" not in info:
            raise ValueError("checkpoint: no state_dict and no record of its trainable weights")
        check_keys(set(info["trainable_keys"]), expected, "checkpoint")
        return
    state = checkpoint["state_dict"]
    found = {clean_name(k) for k in state}
    if not info:
        known = {clean_name(n) for n, _ in module.named_parameters(remove_duplicate=False)}
        known |= {clean_name(n) for n, _ in module.named_buffers(remove_duplicate=False)}
        unknown = sorted(found - known)
        if unknown:
            raise ValueError(f"checkpoint: weights this model does not have: {unknown[:8]}")
        checkpoint["state_dict"] = state = filter_state_dict(state, expected)
        found = {clean_name(k) for k in state}
    elif info.get("pretrained") != pretrained:
        log.warning("checkpoint was trained on top of %s, this model is %s: the frozen weights differ",
                    info.get("pretrained"), pretrained)
    check_keys(found, expected, "checkpoint")
    own = {clean_name(n): p for n, p in module.named_parameters()}
    wrong = [
        f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(own[clean_name(key)].shape)} here"
        for key, value in state.items()
        if clean_name(key) in own and own[clean_name(key)].numel() > 0  # (FSDP shards can be empty views)
        and tuple(value.shape) != tuple(own[clean_name(key)].shape)
    ]
    if wrong:
        raise ValueError(f"checkpoint: trainable weights of another shape (another configuration?): {wrong[:5]}")


def load_trainable_weights(module: Any, checkpoint: dict[str, Any] | str | Path) -> None:
    """Strictly load the trainable weights of a checkpoint (file or dict) into a built module."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint_file(checkpoint)
    module.on_load_checkpoint(checkpoint)
    _, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if unexpected:
        raise ValueError(f"checkpoint: unexpected weights {unexpected[:8]}")


def _is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact: ``last.ckpt`` is never half written.
    """
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
        except OSError:  # some filesystems do not open directories
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic local writes; reads with ``weights_only=True`` by default."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint written by ibkit (plain tensors and numbers: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - report which file failed and why
        raise ValueError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error})") from error


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a folder of them: its best checkpoint (recorded by ModelCheckpoint in
    ``last.ckpt``) when ``prefer='best'``, else ``last.ckpt``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    last = path / "last.ckpt"
    if prefer == "best" and last.is_file():
        state = load_checkpoint_file(last)
        for value in (state.get("callbacks") or {}).values():
            # ModelCheckpoint (and subclasses such as RunCheckpoint) record the best file in their state
            if isinstance(value, dict) and value.get("best_model_path") and value.get("monitor"):
                best = Path(value["best_model_path"])
                candidates = [best, path / best.name]
                for candidate in candidates:
                    if candidate.is_file():
                        return candidate
    if last.is_file():
        return last
    files = sorted(path.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{path}: folder holds no *.ckpt files")
    return files[-1]


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose default folder is ``<trainer.default_root_dir>/checkpoints``.

    Lightning's default puts checkpoints under the logger's ``version_N`` folder, which changes on
    every run, so ``--ckpt_path last`` would not find the previous run's ``last.ckpt``. With a fixed
    folder a stopped run resumes from where it stopped.
    """

    def _default_dir(self, trainer: Any) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._default_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        self._default_dir(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """``last.ckpt`` holds the final weights even when ``max_steps`` is not a multiple of
        ``every_n_train_steps`` (Lightning would leave the last interval's): the next stage reads it."""
        if self.save_last and trainer.global_step and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
