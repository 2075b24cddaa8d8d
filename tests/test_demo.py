"""``ibkit demo``: the pipeline's configs agree with each other, and the whole pipeline and the ablation run
end to end (tiny sizes, a few steps), writing the documented results layout and resuming where they stopped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from ibkit.shapes.demo import ABLATIONS, HELD_OUT, MODELS, run_ablation, run_demo
from ibkit.shapes.pipeline import CONFIGS
from ibkit.shapes.report import check_ablation, check_results
from ibkit.shapes.runner import HAS_FORKSERVER
from ibkit.shapes.scenes import QA_TYPES

STAGES = ("blip2_stage1", "blip2_stage2", "instruct")
DATA_KEYS = ("root", "data_seed", "render_size", "sizes")


def _config(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def _network(config: dict) -> dict:
    return config["model"]["init_args"]["model"]["init_args"]


def _unfrozen(encoder: dict) -> dict:
    return {**encoder, "init_args": {k: v for k, v in encoder["init_args"].items() if k != "frozen"}}


def test_demo_configs_share_their_data_and_their_networks():
    from ibkit.data.sampler import mixture_weights
    from ibkit.shapes import split_sizes

    configs = {name: _config(name) for name in ("encoder", "encoder_clip", "lm", "qformer_text", *STAGES)}
    # one rendering serves every step: another root, seed or size would render again and renumber the words
    for key in DATA_KEYS:
        assert len({json.dumps(c["data"]["init_args"][key], sort_keys=True) for c in configs.values()}) == 1, key
    # the encoder the later stages freeze is the one step 1 pretrains; the swap fragment is encoder_clip's tower
    pretrained = _unfrozen(configs["encoder"]["model"]["init_args"]["vision_encoder"])
    for stage in STAGES:
        assert _unfrozen(_network(configs[stage])["vision_encoder"]) == pretrained, stage
        assert _network(configs[stage])["vision_encoder"]["init_args"]["frozen"] is True
    swapped = _config("swap_clip")["model"]["init_args"]["model"]["init_args"]["vision_encoder"]
    assert _unfrozen(swapped) == _unfrozen(configs["encoder_clip"]["model"]["init_args"]["vision_encoder"])
    # one Q-Former through stage 1, stage 2 and instruction tuning; only its instruction input differs
    qformers = {stage: dict(_network(configs[stage])["qformer"]) for stage in STAGES}
    assert [q.pop("instruction_aware") for q in qformers.values()] == [True, False, True]
    assert len({json.dumps(q, sort_keys=True) for q in qformers.values()}) == 1
    assert qformers["instruct"]["vocab_size"] == _network(configs["blip2_stage1"])["dec_token_id"] + 1
    # the Q-Former's BERT (qformer_text.yaml) has its text side's shape, so init_from can copy it one to one
    bert = configs["qformer_text"]["model"]["init_args"]["config"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        assert bert[key] == qformers["blip2_stage1"][key], key
    assert bert["vocab_size"] == _network(configs["blip2_stage1"])["dec_token_id"]  # [DEC] is appended after it
    # the held-in mixture mixes unequal sizes, so the uniform-mixing arm compares a really different mixture
    data = configs["instruct"]["data"]["init_args"]
    train = {name: split_sizes(name, data["sizes"])["train"] for name in data["datasets"]}
    sqrt, uniform = (mixture_weights(train, mode) for mode in ("sqrt", "uniform"))
    assert max(abs(sqrt[name] - uniform[name]) for name in train) > 0.05
    # the evaluation config only adds the protocol to the network it is stacked on
    assert set(_config("eval")["data"]["init_args"]) & set(DATA_KEYS) == set()
    # the side warm-up stacked on instruction tuning: its own steps, run folder and data, the same network;
    # instruction tuning then starts from its checkpoint
    side = _config("instruct_side")
    assert set(side) == {"trainer", "model", "data"} and set(side["model"]["init_args"]) == {"init_from"}
    assert side["data"]["init_args"] == {"datasets": ["shapes_vqa"], "question_types": ["side"]}
    starts = configs["instruct"]["model"]["init_args"]["init_from"]
    assert starts == [*side["model"]["init_args"]["init_from"], f"{side['trainer']['default_root_dir']}/checkpoints/last.ckpt"]
    # the T5's optional binding phase stacked on lm.yaml: its own steps and run folder, focused records, the same T5
    binding = _config("lm_binding")
    assert set(binding) == {"trainer", "data"} and set(binding["data"]["init_args"]) == {"focus_kinds", "focus_objects"}
    # the relation recipe's phase stacked the same way: the side warm-up's starts and its checkpoint, the recipe's
    # question types (the side statements, which the warm-up leaves out, included)
    relation = _config("instruct_relation")
    assert set(relation) == {"trainer", "model", "data"} and set(relation["model"]["init_args"]) == {"init_from"}
    assert relation["data"]["init_args"] == {"relations": True, "datasets": ["shapes_vqa"],
                                             "question_types": ["side", "side_statement", "relation"]}
    recipe = [start.replace("outputs/demo/", "outputs/demo_relations/") for start in starts]
    assert relation["model"]["init_args"]["init_from"] == recipe


@pytest.mark.slow
def test_the_pipeline_and_its_ablation_run_end_to_end_and_resume(tmp_path):
    sizes = "{train: 12, val: 6, test: 6, shapes_vqa.val: 12, shapes_text.train: 160, shapes_text.val: 12}"
    steps = {step: 2 for step in ("encoder", "lm", *STAGES, "instruct_side")}
    results = run_demo(tmp_path, steps=steps, max_eval_samples=4, sizes=sizes)
    check_results(results)
    assert json.loads((tmp_path / "results.json").read_text())["heldout"] == results["heldout"]
    assert set(results["heldout"]) == set(MODELS)
    assert set(results["heldout"]["instructblip"]) == set(HELD_OUT)
    assert all(cell["n"] == 4 for cell in results["heldout"]["blip2"].values())
    assert list(results["steps"]) == ["data", "encoder", "lm", "blip2_stage1", "features", "blip2_stage2",
                                      "instruct_side", "instruct", "evaluate", "evaluate_blip2", "probe"]
    # the encoder and the T5 ran side by side, in processes of their own: the T5's output went to its log, and
    # so did the instruction data's feature caching after it; so did BLIP-2's evaluation, beside instruction tuning
    lm_log = (tmp_path / "lm" / "log.txt").read_text()
    assert "ibkit fit" in lm_log and "ibkit data cache-features" in lm_log
    assert re.search(r"feature cache \S+: [1-9]\d* item\(s\) encoded", lm_log)
    assert "ibkit test" in (tmp_path / "eval" / "blip2.log.txt").read_text()
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert (tmp_path / "results.md").read_text().count("| shapes_vsr |") == 1
    # held-in VQA split by the number of shapes: the same questions as the per-type table, counted from the scenes
    for model in MODELS:
        by_shapes, by_type = results["heldin_vqa_by_shapes"][model], results["heldin_vqa_by_type"][model]
        assert set(by_shapes) == set(by_type)
        for kind, cells in by_shapes.items():
            assert set(cells) <= {"1", "2", "3", "4"}
            assert sum(cell["n"] for cell in cells.values()) == by_type[kind]["n"]
            mean = sum(cell["value"] * cell["n"] for cell in cells.values()) / by_type[kind]["n"]
            assert mean == pytest.approx(by_type[kind]["value"])
    # the T5 from text: every held-in question type asked from descriptions of 1-4 objects, 200 records a cell
    ceiling = results["lm_text_by_shapes"]
    assert set(ceiling) == set(QA_TYPES) >= set(results["heldin_vqa_by_type"]["instructblip"])
    assert all(set(cells) == {"1", "2", "3", "4"} and all(c["n"] == 200 for c in cells.values())
               for cells in ceiling.values())
    assert "| the T5, from the description |" in (tmp_path / "results.md").read_text()
    # the encoder's weights reached the frozen encoder of every later stage, through encoder.safetensors
    assert (tmp_path / "encoder" / "model" / "encoder.safetensors").is_file()
    assert (tmp_path / "instruct" / "model" / "config.json").is_file()  # the instruction-tuned model, exported
    # instruction tuning started from the side warm-up, which trained on side questions only
    assert (tmp_path / "instruct_side" / "checkpoints" / "last.ckpt").is_file()
    logged = yaml.safe_load((tmp_path / "instruct" / "config.yaml").read_text())
    assert logged["model"]["init_args"]["init_from"][-1] == str(tmp_path / "instruct_side" / "checkpoints" / "last.ckpt")
    warmup = yaml.safe_load((tmp_path / "instruct_side" / "config.yaml").read_text())["data"]["init_args"]
    assert (warmup["datasets"], warmup["question_types"]) == (["shapes_vqa"], ["side"])
    # every stage with the frozen encoder read its features from the cache beside the data
    assert {"shapes_caption", "shapes_vqa"} <= {d.name for d in (tmp_path / "cache").iterdir()}
    # BLIP-2 and InstructBLIP were evaluated on the same samples with the same prompts
    prompts = {}
    for model in MODELS:
        lines = (tmp_path / "eval" / model / "predictions" / "shapes_vsr.jsonl").read_text().splitlines()
        prompts[model] = [(json.loads(line)["sample_id"], json.loads(line)["prompt"]) for line in lines]
    assert prompts["blip2"] == prompts["instructblip"]

    ablation = run_ablation(tmp_path, seeds=(0,), steps=steps, max_eval_samples=4, sizes=sizes)
    check_ablation(ablation)
    assert list(ablation["arms"]) == list(ABLATIONS)
    assert (tmp_path / "swapped_encoder" / "encoder" / "model" / "encoder.safetensors").is_file()
    for arm in ABLATIONS:
        runs = tmp_path / "swapped_encoder" if arm == "swapped_encoder" else tmp_path
        assert (runs / f"{arm}_seed0" / "eval" / "instructblip" / "results.json").is_file(), arm
        assert (runs / f"{arm}_seed0" / "instruct_side" / "checkpoints" / "last.ckpt").is_file(), arm
    assert (tmp_path / "ablation.png").stat().st_size > 0
    from ibkit.shapes.tasks import VQA_TRAIN_QUESTIONS

    for arm, info in ablation["arms"].items():  # held-in VQA per question type beside the overall accuracy
        cells = info["per_seed"][0]
        kinds = {name.split(" ", 1)[1]: cell["value"] for name, cell in cells.items() if name.startswith("shapes_vqa ")}
        assert kinds and set(kinds) <= set(VQA_TRAIN_QUESTIONS), arm
        assert min(kinds.values()) <= cells["shapes_vqa"]["value"] <= max(kinds.values()), arm
    assert f"| shapes_vqa {min(kinds)} (held-in) | vqa_accuracy |" in (tmp_path / "ablation.md").read_text()
    stamp = (tmp_path / "default_seed0" / "eval" / "instructblip" / "results.json").stat().st_mtime_ns
    again = run_ablation(tmp_path, seeds=(0,), steps=steps, max_eval_samples=4, sizes=sizes)  # resumes: nothing reruns
    assert (tmp_path / "default_seed0" / "eval" / "instructblip" / "results.json").stat().st_mtime_ns == stamp
    assert again["arms"] == ablation["arms"]
    # its time is the whole ablation's, not the resuming invocation's few seconds
    assert again["seconds"] >= ablation["seconds"] > again["seconds_this_invocation"]
    units = json.loads((tmp_path / "ablation_seconds.json").read_text())
    assert again["seconds"] == pytest.approx(sum(units.values()), abs=0.1)
    # the arms ran two at a time, side by side: one ledger unit per pair, the second's output in its log
    pairs = [unit.split(" + ") for unit in units if " seed " in unit]
    assert sorted(name for pair in pairs for name in pair) == sorted(f"{arm} seed 0" for arm in ABLATIONS)
    assert [len(pair) for pair in pairs] == [2, 2]
    assert "ibkit fit" in (tmp_path / "blip2_qformer_seed0" / "log.txt").read_text()


def test_side_by_side_jobs_run_to_their_end_and_a_failure_names_its_log(tmp_path):
    from ibkit.shapes.runner import run_side_by_side

    logs = {"second": tmp_path / "logs" / "second.txt", "third": tmp_path / "third.txt"}
    seconds = run_side_by_side({"first": [["--version"]], "second": [["--version"], ["--version"]]}, logs)
    assert set(seconds) == {"first", "second"} and all(value >= 0 for value in seconds.values())
    assert logs["second"].read_text().count("$ ibkit --version") == 2  # each command is printed, then run
    assert logs["second"].read_text().count("ibkit ") >= 4
    with pytest.raises(SystemExit, match="third") as failure:
        run_side_by_side({"first": [["--version"]], "third": [["no-such-command"], ["--version"]]}, logs)
    assert str(logs["third"]) in str(failure.value) and "first" not in str(failure.value)
    written = logs["third"].read_text()
    assert "unknown command 'no-such-command'" in written and "$ ibkit --version" not in written  # stopped there


def test_a_command_process_runs_ibkit_with_its_environment_and_appends_to_its_log(tmp_path):
    from ibkit import __version__
    from ibkit.shapes.runner import run_command_process

    log = tmp_path / "log.txt"
    log.write_text("before\n")
    env = {**os.environ, "IBKIT_CPU_BF16": "0"}
    assert run_command_process(["--version"], env, 1, log) == 0
    assert run_command_process(["no-such-command"], env, 1, log) == 2
    assert log.read_text().splitlines()[:2] == ["before", f"ibkit {__version__}"]
    assert "unknown command 'no-such-command'" in log.read_text()  # stderr goes to the log too
    # the command runs with the environment and the thread count given, not those of the server it forks from
    for threads, forced in ((1, "0"), (2, "1")):
        out = tmp_path / f"bench{threads}"
        args = ["bench", "--size", "tiny", "--workloads", "rank", "--repeats", "1", "--candidates", "2",
                "--output_dir", str(out), "--no_progress", "true"]
        assert run_command_process(args, {**env, "IBKIT_CPU_BF16": forced}, threads, log) == 0
        report = json.loads((out / "bench.json").read_text())
        assert report["machine"]["torch_threads"] == threads
        assert report["fast_bf16_forced"] is (forced == "1")


# Four threads (two lanes' worth, to make the race more frequent) start and wait for forkserver processes at once; each
# must get its own process's exit code.
# A new interpreter, so that its forkserver has imported nothing and forks fast: that makes the race this guards
# against (Process.start polling the other thread's process, two readers of one exit code, one of them told 255)
# frequent: without run_process's lock, 3 to 9 of these 1,000 processes were told 255 in each of eleven runs (2-core
# AMD EPYC).
THREADS_OF_PROCESSES = """
import multiprocessing, sys, threading, time

