"""Drawing for the ``shapes`` benchmark: scene geometry -> PNG image, moving shapes -> small mp4 clip.

Geometry is in normalised units (0..1 of the image side), so one scene renders the same at any
size. Shapes are drawn supersampled and box-filtered down (smooth edges without a large image);
scene text uses PIL's built-in bitmap font so no font file is needed and the pixels never depend
on what fonts a machine has installed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (40, 90, 214),
    "yellow": (236, 200, 30),
    "purple": (140, 64, 186),
    "orange": (242, 133, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
TEXT_COLOR = (20, 20, 20)
TEXT_BAND = 0.2  # height of the top / bottom strip reserved for written words (normalised)
MIN_IMAGE_SIZE = 48  # below this the bitmap font no longer fits its band
VIDEO_FPS = 8


@dataclass(frozen=True)
class ShapeObject:
    """One shape: centre ``(x, y)`` and half-extent ``r`` in normalised units; ``(vx, vy)`` per video frame."""

    color: str
    shape: str
    size: str  # "small" | "large": a word the captions and questions use
    x: float
    y: float
    r: float
    vx: float = 0.0
    vy: float = 0.0

    def at_frame(self, frame: int) -> ShapeObject:
        return ShapeObject(
            self.color, self.shape, self.size, self.x + frame * self.vx, self.y + frame * self.vy, self.r
        )

    def to_json(self) -> dict:
        record = {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "x": self.x,
            "y": self.y,
            "r": self.r,
        }
        if self.vx or self.vy:
            record.update(vx=self.vx, vy=self.vy)
        return record

    @classmethod
    def from_json(cls, record: dict) -> ShapeObject:
        return cls(
            record["color"],
            record["shape"],
            record["size"],
            float(record["x"]),
            float(record["y"]),
            float(record["r"]),
            float(record.get("vx", 0.0)),
            float(record.get("vy", 0.0)),
        )


@dataclass(frozen=True)
class Scene:
    """Everything drawn in one image (or, with ``num_frames > 1``, one clip)."""

    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int] = (245, 245, 245)
    words: dict[str, str] = field(default_factory=dict)  # band ("top" | "bottom") -> word
    num_frames: int = 1

    def frame(self, index: int) -> Scene:
        return Scene(tuple(obj.at_frame(index) for obj in self.objects), self.background, dict(self.words), 1)

    def to_json(self) -> dict:
        record: dict = {
            "objects": [obj.to_json() for obj in self.objects],
            "background": list(self.background),
        }
        if self.words:
            record["words"] = dict(self.words)
        if self.num_frames > 1:
            record["num_frames"] = self.num_frames
        return record

    @classmethod
    def from_json(cls, record: dict) -> Scene:
        return cls(
            tuple(ShapeObject.from_json(obj) for obj in record["objects"]),
            tuple(record.get("background", (245, 245, 245))),
            dict(record.get("words", {})),
            int(record.get("num_frames", 1)),
        )


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE or image_size % 2:
        raise ValueError(
            f"image_size must be an even integer >= {MIN_IMAGE_SIZE} (scene text needs the room, video frames "
            f"use yuv420p), got {image_size!r}"
        )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # five points, pointing up; inner radius 0.45 keeps the arms visible when small
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known shapes: {SHAPES}")


@functools.cache
def _font() -> ImageFont.ImageFont:
    # Pillow >= 10.1 returns a FreeType font from load_default(); the bitmap one has its own loader.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


def _draw_word(image: Image.Image, word: str, band: str) -> None:
    """Write ``word`` centred in the top or bottom band, scaled up by an integer factor for large images."""
    size = image.width
    font = _font()
    left, top, right, bottom = font.getbbox(word)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), word, fill=255, font=font)
    band_px = TEXT_BAND * size
    scale = max(1, int(0.8 * band_px) // mask.height)
    if scale > 1:
        mask = mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)
    band_top = 0.0 if band == "top" else size - band_px
    x = (size - mask.width) // 2
    y = int(round(band_top + (band_px - mask.height) / 2))
    image.paste(Image.new("RGB", mask.size, TEXT_COLOR), (x, y), mask)


def render_image(scene: Scene, image_size: int) -> Image.Image:
    """The scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    supersample = max(1, min(4, 256 // image_size))
    canvas_size = image_size * supersample
    canvas = Image.new("RGB", (canvas_size, canvas_size), tuple(scene.background))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        cx, cy, r = obj.x * canvas_size, obj.y * canvas_size, obj.r * canvas_size
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    image = canvas if supersample == 1 else canvas.resize((image_size, image_size), Image.Resampling.BOX)
    for band, word in sorted(scene.words.items()):
        _draw_word(image, word, band)
    return image


def save_png(image: Image.Image, path: Path) -> None:
    """PNG without metadata, so equal pixels give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=6)


def write_clip(scene: Scene, image_size: int, path: Path) -> None:
    """Render ``scene.num_frames`` frames and write them as an mp4 (MPEG-4 Part 2, near-lossless quantiser).

    Single-threaded encoding keeps the bytes identical from run to run.
    """
    import av  # the optional "video" extra; only clip datasets need it

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width = stream.height = image_size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.qmin = 1
        stream.codec_context.qmax = 2
        for index in range(scene.num_frames):
            pixels = np.asarray(render_image(scene.frame(index), image_size))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
