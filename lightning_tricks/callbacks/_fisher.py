"""What :class:`~lightning_tricks.callbacks.FisherSpectrum` keeps besides its hooks: the trainer
settings it refuses, its records (history, the epoch's measurements, the per-epoch row and its
repair on resume) and the descriptions of its tags. The measurement itself is
:mod:`lightning_tricks.gradients.fisher_capture`."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ..gradients.fisher_capture import MEASURES
from ..gradients.noise_scale import EpochNoiseScale
from ..gradients.spectrum import FisherRunningSums

if TYPE_CHECKING:
    from ._base import TrickCallback

HISTORY_COLUMNS = ("step", "epoch", "lr", *MEASURES)
EPOCH_COLUMNS = ("epoch", "step", "C_bar", "L", "lr", "batch_size")

DASHBOARD_LAYOUT = {
    "c_k and its running mean C_bar (seed 004 eq. 7)": ["fisher/c_k", "fisher/C_bar"],
    "l_k and its running sum L (seed 004 eq. 8)": ["fisher/l_k", "fisher/L"],
    "gradient-noise scale and its parts": ["fisher/noise_scale", "fisher/trace_sigma", "fisher/grad_sq_norm"],
    "spectrum": ["fisher/log10_trace", "fisher/log10_lambda_max", "fisher/rank"],
    "gradient tests (Byrd 2012, Bollapragada 2018)": [
        "fisher/norm_test",
        "fisher/inner_test",
        "fisher/ortho_test",
    ],
}

DESCRIPTIONS = {
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
    "fisher/norm_test": "θ_norm = sqrt(tr Σ / (B‖ḡ‖²)), the smallest θ Byrd et al.'s (2012) norm test passes with.",
    "fisher/inner_test": "θ_inner = sqrt(Var_i(g_iᵀḡ) / (B‖ḡ‖⁴)), the smallest θ of Bollapragada et al.'s (2018) inner-product test.",
    "fisher/ortho_test": "ν = sqrt(E_i‖g_i − (g_iᵀḡ/‖ḡ‖²)ḡ‖² / (B‖ḡ‖²)), the smallest ν of Bollapragada et al.'s orthogonality test.",
}


def restore_live_measures(trainer: pl.Trainer, namespace: str, running: FisherRunningSums) -> None:
    """Put a resumed run's C̄_K and L_K back into ``trainer.callback_metrics`` (which checkpoints do
    not hold), so that what reads them before the next measurement — a batch-size policy deciding at
    the resumed epoch's start, a monitor — sees the values the uninterrupted run had. Nothing for a
    run without measurements."""
    state = running.state_dict()
    if state["count"] or state["energy_sum"]:
        c_bar, total = (torch.as_tensor(value, dtype=torch.float64) for value in running.compute())
        trainer.callback_metrics.update({f"{namespace}/C_bar": c_bar, f"{namespace}/L": total})


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse manual optimisation and gradient accumulation (also scheduled), with one clear error."""
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
    check_accumulation(trainer, max(scheduled, default=1))


def check_accumulation(trainer: pl.Trainer, scheduled: int = 1) -> None:
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


def check_batch_dim(batch_size: int | None, measured: int | None) -> None:
    """The layers' leading dimension must be the batch's size (where the batch's is known)."""
    if batch_size is not None and measured != batch_size:
        raise ValueError(
            f"FisherSpectrum: the layers' inputs have {measured} as their leading dimension but the "
            f"batch has {batch_size} samples; F̃ needs the batch dimension first in every "
            "layer's input (e.g. `batch_first=True`, or transpose sequence-first tensors back "
            "before the layers)."
        )


def combine_ranks(trainer: pl.Trainer, summed: Tensor, averaged: Tensor) -> tuple[Tensor, Tensor]:
    """Sums over ranks (trace, batch size) and means over ranks (the local statistics), in one
    all-reduce on the strategy's device, back on the host."""
    total = trainer.strategy.reduce(
        torch.cat([summed, averaged]).to(trainer.strategy.root_device), reduce_op="sum"
    )
    total = total.cpu()
    return total[: len(summed)], total[len(summed) :] / trainer.world_size


def log_histogram(trainer: pl.Trainer, tag: str, values: np.ndarray, step: int) -> None:
    """``values`` (NaN as 0) as a histogram to each TensorBoard logger; rank 0 only."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(tag, np.nan_to_num(values), step)


def loss_scale(trainer: pl.Trainer) -> float:
    """The ``GradScaler``'s scale under 16-bit AMP, else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