def child(i):
    time.sleep(0.001 * (i % 7))  # the threads' processes end at shifting times against each other's starts
    sys.exit(i % 5)

def lane(run_process, context, offset, wrong):
    for i in range(offset, 1000, 4):
        code = run_process(context.Process(target=child, args=(i,)))
        if code != i % 5:
            wrong.append((i % 5, code))

if __name__ == "__main__":  # ibkit imported here only: each process prepares this module, as __mp_main__
    from ibkit.shapes.runner import run_process

    context, wrong = multiprocessing.get_context("forkserver"), []
    threads = [threading.Thread(target=lane, args=(run_process, context, offset, wrong)) for offset in range(4)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    print("wrong", wrong)
"""


@pytest.mark.skipif(not HAS_FORKSERVER, reason="no forkserver on this platform")
def test_processes_started_from_several_threads_at_once_each_report_their_own_exit_code(tmp_path):
    script = tmp_path / "threads_of_processes.py"
    script.write_text(THREADS_OF_PROCESSES)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "wrong []"


def test_a_lane_runs_its_steps_in_order_beside_another_job_and_stops_at_its_failed_step(tmp_path):
    from ibkit.shapes.runner import run_side_by_side

    logs = {"lane": tmp_path / "lane.txt"}
    seconds = run_side_by_side({"first": [["--version"]], "lane": {"a": [["--version"]], "b": [["--version"]] * 2}},
                               logs)
    assert set(seconds) == {"first", "a", "b"} and all(value >= 0 for value in seconds.values())
    assert logs["lane"].read_text().count("$ ibkit --version") == 3
    with pytest.raises(SystemExit, match="of a in lane failed") as failure:
        run_side_by_side({"first": [["--version"]], "lane": {"a": [["no-such-command"]], "b": [["--version"]]}}, logs)
    assert str(logs["lane"]) in str(failure.value)
    assert "$ ibkit --version" not in logs["lane"].read_text()  # step b needs step a: never started


def test_a_step_waits_for_the_step_of_another_lane_that_it_comes_after(tmp_path, monkeypatch):
    import threading
    import time

    import ibkit.shapes.runner as runner

    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def fake_command(args, env, threads, log=None):  # ["name", seconds, exit code]
        with lock:
            events.append(("start", args[0]))
        time.sleep(float(args[1]))
        with lock:
            events.append(("end", args[0]))
        return int(args[2])

    monkeypatch.setattr(runner, "run_command_process", fake_command)
    logs = {"late": tmp_path / "late.txt"}
    # without the wait, "needs" would start at once, long before "slow" ends
    jobs = {"early": {"slow": [["slow", "0.5", "0"]]}, "late": {"quick": [["quick", "0", "0"]],
                                                                 "needs": [["needs", "0", "0"]]}}
    seconds = runner.run_side_by_side(jobs, logs, after={"needs": "slow"})
    assert set(seconds) == {"slow", "quick", "needs"}
    assert events.index(("start", "needs")) > events.index(("end", "slow"))
    assert events.index(("end", "quick")) < events.index(("end", "slow"))  # the lane's earlier step did not wait

    events.clear()
    jobs["early"] = {"slow": [["slow", "0.2", "1"]]}  # it fails: the step after it never runs, and says why
    with pytest.raises(SystemExit, match="needs in late did not run: it needs slow, which failed"):
        runner.run_side_by_side(jobs, logs, after={"needs": "slow"})
    assert ("start", "needs") not in events and ("end", "quick") in events

    for after, message in (({"needs": "nothing"}, "no step 'nothing'"), ({"needs": "quick"}, "both in lane 'late'"),
                           ({"needs": "slow", "slow": "needs"}, "wait for each other forever: "),
                           ({"slow": "needs", "quick": "slow"}, "slow -> needs -> quick -> slow")):
        with pytest.raises(ValueError, match=message):
            runner.run_side_by_side(jobs, logs, after=after)
    assert ("start", "needs") not in events  # refused before anything ran


def test_each_encoder_has_its_own_feature_cache_and_its_arms_share_it(tmp_path):
    """Two encoders' stage-1 runs side by side (the ablation) must not share a cache folder: opening it with
    another encoder deletes the first one's features under the running process."""
    from ibkit.shapes.demo import SWAP
    from ibkit.shapes.pipeline import Pipeline

    base, swapped = Pipeline(tmp_path, tmp_path), Pipeline(tmp_path, tmp_path / "swapped_encoder", **SWAP)
    arm = Pipeline(tmp_path, tmp_path / "default_seed0", pretrained_runs=base.runs)
    swapped_arm = Pipeline(tmp_path, swapped.runs / "swapped_encoder_seed0", pretrained_runs=swapped.runs, **SWAP)

    def cache(commands: list[list[str]]) -> set[str]:
        return {arg.split("=", 1)[1] for command in commands for arg in command if "cache_dir=" in arg}

    assert cache(base.blip2_stage1()) == cache(base.instruct()) == cache(arm.instruct_side()) == {str(tmp_path / "cache")}
    assert cache(swapped.blip2_stage1()) == cache(swapped_arm.instruct()) == {str(tmp_path / "swapped_encoder" / "cache")}


def test_the_work_ledger_adds_each_finished_unit_over_invocations(tmp_path, caplog):
    from ibkit.shapes.runner import WorkLedger

    path = tmp_path / "seconds.json"
    first = WorkLedger(path)
    with first.timing("a"):
        pass
    with pytest.raises(RuntimeError), first.timing("b"):  # interrupted: adds nothing, the file keeps "a"
        raise RuntimeError("killed")
    assert set(json.loads(path.read_text())) == {"a"}
    path.write_text(json.dumps({"a": 60.0, "b": 30.0}))  # as a long earlier invocation left it
    resumed = WorkLedger(path)
    with resumed.timing("b"):
        pass
    assert resumed.seconds["a"] == 60.0 and 30.0 <= resumed.seconds["b"] < 31.0
    assert resumed.total == pytest.approx(sum(json.loads(path.read_text()).values()))
    path.write_text("{half a file")
    broken = WorkLedger(path)  # only the times are lost, with the file named
    assert broken.seconds == {} and str(path) in caplog.text


def test_steps_are_checked_before_anything_runs():
    from ibkit.shapes.demo import demo
    from ibkit.shapes.settings import RELATION_STEPS, TRAINED_STEPS, check_steps

    assert check_steps(None) == {}
    assert check_steps({"lm_binding": 0, "instruct": 5}) == {"lm_binding": 0, "instruct": 5}
    assert check_steps({"qformer_text": 0}) == {"qformer_text": 0}  # an optional step left out
    with pytest.raises(ValueError, match=r"unknown step\(s\) \['instrcut'\]"):
        check_steps({"instrcut": 2000})
    with pytest.raises(ValueError, match="'encoder': 0"):
        check_steps({"encoder": 0})  # 0 would silently mean the config's length
    with pytest.raises(ValueError, match="'lm': 1.5"):
        check_steps({"lm": 1.5})
    assert set(TRAINED_STEPS) == {"encoder", "qformer_text", "lm_binding", "lm", *STAGES, "instruct_side",
                                  "instruct_relation"}
    # the relation recipe's own step needs the recipe; the recipe brings its lengths, which --steps overrides
    with pytest.raises(ValueError, match="relations true"):
        check_steps({"instruct_relation": 100})
    assert check_steps({"instruct": 5, "blip2_stage2": 7}, relations=True) == {
        **RELATION_STEPS, "instruct": 5, "blip2_stage2": 7}
    with pytest.raises(ValueError, match="unknown step"):  # refused by the command before the first step
        demo(output_dir="/nonexistent/never-written", steps={"stage1": 10})


def test_another_seed_writes_beside_the_demo_and_never_over_its_results(monkeypatch):
    import ibkit.shapes.demo as demo_module

    written = []
    monkeypatch.setattr(demo_module, "run_demo", lambda output_dir, seed, *rest: written.append((output_dir, seed)))
    monkeypatch.setattr(demo_module, "run_ablation", lambda output_dir, seeds, *rest: written.append((output_dir, seeds)))
    monkeypatch.setenv("IBKIT_CPU_BF16", "1")  # no timing of the CPU: the precision is not what is tested
    demo_module.demo()
    demo_module.demo(seed=1)
    demo_module.demo(seed=2, output_dir="runs/mine")  # a folder given wins
    demo_module.demo(ablation=True, seeds=(0, 3))
    assert written == [("outputs/demo", 0), ("outputs/demo_seed1", 1), ("runs/mine", 2), ("outputs/ablation", (0, 3))]


def test_a_second_demo_on_the_same_folder_stops_before_its_first_step_and_a_run_frees_it_however_it_ends(
        tmp_path, monkeypatch):
    import ibkit.shapes.demo as demo_module
    from ibkit.shapes.folders import LOCK_NAME, claimed

    out, ran = tmp_path / "out", []
    monkeypatch.setattr(demo_module, "_run_demo", lambda folder, *rest: ran.append(("demo", folder)) or {})
    monkeypatch.setattr(demo_module, "_run_ablation", lambda folder, *rest: ran.append(("ablation", folder)) or {})
    with claimed(out):  # a run of this process holds the folder
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        for run in (lambda: run_demo(out), lambda: run_ablation(out / ".")):
            with pytest.raises(RuntimeError, match=rf"{re.escape(str(out))} is in use by another ibkit demo \(pid {os.getpid()}"):
                run()
        assert ran == []  # refused before any step
    assert not (out / LOCK_NAME).exists()
    run_demo(out)
    run_ablation(out)
    assert ran == [("demo", out), ("ablation", out)] and not (out / LOCK_NAME).exists()

    def crash(*args):
        assert (out / LOCK_NAME).exists()  # held while the run runs
        raise KeyboardInterrupt
    monkeypatch.setattr(demo_module, "_run_demo", crash)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out)
    assert not (out / LOCK_NAME).exists()  # the next run is not refused


