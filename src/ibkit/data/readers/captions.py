"""Captioning readers: COCO Caption, Web CapFilt, TextCaps, NoCaps, Flickr30K.

Convention: the ``train`` split gives one sample per caption (as LAVIS does, so every caption is
seen each epoch); evaluation splits give one sample per image with every reference caption in
``answers`` and ``target`` left for the template stage.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ibkit.data.errors import SkipCounter
from ibkit.data.readers.common import (
    AnnotationFileError,
    BadRecord,
    convert_records,
    counter_for,
    expect,
    expect_str,
    expect_str_list,
    expect_top,
    image_suffix,
    load_json,
    media_path,
    under,
)
from ibkit.data.readers.ocr import load_ocr_tokens
from ibkit.data.sample import Sample

_COCO_FILE = re.compile(r"COCO_(?P<subset>[a-z]+\d{4})_(?P<id>\d+)\.jpg$")


def _captions(value: Any, key: str = "caption") -> list[str]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"field {key!r} is empty")
        return [value]
    if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return value
    raise BadRecord(f"field {key!r} should be a caption string or a non-empty list of strings")


def _coco_id_from_path(image: str) -> str:
    match = _COCO_FILE.search(image)
    return str(int(match.group("id"))) if match else Path(image).stem


def _caption_samples(
    dataset: str, split: str, sample_id: str, image: str, captions: list[str], extra: dict[str, Any]
) -> list[Sample]:
    if split == "train":
        if len(captions) == 1:
            return [
                Sample(dataset, sample_id, image=image, answers=captions, target=captions[0], extra=extra)
            ]
        return [
            Sample(dataset, f"{sample_id}#{k}", image=image, answers=[c], target=c, extra=dict(extra))
            for k, c in enumerate(captions)
        ]
    return [Sample(dataset, sample_id, image=image, answers=list(captions), extra=extra)]


def read_coco_caption(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """Karpathy JSON (BLIP/LAVIS list) or the original ``captions_*2014.json`` (COCO object)."""
    dataset, path = "coco_caption", paths[split]
    skips = counter_for(skips, dataset)
    data = load_json(path, dataset)
    images_root = paths["images"]
    if isinstance(data, dict) and "annotations" in data:
        return _read_coco_official(data, path, split, images_root, skips)
    records = expect_top(data, list, path, dataset)

    def convert(index: int | str, record: Any) -> list[Sample]:
        image = expect_str(record, "image")
        captions = _captions(expect(record, "caption", (str, list)))
        raw_id = record.get("image_id")
        image_id = str(raw_id).removeprefix("coco_") if raw_id is not None else _coco_id_from_path(image)
        sample_id = f"{image_id}#{index}" if split == "train" else image_id
        return _caption_samples(
            dataset, split, sample_id, media_path(images_root, image), captions, {"image_id": image_id}
        )

    return convert_records(enumerate(records), path, skips, convert, id_keys=("image_id", "image"))


def _read_coco_official(
    data: dict, path: Path, split: str, images_root: Path, skips: SkipCounter
) -> list[Sample]:
    dataset = "coco_caption"
    images = expect_top(data, list, path, dataset, key="images")
    annotations = expect_top(data, list, path, dataset, key="annotations")
    file_names: dict[int, str] = {}

    def add_image(index: int | str, record: Any) -> None:
        file_names[expect(record, "id", int)] = expect_str(record, "file_name")

    convert_records(enumerate(images), path, skips, add_image, id_keys=("id",))
    captions: dict[int, list[str]] = defaultdict(list)

    def add_caption(index: int | str, record: Any) -> None:
        image_id = expect(record, "image_id", int)
        if image_id not in file_names:
            raise BadRecord(f"image_id {image_id} is not in 'images'")
        captions[image_id].append(expect_str(record, "caption"))

    convert_records(enumerate(annotations), path, skips, add_caption, id_keys=("id",))
    samples = []
    for image_id, file_name in file_names.items():
        match = _COCO_FILE.search(file_name)
        relative = f"{match.group('subset')}/{file_name}" if match else file_name
        if captions.get(image_id):
            samples += _caption_samples(
                dataset,
                split,
                str(image_id),
                under(images_root, relative),
                captions[image_id],
                {"image_id": str(image_id)},
            )
    return samples


def capfilt_image_name(url: str) -> str:
    """Local file name of a CapFilt image: no official layout exists, so ibkit fixes ``<sha1(url)><ext>``."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest() + image_suffix(url)


