"""``ibkit data check --media``, the dataset layouts (``ibkit data list --layout``, docs/data.md) and the
strict run's media check before the first step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_datasets import FIXTURE_SPLITS, write_fixture_root
from PIL import Image
from test_transforms_collate import qformer_tokenizer, t5_tokenizer

from ibkit.app import main
from ibkit.data.catalog import check_root
from ibkit.data.datamodule import InstructionDataModule
from ibkit.data.layout import DOCS_COMMAND, layout_markdown
from ibkit.data.media_check import MediaCheckOptions, check_media, media_files
from ibkit.data.registry import MEDIA_ROLES, get_spec, list_specs, load_samples
from ibkit.data.transforms import BadInputError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"
BAD_SETS = ["gqa", "vizwiz", "msrvtt_qa"]


def _truncate(path: Path) -> None:
    """Keep the first half of the file (a download cut off halfway)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def break_root(root: Path) -> dict[str, Path]:
    """A fixture root with one missing, one zero-byte, one truncated image and one truncated video."""
    write_fixture_root(root)
    gqa = load_samples("gqa", root, "testdev")
    missing, empty = Path(gqa[0].image), Path(gqa[1].image)
    missing.unlink()
    empty.write_bytes(b"")
    truncated = Path(load_samples("vizwiz", root, "val")[0].image)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated, format="JPEG")  # big enough that half of it is a cut-off JPEG
    _truncate(truncated)
    video = Path(load_samples("msrvtt_qa", root, "test")[0].video)
    _truncate(video)
    return {"missing": missing, "empty": empty, "truncated": truncated, "video": video}


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    write_fixture_root(root)
    return root


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("bad")
    return root, break_root(root)


# ------------------------------------------------------------------------------------------ data check --media
def test_data_check_media_reports_each_bad_file_and_exits_1(bad_root, capsys):
    root, broken = bad_root
    args = ["data", "check", "--root", str(root), "--dataset", "[gqa, vizwiz, msrvtt_qa]"]
    assert main(args) == 0  # annotations alone: every split it has is "found"
    capsys.readouterr()
    assert main([*args, "--media"]) == 1
    out = capsys.readouterr().out
    assert "testdev media: 2 files: 1 missing, 1 empty, 0 unreadable, 0 truncated" in out
    assert "val media: 2 files: 0 missing, 0 empty, 0 unreadable, 1 truncated" in out
    assert "test media: 2 files: 0 missing, 0 empty, 0 unreadable, 1 truncated" in out
    for kind, key in (("missing", "missing"), ("empty", "empty"), ("truncated", "truncated"), ("truncated", "video")):
        assert f"{kind}: {broken[key]} (record " in out, (kind, key)
    # a missing file comes with where the files should be, the media folder's names included
    assert f"{root / 'gqa' / 'images'}/" in out and "<imageId>.jpg" in out
    assert "media: 6 file(s) checked, 4 bad" in out

    reports = {r.name: r.splits for r in check_root(root, names=BAD_SETS, media=MediaCheckOptions(workers=1))}
    gqa = next(split.media for split in reports["gqa"] if split.split == "testdev")
    assert gqa.counts() == {"missing": 1, "empty": 1, "unreadable": 0, "truncated": 0}
    assert [p.path for p in gqa.problems] == [str(broken["missing"]), str(broken["empty"])]


def test_data_check_media_on_a_clean_root_exits_0(clean_root, capsys):
    assert main(["data", "check", "--root", str(clean_root), "--media"]) == 0
    out = capsys.readouterr().out
    assert "bad" not in out and re.search(r"media: \d+ file\(s\) checked, all decode", out)
    assert "test media: 2 files, all decode" in out  # msrvtt_qa's two clips


def test_media_sample_is_a_seeded_fraction_of_the_distinct_files(bad_root, capsys):
    root, _ = bad_root
    samples = load_samples("msvd_qa", root, "train")
    assert len(samples) == 3 and len(media_files(samples)) == 1  # three questions about one clip
    gqa = load_samples("gqa", root, "testdev")
    halves = [check_media(gqa, "gqa", "testdev", MediaCheckOptions(fraction=0.5, seed=s)) for s in range(6)]
    assert {(h.checked, h.total) for h in halves} == {(1, 2)}
    chosen = [h.problems[0].path for h in halves]
    assert len(set(chosen)) == 2  # different seeds pick different files
    again = check_media(gqa, "gqa", "testdev", MediaCheckOptions(fraction=0.5, seed=0))
    assert again.problems[0].path == chosen[0]  # the same seed the same file
    assert main(["data", "check", "--root", str(root), "--dataset", "gqa", "--media", "--sample", "0.5"]) == 1
    assert "1 of 2 files checked (a 50% sample)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["data", "check", "--root", str(root), "--media", "--sample", "0"])
    assert usage.value.code == 2


