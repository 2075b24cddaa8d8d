"""LAVIS checkpoints -> ibkit: tiny LAVIS-format files written here load back to the same model.

The files are written through the LAVIS key names of the reference (``reference/instructblip.md``,
"Checkpoint key names"), with a reverse mapping written independently of ``ibkit.convert.lavis``.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from tiny_models import (
    IMAGE_TOKEN,
    LLAMA_TEXT,
    NUM_QUERIES,
    QFORMER,
    T5_TEXT,
    VISION,
    assert_folder_runs_in_transformers,
    hf_inputs,
    minilm_dir,
    tiny_llm_tokenizer,
    tiny_qformer_tokenizer,
)

from ibkit import InstructBLIP, LanguageModel
from ibkit.app import main
from ibkit.convert.lavis import lavis_processor, load_lavis, load_lavis_with_report
from ibkit.models import EVAViT, EVAViTConfig
from ibkit.models.transformers_io import qformer_config_from_hf

QCFG = qformer_config_from_hf(QFORMER)
VCFG = EVAViTConfig(**VISION)
PROJ = {"flant5": "t5_proj", "vicuna": "llm_proj"}
LLM_PREFIX = {"flant5": "t5_model", "vicuna": "llm_model"}


# -- the reverse mapping (ibkit -> LAVIS), from the reference's key list ---------------------------------
def _vit_name(rest: str) -> str:
    """ibkit ``vision_encoder.*`` (without the prefix) -> eva_vit_g.pth name."""
    fixed = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    }
    if rest in fixed:
        return fixed[rest]
    _, _, index, *tail = rest.split(".")  # encoder.layers.{i}.<module>.<param>
    module = ".".join(tail)
    renames = {
        "layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.qkv.": "attn.qkv.",
        "self_attn.q_bias": "attn.q_bias", "self_attn.v_bias": "attn.v_bias", "self_attn.projection.": "attn.proj.",
        "mlp.": "mlp.",
    }
    for ours, theirs in renames.items():
        if module.startswith(ours):
            return f"blocks.{index}.{theirs}{module[len(ours):]}"
    raise AssertionError(f"no LAVIS name for vision_encoder.{rest}")


def _qformer_name(rest: str) -> str:
    """ibkit ``qformer.*`` (without the prefix) -> ``Qformer.bert.*``."""
    rest = rest.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
    rest = rest.replace(".crossattention.attention.", ".crossattention.self.")
    rest = rest.replace(".attention.attention.", ".attention.self.")
    return "Qformer.bert." + rest


def to_lavis(model: InstructBLIP, variant: str, with_llm: bool = False):
    """(instruct_blip_*_trimmed.pth "model" dict, eva_vit_g.pth dict) for ``model``."""
    trimmed, vit = {}, {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key.startswith("vision_encoder."):
            vit[_vit_name(key.removeprefix("vision_encoder."))] = value
        elif key.startswith("qformer."):
            trimmed[_qformer_name(key.removeprefix("qformer."))] = value
        elif key.startswith("language_projection."):
            trimmed[PROJ[variant] + key.removeprefix("language_projection")] = value
        elif key.startswith(("ln_vision.", "query_tokens")):
            trimmed[key] = value
        elif not key.startswith("language_model."):
            raise AssertionError(f"unexpected key {key}")
    # what LAVIS files also hold: the BERT position_ids buffer; the EVA file has a 40th block and more
    trimmed["Qformer.bert.embeddings.position_ids"] = torch.arange(QCFG.max_position_embeddings)[None]
    extra = VCFG.num_hidden_layers
    for name in list(vit):
        if name.startswith("blocks.0."):
            vit[name.replace("blocks.0.", f"blocks.{extra}.")] = torch.randn_like(vit[name])
    if with_llm:
        for key, value in model.language_model.base_model.state_dict().items():
            trimmed[f"{LLM_PREFIX[variant]}.{key}"] = value.detach().clone()
    return trimmed, vit


# -- tiny source models and their LAVIS files --------------------------------------------------------------
def _hf_llm(variant: str, directory, seed: int = 0):
    """The LLM as it ships (FlanT5 with tanh GELU, Vicuna without [PAD]), saved as a transformers directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    text = dict(T5_TEXT if variant == "flant5" else LLAMA_TEXT)
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    auto = AutoModelForSeq2SeqLM if variant == "flant5" else AutoModelForCausalLM
    llm = auto.from_config(config).eval()
    with torch.no_grad():
        llm.get_output_embeddings().weight.mul_(40.0)
    llm.save_pretrained(directory)
    return llm


