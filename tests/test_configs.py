"""Every YAML under configs/ parses; experiments build on the meta device; --print_config round-trips."""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from ibkit.app.config import parse_config
from ibkit.training.memory import LLM_ARCHITECTURES, llm_for_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHAPES_CONFIGS = ROOT / "src" / "ibkit" / "shapes" / "configs"  # the demo's, shipped as package data
ALL_YAML = sorted(CONFIGS.rglob("*.yaml")) + sorted(SHAPES_CONFIGS.glob("*.yaml"))
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml"))
BLIP2 = CONFIGS / "experiments" / "blip2"  # pre-training: stacks of their own
OVERLAYS = sorted(p for p in (CONFIGS / "experiments").glob("*/*.yaml") if p.parent != BLIP2)  # stacked on an experiment
TRAINERS = sorted((CONFIGS / "trainer").glob("*.yaml"))
BASE = CONFIGS / "experiments" / "instructblip_flant5xl.yaml"
TRAINABLE_PARTS = {"qformer", "query_tokens", "language_projection", "ln_vision"}


def _rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS if path.is_relative_to(CONFIGS) else ROOT))


def _check_class_spec(spec: dict, where: str) -> None:
    """A ``class_path`` names an importable class whose signature takes the ``init_args``."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (spec.get("init_args") or {}).items():
        assert takes_any or key in params, f"{where}: {spec['class_path']} has no parameter {key!r}"
        if isinstance(value, dict) and "class_path" in value:
            _check_class_spec(value, f"{where}.{key}")


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_every_yaml_parses(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path}: expected a non-empty mapping"
    if "class_path" in data:
        _check_class_spec(data, _rel(path))


@pytest.mark.parametrize("path", sorted((CONFIGS / "model").rglob("*.yaml")), ids=_rel)
def test_model_pieces_parse_as_their_types(path):
    from jsonargparse import ArgumentParser

    from ibkit.models import LanguageModel, QFormerConfig, VisionEncoder

    kind = path.parent.name
    types = {"vision": VisionEncoder, "llm": LanguageModel, "qformer": QFormerConfig | None}
    if kind not in types:
        pytest.skip(f"{_rel(path)}: not a model piece")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--piece", type=types[kind])
    config = parser.parse_object({"piece": yaml.safe_load(path.read_text())})
    assert config.piece is not None


def _round_trip(args: list[str], tmp_path: Path):
    parser, config = parse_config(["fit", *args])
    dumped = parser.dump(config, skip_none=False)  # as --print_config writes it
    file = tmp_path / "printed.yaml"
    file.write_text(dumped)
    parser2, config2 = parse_config(["fit", "--config", str(file)])
    assert parser2.dump(config2, skip_none=False) == dumped
    return parser, config


@pytest.mark.parametrize("trainer", TRAINERS, ids=_rel)
def test_trainer_presets_stack_with_an_experiment(trainer, tmp_path):
    _, config = _round_trip(["--config", str(trainer), "--config", str(BASE)], tmp_path)
    assert config.trainer.use_distributed_sampler is False  # the mixture sampler shards by itself
    assert config.trainer.max_steps > 0 and config.trainer.check_val_every_n_epoch is None
    assert config.trainer.precision in ("bf16-mixed", "16-mixed")


def _meta_module(config_dict: dict):
    """Build the configured InstructBLIPModule on the meta device, LLM folders replaced by their architecture."""
    from jsonargparse import ArgumentParser

    from ibkit.training.module import InstructBLIPModule

    model = config_dict["model"]["init_args"]  # the LightningModule's arguments (class_path: InstructBLIPModule)
    llm_args = model["model"]["init_args"]["language_model"]["init_args"]
    arch = llm_for_path(llm_args["name_or_path"])
    assert arch is not None, f"no architecture known for {llm_args['name_or_path']}"
    llm_args.update(name_or_path=None, config=arch)
    vision = model["model"]["init_args"]["vision_encoder"]
    if vision["class_path"].endswith("OpenCLIPVisionEncoder"):
        vision["init_args"].update(pretrained=None, checkpoint_path=None, compute_dtype=None)  # no weights to cast
    model["init_from"] = None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(InstructBLIPModule, "model")
    with torch.device("meta"):
        return parser.instantiate_classes(parser.parse_object({"model": model})).model, arch


def _check_experiment(args: list[str], tmp_path: Path):
    from ibkit.training.fsdp import instructblip_wrap_plan, unit_parameters

    parser, config = _round_trip(args, tmp_path)
    module, arch = _meta_module(yaml.safe_load(parser.dump(config, skip_none=False)))
    net = module.model
    width = arch.get("hidden_size") or arch["d_model"]
    assert net.language_model.hidden_size == width == net.language_projection.out_features
    assert net.vision_encoder.frozen and net.language_model.frozen
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert {n.split(".")[0] for n in trainable - lora} == TRAINABLE_PARTS
    assert all(n.startswith("language_model.") for n in lora)
    units = unit_parameters(module, instructblip_wrap_plan(module))
    assert all(len({(p.requires_grad, p.dtype) for _, p in ps}) <= 1 for ps in units.values())
    return config, net, lora


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=_rel)
def test_experiments_build_on_the_meta_device(experiment, tmp_path):
    config, net, lora = _check_experiment(
        ["--config", str(CONFIGS / "trainer" / "gpu1.yaml"), "--config", str(experiment)], tmp_path
    )
    assert not lora and net.qformer_config.instruction_aware and net.num_query_tokens == 32
    assert net.vision_encoder.width == 1408 and net.vision_encoder.config.num_hidden_layers == 39
    assert config.model.init_args.optim.lr == 1e-5 and config.model.init_args.optim.warmup_steps == 1000
    assert config.data.init_args.mixing == "sqrt"
    # LAVIS builds the Q-Former from BERT, then loads the BLIP-2 file over it (issue 18)
    init_from = config.model.init_args.init_from
    assert init_from[0] == "checkpoints/bert-base-uncased" and init_from[-1].startswith("checkpoints/lavis/blip2_pretrained")
    assert config.model.init_args.fold_bert_token_type is False and config.model.init_args.allow_uninitialized is False


# The paper's global batch (Dai et al., 2023, Sec. 2.4): 192 / 128 / 64 / 64.
PAPER_GLOBAL_BATCH = {
    "instructblip_flant5xl.yaml": 192, "instructblip_vicuna7b.yaml": 128,
    "instructblip_flant5xxl.yaml": 64, "instructblip_vicuna13b.yaml": 64,
}


@pytest.mark.parametrize("trainer", TRAINERS, ids=_rel)
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=_rel)
def test_every_preset_gives_the_papers_global_batch(experiment, trainer):
    """batch_size x devices x nodes x accumulation, as the app parses the stacked configs."""
    _, config = parse_config(["fit", "--config", str(trainer), "--config", str(experiment)])
    t = config.trainer
    world = t.devices * t.num_nodes
    assert config.data.init_args.batch_size * world * t.accumulate_grad_batches == PAPER_GLOBAL_BATCH[experiment.name]
    # validation every 3,000 optimizer steps: Lightning counts batches
    assert t.val_check_interval == 3000 * t.accumulate_grad_batches


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_overlays_stack_on_an_experiment(overlay, tmp_path, monkeypatch):
    if overlay.stem == "openclip_vit_l":
        # open_clip moves every model it creates to a device, which a meta tensor cannot do: build this
        # tower (random weights, ~0.3B) on the CPU, the rest on the meta device
        from ibkit.models.vision.open_clip_tower import OpenCLIPVisionEncoder

        original = OpenCLIPVisionEncoder.__init__

        @functools.wraps(original)
        def on_cpu(self, *args, **kwargs):
            with torch.device("cpu"):
                original(self, *args, **kwargs)

        monkeypatch.setattr(OpenCLIPVisionEncoder, "__init__", on_cpu)
    config, net, lora = _check_experiment(["--config", str(BASE), "--config", str(overlay)], tmp_path)
    name = overlay.stem
    assert bool(lora) == (name == "lora")
    if name == "blip2_qformer":
        assert not net.qformer_config.instruction_aware
        assert not hasattr(net.qformer.embeddings, "word_embeddings")
    if name.startswith("mixing_"):
        assert config.data.init_args.mixing == name.removeprefix("mixing_")
    if name == "openclip_vit_l":
        assert net.vision_encoder.width == 1024 and config.model.init_args.init_from == ["checkpoints/bert-base-uncased"]
    if name == "mistral_7b":
        assert net.language_model.hf_config.model_type == "mistral"
    if name == "heldout":
        assert len(config.data.init_args.eval_datasets) == 13


def test_tiny_presets_round_trip(tmp_path):
    _, t5 = _round_trip(["--config", str(CONFIGS / "tiny" / "fit.yaml")], tmp_path)
    tiny = CONFIGS / "tiny"
    _, llama = _round_trip(["--config", str(tiny / "fit.yaml"), "--config", str(tiny / "llama.yaml")], tmp_path)
    assert t5.model.init_args.model.init_args.language_model.init_args.config["model_type"] == "t5"
    assert llama.model.init_args.model.init_args.language_model.init_args.config["model_type"] == "llama"
    assert llama.data.init_args.is_encoder_decoder is False


def test_llm_architectures_match_known_sizes():
    from ibkit.training.memory import meta_instructblip

    expected = {"flan-t5-xl": 2.85e9, "flan-t5-xxl": 11.14e9, "vicuna-7b-v1.1": 6.74e9, "vicuna-13b-v1.1": 13.02e9,
                "mistral-7b-v0.1": 7.24e9}  # published parameter counts of the released checkpoints
    assert set(expected) == set(LLM_ARCHITECTURES)
    for name, count in expected.items():
        llm = meta_instructblip(name).language_model
        # transformers 5 ties T5's output layer to its input embeddings (FlanT5 has them apart: 2.3% of XL)
        tolerance = 0.025 if name.startswith("flan") else 0.005
        assert sum(p.numel() for p in llm.parameters()) == pytest.approx(count, rel=tolerance), name


BLIP2_STACKS = {  # the chain of docs/train.md: data, the stage, its swap diff
    "stage1_vitg": ["stage1_vitg"],
    "stage1_openclip_vit_l": ["stage1_vitg", "stage1_openclip_vit_l"],
    "stage1_siglip": ["stage1_vitg", "stage1_siglip"],
    "stage2_flant5xl": ["stage2_flant5xl"],
    "stage2_vicuna7b": ["stage2_flant5xl", "stage2_vicuna7b"],
    "stage2_vicuna13b": ["stage2_flant5xl", "stage2_vicuna13b"],
    "stage2_mistral_7b": ["stage2_flant5xl", "stage2_mistral_7b"],
    "stage2_openclip_vit_l": ["stage2_flant5xl", "stage2_openclip_vit_l"],
    "stage2_siglip": ["stage2_flant5xl", "stage2_siglip"],
}


def test_every_blip2_config_is_in_a_stack():
    used = {name for stack in BLIP2_STACKS.values() for name in stack} | {"pretrain_data"}
    assert used == {p.stem for p in BLIP2.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(BLIP2_STACKS))
def test_blip2_stacks_parse(name, tmp_path):
    files = [CONFIGS / "trainer" / "ddp8.yaml", BLIP2 / "pretrain_data.yaml"]
    files += [BLIP2 / f"{part}.yaml" for part in BLIP2_STACKS[name]]
    _, config = _round_trip([arg for f in files for arg in ("--config", str(f))], tmp_path)
    module = config.model.init_args
    assert config.model.class_path == "ibkit.training.pretrain.Blip2PretrainModule"
    assert tuple(module.optim.betas) == (0.9, 0.98) and module.optim.weight_decay == 0.05 and module.optim.lr == 1e-4
    stage1 = name.startswith("stage1")
    assert module.model.class_path == ("ibkit.models.blip2.Blip2Stage1" if stage1 else "ibkit.InstructBLIP")
    assert module.optim.min_lr == (1e-5 if stage1 else 5e-5)
    assert module.model.init_args.qformer.init_args.instruction_aware == stage1  # stage 2: BLIP-2's Q-Former
    assert config.data.init_args.max_target_len == 32 and config.data.init_args.horizontal_flip
    world = config.trainer.devices * config.trainer.accumulate_grad_batches
    paper = {"stage1_vitg": 1680, "stage1_siglip": 1680, "stage1_openclip_vit_l": 2320, "stage2_flant5xl": 1520}
    assert config.data.init_args.batch_size * world == paper.get(name, 1520 if "siglip" in name or "openclip" in name
                                                                 else 1920)


def test_blip2_stage1_builds_on_the_meta_device():
    """ViT-g frozen; what trains is the Q-Former with its heads, the queries, ln_vision and the temperature."""
    from jsonargparse import ArgumentParser

    from ibkit.training.pretrain import Blip2PretrainModule

    cli_parser, config = parse_config(["fit", "--config", str(BLIP2 / "pretrain_data.yaml"), "--config",
                                       str(BLIP2 / "stage1_vitg.yaml")])
    model = yaml.safe_load(cli_parser.dump(config, skip_none=False))["model"]["init_args"]
    model["init_from"] = None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Blip2PretrainModule, "model")
    with torch.device("meta"):
        net = parser.instantiate_classes(parser.parse_object({"model": model})).model.model
    assert net.vision_encoder.frozen and net.vision_encoder.width == 1408 and net.num_query_tokens == 32
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"query_tokens", "ln_vision", "qformer", "vision_projection", "text_projection", "itm_head",
                         "lm_head", "temp"}
