"""The `ibkit` command: LightningCLI subcommands next to typed-function commands, configs from Python, export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401 - imported outside capsys: its log handler must not bind a captured stream
import pytest
import torch

from ibkit.app import (
    COMMANDS,
    Command,
    Group,
    build_cli,
    build_from_config,
    main,
    parse_config,
    run_lightning,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "fit.yaml"


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in text


def test_unknown_command_is_an_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_fit_help_is_lightning_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "--print_config" in text and "--ckpt_path" in text and "--model.help" in text
    # the module is chosen by model.class_path; its own options are listed per class
    for module in ("ibkit.training.InstructBLIPModule", "ibkit.training.pretrain.Blip2PretrainModule"):
        with pytest.raises(SystemExit):
            main(["fit", "--model.help", module])
        assert "optim" in capsys.readouterr().out


def test_print_config_and_dotted_overrides(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(TINY), "--model.optim.lr=0.25", "--trainer.max_steps=7", "--print_config"])
    printed = capsys.readouterr().out
    assert "lr: 0.25" in printed and "max_steps: 7" in printed
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(printed)
    _, config = parse_config(["fit", "--config", str(dumped)])
    assert config.model.init_args.optim.lr == 0.25 and config.trainer.max_steps == 7
    assert config.model.init_args.model.init_args.num_query_tokens == 4


def test_data_subcommand_delegates_to_the_catalog(capsys):
    assert main(["data", "list", "--suite", "shapes"]) == 0
    out = capsys.readouterr().out
    assert "shapes_caption" in out and "shapes_vsr" in out


def test_convert_needs_a_source(capsys):
    assert main(["convert"]) == 2
    assert main(["convert", "caffe"]) == 2
    assert "unknown source 'caffe'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "lavis", "--help"])
    assert exit_info.value.code == 0


def test_python_dash_m_ibkit_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-m", "ibkit", "--help"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "ibkit COMMAND" in done.stdout


def test_export_writes_a_transformers_folder(tmp_path):
    """fit -> best checkpoint -> `ibkit export` -> transformers loads it, with the trained weights."""
    from transformers import InstructBlipForConditionalGeneration

    from ibkit import InstructBLIP
    from ibkit.shapes.datamodule import prepare_tiny_workspace

    workspace, run, out = tmp_path / "ws", tmp_path / "run", tmp_path / "exported"
    prepare_tiny_workspace(workspace)
    config = [
        "--config", str(TINY), f"--data.init_args.root={workspace}", f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--model.val_protocol=false",
    ]
    assert main(["fit", *config]) == 0
    # a folder resolves to the best checkpoint recorded by ModelCheckpoint
    assert main(["export", *config, f"--ckpt_path={run / 'checkpoints'}", f"--output={out}"]) == 0
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    trained = torch.load(best[0], map_location="cpu", weights_only=True)["state_dict"]

    ours = InstructBLIP.from_pretrained(out)
    for key, value in trained.items():
        assert torch.equal(ours.state_dict()[key.removeprefix("model.")], value), key
    hf, info = InstructBlipForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(hf.query_tokens, trained["model.query_tokens"])
    assert (out / "qformer_tokenizer").is_dir() and (out / "preprocessor_config.json").is_file()
    # transformers runs the folder as its users do (InstructBlipProcessor, forward, greedy generate)
    from tiny_models import assert_folder_runs_in_transformers
    from transformers import AutoTokenizer

    llm_words = AutoTokenizer.from_pretrained(out).get_vocab()
    qformer_words = AutoTokenizer.from_pretrained(out / "qformer_tokenizer").get_vocab()
    words = sorted(w for w in llm_words if w.isalpha() and w in qformer_words)[:8]
    assert len(words) == 8, words
    assert_folder_runs_in_transformers(out, ours.eval(), [" ".join(words[:4]), " ".join(words[4:])])

    # a checkpoint of another configuration is refused, naming the weight
    with pytest.raises(ValueError, match="query_tokens: \\(1, 4, 32\\) in the checkpoint"):
        main(["export", *config, "--model.model.init_args.num_query_tokens=8", f"--ckpt_path={best[0]}",
              f"--output={tmp_path / 'other'}"])


def _leaves(commands, path=()):
    for name, entry in commands.items():
        if isinstance(entry, Group):
            yield from _leaves(entry.commands, (*path, name))
        else:
            yield (*path, name)


@pytest.mark.parametrize("path", [p for p in _leaves(COMMANDS) if p != ("demo",)], ids=" ".join)
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: ibkit ") and f" {path[-1]} " in usage  # LightningCLI's: ibkit [options] fit


def test_version_and_group_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ibkit ")
    assert main(["data", "--help"]) == 0
    assert "  cache-features " in capsys.readouterr().out


def test_a_command_that_cannot_be_imported_says_so(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "elsewhere", Command("ibkit.nowhere:run", help="a part not installed"))
    assert "  elsewhere " in (main(["--help"]) == 0 and capsys.readouterr().out)
    assert main(["elsewhere", "--flag"]) == 2
    assert "ibkit elsewhere: ibkit.nowhere:run is not available (ModuleNotFoundError" in capsys.readouterr().err


def test_a_usage_error_of_a_command_exits_with_its_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", "--root", str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    assert "is not a directory" in capsys.readouterr().err


def test_build_from_config_is_the_command_line_configuration(tmp_path):
    overrides = {"data.init_args.root": str(tmp_path), "model.optim.lr": 0.25, "trainer.max_steps": 3}
    module, datamodule = build_from_config([TINY], overrides)
    cli = build_cli(["--config", str(TINY), f"--data.init_args.root={tmp_path}", "--model.optim.lr=0.25",
                     "--trainer.max_steps=3"], run=False)
    assert Path(datamodule.root) == tmp_path
    module.configure_model()
    cli.model.configure_model()
    theirs = cli.model.state_dict()
    # the same seed: the same random weights
    assert all(torch.equal(value, theirs[key]) for key, value in module.state_dict().items())


def test_run_lightning_fits_and_resumes(tmp_path):
    from ibkit.shapes.datamodule import prepare_tiny_workspace

    workspace, run = tmp_path / "ws", tmp_path / "run"
    prepare_tiny_workspace(workspace)
    overrides = {
        "data.init_args.root": str(workspace), "trainer.default_root_dir": str(run),
        "trainer.logger.init_args.save_dir": str(run), "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False, "trainer.max_steps": 2, "trainer.val_check_interval": 2,
        "model.val_protocol": False,
    }
    assert run_lightning("fit", [TINY], overrides).trainer.global_step == 2
    resumed = run_lightning("fit", [TINY], {**overrides, "trainer.max_steps": 3}, ckpt_path="last")
    assert resumed.trainer.global_step == 3
    with pytest.raises(ValueError, match="unknown Lightning command 'train'"):
        run_lightning("train", [TINY])


def test_memory_command_prints_the_paper_models_table(capsys):
    """``ibkit memory``: the meta-device estimate as an app command (was a module's own argparse main)."""
    from ibkit.app import main

    assert main(["memory", "--prompt_len", "64", "--target_len", "32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| InstructBLIP")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "InstructBLIP FlanT5-XL", "InstructBLIP FlanT5-XXL", "InstructBLIP Vicuna-7B", "InstructBLIP Vicuna-13B"]
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", "--prompt_len", "0"])
    assert exit_info.value.code == 2
