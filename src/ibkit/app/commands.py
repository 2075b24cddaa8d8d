"""How the ``ibkit`` command turns its table of typed functions into parsers and runs one.

A command is a plain function whose signature (type hints, defaults) and docstring (``Args:``) are
its command-line options, parsed by jsonargparse as LightningCLI parses ``ibkit fit``. Only the
chosen command's parser is built, so a command whose module cannot be imported fails alone.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class UsageError(ValueError):
    """Arguments a command cannot work with; on the command line: the usage and the message, exit code 2."""


@dataclass(frozen=True)
class Lightning:
    """A LightningCLI subcommand (``ibkit fit`` ...): its parser comes from the module and datamodule classes."""

    help: str


@dataclass(frozen=True)
class Command:
    """A typed function as a command.

    ``target``: the function, or ``"module:function"`` to import when the command runs (a part of
    ibkit the application does not import otherwise). ``help``: one line for ``ibkit --help``
    (default: the docstring's first line). ``training_config``: the command also takes a training
    configuration (``--config``, ``--model.*``, ``--data.*``, ``--trainer.*``, as ``ibkit fit``) and
    receives the ``module`` and ``datamodule`` it builds. ``positional``: required parameters are
    positional arguments (``ibkit chat MODEL_DIR``) instead of required options.
    """

    target: Callable[..., Any] | str
    help: str | None = None
    training_config: bool = False
    positional: bool = False

    def function(self) -> Callable[..., Any]:
        if callable(self.target):
            return self.target
        module_name, _, name = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as error:
            raise LookupError(f"{self.target} is not available ({type(error).__name__}: {error})") from error

    def summary(self) -> str:
        if self.help is not None:
            return self.help
        return (inspect.getdoc(self.function()) or "").split("\n", 1)[0].rstrip(".")


@dataclass(frozen=True)
class Group:
    """Commands under one name (``ibkit data list``); ``what`` names them in errors ("unknown source")."""

    commands: Mapping[str, Entry]
    help: str
    what: str = "command"


Entry = Lightning | Command | Group


def usage_lines(commands: Mapping[str, Entry], indent: int = 2) -> list[str]:
    """One line per command (groups with their commands indented below)."""
    lines = []
    for name, entry in commands.items():
        summary = entry.summary() if isinstance(entry, Command) else entry.help
        lines.append(f"{' ' * indent}{name:<{20 - indent}} {summary}")
        if isinstance(entry, Group):
            lines += usage_lines(entry.commands, indent + 2)
    return lines


def description(function: Callable[..., Any]) -> str:
    """The docstring without its ``Args:`` section (jsonargparse puts those on the options)."""
    return (inspect.getdoc(function) or "").split("\nArgs:", 1)[0].strip()


def run_entry(path: Sequence[str], entry: Entry, argv: list[str]) -> int:
    """Run ``entry`` (reached by the command names ``path``) on its arguments ``argv``; the exit code."""
    prog = " ".join(["ibkit", *path])
    if isinstance(entry, Group):
        return _run_group(prog, path, entry, argv)
    if isinstance(entry, Lightning):
        from ibkit.app.config import build_cli

        build_cli([*path, *argv], run=True)
        return 0
    try:
        function = entry.function()
    except LookupError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    if entry.training_config:
        return _run_with_training_config(prog, function, argv)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description(function))
    parser.add_function_arguments(function, as_group=False, as_positional=entry.positional)
    config = parser.instantiate_classes(parser.parse_args(bare_flags_as_true(function, argv)))
    names = inspect.signature(function).parameters
    return _call(parser, function, {name: config[name] for name in names})


def bare_flags_as_true(function: Callable[..., Any], argv: list[str]) -> list[str]:
    """``--media`` alone means ``--media true`` for a ``bool`` parameter (jsonargparse wants a value)."""
    flags = {
        f"--{name}" for name, parameter in inspect.signature(function).parameters.items()
        if parameter.annotation in (bool, "bool")
    }
    out: list[str] = []
    for index, arg in enumerate(argv):
        out.append(arg)
        following = argv[index + 1].lower() if index + 1 < len(argv) else None
        if arg in flags and following not in ("true", "false", "yes", "no"):
            out.append("true")
    return out


def _run_group(prog: str, path: Sequence[str], group: Group, argv: list[str]) -> int:
    text = "\n".join([f"usage: {prog} {group.what.upper()} [options]", "", *usage_lines(group.commands)])
    if argv and argv[0] in ("-h", "--help"):
        print(text)
        return 0
    if not argv:
        print(text, file=sys.stderr)
        return 2
    name = argv[0]
    if name not in group.commands:
        print(f"{prog}: unknown {group.what} {name!r}; available: {', '.join(group.commands)}", file=sys.stderr)
        return 2
    return run_entry([*path, name], group.commands[name], argv[1:])


def _run_with_training_config(prog: str, function: Callable[..., Any], argv: list[str]) -> int:
    from ibkit.app.config import TRAINING_OBJECTS, IbkitCLI

    cli = IbkitCLI(argv, run=False, function=function, build_trainer=False, prog=prog,
                   description=description(function))
    names = [name for name in inspect.signature(function).parameters if name not in TRAINING_OBJECTS]
    kwargs = {name: cli.config_init[name] for name in names}
    return _call(cli.parser, function, {"module": cli.model, "datamodule": cli.datamodule, **kwargs})


def _call(parser: Any, function: Callable[..., Any], kwargs: dict[str, Any]) -> int:
    try:
        result = function(**kwargs)
    except UsageError as error:
        parser.error(str(error))  # exits with code 2, as a parse error
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
