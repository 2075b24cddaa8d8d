"""DDP on 2 CPU processes (gloo): training runs, and its validation metrics equal a 1-process validation."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "fit.yaml"


def _run(args: list[str], cwd: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "ibkit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"ibkit {' '.join(args[:2])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _val_metrics(log_dir: Path) -> dict[str, float]:
    with open(log_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("val/") and value not in ("", None):
                out[key] = float(value)
    return out


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    from ibkit.shapes.datamodule import prepare_tiny_workspace

    workspace = tmp_path / "ws"
    prepare_tiny_workspace(workspace)  # made once, before the processes start (no race on the files)
    run = tmp_path / "run"
    common = [
        "--config", str(TINY),
        f"--data.init_args.root={workspace}",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=1.0",  # all held-out samples, split across the ranks
        "--data.init_args.batch_size=2",
        "--data.init_args.eval_batch_size=2",
    ]
    # 2 processes x batch 2 = the 1-process global batch of 4 positions of the same stream
    _run(["fit", *common, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=2",
          "--trainer.val_check_interval=2"], tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ddp = _val_metrics(run / "lightning_logs" / "version_0")
    assert "val/loss" in ddp and "val/shapes_vsr/loss" in ddp and "val/shapes_nocaps/loss" in ddp

    # the same weights validated by one process over the unsplit held-out sets
    _run(["validate", *common, "--trainer.devices=1", f"--ckpt_path={last}"], tmp_path)
    single = _val_metrics(run / "lightning_logs" / "version_1")
    assert set(single) == set(ddp)
    for key, value in single.items():
        assert value == pytest.approx(ddp[key], rel=1e-5, abs=1e-6), key
