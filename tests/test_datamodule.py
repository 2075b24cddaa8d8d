"""InstructionDataModule on the tiny official-format fixtures: mixture, eval loaders, ranks, resume, bad input."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures_datasets import write_fixture_root
from PIL import Image
from test_transforms_collate import llama_tokenizer, qformer_tokenizer, t5_tokenizer, write_video

from ibkit.data.datamodule import InstructionDataModule, ShardSampler
from ibkit.data.dataset import BadInputTally, InstructionDataset
from ibkit.data.registry import load_samples
from ibkit.data.sample import Sample
from ibkit.data.sampler import MixtureStream, mixture_weights
from ibkit.data.transforms import BadInputError, eval_transform

TRAIN = ["coco_caption", "vqav2", "okvqa", "aokvqa"]
EVAL = ["gqa", "msvd_qa"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    write_fixture_root(path)
    return path


@pytest.fixture(scope="module")
def tokenizers():
    return qformer_tokenizer(), t5_tokenizer(), llama_tokenizer()


def make_dm(root: Path, tokenizers, *, llm: str = "t5", **kwargs) -> InstructionDataModule:
    options = dict(
        datasets=TRAIN,
        eval_datasets=EVAL,
        data_root=str(root),
        batch_size=4,
        num_workers=0,
        image_size=16,
        seed=3,
    )
    options.update(kwargs)
    dm = InstructionDataModule(**options)
    qformer, t5, llama = tokenizers
    dm.setup_tokenizers(qformer, t5 if llm == "t5" else llama, is_encoder_decoder=llm == "t5")
    return dm


def test_training_batches_follow_the_logged_sqrt_mixture(root, tokenizers, caplog):
    dm = make_dm(root, tokenizers)
    with caplog.at_level(logging.INFO, logger="ibkit.data.datamodule"):
        dm.setup("fit")
    sizes = {name: len(load_samples(name, root, "train")) for name in TRAIN}
    assert dm.mixture == pytest.approx(mixture_weights(sizes, "sqrt"))
    assert dm.mixture["okvqa"] > dm.mixture["aokvqa"]  # same size (1), OKVQA up and A-OKVQA down
    assert all(name in caplog.text for name in TRAIN) and "weight" in caplog.text

    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["labels"].shape[0] == 4 and (batch["labels"] != -100).any()
    assert batch["qformer_input_ids"].shape[0] == batch["input_ids"].shape[0] == 4
    # the batch is the first four draws of the seeded stream
    stream = MixtureStream([sizes[n] for n in TRAIN], [dm.mixture[n] for n in TRAIN], seed=3, block_size=4096)
    assert batch["datasets"] == [TRAIN[stream[p][0]] for p in range(4)]
    assert all(isinstance(text, str) and text for text in batch["instructions"])


def test_one_dataset_per_batch_on_each_rank(root, tokenizers, monkeypatch):
    monkeypatch.setattr(InstructionDataModule, "_rank_world", lambda self: (1, 2))
    dm = make_dm(root, tokenizers, batch_size=2, one_dataset_per_batch=True, block_size=1000)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(islice(iter(loader), 30))
    assert all(len(set(batch["datasets"])) == 1 for batch in batches)
    assert len({batch["datasets"][0] for batch in batches}) > 2
    # rank 1's k-th batch is global batch k (positions 4k..4k+3 of a stream with runs of 2 x 2, blocks of 1,004)
    sizes = [len(dataset) for dataset in dm.train_dataset.datasets]
    stream = MixtureStream(sizes, [dm.mixture[n] for n in dm.train_dataset.names], seed=3, block_size=1004, run_length=4)
    assert [batch["datasets"][0] for batch in batches] == [dm.train_dataset.names[stream[4 * k + 1][0]] for k in range(30)]


def test_eval_loaders_one_per_dataset_in_generate_mode(root, tokenizers):
    dm = make_dm(root, tokenizers, llm="llama", eval_batch_size=2)
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert len(loaders) == len(EVAL) == len(dm.eval_dataset_names)
    gqa = next(iter(loaders[0]))
    assert gqa["datasets"] == ["gqa", "gqa"] and "labels" not in gqa
    assert gqa["attention_mask"][:, -1].all()  # decoder-only prompts are left padded
    assert gqa["instructions"][0].startswith("Question: ") and gqa["instructions"][0].endswith(
        "Short answer:"
    )
    msvd = next(iter(loaders[1]))
    assert msvd["pixel_values"].shape == (2, 4, 3, 16, 16)
    assert msvd["candidates"][0] and msvd["labels_idx"][0] is not None
    capped = make_dm(root, tokenizers, max_eval_samples=1)
    capped.setup("validate")
    assert [len(dataset) for dataset in capped.eval_datasets] == [1, 1]


def test_eval_shards_cover_every_sample_once(root, tokenizers, monkeypatch):
    assert (
        list(ShardSampler(5, 0, 2)) == [0, 2, 4]
        and list(ShardSampler(5, 1, 2)) == [1, 3]
        and len(ShardSampler(5, 1, 2)) == 2
    )
    dm = make_dm(root, tokenizers, eval_batch_size=1)
    dm.setup("validate")
    seen = {name: [] for name in EVAL}
    for rank in range(2):
        monkeypatch.setattr(dm, "_rank_world", lambda rank=rank: (rank, 2))
        for name, loader in zip(EVAL, dm.val_dataloader()):
            seen[name].extend(sid for batch in loader for sid in batch["sample_ids"])
    for name, dataset in zip(EVAL, dm.eval_datasets):
        ids = [s.sample_id for s in dataset.samples]
        assert sorted(seen[name]) == sorted(ids) and len(seen[name]) == len(set(seen[name]))


def test_training_ranks_split_the_single_process_stream(root, tokenizers, monkeypatch):
    def draws(rank: int, world: int, batches: int) -> list[tuple[str, str]]:
        dm = make_dm(root, tokenizers, batch_size=3)
        monkeypatch.setattr(dm, "_rank_world", lambda: (rank, world))
        out = []
        for batch in islice(dm.train_dataloader(), batches):
            out.extend(zip(batch["sample_ids"], batch["instructions"]))
        return out

    single = draws(0, 1, 4)
    rank0, rank1 = draws(0, 2, 2), draws(1, 2, 2)
    interleaved = [draw for pair in zip(rank0, rank1) for draw in pair]
    assert interleaved == single


def _recording_module():
    from lightning.pytorch import LightningModule

    class Recorder(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen: list[tuple] = []

        def training_step(self, batch, batch_idx):
            for sid, text, pixels in zip(batch["sample_ids"], batch["instructions"], batch["pixel_values"]):
                self.seen.append((sid, text, round(float(pixels.sum()), 3)))
            return self.layer(torch.ones(1, 1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return Recorder()


def _trainer(max_steps: int):
    from lightning.pytorch import Trainer

    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )


def test_checkpoint_resume_continues_the_identical_stream(root, tokenizers, tmp_path):
    kwargs = dict(eval_datasets=[], batch_size=2, num_workers=2)
    full = _recording_module()
    _trainer(6).fit(full, datamodule=make_dm(root, tokenizers, **kwargs))
    assert len(full.seen) == 12

    first = _recording_module()
    first_dm = make_dm(root, tokenizers, **kwargs)
    trainer = _trainer(3)
    trainer.fit(first, datamodule=first_dm)
    assert first.seen == full.seen[:6]
    assert first_dm.state_dict()["position"] == 6  # 3 steps x batch 2 x 1 rank, whatever workers prefetched
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=True)["InstructionDataModule"]["position"] == 6

    resumed = _recording_module()
    _trainer(6).fit(resumed, datamodule=make_dm(root, tokenizers, **kwargs), ckpt_path=checkpoint)
    assert resumed.seen == full.seen[6:]


def test_set_consumed_samples_without_a_trainer(root, tokenizers):
    dm = make_dm(root, tokenizers, eval_datasets=[], batch_size=2)
    reference = [sid for batch in islice(dm.train_dataloader(), 3) for sid in batch["sample_ids"]]
    other = make_dm(root, tokenizers, eval_datasets=[], batch_size=2)
    other.load_state_dict({"position": 2, "global_step": 0, "seed": 3})
    assert [sid for batch in islice(other.train_dataloader(), 2) for sid in batch["sample_ids"]] == reference[
        2:
    ]


# ------------------------------------------------------------------------------------------ bad input
def _break_media(root: Path) -> dict[str, Path]:
    """Damage one file of each kind in a copy of the fixture root."""
    gqa = load_samples("gqa", root, "testdev")
    msrvtt = load_samples("msrvtt_qa", root, "test")
    coco = load_samples("coco_caption", root, "train")
    truncated = Path(gqa[0].image)
    buffer = truncated.with_suffix(".tmp.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer)
    truncated.write_bytes(buffer.read_bytes()[: buffer.stat().st_size // 2])
    buffer.unlink()
    garbage = Path(gqa[1].image)
    garbage.write_bytes(b"not an image at all")
    short_video = Path(msrvtt[0].video)
    write_video(short_video, 2)
    missing = Path(coco[2].image)  # the restval image of the third caption
    missing.unlink()
    return {"truncated": truncated, "garbage": garbage, "short": short_video, "missing": missing}


def _eval_counts(dm: InstructionDataModule) -> tuple[BadInputTally, list[str]]:
    ids = []
    for loader in dm.val_dataloader():
        for batch in loader:
            batch = dm.on_before_batch_transfer(batch, 0)  # what Lightning calls in the main process
            assert "skipped" not in batch
            ids.extend(batch["sample_ids"])
    return dm.bad_input, ids


def test_each_kind_of_bad_input_is_skipped_and_counted(tmp_path, tokenizers):
    write_fixture_root(tmp_path)
    broken = _break_media(tmp_path)
    dm = make_dm(
        tmp_path, tokenizers, eval_datasets=["gqa", "msrvtt_qa", "ivqa"], eval_batch_size=2, num_workers=1
    )
    dm.setup("fit")
    tally, ids = _eval_counts(dm)
    assert tally.per_dataset() == {
        "gqa": {"truncated_image": 1, "unreadable_image": 1},
        "msrvtt_qa": {"too_few_frames": 1},
    }
    # both GQA images are broken, one MSRVTT-QA clip is fine, iVQA is untouched
    assert sorted(ids) == sorted(["158582", *(s.sample_id for s in load_samples("ivqa", tmp_path, "test"))])
    assert str(broken["short"]) in tally.summary()
    # training: the sample with the missing image is replaced by the next one, and counted
    for batch in islice(dm.train_dataloader(), 6):
        batch = dm.on_before_batch_transfer(batch, 0)
        assert len(batch["sample_ids"]) == 4
    assert tally.per_dataset()["coco_caption"]["missing_file"] >= 1
    assert dm.state_dict()["bad_input"]["counts"]


def test_bad_input_is_reported_at_epoch_end_through_lightning(tmp_path, tokenizers, caplog):
    from lightning.pytorch import LightningModule, Trainer

    from ibkit.training.callbacks import BadInputReport

    class Evaluator(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            assert "skipped" not in batch  # the datamodule took the skip records out
            self.seen.extend(batch["sample_ids"])

    write_fixture_root(tmp_path)
    _break_media(tmp_path)
    dm = make_dm(tmp_path, tokenizers, eval_datasets=["gqa", "msrvtt_qa"], eval_batch_size=1)
    module = Evaluator()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[BadInputReport()],
    )
    with caplog.at_level(logging.WARNING):
        trainer.validate(module, datamodule=dm, verbose=False)
    assert module.seen == ["158582"]
    assert trainer.callback_metrics["bad_input/total"].item() == 3
    assert "truncated_image" in caplog.text and "too_few_frames" in caplog.text


def test_malformed_record_is_skipped_and_strict_names_file_and_record(tmp_path):
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(image)
    samples = [
        Sample("toy", "no-media", question="what?"),
        Sample("toy", "fine", image=str(image), question="what?"),
    ]
    dataset = InstructionDataset(samples, eval_transform(8), name="toy", template_set="vqa", seed=0)
    bad = dataset[0]
    assert bad["pixel_values"] is None and bad["skipped"] == [("toy", "malformed_record", None, "no-media")]
    assert dataset[1]["pixel_values"].shape == (3, 8, 8)
    unknown_set = InstructionDataset(samples[1:], eval_transform(8), name="toy", template_set="no_such_set")
    assert unknown_set[0]["skipped"][0][1] == "malformed_record"
    no_answer = InstructionDataset(
        samples[1:], eval_transform(8), name="toy", template_set="vqa", require_target=True
    )
    assert no_answer[0]["skipped"] == [("toy", "malformed_record", str(image), "fine")]
    missing = [Sample("toy", "rec-7", image=str(tmp_path / "absent.jpg"), question="what?")]
    strict = InstructionDataset(missing, eval_transform(8), name="toy", template_set="vqa", strict=True)
    with pytest.raises(BadInputError, match=r"absent\.jpg.*rec-7"):
        strict[0]


def test_strict_datamodule_raises_on_bad_media(tmp_path, tokenizers):
    write_fixture_root(tmp_path)
    broken = _break_media(tmp_path)
    # strict: setup decodes every media file first and stops at once, naming file, dataset and record
    dm = make_dm(tmp_path, tokenizers, eval_datasets=["gqa"], strict=True)
    with pytest.raises(BadInputError) as caught:
        dm.setup("validate")
    message = str(caught.value)
    assert str(broken["truncated"]) in message and "gqa (testdev) record '20968379'" in message
    assert "1 unreadable, 1 truncated" in message
    # without that check (strict_media_sample=0) strict still raises on the item itself, when it is fetched
    dm = make_dm(tmp_path, tokenizers, eval_datasets=["gqa"], strict=True, strict_media_sample=0)
    dm.setup("validate")
    with pytest.raises(BadInputError) as caught:
        next(iter(dm.val_dataloader()[0]))
    assert str(broken["truncated"]) in str(caught.value) and "gqa record" in str(caught.value)


# ------------------------------------------------------------------------------------------ config
def test_tokenizers_and_model_kind_from_folders(root, tokenizers, tmp_path):
    from transformers import T5Config

    qformer, t5, _ = tokenizers
    llm_dir = tmp_path / "llm"
    t5.save_pretrained(llm_dir)
    qformer.save_pretrained(llm_dir / "qformer_tokenizer")  # the InstructBlipProcessor layout
    T5Config(vocab_size=32, d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(llm_dir)
    dm = InstructionDataModule(
        datasets=["vqav2"],
        data_root=str(root),
        batch_size=2,
        num_workers=0,
        image_size=16,
        llm_tokenizer=str(llm_dir),
    )
    batch = next(iter(dm.train_dataloader()))
    assert dm.is_encoder_decoder is True
    assert batch["labels"].shape[0] == 2 and batch["input_ids"][0, -1] != -100


def test_config_errors(root, tokenizers):
    with pytest.raises(KeyError, match="unknown dataset"):
        InstructionDataModule(datasets=["no_such_dataset"], data_root=str(root))
    with pytest.raises(ValueError, match="path overrides"):
        InstructionDataModule(datasets=["vqav2"], data_root=str(root), paths={"gqa": {"images": "x"}})
    dm = InstructionDataModule(datasets=["vqav2"], data_root=str(root), num_workers=0)
    with pytest.raises(ValueError, match="no tokenizers"):
        dm.train_dataloader()
    # under DDP Lightning must not wrap the mixture sampler in a DistributedSampler
    ddp_dm = make_dm(root, tokenizers, eval_datasets=[])
    ddp_dm.trainer = SimpleNamespace(
        global_rank=0, world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        ddp_dm.train_dataloader()
    with pytest.raises(FileNotFoundError, match="okvqa"):
        InstructionDataModule(datasets=["okvqa"], data_root=str(root / "nowhere")).setup("fit")
