"""RandomGradient: every training backward propagates ``loss * r`` (seed 000_e58e526c3e6fcb5b.txt §4)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from functools import partial
from numbers import Real
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

SCHEDULES = ("uniform", "constant", "cyclical")
METRIC_NAME = "random_gradient/r"
# Offset added to ``torch.initial_seed()`` when ``seed=None``, so that the r stream is not the
# same Mersenne-Twister sequence that initialised the model's weights.
_DERIVED_SEED_OFFSET = 0x5EED_0000
_SEED_LIMIT = 2**64


class RandomGradient(Callback):
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
    the backward of ``loss * r``.

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
    float: applying it costs no host-device synchronisation.

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
        log_every_n_steps: log ``random_gradient/r`` (the first ``r`` of the step) every this many
            optimiser steps, to every logger; ``None`` follows ``Trainer(log_every_n_steps=...)``.

    Attributes:
        history: ``[(global_step, r), ...]``, one entry per backward, in order, to replay an
            experiment. Saved in checkpoints, so a resumed run's history is the whole stream.

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
        print(callback.history[:2])  # [(0, 0.970...), (1, 0.707...)]: (global_step, r)

    """

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
        self.low, self.high = _checked_bounds(low, high)
        self.schedule = _checked_schedule(schedule)
        self.period = _checked_period(period, self.schedule)
        self.optimizers = _checked_optimizer_indices(optimizers)
        self.seed = _checked_int("seed", seed, minimum=0, limit=_SEED_LIMIT)
        self.log_every_n_steps = _checked_int("log_every_n_steps", log_every_n_steps, minimum=1)
        self._generator: torch.Generator | None = None
        self._stream_seed: int | None = None
        self._pending_state: dict[str, Any] | None = None
        self._draws = 0
        self._steps = array("q")
        self._values = array("d")
        self._loss_hook: RemovableHandle | None = None
        self._parameter_hooks: list[RemovableHandle] = []
        self._unselected_ids: frozenset[int] = frozenset()
        self._active_r: float | None = None
        self._last_logged_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            low=self.low,
            high=self.high,
            schedule=self.schedule,
            period=self.period,
            optimizers=self.optimizers,
        )

    @property
    def history(self) -> list[tuple[int, float]]:
        """``(global_step, r)`` for every backward, in order (kept across a resume)."""
        return list(zip(self._steps, self._values))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._generator is not None:
            return
        self._stream_seed = self._agreed_seed(trainer)
        self._generator = torch.Generator().manual_seed(self._stream_seed)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.optimizers is None:
            return
        _check_optimizer_indices_exist(self.optimizers, len(trainer.optimizers))
        selected = _parameters_of(trainer.optimizers, self.optimizers)
        others = [i for i in range(len(trainer.optimizers)) if i not in self.optimizers]
        self._unselected_ids = frozenset(map(id, _parameters_of(trainer.optimizers, others))) - set(
            map(id, selected)
        )
        self._parameter_hooks = [p.register_hook(self._scale_selected) for p in selected if p.requires_grad]
        if len(self._parameter_hooks) < len(selected):
            rank_zero_warn(
                f"RandomGradient(optimizers={list(self.optimizers)}): {len(selected) - len(self._parameter_hooks)}"
                " of their parameters do not require grad at fit start; a backward that also reaches another"
                " optimiser's parameters will leave their gradients unscaled."
            )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        r = self._next_r(trainer.global_step)
        if self._unselected_ids and reaches_any(loss, self._unselected_ids):
            self._active_r = r
        elif loss.requires_grad:
            self._loss_hook = loss.register_hook(partial(_scaled, r=r))
        self._log(trainer, r)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_backward()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        if self._generator is None:
            return dict(self._pending_state or {})
        return {
            "seed": self._stream_seed,
            "draws": self._draws,
            "generator": self._generator.get_state(),
            "history_steps": self._steps.tolist(),
            "history_values": self._values.tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._generator is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    def _agreed_seed(self, trainer: pl.Trainer) -> int:
        """The user's seed, or rank 0's ``torch.initial_seed() + offset`` broadcast to every rank."""
        if self.seed is not None:
            return self.seed
        seed = trainer.strategy.broadcast((torch.initial_seed() + _DERIVED_SEED_OFFSET) % _SEED_LIMIT, src=0)
        rank_zero_info(
            f"RandomGradient: seed=None, drawing r with seed={seed} (pass seed={seed} to repeat it)."
        )
        return seed

    def _restore(self, state: dict[str, Any]) -> None:
        assert self._generator is not None
        self._generator.set_state(state["generator"])
        self._stream_seed = state["seed"]
        self._draws = state["draws"]
        self._steps = array("q", state.get("history_steps", ()))
        self._values = array("d", state.get("history_values", ()))

    def _next_r(self, global_step: int) -> float:
        """Draw the ``r`` of backward number ``t = self._draws`` and record it in the history."""
        r = self._r_at(self._draws)
        self._draws += 1
        self._steps.append(global_step)
        self._values.append(r)
        return r

    def _r_at(self, t: int) -> float:
        """``r_t`` of the configured schedule (seed 000_e58e526c3e6fcb5b.txt §4, §2 Fig. 1, §7)."""
        if self.schedule == "uniform":
            return self._uniform_r()
        if self.schedule == "constant":
            return self.high
        return triangular_wave(t, self.low, self.high, self.period)

    def _uniform_r(self) -> float:
        """``r = low + (high - low) u``, ``u ~ U[0, 1)`` in float64 (seed 000 §4: ``loss * random()``)."""
        u = torch.rand((), dtype=torch.float64, generator=self._generator).item()
        return self.low + (self.high - self.low) * u

    def _scale_selected(self, grad: Tensor) -> Tensor | None:
        """Per-parameter hook: ``grad * r`` inside a training backward, unchanged elsewhere."""
        return None if self._active_r is None else grad * self._active_r

    def _log(self, trainer: pl.Trainer, r: float) -> None:
        """Send the first ``r`` of every ``log_every_n_steps``-th optimiser step to the loggers."""
        if not trainer.loggers:
            return
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if every <= 0 or (step + 1) % every or step == self._last_logged_step:
            return
        self._last_logged_step = step
        for logger in trainer.loggers:
            logger.log_metrics({METRIC_NAME: r}, step=step)

    def _end_backward(self) -> None:
        self._active_r = None
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None

    def _remove_hooks(self) -> None:
        self._end_backward()
        for handle in self._parameter_hooks:
            handle.remove()
        self._parameter_hooks = []


def triangular_wave(t: int, low: float, high: float, period: int) -> float:
    """Smith's triangular cycle: ``low + (high - low) (1 - |2 (t mod P) / P - 1|)``.

    Starts at ``low`` for ``t = 0``, reaches ``high`` at ``t = P / 2`` and returns to ``low`` at
    ``t = P`` (seed 000_e58e526c3e6fcb5b.txt §7; Smith 2015, arXiv:1506.01186, §3.1).
    """
    phase = (t % period) / period
    return low + (high - low) * (1.0 - abs(2.0 * phase - 1.0))


def _scaled(grad: Tensor, r: float) -> Tensor:
    """Backward of ``loss * r`` at the loss: the incoming gradient times ``r``, in its dtype."""
    return grad * r


def reaches_any(loss: Tensor, leaf_ids: frozenset[int]) -> bool:
    """Whether a backward from ``loss`` accumulates into any leaf tensor whose ``id`` is in ``leaf_ids``.

    Walks the autograd graph from ``loss.grad_fn`` to its ``AccumulateGrad`` nodes, visiting each
    node once; stops at the first hit.
    """
    if loss.grad_fn is None:
        return False
    seen, stack = {loss.grad_fn}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "AccumulateGrad":
            if id(node.variable) in leaf_ids:
                return True
            continue
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


def _check_optimizer_indices_exist(indices: Sequence[int], count: int) -> None:
    if max(indices) >= count:
        raise ValueError(
            f"RandomGradient(optimizers={list(indices)}): the module configures {count} optimiser(s);"
            f" allowed indices are 0..{count - 1}."
        )


def _parameters_of(optimizers: Sequence[torch.optim.Optimizer], indices: Sequence[int]) -> list[Tensor]:
    """Distinct parameters in the param groups of the given optimisers, in order of appearance."""
    unique: dict[int, Tensor] = {}
    for index in indices:
        for group in optimizers[index].param_groups:
            for parameter in group["params"]:
                unique.setdefault(id(parameter), parameter)
    return list(unique.values())


def _checked_bounds(low: Any, high: Any) -> tuple[float, float]:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"RandomGradient: `{name}` must be a real number, got {value!r}.")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"RandomGradient: `{name}` must be finite and >= 0, got {value!r}.")
    if low > high:
        raise ValueError(f"RandomGradient: need `low <= high`, got low={low!r} > high={high!r}.")
    if high == 0:
        raise ValueError("RandomGradient: `high` must be > 0 (r = 0 would zero every gradient).")
    return float(low), float(high)


