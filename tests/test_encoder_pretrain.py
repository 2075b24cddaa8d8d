"""Pre-training an image encoder (EncoderPretrainModule) and handing it to the BLIP-2 stages; transformers
vision towers built from a config dict. Tiny towers, CPU, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule, Trainer
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ibkit import InstructBLIP, LanguageModel
from ibkit.app.export import export_checkpoint
from ibkit.convert.weights import load_initial_weights
from ibkit.models import EVAViT, EVAViTConfig
from ibkit.models.blip2 import Blip2Stage1
from ibkit.models.qformer import QFormerConfig
from ibkit.models.vision.hf_tower import HFVisionEncoder
from ibkit.training.checkpoint import RunCheckpoint
from ibkit.training.encoder_pretrain import ENCODER_FILE, ENCODER_INFO, EncoderPretrainModule, patch_cells
from ibkit.training.optim import OptimSettings
from ibkit.training.pretrain import Blip2PretrainModule
from ibkit.training.vision_words import VisionWordSettings, word_detection_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "ibkit" / "shapes" / "configs"
VOCAB, SPECIALS = 48, [0, 1, 2, 3]  # [PAD] [UNK] [CLS] [SEP], as the shapes Q-Former tokenizer
WORDS = VisionWordSettings(weight=1.0, ngrams=2, buckets=16)
EVA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
           patch_size=8, stem_channels=(8, 16), stem_batchnorm=True)  # BatchNorm: buffers must travel too
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=64, patch_size=8)  # 64 patch tokens + CLS, as the demo's


def _eva(frozen: bool = False) -> EVAViT:
    return EVAViT(EVAViTConfig(**EVA), frozen=frozen)


def _clip(frozen: bool = False) -> HFVisionEncoder:
    return HFVisionEncoder(config=CLIP, layer=-1, frozen=frozen)


def _batch(size: int, image: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] words [SEP] captions (right padded) and random images."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (size, 7), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[1::2, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"pixel_values": torch.randn(size, 3, image, image, generator=g), "input_ids": ids, "attention_mask": mask}


def _module(encoder, lr: float = 1e-3) -> EncoderPretrainModule:
    return EncoderPretrainModule(encoder, vocab_size=VOCAB, vision_words=WORDS, special_ids=SPECIALS,
                                 optim=OptimSettings(lr=lr, warmup_steps=0))


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    module = _module(_eva())
    batch = _batch(4, 32)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = module.caption_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    targets = module.caption_targets(batch["input_ids"], batch["attention_mask"])
    assert targets[:, SPECIALS].sum() == 0 and targets[:, VOCAB:].sum() > 0  # specials out, word pairs in


@pytest.mark.parametrize("kind", ["eva", "clip"])
def test_position_pretext_teaches_each_patch_token_its_cell(kind):
    """With position_weight > 0 each patch token (not [CLS]) learns to name its grid cell: after a few steps
    the head's best cell is the token's own for nearly every token of unseen images."""
    torch.manual_seed(0)
    encoder, image = (_eva(), 32) if kind == "eva" else (_clip(), 64)
    module = EncoderPretrainModule(encoder, vocab_size=VOCAB, vision_words=WORDS, special_ids=SPECIALS,
                                   position_weight=1.0)
    cells = patch_cells(encoder)
    assert cells == (image // 8) ** 2 and module.position_head.out_features == cells
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for step in range(120):
        loss = module.position_loss(module.image_tokens(_batch(4, image, seed=step)["pixel_values"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        tokens = module.image_tokens(_batch(4, image, seed=99)["pixel_values"])
        named = module.position_head(tokens[:, -cells:]).argmax(-1)
    assert (named == torch.arange(cells)).float().mean() > 0.9


def test_position_pretext_needs_a_known_patch_grid_and_a_sane_weight():
    encoder = _eva()
    with pytest.raises(ValueError, match="position_weight: must be >= 0"):
        EncoderPretrainModule(encoder, vocab_size=VOCAB, special_ids=SPECIALS, position_weight=-1.0)
    encoder.config.patch_size = 5  # does not divide 32
    with pytest.raises(ValueError, match="no patch_size dividing its image size"):
        EncoderPretrainModule(encoder, vocab_size=VOCAB, special_ids=SPECIALS, position_weight=0.5)
    assert EncoderPretrainModule(encoder, vocab_size=VOCAB, special_ids=SPECIALS).position_head is None


class _Batches(LightningDataModule):
    def __init__(self, image: int) -> None:
        super().__init__()
        self.batches = [_batch(4, image, seed) for seed in range(3)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches[:2], batch_size=None)


@pytest.mark.parametrize("kind", ["eva", "clip"])
def test_export_writes_an_encoder_that_the_blip2_stages_load(tmp_path, kind):
    build, image = (_eva, EVA["image_size"]) if kind == "eva" else (_clip, CLIP["image_size"])
    torch.manual_seed(0)
    module = _module(build(), lr=1e-2)
    trainer = Trainer(accelerator="cpu", max_steps=3, val_check_interval=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                      callbacks=[RunCheckpoint(save_top_k=0, save_last=True, every_n_train_steps=1)])
    trainer.fit(module, datamodule=_Batches(image))
    assert {"val/loss", "val/word_map", "val/word_recall"} <= set(trainer.callback_metrics)

    torch.manual_seed(1)  # another random start: every exported value must come from the checkpoint
    fresh = _module(build())
    out = export_checkpoint(fresh, None, tmp_path / "checkpoints", tmp_path / "export")
    state = load_file(str(out / ENCODER_FILE))
    trained = module.vision_encoder.state_dict()
    assert set(state) == {"vision_encoder." + k for k in trained}
    info = json.loads((out / ENCODER_INFO).read_text())
    assert info["steps"] == 3 and info["encoder"]["class_path"].endswith(type(module.vision_encoder).__name__)
    if kind == "eva":
        assert any("running_mean" in k for k in state)

    qformer = QFormerConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16)
    stage1 = Blip2Stage1(build(frozen=True), qformer, num_query_tokens=2, embed_dim=8, dec_token_id=VOCAB - 1)
    report = load_initial_weights(stage1, out / ENCODER_FILE)
    assert not [k for k in report["missing"] if k.startswith("vision_encoder.")] and not report["unexpected"]
    for key, value in stage1.vision_encoder.state_dict().items():
        torch.testing.assert_close(value, trained[key])
    # the same tokens as the trained encoder (eval mode: BatchNorm's running statistics)
    pixels = _batch(2, image)["pixel_values"]
    module.vision_encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(stage1.vision_encoder(pixels), module.vision_encoder(pixels))


def test_frozen_config_tower_from_init_from_runs_in_both_blip2_stages_and_instructblip(tmp_path):
    """The demo's swapped backbone: a config-built CLIP tower, 64 px / patch 8 -> 65 tokens, loaded by init_from."""
    from tiny_models import T5_TEXT

    trained = _clip()
    weights = tmp_path / ENCODER_FILE
    save_file({"vision_encoder." + k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights))
    qformer = QFormerConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16)
    module = Blip2PretrainModule(model=Blip2Stage1(_clip(frozen=True), qformer, num_query_tokens=2, embed_dim=8,
                                                   dec_token_id=VOCAB - 1), init_from=str(weights))
    stage1 = module.model
    batch = _batch(2, 64)
    trained.eval()
    with torch.no_grad():
        expected = trained(batch["pixel_values"])
    assert expected.shape == (2, 65, CLIP["hidden_size"])
    torch.testing.assert_close(stage1.vision_encoder(batch["pixel_values"]), expected)
    out = stage1(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                 attention_mask=batch["attention_mask"], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    assert not any(p.requires_grad for p in stage1.vision_encoder.parameters())

    instruct = InstructBLIP(_clip(frozen=True), LanguageModel(config=dict(T5_TEXT, vocab_size=VOCAB)),
                            QFormerConfig(**{**qformer.__dict__, "instruction_aware": False}), num_query_tokens=2)
    load_initial_weights(instruct, weights)
    torch.testing.assert_close(instruct.vision_encoder(batch["pixel_values"]), expected)
    loss = instruct(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"][:, 1:4],
                    labels=batch["input_ids"][:, 4:6].contiguous()).loss
    assert torch.isfinite(loss)


def test_hf_tower_from_config_round_trips_and_refuses_path_with_config(tmp_path):
    torch.manual_seed(0)
    first = _clip()
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    second = _clip(frozen=True)
    second.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    pixels = torch.randn(2, 3, 64, 64)
    first.eval()
    with torch.no_grad():
        torch.testing.assert_close(second(pixels), first(pixels))
    assert (second.width, second.image_size, second.layer) == (32, 64, 1)
    assert HFVisionEncoder(config=dict(CLIP, model_type="siglip_vision_model"))(pixels).shape == (2, 64, 32)
    with pytest.raises(ValueError, match="exactly one of path"):
        HFVisionEncoder(str(tmp_path), config=CLIP)
    with pytest.raises(ValueError, match="exactly one of path"):
        HFVisionEncoder()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_sise": 32}, "hidden_sise"),
        ({"model_type": "clip"}, "model_type"),
        ({"patch_size": 7}, "image_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_attention_heads": 5}, "attention heads"),
    ],
)
def test_a_bad_tower_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        HFVisionEncoder(config={**CLIP, **change})


