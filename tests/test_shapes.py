"""The built-in synthetic benchmark: determinism, registry round trip, and answers checked against geometry.

Expected answers are recomputed here from the stored scene metadata by parsing the question text
(not by calling the generator's own helpers), so a wrong answer or an ambiguous question fails.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from ibkit.data.errors import MalformedRecordError, SkipCounter
from ibkit.data.registry import get_spec, list_specs, load_samples
from ibkit.data.sample import Sample
from ibkit.data.templates import fill_instruction, zero_shot_instruction
from ibkit.data.video import load_video_frames
from ibkit.shapes import (
    NOVEL_PAIRS,
    TINY_SIZES,
    chance_level,
    make_shapes,
    read_shapes,
    write_tiny_shapes,
)
from ibkit.shapes.render import COLORS, SHAPES, Scene, ShapeObject, render_image

MEDIUM = {"train": 60, "val": 20, "test": 60}


@pytest.fixture(scope="module")
def medium_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes_medium")
    make_shapes(root, seed=3, sizes=MEDIUM, progress=False)
    return root


def _all_samples(root: Path, held_in: bool | None = None) -> dict[tuple[str, str], list[Sample]]:
    return {
        (spec.name, split): load_samples(spec.name, root, split, strict=True)
        for spec in list_specs("shapes")
        if held_in is None or spec.held_in == held_in
        for split in spec.splits
    }


def _scene(sample: Sample) -> Scene:
    return Scene.from_json(sample.extra["scene"])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    first = _files(Path(write_tiny_shapes(tmp_path / "a", seed=5)["shapes_vqa"]).parent)
    second = _files(Path(write_tiny_shapes(tmp_path / "b", seed=5)["shapes_vqa"]).parent)
    assert first.keys() == second.keys()
    assert any(name.endswith(".mp4") for name in first) and any(name.endswith(".png") for name in first)
    assert [name for name in first if first[name] != second[name]] == []

    other = _files(Path(write_tiny_shapes(tmp_path / "c", seed=6)["shapes_vqa"]).parent)
    assert other.keys() == first.keys()  # same layout, different content
    for spec in list_specs("shapes"):
        split = spec.splits[-1]
        records_5 = json.loads(first[f"{spec.name}/{split}.json"])["records"]
        records_6 = json.loads(other[f"{spec.name}/{split}.json"])["records"]
        assert [r["scene"] for r in records_5] != [r["scene"] for r in records_6], spec.name
    media = [name for name in first if name.endswith((".png", ".mp4"))]
    assert sum(first[name] != other[name] for name in media) > 0.9 * len(media)


def test_manifest_skips_when_equal_and_regenerates_on_change(tmp_path: Path) -> None:
    names = ["shapes_vqa"]
    folder = make_shapes(tmp_path, seed=0, sizes=TINY_SIZES, names=names, progress=False)["shapes_vqa"]
    annotation = folder / "train.json"
    before = annotation.read_bytes(), annotation.stat().st_mtime_ns
    make_shapes(tmp_path, seed=0, sizes=TINY_SIZES, names=names, progress=False)
    assert (annotation.read_bytes(), annotation.stat().st_mtime_ns) == before  # left alone

    make_shapes(tmp_path, seed=1, sizes=TINY_SIZES, names=names, progress=False)
    assert json.loads((folder / "manifest.json").read_text())["seed"] == 1
    assert json.loads(annotation.read_text())["info"]["seed"] == 1
    assert annotation.read_bytes() != before[0]

    make_shapes(tmp_path, seed=1, sizes={"train": 4, "val": 2}, names=names, progress=False)
    assert len({s.image for s in load_samples("shapes_vqa", tmp_path, "train")}) == 4  # 4 pictures
    assert sorted(p.name for p in (folder / "images" / "train").iterdir()) == [
        f"{i:06d}.png" for i in range(4)
    ]

    (folder / "val.json").unlink()  # a damaged folder is regenerated too
    make_shapes(tmp_path, seed=1, sizes={"train": 4, "val": 2}, names=names, progress=False)
    assert len(load_samples("shapes_vqa", tmp_path, "val")) == 2
    assert not [p for p in (tmp_path / "shapes").iterdir() if p.name.startswith(".")]  # no scratch left over


def test_two_processes_rendering_the_same_set_keep_the_first_ones_files(tmp_path: Path, monkeypatch) -> None:
    """Two runs started side by side on one root both find the set missing or stale and both render it. The one
    that finishes second must neither delete the files the first put in place (its run may be reading them) nor
    fail when the stale folder vanishes under its own delete."""
    from ibkit.shapes import writer

    names = ["shapes_vqa"]
    folder = make_shapes(tmp_path, seed=0, sizes=TINY_SIZES, names=names, progress=False)["shapes_vqa"]
    manifest = json.loads((folder / "manifest.json").read_text())
    first = (folder / "train.json").stat().st_ino
    writer._generate(folder, manifest, lambda _: None)  # the slower process, after the faster one's rename
    assert (folder / "train.json").stat().st_ino == first  # the faster one's files were kept
    assert not [p for p in (tmp_path / "shapes").iterdir() if p.name.startswith(".")]

    # a run asking for seed 1 finds the seed-0 set stale, and another such run deletes it at the same moment
    reseeded = manifest | {"seed": 1}
    real_rmtree = writer.shutil.rmtree

    def racing_rmtree(path, ignore_errors=False, **kwargs):
        real_rmtree(path, ignore_errors=True)
        if Path(path) == folder and not ignore_errors:
            raise FileNotFoundError(path)  # what the loser of the race saw

    monkeypatch.setattr(writer.shutil, "rmtree", racing_rmtree)
    writer._generate(folder, reseeded, lambda _: None)
    assert json.loads((folder / "train.json").read_text())["info"]["seed"] == 1

    # a run with other settings got its folder in first: the error names the folder and says what to do
    monkeypatch.setattr(writer.shutil, "rmtree", lambda path, ignore_errors=False, **kwargs: None)  # cannot delete
    with pytest.raises(OSError, match=r"into place at .*shapes_vqa.*Give each its own root"):
        writer._generate(folder, manifest, lambda _: None)


def test_image_size_changes_pixels_not_layout(tmp_path: Path) -> None:
    sizes, names = {"train": 3, "val": 1}, ["shapes_caption"]
    small = make_shapes(tmp_path / "s", sizes=sizes, names=names, progress=False, image_size=64)[
        "shapes_caption"
    ]
    large = make_shapes(tmp_path / "l", sizes=sizes, names=names, progress=False, image_size=96)[
        "shapes_caption"
    ]
    assert Image.open(large / "images" / "train" / "000000.png").size == (96, 96)
    records = [json.loads((folder / "train.json").read_text())["records"] for folder in (small, large)]
    assert [r["scene"] for r in records[0]] == [r["scene"] for r in records[1]]


# ------------------------------------------------------------------------------------------------ registry


def test_every_shapes_spec_loads_through_the_registry(tmp_path: Path) -> None:
    write_tiny_shapes(tmp_path, seed=0)
    specs = list_specs("shapes")
    assert len(specs) == 12 and sum(spec.held_in for spec in specs) == 5
    assert len({spec.family for spec in specs}) >= 9
    rng = random.Random(0)
    for spec in specs:
        assert spec.splits == (("train", "val") if spec.held_in else ("val", "test")), spec.name
        for split in spec.splits:
            samples = load_samples(spec.name, tmp_path, split, strict=True)
            media_files = {s.video if spec.modality == "video" else s.image for s in samples}
            assert len(media_files) == TINY_SIZES[split], (spec.name, split)  # sizes count pictures (clips)
            several = spec.name == "shapes_vqa" and split == "train"  # VQAv2-like: several questions per picture
            assert (len(samples) > len(media_files)) if several else (len(samples) == len(media_files))
            assert len({s.sample_id for s in samples}) == len(samples)
            for sample in samples:
                assert sample.dataset == spec.name
                media = sample.video if spec.modality == "video" else sample.image
                assert media is not None and Path(media).is_file(), (spec.name, media)
                if spec.eval_mode == "rank":
                    assert sample.candidates and sample.candidates[sample.label] in sample.answers
                prompt = zero_shot_instruction(sample, spec)
                filled = fill_instruction(sample, spec.templates, rng)
                assert "{" not in prompt and "{" not in filled.instruction, (
                    spec.name,
                    prompt,
                    filled.instruction,
                )
                assert filled.target, (spec.name, sample.sample_id)


def test_missing_split_names_dataset_and_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"shapes_vsr.*shapes/shapes_vsr/test\.json"):
        load_samples("shapes_vsr", tmp_path, "test")


def test_malformed_records_are_named_or_counted(tmp_path: Path) -> None:
    annotation = tmp_path / "val.json"
    good = {"id": "ok", "image": "val/0.png", "question": "q?", "answers": ["a"]}
    bad = {"id": "broken", "image": "val/1.png", "answers": "a", "question": "q?"}
    out_of_range = {"id": "label", "image": "val/2.png", "answers": ["a"], "candidates": ["a"], "label": 3}
    annotation.write_text(json.dumps({"info": {"dataset": "shapes_x"}, "records": [good, bad, out_of_range]}))
    paths = {"val": annotation, "images": tmp_path / "images"}
    with pytest.raises(MalformedRecordError, match=r"val\.json: record broken: 'answers'"):
        read_shapes(paths, "val")
    skips = SkipCounter("shapes_x")
    samples = read_shapes(paths, "val", skips=skips)
    assert [s.sample_id for s in samples] == ["ok"] and skips.total == 2
    assert samples[0].image == str(tmp_path / "images" / "val" / "0.png")
    annotation.write_text("[1, 2]")
    with pytest.raises(ValueError, match="val.json: expected an object"):
        read_shapes(paths, "val")


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(tmp_path, image_size=65, progress=False)
    with pytest.raises(ValueError, match="unknown key 'tarin'"):
        make_shapes(tmp_path, sizes={"tarin": 3}, progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        make_shapes(tmp_path, sizes={"test": -1}, progress=False)
    with pytest.raises(KeyError, match="shapes_nope"):
        make_shapes(tmp_path, names=["shapes_nope"], progress=False)
    with pytest.raises(KeyError, match="shapes_vqa"):
        chance_level("vqav2")


# ------------------------------------------------------------------------------------------------ content


def _one(scene: Scene, color: str | None = None, shape: str | None = None) -> ShapeObject:
    matches = [o for o in scene.objects if color in (None, o.color) and shape in (None, o.shape)]
    assert len(matches) == 1, f"ambiguous reference color={color} shape={shape}: {matches}"
    return matches[0]


def _count(scene: Scene, color: str | None = None, shape: str | None = None) -> int:
    return sum(1 for o in scene.objects if color in (None, o.color) and shape in (None, o.shape))


def _expected_answer(sample: Sample) -> str:
    """The answer to ``sample.question`` worked out from the scene (and the context sentence)."""
    scene, q = _scene(sample), sample.question or ""
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        return _one(scene, shape=m[1]).color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        return _one(scene, color=m[1]).shape
    if q == "How many shapes are there?":
        return str(len(scene.objects))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        assert m[1] in COLORS
        return str(_count(scene, color=m[1]))
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        assert m[1] in SHAPES
        return str(_count(scene, shape=m[1]))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        return "yes" if _count(scene, m[1], m[2]) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) small or large\?", q):
        obj = _one(scene, m[1], m[2])
        return "small" if obj.r < 0.12 else "large"
    if m := re.fullmatch(r"Is the (\w+) (\w+) on the left or on the right of the picture\?", q):
        obj = _one(scene, m[1], m[2])
        assert abs(obj.x - 0.5) > 0.1, "side asked of a shape near the middle"
        return "left" if obj.x < 0.5 else "right"
    if m := re.fullmatch(r"How many corners does the (\w+) shape have\?", q):
        corners = {
            shape: "0" if n == "no" else n
            for shape, n in re.findall(r"A (\w+) has (\w+) corners", sample.context)
        }
        return corners[_one(scene, color=m[1]).shape]
    if m := re.fullmatch(r"How many shapes in the picture have a (warm|cool) color\?", q):
        listed = re.search(rf"([\w ,]+) are {m[1]} colors", sample.context)[1]
        palette = set(re.findall(r"[a-z]+", listed.lower())) - {"and"}
        assert len(palette) == 3, listed
        return str(sum(1 for o in scene.objects if o.color in palette))
    if m := re.fullmatch(r"What word is written at the (top|bottom) of the image\?", q):
        return scene.words[m[1]]
    if q in ("What word is written in the image?", "What is written on the picture?"):
        assert len(scene.words) == 1
        return next(iter(scene.words.values()))
    movers = [o for o in scene.objects if o.vx or o.vy]
    if m := re.fullmatch(r"In which direction is the (\w+) (\w+) moving\?", q):
        obj = _one(scene, m[1], m[2])
        assert movers == [obj]
        return ("left" if obj.vx < 0 else "right") if obj.vx else ("up" if obj.vy < 0 else "down")
    if q == "What color is the moving shape?":
        assert len(movers) == 1
        return movers[0].color
    if q == "What shape is moving?":
        assert len(movers) == 1
        return movers[0].shape
    raise AssertionError(f"{sample.dataset}: question form not covered by the test: {q!r}")


QA_DATASETS = (
    "shapes_vqa",
    "shapes_mcvqa",
    "shapes_ocrvqa",
    "shapes_iconqa",
    "shapes_scienceqa",
    "shapes_visdial",
    "shapes_msvdqa",
)


@pytest.mark.parametrize("name", QA_DATASETS)
def test_answers_match_the_scene(medium_root: Path, name: str) -> None:
    for split in get_spec(name).splits:
        samples = load_samples(name, medium_root, split, strict=True)
        for sample in samples:
            expected = _expected_answer(sample)
            assert set(sample.answers) == {expected}, (sample.sample_id, sample.question, sample.answers)
            if sample.candidates is not None:
                assert sample.candidates[sample.label] == expected
                assert len(set(sample.candidates)) == len(sample.candidates)
        if name == "shapes_vqa":
            assert {s.answers[0] for s in samples} >= {"yes", "no"}


def test_vqa_training_pictures_carry_several_questions_and_validation_pictures_one(medium_root: Path) -> None:
    from ibkit.shapes.tasks import VQA_TRAIN_QUESTIONS, WHOLE_COUNT_QUESTION

    train = load_samples("shapes_vqa", medium_root, "train", strict=True)
    by_picture: dict[str, list[Sample]] = {}
    for sample in train:
        by_picture.setdefault(sample.image, []).append(sample)
    assert len(by_picture) == MEDIUM["train"] and len({s.sample_id for s in train}) == len(train)
    for samples in by_picture.values():
        scene = _scene(samples[0])
        assert all(_scene(s) == scene for s in samples)
        kinds = [s.extra["question_type"] for s in samples]
        questions = [s.question for s in samples]
        assert len(set(questions)) == len(questions)  # never the same question twice about one picture
        # as many of each type as asked, where the scene has that many unambiguous questions
        shapes, colors = ([getattr(o, key) for o in scene.objects] for key in ("shape", "color"))
        supported = {
            "color": sum(shapes.count(o.shape) == 1 for o in scene.objects),  # "the circle" names one shape
            "shape": sum(colors.count(o.color) == 1 for o in scene.objects),  # "the red object" too
            "count": 1,
            "exists": 2,
            "size": len(scene.objects),
            "side": sum(abs(o.x - 0.5) >= 0.15 for o in scene.objects),  # away from the middle
        }
        assert {kind: kinds.count(kind) for kind in supported if kind != "count"} == {
            kind: min(most, supported[kind]) for kind, most in VQA_TRAIN_QUESTIONS.items() if kind != "count"
        }
        # every picture is asked how many shapes it shows, beside the drawn count question (unless that was it)
        whole = [s for s in samples if s.question == WHOLE_COUNT_QUESTION]
        assert len(whole) == 1 and whole[0].answers[0] == str(len(scene.objects))
        assert whole[0].extra["question_type"] == "count" and kinds.count("count") in (1, 2)
        assert sorted(s.answers[0] for s in samples if s.extra["question_type"] == "exists") == ["no", "yes"]
    val = load_samples("shapes_vqa", medium_root, "val", strict=True)
    assert len({s.image for s in val}) == len(val) == MEDIUM["val"]


def test_vqg_conditions_on_the_answer_and_targets_the_question(medium_root: Path) -> None:
    for sample in load_samples("shapes_vqg", medium_root, "train", strict=True):
        question_sample = Sample("x", "x", question=sample.target, extra=sample.extra)
        assert _expected_answer(question_sample) == sample.extra["answer"]
        assert sample.answers == [sample.target]


def test_spatial_statements_match_geometry(medium_root: Path) -> None:
    labels = []
    for split in ("val", "test"):
        for sample in load_samples("shapes_vsr", medium_root, split, strict=True):
            scene = _scene(sample)
            m = re.fullmatch(
                r"The (\w+) (\w+) is (to the left of|to the right of|above|below) the (\w+) (\w+)\.",
                sample.question,
            )
            assert m, sample.question
            a, b = _one(scene, m[1], m[2]), _one(scene, m[4], m[5])
            axis_a, axis_b = (a.x, b.x) if "left" in m[3] or "right" in m[3] else (a.y, b.y)
            # The statement's axis must not be borderline: the two shapes' extents are apart on it.
            assert abs(axis_a - axis_b) > a.r + b.r
            truth = {
                "to the left of": a.x < b.x,
                "to the right of": a.x > b.x,
                "above": a.y < b.y,
                "below": a.y > b.y,
            }[m[3]]
            assert sample.candidates[sample.label] == ("true" if truth else "false")
            labels.append(truth)
    assert 0.3 < sum(labels) / len(labels) < 0.7


def test_hateful_like_label_follows_text_and_colours(medium_root: Path) -> None:
    labels = []
    for sample in load_samples("shapes_hatefulmemes", medium_root, "test", strict=True):
        scene = _scene(sample)
        assert list(scene.words.values()) == [sample.question] == sample.ocr_tokens
        assert sample.candidates == ["no", "yes"]
        assert sample.label == int(any(o.color == sample.question for o in scene.objects))
        labels.append(sample.label)
    assert 0.3 < sum(labels) / len(labels) < 0.7


def test_captions_name_every_shape(medium_root: Path) -> None:
    for name in ("shapes_caption", "shapes_nocaps"):
        for split in get_spec(name).splits:
            for sample in load_samples(name, medium_root, split, strict=True):
                scene = _scene(sample)
                for caption in sample.answers:
                    named = re.findall(rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)})", caption)
                    assert sorted(named) == sorted((o.color, o.shape) for o in scene.objects), caption


def test_novel_pairs_never_appear_in_held_in_data(medium_root: Path) -> None:
    novel = {tuple(pair) for pair in NOVEL_PAIRS}
    novel_text = re.compile("|".join(f"{c} {s}" for c, s in novel))
    seen_colors, seen_shapes = set(), set()
    for (name, split), samples in _all_samples(medium_root, held_in=True).items():
        assert samples, (name, split)
        for sample in samples:
            pairs = {(o.color, o.shape) for o in _scene(sample).objects}
            assert not pairs & novel, (name, split, sample.sample_id)
            texts = [
                sample.question or "",
                sample.context or "",
                sample.target or "",
                *sample.answers,
                *(sample.candidates or []),
                str(sample.extra.get("answer", "")),
            ]
            assert not any(novel_text.search(text) for text in texts), (name, sample.sample_id, texts)
            seen_colors |= {c for c, _ in pairs}
            seen_shapes |= {s for _, s in pairs}
    assert seen_colors == set(COLORS) and seen_shapes == set(SHAPES)  # only the combinations are new
    for split in ("val", "test"):
        for sample in load_samples("shapes_nocaps", medium_root, split, strict=True):
            assert {(o.color, o.shape) for o in _scene(sample).objects} & novel, sample.sample_id


def test_shapes_never_overlap(medium_root: Path) -> None:
    for samples in _all_samples(medium_root).values():
        for sample in samples:
            scene = _scene(sample)
            for frame in range(scene.num_frames):
                objects = scene.frame(frame).objects
                for obj in objects:
                    assert obj.r <= obj.x <= 1 - obj.r and obj.r <= obj.y <= 1 - obj.r, sample.sample_id
                for i, a in enumerate(objects):
                    for b in objects[i + 1 :]:
                        apart = abs(a.x - b.x) > a.r + b.r or abs(a.y - b.y) > a.r + b.r
                        assert apart, (sample.sample_id, frame, a, b)


# ------------------------------------------------------------------------------------------------ media


def test_videos_decode_and_show_the_motion(medium_root: Path) -> None:
    samples = load_samples("shapes_msvdqa", medium_root, "val", strict=True)[:8]
    for sample in samples:
        with av.open(sample.video) as container:
            assert sum(1 for _ in container.decode(video=0)) >= 4
        frames = load_video_frames(sample.video, num_frames=4)
        assert len(frames) == 4 and frames[0].size == (64, 64)
        mover = next(o for o in _scene(sample).objects if o.vx or o.vy)
        colour = np.array(COLORS[mover.color], dtype=float)
        centroids = []
        for frame in (frames[0], frames[-1]):
            pixels = np.asarray(frame, dtype=float)
            ys, xs = np.nonzero(np.abs(pixels - colour).max(axis=-1) < 40)
            assert len(xs) > 10, sample.sample_id
            centroids.append((xs.mean(), ys.mean()))
        (x0, y0), (x1, y1) = centroids
        shift = (x1 - x0) if mover.vx else (y1 - y0)
        velocity = mover.vx or mover.vy
        assert np.sign(shift) == np.sign(velocity) and abs(shift) > 3, (sample.sample_id, shift)


def test_rendered_pixels_follow_the_scene() -> None:
    scene = Scene(
        (
            ShapeObject("red", "circle", "large", 0.3, 0.5, 0.15),
            ShapeObject("blue", "square", "small", 0.75, 0.5, 0.1),
        ),
        (245, 245, 245),
        {"top": "milk"},
    )
    pixels = np.asarray(render_image(scene, 64)).astype(int)
    assert np.abs(pixels[32, int(0.3 * 64)] - COLORS["red"]).max() < 10
    assert np.abs(pixels[32, int(0.75 * 64)] - COLORS["blue"]).max() < 10
    assert np.abs(pixels[60, 2] - 245).max() == 0  # background corner
    band = pixels[: int(0.2 * 64)]
    assert (band.max(axis=-1) < 100).sum() > 20  # dark text in the top band
    assert (pixels[int(0.8 * 64) :].max(axis=-1) < 100).sum() == 0  # nothing written at the bottom


def test_scene_text_is_readable_size_at_larger_images() -> None:
    scene = Scene((), (245, 245, 245), {"bottom": "rose"})
    small, big = (np.asarray(render_image(scene, size)).max(axis=-1) < 100 for size in (64, 224))
    assert big.sum() > 4 * small.sum() > 0  # the bitmap font is scaled up with the image


# ------------------------------------------------------------------------------------------------ chance


def test_chance_levels_match_the_candidates(medium_root: Path) -> None:
    rng = random.Random(0)
    for spec in list_specs("shapes"):
        if spec.held_in:
            continue
        level = chance_level(spec.name)
        samples = load_samples(spec.name, medium_root, "test", strict=True)
        if spec.metric == "cider":
            assert level == 0.0
        elif spec.metric == "auc":
            assert level == 0.5
        elif spec.metric == "mrr":  # simulate random rankings rather than restating the formula
            ranks = [
                rng.sample(range(len(s.candidates)), len(s.candidates)).index(s.label) + 1
                for s in samples
                for _ in range(200)
            ]
            assert abs(level - np.mean([1 / r for r in ranks])) < 0.01
        else:
            assert level == pytest.approx(np.mean([1 / len(s.candidates) for s in samples]))


def test_every_generated_word_has_a_fixed_id(medium_root: Path) -> None:
    """The shipped word list covers what the generators and templates write (append a new word to it, at the
    end), and the tokenizers' ids follow the list, whatever the data's word counts."""
    from ibkit.shapes.datamodule import (
        LLM_SPECIALS,
        QFORMER_SPECIALS,
        _annotation_texts,
        _template_texts,
        corpus_words,
        write_tiny_tokenizers,
    )
    from ibkit.shapes.vocabulary import SHAPES_WORDS

    assert len(set(SHAPES_WORDS)) == len(SHAPES_WORDS)
    words = corpus_words(_template_texts() + _annotation_texts(medium_root))
    assert set(words) - set(SHAPES_WORDS) == set()
    paths = write_tiny_tokenizers(medium_root, medium_root / "tokenizers_fixed_ids")
    for name, specials in (("llm", LLM_SPECIALS), ("qformer", QFORMER_SPECIALS)):
        vocab = json.loads((paths[name] / "tokenizer.json").read_text())["model"]["vocab"]
        assert list(vocab) == [*specials, *SHAPES_WORDS]
        assert [vocab[w] for w in SHAPES_WORDS] == list(range(len(specials), len(specials) + len(SHAPES_WORDS)))


def test_known_words_keep_their_ids_when_counts_change() -> None:
    from ibkit.shapes.datamodule import LLM_SPECIALS, build_vocabulary

    known = ("circle", "square", "left")
    texts = ["a red circle on the left", "a square"]
    skewed = texts + ["square square square left left"] * 5 + ["purple"]
    by_count = build_vocabulary(texts, 16, LLM_SPECIALS), build_vocabulary(skewed, 16, LLM_SPECIALS)
    assert by_count[0]["circle"] != by_count[1]["circle"]  # ordered by counts, a count change moves the ids
    fixed = build_vocabulary(texts, 16, LLM_SPECIALS, known), build_vocabulary(skewed, 16, LLM_SPECIALS, known)
    for vocab in fixed:
        assert [vocab[w] for w in (*LLM_SPECIALS, *known)] == list(range(7))
    assert fixed[1]["purple"] >= 7  # a word the list lacks comes after it: nothing is lost
    assert list(build_vocabulary(skewed, 8, LLM_SPECIALS, known)) == [*LLM_SPECIALS, *known, "a"]
    with pytest.raises(ValueError, match="smaller than the 7 special and known words"):
        build_vocabulary(texts, 6, LLM_SPECIALS, known)
