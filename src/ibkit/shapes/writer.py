"""Writing the shapes datasets to disk: ``<root>/shapes/<dataset>/`` with annotation JSON + PNG/mp4 files.

Generation is seeded per (seed, dataset, split) and idempotent: a folder whose manifest matches is left
alone, and a set is written to a scratch folder first, so a crash never leaves half a dataset behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from ibkit.shapes.folders import holds_set, move_into_place
from ibkit.shapes.render import check_image_size, render_image, save_png, write_clip
from ibkit.shapes.specs import SPECS, SUITE
from ibkit.shapes.tasks import RELATION_DATASETS, maker_for
from ibkit.shapes.text_corpus import TEXT_CORPUS, TEXT_SPLITS, write_text_corpus

# bump when the generated content changes: old folders then fail the manifest check
# (3: several questions per shapes_vqa training picture; 4: every one of them asked the whole-picture count)
GENERATOR_VERSION = 4
DEFAULT_SIZES = {"train": 2000, "val": 100, "test": 200}
TINY_SIZES = {"train": 6, "val": 3, "test": 6}


def split_sizes(name: str, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Samples per split of ``name``: defaults, then ``sizes[split]``, then ``sizes["<name>.<split>"]``."""
    if name != TEXT_CORPUS and name not in SPECS:
        raise KeyError(f"unknown shapes dataset {name!r}; known: {', '.join([*SPECS, TEXT_CORPUS])}")
    sizes = dict(sizes or {})
    for key, value in sizes.items():
        dataset, _, split = key.rpartition(".")
        known_split = split in (
            SPECS[dataset].splits if dataset in SPECS
            else TEXT_SPLITS if dataset == TEXT_CORPUS
            else () if dataset else DEFAULT_SIZES
        )
        if not known_split:
            raise ValueError(
                f"sizes: unknown key {key!r}; use a split ({', '.join(DEFAULT_SIZES)}) or '<dataset>.<split>' "
                f"with a shapes dataset (or {TEXT_CORPUS}) and one of its splits"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"sizes[{key!r}] must be a non-negative integer, got {value!r}")
    splits = TEXT_SPLITS if name == TEXT_CORPUS else SPECS[name].splits
    return {split: sizes.get(f"{name}.{split}", sizes.get(split, DEFAULT_SIZES[split])) for split in splits}


def wants_text_corpus(sizes: dict[str, int] | None) -> bool:
    """The text instruction corpus is written only when ``sizes`` asks for it (``shapes_text.train``)."""
    return f"{TEXT_CORPUS}.train" in (sizes or {})


def _manifest(name: str, seed: int, image_size: int, sizes: dict[str, int], relations: bool = False) -> dict:
    manifest = {"generator_version": GENERATOR_VERSION, "dataset": name, "seed": seed, "image_size": image_size,
                "sizes": sizes}
    # only where the recipe changes the set: a default workspace keeps its manifests, so it is not rewritten
    return {**manifest, "relations": True} if relations and name in RELATION_DATASETS else manifest


def _up_to_date(folder: Path, manifest: dict) -> bool:
    return holds_set(folder, manifest, SPECS[manifest["dataset"]].splits)


def _generate(folder: Path, manifest: dict, progress: Callable[[int], object]) -> None:
    """Write one dataset into a scratch folder and move it into place, so a crash never leaves a half set."""
    name, seed, image_size = manifest["dataset"], manifest["seed"], manifest["image_size"]
    spec = SPECS[name]
    media = "videos" if spec.modality == "video" else "images"
    scratch = folder.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    for split, count in manifest["sizes"].items():
        rng = random.Random(f"ibkit-shapes:{seed}:{name}:{split}")  # str seeds are stable across processes
        records = []
        maker = maker_for(name, split, bool(manifest.get("relations")))
        for index in range(count):  # count pictures (clips); a picture with several questions has a record each
            fields, scene = maker(rng)
            relative = f"{split}/{index:06d}." + ("mp4" if spec.modality == "video" else "png")
            if spec.modality == "video":
                write_clip(scene, image_size, scratch / media / relative)
            else:
                save_png(render_image(scene, image_size), scratch / media / relative)
            several = isinstance(fields, list)
            for number, sample_fields in enumerate(fields if several else [fields]):
                records.append(
                    {
                        "id": f"{name}-{split}-{index:06d}" + (f"-q{number}" if several else ""),
                        ("video" if media == "videos" else "image"): relative,
                        **sample_fields,
                        "scene": scene.to_json(),
                    }
                )
            progress(1)
        info = {"dataset": name, "split": split, "seed": seed, "image_size": image_size, "media": media}
        (scratch / media).mkdir(parents=True, exist_ok=True)
        (scratch / f"{split}.json").write_text(json.dumps({"info": info, "records": records}))
    (scratch / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    move_into_place(scratch, folder, lambda: _up_to_date(folder, manifest))


def make_shapes(
    root: Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    image_size: int = 64,
    *,
    names: Iterable[str] | None = None,
    progress: bool = True,
    relations: bool = False,
) -> dict[str, Path]:
    """Generate the shapes datasets under ``<root>/shapes/<name>/``; returns name -> folder.

    Idempotent: a dataset whose manifest (generator version, seed, image size, split sizes) matches
    is left alone; a different manifest regenerates it. ``sizes`` maps a split (``"train"``) or
    ``"<dataset>.<split>"`` to a count of pictures (clips) (defaults: DEFAULT_SIZES); one picture is one
    sample except in shapes_vqa's train split, which asks several questions of each (VQAv2-like). The text
    instruction corpus (:mod:`ibkit.shapes.text_corpus`, ``<root>/shapes/shapes_text/``) is written only
    when ``sizes`` names ``shapes_text.train``, so that other presets stay unchanged. ``relations`` makes
    held-in VQA and the text corpus of the relation recipe (:mod:`ibkit.shapes.relations`).
    """
    from tqdm import tqdm

    check_image_size(image_size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    selected = list(names) if names is not None else list(SPECS)
    unknown = [name for name in selected if name not in SPECS and name != TEXT_CORPUS]
    if unknown:
        raise KeyError(f"unknown shapes dataset(s) {unknown}; known: {', '.join([*SPECS, TEXT_CORPUS])}")
    base = Path(root).expanduser() / SUITE
    images = [name for name in selected if name in SPECS]
    manifests = {name: _manifest(name, seed, image_size, split_sizes(name, sizes), relations) for name in images}
    todo = [name for name in images if not _up_to_date(base / name, manifests[name])]
    total = sum(sum(manifests[name]["sizes"].values()) for name in todo)
    with tqdm(total=total, desc="generating shapes", unit="sample", disable=not progress or not todo) as bar:
        for name in todo:
            bar.set_postfix_str(name)
            base.mkdir(parents=True, exist_ok=True)
            _generate(base / name, manifests[name], bar.update)
    folders = {name: base / name for name in images}
    if wants_text_corpus(sizes) and (names is None or TEXT_CORPUS in selected):
        folders[TEXT_CORPUS] = write_text_corpus(root, seed, split_sizes(TEXT_CORPUS, sizes), relations)
    return folders


def write_tiny_shapes(root: Path, seed: int = 0, image_size: int = 64) -> dict[str, Path]:
    """A few samples of every shapes dataset (for other modules' tests)."""
    return make_shapes(root, seed=seed, sizes=dict(TINY_SIZES), image_size=image_size, progress=False)
