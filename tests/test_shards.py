"""img2dataset webdataset shards: reading, the rank x worker split, exact resume, bad samples, the mixture."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from fixtures_datasets import write_fixture_root
from PIL import Image
from test_transforms_collate import qformer_tokenizer, t5_tokenizer
from torch.utils.data import DataLoader

from ibkit.data.datamodule import InstructionDataModule
from ibkit.data.errors import MalformedRecordError
from ibkit.data.shard_files import expand_shard_urls, shard_sizes
from ibkit.data.shard_mixture import SlottedMixtureStream
from ibkit.data.shards import ShardCaptionDataset, ShardSamples, ShardStream
from ibkit.data.transforms import BadInputError, decode_image, eval_transform


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, (7 * value) % 256, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shards(
    folder: Path, shards: int, per_shard: int, *, stats: bool = True, edit=None, start: int = 0
) -> list[str]:
    """img2dataset's layout: NNNNN.tar with KEY.jpg/.txt/.json, and NNNNN_stats.json ("successes").

    ``edit(shard, index, sample)`` may change or drop (return None) a sample before it is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(start, start + shards):
        written = 0
        with webdataset.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                sample = {
                    "__key__": key,
                    "jpg": _jpeg(shard * per_shard + index),
                    "txt": f"caption of {key}",
                    "json": {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success"},
                }
                if edit is not None:
                    sample = edit(shard, index, sample)
                if sample is None:
                    continue
                sink.write(sample)
                keys.append(key)
                written += 1
        if stats:
            (folder / f"{shard:05d}_stats.json").write_text(
                json.dumps({"count": per_shard, "successes": written})
            )
    return keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("laion")
    return folder, write_shards(folder, shards=8, per_shard=5)


def stream_of(folder: Path, **kwargs) -> ShardStream:
    return ShardStream.from_patterns(str(folder / "{00000..00007}.tar"), **kwargs)


# ------------------------------------------------------------------------------------------ reading
def test_reads_img2dataset_shards_as_samples(shards):
    folder, keys = shards
    samples = list(ShardSamples(stream_of(folder, shuffle_shards=False), name="laion", epochs=1))
    assert [s.sample_id for s in samples] == keys
    first = samples[0]
    assert first.dataset == "laion" and first.target == first.answers[0] == f"caption of {keys[0]}"
    assert first.extra["metadata"]["url"].endswith(f"{keys[0]}.jpg")
    assert first.extra["shard"].endswith("00000.tar") and first.image.endswith(f"#{keys[0]}.jpg")
    assert decode_image(first.extra["image_bytes"], first.image).size == (8, 8)  # decoded only on demand


def test_shard_lists_from_braces_folders_globs_and_urls(shards, tmp_path):
    folder, _ = shards
    expected = [str(folder / f"{i:05d}.tar") for i in range(8)]
    assert expand_shard_urls(str(folder / "{00000..00007}.tar")) == expected
    assert expand_shard_urls(str(folder)) == expected
    assert expand_shard_urls(str(folder / "0000[0-3].tar")) == expected[:4]
    assert expand_shard_urls([expected[0], f"file://{folder}/00001.tar"])[1] == f"file://{folder}/00001.tar"
    url_stream = ShardStream.from_patterns(f"file://{folder}/{{00000..00001}}.tar", shuffle_shards=False)
    assert [s.sample_id for s in ShardSamples(url_stream, epochs=1)][:5] == [
        f"00000{i:04d}" for i in range(5)
    ]
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_shard_urls(str(tmp_path / "empty"))
    # without img2dataset's stats files the samples are counted by reading the shards
    bare = tmp_path / "bare"
    write_shards(bare, shards=2, per_shard=3, stats=False)
    assert shard_sizes(expand_shard_urls(str(bare))) == [3, 3]
    assert shard_sizes(expand_shard_urls(str(folder))) == [5] * 8


# ------------------------------------------------------------------------------------------ split
def _keys_per_slot(stream: ShardStream, world_size: int, workers: int) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for rank in range(world_size):
        source = ShardSamples(stream, rank=rank, world_size=world_size, epochs=1)
        loader = DataLoader(source, batch_size=None, num_workers=workers)
        for sample in loader:
            slot, num_slots, _ = sample.extra["stream"]
            assert num_slots == world_size * workers
            out.setdefault((rank, slot), []).append(sample.sample_id)
    return out


def test_two_ranks_by_two_workers_read_disjoint_shards_covering_everything(shards):
    folder, keys = shards
    stream = stream_of(folder, seed=5)
    per_slot = _keys_per_slot(stream, world_size=2, workers=2)
    assert sorted(slot for _, slot in per_slot) == [0, 1, 2, 3]
    assert all(slot // 2 == rank for rank, slot in per_slot)  # slot = rank * workers + worker
    everything = [key for slot_keys in per_slot.values() for key in slot_keys]
    assert sorted(everything) == sorted(keys) and len(everything) == len(set(everything))
    shards_of = [{key[:5] for key in slot_keys} for slot_keys in per_slot.values()]
    assert all(len(s) == 2 for s in shards_of)  # whole shards: 8 shards / 4 slots
    # the shard order is seeded per epoch: another seed, another assignment; the same seed, the same
    assert _keys_per_slot(stream_of(folder, seed=5), 2, 2) == per_slot
    assert _keys_per_slot(stream_of(folder, seed=6), 2, 2) != per_slot
    assert [list(stream.shard_order(e)) for e in (0, 1)][0] != list(stream.shard_order(1))
    with pytest.raises(ValueError, match="cannot feed 9 slots"):
        next(iter(ShardSamples(stream, rank=0, world_size=9)))


def test_shuffle_buffer_is_seeded_and_stays_inside_each_shard(shards):
    folder, _ = shards

    def keys(**kwargs):
        return [s.sample_id for s in ShardSamples(stream_of(folder, **kwargs), epochs=1)]

    plain, buffered = keys(seed=1), keys(seed=1, buffer_size=4)
    assert buffered == keys(seed=1, buffer_size=4) and buffered != plain
    # the same shards in the same order, only the samples inside each shard move
    assert [k[:5] for k in plain] == [k[:5] for k in buffered] and sorted(plain) == sorted(buffered)


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("buffer_size", [0, 4])
def test_interrupted_stream_resumes_with_exactly_the_remaining_samples(shards, buffer_size):
    folder, _ = shards
    stream = stream_of(folder, seed=2, buffer_size=buffer_size)
    full = [s.sample_id for s in ShardSamples(stream, epochs=2)]
    assert len(full) == 80
    for consumed in (0, 1, 3, 5, 17, 40, 43, 79):  # mid-shard, shard and epoch boundaries, second epoch
        first = ShardSamples(stream, epochs=2)
        taken = [s.sample_id for s in islice(iter(first), consumed)]
        state = torch.load(_saved(first.state_dict()), weights_only=True)  # survives a checkpoint file
        resumed = ShardSamples(stream, epochs=2)
        resumed.load_state_dict(state)
        assert taken + [s.sample_id for s in resumed] == full, consumed
    ordered = ShardSamples(stream_of(folder, shuffle_shards=False), epochs=2)
    list(islice(iter(ordered), 47))  # 40 in epoch 0, then 7: the third sample of the second shard
    assert ordered.state_dict()["cursors"][0] == [1, str(folder / "00001.tar"), 2]


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_resume_across_loader_workers_from_recorded_samples(shards):
    folder, _ = shards
    stream = stream_of(folder, seed=4, buffer_size=3)

    def per_slot(samples):
        out: dict[int, list[str]] = {}
        for sample in samples:
            out.setdefault(sample.extra["stream"][0], []).append(sample.sample_id)
        return out

    def loader(source):
        return DataLoader(source, batch_size=None, num_workers=2)

    full = per_slot(loader(ShardSamples(stream, epochs=1)))
    first = ShardSamples(stream, epochs=1)
    consumed = list(islice(iter(loader(first)), 7))  # the workers prefetched more than that
    for sample in consumed:
        first.record(sample)
    resumed = ShardSamples(stream, epochs=1)
    resumed.load_state_dict(first.state_dict())
    rest = per_slot(loader(resumed))
    before = per_slot(consumed)
    assert {slot: before.get(slot, []) + rest.get(slot, []) for slot in full} == full


# ------------------------------------------------------------------------------------------ bad samples
def _damaged(folder: Path) -> Path:
    def edit(shard, index, sample):
        if (shard, index) == (0, 1):
            sample["jpg"] = b"not a jpeg"
        if (shard, index) == (0, 2):
            del sample["txt"]
        if (shard, index) == (1, 0):
            sample["txt"] = "   "
        return sample

    write_shards(folder, shards=3, per_shard=4, edit=edit)
    # a tar cut in the middle of its data: its stats still declare 4 samples
    tar = folder / "00002.tar"
    tar.write_bytes(tar.read_bytes()[: 3 * 1024])
    return folder


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    folder = _damaged(tmp_path / "damaged")
    stream = ShardStream.from_patterns(str(folder), shuffle_shards=False)
    source = ShardSamples(stream, name="web", epochs=1)
    kept = [s.sample_id for s in source]
    counts = source.skips.counts
    assert sum(1 for reason in counts.elements() if reason.startswith("missing_caption")) >= 1
    assert sum(1 for reason in counts.elements() if reason.startswith("empty_caption")) == 1
    assert sum(1 for reason in counts.elements() if reason.startswith("broken_shard")) >= 1
    assert len(kept) + source.skips.total == 12  # every declared place is a sample or a counted skip
    assert "000000001" in kept  # the undecodable image is found when it is decoded, not here

    # in the training mixture every kind is a skip record (then the BadInputTally counts it)
    dataset = ShardCaptionDataset(stream, eval_transform(16), name="web", max_retries=0)
    reasons = Counter()
    good = 0
    for index in range(12):
        item = dataset.get(index)
        reasons.update(record[1] for record in item["skipped"])
        good += item["pixel_values"] is not None
        for _, _, path, key in item["skipped"]:
            assert path.endswith(".tar") and key
    assert reasons["unreadable_image"] == 1 and reasons["empty_caption"] == 1
    assert reasons["missing_caption"] >= 1 and reasons["broken_shard"] >= 1
    assert good + sum(reasons.values()) == 12
    # with retries the draw moves on to the slot's next entry, keeping the batch full
    retried = ShardCaptionDataset(stream, eval_transform(16), name="web", max_retries=2).get(1)
    assert retried["sample_id"] == "000000003" and retried["skipped"][0][1] == "unreadable_image"


def test_strict_mode_names_the_shard_and_the_key(tmp_path):
    folder = _damaged(tmp_path / "damaged")
    stream = ShardStream.from_patterns(str(folder), shuffle_shards=False)
    with pytest.raises(MalformedRecordError, match=r"00000\.tar: record key 000000002: missing_caption"):
        list(ShardSamples(stream, epochs=1, strict=True))
    dataset = ShardCaptionDataset(stream, eval_transform(16), name="web", strict=True)
    with pytest.raises(BadInputError, match=r"shard .*00000\.tar, key 000000001: ") as error:
        dataset.get(1)
    assert error.value.reason == "unreadable_image" and error.value.path.endswith("00000.tar")


# ------------------------------------------------------------------------------------------ mixture
def test_slotted_stream_numbers_each_slots_draws_in_order(monkeypatch):
    monkeypatch.setattr(SlottedMixtureStream, "_CHECKPOINT_EVERY", 3)
    world, batch, workers = 2, 3, 2
    stream = SlottedMixtureStream(
        [50, 40], [0.5, 0.5], streamed=[1], world_size=world, batch_size=batch, num_workers=workers,
        seed=7, block_size=16,
    )  # fmt: skip
    plain = SlottedMixtureStream.__mro__[1]([50, 40], [0.5, 0.5], seed=7, block_size=16)
    seen: dict[int, list[int]] = {}
    for position in range(400):
        dataset, index = stream[position]
        assert dataset == plain[position][0]
        if dataset == 0:
            assert index == plain[position][1]  # map-style datasets keep the mixture's indices
            continue
        slot = index % stream.num_slots
        rank, local = position % world, position // world
        assert slot == rank * workers + (local // batch) % workers
        seen.setdefault(slot, []).append(index // stream.num_slots)
    assert sorted(seen) == [0, 1, 2, 3] and all(v == list(range(len(v))) for v in seen.values())
    # random access (a resumed run) agrees with the sequential walk
    fresh = SlottedMixtureStream(
        [50, 40], [0.5, 0.5], streamed=[1], world_size=world, batch_size=batch, num_workers=workers,
        seed=7, block_size=16,
    )  # fmt: skip
    assert [fresh[p] for p in (399, 5, 200, 64)] == [stream[p] for p in (399, 5, 200, 64)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    write_fixture_root(path)
    return path


@pytest.fixture(scope="module")
def tokenizers():
    return qformer_tokenizer(), t5_tokenizer()


def make_dm(root: Path, tokenizers, folder: Path, **kwargs) -> InstructionDataModule:
    options = dict(
        datasets=["coco_caption"],
        shards={"laion": {"urls": str(folder), "buffer_size": 3}},
        data_root=str(root),
        batch_size=4,
        num_workers=0,
        image_size=16,
        seed=3,
    )
    options.update(kwargs)
    dm = InstructionDataModule(**options)
    dm.setup_tokenizers(*tokenizers, is_encoder_decoder=True)
    return dm


def _draws(dm: InstructionDataModule, batches: int, skip: int = 0) -> list[tuple[str, str, str, float]]:
    out = []
    for batch in islice(dm.train_dataloader(), skip, skip + batches):
        for name, sid, target, pixels in zip(
            batch["datasets"], batch["sample_ids"], batch["targets"], batch["pixel_values"]
        ):
            out.append((name, sid, target, round(float(pixels.sum()), 3)))
    return out


def test_shards_mix_with_registry_datasets_in_the_datamodule(root, tokenizers, shards, caplog):
    folder, keys = shards
    dm = make_dm(root, tokenizers, folder)
    with caplog.at_level(logging.INFO, logger="ibkit.data"):
        dm.setup("fit")
    sizes = dict(zip(dm.train_dataset.names, dm.train_dataset.sizes))
    assert sizes["laion"] == 40 and "laion" in caplog.text
    assert dm.mixture["laion"] / dm.mixture["coco_caption"] == pytest.approx(
        np.sqrt(40 / sizes["coco_caption"])
    )
    draws = _draws(dm, 10)
    laion = [d for d in draws if d[0] == "laion"]
    assert laion and any(d[0] == "coco_caption" for d in draws)
    assert all(target == f"caption of {sid}" and sid in keys for _, sid, target, _ in laion)
    assert len({sid for _, sid, _, _ in laion}) == len(laion)  # one slot, first epoch: no repeats
    assert dm.state_dict()["stream_slots"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_datamodule_resumes_the_mixed_stream_at_the_position(root, tokenizers, shards, workers):
    folder, _ = shards
    full = _draws(make_dm(root, tokenizers, folder, num_workers=workers), 8)
    resumed = make_dm(root, tokenizers, folder, num_workers=workers)
    resumed.load_state_dict({"position": 12, "global_step": 0, "seed": 3, "stream_slots": max(1, workers)})
    assert _draws(resumed, 5) == full[12:]  # templates, crops and shard samples alike


def test_ranks_and_workers_draw_disjoint_shard_samples(root, tokenizers, shards, monkeypatch, caplog):
    folder, _ = shards
    drawn = []
    for rank in range(2):
        dm = make_dm(root, tokenizers, folder, num_workers=2, batch_size=2, shards={"laion": str(folder)})
        monkeypatch.setattr(dm, "_rank_world", lambda rank=rank: (rank, 2))
        drawn += [sid for name, sid, _, _ in _draws(dm, 6) if name == "laion"]
    assert drawn and len(drawn) == len(set(drawn))  # 4 slots, each within its own shards
    dm = make_dm(root, tokenizers, folder, num_workers=2)
    dm.load_state_dict({"position": 0, "global_step": 0, "seed": 3, "stream_slots": 4})
    with caplog.at_level(logging.WARNING, logger="ibkit.data.datamodule"):
        dm.train_dataloader()
    assert "checkpoint had 4" in caplog.text


def test_datamodule_shard_config_errors(root, tokenizers, shards):
    folder, _ = shards
    with pytest.raises(ValueError, match="needs 'urls'"):
        make_dm(root, tokenizers, folder, shards={"laion": {"url": str(folder)}}).setup("fit")
    with pytest.raises(ValueError, match="unknown template_set"):
        make_dm(
            root, tokenizers, folder, shards={"laion": {"urls": str(folder), "template_set": "x"}}
        ).setup()
    with pytest.raises(ValueError, match="both datasets and shards"):
        make_dm(root, tokenizers, folder, shards={"coco_caption": str(folder)})
    only_shards = make_dm(root, tokenizers, folder, datasets=None, shards={"laion": str(folder)})
    assert {name for name, *_ in _draws(only_shards, 2)} == {"laion"}


def test_killed_fit_resumes_the_shard_stream_from_its_checkpoint(root, tokenizers, shards, tmp_path):
    from test_datamodule import _recording_module, _trainer

    folder, keys = shards
    kwargs = dict(datasets=["coco_caption"], shards={"laion": str(folder)}, batch_size=2, num_workers=2)
    full = _recording_module()
    _trainer(6).fit(full, datamodule=make_dm(root, tokenizers, folder, **kwargs))
    assert 0 < sum(sid in keys for sid, _, _ in full.seen) < len(full.seen)  # both sources were drawn

    first = _recording_module()
    trainer = _trainer(3)
    trainer.fit(first, datamodule=make_dm(root, tokenizers, folder, **kwargs))
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = _recording_module()
    _trainer(6).fit(resumed, datamodule=make_dm(root, tokenizers, folder, **kwargs), ckpt_path=checkpoint)
    assert first.seen + resumed.seen == full.seen
