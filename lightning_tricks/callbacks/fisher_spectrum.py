"""FisherSpectrum: the spectrum of the approximate Fisher matrix during training (seed 004)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from typing_extensions import override

from .. import checks
from ..gradients.gram import GramCollector
from ..gradients.spectrum import (
    FisherRunningSums,
    fisher_energy,
    fisher_statistics,
    noise_scale_ratio,
)
from ..outputs import FISHER_SPECTRUM
from ._base import TrickCallback, first_learning_rate, is_due

LOSS_REDUCTIONS = ("mean", "sum")
UNSUPPORTED = ("raise", "skip")
MEASURES = (
    "c_k", "l_k", "C_bar", "L", "trace", "lambda_max", "rank",
    "noise_scale", "trace_sigma", "grad_sq_norm", "batch_size",
)  # fmt: skip
LOG10_MEASURES = ("trace", "lambda_max")
HISTORY_FILE = FISHER_SPECTRUM.files["history"]
HISTORY_COLUMNS = ("step", "epoch", "lr", *MEASURES)
EPOCH_FILE = FISHER_SPECTRUM.files["epochs"]
EPOCH_COLUMNS = ("epoch", "step", "C_bar", "L", "lr", "batch_size")
EPOCH_PARTS = ("epoch", "trace_sigma", "grad_sq_norm")  # what epoch_noise_scale pools; checkpointed


class FisherSpectrum(TrickCallback):
    r"""Measure the approximate Fisher matrix F̃_k = J_kᵀJ_k of the training step's own backward.

    Seed 004 (``004_e5d92837cb57ce8a.txt`` §3, eq. 6–8) characterises SGD training by two running
    measures of F̃_k (B×B; column i of J_k is sample i's loss gradient over the trainable
    parameters), which this callback computes exactly from the training step's forward/backward
    (no second backward, no loop over samples; see :class:`~lightning_tricks.gradients.GramCollector`):

    - c_k = √(λmax / λmin≠0), the truncated condition number, and **C̄_K** its running mean (eq. 7);
    - l_k = (α_k / |B_k|) · √Tr(F̃_k), with α_k the learning rate of the first optimiser's first
      param group and |B_k| the batch size of the step, and **L_K = Σ l_k** (eq. 8);
    - also Tr F̃_k, λmax, the numerical rank |E_k| and the gradient-noise scale
      B_simple = tr Σ / |G|² from F̃_k alone, with both parts unbiased (McCandlish et al. 2018,
      appendix A): tr Σ and |G|² = (1ᵀF̃1 − Tr F̃) / (B(B − 1)) are logged too, so that a consumer
      can average them over a window before dividing; :attr:`epoch_noise_scale` does so over the
      current epoch (the adaptive ``BatchSizeScheduler`` reads it).

    **What counts as non-zero** decides c_k. The seed takes E_k as "the non-zero eigenvalues" and
    names no threshold; computed eigenvalues of a rank-deficient F̃ are round-off, so E_k keeps
    those above ``rank_rtol · λmax``, ``rank_rtol = B · eps`` of the gradient dtype by default
    (the rule of ``torch.linalg.matrix_rank``): |E_k| never exceeds the rank of J_k, but c_k is
    capped at (B·eps)^-½ — 256 at B = 128 in float32 — a cap that falls as B grows, the very axis
    seed 004 studies; compare batch sizes well below their caps (float64 gradients, or a smaller
    ``rank_rtol`` where F̃ is known to be full-rank, lift it).

    With ``every_n_steps = n > 1`` only the training steps with ``step % n == 0`` are measured
    (seed 004 measured every 50 mini-batches); each measured l_k then counts n times in L, so L
    estimates the every-step sum whatever n is. C̄ is the mean of the measured c_k.

    Logged at each measured step, to every logger and ``trainer.callback_metrics`` (one host
    transfer per measured step, never gated by ``log_every_n_steps``): ``fisher/c_k``,
    ``fisher/C_bar``, ``fisher/l_k``, ``fisher/L``, ``fisher/trace``, ``fisher/lambda_max`` (and
    their ``log10_``), ``fisher/rank``, ``fisher/noise_scale``, ``fisher/trace_sigma``,
    ``fisher/grad_sq_norm``, ``fisher/batch_size``; with ``log_eigenvalues=True`` a histogram
    ``fisher/eigenvalues`` to each TensorBoard logger. :attr:`history` holds one record per
    measured step of this fit (``step``, ``epoch``, ``lr`` and the names above without the
    prefix), also appended to ``fisher_history.csv`` in the run folder; ``.C_bar``, ``.L`` and
    ``.noise_scale`` are the latest values. Each epoch one row (epoch, step, C_bar, L, lr,
    batch_size) goes to ``fisher_spectrum.csv``, the input of
    :func:`lightning_tricks.plotting.beacon_map`. Checkpoints hold the running sums only.

    **Distributed.** Each rank measures F̃ of its local batch (the diagonal blocks of the global
    F̃; cross-rank blocks would need every rank's activations). Ranks then combine with one
    all-reduce per measured step: Tr F̃ is summed, so ``trace``, ``l_k`` and ``L`` are exactly those
    of the global batch (|B_k| the global batch size); ``c_k``, ``lambda_max`` and ``rank`` are the
    mean over ranks of the local values (identical to a single process only with one rank);
    ``trace_sigma`` and ``grad_sq_norm`` are averaged (each stays unbiased) and ``noise_scale`` is
    their ratio.

    **Scope.** Automatic optimisation without gradient accumulation: manual optimisation,
    ``accumulate_grad_batches > 1`` and a ``GradientAccumulationScheduler`` scheduling more than one
    batch are refused at ``setup`` (and accumulation again at every epoch start). F̃ covers the
    parameters that require grad at each measured step (freezing and unfreezing during training are
    followed; frozen ones are never touched); a weight tied between two modules is measured exactly;
    a parameter used outside its module (functionally) is refused at the first measured step (checked
    again whenever the trainable set changes). Steps without a backward (``training_step`` returning
    ``None``, SWA's BatchNorm pass, an empty batch, no optimiser) are not measured. The batch dimension must come first in every layer's input
    (checked against the batch's size). Training is untouched: parameters, buffers, optimiser state
    and ``requires_grad`` flags evolve bit for bit as without the callback. Hooks are attached for the
    measured steps only (an unmeasured step, and validation, run none of the callback's capture
    code; with ``every_n_steps=1`` they stay, idle, between steps) and removed at ``teardown`` or
    when the fit fails. The running measures restart with each ``fit`` (or
    continue from the checkpoint it resumes). A layer that runs several times in
    one step (weight sharing, two views of the batch) is measured exactly: sample i's gradient
    sums over every call. With a ``GradScaler`` (16-bit AMP), F̃ is divided by the squared loss
    scale. The gradients measured are those of the backward as performed: a callback scaling the
    loss (``RandomGradient``) scales F̃ by r².

    Args:
        every_n_steps: measure every n-th optimizer step (``>= 1``).
        loss_reduction: how the module's loss reduces over the batch, ``"mean"`` or ``"sum"``;
            with ``"mean"`` the columns are rescaled to the per-sample gradients ∇ℓ_i.
        rank_rtol: eigenvalues above ``rank_rtol · λmax`` are non-zero; ``None`` uses ``B · eps`` of
            the gradient dtype, the rule of ``torch.linalg.matrix_rank``.
        log_eigenvalues: also log the eigenvalues as a TensorBoard histogram.
        unsupported: ``"raise"`` on parameterised layers without a Gram rule, or ``"skip"`` them
            (one warning; F̃ then covers the supported layers only).

    Raises:
        ValueError: an argument out of range, or at ``setup`` a module/trainer it cannot measure.

    Example::

        >>> import lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> fisher = FisherSpectrum(every_n_steps=4)
        >>> trainer = L.Trainer(max_steps=8, callbacks=[fisher], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> [record["step"] for record in fisher.history], fisher.L > 0
        ([0, 4], True)
    """

    namespace = FISHER_SPECTRUM.namespace

    def __init__(
        self,
        every_n_steps: int = 1,
        loss_reduction: str = "mean",
        rank_rtol: float | None = None,
        log_eigenvalues: bool = False,
        unsupported: str = "raise",
    ) -> None:
        super().__init__()
        self.every_n_steps = checks.integer("every_n_steps", every_n_steps, minimum=1)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"`loss_reduction` must be one of {LOSS_REDUCTIONS}; got {loss_reduction!r}.")
        if rank_rtol is not None and not 0 < rank_rtol < 1:
            raise ValueError(f"`rank_rtol` must be None or in (0, 1); got {rank_rtol!r}.")
        if unsupported not in UNSUPPORTED:
            raise ValueError(f"`unsupported` must be one of {UNSUPPORTED}; got {unsupported!r}.")
        self.loss_reduction = loss_reduction
        self.rank_rtol = rank_rtol
        self.log_eigenvalues = log_eigenvalues
        self.unsupported = unsupported
        self._collector: GramCollector | None = None
        self._measuring = False
        self._checked_trainable: list[bool] | None = None
        self._params: list[torch.nn.Parameter] = []
        self._attached = False
        self._batch_size: int | None = None
        self._warned_non_finite = False
        self.reset_fit_state()

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        return {
            "c_k and its running mean C_bar (seed 004 eq. 7)": ["fisher/c_k", "fisher/C_bar"],
            "l_k and its running sum L (seed 004 eq. 8)": ["fisher/l_k", "fisher/L"],
            "gradient-noise scale and its parts": [
                "fisher/noise_scale",
                "fisher/trace_sigma",
                "fisher/grad_sq_norm",
            ],
            "spectrum": ["fisher/log10_trace", "fisher/log10_lambda_max", "fisher/rank"],
        }

    @override
    def metric_descriptions(self) -> dict[str, str]:
        return {
            "fisher/c_k": "c_k = sqrt(λmax / λmin≠0) of F̃_k = J_kᵀJ_k, the step's per-sample gradient Gram (seed 004 eq. 7).",
            "fisher/C_bar": "C̄_K, the running mean of the measured c_k (seed 004 eq. 7).",
            "fisher/l_k": "l_k = (α_k / |B_k|) · sqrt(Tr F̃_k) (seed 004 eq. 8).",
            "fisher/L": "L_K = Σ l_k, each measured l_k counted every_n_steps times (seed 004 eq. 8).",
            "fisher/trace": "Tr F̃_k = Σ_i ‖∇ℓ_i‖².",
            "fisher/lambda_max": "The largest eigenvalue of F̃_k.",
            "fisher/rank": "|E_k|, the number of non-zero eigenvalues of F̃_k (above rank_rtol·λmax).",
            "fisher/noise_scale": "B_simple = tr Σ / |G|², both unbiased (McCandlish et al. 2018, appendix A).",
            "fisher/trace_sigma": "tr Σ, the unbiased per-sample gradient variance summed over parameters.",
            "fisher/grad_sq_norm": "|G|² = (1ᵀF̃1 − Tr F̃) / (B(B − 1)), unbiased (may be ≤ 0 on one batch).",
            "fisher/batch_size": "|B_k|, the (global) batch size of the measured step.",
        }

    # -- public read-outs ------------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, float]]:
        """This fit's measurements, one record per measured step: ``step``, ``epoch``, ``lr``,
        ``c_k``, ``l_k``, ``C_bar``, ``L``, ``trace``, ``lambda_max``, ``rank``, ``noise_scale``,
        ``trace_sigma``, ``grad_sq_norm``, ``batch_size``."""
        return self._history

    @property
    def C_bar(self) -> float:
        """C̄_K, the running mean of the finite measured c_k (NaN before the first one)."""
        return self._running.compute()[0].item()

    @property
    def L(self) -> float:
        """L_K, the cumulative sum of l_k (each measured l_k counted ``every_n_steps`` times)."""
        return self._running.compute()[1].item()

    @property
    def noise_scale(self) -> float:
        """The latest measured gradient-noise scale B_simple (NaN before the first measurement)."""
        return self._history[-1]["noise_scale"] if self._history else math.nan

    @property
    def epoch_noise_scale(self) -> float:
        """tr Σ / |G|² with both parts averaged over this epoch's measurements before dividing
        (McCandlish et al. 2018, appendix A); NaN before the first measurement."""
        finite = [r for r in self._epoch_records if math.isfinite(r["trace_sigma"] + r["grad_sq_norm"])]
        if not finite:
            return math.nan
        trace_sigma = math.fsum(r["trace_sigma"] for r in finite) / len(finite)
        grad_sq_norm = math.fsum(r["grad_sq_norm"] for r in finite) / len(finite)
        return noise_scale_ratio(torch.tensor(trace_sigma), torch.tensor(grad_sq_norm)).item()

    # -- Lightning hooks -------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._check_trainer(trainer, pl_module)
        self._collector = GramCollector(
            pl_module,
            loss_reduction=self.loss_reduction,
            fuse_weight_grad="auto",  # bit-for-bit autograd's kernels; off under DDP
            unsupported=self.unsupported,
        )  # attached for measured steps only: an unmeasured step runs none of its code
        self._params = list(pl_module.parameters())
        self._checked_trainable = None
        self._attached = False

    @override
    def reset_fit_state(self) -> None:
        """Fresh running measures and history for a new fit (a resumed one loads them afterwards)."""
        self._running = FisherRunningSums()
        self._history: list[dict[str, float]] = []
        self._epoch_records: list[dict[str, float]] = []
        self._last_row: dict[str, float] | None = None
        self._rows_through = -1
        self._measuring = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A checkpoint saved on an epoch's last batch resumes in the next epoch: write its row now."""
        if (
            self._last_row is not None
            and self._rows_through < self._last_row["epoch"] < trainer.current_epoch
        ):
            self._write_epoch_row(self._last_row)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_accumulation(trainer)
        self._epoch_records = []

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._measuring = self._should_measure(trainer, batch)
        if self._measuring:
            self._start_capture(trainer, pl_module)
        else:
            self._unhook()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unhook()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._measuring and self._collector.track_outside_use:
            self._collector.check_outside_use(loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._measuring:
            return
        self._stop_capture()
        if self._collector.captured:  # else no backward ran (skipped step, SWA's BatchNorm pass)
            self._check_batch_dim()
            self._measure(trainer, pl_module, self._collector.matrix())
        self._collector.reset()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._measuring:  # the step was skipped (training_step returned None): nothing measured
            self._stop_capture()
            self._collector.reset()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_row is not None and self._last_row["epoch"] == trainer.current_epoch:
            self._write_epoch_row(self._last_row)

    @override
    def get_state(self) -> dict[str, Any]:
        return {
            "running": self._running.state_dict(),
            "last_row": self._last_row,
            "rows_through": self._rows_through,
            "epoch_parts": [{name: r[name] for name in EPOCH_PARTS} for r in self._epoch_records],
        }

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._running.load_state_dict(state["running"])
        self._last_row = state["last_row"]
        self._rows_through = state["rows_through"]
        self._epoch_records = [dict(parts) for parts in state.get("epoch_parts", [])]

    # -- internals -------------------------------------------------------------------------

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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

    def _check_accumulation(self, trainer: pl.Trainer, scheduled: int = 1) -> None:
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

    def _release(self) -> None:
        """Remove every hook and drop what was captured (teardown, or the fit failed)."""
        self._measuring = self._attached = False
        collector, self._collector = self._collector, None
        self._params = []
        if collector is not None:
            try:
                collector.detach()
            finally:
                collector.reset()

    def _start_capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the model for this step; the outside-use check (a walk over the whole autograd
        graph) runs at the first measured step and whenever the trainable set has changed, on a
        single process (the walk upsets DDP's reducer)."""
        trainable = [p.requires_grad for p in self._params]
        collector = self._collector
        collector.track_outside_use = trainer.world_size == 1 and trainable != self._checked_trainable
        if collector.track_outside_use:
            self._checked_trainable = trainable
        collector.reset()
        collector.enabled = True
        collector.attach()
        self._attached = True

    def _stop_capture(self) -> None:
        """End the step's capture (what it captured stays readable). The hooks come off unless
        the next step is measured too (``every_n_steps=1``): then they stay, idle, until a step
        is not measured, validation starts or the fit ends."""
        self._measuring = False
        self._collector.enabled = False
        if self.every_n_steps > 1:
            self._unhook()

    def _unhook(self) -> None:
        if self._attached:
            self._attached = False
            self._collector.detach()

    def _should_measure(self, trainer: pl.Trainer, batch: Any) -> bool:
        """Measured steps: ``step % every_n_steps == 0``, with a non-empty batch and an optimiser
        with a learning rate."""
        if (
            not is_due(self.training_step(trainer), self.every_n_steps)
            or first_learning_rate(trainer) is None
        ):
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

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, gram: Tensor) -> None:
        """Statistics of F̃_k (seed 004 eq. 6–8), combined over ranks, logged and recorded."""
        gram = gram / self._loss_scale(trainer) ** 2
        grad_dtype = next(p.dtype for p in self._params if p.requires_grad)
        stats = fisher_statistics(gram, self.rank_rtol, grad_dtype)
        summed = torch.stack([stats.trace, stats.batch_size])
        averaged = torch.stack(
            [stats.condition, stats.lambda_max, stats.rank, stats.trace_sigma, stats.grad_sq_norm]
        )
        (trace, batch), (condition, lambda_max, rank, trace_sigma, grad_sq_norm) = self._combine_ranks(
            trainer, summed, averaged
        )
        lr = first_learning_rate(trainer)
        energy = fisher_energy(trace, lr, batch)
        c_bar, total = self._running.update(condition, energy, weight=self.every_n_steps)
        values = {
            "c_k": condition, "l_k": energy, "C_bar": c_bar, "L": total, "trace": trace,
            "lambda_max": lambda_max, "rank": rank, "noise_scale": noise_scale_ratio(trace_sigma, grad_sq_norm),
            "trace_sigma": trace_sigma, "grad_sq_norm": grad_sq_norm, "batch_size": batch,
        }  # fmt: skip
        values.update({f"log10_{name}": values[name].log10() for name in LOG10_MEASURES})
        step = self.training_step(trainer)
        logged = self.log_scalars(
            trainer, {f"{self.namespace}/{name}": value for name, value in values.items()}, step
        )
        record = {"step": step, "epoch": trainer.current_epoch, "lr": lr}
        record.update({name: logged[f"{self.namespace}/{name}"] for name in MEASURES})
        self._record(record)
        if self.log_eigenvalues:
            self._log_eigenvalues(trainer, stats.eigenvalues, step)

    def _record(self, record: dict[str, float]) -> None:
        self._history.append(record)
        if self._epoch_records and self._epoch_records[-1]["epoch"] != record["epoch"]:
            self._epoch_records = []  # resumed from an epoch's last batch: no on_train_epoch_start ran
        self._epoch_records.append(record)
        self._last_row = {name: record[name] for name in EPOCH_COLUMNS}
        self.write_table(HISTORY_FILE, HISTORY_COLUMNS, [record], append=True)
        if not self._warned_non_finite and not (
            math.isfinite(record["c_k"]) and math.isfinite(record["l_k"])
        ):
            self._warned_non_finite = True
            rank_zero_warn(
                "FisherSpectrum: a measured F̃ had a non-finite entry or no non-zero eigenvalue; its c_k/l_k "
                "are NaN and left out of C_bar and L. Training continues."
            )

    def _write_epoch_row(self, row: dict[str, float]) -> None:
        self.write_table(EPOCH_FILE, EPOCH_COLUMNS, [row], append=True)
        self._rows_through = row["epoch"]

    @staticmethod
    def _combine_ranks(trainer: pl.Trainer, summed: Tensor, averaged: Tensor) -> tuple[Tensor, Tensor]:
        """Sums over ranks (trace, batch size) and means over ranks (the local statistics), in one all-reduce."""
        if trainer.world_size == 1:
            return summed, averaged
        total = trainer.strategy.reduce(torch.cat([summed, averaged]), reduce_op="sum")
        return total[: len(summed)], total[len(summed) :] / trainer.world_size

    @staticmethod
    def _loss_scale(trainer: pl.Trainer) -> float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    @staticmethod
    def _log_eigenvalues(trainer: pl.Trainer, eigenvalues: Tensor, step: int) -> None:
        if not trainer.is_global_zero:
            return
        values = torch.nan_to_num(eigenvalues).cpu()
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("fisher/eigenvalues", values, step)
