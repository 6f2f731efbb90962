"""``RunProgressBar``: one compact progress bar for a whole ``fit``, for notebooks and log files.

Lightning's default bar redraws every few batches and opens a bar per epoch and per validation
loop; in an executed notebook or a captured log that is hundreds of chunks of text. This one draws
the run's training steps (the step axis of every lightning-tricks callback) as one bar, redrawn at
most ``updates`` times, with the logged metrics beside it::

    trainer = L.Trainer(callbacks=[RunProgressBar(), GradientFlow()])
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress import ProgressBar
from tqdm import tqdm
from typing_extensions import override

from . import checks


class RunProgressBar(ProgressBar):
    """One bar over the run's training steps, redrawn at most ``updates`` times (and at its end).

    Args:
        updates: how many times the bar is redrawn over the run (besides its first and last draw).
    """

    def __init__(self, updates: int = 20) -> None:
        super().__init__()
        self.updates = checks.integer("updates", updates, minimum=1)
        self._enabled = True
        self._bar: tqdm | None = None
        self._next_draw = 0
        self._stride = 1
        self._epoch = 0

    @override
    def disable(self) -> None:
        """Draw nothing (Lightning calls it off rank 0 and under ``enable_progress_bar=False``)."""
        self._enabled = False

    @override
    def enable(self) -> None:
        """Draw again after :meth:`disable`."""
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        """Whether the bar draws."""
        return self._enabled

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the bar at the steps already done (a resumed fit starts where it stopped)."""
        if not self._enabled or not trainer.is_global_zero:
            return
        total = trainer.estimated_stepping_batches
        total = None if math.isinf(total) else int(total)
        done = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._bar = tqdm(
            total=total,
            initial=done,
            desc="fit",
            unit="step",
            file=sys.stderr,
            mininterval=0,
            dynamic_ncols=True,
        )
        self._stride = max(1, (total or 0) // self.updates) if total else 50
        self._next_draw = done + self._stride
        self._epoch = trainer.current_epoch

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Redraw once every ``total / updates`` steps."""
        done = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._epoch = trainer.current_epoch
        if self._bar is not None and done >= self._next_draw:
            self._draw(trainer, pl_module, done)
            self._next_draw = done + self._stride

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last draw, at the run's final step, and close."""
        if self._bar is not None:
            self._draw(trainer, pl_module, trainer.fit_loop.epoch_loop._batches_that_stepped)
            self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the bar where it stopped."""
        self._close()

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: int) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        self._bar.set_postfix({"epoch": self._epoch, **metrics}, refresh=False)
        self._bar.update(done - self._bar.n)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
