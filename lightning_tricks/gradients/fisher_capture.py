"""One :class:`~lightning_tricks.gradients.GramCollector` driven step by step, and the measures of
seed 004 (``004_e5d92837cb57ce8a.txt`` §3, eq. 6–8) computed from one step's F̃_k: what
``FisherSpectrum`` does at a measured step, without Lightning.

:class:`StepCapture` attaches the collector's hooks for measured steps only (an unmeasured step
runs none of its code), re-runs the outside-use check when the trainable set changes, and hands
back F̃_k; :func:`step_measures` turns F̃_k into the logged values on the host, with one transfer
(NumPy arithmetic there, no tensor op but the transfer and the eigenvalues).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ._arrays import quiet
from .gradient_tests import gradient_tests
from .gram import GramCollector
from .spectrum import FisherRunningSums, fisher_energy, fisher_statistics, noise_scale_ratio

MEASURES = (
    "c_k", "l_k", "C_bar", "L", "trace", "lambda_max", "rank",
    "noise_scale", "trace_sigma", "grad_sq_norm", "batch_size",
    "norm_test", "inner_test", "ortho_test",
)  # fmt: skip
"""What one measured step yields (with ``log10_trace`` and ``log10_lambda_max`` beside them)."""
LOG10_MEASURES = ("trace", "lambda_max")


class StepCapture:
    """F̃_k of the steps a caller chooses to measure, from the step's own forward and backward.

    Args:
        model: the module trained.
        keep_attached: leave the hooks on between two measured steps (every step measured); else
            they come off after each measured step.
        **collector: ``GramCollector`` arguments (``loss_reduction``, ``unsupported``, ...).
    """

    def __init__(self, model: nn.Module, keep_attached: bool, **collector: object) -> None:
        self.collector = GramCollector(model, **collector)
        self.keep_attached = keep_attached
        self.measuring = False
        self.batch_size: int | None = None
        """B of the last stopped capture (the layers' leading dimension)."""
        self._params = list(model.parameters())
        self._checked_trainable: list[bool] | None = None
        self._attached = False

    def start(self, check_outside_use: bool = True) -> None:
        """Capture this step. The outside-use check (a walk over the whole autograd graph) runs at
        the first measured step and whenever the trainable set changed, if ``check_outside_use``."""
        trainable = [p.requires_grad for p in self._params]
        collector = self.collector
        collector.track_outside_use = check_outside_use and trainable != self._checked_trainable
        if collector.track_outside_use:
            self._checked_trainable = trainable
        collector.reset()
        collector.enabled = True
        collector.attach()
        self.measuring = self._attached = True

    def before_backward(self, loss: Tensor) -> None:
        """The forward is done: the outside-use check where due, and no leaf hook left where a
        gradient is expected (:meth:`GramCollector.forward_done`)."""
        if self.measuring:
            if self.collector.track_outside_use:
                self.collector.check_outside_use(loss)
            self.collector.forward_done()

    def stop(self) -> Tensor | None:
        """End the step's capture: F̃_k (float64, on the model's device) if a backward ran, else
        ``None``; what was captured is dropped."""
        self.measuring = False
        collector = self.collector
        collector.enabled = False
        if not self.keep_attached:
            self.unhook()
        self.batch_size = collector.batch_size
        try:
            return collector.matrix() if collector.captured else None
        finally:
            collector.reset()

    def unhook(self) -> None:
        """Take the hooks off (a step that is not measured, validation); nothing runs if they are off."""
        if self._attached:
            self._attached = False
            self.collector.detach()

    def release(self) -> None:
        """Remove every hook and drop what was captured (end of fit, or a failure)."""
        self.measuring = self._attached = False
        try:
            self.collector.detach()
        finally:
            self.collector.reset()

    @property
    def grad_dtype(self) -> torch.dtype:
        """The dtype of the (first) trainable parameter: that of the gradients behind F̃."""
        return next(p.dtype for p in self._params if p.requires_grad)


@quiet
def step_measures(
    gram: Tensor,
    running: FisherRunningSums,
    learning_rate: float,
    weight: int,
    rank_rtol: float | None = None,
    grad_dtype: torch.dtype = torch.float32,
    combine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """The measures of one F̃_k (seed 004 eq. 6–8; :func:`fisher_statistics`) and the gradient tests
    of its batch (:func:`~lightning_tricks.gradients.gradient_tests.gradient_tests`) as Python
    floats, and F̃'s eigenvalues (a NumPy float64 array).

    F̃ goes to the host once (the only device sync); there its eigenvalues come from LAPACK
    (``torch.linalg.eigvalsh``) and every statistic from the same functions on a NumPy view of it:
    a few dozen NumPy scalar operations, no tensor op but the transfer and the eigenvalues.
    ``combine(summed, averaged)`` merges ranks (tensors: a sum of (Tr F̃, B), a mean of the other
    statistics); ``running`` adds c_k and ``weight`` · l_k, l_k = (α/|B|)·√Tr F̃
    (:func:`fisher_energy`), and gives C̄_K and L_K.
    """
    host_gram = gram.detach().to("cpu", torch.float64).numpy()
    stats = fisher_statistics(host_gram, rank_rtol, grad_dtype)
    tests = gradient_tests(host_gram, stats.trace_sigma)
    trace, batch, noise_scale = stats.trace, stats.batch_size, stats.noise_scale
    averaged = (
        stats.condition,
        stats.lambda_max,
        stats.rank,
        stats.trace_sigma,
        stats.grad_sq_norm,
        tests.norm_test,
        tests.inner_test,
        tests.ortho_test,
    )
    if combine is not None:
        summed, averaged = combine(torch.tensor([trace, batch], dtype=torch.float64), torch.tensor(averaged))
        (trace, batch), averaged = summed.cpu().numpy(), averaged.cpu().numpy()
        noise_scale = noise_scale_ratio(averaged[3], averaged[4])
    condition, lambda_max, rank, trace_sigma, grad_sq_norm, *gradient_test_values = averaged
    energy = fisher_energy(trace, learning_rate, batch)
    c_bar, total = running.update(condition, energy, weight=weight)
    values = [
        condition,
        energy,
        c_bar,
        total,
        trace,
        lambda_max,
        rank,
        noise_scale,
        trace_sigma,
        grad_sq_norm,
        batch,
        *gradient_test_values,
    ]  # fmt: skip  (the order of MEASURES)
    logged = np.array([*values, np.log10(trace), np.log10(lambda_max)]).tolist()
    names = (*MEASURES, *(f"log10_{name}" for name in LOG10_MEASURES))
    return dict(zip(names, logged)), stats.eigenvalues
