"""Moving a freshly written shapes set into place (shared by the image sets' writer and the text corpus), and
holding a demo's output folder for one run at a time."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ibkit.data.feature_store import process_alive

LOCK_NAME = ".ibkit-demo.lock"  # in a demo's output folder while a run writes there


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


def _holder_alive(holder: dict) -> bool:
    """Whether the run that wrote a lock may still be running: False only when it is sure it is not (a process
    of this machine that no longer exists); a lock of another machine, or unreadable, counts as held."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int) or os.name == "nt":
        return True  # no way to look at another machine's processes (nor, without killing it, a Windows one)
    return process_alive(holder["pid"])


@contextlib.contextmanager
def claimed(folder: Path) -> Iterator[None]:
    """Hold ``folder`` (created if missing) for one run: a second run on the same folder stops before its first
    step, naming the first one, instead of both writing the same checkpoints, data and results.

    The lock is a file (:data:`LOCK_NAME`) created only where none exists, removed when the run ends however it
    ends. One left by a run that was killed (its process gone from this machine) is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    mine = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            with open(lock, "x") as file:  # "x": create, or fail when it exists (atomic)
                json.dump(mine, file)
            break
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except FileNotFoundError:
                continue  # released in between: try again
            except (OSError, ValueError):
                holder = {}  # being written by a run that is starting
            if _holder_alive(holder):
                raise RuntimeError(
                    f"{folder} is in use by another ibkit demo (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}): wait for it to end, or give --output_dir another folder. If no such "
                    f"run exists any more, delete {lock}.") from None
            lock.unlink(missing_ok=True)  # a killed run's: take it over
    else:
        raise RuntimeError(f"could not take {lock}: other runs keep claiming {folder}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()) == mine:  # never remove another run's lock
                lock.unlink()
