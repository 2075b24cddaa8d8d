"""ibkit-shapes: a built-in synthetic instruction benchmark that mirrors the paper's split of tasks.

Scenes of 1-4 coloured shapes (6 colours x 4 shapes), optional written words and 8-frame clips of a
moving shape are generated from a seed and written to disk as annotation JSON + PNG/mp4 files under
``<root>/shapes/<dataset>/``. They are read back through the dataset registry like any real dataset,
so the CPU demo exercises exactly the code path of the 26 real datasets.

Held-in (training): captioning, VQA, VQG, scene-text VQA (OCR-VQA-like), multiple-choice VQA
(A-OKVQA-like). Held-out (zero-shot): spatial true/false (VSR), counting with options (IconQA),
context + options (ScienceQA), yes/no classification scored by AUC (HatefulMemes), dialog with
candidates (Visual Dialog), video QA (MSVD-QA) and captions of colour-shape pairs that never occur in
held-in data (NoCaps).

Every answer is derived from the scene geometry stored beside it (``extra["scene"]``); shapes never
overlap and every object is a unique (colour, shape) pair, so "the red circle" always names one object.
Scenes contain left/right questions and captions: train on them without horizontal flips, and without
crops that can cut shapes off (counts would change).

Modules: ``scenes`` (geometry and language), ``tasks`` (the 12 generators), ``specs`` (registry entries,
chance levels), ``render`` (drawing), ``writer`` / ``reader`` (the files on disk), ``datamodule``
(:class:`~ibkit.shapes.datamodule.TinyShapesDataModule`, the tiny CPU preset's data), ``demo`` and
``plotting`` (``ibkit demo``). Importing this package registers the shapes datasets.
"""

from ibkit.shapes.reader import read_shapes, scene_of
from ibkit.shapes.render import COLORS, SHAPES, Scene, ShapeObject, render_image
from ibkit.shapes.scenes import ALL_PAIRS, NOVEL_PAIRS, TRAIN_PAIRS
from ibkit.shapes.specs import SUITE, chance_level, register_shapes, shapes_specs
from ibkit.shapes.writer import DEFAULT_SIZES, TINY_SIZES, make_shapes, split_sizes, write_tiny_shapes

__all__ = [
    "ALL_PAIRS",
    "COLORS",
    "DEFAULT_SIZES",
    "NOVEL_PAIRS",
    "SHAPES",
    "SUITE",
    "TINY_SIZES",
    "TRAIN_PAIRS",
    "Scene",
    "ShapeObject",
    "chance_level",
    "make_shapes",
    "read_shapes",
    "register_shapes",
    "render_image",
    "scene_of",
    "shapes_specs",
    "split_sizes",
    "write_tiny_shapes",
]
