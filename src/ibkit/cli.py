"""The ``ibkit`` command.

``ibkit fit|validate|test|predict`` are LightningCLI's subcommands (``--config`` stacking,
``--print_config``, dotted overrides, ``--help``) over :class:`ibkit.training.InstructBLIPModule`
and any LightningDataModule chosen by ``class_path``. Every other subcommand (``data``, ``convert``,
``export``, ``bench``, ``demo``) is a small argparse program in :data:`TOOLS`; add one there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def build_cli(args: Sequence[str] | None, run: bool = True) -> Any:
    """A LightningCLI over InstructBLIPModule + any datamodule; ``run=False`` only parses and instantiates."""
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from ibkit.training.module import InstructBLIPModule

    if args is not None:
        args = list(args)
        if not run and args and args[0] in LIGHTNING_COMMANDS:
            args = args[1:]  # without run there are no subcommands
    with warnings.catch_warnings():
        # in-process calls (tests, notebooks, `ibkit export`) pass args while sys.argv holds something else
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return LightningCLI(
            InstructBLIPModule,
            LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            # ibkit's datamodules split the data across ranks themselves (resumable mixture stream)
            trainer_defaults={"use_distributed_sampler": False},
            args=args,  # None: LightningCLI reads sys.argv itself
            run=run,
        )


def parse_config(args: Sequence[str]) -> tuple[Any, Any]:
    """(parser, config) of ``ibkit`` arguments, parsed and validated but nothing instantiated or run.

    With a leading ``fit``/``validate``/... the subcommand's parser and config (``ckpt_path`` included,
    as ``--print_config`` writes it); without, the plain configuration. For checks and tools that must
    not build models or trainers (configs for GPUs this machine lacks).
    """
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from ibkit.training.module import InstructBLIPModule

    class ParseOnlyCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            return None

        def _run_subcommand(self, subcommand: str) -> None:
            return None

    args = list(args)
    subcommand = args[0] if args and args[0] in LIGHTNING_COMMANDS else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = ParseOnlyCLI(
            InstructBLIPModule,
            LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            trainer_defaults={"use_distributed_sampler": False},
            args=args,
            run=subcommand is not None,
        )
    if subcommand is None:
        return cli.parser, cli.config
    return cli._subcommand_parsers[subcommand], cli.config[subcommand]


# ----------------------------------------------------------------------------------------- tools
def _data(argv: list[str]) -> int:
    from ibkit.data.catalog import main as data_main

    return int(data_main(argv) or 0)


def _convert(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ibkit convert lavis --checkpoint FILE --llm DIR --output DIR [...]\n"
              "  (ibkit convert lavis --help for all options)")
        return 0 if argv else 2
    if argv[0] != "lavis":
        print(f"ibkit convert: unknown source {argv[0]!r}; available: lavis", file=sys.stderr)
        return 2
    argv = argv[1:]
    try:
        lavis = importlib.import_module("ibkit.convert.lavis")
    except ImportError:
        print("ibkit convert: LAVIS conversion is not available in this installation", file=sys.stderr)
        return 2
    entry = getattr(lavis, "main", None)
    if entry is None:
        print("ibkit convert: ibkit.convert.lavis has no main()", file=sys.stderr)
        return 2
    return int(entry(argv) or 0)


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ibkit export",
        description="Write a checkpoint's model as a transformers InstructBlip folder. Every other option "
        "(--config FILE, --model.x=..., --data.y=...) is the training configuration, as given to `ibkit fit`.",
    )
    parser.add_argument("--ckpt_path", required=True,
                        help="a .ckpt file, or a checkpoint folder (its best checkpoint, else last.ckpt)")
    parser.add_argument("--output", required=True, type=Path, help="folder to write")
    parser.add_argument("--no_processor", action="store_true", help="do not save the tokenizers/processor")
    args, config_args = parser.parse_known_args(argv)
    if not config_args:
        parser.error("give the training configuration, e.g. --config configs/experiments/instructblip_flant5xl.yaml")
    from ibkit.training.export import export_checkpoint

    out = export_checkpoint(config_args, args.ckpt_path, args.output, with_processor=not args.no_processor)
    print(f"wrote {out}")
    return 0


def _optional(module: str, what: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        try:
            entry = importlib.import_module(module).main
        except (ImportError, AttributeError):
            print(f"ibkit: `{what}` is not available in this installation ({module}.main)", file=sys.stderr)
            return 2
        return int(entry(argv) or 0)

    return run


# name -> (handler taking the remaining argv, one-line help). Add new subcommands here.
TOOLS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "data": (_data, "list the registered datasets / check which ones a data root holds"),
    "convert": (_convert, "convert LAVIS InstructBLIP/BLIP-2 checkpoints to ibkit/transformers folders"),
    "export": (_export, "write a training checkpoint as a transformers-loadable model folder"),
    "bench": (_optional("ibkit.bench", "bench"), "throughput/memory benchmark"),
    "demo": (_optional("ibkit.shapes.demo", "demo"), "interactive demo"),
}


def usage() -> str:
    lines = [
        "usage: ibkit COMMAND [options]",
        "",
        "training and evaluation (LightningCLI; `ibkit fit --help` for all options):",
        "  fit        train:     ibkit fit --config configs/trainer/gpu1.yaml --config configs/experiments/instructblip_flant5xl.yaml",
        "  validate   evaluate on the validation loaders",
        "  test       evaluate on the test loaders",
        "  predict    write predictions",
        "",
        "tools:",
    ]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv[0]
    if command in ("-V", "--version"):
        from ibkit import __version__

        print(f"ibkit {__version__}")
        return 0
    if command in LIGHTNING_COMMANDS:
        build_cli(None if from_sys else argv, run=True)
        return 0
    if command in TOOLS:
        return TOOLS[command][0](argv[1:])
    print(f"ibkit: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
