"""``TricksCLI``: the LightningCLI every ``lightning-tricks`` run is parsed and built with.

A leaf module: the entry point (:mod:`lightning_tricks.cli`) and the grid runner
(:mod:`lightning_tricks.sweep`, which parses each run's arguments before it starts) both import it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override


def _logger_specs(logger: Any) -> list[Any]:
    """The ``class_path``/``init_args`` entries of a parsed ``trainer.logger`` (one, a list, or none)."""
    specs = logger if isinstance(logger, (list, tuple)) else [logger]
    return [spec for spec in specs if getattr(spec, "init_args", None) is not None]


def default_logger_save_dir(config: Any) -> None:
    """Give every logger of a parsed config that names no ``save_dir`` the trainer's
    ``default_root_dir`` (the working directory when unset, as Lightning's own default), so
    ``--trainer.default_root_dir DIR`` moves the logs of a config whose logger leaves ``save_dir`` out."""
    trainer = config.get("trainer")
    if trainer is None:
        return
    root = trainer.get("default_root_dir") or os.getcwd()
    for spec in _logger_specs(trainer.get("logger")):
        if "save_dir" in spec.init_args and spec.init_args.save_dir is None:
            spec.init_args.save_dir = str(root)


class TricksCLI(LightningCLI):
    """LightningCLI whose ``fit`` can test the best checkpoint right after training
    (``--test_after_fit true``), so one command trains and reports test accuracy, and which can pin
    torch's CPU thread count (``--torch_threads 1``): reductions split across threads add in another
    order, so a CPU run is reproducible bit for bit only at a fixed thread count. A logger without
    ``save_dir`` logs under ``trainer.default_root_dir`` (``default_logger_save_dir``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run `test` on the best checkpoint (the last weights if none).",
        )
        parser.add_argument(
            "--torch_threads",
            type=Optional[int],
            default=None,
            help="torch.set_num_threads before anything is built (default: torch's own choice). "
            "Fix it for CPU results that do not depend on the machine's core count.",
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """LightningCLI's parse, with a logger's missing ``save_dir`` filled in before validation."""
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            return
        config = parser.parse_args(args, _skip_validation=True)
        subcommand = config.get("subcommand")
        default_logger_save_dir(config[subcommand] if subcommand else config)
        try:
            parser.validate(config)
        except (TypeError, ValueError, KeyError) as error:
            parser.error(str(error))
        self.config = config

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("torch_threads")
        if threads is None:
            return
        if threads < 1:
            raise ValueError(f"--torch_threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads)

    def after_fit(self) -> None:
        if not self.config["fit"].get("test_after_fit"):
            return
        has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)


SWEEP_HELP = (
    "Train, validate or test any LightningModule from a config (`fit -c configs/demo.yaml`). "
    "`lightning-tricks sweep GRID.yaml` runs a grid of such runs (`lightning-tricks sweep --help`); "
    "`lightning-tricks dashboard LOGDIR` serves their TensorBoard (`lightning-tricks dashboard --help`)."
)
CLI_OPTIONS = dict(
    subclass_mode_model=True,
    subclass_mode_data=True,
    save_config_kwargs={"overwrite": True},
    parser_kwargs={"description": SWEEP_HELP},
)
"""How ``main`` builds ``TricksCLI`` (also used by ``lightning_tricks.sweep`` to check a run's arguments)."""