def _source_model(variant: str, llm_dir, seed: int = 1) -> InstructBLIP:
    """What LAVIS would run: its LLM set up as LAVIS does it, random trained parts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if variant == "flant5":
        config = AutoConfig.from_pretrained(llm_dir, dense_act_fn="gelu")  # LAVIS: exact GELU in T5
        llm = AutoModelForSeq2SeqLM.from_pretrained(llm_dir, config=config)
    else:
        llm = AutoModelForCausalLM.from_pretrained(llm_dir)
        llm.resize_token_embeddings(LLAMA_TEXT["vocab_size"] + 1)  # LAVIS's [PAD]
    torch.manual_seed(seed)
    model = InstructBLIP(EVAViT(VCFG), LanguageModel.from_model(llm), QCFG, num_query_tokens=NUM_QUERIES).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("language_model."):
                p.add_(torch.randn_like(p) * 0.05)  # q/v biases, LayerNorms, ...: nothing at its init value
        for p in model.vision_encoder.parameters():  # eva_vit_g.pth is fp16: keep values representable
            p.copy_(p.half().float())
    return model


def _write(tmp_path, variant: str, trimmed: dict, vit: dict):
    ckpt, vit_file = tmp_path / f"instruct_blip_{variant}_trimmed.pth", tmp_path / "eva_vit_g.pth"
    torch.save({"model": trimmed}, ckpt)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in vit.items()}, vit_file)
    return ckpt, vit_file


@pytest.fixture(scope="module")
def _made_files(tmp_path_factory):
    made = {}

    def make(variant: str):
        if variant not in made:
            tmp = tmp_path_factory.mktemp(f"lavis_{variant}")
            _hf_llm(variant, tmp / "llm")
            source = _source_model(variant, tmp / "llm")
            trimmed, vit = to_lavis(source, variant, with_llm=variant == "vicuna")
            ckpt, vit_file = _write(tmp, variant, trimmed, vit)
            made[variant] = (variant, source, ckpt, vit_file, tmp / "llm")
        return made[variant]

    return make


@pytest.fixture(params=["flant5", "vicuna"])
def lavis_files(request, _made_files):
    """(variant, source model, trimmed checkpoint, eva_vit file, LLM directory); Vicuna's holds llm_model.*"""
    return _made_files(request.param)


@pytest.fixture
def flant5_files(_made_files):
    return _made_files("flant5")


