"""FisherSpectrum: the spectrum of the approximate Fisher matrix during training (seed 004)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from typing_extensions import override

from .. import checks
from ..gradients.fisher_capture import MEASURES, StepCapture, step_measures
from ..gradients.noise_scale import EpochNoiseScale, shared_noise_scale
from ..gradients.spectrum import FisherRunningSums, check_rank_rtol
from ..outputs import FISHER_SPECTRUM
from . import _fisher
from ._base import TrickCallback, first_learning_rate, is_due

HISTORY_FILE = FISHER_SPECTRUM.files["history"]
EPOCH_FILE = FISHER_SPECTRUM.files["epochs"]


class FisherSpectrum(_fisher.FisherReadouts, TrickCallback):
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

    **What counts as non-zero** decides c_k: E_k keeps the eigenvalues above ``rank_rtol · λmax``,
    ``rank_rtol = B · eps`` of the gradient dtype by default (``torch.linalg.matrix_rank``'s rule),
    which caps c_k at (B·eps)^-½ — 256 at B = 128 in float32, falling as B grows; compare batch
    sizes well below their caps (:func:`~lightning_tricks.gradients.fisher_statistics`).

    With ``every_n_steps = n > 1`` only the training steps with ``step % n == 0`` are measured
    (seed 004 measured every 50 mini-batches); each measured l_k then counts n times in L, so L
    estimates the every-step sum whatever n is. C̄ is the mean of the measured c_k.

    Logged at each measured step, to every logger and ``trainer.callback_metrics`` (never gated by
    ``log_every_n_steps``): ``fisher/<name>`` for ``c_k``, ``C_bar``, ``l_k``, ``L``, ``trace``,
    ``lambda_max`` (and their ``log10_``), ``rank``, ``noise_scale``, ``trace_sigma``,
    ``grad_sq_norm``, ``batch_size``, the gradient tests ``norm_test``, ``inner_test`` and
    ``ortho_test`` (:func:`~lightning_tricks.gradients.gradient_tests.gradient_tests`, from the same
    F̃: the smallest threshold each test passes with, as Cockpit plots them); with ``log_eigenvalues=True`` a histogram
    ``fisher/eigenvalues`` to each TensorBoard logger. :attr:`history` holds one record per measured
    step of this fit (``step``, ``epoch``, ``lr`` and the names above), also appended to
    ``fisher_history.csv`` in the run folder (each row on disk as soon as it is measured); ``.C_bar``, ``.L`` and ``.noise_scale`` are the
    latest values. Each epoch one row (epoch, step, C_bar, L, lr of its last measurement and its
    largest measured batch_size) goes to ``fisher_spectrum.csv``, the input of :func:`lightning_tricks.plotting.beacon_map`.
    Checkpoints hold the running sums only; a resumed fit puts ``C_bar`` and ``L`` back into
    ``trainer.callback_metrics`` at its start. One device-to-host transfer per measured step (F̃).

    **Distributed.** Each rank measures F̃ of its local batch (the diagonal blocks of the global
    F̃); one all-reduce per measured step sums Tr F̃ (``trace``, ``l_k`` and ``L`` are the global
    batch's) and averages ``c_k``, ``lambda_max``, ``rank``, ``trace_sigma`` and ``grad_sq_norm``
    over ranks (``noise_scale`` is the ratio of the averaged parts).

    **Scope.** Automatic optimisation without gradient accumulation (manual optimisation,
    ``accumulate_grad_batches > 1`` or a ``GradientAccumulationScheduler`` giving more than one batch
    are refused at ``setup``, accumulation again at each epoch start). F̃ covers the parameters that
    require grad at each measured step (freezing and unfreezing are followed; frozen ones are never
    touched); tied weights and layers run several times in one step are measured exactly; a
    parameter used outside its module (functionally) is refused at the first measured step (again
    whenever the trainable set changes). Steps without a backward (``training_step`` returning
    ``None``, SWA's BatchNorm pass, an empty batch, no optimiser) are not measured; the batch
    dimension must come first in every layer's input (checked against the batch's size). Training
    is untouched: parameters, buffers, optimiser state and ``requires_grad`` evolve bit for bit as
    without the callback. Hooks are on the model for measured steps only (an unmeasured step and
    validation run none of the capture code; with ``every_n_steps=1`` they stay, idle, between
    steps), removed at ``teardown`` or when the fit fails. The running measures restart with each
    ``fit`` (or continue from the checkpoint it resumes). With a ``GradScaler`` (16-bit AMP), F̃ is
    divided by the squared loss scale; a callback scaling the loss (``RandomGradient``) scales F̃ by r².

    Args:
        every_n_steps: measure every n-th optimizer step (``>= 1``).
        loss_reduction: how the module's loss reduces over the batch, ``"mean"`` or ``"sum"``;
            with ``"mean"`` the columns are rescaled to the per-sample gradients ∇ℓ_i.
        rank_rtol: eigenvalues above ``rank_rtol · λmax`` are non-zero; ``None`` uses ``B · eps`` of
            the gradient dtype, the rule of ``torch.linalg.matrix_rank``.
        log_eigenvalues: also log the eigenvalues as a TensorBoard histogram.
        unsupported: ``"raise"`` on parameterised layers without a Gram rule (or refused in
            training mode), or ``"skip"`` them (one warning; F̃ then covers the rest only).
        exclude: names of modules (as in ``pl_module.named_modules()``) whose parameters F̃ leaves
            out (they train as usual), e.g. a compiled submodule; F̃ then covers the rest only.

    Raises:
        ValueError: an argument out of range, or at ``setup`` a module/trainer it cannot measure
            (an ``exclude`` name the module does not have, a compiled module).

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
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.every_n_steps = checks.integer("every_n_steps", every_n_steps, minimum=1)
        self.loss_reduction = checks.choice("loss_reduction", loss_reduction, ("mean", "sum"))
        self.rank_rtol = check_rank_rtol(rank_rtol, allow_zero=False)
        self.log_eigenvalues = checks.boolean("log_eigenvalues", log_eigenvalues)
        self.unsupported = checks.choice("unsupported", unsupported, ("raise", "skip"))
        self.exclude = checks.strings("exclude", exclude, what="module names")
        self._capture: StepCapture | None = None
        self._measuring = False
        self._batch_size: int | None = None
        self._warned_non_finite = False
        self._history_file = _fisher.TableAppender(HISTORY_FILE, _fisher.HISTORY_COLUMNS)
        self.reset_fit_state()

    # -- Lightning hooks -------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            _fisher.check_trainer(trainer, pl_module)
            self._noise = shared_noise_scale(trainer, feeder=type(self).__name__)  # read by policies
            self._capture = StepCapture(  # attached for measured steps only
                pl_module,
                self.every_n_steps == 1,
                loss_reduction=self.loss_reduction,
                unsupported=self.unsupported,
                exclude=self.exclude,
            )

    @override
    def reset_fit_state(self) -> None:
        """Fresh running measures and records for a new fit (a resumed one loads them afterwards)."""
        self._running = FisherRunningSums()
        self._records = _fisher.FisherRecords()
        self._noise = EpochNoiseScale()  # this epoch's pooled noise-scale parts
        self._measuring = False
        self._history_file.close()  # the new fit's first row decides the file

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
        self._write_epoch_row(self._records.row_due_at_start(trainer.current_epoch))
        _fisher.restore_live_measures(trainer, self.namespace, self._running)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _fisher.check_accumulation(trainer)
        self._noise.start(trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._measuring = self._should_measure(trainer, batch)
        if self._measuring:  # the outside-use walk upsets DDP's reducer: single process only
            self._capture.start(check_outside_use=trainer.world_size == 1)
        elif self._capture is not None:
            self._capture.unhook()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture is not None:
            self._capture.unhook()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._measuring:
            self._capture.before_backward(loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._measuring:
            self._measuring = False
            gram = self._capture.stop()  # None: no backward ran (skipped step, SWA's BatchNorm pass)
            if gram is not None:
                _fisher.check_batch_dim(self._batch_size, self._capture.batch_size)
                self._measure(trainer, gram)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._measuring:  # the step was skipped (training_step returned None): nothing measured
            self._measuring = False
            self._capture.stop()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_epoch_row(self._records.row_due_at_end(trainer.current_epoch))

    @override
    def get_state(self) -> dict[str, Any]:
        return {
            "running": self._running.state_dict(),
            "epoch_parts": self._noise.state_dict(),
            **self._records.state(),
        }

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._running.load_state_dict(state["running"])
        self._records.load(state)
        self._noise.load_state_dict(state.get("epoch_parts", []))

    # -- internals -------------------------------------------------------------------------

    def _release(self) -> None:
        """Remove every hook and drop what was captured (teardown, or the fit failed)."""
        self._measuring = False
        self._history_file.close()
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()

    def _should_measure(self, trainer: pl.Trainer, batch: Any) -> bool:
        """Measured steps: ``step % every_n_steps == 0``, with a non-empty batch and an optimiser
        with a learning rate."""
        due = is_due(self.training_step(trainer), self.every_n_steps)
        if not due or first_learning_rate(trainer) is None:
            return False
        _fisher.check_accumulation(trainer)
        try:
            self._batch_size = extract_batch_size(batch)
        except Exception:  # no tensor found: the collector's own batch size is used unchecked
            self._batch_size = None
        return self._batch_size != 0

    def _measure(self, trainer: pl.Trainer, gram: Tensor) -> None:
        """Statistics of F̃_k (seed 004 eq. 6–8), combined over ranks, logged and recorded."""
        scale = _fisher.loss_scale(trainer)
        lr = first_learning_rate(trainer)
        values, eigenvalues = step_measures(
            gram if scale == 1.0 else gram / scale**2,
            self._running,
            lr,
            self.every_n_steps,
            self.rank_rtol,
            self._capture.grad_dtype,
            None if trainer.world_size == 1 else partial(_fisher.combine_ranks, trainer),
        )
        step = self.training_step(trainer)
        self.log_scalars(trainer, {f"{self.namespace}/{name}": value for name, value in values.items()}, step)
        record = {"step": step, "epoch": trainer.current_epoch, "lr": lr, **{n: values[n] for n in MEASURES}}
        self._records.add(record)
        self._noise.add(record["epoch"], record["trace_sigma"], record["grad_sq_norm"])
        self._history_file.append(self, record)
        finite = math.isfinite(record["c_k"]) and math.isfinite(record["l_k"])
        if not (finite or self._warned_non_finite):
            self._warned_non_finite = True
            rank_zero_warn(
                "FisherSpectrum: a measured F̃ had a non-finite entry or no non-zero eigenvalue; its c_k/l_k "
                "are NaN and left out of C_bar and L. Training continues."
            )
        if self.log_eigenvalues:
            _fisher.log_histogram(trainer, "fisher/eigenvalues", eigenvalues, step)

    def _write_epoch_row(self, row: dict[str, float] | None) -> None:
        if row is not None:
            self.write_table(EPOCH_FILE, _fisher.EPOCH_COLUMNS, [row], append=True)
            self._records.rows_through = row["epoch"]
