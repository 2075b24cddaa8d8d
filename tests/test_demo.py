"""``ibkit demo``: the stage-2 ablation runner and its summary over seeds (tiny sizes, a few steps)."""

from __future__ import annotations

import json

import pytest
import yaml

from ibkit.shapes import demo as demo_module
from ibkit.shapes.demo import ABLATIONS, CONFIGS, StageClock, ablation_table, run_ablation, summarize


def test_summarize_mean_and_sample_std_over_seeds():
    a, b = "shapes_vsr", "shapes_visdial"
    per_seed = [{a: {"accuracy": 0.5}, b: {"mrr": 0.2}}, {a: {"accuracy": 0.7}}, {a: {"accuracy": 0.6}}]
    summary = summarize(per_seed)
    assert summary[a]["mean"] == pytest.approx(0.6)
    assert summary[a]["std"] == pytest.approx(0.1)  # sample std of 0.5, 0.6, 0.7
    assert (summary[a]["min"], summary[a]["max"], summary[a]["n"]) == (0.5, 0.7, 3)
    assert summary[b] == {"mean": 0.2, "std": 0.0, "min": 0.2, "max": 0.2, "n": 1}
    table = ablation_table({"x": summary, "y": {a: summary[a]}}, {a: 0.5})
    assert f"| {a} | 0.500 | 0.600 ± 0.100 | 0.600 ± 0.100 |" in table
    assert f"| {b} | - | 0.200 ± 0.000 | - |" in table


def test_the_demo_clock_prints_each_stage_and_projects_the_total_after_stage_1(monkeypatch, capsys):
    now = iter([100.0, 100.0 + 84.0, 100.0 + 84.0 + 95.5])  # start, end of stage 1, end of stage 2
    monkeypatch.setattr(demo_module.time, "perf_counter", lambda: next(now))
    clock = StageClock(share_of_first=0.4)
    clock.done("stage 1")
    out = capsys.readouterr().out
    assert "[demo] stage 1: 1 min 24 s (total so far 1 min 24 s)" in out
    assert "projected total: about 3 min 30 s" in out  # 84 s / 0.4
    clock.done("stage 2")
    out = capsys.readouterr().out
    assert "[demo] stage 2: 1 min 36 s (total so far 3 min 00 s)" in out and "projected" not in out
    assert clock.seconds == {"stage 1": 84.0, "stage 2": 95.5} and clock.total == 179.5


def test_ablation_runs_every_variant_and_seed_and_resumes(tmp_path, capsys):
    sizes = "{train: 12, val: 6, test: 6}"
    results = run_ablation(tmp_path, seeds=(0, 1), stage1_steps=2, stage2_steps=2, max_eval_samples=3, sizes=sizes)
    labels = [label for label, _ in ABLATIONS.values()]
    assert list(results["ablations"]) == labels
    for folder in ABLATIONS:
        for seed in (0, 1):
            assert (tmp_path / "eval" / f"{folder}_seed{seed}" / "results.json").is_file()
    config = json.loads((tmp_path / "blip2_qformer_seed0" / "model" / "config.json").read_text())
    assert config["ibkit"]["instruction_aware"] is False
    assert json.loads((tmp_path / "default_seed0" / "model" / "config.json").read_text())["ibkit"]["instruction_aware"]
    # stage 2 trained from the frozen-feature cache of the stage-1 encoder: one cache per held-in dataset
    cached = {d.name for d in (tmp_path / "cache").iterdir() if any(d.glob("*/shard-*.safetensors"))}
    assert {"shapes_caption", "shapes_vqa", "shapes_mcvqa"} <= cached
    summary = results["ablations"][labels[0]]["shapes_vsr"]
    assert summary["n"] == 2
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert "uniform mixing" in (tmp_path / "ablation.md").read_text()
    check_fresh_questions_with_the_models_tokenizers(tmp_path / "default_seed0" / "model", tmp_path / "check")
    stamp = (tmp_path / "eval" / "default_seed0" / "results.json").stat().st_mtime_ns
    again = run_ablation(tmp_path, seeds=(0, 1), stage2_steps=2, max_eval_samples=3, sizes=sizes)  # resumes: nothing reruns
    assert (tmp_path / "eval" / "default_seed0" / "results.json").stat().st_mtime_ns == stamp
    assert again["ablations"] == results["ablations"]


def test_demo_configs_share_their_data_and_mix_unequal_held_in_sizes():
    from ibkit.data.sampler import mixture_weights
    from ibkit.shapes import split_sizes

    data = {name: yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]["init_args"]
            for name in ("stage1", "stage2", "eval")}
    # one rendering serves all three stages: a different root, seed or size would re-render a dataset
    for key in ("root", "data_seed", "render_size", "sizes"):
        assert len({json.dumps(d[key], sort_keys=True) for d in data.values()}) == 1, key
    held_in = data["stage2"]["datasets"]
    train = {name: split_sizes(name, data["stage2"]["sizes"])["train"] for name in held_in}
    assert len(set(train.values())) > 1
    sqrt, uniform = (mixture_weights(train, mode) for mode in ("sqrt", "uniform"))
    # the mixing ablation compares two really different mixtures
    assert max(abs(sqrt[name] - uniform[name]) for name in held_in) > 0.05


def check_fresh_questions_with_the_models_tokenizers(model, out):
    """``ibkit demo --check``: fresh questions from another data seed, read with the model's tokenizers."""
    from ibkit.app import main
    from ibkit.data.registry import load_samples
    from ibkit.shapes.demo import run_heldin_check

    result = run_heldin_check(model, out, questions=12, data_seed=5)
    assert sum(r["n"] for r in result.values()) == 12
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result.values())
    questions = {s.question for s in load_samples("shapes_vqa", out, "val")}
    demo_questions = {s.question for s in load_samples("shapes_vqa", model.parents[1], "val")}
    assert questions != demo_questions
    assert json.loads((out / "heldin_check.json").read_text())["by_type"] == result
    # the same evaluation with the tokenizers built from the new data (other word ids) is refused, not garbage
    args = ["test", "--config", str(CONFIGS / "eval.yaml"), f"--data.init_args.root={out}", "--data.init_args.data_seed=5",
            "--data.init_args.sizes={train: 1, val: 1, test: 1, shapes_vqa.val: 12}",
            "--data.init_args.eval_datasets=[shapes_vqa]", f"--model.pretrained={model}",
            f"--model.results_dir={out / 'refused'}", "--trainer.enable_progress_bar=false"]
    with pytest.raises(ValueError, match="other ids than the model's own"):
        main(args)