def test_module_refuses_a_frozen_encoder_and_a_vocabulary_smaller_than_the_tokenizer():
    with pytest.raises(ValueError, match="frozen: false"):
        _module(_eva(frozen=True))

    class Tokenizer:
        all_special_ids = SPECIALS

        def __len__(self) -> int:
            return VOCAB + 1

    class Data(LightningDataModule):
        def connect(self, processor, is_encoder_decoder):
            return {"qformer_tokenizer": Tokenizer()}

    module = _module(_eva())
    module._trainer = type("T", (), {"datamodule": Data()})()
    with pytest.raises(ValueError, match=f"vocab_size={VOCAB}"):
        module.configure_model()


def test_word_detection_metrics():
    targets = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.float)
    perfect = word_detection_metrics(targets * 2 - 1, targets)
    assert perfect == {"word_map": 1.0, "word_map_chance": pytest.approx(1 / 3), "word_recall": 1.0}
    worst = word_detection_metrics(1 - targets, targets)  # word 0 is in every caption: not counted by word_map
    assert worst["word_map"] == pytest.approx(1 / 3) and worst["word_recall"] < 1.0


def test_demo_encoder_configs_build_and_match_the_encoder_the_blip2_stages_freeze():
    from ibkit.app.config import build_from_config

    stage1 = yaml.safe_load((CONFIGS / "blip2_stage1.yaml").read_text())
    encoder = yaml.safe_load((CONFIGS / "encoder.yaml").read_text())
    frozen = stage1["model"]["init_args"]["model"]["init_args"]["vision_encoder"]
    assert encoder["model"]["init_args"]["vision_encoder"]["init_args"]["config"] == frozen["init_args"]["config"]
    assert encoder["data"]["init_args"]["sizes"] == stage1["data"]["init_args"]["sizes"]
    for name in ("encoder.yaml", "encoder_clip.yaml"):
        module, datamodule = build_from_config([CONFIGS / name])
        assert isinstance(module, EncoderPretrainModule) and not module.vision_encoder.frozen
        assert module.vision_encoder.image_size == 64
        assert type(datamodule).__name__ == "TinyShapesPretrainDataModule"