def _logits(model: InstructBLIP) -> torch.Tensor:
    x = hf_inputs()
    g = torch.Generator().manual_seed(3)
    target = torch.randint(3, IMAGE_TOKEN, (2, 4), generator=g)
    with torch.no_grad():
        if model.is_encoder_decoder:
            return model(**x, labels=target).logits
        ids = torch.cat((x["input_ids"], target), 1)
        return model(**{**x, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits


def _vicuna_tokenizer():
    """A word-level tokenizer laid out like LLaMA's (unk 0, bos 1, eos 2, no pad) filling the tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = [f"w{i}" for i in range(LLAMA_TEXT["vocab_size"] - len(specials))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _load(ckpt, vit_file, llm_dir, variant, **kwargs):
    kwargs = {"vision_config": VCFG, "qformer_config": QCFG, **kwargs}
    return load_lavis_with_report(ckpt, vit_file, llm_dir, variant, **kwargs)


# -- tests ---------------------------------------------------------------------------------------------
def test_lavis_files_load_back_to_identical_logits(lavis_files, caplog):
    variant, source, ckpt, vit_file, llm_dir = lavis_files
    with caplog.at_level(logging.INFO, logger="ibkit.convert.lavis"):
        model, report = _load(ckpt, vit_file, llm_dir, variant)
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("language_model.")}
    got = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert model.ln_vision.eps == 1e-5
    assert model.qformer_config.vocab_size == QCFG.vocab_size and model.num_query_tokens == NUM_QUERIES
    torch.testing.assert_close(_logits(model), _logits(source), atol=1e-5, rtol=1e-5)
    assert not report.missing and set(report.mapped.values()) == set(expected)
    unused = " ".join(report.unused)
    assert f"blocks.{VCFG.num_hidden_layers}." in unused and "position_ids" in unused  # the 40th block, the buffer
    assert "LAVIS keys mapped" in caplog.text and "unused" in caplog.text
    if variant == "flant5":
        assert model.language_model.hf_config.dense_act_fn == "gelu"
    else:  # [PAD] row and all LLM tensors came from the checkpoint
        assert model.language_model.base_model.get_input_embeddings().weight.shape[0] == LLAMA_TEXT["vocab_size"] + 1
        assert report.llm_loaded


def test_t5_exact_gelu_switch_matters(flant5_files):
    variant, source, ckpt, vit_file, llm_dir = flant5_files
    model, _ = _load(ckpt, vit_file, llm_dir, variant, t5_exact_gelu=False)
    assert model.language_model.hf_config.dense_act_fn == "gelu_new"
    assert (_logits(model) - _logits(source)).abs().max() > 1e-4


def test_vicuna_pad_token_from_the_tokenizer(tmp_path):
    """A trimmed file holds no LLM weights: the [PAD] row then comes from LAVIS's tokenizer set-up."""
    _hf_llm("vicuna", tmp_path / "llm")
    _vicuna_tokenizer().save_pretrained(tmp_path / "llm")
    source = _source_model("vicuna", tmp_path / "llm")
    ckpt, vit_file = _write(tmp_path, "vicuna", *to_lavis(source, "vicuna"))
    model, report = _load(ckpt, vit_file, tmp_path / "llm", None)  # variant read off llm_proj
    base = model.language_model.base_model
    vocab = LLAMA_TEXT["vocab_size"]
    assert base.get_input_embeddings().weight.shape[0] == vocab + 1 and base.config.pad_token_id == vocab
    assert not report.llm_loaded
    # every real token's logit is reproduced; the fresh [PAD] column is LAVIS's random row, not comparable
    torch.testing.assert_close(_logits(model)[..., :vocab], _logits(source)[..., :vocab], atol=1e-5, rtol=1e-5)


def test_vicuna_without_tokenizer_keeps_the_vocabulary_and_warns(tmp_path, caplog):
    _hf_llm("vicuna", tmp_path / "llm")
    source = _source_model("vicuna", tmp_path / "llm")
    ckpt, vit_file = _write(tmp_path, "vicuna", *to_lavis(source, "vicuna"))
    with caplog.at_level(logging.WARNING, logger="ibkit.convert.lavis"):
        model, _ = _load(ckpt, vit_file, tmp_path / "llm", "vicuna")
    assert model.language_model.base_model.get_input_embeddings().weight.shape[0] == LLAMA_TEXT["vocab_size"]
    assert "llm_vocab_size" in caplog.text
    model, _ = _load(ckpt, vit_file, tmp_path / "llm", "vicuna", llm_vocab_size=LLAMA_TEXT["vocab_size"] + 1)
    assert model.language_model.base_model.get_input_embeddings().weight.shape[0] == LLAMA_TEXT["vocab_size"] + 1


def test_missing_qformer_key_is_a_clear_error(lavis_files, tmp_path):
    variant, source, _, _, llm_dir = lavis_files
    trimmed, vit = to_lavis(source, variant)
    del trimmed["Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    ckpt, vit_file = _write(tmp_path, variant, trimmed, vit)
    with pytest.raises(ValueError, match="missing required LAVIS keys") as info:
        _load(ckpt, vit_file, llm_dir, variant)
    assert str(ckpt) in str(info.value) and "Qformer.bert.encoder.layer.1.output_query.dense.weight" in str(info.value)


def test_missing_vit_key_is_a_clear_error(lavis_files, tmp_path):
    variant, source, _, _, llm_dir = lavis_files
    trimmed, vit = to_lavis(source, variant)
    del vit["blocks.1.attn.v_bias"]
    ckpt, vit_file = _write(tmp_path, variant, trimmed, vit)
    with pytest.raises(ValueError, match="visual_encoder.blocks.1.attn.v_bias") as info:
        _load(ckpt, vit_file, llm_dir, variant)
    assert str(vit_file) in str(info.value)
    with pytest.raises(ValueError, match="visual_encoder.cls_token"):
        _load(ckpt, None, llm_dir, variant)  # no ViT at all


def test_bad_files_and_variants_are_clear_errors(lavis_files, tmp_path):
    variant, source, ckpt, vit_file, llm_dir = lavis_files
    other = "vicuna" if variant == "flant5" else "flant5"
    with pytest.raises(ValueError, match=PROJ[other]) as info:
        _load(ckpt, vit_file, llm_dir, other)
    assert str(ckpt) in str(info.value)
    trimmed, _ = to_lavis(source, variant)
    del trimmed[f"{PROJ[variant]}.weight"], trimmed[f"{PROJ[variant]}.bias"]
    no_proj = tmp_path / "no_proj.pth"
    torch.save({"model": trimmed}, no_proj)
    with pytest.raises(ValueError, match="projection") as info:
        _load(no_proj, vit_file, llm_dir, None)
    assert str(no_proj) in str(info.value)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save({"model": [1, 2, 3]}, not_a_state_dict)
    with pytest.raises(ValueError, match="state dict") as info:
        _load(not_a_state_dict, vit_file, llm_dir, variant)
    assert str(not_a_state_dict) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        _load(tmp_path / "nowhere.pth", vit_file, llm_dir, variant)


def test_shape_disagreements_are_clear_errors(lavis_files):
    variant, _, ckpt, vit_file, llm_dir = lavis_files
    wrong = dataclasses.replace(QCFG, num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_hidden_layers") as info:
        load_lavis(ckpt, vit_file, llm_dir, variant, vision_config=VCFG, qformer_config=wrong)
    assert str(ckpt) in str(info.value)
    with pytest.raises(ValueError, match="hidden_size"):
        load_lavis(ckpt, vit_file, llm_dir, variant, vision_config=EVAViTConfig(**{**VISION, "hidden_size": 48}),
                   qformer_config=QCFG)
    with pytest.raises(ValueError, match="multiple of 64"):  # 32-wide Q-Former: the head count must be given
        load_lavis(ckpt, vit_file, llm_dir, variant, vision_config=VCFG)


def test_position_embeddings_are_interpolated_for_another_image_size(flant5_files):
    variant, source, ckpt, vit_file, llm_dir = flant5_files
    size = VISION["image_size"] + VISION["patch_size"]  # one more patch per side
    model, _ = _load(ckpt, vit_file, llm_dir, variant, image_size=size)
    pos = model.vision_encoder.embeddings.position_embedding
    side = size // VISION["patch_size"]
    assert pos.shape == (1, side * side + 1, VISION["hidden_size"])
    assert torch.equal(pos[:, 0], source.vision_encoder.embeddings.position_embedding[:, 0])  # CLS kept
    out = model.visual_prompt(torch.randn(1, 3, size, size))
    assert out.shape == (1, NUM_QUERIES, model.language_model.hidden_size)


def test_cli_converts_to_a_transformers_directory(flant5_files, tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    variant, source, ckpt, vit_file, llm_dir = flant5_files
    qcfg, vcfg = tmp_path / "qformer.json", tmp_path / "vision.json"
    qcfg.write_text(json.dumps(QCFG.__dict__))
    vcfg.write_text(json.dumps(VCFG.__dict__))
    out = tmp_path / "converted"
    code = main([
        "convert", "lavis", "--checkpoint", str(ckpt), "--vit_checkpoint", str(vit_file), "--llm", str(llm_dir),
        "--output", str(out), "--qformer_config", str(qcfg), "--vision_config", str(vcfg),
    ])
    assert code == 0 and (out / "config.json").is_file()
    hf, info = InstructBlipForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.text_config.dense_act_fn == "gelu"
    # no tokenizer given: the image placeholder is a new row after the vocabulary (transformers needs one)
    vocab = T5_TEXT["vocab_size"]
    assert hf.config.image_token_index == vocab and hf.config.text_config.vocab_size == vocab + 1
    again = InstructBLIP.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(again)[..., :vocab], _logits(source), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["flant5", "vicuna"])
def test_converted_folder_runs_in_transformers(variant, tmp_path):
    """`ibkit convert lavis` with the tokenizers -> InstructBlipProcessor + InstructBlipForConditionalGeneration
    run it (forward, greedy generate) as ibkit runs the LAVIS model; Vicuna's LLM grows by [PAD] and <image>."""
    llm_dir = tmp_path / "llm"
    _hf_llm(variant, llm_dir)
    (tiny_llm_tokenizer("t5") if variant == "flant5" else _vicuna_tokenizer()).save_pretrained(llm_dir)
    tiny_qformer_tokenizer(extra_words=1).save_pretrained(tmp_path / "bert")
    source = _source_model(variant, llm_dir)
    ckpt, vit_file = _write(tmp_path, variant, *to_lavis(source, variant))
    qcfg, vcfg, out = tmp_path / "qformer.json", tmp_path / "vision.json", tmp_path / "converted"
    qcfg.write_text(json.dumps(QCFG.__dict__))
    vcfg.write_text(json.dumps(VCFG.__dict__))
    assert main([
        "convert", "lavis", "--checkpoint", str(ckpt), "--vit_checkpoint", str(vit_file), "--llm", str(llm_dir),
        "--output", str(out), "--qformer_config", str(qcfg), "--vision_config", str(vcfg),
        "--qformer_tokenizer", str(tmp_path / "bert"),
    ]) == 0
    config = json.loads((out / "config.json").read_text())
    vocab = T5_TEXT["vocab_size"] if variant == "flant5" else LLAMA_TEXT["vocab_size"] + 2  # + [PAD] + <image>
    assert config["text_config"]["vocab_size"] == vocab and config["num_query_tokens"] == NUM_QUERIES
    converted = InstructBLIP.from_pretrained(out)
    real = LLAMA_TEXT["vocab_size"]  # the LAVIS [PAD] row is random in LAVIS too
    torch.testing.assert_close(_logits(converted)[..., :real], _logits(source)[..., :real], atol=1e-5, rtol=1e-5)
    assert_folder_runs_in_transformers(out, converted, ["w5 w6 w7 w8", "w9 w10 w11 w12"])


def test_lavis_files_load_through_convert_not_from_pretrained(lavis_files):
    variant, source, ckpt, vit_file, llm_dir = lavis_files
    model = load_lavis(ckpt, vit_file, llm_dir, variant=variant, vision_config=VCFG, qformer_config=QCFG)
    torch.testing.assert_close(_logits(model), _logits(source), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ibkit.convert.lavis.load_lavis"):
        InstructBLIP.from_pretrained(ckpt)


def test_qformer_tokenizer_must_fit_the_checkpoint(flant5_files):
    variant, _, ckpt, vit_file, llm_dir = flant5_files
    with pytest.raises(ValueError, match="30523") as info:  # bert-base-uncased + [DEC] vs the tiny 100-word Q-Former
        _load(ckpt, vit_file, llm_dir, variant, qformer_tokenizer_dir=minilm_dir())
    assert str(minilm_dir()) in str(info.value)


def test_lavis_processor_tokenizers(tmp_path):
    _vicuna_tokenizer().save_pretrained(tmp_path / "vicuna")
    processor = lavis_processor(tmp_path / "vicuna", "vicuna", minilm_dir())
    qtok, ltok = processor.qformer_tokenizer, processor.llm_tokenizer
    assert len(qtok) == 30523 and qtok.bos_token == "[DEC]" and qtok.truncation_side == "left"
    assert ltok.pad_token == "[PAD]" and ltok.pad_token_id == LLAMA_TEXT["vocab_size"]
    assert ltok.bos_token == "</s>" and ltok.eos_token == "</s>" and ltok.unk_token == "</s>"


def test_blip2_checkpoint_without_text_parts_loads_in_blip2_mode(tmp_path):
    """BLIP-2 (stage 2) files: LAVIS removes the Q-Former's word/position embeddings and text FFNs."""
    _hf_llm("flant5", tmp_path / "llm")
    source = _source_model("flant5", tmp_path / "llm")
    blip2_cfg = dataclasses.replace(QCFG, instruction_aware=False)
    blip2 = InstructBLIP(EVAViT(VCFG), source.language_model, blip2_cfg, num_query_tokens=NUM_QUERIES).eval()
    kept = {k: v for k, v in source.state_dict().items() if k in blip2.state_dict() and not k.startswith("language_model.")}
    blip2.load_state_dict(kept, strict=False)
    trimmed, vit = to_lavis(blip2, "flant5")
    assert not any("word_embeddings" in k or ".intermediate.dense" in k for k in trimmed)
    ckpt, vit_file = _write(tmp_path, "flant5", trimmed, vit)
    model, _ = _load(ckpt, vit_file, tmp_path / "llm", "flant5", qformer_config=blip2_cfg)
    assert not model.qformer_config.instruction_aware
    torch.testing.assert_close(_logits(model), _logits(blip2), atol=1e-5, rtol=1e-5)


def test_paper_size_checkpoint_shapes_give_the_paper_qformer():
    """Shapes of a real instruct_blip_*_trimmed.pth (meta tensors) -> QFormerConfig defaults, 32 queries, width 1408."""
    from ibkit.convert.lavis import infer_qformer_config
    from ibkit.models import QFormer, QFormerConfig

    with torch.device("meta"):
        qformer = QFormer(QFormerConfig(), encoder_width=1408)
        state = {_qformer_name(k): v for k, v in qformer.state_dict().items()}
        state["query_tokens"] = torch.empty(1, 32, 768)
    cfg, queries, width = infer_qformer_config(state, "instruct_blip_flanxl_trimmed.pth")
    assert (cfg, queries, width) == (QFormerConfig(), 32, 1408)