class FisherReadouts:
    """FisherSpectrum's read-outs, from its running sums (``_running``), records (``_records``) and
    the epoch's pooled noise-scale parts (``_noise``), and its TensorBoard layout and descriptions."""

    _running: FisherRunningSums
    _records: FisherRecords
    _noise: EpochNoiseScale

    def dashboard_layout(self) -> dict[str, list[str]]:
        """The Custom Scalars charts of FisherSpectrum's tags (:data:`DASHBOARD_LAYOUT`)."""
        return DASHBOARD_LAYOUT

    def metric_descriptions(self) -> dict[str, str]:
        """The descriptions of FisherSpectrum's tags (:data:`DESCRIPTIONS`)."""
        return DESCRIPTIONS

    @property
    def history(self) -> list[dict[str, float]]:
        """This fit's measurements, one record per measured step: ``step``, ``epoch``, ``lr`` and
        the measures (``c_k``, ``l_k``, ``C_bar``, ``L``, ``trace``, ``lambda_max``, ``rank``,
        ``noise_scale``, ``trace_sigma``, ``grad_sq_norm``, ``batch_size``)."""
        return self._records.history

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
        return self.history[-1]["noise_scale"] if self.history else math.nan

    @property
    def epoch_noise_scale(self) -> float:
        """tr Σ / |G|² with both parts averaged over this epoch's measurements before dividing
        (McCandlish et al. 2018, appendix A); NaN before the first measurement."""
        return self._noise.value()


class TableAppender:
    """One CSV of the run folder that gets a row per measured step, through a file kept open.

    A fit's first row goes through ``write_table`` (which continues the file of a resumed run and
    writes the header); the file then stays open and each further row is written and flushed at
    once — the operating system holds it even if the process is killed the next moment — without
    the open, stat and close of a ``write_table`` a row. :meth:`close` at teardown, on an exception
    and at a new fit. Off rank 0 nothing is written, as with ``write_table``.
    """

    def __init__(self, name: str, columns: Sequence[str]) -> None:
        self.name, self.columns = name, tuple(columns)
        self._handle: TextIO | None = None
        self._writer: Any = None

    def append(self, callback: TrickCallback, row: Mapping[str, Any]) -> None:
        """Write ``row`` (its :attr:`columns`) to ``callback``'s run folder, on disk when this returns."""
        if self._handle is None:
            path = callback.write_table(self.name, self.columns, [row], append=True)
            if path is not None:
                self._handle = open(path, "a", newline="")  # noqa: SIM115 (kept open for the fit)
                self._writer = csv.writer(self._handle)
            return
        self._writer.writerow([row[column] for column in self.columns])
        self._handle.flush()

    def close(self) -> None:
        """Close the file (the next row opens it again through ``write_table``)."""
        handle, self._handle, self._writer = self._handle, None, None
        if handle is not None:
            handle.close()


class FisherRecords:
    """One fit's measurements: :attr:`history` (one record per measured step) and the epoch's row
    of ``fisher_spectrum.csv``, due at the epoch's end, or at the next train start when a
    checkpoint saved on an epoch's last batch resumes in the next epoch."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.last_row: dict[str, float] | None = None
        self.rows_through = -1

    def add(self, record: dict[str, float]) -> None:
        """Keep ``record``; the epoch's row is its latest measurement with the epoch's largest
        measured batch size (the loader's size: the epoch's last batch may be smaller)."""
        self.history.append(record)
        row = {name: record[name] for name in EPOCH_COLUMNS}
        if self.last_row is not None and self.last_row["epoch"] == row["epoch"]:
            row["batch_size"] = max(row["batch_size"], self.last_row["batch_size"])
        self.last_row = row

    def row_due_at_start(self, epoch: int) -> dict[str, float] | None:
        """The last epoch's row if the fit resumes in epoch ``epoch`` before it was written."""
        row = self.last_row
        return row if row is not None and self.rows_through < row["epoch"] < epoch else None

    def row_due_at_end(self, epoch: int) -> dict[str, float] | None:
        row = self.last_row
        return row if row is not None and row["epoch"] == epoch else None

    def state(self) -> dict[str, Any]:
        return {
            "last_row": self.last_row,
            "rows_through": self.rows_through,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.last_row = state["last_row"]
        self.rows_through = state["rows_through"]