def test_a_killed_runs_lock_is_taken_over_and_a_live_or_unknown_one_is_not(tmp_path):
    import socket

    from ibkit.shapes.folders import LOCK_NAME, claimed

    lock = tmp_path / LOCK_NAME
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid names no process any more
    lock.write_text(json.dumps({"pid": finished.pid, "host": socket.gethostname()}))
    with claimed(tmp_path):
        assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # taken by another run meanwhile
    assert json.loads(lock.read_text())["host"] == "elsewhere"  # not removed: it is not this run's
    refused = rf"pid 1 on elsewhere.*delete {re.escape(str(lock))}"  # another machine's: its process is out of sight
    with pytest.raises(RuntimeError, match=refused), claimed(tmp_path):
        pass
    lock.write_text("")  # a run that is writing its lock at this moment
    with pytest.raises(RuntimeError, match="in use by another ibkit demo"), claimed(tmp_path):
        pass


def test_the_fp32_policy_shortens_the_encoder_the_t5_the_side_warm_up_and_the_mixture_unless_steps_say_otherwise():
    from ibkit.shapes.settings import FP32_STEPS, precision_steps

    assert precision_steps({}, fast_bf16=True) == {}
    assert precision_steps({"encoder": 5}, fast_bf16=False) == {**FP32_STEPS, "encoder": 5}
    assert precision_steps({"blip2_stage1": 5}, fast_bf16=False) == {**FP32_STEPS, "blip2_stage1": 5}
    assert set(FP32_STEPS) == {"encoder", "instruct_side", "instruct", "lm"}
    for step in FP32_STEPS:  # fewer steps, never more
        assert FP32_STEPS[step] < yaml.safe_load((CONFIGS / f"{step}.yaml").read_text())["trainer"]["max_steps"]
    assert precision_steps({"instruct": 7}, fast_bf16=False) == {**FP32_STEPS, "instruct": 7}  # --steps wins


