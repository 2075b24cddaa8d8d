"""What does a pretrained image encoder's token hold about the object under it? A linear probe per attribute.

The demo's held-in questions name an object ("What colour is the star?") and ask one of its attributes, so
the frozen encoder must tell shape, colour, size and place apart where the object is, or no Q-Former can pass
them on. This probe reads each object's *centre token* (the patch token of the grid cell holding its centre)
from the frozen encoder and fits one linear classifier per attribute on the objects of the caption training
pictures, scored on the objects of the held-in VQA pictures (both rendered by the demo, scenes known). On the
2-core AMD EPYC it measured the demo's old encoder (420 steps of 32) at shape 0.82, size 0.80, side 0.83, and
the current one (1,050 steps of 16, ``encoder.yaml``) at shape 0.92, size 0.85, side 0.97; e.g.::

    python -m ibkit.shapes.encoder_probe outputs/demo/encoder/model --data outputs/demo
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ibkit.models.vision.base import VisionEncoder
from ibkit.shapes.render import COLORS, SHAPES
from ibkit.training.encoder_pretrain import ENCODER_FILE, ENCODER_INFO, ENCODER_PREFIX, patch_cells

#: attribute -> its classes; side as the held-in questions decide it (centre left or right of the middle)
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "size": ("small", "large"),
                                          "side": ("left", "right")}
TRAIN_SET = ("shapes_caption", "train")  # the pictures the encoder was pretrained on
TEST_SET = ("shapes_vqa", "val")  # the held-in VQA pictures the demo evaluates on


def load_encoder(model_dir: str | Path) -> VisionEncoder:
    """The encoder ``ibkit export`` of an encoder run wrote to ``model_dir`` (``encoder.json`` +
    ``encoder.safetensors``), rebuilt from its class path and arguments, weights loaded strictly, frozen."""
    from jsonargparse import ArgumentParser
    from safetensors.torch import load_file

    folder = Path(model_dir)
    info_path, weights_path = folder / ENCODER_INFO, folder / ENCODER_FILE
    for path in (info_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; `ibkit export` of an encoder run (the demo's "
                                    "<output_dir>/encoder/model) writes encoder.json and encoder.safetensors")
    try:
        spec = json.loads(info_path.read_text())["encoder"]
        built = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{info_path}: not an encoder description (needs encoder.class_path): {error}") from None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--encoder", type=VisionEncoder)
    encoder = parser.instantiate(parser.parse_object({"encoder": built})).encoder
    state = {key.removeprefix(ENCODER_PREFIX): value for key, value in load_file(str(weights_path)).items()}
    encoder.load_state_dict(state, strict=True)
    return encoder.eval().requires_grad_(False)


def _records(root: Path, dataset: str, split: str, limit: int | None) -> tuple[list[dict[str, Any]], Path]:
    path = root / "shapes" / dataset / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; --data is the demo's output folder (it renders shapes/ there)")
    records = json.loads(path.read_text())["records"]
    bad = next((r.get("id", i) for i, r in enumerate(records) if not r.get("scene", {}).get("objects")), None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad!r} has no scene objects to probe")
    return records[:limit], path.parent / "images"


@torch.no_grad()
def object_tokens(encoder: VisionEncoder, records: Sequence[dict[str, Any]], images: Path,
                  batch_size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(objects, width) centre tokens of every object in ``records``' pictures and each attribute's labels."""
    from PIL import Image

    from ibkit.processor import Processor

    grid = math.isqrt(patch_cells(encoder))
    processor = Processor(None, None, image_size=encoder.image_size, mean=encoder.mean, std=encoder.std)
    features: list[torch.Tensor] = []
    labels: dict[str, list[int]] = {name: [] for name in ATTRIBUTES}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        pixels = processor.images([Image.open(images / record["image"]) for record in chunk])
        patches = encoder(pixels)[:, -grid * grid:].float()  # a leading [CLS] left out
        for record, tokens in zip(chunk, patches):
            for obj in record["scene"]["objects"]:
                column, row = (min(grid - 1, max(0, int(obj[axis] * grid))) for axis in ("x", "y"))
                features.append(tokens[row * grid + column])
                values = {"shape": obj["shape"], "color": obj["color"], "size": obj["size"],
                          "side": "left" if obj["x"] < 0.5 else "right"}
                for name, classes in ATTRIBUTES.items():
                    labels[name].append(classes.index(values[name]))
    return torch.stack(features), {name: torch.tensor(values) for name, values in labels.items()}


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 classes: int, steps: int = 500, lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Accuracy ± binomial standard error of a softmax classifier (full-batch Adam on standardised features)."""
    mean, std = train.mean(0), train.std(0) + 1e-5
    train, test = (train - mean) / std, (test - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(train.shape[1], classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(train), train_labels).backward()
        optimizer.step()
    with torch.no_grad():
        value = (head(test).argmax(1) == test_labels).float().mean().item()
    n = len(test_labels)
    return {"value": value, "stderr": math.sqrt(value * (1 - value) / n), "n": n}


def probe_encoder(model_dir: str | Path, data: str | Path, train_pictures: int | None = 2000,
                  test_pictures: int | None = None) -> dict[str, dict[str, float]]:
    """``{attribute: {value, stderr, n}}``: the centre-token probe of ``model_dir``'s encoder, fit on the caption
    training pictures of the demo folder ``data`` (the first ``train_pictures``) and scored on its held-in VQA
    pictures."""
    encoder = load_encoder(model_dir)  # eval mode, and the probe seeds its own generator: no global seed needed
    root = Path(data)
    train, train_labels = object_tokens(encoder, *_records(root, *TRAIN_SET, train_pictures))
    test, test_labels = object_tokens(encoder, *_records(root, *TEST_SET, test_pictures))
    return {name: linear_probe(train, train_labels[name], test, test_labels[name], len(classes))
            for name, classes in ATTRIBUTES.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ibkit.shapes.encoder_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="an exported encoder folder, e.g. outputs/demo/encoder/model")
    parser.add_argument("--data", required=True, help="the demo output folder whose shapes/ data to probe on")
    parser.add_argument("--train-pictures", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        table = probe_encoder(args.model_dir, args.data, args.train_pictures)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print("| attribute | chance | centre-token probe |\n|---|---:|---:|")
    for name, cell in table.items():
        print(f"| {name} | {1 / len(ATTRIBUTES[name]):.2f} | {cell['value']:.3f} ± {cell['stderr']:.3f} (n {cell['n']}) |")


if __name__ == "__main__":
    main()
