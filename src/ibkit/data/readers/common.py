"""Helpers shared by the readers: file loading, field checks, skip-and-count record loops."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ibkit.data.errors import SkipCounter
from ibkit.data.sample import Sample

T = TypeVar("T")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


class BadRecord(ValueError):
    """Raised inside a record conversion: the record is skipped (or, when strict, reported)."""


class AnnotationFileError(ValueError):
    """A whole annotation file is unreadable or has the wrong top-level structure."""


def counter_for(skips: SkipCounter | None, dataset: str) -> SkipCounter:
    """The caller's counter, or a fresh lenient one when a reader is called directly."""
    return skips if skips is not None else SkipCounter(dataset)


def load_json(path: Path, dataset: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{dataset}: annotation file not found: expected {path}") from None
    except json.JSONDecodeError as error:
        raise AnnotationFileError(f"{dataset}: {path} is not valid JSON: {error}") from None


def load_jsonl(path: Path, dataset: str, skips: SkipCounter) -> list[tuple[int, Any]]:
    """(line number, object) per non-empty line; an unparsable line is a malformed record."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append((line_number, json.loads(line)))
                except json.JSONDecodeError as error:
                    skips.skip(path, f"line {line_number}", f"invalid JSON ({error.msg})")
    except FileNotFoundError:
        raise FileNotFoundError(f"{dataset}: annotation file not found: expected {path}") from None
    return records


def expect(container: Any, key: str, kind: type | tuple[type, ...], dataset_file: Path | None = None) -> Any:
    """``container[key]`` checked for presence and type; wrong data raises ``BadRecord``."""
    if not isinstance(container, dict):
        raise BadRecord(f"expected an object, got {type(container).__name__}")
    if key not in container or container[key] is None:
        raise BadRecord(f"missing field {key!r}")
    value = container[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int,))):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRecord(f"field {key!r} should be {names}, got {type(value).__name__}")
    return value


def expect_str(container: Any, key: str) -> str:
    value = expect(container, key, str)
    if not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def expect_str_list(container: Any, key: str, allow_empty: bool = False) -> list[str]:
    value = expect(container, key, list)
    if not allow_empty and not value:
        raise BadRecord(f"field {key!r} is an empty list")
    if not all(isinstance(item, str) for item in value):
        raise BadRecord(f"field {key!r} should hold strings")
    return value


def expect_top(data: Any, kind: type, path: Path, dataset: str, key: str | None = None) -> Any:
    """Top-level structure check: a wrong one means the wrong file, so it is an error, not a skip."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise AnnotationFileError(f"{dataset}: {path}: expected a JSON object with key {key!r}")
        data = data[key]
    if not isinstance(data, kind):
        where = f"[{key!r}]" if key else "top level"
        raise AnnotationFileError(
            f"{dataset}: {path}: {where} should be a JSON {kind.__name__}, got {type(data).__name__}"
        )
    return data


def record_label(index: int | str, record: Any, id_keys: Sequence[str]) -> str:
    """``"12 (question_id=345)"``: the position plus the record's own id when it has one."""
    if isinstance(record, dict):
        for key in id_keys:
            if key in record and isinstance(record[key], (str, int)):
                return f"{index} ({key}={record[key]})"
    return str(index)


def convert_records(
    records: Iterable[tuple[int | str, Any]],
    path: Path,
    skips: SkipCounter,
    convert: Callable[[int | str, Any], Sample | list[Sample] | None],
    id_keys: Sequence[str] = (),
) -> list[Sample]:
    """Run ``convert`` on every record; a malformed one is skipped and counted (or raised when strict).

    Record data is arbitrary JSON, so type and lookup errors inside ``convert`` count as malformed
    records too; anything else (a bug) propagates.
    """
    samples: list[Sample] = []
    for index, record in records:
        try:
            result = convert(index, record)
        except (BadRecord, KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            reason = str(error) if isinstance(error, BadRecord) else f"{type(error).__name__}: {error}"
            skips.skip(path, record_label(index, record, id_keys), reason)
            continue
        if result is None:
            continue
        if isinstance(result, Sample):
            samples.append(result)
        else:
            samples.extend(result)
    return samples


def image_suffix(url_or_name: str, default: str = ".jpg") -> str:
    """The image extension of a URL or file name (query strings ignored)."""
    suffix = Path(url_or_name.split("?")[0].split("#")[0]).suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else default


def under(root: Path, *parts: str) -> str:
    """Absolute media path as a string (``Sample.image`` holds strings)."""
    return str(Path(root).joinpath(*parts))


def media_path(root: Path, relative_or_absolute: str) -> str:
    path = Path(relative_or_absolute)
    return str(path if path.is_absolute() else Path(root) / path)


def coco2014_name(subset: str, image_id: int) -> str:
    """``val2014`` + 42 -> ``val2014/COCO_val2014_000000000042.jpg``."""
    return f"{subset}/COCO_{subset}_{int(image_id):012d}.jpg"


def as_int(value: Any, field_name: str) -> int:
    if isinstance(value, bool):
        raise BadRecord(f"field {field_name!r} should be an integer, got bool")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRecord(f"field {field_name!r} should be an integer, got {value!r}") from None
