"""Training configurations: YAML files + dotted overrides -> module, datamodule, trainer.

One LightningCLI (jsonargparse) over any LightningModule and LightningDataModule chosen by ``class_path``
(the module defaults to :class:`ibkit.training.InstructBLIPModule`, so a ``model:`` section without
``class_path`` configures instruction tuning; ``ibkit.training.pretrain.Blip2PretrainModule`` is BLIP-2
pre-training) serves ``ibkit fit|validate|test|predict`` (command-line
arguments), :func:`build_from_config` and :func:`run_lightning` (Python values), so a configuration
means the same thing from the shell and from code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
#: the LightningModule of a ``model:`` section without ``class_path`` (every instruction-tuning config)
DEFAULT_MODULE = "ibkit.training.module.InstructBLIPModule"
#: parameters of a command function that receive the objects built from the training configuration
TRAINING_OBJECTS = ("module", "datamodule")


@dataclass(frozen=True)
class ConfigRequest:
    """A configuration given as Python values: YAML files stacked in order, then dotted-key overrides."""

    configs: Sequence[str | Path] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    command: str | None = None  # fit/validate/test/predict, or None to only build

    def parse(self, parser: ArgumentParser, command_parsers: Mapping[str, ArgumentParser] | None) -> Namespace:
        """The Namespace ``parser`` gives for ``[command] --config A --config B --key=value ...``."""
        target = parser if self.command is None else command_parsers[self.command]
        config = target.get_defaults()
        for path in self.configs:  # as --config does: later files override earlier ones
            ActionConfigFile.apply_config(target, config, "config", str(path))
        config = target.parse_object(_nested(self.overrides), namespace=config)  # validates the result
        if self.command is None:
            return config
        return Namespace(config=None, subcommand=self.command, **{self.command: config})


def _nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"data.init_args.root": x}`` -> ``{"data": {"init_args": {"root": x}}}``."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


class IbkitCLI(LightningCLI):
    """LightningCLI with ibkit's settings.

    ``args`` is a command line (list of strings; ``None``: ``sys.argv``) or a :class:`ConfigRequest`.
    ``function``: a command whose own arguments are parsed beside the training configuration (its
    parameters except :data:`TRAINING_OBJECTS`). ``build_trainer=False`` builds only module and datamodule.
    ``prog`` and ``description`` head the ``--help`` text (the command runner passes the command's).
    """

    def __init__(
        self,
        args: Sequence[str] | ConfigRequest | None,
        run: bool = True,
        function: Callable[..., Any] | None = None,
        build_trainer: bool = True,
        prog: str = "ibkit",
        description: str | None = None,
    ) -> None:
        self._function = function
        self._build_trainer = build_trainer
        parser_kwargs: dict[str, Any] = {"prog": prog}
        if description is not None:
            parser_kwargs["description"] = description
        with warnings.catch_warnings():
            # in-process calls (tests, notebooks, the app's commands) pass args while sys.argv holds something else
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            super().__init__(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                auto_configure_optimizers=False,
                save_config_kwargs={"overwrite": True},
                # ibkit's datamodules split the data across ranks themselves (resumable mixture stream)
                trainer_defaults={"use_distributed_sampler": False},
                parser_kwargs=parser_kwargs,
                args=args,  # None: LightningCLI reads sys.argv itself
                run=run,
            )

    def add_arguments_to_parser(self, parser: ArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODULE}})
        if self._function is not None:
            parser.add_function_arguments(self._function, skip=set(TRAINING_OBJECTS))

    def parse_arguments(self, parser: ArgumentParser, args: Any) -> None:
        if isinstance(args, ConfigRequest):
            self.config = args.parse(parser, getattr(self, "_subcommand_parsers", None))
        else:
            super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        if self._build_trainer:
            super().instantiate_classes()
            return
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")


def build_cli(args: Sequence[str] | None, run: bool = True) -> IbkitCLI:
    """``ibkit`` command-line arguments -> LightningCLI; ``run=False`` only parses and instantiates."""
    if args is not None:
        args = list(args)
        if not run and args and args[0] in LIGHTNING_COMMANDS:
            args = args[1:]  # without run there are no subcommands
    return IbkitCLI(args, run=run)


def build_from_config(
    configs: Sequence[str | Path], overrides: Mapping[str, Any] | None = None
) -> tuple[LightningModule, LightningDataModule]:
    """(module, datamodule) of a training configuration, without a trainer and without running anything.

    ``configs`` are stacked as ``--config A --config B``; ``overrides`` are dotted keys, e.g.
    ``{"data.init_args.root": "data", "model.optim.lr": 1e-4}``. The seed (``seed_everything``) is set
    as ``ibkit fit`` sets it, so randomly initialised parts come out the same.
    """
    cli = IbkitCLI(ConfigRequest(tuple(configs), dict(overrides or {})), run=False, build_trainer=False)
    return cli.model, cli.datamodule


def run_lightning(
    command: str,
    configs: Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    ckpt_path: str | Path | None = None,
) -> IbkitCLI:
    """``ibkit COMMAND --config ... --key=value ...`` in this process; returns the CLI (``.trainer``, ``.model``).

    ``command`` is fit, validate, test or predict; ``ckpt_path`` as the command's ``--ckpt_path``
    (``last``, ``best`` or a file).
    """
    if command not in LIGHTNING_COMMANDS:
        raise ValueError(f"unknown Lightning command {command!r}; choose from {list(LIGHTNING_COMMANDS)}")
    overrides = dict(overrides or {})
    if ckpt_path is not None:
        overrides["ckpt_path"] = str(ckpt_path)
    return IbkitCLI(ConfigRequest(tuple(configs), overrides, command), run=True)


class _ParseOnlyCLI(IbkitCLI):
    def instantiate_classes(self) -> None:
        return None

    def _run_subcommand(self, subcommand: str) -> None:
        return None


def parse_config(args: Sequence[str]) -> tuple[ArgumentParser, Namespace]:
    """(parser, config) of ``ibkit`` arguments, parsed and validated but nothing instantiated or run.

    With a leading ``fit``/``validate``/... the subcommand's parser and config (``ckpt_path`` included,
    as ``--print_config`` writes it); without, the plain configuration. For checks and tools that must
    not build models or trainers (configs for GPUs this machine lacks).
    """
    args = list(args)
    subcommand = args[0] if args and args[0] in LIGHTNING_COMMANDS else None
    cli = _ParseOnlyCLI(args, run=subcommand is not None)
    if subcommand is None:
        return cli.parser, cli.config
    return cli._subcommand_parsers[subcommand], cli.config[subcommand]
