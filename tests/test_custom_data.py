"""Custom datasets declared in YAML (LLaVA JSON, JSONL): read, check, fit, test and predict on a tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import T5_TEXT, VISION, qformer_tokenizer, tiny_llm_tokenizer

from ibkit import Processor
from ibkit.app import main
from ibkit.data.errors import MalformedRecordError
from ibkit.data.registry import get_spec, load_samples
from ibkit.data.registry.custom import CustomDataset, register_custom

COLOURS = {"w10": (220, 30, 30), "w11": (30, 200, 40), "w12": (40, 40, 230)}


def _write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        word = list(COLOURS)[i % len(COLOURS)]
        name = f"img{i}.png"
        Image.new("RGB", (30, 30), COLOURS[word]).save(folder / name)
        names.append(name)
    return names


def _llava(root: Path) -> Path:
    images = _write_images(root / "llava_images", 6)
    records = []
    for i, name in enumerate(images):
        word = list(COLOURS)[i % len(COLOURS)]
        records.append({"id": f"c{i}", "image": f"llava_images/{name}", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": word},
            {"from": "human", "value": "And the background?"},
            {"from": "gpt", "value": f"{word} w20"},
        ]})
    records.append({"id": "broken", "image": images[0], "conversations": [{"from": "human", "value": "odd"}]})
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return path


def _jsonl(root: Path) -> Path:
    images = _write_images(root / "jsonl_images", 6)
    lines = []
    for i, name in enumerate(images):
        word = list(COLOURS)[i % len(COLOURS)]
        lines.append(json.dumps({"id": f"q{i}", "image": f"jsonl_images/{name}", "question": "Which colour is this?",
                                 "answers": [word, word], "choices": list(COLOURS), "label": word}))
    lines.append(json.dumps({"id": "gone", "image": "jsonl_images/missing.png", "question": "Which colour?",
                             "answer": "w10", "choices": list(COLOURS)}))
    lines.append(json.dumps({"id": "nolabel", "image": "jsonl_images/img0.png", "question": "Name it.", "answer": "w10"}))
    lines.append("{not json")
    path = root / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from test_model import tiny_model

    root = tmp_path_factory.mktemp("custom")
    _llava(root)
    _jsonl(root)
    model = tiny_model(T5_TEXT, qformer_vocab=30523)
    processor = Processor(qformer_tokenizer(), tiny_llm_tokenizer("t5"), image_size=VISION["image_size"])
    model.save_pretrained(root / "model", processor=processor)
    return root


def _entries(root: Path) -> list[dict]:
    return [
        {"name": "my_llava", "format": "llava", "path": str(root / "llava.json"), "template_set": "none",
         "weight": 2.0, "metric": "exact_match"},
        {"name": "my_items", "format": "jsonl", "files": {"train": str(root / "items.jsonl"), "test": str(root / "items.jsonl")},
         "image_root": str(root), "task": "rank", "metric": "accuracy", "eval_split": "test", "template_set": "vqa"},
    ]


# ------------------------------------------------------------------------------------------ readers
def test_llava_and_jsonl_records_become_samples_and_bad_ones_are_named_and_counted(workspace):
    register_custom(_entries(workspace))
    llava = load_samples("my_llava", workspace, "train")
    assert len(llava) == 12  # 6 conversations x 2 turns; the one-turn record is skipped
    first, second = llava[0], llava[1]
    assert (first.sample_id, first.question, first.target, first.context) == ("c0_0", "What colour is the square?", "w10", None)
    assert second.context == "User: What colour is the square?\nAssistant: w10" and second.target == "w10 w20"
    assert first.image == str(workspace / "llava_images" / "img0.png")

    from ibkit.data.errors import SkipCounter

    skips = SkipCounter("my_items")
    items = load_samples("my_items", workspace, "test", skips=skips)
    assert [s.sample_id for s in items] == [f"q{i}" for i in range(6)] + ["gone"]
    assert items[1].candidates == list(COLOURS) and items[1].label == 1 and items[1].answers == ["w11", "w11"]
    assert items[6].label == 0  # the answer is one of the choices
    assert skips.total == 2  # the record without choices (task rank) and the unparsable line
    assert "missing field 'choices'" in skips.summary() and "line 9" in skips.summary() and "nolabel" in skips.summary()
    with pytest.raises(MalformedRecordError, match=r"items.jsonl: record line 9: invalid JSON"):
        load_samples("my_items", workspace, "test", strict=True)


def test_spec_carries_the_yaml_choices_and_refuses_bad_ones(workspace):
    register_custom(_entries(workspace))
    spec = get_spec("my_items")
    assert (spec.suite, spec.eval_mode, spec.metric, spec.templates, spec.eval_split) == ("custom", "rank", "accuracy", "vqa", "test")
    llava = get_spec("my_llava")
    assert (llava.metric, llava.eval_mode, llava.splits, llava.templates) == ("accuracy", "generate", ("train",), "none")
    assert llava.generation["max_new_tokens"] == 10  # exact match: short answers, as the evaluation of VQA
    with pytest.raises(ValueError, match="metric 'auc' needs task 'rank'"):
        CustomDataset("x", "jsonl", path="a.jsonl", metric="auc").spec()
    with pytest.raises(ValueError, match="unknown key"):
        CustomDataset.from_dict({"name": "x", "format": "jsonl", "path": "a", "wieght": 2})
    with pytest.raises(ValueError, match="already registered"):
        register_custom([{"name": "vqav2", "format": "jsonl", "path": "a.jsonl"}])


def test_data_check_reads_the_custom_datasets_of_a_config(workspace, tmp_path, capsys):
    import yaml

    config = tmp_path / "custom.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {"custom_datasets": _entries(workspace)}}}))
    assert main(["data", "check", "--root", str(workspace), "--custom", str(config)]) == 0
    out = capsys.readouterr().out
    assert "my_llava [held-in]: found" in out and "train: found, 12 samples, 1 malformed record(s) skipped" in out
    assert "test: found, 7 samples, 2 malformed record(s) skipped" in out


# ------------------------------------------------------------------------------------------ fit / test / predict
def _fit_args(workspace: Path, run: Path, entries: list[dict], *extra: str) -> list[str]:
    return [
        f"--model.pretrained={workspace / 'model'}", "--model.llm_dtype=null", "--model.optim.lr=0.01",
        "--model.optim.warmup_steps=1", "--model.optim.warmup_start_lr=0.001",
        "--model.generation_overrides={num_beams: 1, max_new_tokens: 3}", f"--model.results_dir={run / 'results'}",
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=8",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={run}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run}",
        "--data=ibkit.data.datamodule.InstructionDataModule", f"--data.init_args.data_root={workspace}",
        f"--data.init_args.custom_datasets={json.dumps(entries)}", "--data.init_args.num_workers=0",
        "--data.init_args.image_size=30", "--data.init_args.batch_size=4", "--data.init_args.max_qformer_len=64",
        "--data.init_args.train_augment=false", *extra,
    ]


@pytest.mark.parametrize("mixed", [False, True], ids=["custom", "with_registered"])
def test_fit_on_custom_data_lowers_the_loss_then_test_scores_it(workspace, tmp_path, mixed):
    from fixtures_datasets import write_fixture_root

    from ibkit.app.config import build_cli
    from ibkit.data.collate import model_inputs

    entries = _entries(workspace)
    extra = []
    if mixed:  # a registered dataset (its official-format fixture) in the same mixture
        write_fixture_root(tmp_path / "data")
        extra = ["--data.init_args.datasets=[vqav2]", f"--data.init_args.data_root={tmp_path / 'data'}"]
    run = tmp_path / "run"
    cli = build_cli(["fit", *_fit_args(workspace, run, entries, *extra)], run=False)
    module, datamodule = cli.model, cli.datamodule
    expected = {"my_llava", "my_items"} | ({"vqav2"} if mixed else set())
    assert set(datamodule.dataset_names) == expected and datamodule.eval_dataset_names == ["my_items"]
    module.configure_model()
    datamodule.connect(module.processor(), module.model.is_encoder_decoder)
    datamodule.setup("fit")
    assert set(datamodule.mixture) == expected
    fixed = next(iter(datamodule.train_dataloader()))
    net = module.model

    def fixed_loss() -> float:
        net.eval()
        with torch.no_grad():
            return float(net(**model_inputs(fixed)).loss)

    before = fixed_loss()
    cli.trainer.fit(module, datamodule=datamodule)
    after = fixed_loss()
    assert cli.trainer.global_step == 8
    assert after < before - 0.05, (before, after)
    rows = csv.DictReader(next(run.rglob("metrics.csv")).read_text().splitlines())
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 8
    if mixed:
        return
    # ibkit test on the trained run: the held-out custom set ranked, scored with its metric
    ckpt = next(run.rglob("*.ckpt"))
    assert main(["test", *_fit_args(workspace, run, entries), f"--ckpt_path={ckpt}"]) == 0
    results = json.loads((run / "results" / "results.json").read_text())
    assert set(results) == {"my_items"} and 0.0 <= results["my_items"]["accuracy"] <= 1.0
    predictions = [json.loads(line) for line in (run / "results" / "predictions" / "my_items.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and all(len(p["scores"]) == 3 for p in predictions)  # 'gone' has no image: skipped
    # predict on the run's checkpoint alone: its trained weights over the folder it was trained from
    answers = run / "answers.jsonl"
    assert main(["predict", f"--model.checkpoint={ckpt}", "--model.device=cpu", f"--questions={workspace / 'items.jsonl'}",
                 f"--output={answers}", "--num_workers=0", "--progress=false", "--generation={num_beams: 1}"]) == 0
    ranked = {r["id"]: r for r in map(json.loads, answers.read_text().splitlines())}
    assert {p["sample_id"]: p["prediction"] for p in predictions} == {i: ranked[i]["answer"] for i in ranked if i != "nolabel"}


def test_predict_writes_one_line_per_question_and_resumes_without_duplicates(workspace, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    common = ["--model.pretrained", str(workspace / "model"), "--model.device=cpu", "--num_workers=0",
              "--generation={num_beams: 1, max_new_tokens: 3}", "--progress=false", "--batch_size=3"]
    part = tmp_path / "part.json"
    records = json.loads((workspace / "llava.json").read_text())
    part.write_text(json.dumps(records[:2]))  # an interrupted run: the first conversations only
    (tmp_path / "llava_images").symlink_to(workspace / "llava_images")
    assert main(["predict", f"--output={out}", f"--questions={part}", *common]) == 0
    assert len(out.read_text().splitlines()) == 4
    with open(out, "a") as handle:
        handle.write('{"id": "c2_0", "ans')  # killed mid-write
    assert main(["predict", f"--output={out}", f"--questions={workspace / 'llava.json'}", *common]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(f"c{i}_{t}" for i in range(6) for t in range(2))
    assert all(set(r) == {"id", "image", "question", "answer"} and isinstance(r["answer"], str) for r in lines)
    printed = capsys.readouterr().out
    assert "12 question(s), 4 already answered" in printed and "1 malformed record(s)" in printed

    # a JSONL with choices: ranked, one score per choice; the missing image is named and counted
    ranked = tmp_path / "ranked.jsonl"
    assert main(["predict", f"--output={ranked}", f"--questions={workspace / 'items.jsonl'}", *common]) == 0
    rows = [json.loads(line) for line in ranked.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)] + ["nolabel"]
    assert all(r["choices"] == list(COLOURS) and len(r["scores"]) == 3 and r["answer"] in COLOURS for r in rows[:6])
    assert "1 x missing_file (e.g. gone" in capsys.readouterr().out

    # a folder of images and one question
    folder = tmp_path / "folder"
    assert main(["predict", f"--output={folder / 'a.jsonl'}", f"--images={workspace / 'llava_images'}",
                 "--question=What is it?", *common]) == 0
    rows = [json.loads(line) for line in (folder / "a.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"img{i}.png" for i in range(6)]
