"""Loading images and the transforms of BLIP/InstructBLIP: file -> PIL -> normalised (3, H, W) tensor.

The resize runs on the PIL image (PIL's bicubic filter), as in LAVIS, so pixels match the original
preprocessing; the tensor conversion and normalisation come after. Unreadable input raises
:class:`BadInputError`, which the dataset turns into a counted skip (or an error when strict).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD, VisionEncoder

ImageTransform = Callable[[Image.Image], torch.Tensor]


class BadInputError(ValueError):
    """An input file that cannot be used (missing, unreadable, truncated, too short).

    ``reason`` is a short stable key used to count skips per dataset (``missing_file``,
    ``unreadable_image``, ``truncated_image``, ``unreadable_video``, ``too_few_frames``, ...).
    """

    def __init__(self, reason: str, path: str | Path | None, detail: str) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.detail = detail
        super().__init__(f"{reason}: {path}: {detail}" if path is not None else f"{reason}: {detail}")


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (so truncation shows up here, not later) and convert it to RGB."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError("missing_file", path, "image file not found")
    return _decode(path, path)


def decode_image(data: bytes, name: str) -> Image.Image:
    """An encoded image held in memory (a tar member), decoded like :func:`load_image`; ``name`` for errors."""
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, path: str | Path) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except OSError as error:
        # PIL reports cut-off files as "image file is truncated" (or "broken data stream").
        message = str(error)
        reason = (
            "truncated_image"
            if "truncated" in message or "broken data stream" in message
            else "unreadable_image"
        )
        raise BadInputError(reason, path, message) from error
    except (ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadInputError("unreadable_image", path, str(error)) from error


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={list(mean)} std={list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")
    return [
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(mean), std=list(std)),
    ]


def eval_transform(
    image_size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> ImageTransform:
    """BLIP's eval transform: bicubic resize to a square (no crop, aspect ratio not kept), normalise."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            *_to_normalised_tensor(mean, std),
        ]
    )


def train_transform(
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    scale: tuple[float, float] = (0.5, 1.0),
    horizontal_flip: bool = False,
) -> ImageTransform:
    """BLIP's train transform: RandomResizedCrop(scale 0.5-1, bicubic), optional flip, normalise.

    Horizontal flipping is off by default: it silently turns "left" into "right" in questions about
    the image, so the flipped sample no longer matches its answer.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    steps: list[Callable] = [
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)
    ]
    if horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, *_to_normalised_tensor(mean, std)])


def image_transform(
    train: bool = False,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    horizontal_flip: bool = False,
    scale: tuple[float, float] = (0.5, 1.0),
) -> ImageTransform:
    """The train or eval transform, chosen by a flag (what configs and the datamodule call)."""
    if train:
        return train_transform(image_size, mean, std, scale=scale, horizontal_flip=horizontal_flip)
    return eval_transform(image_size, mean, std)


def transform_for_encoder(encoder: VisionEncoder, train: bool = False, **kwargs) -> ImageTransform:
    """The transform matching an encoder's input size and normalisation statistics."""
    return image_transform(train, encoder.image_size, encoder.mean, encoder.std, **kwargs)
