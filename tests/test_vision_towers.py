"""Swappable vision encoders: open_clip towers (own ViT, timm EVA and SigLIP trunks) and transformers
CLIP/SigLIP directories. Every tower is tiny and built here; nothing is downloaded.

Expected tokens always come from an independent run of the *unmodified* source model (open_clip's
``encode_image`` or the transformers model's forward) with a forward hook on the chosen block.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

from open_clip.factory import _MODEL_CONFIGS  # noqa: E402
from timm.models import register_model  # noqa: E402
from timm.models.eva import Eva  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD, VisionEncoder  # noqa: E402
from ibkit.models.vision.hf_tower import HFVisionEncoder  # noqa: E402
from ibkit.models.vision.open_clip_tower import OpenCLIPVisionEncoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE, PATCH, WIDTH, LAYERS = 32, 8, 32, 3
GRID_TOKENS = (IMAGE // PATCH) ** 2
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}


# -- tiny towers -------------------------------------------------------------------------------------------
def _known_kwargs(cls: type, kwargs: dict) -> dict:
    # timm's factory passes pretrained_cfg & co.; the bare classes do not take them
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def ibkit_test_tiny_eva(pretrained: bool = False, **kwargs) -> Eva:
    base = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=2, mlp_ratio=2.0)
    return Eva(**{**base, **_known_kwargs(Eva, kwargs)})


def ibkit_test_tiny_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    base = dict(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=LAYERS,
        num_heads=2,
        mlp_ratio=2.0,
        class_token=False,
        global_pool="map",
    )
    return VisionTransformer(**{**base, **_known_kwargs(VisionTransformer, kwargs)})


for _fn in (ibkit_test_tiny_eva, ibkit_test_tiny_siglip):
    if not timm.is_model(_fn.__name__):
        register_model(_fn)

OPEN_CLIP_CONFIGS = {
    "ibkit-test-vit": {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": IMAGE,
            "layers": LAYERS,
            "width": WIDTH,
            "patch_size": PATCH,
            "head_width": 16,
        },
        "text_cfg": TINY_TEXT,
    },
    "ibkit-test-eva": {  # shaped like open_clip's EVA01-g-14 config
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": IMAGE,
            "timm_model_name": "ibkit_test_tiny_eva",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
        "text_cfg": TINY_TEXT,
        "custom_text": True,
    },
    "ibkit-test-siglip": {  # shaped like open_clip's ViT-B-16-SigLIP config
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": IMAGE,
            "timm_model_name": "ibkit_test_tiny_siglip",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": TINY_TEXT,
        "custom_text": True,
    },
    "ibkit-test-resnet": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": IMAGE, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": TINY_TEXT,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _tiny_open_clip_configs():
    _MODEL_CONFIGS.update(OPEN_CLIP_CONFIGS)
    yield
    for name in OPEN_CLIP_CONFIGS:
        _MODEL_CONFIGS.pop(name, None)


@dataclass
class Case:
    """One tower: how to build the encoder, and the independent per-block reference."""

    build: Callable[..., VisionEncoder]
    block_output: Callable[
        [torch.Tensor, int], torch.Tensor
    ]  # (pixels, block index) -> (B, prefix + grid, D)
    num_prefix: int
    blocks: Callable[[VisionEncoder], nn.ModuleList]
    checkpoint: str


def _hooked(block: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    captured = {}

    def hook(module, args, output):
        captured["tokens"] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return captured["tokens"]


def _open_clip_case(name: str, directory: Path) -> Case:
    torch.manual_seed(0)
    reference = open_clip.create_model(name).eval()
    checkpoint = directory / f"{name}.pt"
    torch.save(reference.state_dict(), checkpoint)
    visual = reference.visual
    if hasattr(visual, "trunk"):
        ref_blocks, num_prefix = visual.trunk.blocks, visual.trunk.num_prefix_tokens
        enc_blocks = lambda enc: enc.tower.blocks  # noqa: E731
    else:
        ref_blocks, num_prefix = visual.transformer.resblocks, 1
        enc_blocks = lambda enc: enc.tower.transformer.resblocks  # noqa: E731
    return Case(
        build=lambda **kw: OpenCLIPVisionEncoder(name, checkpoint_path=str(checkpoint), **kw),
        block_output=lambda x, k: _hooked(ref_blocks[k], lambda: reference.encode_image(x)),
        num_prefix=num_prefix,
        blocks=enc_blocks,
        checkpoint=str(checkpoint),
    )


def _hf_case(family: str, directory: Path) -> Case:
    torch.manual_seed(0)
    shape = dict(
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    if family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**shape)).eval()
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**shape)).eval()
    with torch.no_grad():  # non-trivial norms, so a skipped or extra norm shows up in the tokens
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    path = directory / f"hf-{family}"
    model.save_pretrained(path)
    if family == "clip":
        (path / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "CLIPImageProcessor",
                    "image_mean": [0.1, 0.2, 0.3],
                    "image_std": [0.4, 0.5, 0.6],
                }
            )
        )
    vision = getattr(model, "vision_model", model)
    return Case(
        build=lambda **kw: HFVisionEncoder(str(path), **kw),
        block_output=lambda x, k: _hooked(vision.encoder.layers[k], lambda: model(pixel_values=x)),
        num_prefix=1 if family == "clip" else 0,
        blocks=lambda enc: getattr(enc.model, "vision_model", enc.model).encoder.layers,
        checkpoint=str(path),
    )


KINDS = ["open_clip-vit", "open_clip-eva", "open_clip-siglip", "hf-clip", "hf-siglip"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    directory = tmp_path_factory.mktemp("towers")
    _MODEL_CONFIGS.update(OPEN_CLIP_CONFIGS)
    return {
        "open_clip-vit": _open_clip_case("ibkit-test-vit", directory),
        "open_clip-eva": _open_clip_case("ibkit-test-eva", directory),
        "open_clip-siglip": _open_clip_case("ibkit-test-siglip", directory),
        "hf-clip": _hf_case("clip", directory),
        "hf-siglip": _hf_case("siglip", directory),
    }


def _pixels(batch: int = 2, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


# -- behaviour common to every tower ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", [-2, 0, -1])
def test_tokens_are_the_chosen_blocks_output(cases, kind, layer):
    case = cases[kind]
    encoder = case.build(layer=layer)
    x = _pixels()
    tokens = encoder(x)
    expected = case.block_output(x, layer % LAYERS)
    assert tokens.shape == (2, case.num_prefix + GRID_TOKENS, WIDTH) == expected.shape
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    # blocks after the chosen one are gone (BLIP-2 drops EVA's last block the same way)
    assert len(case.blocks(encoder)) == layer % LAYERS + 1
    assert encoder.layer == layer % LAYERS


def test_default_layer_is_second_to_last(cases):
    case = cases["open_clip-eva"]
    x = _pixels()
    torch.testing.assert_close(case.build()(x), case.block_output(x, LAYERS - 2))
    with pytest.raises(AssertionError):  # the last block is a different answer
        torch.testing.assert_close(case.build()(x), case.block_output(x, LAYERS - 1))


@pytest.mark.parametrize("kind", KINDS)
def test_keep_cls_off_returns_patch_tokens_only(cases, kind):
    case = cases[kind]
    x = _pixels()
    tokens = case.build(keep_cls=False)(x)
    assert tokens.shape == (2, GRID_TOKENS, WIDTH)
    torch.testing.assert_close(
        tokens, case.block_output(x, LAYERS - 2)[:, case.num_prefix :], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_interface_attributes(cases, kind):
    encoder = cases[kind].build()
    assert isinstance(encoder, VisionEncoder)
    assert encoder.width == WIDTH and encoder.image_size == IMAGE
    blocks = cases[kind].blocks(encoder)
    assert encoder.block_class is type(blocks[0])
    assert issubclass(encoder.block_class, nn.Module)
    assert len(encoder.mean) == len(encoder.std) == 3


def test_mean_std_sources(cases):
    assert cases["open_clip-vit"].build().mean == pytest.approx(CLIP_MEAN)  # open_clip's default (OpenAI)
    assert cases["hf-clip"].build().mean == pytest.approx((0.1, 0.2, 0.3))  # preprocessor_config.json
    assert cases["hf-clip"].build().std == pytest.approx((0.4, 0.5, 0.6))
    assert cases["hf-siglip"].build().mean == pytest.approx((0.5, 0.5, 0.5))  # SigLIP default, no file
    override = cases["open_clip-siglip"].build(mean=(0.5, 0.5, 0.5), std=[0.5, 0.5, 0.5])
    assert override.mean == (0.5, 0.5, 0.5) and override.std == (0.5, 0.5, 0.5)
    assert cases["open_clip-siglip"].build().std == pytest.approx(CLIP_STD)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_tower_has_no_gradients_and_stays_in_eval(cases, kind):
    encoder = cases[kind].build()
    assert encoder.frozen
    assert all(not p.requires_grad for p in encoder.parameters())
    wrapper = nn.Sequential(encoder).train()
    assert not any(m.training for m in encoder.modules())
    assert wrapper.training
    x = _pixels().requires_grad_(True)
    out = encoder(x)
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("kind", ["open_clip-vit", "open_clip-eva", "hf-clip"])
def test_trainable_tower_gets_gradients(cases, kind):
    encoder = cases[kind].build(frozen=False).train()
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    encoder(_pixels()).square().mean().backward()
    first_block = cases[kind].blocks(encoder)[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_block.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_compute_matches_fp32(cases, kind):
    case = cases[kind]
    x = _pixels()
    reference = case.build()(x)
    encoder = case.build(compute_dtype="bf16")
    norms = [m for m in encoder.modules() if isinstance(m, nn.LayerNorm)]
    linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    seen = {}  # hooks added after the encoder's own: they see what the norm computes on and hands on
    norms[-1].register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0].dtype))
    norms[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.dtype))
    out = encoder(x)
    assert seen == {"in": torch.float32, "out": torch.bfloat16}
    assert out.dtype == torch.float32 and out.shape == reference.shape
    relative = (out - reference).norm() / reference.norm()
    assert relative < 3e-2, f"bf16 drifted {relative:.3g} from fp32"
    assert not torch.equal(out, reference)  # it really ran in bf16


def test_fp32_compute_dtype_is_a_no_op(cases):
    encoder = cases["open_clip-vit"].build(compute_dtype="fp32")
    assert all(p.dtype == torch.float32 for p in encoder.parameters())


# -- open_clip specifics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["open_clip-vit", "open_clip-eva", "open_clip-siglip"])
def test_open_clip_image_size_override(cases, kind):
    encoder = cases[kind].build(image_size=48)
    assert encoder.image_size == 48
    tokens = encoder(_pixels(size=48))
    assert tokens.shape == (2, cases[kind].num_prefix + (48 // PATCH) ** 2, WIDTH)


def test_open_clip_image_size_interpolates_positions(cases):
    native = cases["open_clip-vit"].build().tower.positional_embedding
    resized = cases["open_clip-vit"].build(image_size=48).tower.positional_embedding
    assert resized.shape == (1 + 36, WIDTH)
    torch.testing.assert_close(resized[0], native[0])  # class position is kept
    grid = native[1:].reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[1:], expected.permute(0, 2, 3, 1).reshape(36, WIDTH))


def test_open_clip_accepts_bare_timm_trunk_weights(cases, tmp_path):
    case = cases["open_clip-eva"]
    full = torch.load(case.checkpoint, weights_only=True)
    trunk_only = {
        k.removeprefix("visual.trunk."): v for k, v in full.items() if k.startswith("visual.trunk.")
    }
    path = tmp_path / "trunk.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trunk_only.items()}, str(path))
    encoder = OpenCLIPVisionEncoder("ibkit-test-eva", checkpoint_path=str(path))
    x = _pixels()
    torch.testing.assert_close(encoder(x), case.block_output(x, LAYERS - 2), rtol=1e-5, atol=1e-5)


def test_open_clip_weights_through_pretrained_file_path(cases):
    case = cases["open_clip-vit"]
    encoder = OpenCLIPVisionEncoder("ibkit-test-vit", pretrained=case.checkpoint)
    x = _pixels()
    torch.testing.assert_close(encoder(x), case.block_output(x, LAYERS - 2), rtol=1e-5, atol=1e-5)


def test_open_clip_bad_inputs(cases, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenCLIPVisionEncoder("no-such-model")
    with pytest.raises(ValueError, match="neither an open_clip tag"):
        OpenCLIPVisionEncoder("ibkit-test-vit", pretrained="not-a-tag")
    with pytest.raises(ValueError, match="layer=3 is out of range"):
        OpenCLIPVisionEncoder("ibkit-test-vit", layer=3)
    with pytest.raises(ValueError, match="compute_dtype='fp8'"):
        OpenCLIPVisionEncoder("ibkit-test-vit", compute_dtype="fp8")
    with pytest.raises(ValueError, match="only for frozen towers"):
        OpenCLIPVisionEncoder("ibkit-test-vit", compute_dtype="bf16", frozen=False)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        OpenCLIPVisionEncoder("ibkit-test-vit", checkpoint_path=str(tmp_path / "missing.pt"))
    # a checkpoint of another tower: names the file and the mismatch
    with pytest.raises(ValueError, match=r"ibkit-test-eva\.pt.*does not match"):
        OpenCLIPVisionEncoder("ibkit-test-vit", checkpoint_path=cases["open_clip-eva"].checkpoint)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        OpenCLIPVisionEncoder("ibkit-test-vit", checkpoint_path=str(garbage))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        OpenCLIPVisionEncoder("ibkit-test-vit", image_size=36)
    with pytest.raises(TypeError, match="ModifiedResNet"):
        OpenCLIPVisionEncoder("ibkit-test-resnet")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        cases["open_clip-vit"].build()(torch.randn(3, IMAGE, IMAGE))


# -- transformers specifics ---------------------------------------------------------------------------------
def test_hf_layer_index_is_hidden_states_plus_one(cases):
    """``layer=k`` is transformers' ``hidden_states[k + 1]`` (hidden_states[0] is after CLIP's pre-norm)."""
    path = cases["hf-clip"].checkpoint
    model = CLIPVisionModel.from_pretrained(path).eval()
    x = _pixels()
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
    for layer in (0, 1, -2):
        torch.testing.assert_close(HFVisionEncoder(path, layer=layer)(x), hidden[layer % LAYERS + 1])


def test_hf_bad_inputs(cases, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFVisionEncoder(str(tmp_path / "nowhere"))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"bert.*config\.json.*'bert' is not supported"):
        HFVisionEncoder(str(other))
    with pytest.raises(ValueError, match="layer=-4 is out of range"):
        cases["hf-siglip"].build(layer=-4)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(cases["hf-clip"].checkpoint).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json image_mean"):
        HFVisionEncoder(str(broken))


# -- YAML configs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["openclip_vit_l_14.yaml", "openclip_eva01_g_14.yaml", "hf_clip_vit_l_14.yaml"]
)
def test_yaml_configs_validate_against_the_signatures(name):
    """jsonargparse resolves class_path and checks init_args against the constructor (nothing is built)."""
    from jsonargparse import ArgumentParser

    spec = yaml.safe_load((REPO / "configs" / "model" / "vision" / name).read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--vision_encoder", type=VisionEncoder)
    parsed = parser.parse_object({"vision_encoder": spec})
    assert parsed.vision_encoder.class_path == spec["class_path"]
    cls = {"OpenCLIPVisionEncoder": OpenCLIPVisionEncoder, "HFVisionEncoder": HFVisionEncoder}[
        spec["class_path"].rsplit(".", 1)[1]
    ]
    inspect.signature(cls).bind(**spec["init_args"])
    assert spec["init_args"].get("layer", -2) == -2  # BLIP-2's second-to-last block


# -- in the composite model -----------------------------------------------------------------------------------
def _composite(encoder: VisionEncoder, text: dict):
    from ibkit.models.instructblip import InstructBLIP
    from ibkit.models.language import LanguageModel
    from ibkit.models.qformer import QFormerConfig

    qformer = QFormerConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        cross_attention_freq=2,
    )
    return InstructBLIP(encoder, LanguageModel.from_config(text), qformer=qformer, num_query_tokens=4)


@pytest.mark.parametrize(
    ("kind", "compute_dtype", "lm"),
    [
        ("open_clip-vit", None, "t5"),
        ("open_clip-eva", "bf16", "t5"),
        ("open_clip-siglip", None, "llama"),
        ("hf-clip", None, "llama"),
        ("hf-siglip", "bf16", "t5"),
    ],
)
def test_instructblip_trains_and_generates_with_each_tower(cases, kind, compute_dtype, lm):
    from tiny_models import LLAMA_TEXT, T5_TEXT

    encoder = cases[kind].build(compute_dtype=compute_dtype)
    model = _composite(encoder, T5_TEXT if lm == "t5" else LLAMA_TEXT)
    assert model.qformer is not None and model.ln_vision.normalized_shape == (encoder.width,)
    model.train()
    assert not any(m.training for m in encoder.modules())
    g = torch.Generator().manual_seed(3)
    batch = dict(
        pixel_values=_pixels(),
        qformer_input_ids=torch.randint(1, 100, (2, 6), generator=g),
        input_ids=torch.randint(3, 90, (2, 5), generator=g),
    )
    labels = torch.randint(3, 90, (2, 4 if lm == "t5" else 5), generator=g)
    if lm == "llama":
        labels[:, :3] = -100  # loss on the answer part only
    out = model(**batch, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    qformer_grads = [p.grad for p in model.qformer.parameters() if p.requires_grad]
    assert qformer_grads and any(g is not None and g.abs().sum() > 0 for g in qformer_grads)
    assert model.query_tokens.grad is not None and model.ln_vision.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())

    model.eval()
    generated = model.generate(**batch, max_new_tokens=3)
    assert generated.dim() == 2 and generated.shape[0] == 2 and 1 <= generated.shape[1] <= 3
