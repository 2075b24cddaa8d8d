"""Instruction tuning on the tiny CPU preset: what trains, checkpoints, resume, schedule, FSDP plan."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import LLAMA_TEXT, NUM_QUERIES, QFORMER, T5_TEXT, VISION

from ibkit import InstructBLIP, LanguageModel
from ibkit.models import EVAViT, EVAViTConfig, LoraSettings
from ibkit.models.qformer import QFormerLayer
from ibkit.models.state import persistent_keys
from ibkit.models.transformers_io import qformer_config_from_hf
from ibkit.training.checkpoint import atomic_torch_save
from ibkit.training.fsdp import (
    block_classes,
    instructblip_wrap_plan,
    policy_from_plan,
    unit_parameters,
    wrap_plan,
)
from ibkit.training.module import InstructBLIPModule, model_inputs
from ibkit.training.optim import WarmupCosineSchedule, build_optimizer, param_groups, warmup_cosine_lr

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "fit.yaml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Tiny shapes data + tokenizers, made once for the module (TinyShapesDataModule reuses them)."""
    from ibkit.shapes.datamodule import prepare_tiny_workspace

    root = tmp_path_factory.mktemp("tiny_ws")
    prepare_tiny_workspace(root)
    return root


def tiny_args(workspace: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(TINY),
        f"--data.init_args.root={workspace}",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def tiny_model(text: dict, lora: LoraSettings | None = None, llm_dtype: str | None = None) -> InstructBLIP:
    torch.manual_seed(0)
    lm = LanguageModel(config=text, lora=lora, dtype=llm_dtype)
    return InstructBLIP(EVAViT(EVAViTConfig(**VISION)), lm, qformer_config_from_hf(QFORMER), num_query_tokens=NUM_QUERIES)


# ------------------------------------------------------------------------------------------ fit (in process)
def test_fit_trains_only_the_qformer_side_and_checkpoints_it(workspace, tmp_path):
    from ibkit.app.config import build_cli

    run = tmp_path / "run"
    cli = build_cli(["fit", *tiny_args(workspace, run, "--trainer.max_steps=8", "--trainer.val_check_interval=4")],
                    run=False)
    module, datamodule = cli.model, cli.datamodule
    net = module.model
    frozen_before = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    trainable_names = {n for n, p in net.named_parameters() if p.requires_grad}
    # the paper's recipe: Q-Former, queries, projection and ln_vision train; ViT and LLM are frozen
    assert frozen_before and all(n.startswith(("vision_encoder.", "language_model.")) for n in frozen_before)
    assert {n.split(".")[0] for n in trainable_names} == {"qformer", "query_tokens", "language_projection", "ln_vision"}

    datamodule.prepare_data()
    datamodule.setup("fit")
    fixed = next(iter(datamodule.train_dataloader()))

    def fixed_loss() -> float:
        net.eval()
        with torch.no_grad():
            return float(net(**model_inputs(fixed)).loss)

    before = fixed_loss()
    net.train()
    cli.trainer.fit(module, datamodule=datamodule)
    after = fixed_loss()
    assert cli.trainer.global_step == 8
    assert after < before - 0.05, (before, after)
    for name, value in frozen_before.items():
        assert torch.equal(dict(net.named_parameters())[name], value), f"frozen {name} changed"

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    saved = set(checkpoint["state_dict"])
    assert saved == {f"model.{n}" for n in trainable_names}
    assert not any(".vision_encoder." in k or ".language_model." in k for k in saved)
    for name in trainable_names:
        assert torch.equal(checkpoint["state_dict"][f"model.{name}"], dict(net.named_parameters())[name])
    # the stream position (samples consumed) travels with the checkpoint
    assert checkpoint["TinyShapesDataModule"]["position"] == 8 * 4
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 8
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_resume_continues_the_exact_stream(workspace, tmp_path):
    """Stopped after 3 steps and resumed with --ckpt_path last == 6 uninterrupted steps, bit for bit."""
    from ibkit.app import main

    common = ["--model.optim.max_steps=6", "--trainer.val_check_interval=2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["fit", *tiny_args(workspace, whole, "--trainer.max_steps=6", *common)]) == 0
    assert main(["fit", *tiny_args(workspace, split, "--trainer.max_steps=3", *common)]) == 0
    stopped = _final_state(split)
    assert stopped["global_step"] == 3
    assert main(["fit", *tiny_args(workspace, split, "--trainer.max_steps=6", "--ckpt_path=last", *common)]) == 0

    a, b = _final_state(whole), _final_state(split)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    # weights really moved after the restart (the comparison is not between two copies of step 3)
    assert any(not torch.equal(stopped["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["TinyShapesDataModule"]["position"] == b["TinyShapesDataModule"]["position"] == 24


def test_checkpoint_loading_is_strict(workspace, tmp_path):
    from ibkit.app.config import build_cli

    cli = build_cli(tiny_args(workspace, tmp_path / "run"), run=False)
    module = cli.model
    state = {k: v.clone() for k, v in module.state_dict().items() if k in module.trainable_state_keys()}
    good = {"state_dict": dict(state), "ibkit": {"format": 1, "pretrained": None}}
    module.on_load_checkpoint(good)  # exact keys: fine
    missing = {"state_dict": {k: v for k, v in state.items() if "query_tokens" not in k}, "ibkit": {"format": 1}}
    with pytest.raises(ValueError, match="query_tokens"):
        module.on_load_checkpoint(missing)
    extra = {"state_dict": {**state, "model.qformer.not_a_weight": torch.zeros(1)}, "ibkit": {"format": 1}}
    with pytest.raises(ValueError, match="not_a_weight"):
        module.on_load_checkpoint(extra)
    # a full checkpoint (frozen weights included, written elsewhere) is reduced to the trainable part
    full = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    module.on_load_checkpoint(full)
    assert set(full["state_dict"]) == set(state)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "ckpts" / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, target)
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled: the write fails midway
        atomic_torch_save({"step": 2, "bad": lambda: None}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------ optimizer + schedule
def test_warmup_cosine_schedule_follows_the_recipe():
    peak, warm, total = 1e-5, 1000, 60000
    assert warmup_cosine_lr(0, peak, warm, total) == pytest.approx(1e-8)
    assert warmup_cosine_lr(500, peak, warm, total) == pytest.approx(1e-8 + (peak - 1e-8) / 2)
    assert warmup_cosine_lr(warm, peak, warm, total) == pytest.approx(peak)
    assert warmup_cosine_lr((warm + total) // 2, peak, warm, total) == pytest.approx(peak / 2)
    assert warmup_cosine_lr(total, peak, warm, total) == pytest.approx(0.0, abs=1e-20)
    assert warmup_cosine_lr(total + 10, peak, warm, total) == pytest.approx(0.0, abs=1e-20)

    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([param], lr=peak)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=10, max_steps=50)
    seen = []
    for _ in range(30):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([warmup_cosine_lr(s, peak, 10, 50) for s in range(30)])
    # the scheduler state is plain numbers, and a restored scheduler continues identically
    state = schedule.state_dict()
    assert all(isinstance(v, (int, float, bool, list, type(None))) for v in state.values())
    fresh_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=peak)
    restored = WarmupCosineSchedule(fresh_opt, warmup_steps=10, max_steps=50)
    restored.load_state_dict(state)
    fresh_opt.step()
    restored.step()
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(warmup_cosine_lr(31, peak, 10, 50))
    assert math.isclose(schedule.get_last_lr()[0], warmup_cosine_lr(30, peak, 10, 50))


def test_param_groups_decay_matrices_only():
    model = tiny_model(T5_TEXT)
    groups = param_groups(model.named_parameters(), weight_decay=0.05)
    decayed = dict(zip(groups[0]["names"], groups[0]["params"]))
    plain = dict(zip(groups[1]["names"], groups[1]["params"]))
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and not n.endswith("bias") for n, p in decayed.items())
    assert all(p.ndim < 2 or n.endswith("bias") for n, p in plain.items())
    assert "query_tokens" in decayed and "ln_vision.weight" in plain and "language_projection.bias" in plain
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decayed) | set(plain) == trainable  # frozen weights never reach the optimizer
    optimizer = build_optimizer(model.named_parameters(), InstructBLIPModule(model=model).optim)
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_optimizer_is_fused_on_the_cpu_and_steps_like_torchs_default_adamw():
    """ibkit's AdamW takes torch's fused kernel for CPU parameters; its updates are torch's default loop's."""
    from ibkit.training.optim import OptimSettings, fused_on_cpu

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    settings = OptimSettings(lr=1e-2, weight_decay=0.05)
    fused = build_optimizer(nets[0].named_parameters(), settings)
    assert all(group["fused"] for group in fused.param_groups)
    groups = param_groups(nets[1].named_parameters(), settings.weight_decay)
    for group in groups:
        group.pop("names")
    plain = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)
    assert not plain.param_groups[0]["fused"] and not plain.param_groups[0]["foreach"]
    x = torch.randn(8, 6)
    for _ in range(5):
        for net, opt in zip(nets, (fused, plain)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not fused_on_cpu([torch.zeros(2, device="meta")])  # other devices keep torch's default
    assert not fused_on_cpu([torch.zeros(2, dtype=torch.long)]) and not fused_on_cpu([])


def test_throughput_counts_every_frame_of_pixels_and_of_cached_features():
    module = InstructBLIPModule(model=tiny_model(T5_TEXT))
    text = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    text["attention_mask"][1, 3:] = 0  # padding is not processed work
    queries = module.model.num_query_tokens
    width = module.model.ln_vision.normalized_shape[0]
    image = module._count_tokens({**text, "pixel_values": torch.zeros(2, 3, 8, 8)}, batch_size=2)
    clip = module._count_tokens({**text, "pixel_values": torch.zeros(2, 4, 3, 8, 8)}, batch_size=2)
    cached_image = module._count_tokens({**text, "image_features": torch.zeros(2, 7, width)}, batch_size=2)
    cached_clip = module._count_tokens({**text, "image_features": torch.zeros(2, 4, 7, width)}, batch_size=2)
    assert image == cached_image == 2 * queries + 8
    assert clip == cached_clip == 2 * 4 * queries + 8


# ------------------------------------------------------------------------------------------ FSDP wrapping plan
def _check_homogeneous(root, plan):
    units = unit_parameters(root, plan)
    for unit, params in units.items():
        kinds = {(p.requires_grad, p.dtype) for _, p in params}
        assert len(kinds) <= 1, f"unit {unit or '<root>'} mixes {kinds}: {[n for n, _ in params][:6]}"
    every = {id(p) for p in root.parameters()}
    assert {id(p) for params in units.values() for _, p in params} == every  # each parameter in one unit
    return units


@pytest.mark.parametrize("text", [T5_TEXT, LLAMA_TEXT], ids=["t5", "llama"])
def test_fsdp_units_never_mix_frozen_and_trainable(text):
    module = InstructBLIPModule(model=tiny_model(text))
    plan = instructblip_wrap_plan(module)
    _check_homogeneous(module, plan)
    classes = block_classes(module)
    wrapped = {id(m) for m in plan}
    blocks = [m for m in module.modules() if isinstance(m, tuple(set().union(*classes.values())))]
    assert classes["llm"] and classes["vision"] == {type(module.model.vision_encoder.encoder.layers[0])}
    assert blocks and all(id(b) in wrapped for b in blocks)  # every ViT block, Q-Former layer, LLM block
    assert any(isinstance(m, QFormerLayer) for m in plan)
    policy = policy_from_plan(plan)
    assert all(policy(m, recurse=True) for m in module.modules())
    assert {id(m) for m in module.modules() if policy(m, recurse=False)} == wrapped


def test_fsdp_plan_covers_blip2_stage1():
    """BLIP-2 stage 1 (frozen encoder + Q-Former, no LLM) gets the same plan: a unit per ViT block and Q-Former
    layer, the encoder and Q-Former leftovers in units of their own, frozen and trainable never mixed."""
    from tiny_blip2 import tiny_stage1

    from ibkit.training.pretrain import Blip2PretrainModule

    module = Blip2PretrainModule(model=tiny_stage1())
    plan = instructblip_wrap_plan(module)
    _check_homogeneous(module, plan)
    classes = block_classes(module)
    assert classes["llm"] == set() and classes["vision"] == {type(module.model.vision_encoder.encoder.layers[0])}
    wrapped = {id(m) for m in plan}
    blocks = [m for m in module.modules() if isinstance(m, tuple(classes["vision"] | classes["qformer"]))]
    assert len(blocks) == 1 + 2 and all(id(b) in wrapped for b in blocks)  # 1 ViT block, 2 Q-Former layers
    assert {id(module.model.vision_encoder), id(module.model.qformer)} <= wrapped


def test_fsdp_plan_splits_lora_and_dtypes():
    model = tiny_model(LLAMA_TEXT, lora=LoraSettings(r=2, alpha=4, dropout=0.0), llm_dtype="bf16")
    module = InstructBLIPModule(model=model)
    lora_params = [n for n, p in module.named_parameters() if "lora_" in n]
    assert lora_params and all(dict(module.named_parameters())[n].requires_grad for n in lora_params)
    plan = instructblip_wrap_plan(module)
    units = _check_homogeneous(module, plan)
    # LoRA adapters (trainable, fp32 by peft) sit inside frozen bf16 LLM blocks: they get units of their own
    lora_units = [u for u, ps in units.items() if ps and all("lora_" in n for n, _ in ps)]
    assert lora_units


def test_fsdp_plan_rejects_a_module_that_owns_mixed_parameters():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(2))
            self.b = torch.nn.Parameter(torch.zeros(2), requires_grad=False)

    root = torch.nn.Sequential(torch.nn.Linear(2, 2), Mixed())
    with pytest.raises(ValueError, match="^1: holds frozen"):
        wrap_plan(root, classes=())


@pytest.mark.parametrize("text", [T5_TEXT, LLAMA_TEXT], ids=["t5", "llama"])
def test_activation_checkpointing_keeps_loss_gradients_and_keys(text):
    from tiny_models import hf_inputs

    model = tiny_model(text).train()  # the frozen LLM stays in eval mode, as in training
    x = hf_inputs(batch=2)
    labels = x["input_ids"][:, :3].clone() if model.is_encoder_decoder else x["input_ids"].clone()
    keys_before = persistent_keys(model)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**x, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(1)
    ref_loss, ref_grads = loss_and_grads()
    wrapped = model.language_model.enable_activation_checkpointing()
    layers = text.get("num_hidden_layers") or text["num_layers"] + text["num_decoder_layers"]
    assert wrapped == layers
    torch.manual_seed(1)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss)
    assert {k.replace("_checkpoint_wrapped_module.", "") for k in grads} == set(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name.replace("_checkpoint_wrapped_module.", "")])
    assert persistent_keys(model) == keys_before


