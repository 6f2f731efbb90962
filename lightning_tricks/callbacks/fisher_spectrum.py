"""FisherSpectrum: the spectrum of the approximate Fisher matrix during training (seed 004)."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from ..gradients.gram import GramCollector
from ..gradients.spectrum import fisher_energy, fisher_statistics

LOSS_REDUCTIONS = ("mean", "sum")
UNSUPPORTED = ("raise", "skip")
HISTORY_KEYS = ("c", "l", "C_bar", "L", "trace", "lambda_max", "rank", "noise_scale", "batch_size")
CSV_NAME = "fisher_spectrum.csv"
CSV_COLUMNS = ("epoch", "step", "C_bar", "L", "lr", "batch_size")


class FisherSpectrum(Callback):
    r"""Measure the approximate Fisher matrix F̃_k = J_kᵀJ_k of the training step's own backward.

    Seed 004 (``004_e5d92837cb57ce8a.txt`` §3, eq. 6–8) characterises SGD training by two running
    measures of F̃_k (B×B; column i of J_k is sample i's loss gradient over the trainable
    parameters), which this callback computes exactly from the training step's forward/backward
    (no second backward, no loop over samples; see :class:`~lightning_tricks.gradients.GramCollector`):

    - c_k = √(λmax / λmin≠0), the truncated condition number, and **C̄_K** its running mean (eq. 7);
    - l_k = (α_k / |B_k|) · √Tr(F̃_k), with α_k the learning rate of the first optimiser's first
      param group and |B_k| the batch size of the step, and **L_K = Σ l_k** (eq. 8);
    - also Tr F̃_k, λmax, the numerical rank |E_k| and the gradient-noise scale
      B_simple = tr Σ / ‖ḡ‖² estimated from F̃_k alone.

    With ``every_n_steps = n > 1`` only every n-th optimizer step is measured (seed 004 measured
    every 50 mini-batches); each measured l_k then counts n times in L, so L estimates the
    every-step sum whatever n is. C̄ is the mean of the measured c_k.

    Logged (on measured steps): ``fisher/c``, ``fisher/C_bar``, ``fisher/l``, ``fisher/L``,
    ``fisher/trace``, ``fisher/lambda_max``, ``fisher/rank``, ``fisher/noise_scale``, and with
    ``log_eigenvalues=True`` a TensorBoard histogram ``fisher/eigenvalues``. ``.history`` holds one
    dict per measured step (step, epoch and the keys above); ``.C_bar``, ``.L`` and
    ``.noise_scale`` the latest values, for other callbacks. Each epoch one row
    (epoch, step, C_bar, L, lr, batch_size) is written to ``fisher_spectrum.csv`` in the log dir,
    the input of :func:`lightning_tricks.plotting.beacon_map`.

    **Distributed.** Each rank measures F̃ of its local batch (the diagonal blocks of the global
    F̃; cross-rank blocks would need every rank's activations). Ranks then combine with one
    all-reduce per measured step: Tr F̃ is summed, so ``trace``, ``l`` and ``L`` are exactly those
    of the global batch (|B_k| the global batch size); ``c``, ``lambda_max``, ``rank`` and
    ``noise_scale`` are the mean over ranks of the local values (identical to a single process
    only with one rank).

    **Scope.** Automatic optimisation without gradient accumulation: manual optimisation,
    ``accumulate_grad_batches > 1`` and a ``GradientAccumulationScheduler`` scheduling more than one
    batch are refused at ``setup`` (and accumulation again at every epoch start). F̃ covers the
    parameters that require grad at each measured step (freezing and unfreezing during training are
    followed; frozen ones are never touched); a weight tied between two modules is measured exactly;
    a parameter used outside its module (functionally) is refused at the first measured step. Steps
    without a backward (``training_step`` returning ``None``, SWA's BatchNorm pass, an empty batch,
    no optimiser) are not measured. The batch dimension must come first in every layer's input
    (checked against the batch's size). Training is untouched: parameters, buffers, optimiser state
    and ``requires_grad`` flags evolve bit for bit as without the callback, and every hook is removed
    at ``teardown`` or when the fit fails. The running measures restart with each ``fit`` (or
    continue from the checkpoint it resumes). A layer that runs several times in
    one step (weight sharing, two views of the batch) is measured exactly: sample i's gradient
    sums over every call. With a ``GradScaler`` (16-bit AMP), F̃ is divided by the squared loss
    scale. The gradients measured are those of the backward as performed: a callback scaling the
    loss (``RandomGradient``) scales F̃ by r².

    Args:
        every_n_steps: measure every n-th optimizer step (``>= 1``).
        loss_reduction: how the module's loss reduces over the batch, ``"mean"`` or ``"sum"``;
            with ``"mean"`` the columns are rescaled to the per-sample gradients ∇ℓ_i.
        rank_rtol: eigenvalues above ``rank_rtol · λmax`` are non-zero; ``None`` uses
            ``B · eps`` of the gradient dtype, the rule of ``torch.linalg.matrix_rank``.
        log_eigenvalues: also log the eigenvalues as a TensorBoard histogram.
        unsupported: ``"raise"`` on parameterised layers without a Gram rule, or ``"skip"`` them
            (one warning; F̃ then covers the supported layers only).

    Raises:
        ValueError: an argument out of range, or at ``setup`` a module/trainer it cannot measure.

    Example::

        import lightning as L
        from lightning_tricks import FisherSpectrum

        fisher = FisherSpectrum(every_n_steps=10)
        trainer = L.Trainer(max_epochs=2, callbacks=[fisher])
        trainer.fit(model, datamodule=datamodule)
        print(fisher.C_bar, fisher.L)
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        loss_reduction: str = "mean",
        rank_rtol: float | None = None,
        log_eigenvalues: bool = False,
        unsupported: str = "raise",
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an integer >= 1; got {every_n_steps!r}.")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"`loss_reduction` must be one of {LOSS_REDUCTIONS}; got {loss_reduction!r}.")
        if rank_rtol is not None and not 0 < rank_rtol < 1:
            raise ValueError(f"`rank_rtol` must be None or in (0, 1); got {rank_rtol!r}.")
        if unsupported not in UNSUPPORTED:
            raise ValueError(f"`unsupported` must be one of {UNSUPPORTED}; got {unsupported!r}.")
        self.every_n_steps = every_n_steps
        self.loss_reduction = loss_reduction
        self.rank_rtol = rank_rtol
        self.log_eigenvalues = log_eigenvalues
        self.unsupported = unsupported
        self._collector: GramCollector | None = None
        self._log_dir = "."
        self._measuring = False
        self._running = torch.zeros(3, dtype=torch.float64)  # [Σ finite c_k, #finite c_k, L_K]
        self._pending: list[tuple[int, int, float, Tensor]] = []
        self._history: list[dict[str, float]] = []
        self._epoch_rows: list[dict[str, float]] = []
        self._warned_non_finite = False
        self._batch_size: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, loss_reduction=self.loss_reduction)

    # -- public read-outs ------------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per measured step: step, epoch, c, l, C_bar, L, trace, lambda_max, rank,
        noise_scale, batch_size, lr."""
        self._flush()
        return self._history

    @property
    def C_bar(self) -> float:
        """C̄_K, the running mean of the finite measured c_k (NaN before the first one)."""
        c_sum, count, _ = self._running.tolist()
        return c_sum / count if count else math.nan

    @property
    def L(self) -> float:
        """L_K, the cumulative sum of l_k (each measured l_k counted ``every_n_steps`` times)."""
        return self._running[2].item()

    @property
    def noise_scale(self) -> float:
        """The latest measured gradient-noise scale B_simple (NaN before the first measurement)."""
        history = self.history
        return history[-1]["noise_scale"] if history else math.nan

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_trainer(trainer, pl_module)
        self._restart()  # before Lightning loads a resumed checkpoint's state into the callback
        self._log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
        self._collector = GramCollector(
            pl_module,
            loss_reduction=self.loss_reduction,
            fuse_weight_grad=False,  # autograd's own weight gradients: bit-exact training
            unsupported=self.unsupported,
        )
        self._collector.attach()
        self._collector.enabled = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()
        self._flush()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_accumulation(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._measuring = self._should_measure(trainer, batch)
        if self._measuring:
            self._collector.reset()
            self._collector.enabled = True

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._measuring and trainer.world_size == 1:  # the graph walk upsets DDP's reducer
            self._collector.check_outside_use(loss)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._measuring:
            return
        self._stop_capture()
        if self._collector.captured:  # else no backward ran (skipped step, SWA's BatchNorm pass)
            self._check_batch_dim()
            self._measure(trainer, pl_module, self._collector.matrix())
        self._collector.reset()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._measuring:  # the step was skipped (training_step returned None): nothing measured
            self._stop_capture()
            self._collector.reset()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history = self.history
        if not history:
            return
        last = history[-1]
        row = {key: last[key] for key in ("step", "C_bar", "L", "lr", "batch_size")}
        self._epoch_rows.append({"epoch": trainer.current_epoch, **row})
        self._write_csv()

    def state_dict(self) -> dict[str, Any]:
        return {
            "running": self._running.tolist(),
            "history": list(self.history),
            "epoch_rows": list(self._epoch_rows),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending.clear()
        self._running = torch.tensor(state_dict["running"], dtype=torch.float64)
        self._history = list(state_dict["history"])
        self._epoch_rows = list(state_dict["epoch_rows"])

    # -- internals -------------------------------------------------------------------------

    def _check_trainer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "FisherSpectrum needs automatic optimisation: with manual optimisation it cannot tell "
                "which backward is the training step's. Set `self.automatic_optimization = True`."
            )
        scheduled = [
            count
            for callback in trainer.callbacks
            if isinstance(callback, GradientAccumulationScheduler)
            for count in callback.scheduling.values()
        ]
        self._check_accumulation(trainer, max(scheduled, default=1))

    def _check_accumulation(self, trainer: L.Trainer, scheduled: int = 1) -> None:
        """One clear error for gradient accumulation (SWA's BatchNorm pass, without backward, is fine)."""
        if getattr(trainer.fit_loop, "_skip_backward", False):
            return
        batches = max(trainer.accumulate_grad_batches, scheduled)
        if batches != 1:
            raise ValueError(
                "FisherSpectrum measures one batch per optimizer step and does not support gradient "
                f"accumulation (`accumulate_grad_batches` or a GradientAccumulationScheduler giving "
                f"{batches}); use 1 (a larger batch instead)."
            )

    def _restart(self) -> None:
        """Fresh running measures and history for a new fit."""
        self._running = torch.zeros(3, dtype=torch.float64)
        self._pending.clear()
        self._history = []
        self._epoch_rows = []
        self._measuring = False

    def _release(self) -> None:
        """Remove every hook and drop what was captured (teardown, or the fit failed)."""
        self._measuring = False
        collector, self._collector = self._collector, None
        if collector is not None:
            try:
                collector.detach()
            finally:
                collector.reset()

    def _stop_capture(self) -> None:
        self._collector.enabled = False
        self._measuring = False

    def _should_measure(self, trainer: L.Trainer, batch: Any) -> bool:
        """Measured steps: every n-th, with a non-empty batch and an optimiser with a learning rate."""
        if trainer.global_step % self.every_n_steps != 0 or self._learning_rate(trainer) is None:
            return False
        self._check_accumulation(trainer)
        try:
            self._batch_size = extract_batch_size(batch)
        except Exception:  # no tensor found: the collector's own batch size is used unchecked
            self._batch_size = None
        return self._batch_size != 0

    def _check_batch_dim(self) -> None:
        measured = self._collector.batch_size
        if self._batch_size is not None and measured != self._batch_size:
            raise ValueError(
                f"FisherSpectrum: the layers' inputs have {measured} as their leading dimension but the "
                f"batch has {self._batch_size} samples; F̃ needs the batch dimension first in every "
                "layer's input (e.g. `batch_first=True`, or transpose sequence-first tensors back "
                "before the layers)."
            )

    @staticmethod
    def _learning_rate(trainer: L.Trainer) -> float | None:
        """α_k of the first optimiser's first param group; ``None`` without an optimiser."""
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        return groups[0].get("lr") if groups else None

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, gram: Tensor) -> None:
        gram = gram / self._loss_scale(trainer) ** 2
        grad_dtype = next(p.dtype for p in pl_module.parameters() if p.requires_grad)
        stats = fisher_statistics(gram, self.rank_rtol, grad_dtype)
        local = torch.stack(
            [stats.trace, stats.batch_size, stats.condition, stats.lambda_max, stats.rank, stats.noise_scale]
        )
        trace, batch, condition, lambda_max, rank, noise = self._combine_ranks(trainer, local)
        lr = self._learning_rate(trainer)
        energy = fisher_energy(trace, lr, batch)
        c_bar, total = self._update_running(condition, energy)
        values = dict(c=condition, l=energy, C_bar=c_bar, L=total, trace=trace, lambda_max=lambda_max)
        values.update(rank=rank, noise_scale=noise, batch_size=batch)
        self._pending.append(
            (trainer.global_step, trainer.current_epoch, lr, torch.stack(list(values.values())))
        )
        metrics = {f"fisher/{name}": value.float() for name, value in values.items() if name != "batch_size"}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self.log_eigenvalues:
            self._log_eigenvalues(trainer, stats.eigenvalues)

    def _update_running(self, condition: Tensor, energy: Tensor) -> tuple[Tensor, Tensor]:
        """C̄_K = (1/K) Σ c_k over finite c_k (eq. 7); L_K += n · l_k over finite l_k (eq. 8).

        Device tensors throughout: a NaN measurement is left out without a host sync."""
        finite = torch.isfinite(condition)
        step = torch.stack(
            [
                torch.where(finite, condition, 0.0),
                finite.to(torch.float64),
                self.every_n_steps * torch.nan_to_num(energy, nan=0.0, posinf=0.0, neginf=0.0),
            ]
        )
        self._running = self._running.to(step.device) + step
        c_sum, count, total = self._running
        return torch.where(count > 0, c_sum / count.clamp(min=1), torch.nan), total

    def _combine_ranks(self, trainer: L.Trainer, local: Tensor) -> Tensor:
        """Sum trace and batch size over ranks; average the local spectral statistics."""
        if trainer.world_size == 1:
            return local
        total = trainer.strategy.reduce(local, reduce_op="sum")
        return torch.cat([total[:2], total[2:] / trainer.world_size])

    @staticmethod
    def _loss_scale(trainer: L.Trainer) -> float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _flush(self) -> None:
        """Move pending device measurements to the host history (one sync for all of them)."""
        if not self._pending:
            return
        rows = torch.stack([values for *_, values in self._pending]).cpu().tolist()
        for (step, epoch, lr, _), row in zip(self._pending, rows):
            record = dict(zip(HISTORY_KEYS, row))
            self._history.append({"step": step, "epoch": epoch, **record, "lr": lr})
            self._warn_if_non_finite(record)
        self._pending.clear()

    def _warn_if_non_finite(self, record: dict[str, float]) -> None:
        if self._warned_non_finite or (math.isfinite(record["c"]) and math.isfinite(record["l"])):
            return
        self._warned_non_finite = True
        rank_zero_warn(
            "FisherSpectrum: a measured F̃ had a non-finite entry or no non-zero eigenvalue; its c/l "
            "are NaN and left out of C_bar and L. Training continues."
        )

    def _log_eigenvalues(self, trainer: L.Trainer, eigenvalues: Tensor) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and hasattr(experiment, "add_histogram"):
            values = torch.nan_to_num(eigenvalues).cpu()
            experiment.add_histogram("fisher/eigenvalues", values, trainer.global_step)

    @rank_zero_only
    def _write_csv(self) -> None:
        os.makedirs(self._log_dir, exist_ok=True)
        with open(os.path.join(self._log_dir, CSV_NAME), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(self._epoch_rows)
