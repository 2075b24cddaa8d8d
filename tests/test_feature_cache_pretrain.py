"""The frozen-feature cache in BLIP-2 pre-training (`ibkit fit` with FeatureCacheCallback): each image is
encoded once, training matches the uncached run, and a trainable encoder is refused."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch  # noqa: F401 - imported outside capsys: its log handler must not bind a captured stream
import pytest
import torch

from ibkit.app import main
from ibkit.data.feature_store import FeatureCacheError
from ibkit.models.vision.eva_vit import EVAViT

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
CACHE_CALLBACKS = """trainer:
  callbacks:
    - class_path: ibkit.training.callbacks.FeatureCacheCallback
      init_args: {{cache_dir: {cache}, progress: false}}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from ibkit.shapes.datamodule import prepare_tiny_workspace

    root = tmp_path_factory.mktemp("ws")
    prepare_tiny_workspace(root)
    return root


def _fit(config: Path, workspace: Path, run: Path, cache: Path | None, *extra: str) -> dict[str, list[float]]:
    args = ["fit", "--config", str(config)]
    if cache is not None:
        (run / "cache.yaml").parent.mkdir(parents=True, exist_ok=True)
        (run / "cache.yaml").write_text(CACHE_CALLBACKS.format(cache=cache))
        args += ["--config", str(run / "cache.yaml")]
    args += [f"--data.init_args.root={workspace}", f"--trainer.default_root_dir={run}",
             f"--trainer.logger.init_args.save_dir={run}", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
             "--data.init_args.train_augment=false", *extra]
    assert main(args) == 0
    series: dict[str, list[float]] = {}
    for row in csv.DictReader(next(run.rglob("metrics.csv")).open()):
        for key, value in row.items():
            if value not in ("", None) and key not in ("step", "epoch"):
                series.setdefault(key, []).append(float(value))
    return series


@pytest.fixture
def encoder_calls(monkeypatch):
    """Counts the encoder's forward calls outside inference mode (the cache builds under inference mode)."""
    calls = {"training": 0}
    original = EVAViT.forward

    def counted(self, pixel_values):
        if not torch.is_inference_mode_enabled():
            calls["training"] += 1
        return original(self, pixel_values)

    monkeypatch.setattr(EVAViT, "forward", counted)
    return calls


def test_stage1_with_the_cache_trains_like_without_and_never_runs_the_encoder(tmp_path, workspace, encoder_calls):
    config = TINY / "blip2_stage1.yaml"
    plain = _fit(config, workspace, tmp_path / "plain", None)
    assert encoder_calls["training"] > 0
    encoder_calls["training"] = 0
    cache = tmp_path / "cache"
    cached = _fit(config, workspace, tmp_path / "cached", cache)
    assert encoder_calls["training"] == 0  # training and validation read image_features
    assert {p.parent.parent.name for p in cache.rglob("*.safetensors")} >= {"shapes_caption", "shapes_nocaps"}
    # the store keeps fp16 (the encoder computes in fp32): losses agree to fp16 rounding of the features
    for key in ("train/loss_itc", "train/loss_itm", "train/loss_itg", "val/loss"):
        assert len(cached[key]) == len(plain[key]) > 0, key
        torch.testing.assert_close(torch.tensor(cached[key]), torch.tensor(plain[key]), rtol=1e-3, atol=1e-3)


def test_stage2_reads_cached_features(tmp_path, workspace, encoder_calls):
    config = TINY / "blip2_stage2.yaml"
    fresh = "--model.init_args.init_from=null"  # the random tiny model (the chain starts from stage 1's export)
    plain = _fit(config, workspace, tmp_path / "plain", None, fresh)
    encoder_calls["training"] = 0
    cached = _fit(config, workspace, tmp_path / "cached", tmp_path / "cache", fresh)
    assert encoder_calls["training"] == 0
    for key in ("train/loss", "val/loss"):
        torch.testing.assert_close(torch.tensor(cached[key]), torch.tensor(plain[key]), rtol=1e-3, atol=1e-3)


def test_a_trainable_encoder_is_refused(tmp_path, workspace):
    with pytest.raises(FeatureCacheError, match="vision encoder .* trains"):
        _fit(TINY / "blip2_stage1.yaml", workspace, tmp_path / "run", tmp_path / "cache",
             "--model.init_args.model.init_args.vision_encoder.init_args.frozen=false")