def test_module_can_checkpoint_llm_blocks_of_a_frozen_llm():
    from tiny_models import hf_inputs
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    module = InstructBLIPModule(model=tiny_model(T5_TEXT), checkpoint_llm_blocks=True)
    wrapped = [m for m in module.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrapped) == T5_TEXT["num_layers"] + T5_TEXT["num_decoder_layers"]
    assert module.trainable_state_keys() == {f"model.{n}" for n, p in tiny_model(T5_TEXT).named_parameters()
                                             if p.requires_grad}
    module.train()
    x = hf_inputs(batch=2)
    loss = module.model(**x, labels=x["input_ids"][:, :3].clone()).loss
    loss.backward()  # recomputation of frozen eval-mode T5 blocks matches the first pass
    assert module.model.query_tokens.grad is not None and module.model.query_tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16", "fp32"])
def test_fast_paths_switch_trains_fp32_masters_and_tests_on_a_bf16_copy(workspace, tmp_path, monkeypatch, fast_bf16):
    """``model.fast_paths``: frozen parts stored in bf16, trainable fp32, test/predict on a bf16-bridge copy;
    where bf16 is slow, everything fp32 and test/predict on the trained model itself (both forced, whatever the CPU)."""
    from ibkit.app.config import build_cli
    from ibkit.models.precision import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "1" if fast_bf16 else "0")
    run = tmp_path / "run"
    cli = build_cli(["fit", *tiny_args(workspace, run, "--trainer.max_steps=6", "--trainer.val_check_interval=3",
                                       "--model.fast_paths=true")], run=False)
    module, datamodule = cli.model, cli.datamodule
    cli.trainer.fit(module, datamodule=datamodule)
    net = module.model
    frozen = torch.bfloat16 if fast_bf16 else torch.float32
    assert module._policy is not None and module._policy.frozen_dtype == ("bf16" if fast_bf16 else None)
    assert net.vision_encoder.encoder.layers[0].mlp.fc1.weight.dtype == frozen
    assert net.language_model.dtype == frozen
    assert all(p.dtype == torch.float32 for p in net.trainable_parameters().values())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values())
    assert module._inference is None  # validation inside fit used the weights being trained
    cli.trainer.test(module, datamodule=datamodule)
    infer = module._inference
    assert (infer is net) is not fast_bf16
    assert all(p.dtype == (torch.bfloat16 if fast_bf16 else torch.float32) for p in infer.qformer.parameters())
    assert all(p.dtype == torch.float32 for p in net.qformer.parameters())
    assert cli.trainer.callback_metrics  # the test protocol ran on the copy


