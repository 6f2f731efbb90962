"""The ``lightning-tricks`` command: LightningCLI over any LightningModule and datamodule.

Example::

    lightning-tricks fit -c configs/demo.yaml
    lightning-tricks test -c configs/demo.yaml --ckpt_path logs/demo/version_0/checkpoints/last.ckpt
    lightning-tricks sweep configs/experiments/seed004_beacon.grid.yaml --workers 2   # see sweep.py
    lightning-tricks dashboard logs                   # TensorBoard over logs/, see dashboard.py
    lightning-tricks compare logs/seed004_guided --target val/acc=0.98   # see comparison.py
"""

from __future__ import annotations

import sys

import lightning as L

from lightning_tricks.comparison import main as compare_main
from lightning_tricks.dashboard import main as dashboard_main
from lightning_tricks.sweep import main as sweep_main
from lightning_tricks.trainer_cli import CLI_OPTIONS, TricksCLI

__all__ = ["CLI_OPTIONS", "TricksCLI", "main"]


def main(args: list[str] | None = None) -> int | None:
    """Entry point of the ``lightning-tricks`` console script (``sweep`` goes to ``lightning_tricks.sweep``,
    ``dashboard`` to ``lightning_tricks.dashboard``, ``compare`` to ``lightning_tricks.comparison``)."""
    argv = sys.argv[1:] if args is None else args
    subcommands = {"sweep": sweep_main, "dashboard": dashboard_main, "compare": compare_main}
    if argv[:1] and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    TricksCLI(L.LightningModule, L.LightningDataModule, **CLI_OPTIONS, args=args)


if __name__ == "__main__":
    sys.exit(main())
