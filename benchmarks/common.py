"""Shared pieces of the callback-overhead benchmarks: the workload, step timers (two fits in
lockstep: :func:`fit_in_lockstep`), and exact per-step counters of host work.

The workload is the one every overhead figure in the README uses: a CIFAR ResNet-20
(``lightning_tricks.models.build_net("resnet20", 10)``) on batches of random images, SGD with
momentum, one process.

:class:`StepCounter` counts, for each training step from one ``on_train_batch_start`` to the
next, one of:

- ``"ops"``: top-level aten ops (no aten op above them: what Python or autograd asked for) and
  kernel-like ops (aten ops that are no view, allocation or other metadata-only op and have none
  such below them: roughly one kernel each), with ``torch.profiler``;
- ``"python"``: Python function calls, and among them hook calls: Python functions torch calls
  back, from its C++ core (autograd tensor and node hooks, custom autograd Functions) or from the
  hook loops of ``Module.__call__`` and ``Optimizer.step``, with ``sys.setprofile``;
- ``"syncs"``: device-to-host reads asked for from Python (``item``, ``tolist``, ``numpy``,
  ``cpu``, ``float()``/``int()``/``bool()`` of a tensor, ``to("cpu")`` of an accelerator
  tensor), with a ``TorchFunctionMode``: each one is a host synchronisation on an accelerator,
  and it counts on the CPU too (``to`` aside), where the same code runs without one;
- ``"cuda_syncs"``: on a CUDA device, the synchronisations CUDA itself reports
  (``torch.cuda.set_sync_debug_mode``), those inside torch's C++ included.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.models import build_net


class ResNet20Classifier(pl.LightningModule):
    """ResNet-20 with a mean cross-entropy loss and SGD."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.net = build_net("resnet20", 10)
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class StepTimer(Callback):
    """Wall time from ``on_train_batch_start`` to ``on_train_batch_end``, per step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


class Lockstep:
    """Two fits in two threads taking turns, one training step each, so that both meet the same
    machine (its clock speed, its neighbours' load) within milliseconds: the drift between
    separate runs, which reads ±20 % on a shared VM, cancels in their ratio. A thread holds the
    turn from one ``on_train_batch_start`` to the next (its setup before the first, its teardown
    after the last); the other waits, without the GIL, outside its timed window."""

    def __init__(self) -> None:
        self.turns: list[int] = []
        """The players in the order they were given the turn."""
        self._turn = 0
        self._finished: set[int] = set()
        self._condition = threading.Condition()

    def take_turn(self, player: int) -> None:
        """Wait until it is ``player``'s turn, or the other player has finished."""
        with self._condition:
            self._condition.wait_for(lambda: self._turn == player or 1 - player in self._finished)
            self.turns.append(player)

    def hand_over(self, player: int, finished: bool = False) -> None:
        """Give the turn to the other player (``finished``: ``player`` will not ask again)."""
        with self._condition:
            if finished:
                self._finished.add(player)
            self._turn = 1 - player
            self._condition.notify_all()


class LockstepTimer(Callback):
    """Per step, ``clock`` time from one ``on_train_batch_start`` to the next (first in the
    callback list), handing the turn to the other fit of a :class:`Lockstep` between two windows."""

    def __init__(self, lockstep: Lockstep, player: int, clock: Callable[[], float]) -> None:
        self.times: dict[int, float] = {}
        self._lockstep, self._player, self._clock = lockstep, player, clock
        self._start: tuple[int, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close()
        self._start = (trainer.global_step, self._clock())

    def on_train_end(self, trainer, pl_module):
        self._close()

    def _close(self) -> None:
        if self._start is not None:
            step, start = self._start
            self.times[step] = self._clock() - start
        self._lockstep.hand_over(self._player)
        self._lockstep.take_turn(self._player)


def fit_in_lockstep(
    fits: tuple[Callable[[Callback], None], Callable[[Callback], None]],
    clock: Callable[[], float] = time.perf_counter,
    lockstep: Lockstep | None = None,
    cpu: int | None = None,
) -> tuple[dict[int, float], dict[int, float]]:
    """Per-step ``clock`` times of two fits run step for step in turn (``lockstep``, a new
    :class:`Lockstep` by default), the first first: ``fit(timer)`` runs a fit with ``timer`` first
    among its callbacks. A failure in either is raised here once both threads are done.

    ``cpu``: both threads pinned to that CPU (Linux), so that neither runs on a core its neighbours
    slow down more than the other's; only for one intra-op thread (an intra-op pool started by a
    pinned thread would share its CPU)."""
    lockstep = lockstep or Lockstep()
    timers = [LockstepTimer(lockstep, player, clock) for player in (0, 1)]
    failures: list[BaseException] = []

    def play(player: int) -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread
        lockstep.take_turn(player)
        try:
            fits[player](timers[player])
        except BaseException as error:  # re-raised in the main thread
            failures.append(error)
        finally:
            lockstep.hand_over(player, finished=True)

    threads = [threading.Thread(target=play, args=(player,)) for player in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return timers[0].times, timers[1].times


def random_image_loader(steps: int, batch_size: int, size: int = 32) -> DataLoader:
    """``steps`` batches of seeded random 3x``size``x``size`` images with 10-class labels."""
    generator = torch.Generator().manual_seed(0)
    n = steps * batch_size
    images = torch.randn(n, 3, size, size, generator=generator)
    return DataLoader(
        TensorDataset(images, torch.randint(0, 10, (n,), generator=generator)), batch_size=batch_size
    )


QUIET_TRAINER = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)
"""Trainer arguments of a quiet one-device CPU run: no logger, checkpoint, progress bar, summary or
sanity check (the tests' ``trainer_for`` starts from them too)."""


def quiet_trainer(
    steps: int, callbacks: list[Callback], root: str | None = None, accelerator: str = "cpu", **options
) -> pl.Trainer:
    """A :data:`QUIET_TRAINER` for ``steps`` steps on ``accelerator`` (``options``: more Trainer
    arguments, or other values of its own, e.g. ``precision``)."""
    settings = {**QUIET_TRAINER, "accelerator": accelerator, "max_steps": steps, **options}
    return pl.Trainer(default_root_dir=root, callbacks=callbacks, **settings)


def silence_lightning() -> None:
    """Keep the benchmark's table readable: no Lightning info lines or warnings."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def machine_description() -> str:
    """CPU model, logical CPUs, whether AVX-512 is present, torch version and intra-op threads."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
    except OSError:
        lines = []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = models[0] if models else platform.processor() or platform.machine()
    simd = ", AVX-512" if any(line.startswith("flags") and " avx512f" in line for line in lines) else ""
    return (
        f"CPU: {model} ({os.cpu_count()} logical CPUs{simd}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


COUNT_KINDS = ("ops", "python", "syncs", "cuda_syncs")
NO_KERNEL_OPS = frozenset(
    "aten::" + name
    for name in (
        "empty empty_strided empty_like view _unsafe_view reshape _reshape_alias as_strided select slice "
        "unsqueeze squeeze expand t transpose permute detach detach_ alias lift_fresh unbind split chunk "
        "narrow resize_ set_ resolve_conj resolve_neg flatten contiguous to view_as expand_as numpy_T"
    ).split()
)
LIBRARY_PATHS = (os.path.dirname(torch.__file__), os.path.dirname(os.__file__))
SYNC_METHODS = frozenset({"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"})


class StepCounter(Callback):
    """Exact per-step counts of host work (see the module docstring), for the training steps in
    ``steps``; put it first in the callback list, so that its window, from one step's
    ``on_train_batch_start`` to the next one's, holds every other callback's work.

    Attributes:
        counts: per counted step, ``{"aten_ops", "kernel_ops"}``, ``{"python_calls",
            "hook_calls"}`` or ``{"syncs"}`` (by ``kind``).
    """

    def __init__(self, kind: str, steps: range) -> None:
        if kind not in COUNT_KINDS:
            raise ValueError(f"`kind` must be one of {COUNT_KINDS}, got {kind!r}.")
        self.kind, self.steps = kind, steps
        self.counts: dict[int, dict[str, int]] = {}
        self._step: int | None = None
        self._instrument = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._finish()
        if trainer.global_step in self.steps:
            self._step = trainer.global_step
            self._instrument = INSTRUMENTS[self.kind]()
            self._instrument.start()

    def on_train_end(self, trainer, pl_module):
        self._finish()

    def _finish(self) -> None:
        if self._instrument is not None:
            self.counts[self._step] = self._instrument.stop()
            self._instrument = None


class _OpCounter:
    def start(self) -> None:
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.__enter__()

    def stop(self) -> dict[str, int]:
        self._profiler.__exit__(None, None, None)
        events = [e for e in self._profiler.events() if e.name.startswith("aten::")]
        top = sum(1 for e in events if is_top_level_aten(e))
        memo: dict[int, bool] = {}
        kernels = sum(1 for e in events if e.name not in NO_KERNEL_OPS and not _computes_below(e, memo))
        return {"aten_ops": top, "kernel_ops": kernels}


def _computes_below(event, memo: dict[int, bool]) -> bool:
    """Whether an aten op below ``event`` computes (is not a view, allocation or metadata op)."""
    if id(event) not in memo:
        memo[id(event)] = any(
            (child.name.startswith("aten::") and child.name not in NO_KERNEL_OPS)
            or _computes_below(child, memo)
            for child in event.cpu_children
        )
    return memo[id(event)]


def is_top_level_aten(event) -> bool:
    """Whether a profiler ``event`` is an aten op with no aten op above it (what Python or autograd
    asked for, not an op another op runs inside it); the tests' op counts use it too."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


class _CallCounter:
    """``sys.setprofile`` hook: Python calls, and those torch makes back into Python (hooks)."""

    HOOK_CALLERS = ("_call_impl", "inner", "wrapper", "patch_track_step_called")

    def start(self) -> None:
        self.calls = self.hooks = 0
        self._stack: list = []
        sys.setprofile(self._event)

    def stop(self) -> dict[str, int]:
        sys.setprofile(None)
        return {"python_calls": self.calls, "hook_calls": self.hooks}

    def _event(self, frame, event, arg) -> None:
        if event == "call":
            self.calls += 1
            self.hooks += self._is_hook(frame)
            self._stack.append(None)
        elif event == "c_call":
            self._stack.append(arg)
        elif self._stack:
            self._stack.pop()

    def _is_hook(self, frame) -> bool:
        if frame.f_code.co_flags & 0x20:  # a generator resumed
            return False
        caller = self._stack[-1] if self._stack else None
        if caller is not None:
            owner = getattr(caller, "__self__", None)
            owner_type = owner if isinstance(owner, type) else type(owner)
            return owner is not None and owner_type.__module__.startswith("torch")
        back = frame.f_back
        if back is None or back.f_code.co_name not in self.HOOK_CALLERS:
            return False
        hook_loop = back.f_code.co_filename.endswith(("nn/modules/module.py", "optim/optimizer.py"))
        library = frame.f_code.co_filename.startswith(LIBRARY_PATHS)
        return hook_loop and not library and frame.f_code.co_name not in ("forward", "step")


class _SyncCounter(TorchFunctionMode):
    """Counts the device-to-host reads asked for from Python."""

    def start(self) -> None:
        self.syncs = 0
        self.__enter__()

    def stop(self) -> dict[str, int]:
        self.__exit__(None, None, None)
        return {"syncs": self.syncs}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS or (name == "to" and _to_host(args, kwargs)):
            self.syncs += 1
        return func(*args, **kwargs)


class _CudaSyncCounter:
    """Counts the host synchronisations CUDA reports (``torch.cuda.set_sync_debug_mode("warn")``),
    wherever they come from, C++ included."""

    def start(self) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> dict[str, int]:
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        return {"cuda_syncs": sum("synchroniz" in str(record.message) for record in self._records)}


INSTRUMENTS = {
    "ops": _OpCounter,
    "python": _CallCounter,
    "syncs": _SyncCounter,
    "cuda_syncs": _CudaSyncCounter,
}


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` copies an accelerator tensor to the CPU."""
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    targets = [*args[1:], kwargs.get("device")]
    to_cpu = any(str(target) == "cpu" for target in targets if isinstance(target, (str, torch.device)))
    return to_cpu and source is not None and source.device.type != "cpu"


def count_fit(run: Callable[[StepCounter], None], kind: str, steps: range) -> dict[int, dict[str, int]]:
    """Per step in ``steps``, the ``kind`` counts of ``run(counter)``, a fit with ``counter``
    first among its callbacks."""
    counter = StepCounter(kind, steps)
    run(counter)
    return counter.counts


def median_counts(counts: dict[int, dict[str, int]], steps) -> dict[str, float]:
    """Per counted quantity, the median over ``steps`` (all equal when the work is the same)."""
    rows = [counts[step] for step in steps]
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def step_kinds(config: str, steps: list[int], every: int | None) -> dict[str, list[int]]:
    """The table rows of ``config``: its steps, or, for a callback that measures every
    ``every`` steps, its measured steps (``step % every == 0``) and the others."""
    if every is None:
        return {config: steps}
    return {
        f"{config}, measured step": [s for s in steps if s % every == 0],
        f"{config}, unmeasured step": [s for s in steps if s % every],
    }


def count_table(
    fit: Callable[[str, Callback], None],
    configs: dict[str, int | None],
    steps: range,
    kinds: Sequence[str] = ("ops", "python", "syncs"),
) -> dict[str, dict[str, float]]:
    """Per table row, the median per-step counts over ``steps``: totals for the first
    configuration (the plain run), what is added to them for the others. ``fit(config, counter)``
    runs a fit of ``config`` with ``counter`` first among its callbacks; ``configs`` maps each
    configuration to the period of its sparse measurement (None: every step alike)."""
    table: dict[str, dict[str, float]] = {}
    for config, every in configs.items():
        merged: dict[int, dict[str, int]] = {step: {} for step in steps}
        for kind in kinds:
            for step, values in count_fit(partial(fit, config), kind, steps).items():
                merged[step].update(values)
        for row, kind_steps in step_kinds(config, list(steps), every).items():
            table[row] = median_counts(merged, kind_steps)
    plain = next(iter(table.values()))
    return {
        row: values if values is plain else {key: value - plain[key] for key, value in values.items()}
        for row, values in table.items()
    }


def format_count_table(table: dict[str, dict[str, float]]) -> list[str]:
    """The table as text lines: totals in the first row, ``+n`` in the others."""
    columns = list(next(iter(table.values())))
    lines = [f"{'configuration':<52}" + "".join(f"{c:>14}" for c in columns)]
    for index, (row, values) in enumerate(table.items()):
        texts = [f"{values[c]:,.0f}" if index == 0 else f"{values[c]:+,.0f}" for c in columns]
        lines.append(f"{row:<52}" + "".join(f"{text:>14}" for text in texts))
    return lines


def quiet_fit_trainer(callbacks: list[Callback], root: str | None = None, **overrides) -> pl.Trainer:
    """:data:`QUIET_TRAINER` with any of its settings overridden, e.g. ``max_epochs=1000, logger=TensorBoardLogger(...)``
    for a fit bounded by epochs that logs."""
    return pl.Trainer(default_root_dir=root, callbacks=callbacks, **{**QUIET_TRAINER, **overrides})
