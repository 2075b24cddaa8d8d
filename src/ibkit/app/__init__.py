"""The ``ibkit`` command: the application on top of the ibkit library.

:data:`COMMANDS` is the one table of sub-commands. ``fit``/``validate``/``test`` are LightningCLI's
(``--config`` stacking, ``--print_config``, dotted overrides); every other command is
a typed function whose signature and docstring jsonargparse turns into options (``ibkit COMMAND
--help``). Add a command by adding a function here. From Python, the same configurations are built
and run by :func:`build_from_config` and :func:`run_lightning` (:mod:`ibkit.app.config`).
``predict`` is a typed command (a file of questions -> a JSONL of answers, resumable), not Lightning's:
the zero-shot predictions of a configuration's datasets are what ``ibkit test`` writes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ibkit.app.bench import bench, memory
from ibkit.app.commands import Command, Entry, Group, Lightning, UsageError, run_entry, usage_lines
from ibkit.app.convert import convert_lavis
from ibkit.app.data import cache_features, data_check, data_list
from ibkit.app.export import export

COMMANDS: dict[str, Entry] = {
    "fit": Lightning("train: ibkit fit --config configs/trainer/gpu1.yaml --config configs/experiments/instructblip_flant5xl.yaml"),
    "validate": Lightning("evaluate on the validation loaders"),
    "test": Lightning("evaluate on the test loaders"),
    # answering questions: typed commands over one Assistant (model + processor + generation settings)
    "predict": Command("ibkit.app.predict:predict", help="answer a file of questions (or a folder of images) -> JSONL, resumable"),
    "chat": Command("ibkit.app.chat:chat", help="ask a model about images in the terminal (/image PATH, /help)",
                    positional=True),
    "serve": Command("ibkit.app.serve:serve", help="a local web page + JSON API over a model, on 127.0.0.1",
                     positional=True),
    "data": Group(
        {
            "list": Command(data_list),
            "check": Command(data_check),
            "cache-features": Command(cache_features, training_config=True),
        },
        help="list the registered datasets / check which ones a data root holds / cache encoder features",
    ),
    "convert": Group(
        {"lavis": Command(convert_lavis)},
        help="convert LAVIS InstructBLIP/BLIP-2 checkpoints to ibkit/transformers folders",
        what="source",
    ),
    "export": Command(export, training_config=True),
    "bench": Command(bench, help="throughput/memory benchmark against transformers' InstructBLIP"),
    "memory": Command(memory, help="expected GPU memory of the paper's models per strategy (meta device)"),
    # the shapes package drives the public commands itself; the application only names it
    "demo": Command("ibkit.shapes.demo:demo", help="the whole method end to end on the CPU, on the shapes data"),
}

_CONFIG_NAMES = ("build_from_config", "run_lightning", "parse_config", "build_cli")


def usage() -> str:
    return "\n".join([
        "usage: ibkit COMMAND [options]   (ibkit COMMAND --help: the command's options)",
        "",
        "commands:",
        *usage_lines(COMMANDS),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ibkit`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv[0]
    if command in ("-V", "--version"):
        from ibkit import __version__

        print(f"ibkit {__version__}")
        return 0
    if command not in COMMANDS:
        print(f"ibkit: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_entry([command], COMMANDS[command], argv[1:])


def __getattr__(name: str) -> Any:
    """The configuration functions of :mod:`ibkit.app.config`, imported (with Lightning) on first use."""
    if name in _CONFIG_NAMES:
        from ibkit.app import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["COMMANDS", "Command", "Group", "Lightning", "UsageError", "main", "usage", *_CONFIG_NAMES]