@pytest.mark.slow
def test_the_binding_phase_runs_first_and_the_corpus_step_starts_from_it(tmp_path):
    from ibkit.shapes.pipeline import Pipeline
    from ibkit.shapes.runner import run_commands

    sizes = "{train: 12, val: 6, test: 6, shapes_text.train: 128, shapes_text.val: 8}"
    pipeline = Pipeline(tmp_path, tmp_path, sizes=sizes, steps={"lm_binding": 2, "lm": 2})
    assert len(Pipeline(tmp_path, tmp_path, sizes=sizes).language_model()) == 2  # off: fit + export of lm
    pipeline.prepare_data()
    run_commands(pipeline.language_model())
    binding = yaml.safe_load((tmp_path / "lm_binding" / "config.yaml").read_text())
    assert binding["data"]["init_args"]["focus_kinds"] == ["qa_color", "qa_shape"]
    assert binding["data"]["init_args"]["focus_objects"] == [2, 4]
    assert binding["trainer"]["max_steps"] == 2
    lm = yaml.safe_load((tmp_path / "lm" / "config.yaml").read_text())
    network = lm["model"]["init_args"]["language_model"]["init_args"]
    assert network["name_or_path"] == str(tmp_path / "lm_binding" / "model") and network["config"] is None
    assert lm["data"]["init_args"]["focus_kinds"] is None  # the whole corpus
    # the corpus step started from the binding phase's weights: two warm-up steps (lr from 1e-6) move them little
    from safetensors.torch import load_file

    start, end = (load_file(folder / "model.safetensors") for folder in (tmp_path / "lm_binding" / "model", pipeline.lm))
    assert start.keys() == end.keys()
    assert max((start[k] - end[k]).abs().max().item() for k in start) < 1e-3