def test_init_from_in_order_warns_once_about_what_no_file_covers(tmp_path, caplog):
    """An encoder file and a stage checkpoint each cover part of the model: one warning, naming what neither has."""
    from ibkit.convert.weights import load_initial_weights_in_order

    qformer = QFormerConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    source = Blip2Stage1(_eva(frozen=True), qformer, num_query_tokens=2, embed_dim=8, dec_token_id=VOCAB - 1)
    encoder_file, qformer_file = tmp_path / "encoder.safetensors", tmp_path / "qformer.safetensors"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file({k: v for k, v in state.items() if k.startswith("vision_encoder.")}, str(encoder_file))
    save_file({k: v for k, v in state.items() if k.startswith("qformer.")}, str(qformer_file))
    target = Blip2Stage1(_eva(frozen=True), qformer, num_query_tokens=2, embed_dim=8, dec_token_id=VOCAB - 1)
    with caplog.at_level("WARNING", logger="ibkit.convert.weights"):
        covered = load_initial_weights_in_order(target, [encoder_file, qformer_file])
    warnings = [r.getMessage() for r in caplog.records if "left at their initial values" in r.getMessage()]
    assert len(warnings) == 1 and "'query_tokens'" in warnings[0] and "'qformer." not in warnings[0]
    assert {k for k in state if k.startswith(("vision_encoder.", "qformer."))} <= covered
    assert torch.equal(target.qformer.state_dict()["encoder.layer.0.attention.attention.query.weight"],
                       source.qformer.state_dict()["encoder.layer.0.attention.attention.query.weight"])