def read_capfilt(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """``[{"url", "caption"}]`` (BLIP release) or ``[{"image", "caption"}]`` (LAVIS capfilt14m)."""
    dataset, path = "capfilt", paths[split]
    skips = counter_for(skips, dataset)
    records = expect_top(load_json(path, dataset), list, path, dataset)
    images_root = paths["images"]

    def convert(index: int | str, record: Any) -> Sample:
        caption = expect_str(record, "caption")
        if isinstance(record.get("image"), str):
            image = media_path(images_root, record["image"])
            extra = {}
        else:
            url = expect_str(record, "url")
            image = under(images_root, capfilt_image_name(url))
            extra = {"url": url}
        return Sample(dataset, str(index), image=image, answers=[caption], target=caption, extra=extra)

    return convert_records(enumerate(records), path, skips, convert, id_keys=("url", "image"))


def read_textcaps(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """``TextCaps_0.1_{split}.json`` (``{"data": [...]}`` one entry per caption) + Rosetta OCR tokens."""
    dataset, path = "textcaps", paths[split]
    skips = counter_for(skips, dataset)
    records = expect_top(load_json(path, dataset), list, path, dataset, key="data")
    ocr = load_ocr_tokens([paths[r] for r in ("ocr_train", "ocr_val", "ocr_test") if r in paths], dataset)
    images_root = paths["images"]
    seen_images: set[str] = set()

    def convert(index: int | str, record: Any) -> Sample | None:
        image_id = expect_str(record, "image_id")
        folder = "test_images" if record.get("set_name", split) == "test" else "train_images"
        tokens = record.get("ocr_tokens") if isinstance(record.get("ocr_tokens"), list) else ocr.get(image_id)
        common = dict(image=under(images_root, folder, f"{image_id}.jpg"), ocr_tokens=tokens)
        extra = {"image_id": image_id, "image_classes": record.get("image_classes", [])}
        if split == "train":
            caption = expect_str(record, "caption_str")
            caption_id = record.get("caption_id", index)
            return Sample(
                dataset, f"{image_id}#{caption_id}", answers=[caption], target=caption, extra=extra, **common
            )
        if image_id in seen_images:
            return None  # evaluation: one sample per image, references from reference_strs
        if "reference_strs" in record:
            references = expect_str_list(record, "reference_strs")
        elif "caption_str" in record:
            references = [expect_str(record, "caption_str")]
        else:
            references = []  # test split: no captions
        seen_images.add(image_id)
        return Sample(dataset, image_id, answers=list(references), extra=extra, **common)

    return convert_records(enumerate(records), path, skips, convert, id_keys=("caption_id", "image_id"))


def read_nocaps(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """Official COCO-style ``nocaps_{val_4500_captions,test_image_info}.json``, or the LAVIS list."""
    dataset, path = "nocaps", paths[split]
    skips = counter_for(skips, dataset)
    data = load_json(path, dataset)
    images_root = paths["images"]
    if isinstance(data, list):  # LAVIS nocaps_{val,test}.json

        def convert_lavis(index: int | str, record: Any) -> Sample:
            image = expect_str(record, "image")
            captions = _captions(record["caption"]) if record.get("caption") else []
            image_id = str(record.get("img_id", Path(image).stem))
            return Sample(dataset, image_id, image=media_path(images_root, image), answers=captions)

        return convert_records(enumerate(data), path, skips, convert_lavis, id_keys=("img_id", "image"))

    images = expect_top(data, list, path, dataset, key="images")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise AnnotationFileError(f"{dataset}: {path}: 'annotations' should be a list")
    captions: dict[int, list[str]] = defaultdict(list)

    def add_caption(index: int | str, record: Any) -> None:
        captions[expect(record, "image_id", int)].append(expect_str(record, "caption"))

    convert_records(enumerate(annotations), path, skips, add_caption, id_keys=("id",))

    def convert(index: int | str, record: Any) -> Sample:
        image_id = expect(record, "id", int)
        file_name = expect_str(record, "file_name")
        extra = {key: record[key] for key in ("open_images_id", "domain") if key in record}
        return Sample(
            dataset,
            str(image_id),
            image=under(images_root, split, file_name),
            answers=captions.get(image_id, []),
            extra=extra,
        )

    return convert_records(enumerate(images), path, skips, convert, id_keys=("id", "open_images_id"))


def read_flickr30k(paths: dict[str, Path], split: str, skips: SkipCounter | None = None) -> list[Sample]:
    """Karpathy ``dataset_flickr30k.json`` (``{"images": [...]}``, split per image), or the LAVIS lists."""
    dataset, path = "flickr30k", paths[split]
    skips = counter_for(skips, dataset)
    data = load_json(path, dataset)
    images_root = paths["images"]
    if isinstance(data, list):  # LAVIS flickr30k_{train,val,test}.json: image paths include flickr30k-images/
        lavis_root = images_root.parent

        def convert_lavis(index: int | str, record: Any) -> list[Sample]:
            image = expect_str(record, "image")
            captions = _captions(expect(record, "caption", (str, list)))
            image_id = str(record.get("image_id", Path(image).stem))
            sample_id = f"{image_id}#{index}" if split == "train" else image_id
            return _caption_samples(dataset, split, sample_id, media_path(lavis_root, image), captions, {})

        return convert_records(enumerate(data), path, skips, convert_lavis, id_keys=("image_id", "image"))

    images = expect_top(data, list, path, dataset, key="images")
    wanted = {"train": ("train", "restval")}.get(split, (split,))

    def convert(index: int | str, record: Any) -> list[Sample] | None:
        if expect(record, "split", str) not in wanted:
            return None
        file_name = expect_str(record, "filename")
        sentences = expect(record, "sentences", list)
        captions = [expect_str(sentence, "raw") for sentence in sentences]
        if not captions:
            raise BadRecord("no sentences")
        image_id = str(record.get("imgid", Path(file_name).stem))
        return _caption_samples(
            dataset, split, image_id, under(images_root, file_name), captions, {"file_name": file_name}
        )

    return convert_records(enumerate(images), path, skips, convert, id_keys=("imgid", "filename"))