# ------------------------------------------------------------------------------------------ layouts
def test_data_list_layout_names_the_inner_media_folders(capsys):
    assert main(["data", "list", "--layout"]) == 0
    out = capsys.readouterr().out
    assert "capfilt/images/" in out and "<sha1(url)>.<ext>" in out
    assert "nocaps/images/" in out and "<split>/<file_name>" in out
    assert "vizwiz/images/" in out and "<split>/VizWiz_<split>_<number:08d>.jpg" in out
    assert "msvd_qa/videos/" in out and "<youtube_id>_<start>_<end>.avi" in out
    assert "msrvtt_qa/videos/" in out and "video<video_id>.mp4" in out
    assert "coco/images/" in out and "val2014/COCO_val2014_<image_id:012d>.jpg" in out
    assert "flickr30k/dataset_flickr30k.json  (train, val, test)" in out


def _pattern(layout_line: str) -> re.Pattern:
    """A layout line (``val2014/COCO_val2014_<image_id:012d>.jpg  (note)``) as a regex over file names."""
    name = layout_line.split("  (")[0]
    parts = re.split(r"<[^>]+>", name)
    return re.compile("[^/]+".join(re.escape(part) for part in parts) + "$")


@pytest.mark.parametrize("name", sorted(FIXTURE_SPLITS))
def test_the_layout_matches_what_the_readers_open(name, clean_root):
    """Every media path a reader builds on the fixture root fits one line of its spec's media_layout."""
    spec = get_spec(name)
    assert spec.media_layout, f"{name} has no media_layout"
    folder = next(Path(clean_root, spec.files[role]) for role in MEDIA_ROLES if role in spec.files)
    patterns = [_pattern(line) for line in spec.media_layout]
    for split in FIXTURE_SPLITS[name]:
        for item in media_files(load_samples(name, clean_root, split)):
            relative = Path(item.path).relative_to(folder).as_posix()
            assert any(p.match(relative) for p in patterns), (name, split, relative, spec.media_layout)


def test_every_registered_dataset_has_a_media_layout():
    assert [spec.name for spec in list_specs(None) if not spec.media_layout] == []


def test_docs_data_md_is_the_generated_layout():
    assert DOCS.read_text() == layout_markdown("instructblip"), f"docs/data.md is stale: run `{DOCS_COMMAND}`"


# ------------------------------------------------------------------------------------------ strict runs
class _Recorder:
    """A LightningModule that records the training steps it takes (built lazily: Lightning is heavy)."""

    @staticmethod
    def make():
        from lightning.pytorch import LightningModule

        class Recorder(LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layer = torch.nn.Linear(1, 1)
                self.steps = 0

            def training_step(self, batch, batch_idx):
                self.steps += 1
                return self.layer(torch.ones(1, 1)).sum()

            def validation_step(self, batch, batch_idx, dataloader_idx=0):
                pass

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Recorder()


def _datamodule(root: Path, **kwargs) -> InstructionDataModule:
    options = dict(
        datasets=["coco_caption", "vqav2"], eval_datasets=["gqa"], data_root=str(root), batch_size=2,
        num_workers=0, image_size=16, seed=3, strict=True,
    )
    dm = InstructionDataModule(**(options | kwargs))
    dm.setup_tokenizers(qformer_tokenizer(), t5_tokenizer(), is_encoder_decoder=True)
    return dm


def test_strict_fit_stops_before_the_first_optimizer_step_naming_the_file(bad_root):
    from lightning.pytorch import Trainer

    root, broken = bad_root
    module = _Recorder.make()
    trainer = Trainer(
        max_steps=4, val_check_interval=2, num_sanity_val_steps=0, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )
    with pytest.raises(BadInputError) as caught:
        trainer.fit(module, datamodule=_datamodule(root))
    assert module.steps == 0 and trainer.global_step == 0
    message = str(caught.value)
    assert str(broken["missing"]) in message and "gqa (testdev) record" in message
    assert "gqa: 1 missing, 1 empty" in message


def test_strict_setup_checks_the_training_sets_and_each_set_once(tmp_path, monkeypatch):
    write_fixture_root(tmp_path)
    coco = load_samples("coco_caption", tmp_path, "train")
    missing = Path(coco[2].image)
    missing.unlink()
    with pytest.raises(BadInputError, match=re.escape(str(missing)) + ".*coco_caption \\(train\\) record"):
        _datamodule(tmp_path, eval_datasets=[]).setup("fit")
    # a sample fraction bounds the work; 0 turns the check off (items still fail when fetched)
    _datamodule(tmp_path, eval_datasets=[], strict_media_sample=0).setup("fit")
    calls = []
    import ibkit.data.datamodule as datamodule_module

    real = datamodule_module.require_clean_media
    monkeypatch.setattr(
        datamodule_module, "require_clean_media", lambda sets, *a, **k: calls.append([s[:2] for s in sets]) or real(sets, *a, **k)
    )
    missing.write_bytes((tmp_path / "coco/images" / Path(coco[0].image).relative_to(tmp_path / "coco/images")).read_bytes())
    dm = _datamodule(tmp_path)
    dm.setup("fit")
    dm.setup("validate")
    assert calls == [[("coco_caption", "train"), ("vqav2", "train"), ("gqa", "testdev")], []]