def test_conv_stem_runs_channels_last_on_cpu_with_the_same_result_and_parameters():
    from ibkit.models.vision.eva_vit import ConvStem, conv_stem

    torch.manual_seed(0)
    stem = conv_stem((8, 16), 32, 4, batchnorm=True)
    plain = torch.nn.Sequential(*stem)  # the same layers, the tensors' own (NCHW) layout
    assert isinstance(stem, ConvStem) and list(stem.state_dict()) == list(plain.state_dict())
    seen = []
    stem[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    pixels = torch.randn(3, 3, 16, 16, requires_grad=True)
    for mode in (True, False):  # BatchNorm: batch statistics in training, running statistics in eval
        stem.train(mode), plain.train(mode)
        out, ref = stem(pixels), plain(pixels)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grad, grad_ref = (torch.autograd.grad(y.square().sum(), pixels)[0] for y in (out, ref))
        torch.testing.assert_close(grad, grad_ref, atol=1e-4, rtol=1e-4)
    assert seen == [True, False] * 2  # the stem's first convolution read channels-last input, the plain one NCHW
    assert not pixels.is_contiguous(memory_format=torch.channels_last)  # the caller's tensor is left alone


@pytest.mark.parametrize("forced", ["1", "0"], ids=["bf16", "fp32"])
def test_fast_paths_autocast_only_where_bf16_is_fast_with_explicit_attention(tmp_path, monkeypatch, forced):
    import lightning.pytorch as pl

    from ibkit.models.precision import CPU_BF16_ENV, ExplicitEVAAttention

    monkeypatch.setenv(CPU_BF16_ENV, forced)  # the decision forced either way, whatever this CPU has
    torch.manual_seed(0)
    module = EncoderPretrainModule(_eva(), vocab_size=VOCAB, vision_words=WORDS, special_ids=SPECIALS,
                                   optim=OptimSettings(lr=1e-3, warmup_steps=0), position_weight=0.5, fast_paths=True)
    dtypes: set[torch.dtype] = set()
    module.word_head.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    batches = [_batch(4, 32, seed) for seed in range(3)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    before = float(module.caption_loss(batches[0]))
    dtypes.clear()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert dtypes == {torch.bfloat16 if forced == "1" else torch.float32}
    attention = [m for m in module.vision_encoder.modules() if "Attention" in type(m).__name__ and hasattr(m, "qkv")]
    assert attention and all(type(m) is ExplicitEVAAttention for m in attention)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # fp32 master weights
    assert float(module.caption_loss(batches[0])) != before  # it trained
