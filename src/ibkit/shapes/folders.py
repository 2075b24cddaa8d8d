"""Moving a freshly written shapes set into place: shared by the image sets' writer and the text corpus."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


def holds_set(folder: Path, manifest: dict, splits: Iterable[str]) -> bool:
    """``folder`` holds the set ``manifest`` describes: the same manifest.json and every split's annotation file."""
    try:
        written = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return written == manifest and all((folder / f"{split}.json").is_file() for split in splits)


def move_into_place(scratch: Path, folder: Path, current: Callable[[], bool]) -> None:
    """Replace ``folder`` by the freshly written ``scratch``, safe against another process writing the same set.

    Two runs started side by side on one root both find a set missing or stale and both write it. The one that
    finishes second keeps the first one's folder (``current()`` says it holds this very set; a run may be reading
    its files) instead of deleting it, and a stale folder that the other process deletes at the same moment is no
    error."""
    if current():
        shutil.rmtree(scratch, ignore_errors=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    try:
        scratch.rename(folder)
    except OSError as error:
        if not current():  # the other process moved its copy in between: keep it, unless it is not this set
            raise OSError(f"could not move the new {folder.name} ({scratch}) into place at {folder}: {error}. Is "
                          "another run writing this root with other settings (seed, sizes)? Give each its own root."
                          ) from error
        shutil.rmtree(scratch, ignore_errors=True)
