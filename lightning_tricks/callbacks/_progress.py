"""Progress of a callback's own long passes (scoring a dataset, a pass over every batch) in the
Trainer's progress bar, by Lightning's conventions.

With ``Trainer(enable_progress_bar=False)``, on processes other than rank 0 and under a disabled
bar, nothing is shown. Under Lightning's :class:`~lightning.pytorch.callbacks.TQDMProgressBar` (the
default) a pass gets a bar made as the Trainer's validation bar is: one line below the main bar,
stdout, the bar's format, redrawn every ``refresh_rate`` units and at the end, removed when done
(``leave=False``). Other progress bar callbacks (e.g. ``RichProgressBar``) show nothing of it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


class _TqdmPass:
    """A bar made as :class:`TQDMProgressBar` makes its validation bar, redrawn at every
    ``refresh_rate``-th unit and at the last, as its own bars are."""

    def __init__(self, bar: TQDMProgressBar, description: str, total: int) -> None:
        self.refresh_rate = bar.refresh_rate
        self.display = Tqdm(
            desc=description,
            total=total,
            position=2 * bar.process_position + 1,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=bar.BAR_FORMAT,
        )

    def update(self, n: int = 1) -> None:
        before, self.display.n = self.display.n, self.display.n + n
        if (
            self.display.n // self.refresh_rate > before // self.refresh_rate
            or self.display.n == self.display.total
        ):
            self.display.refresh()

    def close(self) -> None:
        self.display.close()


@contextmanager
def pass_progress(trainer: pl.Trainer, total: int, description: str, enabled: bool = True) -> Iterator[Any]:
    """A bar of ``total`` units (``bar.update(n)`` after each ``n``) titled ``description``, shown
    as the module docstring says; ``enabled=False`` shows nothing."""
    bar = trainer.progress_bar_callback
    shown = enabled and trainer.is_global_zero and bar is not None and bar.is_enabled
    if not (shown and isinstance(bar, TQDMProgressBar)):
        yield _Silent()
        return
    display = _TqdmPass(bar, description, total)
    try:
        yield display
    finally:
        display.close()