def test_tiny_datamodule_passes_mixing_multipliers_on(workspace):
    from ibkit.data.sampler import mixture_weights
    from ibkit.shapes.datamodule import TINY_TRAIN, TinyShapesDataModule

    plain, weighted = (TinyShapesDataModule(root=str(workspace), multipliers=m) for m in (None, {"shapes_vqa": 2.0}))
    for dm in (plain, weighted):
        dm.setup("fit")
    assert weighted.mixture["shapes_vqa"] / weighted.mixture["shapes_caption"] == pytest.approx(
        2 * plain.mixture["shapes_vqa"] / plain.mixture["shapes_caption"])
    sizes = dict(zip(plain.train_dataset.names, plain.train_dataset.sizes))
    assert sizes == {**dict.fromkeys(TINY_TRAIN, 6), "shapes_vqa": sizes["shapes_vqa"]}
    assert sizes["shapes_vqa"] > 6  # 6 pictures, several questions each
    assert plain.mixture == pytest.approx(mixture_weights(sizes, "sqrt"))


def test_tiny_datamodule_keeps_only_the_training_questions_of_the_types_asked(workspace):
    from ibkit.shapes.datamodule import TinyShapesDataModule

    every = TinyShapesDataModule(root=str(workspace), datasets=["shapes_vqa"], eval_datasets=["shapes_vqa"])
    side = TinyShapesDataModule(root=str(workspace), datasets=["shapes_vqa"], eval_datasets=["shapes_vqa"],
                                question_types=["side", "size"])
    for dm in (every, side):
        dm.setup("fit")
    kinds = [s.extra["question_type"] for s in every.train_dataset.datasets[0].samples]
    kept = [s.extra["question_type"] for s in side.train_dataset.datasets[0].samples]
    assert set(kinds) > {"side", "size"} and sorted(kept) == sorted(k for k in kinds if k in ("side", "size"))
    # evaluation sets are never filtered
    assert [s.sample_id for s in side.eval_datasets[0].samples] == [s.sample_id for s in every.eval_datasets[0].samples]
    with pytest.raises(ValueError, match=r"question_types \(shapes_vqa\): \['sides'\]"):
        TinyShapesDataModule(root=str(workspace), question_types=["sides"])
    captions = TinyShapesDataModule(root=str(workspace), datasets=["shapes_caption"], question_types=["side"])
    with pytest.raises(ValueError, match=r"shapes_caption \(train\): no training question of types \['side'\]"
                                         r".*the dataset's types: \['None'\].*\{shapes_vqa: \['side'\]\}"):
        captions.setup("fit")


