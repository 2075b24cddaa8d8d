"""Frozen-feature cache: cached = fresh, invalidation on any change, refusal of random transforms, datamodule use."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import NUM_QUERIES, QFORMER, T5_TEXT

from ibkit import InstructBLIP, LanguageModel
from ibkit.data.dataset import InstructionDataset
from ibkit.data.feature_cache import (
    CachedFeatureDataset,
    FeatureCacheError,
    FeatureCollator,
    build_features,
    cached_dataset,
    enable_feature_cache,
    media_key,
    open_store,
)
from ibkit.data.sample import Sample
from ibkit.data.transforms import eval_transform, train_transform
from ibkit.models import EVAViT, EVAViTConfig
from ibkit.models.transformers_io import qformer_config_from_hf

IMAGE = 16
VISION = EVAViTConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE, patch_size=8
)


def encoder(seed: int = 0) -> EVAViT:
    torch.manual_seed(seed)
    return EVAViT(VISION)


def write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def make_dataset(paths: list[str], transform=None, name: str = "toy") -> InstructionDataset:
    samples = [
        Sample(dataset=name, sample_id=str(i), image=p, instruction=f"what is in picture {i}?", target="noise")
        for i, p in enumerate(paths)
    ]
    return InstructionDataset(samples, transform or eval_transform(IMAGE), name=name)


def fresh(enc: EVAViT, dataset: InstructionDataset, index: int) -> torch.Tensor:
    with torch.no_grad():
        return enc(dataset._load_media(dataset.samples[index])[None])[0]


def test_cached_features_equal_freshly_computed_ones(tmp_path):
    paths = write_images(tmp_path / "img", 5)
    dataset = make_dataset(paths + [str(tmp_path / "img" / "missing.png")])
    enc = encoder()
    cached = cached_dataset(dataset, enc, tmp_path / "cache", batch_size=2, progress=False)
    assert isinstance(cached, CachedFeatureDataset) and len(cached.store) == 6
    for i in range(5):
        item = cached[i]
        assert "pixel_values" not in item
        feats = item["image_features"]
        assert feats.dtype == torch.float16 and feats.shape == (1 + (IMAGE // 8) ** 2, 32)
        expected = fresh(enc, dataset, i)
        # equal up to the fp16 rounding of storage
        torch.testing.assert_close(feats.float(), expected, rtol=2e-3, atol=2e-3)
        assert item["instruction"] == dataset[i]["instruction"]
    # bad input stays bad input, with the same skip record as the uncached dataset
    assert cached[5]["image_features"] is None
    assert cached[5]["skipped"] == dataset[5]["skipped"] and cached[5]["skipped"][0][1] == "missing_file"
    # a second open finds everything and encodes nothing
    store = open_store(dataset, enc, tmp_path / "cache")
    assert build_features(dataset, enc, store, progress=False) == 0 and len(store) == 6


def test_model_gives_the_same_prompt_from_cached_features(tmp_path):
    paths = write_images(tmp_path / "img", 2)
    dataset = make_dataset(paths)
    torch.manual_seed(0)
    model = InstructBLIP(encoder(), LanguageModel(config=T5_TEXT), qformer_config_from_hf(QFORMER), NUM_QUERIES).eval()
    with torch.no_grad():  # ln_vision trains: it must act on cached features too (a visible bias shows if not)
        model.ln_vision.weight.normal_(1.0, 0.3)
        model.ln_vision.bias.normal_(0.0, 1.0)
    cached = cached_dataset(dataset, model.vision_encoder, tmp_path / "cache", progress=False)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(2)])
    feats = torch.stack([cached[i]["image_features"] for i in range(2)])
    assert feats.dtype == torch.float16  # fp32 encoder: fp16 storage
    ids = torch.randint(1, QFORMER["vocab_size"], (2, 5))
    with torch.no_grad():
        reference = model.visual_prompt(pixels, ids)
        from_cache = model.visual_prompt(None, ids, image_features=feats)
        queries = model.query_tokens.expand(2, -1, -1)
        without_ln = model.language_projection(model.qformer(queries, feats.float(), ids, torch.ones_like(ids)))
    torch.testing.assert_close(from_cache, reference, rtol=1e-4, atol=1e-4)
    assert (without_ln - reference).abs().max() > 1e-2  # the tolerance above would catch a skipped ln_vision

    bf16 = cached_dataset(dataset, model.vision_encoder, tmp_path / "cache_bf16", dtype="bfloat16", progress=False)
    feats16 = torch.stack([bf16[i]["image_features"] for i in range(2)])
    assert feats16.dtype == torch.bfloat16
    with torch.no_grad():
        rounded = model.visual_prompt(None, ids, image_features=model.vision_encoder(pixels).bfloat16())
        torch.testing.assert_close(model.visual_prompt(None, ids, image_features=feats16), rounded, rtol=1e-5, atol=1e-5)


def _cache_dirs(root: Path, name: str = "toy") -> list[str]:
    return sorted(p.name for p in (root / name).iterdir() if p.is_dir())


def test_changed_encoder_or_transform_invalidates_the_cache(tmp_path):
    paths = write_images(tmp_path / "img", 3)
    dataset = make_dataset(paths)
    enc = encoder()
    cached_dataset(dataset, enc, tmp_path / "cache", progress=False)
    first = _cache_dirs(tmp_path / "cache")

    with torch.no_grad():  # one weight of one block changes
        enc.encoder.layers[1].mlp.fc2.bias[0] += 0.5
    rebuilt = cached_dataset(dataset, enc, tmp_path / "cache", progress=False)
    second = _cache_dirs(tmp_path / "cache")
    assert second != first and len(second) == 1  # the stale cache is gone, not kept beside
    torch.testing.assert_close(rebuilt[0]["image_features"].float(), fresh(enc, dataset, 0), rtol=2e-3, atol=2e-3)

    enc.compute_dtype = "bf16"  # same weights, other precision: other features
    cached_dataset(dataset, enc, tmp_path / "cache", progress=False)
    third = _cache_dirs(tmp_path / "cache")
    assert third != second
    enc.compute_dtype = None

    other_norm = make_dataset(paths, eval_transform(IMAGE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    renormed = cached_dataset(other_norm, enc, tmp_path / "cache", progress=False)
    assert _cache_dirs(tmp_path / "cache") not in (first, second, third)
    torch.testing.assert_close(renormed[1]["image_features"].float(), fresh(enc, other_norm, 1), rtol=2e-3, atol=2e-3)


def test_links_to_one_image_share_its_entry_and_a_relinked_path_is_a_miss(tmp_path):
    """Keys name the file a link resolves to: a second workspace linking the same images reads the first's
    entries without encoding anything; a link pointed at another file (same size and mtime) misses."""
    paths = write_images(tmp_path / "img", 3)
    rng = np.random.default_rng(1)
    for path in paths[1:]:  # two different images of one byte size (BMP) and one mtime
        Image.fromarray(rng.integers(0, 255, (22, 24, 3), dtype=np.uint8)).save(path, format="BMP")
        os.utime(path, ns=(7, 7))
    assert os.path.getsize(paths[1]) == os.path.getsize(paths[2])
    (tmp_path / "other").mkdir()
    links = []
    for path in paths:
        link = tmp_path / "other" / Path(path).name
        link.symlink_to(path)
        links.append(str(link))
    enc = encoder()
    first = cached_dataset(make_dataset(paths), enc, tmp_path / "cache", progress=False)
    linked = make_dataset(links)
    assert [media_key(s, 1) for s in linked.samples] == [media_key(s, 1) for s in first.samples]
    calls = []
    enc.register_forward_hook(lambda *_: calls.append(1))
    again = cached_dataset(linked, enc, tmp_path / "cache", progress=False)
    assert calls == []  # every entry found: nothing encoded
    torch.testing.assert_close(again[1]["image_features"].float(), fresh(enc, linked, 1), rtol=2e-3, atol=2e-3)
    Path(links[1]).unlink()
    Path(links[1]).symlink_to(paths[2])  # same size, same mtime, another file: the old entry must not serve it
    assert media_key(linked.samples[1], 1) == media_key(first.samples[2], 1) != media_key(first.samples[1], 1)
    # served the entry of the file it now resolves to, which differs from the one it resolved to before
    torch.testing.assert_close(again[1]["image_features"].float(), fresh(enc, linked, 1), rtol=2e-3, atol=2e-3)
    assert not torch.allclose(fresh(enc, linked, 1), fresh(enc, make_dataset(paths), 1), atol=1e-2)


def test_a_cache_of_the_older_key_format_is_replaced_not_kept_beside(tmp_path, monkeypatch):
    """Keys of format 1 named the path as given: such a cache is another fingerprint, deleted and rebuilt, so
    its entries under the old keys do not stay on disk beside the new ones."""
    import ibkit.data.feature_cache as feature_cache

    dataset, enc = make_dataset(write_images(tmp_path / "img", 2)), encoder()
    monkeypatch.setattr(feature_cache, "FORMAT_VERSION", 1)
    cached_dataset(dataset, enc, tmp_path / "cache", progress=False)
    old = _cache_dirs(tmp_path / "cache")
    monkeypatch.undo()
    assert feature_cache.FORMAT_VERSION > 1
    rebuilt = cached_dataset(dataset, enc, tmp_path / "cache", progress=False)
    new = _cache_dirs(tmp_path / "cache")
    assert len(new) == 1 and new != old
    torch.testing.assert_close(rebuilt[0]["image_features"].float(), fresh(enc, dataset, 0), rtol=2e-3, atol=2e-3)


def test_an_edited_image_file_is_a_miss_not_a_stale_hit(tmp_path):
    paths = write_images(tmp_path / "img", 2)
    dataset = make_dataset(paths)
    enc = encoder()
    cached = cached_dataset(dataset, enc, tmp_path / "cache", progress=False)
    old_key = media_key(dataset.samples[0], dataset.num_frames)
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # another mtime even on coarse file systems
    assert media_key(dataset.samples[0], dataset.num_frames) != old_key
    with pytest.raises(FeatureCacheError, match="cache-features"):
        cached[0]
    again = cached_dataset(dataset, enc, tmp_path / "cache", progress=False)
    torch.testing.assert_close(again[0]["image_features"].float(), fresh(enc, dataset, 0), rtol=2e-3, atol=2e-3)


def test_random_transforms_are_refused(tmp_path):
    dataset = make_dataset(write_images(tmp_path / "img", 1), train_transform(IMAGE))
    with pytest.raises(FeatureCacheError, match="RandomResizedCrop.*train_augment"):
        cached_dataset(dataset, encoder(), tmp_path / "cache", progress=False)


def test_ranks_build_disjoint_slices_that_together_cover_the_dataset(tmp_path):
    dataset = make_dataset(write_images(tmp_path / "img", 5))
    enc = encoder()
    stores = [open_store(dataset, enc, tmp_path / "cache") for _ in range(2)]
    added = [build_features(dataset, enc, s, rank=r, world_size=2, progress=False) for r, s in enumerate(stores)]
    assert added == [3, 2]
    stores[0].reload()
    assert len(stores[0]) == 5
    torch.testing.assert_close(
        stores[0].get(media_key(dataset.samples[4], 4))[0].float(), fresh(enc, dataset, 4), rtol=2e-3, atol=2e-3
    )


def test_datamodule_batches_carry_image_features_and_train_the_same(tmp_path):
    from fixtures_datasets import write_fixture_root
    from test_datamodule import make_dm
    from test_transforms_collate import llama_tokenizer, qformer_tokenizer, t5_tokenizer

    root = tmp_path / "data"
    write_fixture_root(root)
    tokenizers = (qformer_tokenizer(), t5_tokenizer(), llama_tokenizer())
    with pytest.raises(FeatureCacheError, match="train_augment"):
        dm = make_dm(root, tokenizers, image_size=IMAGE)
        dm.setup("fit")
        enable_feature_cache(dm, encoder(), tmp_path / "cache", stages=("fit",), progress=False)

    plain = make_dm(root, tokenizers, image_size=IMAGE, train_augment=False)
    plain.setup("fit")
    dm = make_dm(root, tokenizers, image_size=IMAGE, train_augment=False)
    dm.setup("fit")
    torch.manual_seed(0)
    lm = LanguageModel(config={**T5_TEXT, "vocab_size": len(tokenizers[1])})
    qcfg = qformer_config_from_hf({**QFORMER, "vocab_size": len(tokenizers[0])})
    model = InstructBLIP(encoder(), lm, qcfg, num_query_tokens=NUM_QUERIES).eval()
    added = enable_feature_cache(dm, model.vision_encoder, tmp_path / "cache", stages=("fit",), progress=False)
    assert added > 0
    assert all(isinstance(d, CachedFeatureDataset) for d in dm.train_dataset.datasets + dm.eval_datasets)
    loader = dm.train_dataloader()
    assert isinstance(loader.collate_fn, FeatureCollator)
    batch = next(iter(loader))
    reference = next(iter(plain.train_dataloader()))
    assert "pixel_values" not in batch and batch["image_features"].shape[:2] == (4, 1 + (IMAGE // 8) ** 2)
    assert batch["sample_ids"] == reference["sample_ids"] and batch["instructions"] == reference["instructions"]
    keys = ("qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels")
    with torch.no_grad():
        cached_loss = model(image_features=batch["image_features"], **{k: batch[k] for k in keys}).loss
        loss = model(pixel_values=reference["pixel_values"], **{k: reference[k] for k in keys}).loss
    torch.testing.assert_close(cached_loss, loss, rtol=1e-3, atol=1e-3)
    # validation loaders too (generate mode), with video items as (T, N, D)
    val = dm.val_dataloader()
    assert all(isinstance(v.collate_fn, FeatureCollator) for v in val)
    video_batch = next(iter(val[dm.eval_dataset_names.index("msvd_qa")]))
    assert video_batch["image_features"].dim() == 4


def test_lightning_callback_builds_on_every_rank_then_waits_for_all(tmp_path):
    from types import SimpleNamespace

    from fixtures_datasets import write_fixture_root
    from test_datamodule import make_dm
    from test_transforms_collate import llama_tokenizer, qformer_tokenizer, t5_tokenizer

    from ibkit.training.callbacks import FeatureCacheCallback

    root = tmp_path / "data"
    write_fixture_root(root)
    dm = make_dm(root, (qformer_tokenizer(), t5_tokenizer(), llama_tokenizer()), image_size=IMAGE, train_augment=False)
    dm.setup("fit")
    barriers = []
    trainer = SimpleNamespace(
        datamodule=dm, global_rank=0, world_size=1, is_global_zero=True,
        strategy=SimpleNamespace(root_device=torch.device("cpu"), barrier=barriers.append),
    )
    from lightning.pytorch.trainer.states import TrainerFn

    callback = FeatureCacheCallback(str(tmp_path / "cache"), progress=False)
    with pytest.raises(FeatureCacheError, match="no model"):
        callback.setup(trainer, SimpleNamespace(model=None), TrainerFn.FITTING)
    model = SimpleNamespace(vision_encoder=encoder())
    module = SimpleNamespace(model=None)  # a model loaded in configure_model (model.pretrained)
    module.configure_model = lambda: setattr(module, "model", model)
    callback.setup(trainer, module, TrainerFn.FITTING)  # what Lightning passes
    assert module.model is model
    assert barriers == ["feature_cache"]
    assert all(isinstance(d, CachedFeatureDataset) for d in dm.train_dataset.datasets + dm.eval_datasets)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image_features"].dtype == torch.float16


def test_feature_collator_passes_uncached_items_through():
    from test_transforms_collate import qformer_tokenizer, t5_tokenizer

    from ibkit.data.collate import InstructionCollator

    collate = FeatureCollator(InstructionCollator(qformer_tokenizer(), t5_tokenizer(), True, mode="generate"))
    item = {"instruction": "w5 w6", "sample_id": "a", "dataset": "d", "skipped": []}
    batch = collate([{**item, "pixel_values": torch.zeros(3, 4, 4)}])
    assert batch["image_features"].shape == (1, 3, 4, 4)  # a plain pixel item is not dropped
    assert collate.mode == "generate"  # the wrapped collator's attributes stay visible


def test_fit_and_validate_from_the_cache_as_from_pixels(tmp_path):
    """`ibkit fit` with the callback trains on cached features and validates with them (tiny preset)."""
    from ibkit.app.config import build_cli

    def fit(run: str, *extra: str):
        args = [
            "fit", "--config", "configs/tiny/fit.yaml", "--data.root", str(tmp_path / "tiny"),
            "--trainer.default_root_dir", str(tmp_path / run), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            *extra,
        ]
        return build_cli(args, run=True).trainer

    cached = fit(
        "cached", "--trainer.callbacks+=ibkit.training.callbacks.FeatureCacheCallback",
        f"--trainer.callbacks.cache_dir={tmp_path / 'cache'}", "--trainer.callbacks.progress=false",
    )
    datamodule = cached.datamodule
    assert all(isinstance(d, CachedFeatureDataset) for d in datamodule.train_dataset.datasets + datamodule.eval_datasets)
    plain = fit("plain")
    for key in ("val/loss", "train/loss"):
        assert float(cached.callback_metrics[key]) == pytest.approx(float(plain.callback_metrics[key]), rel=1e-2)


def test_cache_features_command_builds_every_dataset_of_a_config(tmp_path, capsys):
    from ibkit.app import main

    args = ["data", "cache-features", "--cache_dir", str(tmp_path / "cache"), "--config", "configs/tiny/fit.yaml",
            "--num_workers", "0", "--data.root", str(tmp_path / "tiny"), "--trainer.logger", "false"]
    assert main(args) == 0
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    from ibkit.shapes.datamodule import TINY_EVAL, TINY_TRAIN

    assert built == sorted(set(TINY_TRAIN) | set(TINY_EVAL))
    assert main(args) == 0  # everything cached: nothing to encode
    assert capsys.readouterr().out.strip().endswith("0 item(s) encoded")
    assert main([*args, "--data.train_augment", "true"]) == 2  # random crops: refused, with the reason
    assert "train_augment" in capsys.readouterr().out
    assert main([*args, "--model.model.init_args.vision_encoder.init_args.frozen", "false"]) == 2  # as the callback
    assert "vision encoder of InstructBLIPModule trains (frozen: false)" in capsys.readouterr().out


@pytest.mark.parametrize("fast_bf16", ["1", "0"])
def test_a_fit_finds_the_cache_that_the_command_built_beforehand(tmp_path, monkeypatch, fast_bf16):
    """`ibkit data cache-features` encodes with the encoder as the fit's callback sees it: under the bf16 policy
    the command once cast it to bf16 first (configure_model), so the fit, whose policy comes after the callback,
    found another fingerprint and encoded everything again."""
    from ibkit.app import main
    from ibkit.app.config import build_cli

    monkeypatch.setenv("IBKIT_CPU_BF16", fast_bf16)
    cache, data = tmp_path / "cache", tmp_path / "tiny"
    common = ["--config", "configs/tiny/fit.yaml", "--data.root", str(data), "--trainer.logger", "false",
              "--model.fast_paths", "true"]  # the precision policy (the tiny preset runs without it)
    assert main(["data", "cache-features", "--cache_dir", str(cache), "--num_workers", "0", *common]) == 0

    def stored() -> dict[Path, int]:  # features and indexes (not the marks of the processes that have them open)
        return {p.relative_to(cache): p.stat().st_mtime_ns for p in cache.rglob("*") if p.suffix in (".safetensors", ".json")}

    built = stored()
    assert any(p.suffix == ".safetensors" for p in built)
    build_cli(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar",
               "false", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
               "--trainer.callbacks+=ibkit.training.callbacks.FeatureCacheCallback", f"--trainer.callbacks.cache_dir={cache}",
               "--trainer.callbacks.progress=false"], run=True)
    assert stored() == built  # same fingerprint folders, no shard or index written: nothing encoded again


def _store(root: Path, letter: str):
    from ibkit.data.feature_store import FeatureStore

    return FeatureStore(root, "toy", {"fingerprint": letter * 40, "dtype": "bfloat16"})


def test_a_cache_that_another_run_reads_is_kept_and_removed_once_it_is_done(tmp_path):
    """Two runs with different encoders on one cache_dir at once (the ablation's two stage-1 runs once did):
    opening the second must not delete the first one's features under it; a finished or killed run's are removed."""
    import gc
    import subprocess
    import sys

    first = _store(tmp_path, "a")
    with first.writer("w") as writer:
        writer.add("k", torch.ones(1, 2, 3))
    second = _store(tmp_path, "b")  # same process, first still open
    assert _cache_dirs(tmp_path) == ["a" * 20, "b" * 20]
    assert first.get("k").float().sum().item() == 6.0

    other_run = subprocess.Popen(  # another process holds a third encoder's cache open
        [sys.executable, "-c", "import sys; from pathlib import Path; from ibkit.data.feature_store import FeatureStore; "
         f"s = FeatureStore(Path({str(tmp_path)!r}), 'toy', {{'fingerprint': 'c' * 40, 'dtype': 'bfloat16'}}); "
         "print('open', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other_run.stdout.readline().strip() == "open"
        del first, second, writer  # this process is done with a and b
        gc.collect()
        _store(tmp_path, "d")
        assert _cache_dirs(tmp_path) == ["c" * 20, "d" * 20]  # c is read by the live process
    finally:
        other_run.kill()  # no clean exit: its lease stays behind, naming a dead process
        other_run.wait()
    assert any(p.name.startswith(".in-use-") for p in (tmp_path / "toy" / ("c" * 20)).iterdir())
    _store(tmp_path, "e")
    assert _cache_dirs(tmp_path) == ["e" * 20]


def test_a_read_only_cache_opens_without_a_lease(tmp_path, monkeypatch, caplog):
    """A shared, prebuilt cache in a folder this user cannot write: reading it must not need the lease file."""
    with _store(tmp_path, "a").writer("w") as writer:
        writer.add("k", torch.full((1, 2, 3), 2.0))
    del writer
    touch = Path.touch

    def read_only(path: Path, *args, **kwargs) -> None:
        if path.name.startswith(".in-use-"):
            raise PermissionError(13, "Permission denied", str(path))
        touch(path, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", read_only)
    store = _store(tmp_path, "a")
    assert store.get("k").float().sum().item() == 12.0
    assert "cannot leave a lease file" in caplog.text
    assert not any(p.name.startswith(".in-use-") for p in store.directory.iterdir())


@pytest.mark.skipif(os.name != "posix", reason="the open lock is POSIX flock")
def test_opening_waits_for_another_opener_of_the_same_dataset_folder(tmp_path):
    """Checking the other folders' leases and deleting them is one step under the dataset folder's lock, so a
    run that is between creating its folder and writing its lease is never deleted."""
    import subprocess
    import sys
    import threading

    (tmp_path / "toy").mkdir()
    opener = subprocess.Popen(  # another process in the middle of opening a store of this dataset
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", str(tmp_path / "toy" / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    opened = []
    try:
        assert opener.stdout.readline().strip() == "locked"
        thread = threading.Thread(target=lambda: opened.append(_store(tmp_path, "a")))
        thread.start()
        thread.join(timeout=2)
        assert thread.is_alive() and not opened  # waits for the other opener
    finally:
        opener.stdin.close()
        opener.wait()
    thread.join(timeout=60)
    assert opened and _cache_dirs(tmp_path) == ["a" * 20]