def _checked_schedule(schedule: Any) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"RandomGradient: `schedule` must be one of {SCHEDULES}, got {schedule!r}.")
    return schedule


def _checked_period(period: Any, schedule: str) -> int | None:
    if schedule != "cyclical":
        if period is not None:
            raise ValueError(
                f"RandomGradient: `period` is only used by schedule='cyclical', got period={period!r}."
            )
        return None
    if period is None:
        raise ValueError(
            "RandomGradient: schedule='cyclical' needs `period`, an integer >= 2 (backwards per cycle)."
        )
    return _checked_int("period", period, minimum=2)


def _checked_optimizer_indices(optimizers: Any) -> tuple[int, ...] | None:
    if optimizers is None:
        return None
    if isinstance(optimizers, (str, bytes)) or not isinstance(optimizers, Sequence):
        raise TypeError(
            f"RandomGradient: `optimizers` must be None or a list of indices, got {optimizers!r}."
        )
    indices = tuple(_checked_int(f"optimizers[{i}]", index, minimum=0) for i, index in enumerate(optimizers))
    if not indices or len(set(indices)) != len(indices):
        raise ValueError(
            f"RandomGradient: `optimizers` must be non-empty and without duplicates, got {optimizers!r}."
        )
    return indices


def _checked_int(name: str, value: Any, minimum: int, limit: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"RandomGradient: `{name}` must be an integer, got {value!r}.")
    if value < minimum or (limit is not None and value >= limit):
        upper = "" if limit is None else f" and < {limit}"
        raise ValueError(f"RandomGradient: `{name}` must be >= {minimum}{upper}, got {value!r}.")
    return value