@pytest.mark.slow
def test_the_qformers_bert_is_pretrained_once_and_stage_1_starts_from_it(tmp_path):
    from ibkit.convert.bert_init import read_bert_weights
    from ibkit.shapes.pipeline import Pipeline
    from ibkit.shapes.runner import run_commands
    from ibkit.training.checkpoint import load_checkpoint_file

    sizes = "{train: 12, val: 6, test: 6, shapes_text.train: 64, shapes_text.val: 8}"
    off = Pipeline(tmp_path, tmp_path, sizes=sizes, steps={"qformer_text": 0})
    assert off.qformer_bert is None and "qformer_text" not in " ".join(off.blip2_stage1()[0])
    pipeline = Pipeline(tmp_path, tmp_path / "arm", sizes=sizes,
                        steps={"qformer_text": 2, "encoder": 1, "blip2_stage1": 1})
    assert pipeline.qformer_bert == tmp_path / "qformer_text" / "model"  # beside the data: shared by every arm
    pipeline.prepare_data()
    run_commands([*pipeline.qformer_text(), *pipeline.encoder()])
    config = yaml.safe_load((tmp_path / "qformer_text" / "config.yaml").read_text())
    assert config["data"]["init_args"]["question_texts_of"] == ["shapes_vqa"] and config["trainer"]["max_steps"] == 2
    bert = read_bert_weights(pipeline.qformer_bert)
    # stage 1 with a zero learning rate: its Q-Former's text side is the BERT's, as the step leaves it
    run_commands([[*pipeline.blip2_stage1()[0], "--model.init_args.optim.lr=1e-12",
                   "--model.init_args.optim.warmup_start_lr=0", "--model.init_args.optim.min_lr=0"]])
    state = load_checkpoint_file(pipeline.ckpt("blip2_stage1"))["state_dict"]
    qformer = {k.split("qformer.", 1)[1]: v for k, v in state.items() if ".qformer." in f".{k}"}
    for ours, theirs in (("encoder.layer.1.attention.attention.value.weight", "encoder.layer.1.attention.self.value.weight"),
                         ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.intermediate.dense.weight"),
                         ("encoder.layer.0.intermediate_query.dense.weight", "encoder.layer.0.intermediate.dense.weight")):
        assert torch.allclose(qformer[ours], bert[theirs], atol=1e-6), ours


