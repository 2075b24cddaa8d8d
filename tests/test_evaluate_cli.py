"""`ibkit test` on the official-format fixtures of all 13 held-out datasets with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_datasets import write_fixture_root
from tiny_models import T5_TEXT, VISION, qformer_tokenizer, tiny_llm_tokenizer

from ibkit import Processor
from ibkit.eval.protocol import PAPER_TABLE1

HELD_OUT = ["nocaps", "flickr30k", "gqa", "vsr", "iconqa", "textvqa", "visdial", "hatefulmemes", "vizwiz",
            "scienceqa", "msvd_qa", "msrvtt_qa", "ivqa"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from test_model import tiny_model

    root = tmp_path_factory.mktemp("eval")
    write_fixture_root(root / "data")
    model = tiny_model(T5_TEXT, qformer_vocab=30523)
    processor = Processor(qformer_tokenizer(), tiny_llm_tokenizer("t5"), image_size=VISION["image_size"])
    model.save_pretrained(root / "model", processor=processor)
    return root


def _ibkit_test(root: Path, out: str, extra: list[str] = ()) -> subprocess.CompletedProcess:
    config = Path(__file__).parents[1] / "configs" / "eval" / "zeroshot.yaml"
    cmd = [
        sys.executable, "-m", "ibkit", "test", "--config", str(config),
        f"--model.pretrained={root / 'model'}", "--model.llm_dtype=null", f"--model.results_dir={root / out}",
        "--model.generation_overrides={num_beams: 1, max_new_tokens: 4}",
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", f"--trainer.default_root_dir={root / out}",
        f"--data.init_args.data_root={root / 'data'}", "--data.init_args.num_workers=0",
        "--data.init_args.image_size=30", "--data.init_args.eval_batch_size=3",
        "--data.init_args.max_qformer_len=64", *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_ibkit_test_writes_predictions_results_and_table(workspace):
    done = _ibkit_test(workspace, "out")
    assert done.returncode == 0, done.stderr[-3000:]
    out = workspace / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(HELD_OUT)
    for name, metrics in results.items():
        (metric, value), = metrics.items()
        assert 0.0 <= value <= (10.0 if metric == "cider" else 1.0), (name, metric, value)
        lines = (out / "predictions" / f"{name}.jsonl").read_text().splitlines()
        assert lines and all("prediction" in json.loads(line) for line in lines)
    table = (out / "results.md").read_text()
    assert f"{PAPER_TABLE1['InstructBLIP FlanT5-XL']['scienceqa']:.1f}" in table
    assert table.count("\n") == len(HELD_OUT) + 2
    # the same command gives the same numbers
    again = _ibkit_test(workspace, "out2", ["--data.init_args.eval_datasets=[vsr, gqa, visdial]"])
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((workspace / "out2" / "results.json").read_text())
    assert second == {k: results[k] for k in ("vsr", "gqa", "visdial")}


def test_missing_datasets_are_skipped_not_fatal(workspace, tmp_path):
    done = _ibkit_test(workspace, "partial", [f"--data.init_args.paths={{vsr: {{test: {tmp_path / 'absent.jsonl'}}}}}",
                                             "--data.init_args.eval_datasets=[vsr, iconqa]"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(json.loads((workspace / "partial" / "results.json").read_text())) == {"iconqa"}
    assert "skipping vsr" in done.stderr
