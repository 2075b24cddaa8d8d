"""The centre-token probe of ibkit.shapes.encoder_probe: it loads an exported encoder as it was saved, reads the
token under each object, and names what is missing."""

import json

import pytest
import torch

from ibkit.models import EVAViT
from ibkit.models.vision.eva_vit import EVAViTConfig
from ibkit.shapes.encoder_probe import ATTRIBUTES, load_encoder, probe_encoder
from ibkit.shapes.writer import make_shapes
from ibkit.training.encoder_pretrain import EncoderPretrainModule

SIZES = {"shapes_caption.train": 48, "shapes_vqa.val": 24, "val": 2, "test": 2}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny EVA ViT exported as ``ibkit export`` exports an encoder run, and a little shapes data."""
    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    config = EVAViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=48, patch_size=8)
    encoder = EVAViT(config, frozen=False)
    EncoderPretrainModule(encoder, vocab_size=64).save_model(root / "encoder")
    make_shapes(root, seed=0, sizes=SIZES, image_size=48, names=["shapes_caption", "shapes_vqa"], progress=False)
    return root, encoder


def test_the_exported_encoder_is_rebuilt_with_its_weights(exported):
    root, encoder = exported
    loaded = load_encoder(root / "encoder")
    assert type(loaded) is EVAViT and loaded.config == encoder.config
    original = encoder.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in loaded.state_dict().items())
    assert not any(p.requires_grad for p in loaded.parameters())


def test_each_object_is_read_from_its_own_token(exported):
    """Colour survives even a random patch embedding, but only in the token under the object: a probe that read
    another cell would be near chance (1/6)."""
    root, _ = exported
    table = probe_encoder(root / "encoder", root, train_pictures=None)
    records = json.loads((root / "shapes" / "shapes_vqa" / "val.json").read_text())["records"]
    objects = sum(len(r["scene"]["objects"]) for r in records)
    assert set(table) == set(ATTRIBUTES)
    assert all(cell["n"] == objects and 0.0 <= cell["value"] <= 1.0 for cell in table.values())
    assert table["color"]["value"] >= 0.8


def test_missing_files_are_named(exported, tmp_path):
    root, _ = exported
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"shapes_caption.*train\.json"):
        probe_encoder(root / "encoder", tmp_path)
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "encoder.safetensors").write_bytes((root / "encoder" / "encoder.safetensors").read_bytes())
    with pytest.raises(ValueError, match="encoder.class_path"):
        load_encoder(tmp_path)