@pytest.mark.slow
def test_the_relation_recipe_runs_end_to_end_with_its_own_data_bert_and_phase(tmp_path):
    from ibkit.shapes.relations import RELATION_QA_TYPES
    from ibkit.shapes.settings import default_output_dir

    assert default_output_dir(seed=2, relations=True) == "outputs/demo_seed2_relations"
    sizes = ("{train: 12, val: 6, test: 6, shapes_vqa.train: 16, shapes_vqa.val: 40, shapes_text.train: 160, "
             "shapes_text.val: 12}")
    steps = {step: 2 for step in ("encoder", "lm", *STAGES, "instruct_side", "qformer_text", "instruct_relation")}
    results = run_demo(tmp_path, steps=steps, sizes=sizes, relations=True)  # every held-in question: each type
    check_results(results)
    assert list(results["steps"]) == ["data", "encoder", "qformer_text", "lm", "blip2_stage1", "features",
                                      "blip2_stage2", "instruct_side", "instruct_relation", "instruct", "evaluate",
                                      "evaluate_blip2", "probe"]
    assert set(results["heldin_vqa_by_type"]["instructblip"]) == set(RELATION_QA_TYPES)  # relation asked too
    # every step read the recipe's data; stage 1 started from the BERT, the mixture from the relation phase
    for step in ("encoder", "qformer_text", "lm", "blip2_stage1", "instruct_side", "instruct_relation", "instruct"):
        assert yaml.safe_load((tmp_path / step / "config.yaml").read_text())["data"]["init_args"]["relations"], step
    stage1 = yaml.safe_load((tmp_path / "blip2_stage1" / "config.yaml").read_text())["model"]["init_args"]["init_from"]
    assert stage1[-1] == str(tmp_path / "qformer_text" / "model")
    mixture = yaml.safe_load((tmp_path / "instruct" / "config.yaml").read_text())["model"]["init_args"]["init_from"]
    assert mixture[-1] == str(tmp_path / "instruct_relation" / "checkpoints" / "last.ckpt")
    warmup = yaml.safe_load((tmp_path / "instruct_side" / "config.yaml").read_text())["data"]["init_args"]
    assert warmup["question_types"] == ["side"]  # the side statements left out of the warm-up
