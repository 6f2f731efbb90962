"""RandomGradient: every training backward propagates ``loss * r`` (seed 000_e58e526c3e6fcb5b.txt §4);
the Lightning adapter over :mod:`lightning_tricks.gradients.random_weights`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from .. import checks
from ..gradients.random_weights import (
    BackwardScaling,
    DrawLog,
    RandomWeightStream,
    check_optimizer_indices,
    check_seed,
    check_stream_arguments,
    derived_seed,
)
from ..outputs import RANDOM_GRADIENT
from ._base import TrickCallback, is_due

METRIC_NAME = "random_gradient/r"
HISTORY_FILE = RANDOM_GRADIENT.files["history"]
HISTORY_COLUMNS = ("step", "backward", "r")


class RandomGradient(TrickCallback):
    r"""Multiply the gradient of every training backward by a fresh number ``r``; the LR is untouched.

    Seed 000_e58e526c3e6fcb5b.txt §4 trains with ``loss_random = loss * random();
    loss_random.backward()`` and reports faster, steadier convergence when combined with momentum
    (§3 and §5.1: about 0.9 for segmentation, about 0.5 for classification), on SGD and Adam
    (§5.2, pix2pix with Adam, betas (0.5, 0.999)).

    **Semantics.** For every backward Lightning performs the parameter gradients equal those of
    ``(loss * r).backward()``, with one fresh ``r`` per backward: the training step under automatic
    optimisation, each micro-batch under gradient accumulation (Lightning's ``loss / N`` is what
    gets multiplied), and each ``self.manual_backward`` call. Everything after the backward sees the
    scaled gradient, as in the seed's loop: gradient accumulation, DDP's all-reduce, AMP unscaling
    (a GradScaler's factor and ``r`` commute), gradient clipping and the optimiser. The logged loss,
    validation and test are untouched. Internally a tensor hook on the loss Lightning is about to
    backpropagate multiplies the incoming gradient by ``r`` in the loss's dtype, which is exactly
    the backward of ``loss * r`` (the hook is ``torch.mul`` itself: no Python runs in the backward).

    **Several optimisers.** ``optimizers=None`` scales everything a backward computes. With a list
    of optimiser indices, ``r`` multiplies only the gradients a backward sends to the parameters of
    those optimisers (a parameter shared with an unselected optimiser counts as selected); what it
    sends to the parameters of the other optimisers stays unscaled. When a backward reaches no
    parameter of an unselected optimiser (found by walking its autograd graph; e.g. pix2pix's
    generator step with the discriminator frozen, or ``toggle_optimizer``), ``r`` is applied at
    the loss, bit for bit like ``(loss * r).backward()``. When it reaches both (e.g. a generator
    loss flowing through a discriminator that is not frozen), per-parameter hooks multiply the
    selected parameters' gradients by ``r`` before accumulation into ``.grad`` and before DDP's
    all-reduce: the same gradients up to floating-point rounding (``r`` then multiplies at the
    leaves instead of the root of the chain rule). Tensors owned by no optimiser are scaled only
    in the first case. The parameter sets are read at fit start. One ``r`` is drawn per backward
    whatever the selection, so the stream is the same for every choice of ``optimizers``.

    **The r stream.** ``t`` counts the backwards since training began (kept across resume).
    ``"uniform"``: ``r_t ~ U(low, high)`` (the seed's ``random()`` is U(0, 1)). ``"constant"``:
    ``r_t = high`` (seed §2, Fig. 1 right, fixed loss weights, including > 1). ``"cyclical"``:
    triangular wave from ``low`` up to ``high`` and back over ``period`` backwards (seed §7, after
    Smith 2015, arXiv:1506.01186). Random draws come from a CPU ``torch.Generator`` seeded
    identically on every rank, so under DDP all ranks use the same ``r`` for the same backward;
    its state is saved in checkpoints, so a resumed run continues the stream. ``r`` stays a Python
    float: applying it costs no host-device synchronisation. The stream itself is the pure-torch
    :class:`~lightning_tricks.gradients.random_weights.RandomWeightStream`.

    Args:
        low: lower end of ``r`` (``"uniform"``, ``"cyclical"``); ``0 <= low <= high``.
        high: upper end of ``r``, and the value of ``r`` for ``"constant"``; ``high > 0``.
        schedule: ``"uniform"``, ``"constant"`` or ``"cyclical"``.
        period: length of one triangular cycle in backwards; required for ``"cyclical"`` (an
            integer >= 2), must be ``None`` otherwise.
        optimizers: ``None`` to scale every gradient, or a non-empty list of distinct optimiser
            indices (positions in ``trainer.optimizers``) whose parameters get scaled gradients.
        seed: seed of the ``r`` stream, ``0 <= seed < 2**64``. ``None`` derives one from rank 0's
            ``torch.initial_seed()`` (so ``seed_everything`` makes it reproducible), broadcasts it
            to every rank and reports it once. A checkpoint's stream takes precedence on resume.
        log_every_n_steps: log ``random_gradient/r`` (the first ``r`` of the step) at the training
            steps with ``step % n == 0``, to every logger and ``trainer.callback_metrics``;
            ``None`` takes n from ``Trainer(log_every_n_steps=...)``.

    Attributes:
        history: this fit's draws, one record ``{"step", "backward", "r"}`` per backward, in order
            (``step`` the training step, ``backward`` the index t of the stream). Every draw is also
            appended to ``random_gradient.csv`` in the run folder (at each epoch end, checkpoint
            and fit end), which :func:`lightning_tricks.results.load_run` reads back across resumes;
            checkpoints keep only the stream's position, so their size does not grow with training.

    Raises:
        TypeError: if ``low``/``high`` are not real numbers, ``period``/``seed``/
            ``log_every_n_steps`` or an optimiser index is not an integer, or ``optimizers`` is not
            a sequence.
        ValueError: if ``low``/``high`` are negative, not finite, ``low > high`` or ``high == 0``;
            ``schedule`` is unknown; ``period`` is missing or < 2 for ``"cyclical"`` or given for
            another schedule; ``optimizers`` is empty, has duplicates or negative entries (and at
            fit start, an index without an optimiser); ``seed`` or ``log_every_n_steps`` is out of
            range.

    Example::

        import lightning.pytorch as pl
        from lightning.pytorch.demos.boring_classes import BoringModel
        from lightning_tricks import RandomGradient

        callback = RandomGradient(low=0.0, high=1.0, seed=0)
        trainer = pl.Trainer(max_steps=4, callbacks=[callback], logger=False)
        trainer.fit(BoringModel())
        print(callback.history[:2])  # [{'step': 0, 'backward': 0, 'r': 0.970...}, {'step': 1, ...}]

    """

    namespace = RANDOM_GRADIENT.namespace
    identity_arguments = ("low", "high", "schedule", "period", "optimizers")

    def __init__(
        self,
        low: float = 0.0,
        high: float = 1.0,
        schedule: str = "uniform",
        period: int | None = None,
        optimizers: Sequence[int] | None = None,
        seed: int | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.low, self.high, self.schedule, self.period = check_stream_arguments(low, high, schedule, period)
        self.optimizers = check_optimizer_indices(optimizers)
        self.seed = check_seed(seed, allow_none=True)
        self.log_every_n_steps = checks.integer("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        self._scaling = BackwardScaling()
        self.reset_fit_state()

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        return {"r, the loss multiplier of each step": [METRIC_NAME]}

    @override
    def metric_descriptions(self) -> dict[str, str]:
        bounds = f"r = {self.high}" if self.schedule == "constant" else f"r in [{self.low}, {self.high}]"
        return {
            METRIC_NAME: (
                f"RandomGradient: the factor r of the step's first backward, which propagates `loss * r` "
                f"(seed 000 §4); {self.schedule} schedule, {bounds}. The gradient is scaled by r, the "
                "learning rate is not. Every draw is in `random_gradient.csv`."
            )
        }

    @property
    def history(self) -> list[dict[str, float]]:
        """This fit's draws: ``{"step", "backward", "r"}`` per backward, in order."""
        return self._draws.records()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._stream = RandomWeightStream(
            self.low, self.high, self.schedule, self.period, self._agreed_seed(trainer)
        )
        if self._pending_state is not None:
            self.set_state(self._pending_state)

    @override
    def reset_fit_state(self) -> None:
        self._stream: RandomWeightStream | None = None
        self._pending_state: dict[str, Any] | None = None
        self._draws = DrawLog()
        self._last_logged_step = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.optimizers is None:
            return
        if max(self.optimizers) >= len(trainer.optimizers):
            count = len(trainer.optimizers)
            raise ValueError(
                f"RandomGradient(optimizers={list(self.optimizers)}): the module configures {count} optimiser(s);"
                f" allowed indices are 0..{count - 1}."
            )
        frozen = self._scaling.select(trainer.optimizers, self.optimizers)
        if frozen:
            rank_zero_warn(
                f"RandomGradient(optimizers={list(self.optimizers)}): {frozen} of their parameters do not require"
                " grad at fit start; a backward that also reaches another optimiser's parameters will leave their"
                " gradients unscaled."
            )

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        assert self._stream is not None
        step, t = self.training_step(trainer), self._stream.draws
        r = self._stream.next()
        self._draws.add(step, t, r)
        self._scaling.begin(loss, r)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step != self._last_logged_step and is_due(step, every):
            self._last_logged_step = step
            self.log_scalars(trainer, {METRIC_NAME: r}, step)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scaling.end()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._append_history()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._append_history()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._append_history()
        self._scaling.remove()
        super().on_fit_end(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._append_history()
        self._scaling.remove()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._scaling.remove()

    @override
    def get_state(self) -> dict[str, Any]:
        if self._stream is None:
            return dict(self._pending_state or {})
        return self._stream.state_dict()

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self._stream is None:
            self._pending_state = dict(state)
        else:
            self._stream.load_state_dict(state)
            self._pending_state = None

    def _agreed_seed(self, trainer: pl.Trainer) -> int:
        """The user's seed, or rank 0's :func:`derived_seed` broadcast to every rank."""
        if self.seed is not None:
            return self.seed
        seed = trainer.strategy.broadcast(derived_seed(torch.initial_seed()), src=0)
        rank_zero_info(
            f"RandomGradient: seed=None, drawing r with seed={seed} (pass seed={seed} to repeat it)."
        )
        return seed

    def _append_history(self) -> None:
        """Append the draws not yet written to ``random_gradient.csv`` in the run folder (rank 0)."""
        rows = self._draws.unwritten()
        if rows and self.write_table(HISTORY_FILE, HISTORY_COLUMNS, rows, append=True) is not None:
            self._draws.mark_written(len(rows))