def test_tiny_datamodule_filters_only_the_datasets_a_question_types_mapping_names(workspace):
    """A mapping keeps a mixture's other datasets whole (a list would refuse captions, which have no types)."""
    from jsonargparse import ArgumentParser

    from ibkit.shapes.datamodule import TinyShapesDataModule

    names = ["shapes_vqa", "shapes_caption"]
    every = TinyShapesDataModule(root=str(workspace), datasets=names, eval_datasets=["shapes_vqa"])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TinyShapesDataModule, "data")
    parsed = parser.parse_args([f"--data.root={workspace}", f"--data.datasets={names}",
                                "--data.eval_datasets=[shapes_vqa]", "--data.question_types={shapes_vqa: [side]}"])
    assert parsed.data.question_types == {"shapes_vqa": ["side"]}  # the CLI's YAML form reaches the module as is
    mixed = TinyShapesDataModule(**vars(parsed.data))
    for dm in (every, mixed):
        dm.setup("fit")
    samples = {dm: {d.name: d.samples for d in dm.train_dataset.datasets} for dm in (every, mixed)}
    assert {s.extra["question_type"] for s in samples[mixed]["shapes_vqa"]} == {"side"}
    assert [s.sample_id for s in samples[mixed]["shapes_vqa"]] == [
        s.sample_id for s in samples[every]["shapes_vqa"] if s.extra["question_type"] == "side"]
    assert [s.sample_id for s in samples[mixed]["shapes_caption"]] == [
        s.sample_id for s in samples[every]["shapes_caption"]]
    with pytest.raises(ValueError, match=r"question_types names \['shapes_vqg'\], not among the training datasets"):
        TinyShapesDataModule(root=str(workspace), datasets=names, question_types={"shapes_vqg": ["color"]})
    with pytest.raises(ValueError, match=r"question_types \(shapes_vqa\): \[\]"):
        TinyShapesDataModule(root=str(workspace), datasets=names, question_types={"shapes_vqa": []})


def test_fast_paths_are_refused_under_fsdp_by_both_training_modules():
    """Instruction tuning and BLIP-2 pre-training refuse ``fast_paths`` under FSDP with the way out named; any
    other strategy (or no trainer) passes."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
    from tiny_blip2 import tiny_stage1

    from ibkit.training.fsdp import refuse_fast_paths_under_fsdp
    from ibkit.training.pretrain import Blip2PretrainModule

    fsdp = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    refuse_fast_paths_under_fsdp(None)
    refuse_fast_paths_under_fsdp(SimpleNamespace(strategy=SingleDeviceStrategy.__new__(SingleDeviceStrategy)))
    for module in (InstructBLIPModule(model=tiny_model(T5_TEXT), fast_paths=True),
                   Blip2PretrainModule(model=tiny_stage1(), fast_paths=True)):
        module._trainer = fsdp
        with pytest.raises(ValueError, match="bf16-mixed"):
            module._apply_fast_paths()
        assert module._policy is None
