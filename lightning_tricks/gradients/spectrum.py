"""Spectral statistics of the approximate Fisher matrix F̃ = JᵀJ (seed 004), the gradient-noise
scale read from the same matrix (McCandlish et al. 2018), and the running measures C̄_K and L_K.

Each formula is written once and runs on what it is given: a tensor (any device;
every statistic stays a tensor there, no host synchronisation) or a NumPy float64 array on the host
(NumPy numbers out, about a microsecond an operation: FisherSpectrum's path for its B×B host matrix).
A non-finite F̃ gives NaN statistics instead of an exception.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import checks
from ._arrays import (
    constant,
    eigvalsh,
    float64,
    namespace,
    nonnegative,
    quiet,
    same_kind,
    stack,
    total,
    where,
)
from .noise_scale import noise_scale_ratio, pooled_noise_scale  # noqa: F401 (the formula lives there)


class FisherStatistics(NamedTuple):
    """Statistics of one F̃_k, float64, 0-d but for ``eigenvalues``: tensors on F̃'s device for a
    tensor F̃, ``numpy.float64`` numbers (and a NumPy array of eigenvalues) for a NumPy F̃."""

    condition: Tensor | np.ndarray | float
    """c_k = √(max E_k / min E_k), the truncated condition number (seed 004 eq. 7)."""
    trace: Tensor | np.ndarray | float
    """Tr F̃_k = Σ_i ‖∇ℓ_i‖², the energy of F̃_k (seed 004 eq. 8)."""
    lambda_max: Tensor | np.ndarray | float
    """Largest eigenvalue of F̃_k."""
    rank: Tensor | np.ndarray | float
    """|E_k|, the number of eigenvalues above ``rank_rtol · λmax`` (the numerical rank of J_k)."""
    noise_scale: Tensor | np.ndarray | float
    """B_simple = tr Σ / |G|² of this batch alone (:func:`noise_scale_ratio`; +inf when |G|² ≤ 0)."""
    trace_sigma: Tensor | np.ndarray | float
    """tr Σ, the unbiased per-sample gradient variance summed over parameters."""
    grad_sq_norm: Tensor | np.ndarray | float
    """|G|², the unbiased estimate of the squared norm of the mean gradient (can be ≤ 0)."""
    batch_size: Tensor | np.ndarray | float
    """B, the number of samples (columns of J_k)."""
    eigenvalues: Tensor | np.ndarray
    """(B,) ascending float64 eigenvalues of F̃_k (NaN when F̃_k has a non-finite entry)."""


def default_rank_rtol(batch_size: int, dtype: torch.dtype) -> float:
    """``B · eps(dtype)``: the tolerance ``torch.linalg.matrix_rank`` uses for a B×B matrix whose
    entries were computed in ``dtype`` (the dtype of the gradients, not of F̃'s float64 storage).

    It caps c_k at (B · eps)^-½, a cap that falls as B grows: for float32 gradients 724 at B = 16,
    256 at B = 128, 64 at B = 2048 (see :func:`truncated_condition_number`).
    """
    return batch_size * _eps(dtype)


@functools.cache
def _eps(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).eps``, looked up once (``finfo`` takes microseconds)."""
    return torch.finfo(dtype).eps


@quiet
def truncated_condition_number(
    eigenvalues: Tensor | np.ndarray, rank_rtol: float
) -> tuple[Tensor | np.ndarray | float, Tensor | np.ndarray | float]:
    """c = √(max E / min E) over the non-zero set E = {λ : λ > rank_rtol · λmax}, and |E|.

    Seed 004_e5d92837cb57ce8a.txt §3, eq. 7: c_k = σmax(E_k)/σmin(E_k) with σ = λ^½, the ratio of
    the largest to the smallest non-zero singular value of J_k. ``eigenvalues`` are ascending
    (``torch.linalg.eigvalsh``, a tensor or a NumPy array); c is NaN when there is no positive eigenvalue.

    **Cap.** Every λ in E exceeds ``rank_rtol · λmax``, so c < rank_rtol^-½ whatever the data: with
    the default ``B · eps`` (:func:`default_rank_rtol`) the cap is (B · eps)^-½, 256 at B = 128 for
    float32 gradients, and it falls as B grows. ``rank_rtol = 0`` keeps every positive eigenvalue
    (no cap; negative round-off eigenvalues of the positive semi-definite F̃ are dropped).
    """
    xp = namespace(eigenvalues)
    lambda_max = eigenvalues[-1]
    nonzero = eigenvalues > rank_rtol * lambda_max
    lambda_min = where(nonzero, eigenvalues, math.inf).min()
    condition = where(lambda_max > 0, xp.sqrt(lambda_max / lambda_min), math.nan)
    return condition, float64(nonzero.sum())


def gradient_noise_parts(
    gram: Tensor | np.ndarray,
) -> tuple[Tensor | np.ndarray | float, Tensor | np.ndarray | float]:
    """Unbiased tr Σ and |G|² from F̃ alone (columns of J are the per-sample gradients g_i).

    McCandlish et al. 2018 (An Empirical Model of Large-Batch Training), appendix A, with
    B_small = 1 and B_big = B, written with 1ᵀF̃1 = ‖Σ_i g_i‖² and Tr F̃ = Σ_i ‖g_i‖²:

    - |G|² = (1ᵀF̃1 − Tr F̃) / (B(B − 1)), the mean of ⟨g_i, g_j⟩ over i ≠ j;
    - tr Σ = (Tr F̃ − 1ᵀF̃1 / B) / (B − 1), the per-sample variance summed over parameters.

    Both are unbiased. The batch mean's ‖ḡ‖² = 1ᵀF̃1 / B² is not: it overestimates |G|² by tr Σ / B,
    which caps tr Σ / ‖ḡ‖² near B. |G|² can come out ≤ 0 when the noise hides the mean gradient;
    tr Σ is ≥ 0 (round-off below 0 is clamped). Both NaN for B = 1. ``gram`` may carry leading
    batch dimensions (..., B, B); a tensor or a NumPy array.
    """
    batch = gram.shape[-1]
    trace = gram.diagonal(0, -2, -1).sum(-1)
    entry_sum = gram.sum((-2, -1))
    if batch < 2:
        nan = constant(entry_sum, math.nan)
        return nan, nan
    trace_sigma = nonnegative((trace - entry_sum / batch) / (batch - 1))
    grad_sq_norm = (entry_sum - trace) / (batch * (batch - 1))
    return trace_sigma, grad_sq_norm


class NoiseScaleEstimate:
    """Exponential moving averages of tr Σ and |G|², and their ratio B_simple.

    McCandlish et al. 2018, appendix A: average the unbiased parts separately, then divide. Each
    :meth:`update` folds in one measurement: S ← decay · S + (tr Σ, |G|², 1); the averages are S's
    first two entries over the third (the sum of weights, so no start-up bias), and ``decay = 1``
    gives the plain mean of all measurements. A measurement with a non-finite part is left out.
    Device tensors only; reading :attr:`estimate` does not sync.

    Args:
        decay: weight of the past per update, in (0, 1]; the memory is about 1 / (1 − decay)
            measurements.

    Example:
        >>> estimate = NoiseScaleEstimate(decay=1.0)
        >>> for tr_sigma, g2 in [(100.0, 2.0), (100.0, -0.5), (100.0, 1.5)]:
        ...     _ = estimate.update(torch.tensor(tr_sigma), torch.tensor(g2))
        >>> round(estimate.estimate.item(), 3)
        100.0
    """

    def __init__(self, decay: float = 0.95) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(
                f"`decay` must be a number in (0, 1] (1 = plain mean of all updates); got {decay!r}."
            )
        self.decay = float(decay)
        self._sums = torch.zeros(3, dtype=torch.float64)

    def update(self, trace_sigma: Tensor, grad_sq_norm: Tensor) -> Tensor:
        """Fold in one measurement's unbiased parts; return the updated B_simple."""
        parts = torch.stack([trace_sigma, grad_sq_norm]).to(torch.float64)
        finite = torch.isfinite(parts).all()
        step = torch.cat([parts, parts.new_ones(1)])
        sums = self._sums.to(step.device)
        self._sums = torch.where(finite, self.decay * sums + step, sums)
        return self.estimate

    @property
    def trace_sigma(self) -> Tensor:
        """The averaged tr Σ (NaN before the first finite measurement)."""
        return self._sums[0] / self._sums[2]

    @property
    def grad_sq_norm(self) -> Tensor:
        """The averaged |G|² (NaN before the first finite measurement)."""
        return self._sums[1] / self._sums[2]

    @property
    def estimate(self) -> Tensor:
        """B_simple = averaged tr Σ / averaged |G|² (:func:`noise_scale_ratio` conventions)."""
        return noise_scale_ratio(self._sums[0], self._sums[1])

    def state_dict(self) -> dict[str, float]:
        trace_sigma, grad_sq_norm, weight = self._sums.tolist()
        return {
            "decay": self.decay,
            "trace_sigma": trace_sigma,
            "grad_sq_norm": grad_sq_norm,
            "weight": weight,
        }

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restore the averages; the estimate goes on with the ``decay`` it was saved with."""
        self.decay = float(state_dict["decay"])
        keys = ("trace_sigma", "grad_sq_norm", "weight")
        self._sums = torch.tensor([state_dict[key] for key in keys], dtype=torch.float64)


@quiet
def fisher_statistics(
    gram: Tensor | np.ndarray,
    rank_rtol: float | None = None,
    grad_dtype: torch.dtype = torch.float32,
) -> FisherStatistics:
    """Statistics of F̃_k = J_kᵀJ_k (seed 004_e5d92837cb57ce8a.txt §3, eq. 6–8) and the
    gradient-noise scale from the same matrix (McCandlish et al. 2018, appendix A).

    Eq. 7 takes c_k over E_k, "the set of non-zero eigenvalues computed from F̃_k", citing
    Wilkinson's *The Algebraic Eigenvalue Problem*; the seed names no threshold. Computed
    eigenvalues of a rank-deficient F̃ are round-off, not zeros, so E_k is the *numerically*
    non-zero set: λ > ``rank_rtol`` · λmax on F̃'s float64 eigenvalues, ``rank_rtol = None`` →
    ``B · eps(grad_dtype)``, the rule of ``torch.linalg.matrix_rank``. It never counts round-off
    (|E_k| ≤ min(P, B), the rank of J_k), and it caps c_k below rank_rtol^-½ —
    (B · eps)^-½ by default, 256 at B = 128 in float32 (:func:`truncated_condition_number`).

    Args:
        gram: F̃_k, a symmetric (B, B) matrix, a tensor (statistics stay on its device, no host
            sync) or a NumPy array (NumPy numbers out); promoted to float64.
        rank_rtol: the threshold in [0, 1); ``None`` → :func:`default_rank_rtol`.
        grad_dtype: dtype in which the gradients behind F̃ were computed (for the default rtol).

    Raises:
        ValueError: ``rank_rtol`` out of range.
    """
    check_rank_rtol(rank_rtol)
    xp = namespace(gram)
    gram = float64(gram)
    batch = gram.shape[0]
    finite = xp.isfinite(gram).all()
    eigenvalues = eigvalsh(where(finite, gram, 0.0))
    rtol = default_rank_rtol(batch, grad_dtype) if rank_rtol is None else rank_rtol
    condition, rank = truncated_condition_number(eigenvalues, rtol)
    trace_sigma, grad_sq_norm = gradient_noise_parts(gram)
    noise_scale = noise_scale_ratio(trace_sigma, grad_sq_norm)
    stats = (condition, gram.diagonal().sum(), eigenvalues[-1], rank, noise_scale, trace_sigma, grad_sq_norm)
    return FisherStatistics(  # NaN for a non-finite F̃: one selection for all seven
        *where(finite, stack(stats), math.nan),
        batch_size=constant(finite, float(batch)),
        eigenvalues=where(finite, eigenvalues, math.nan),
    )


def check_rank_rtol(rank_rtol: float | None, allow_zero: bool = True) -> float | None:
    """``None`` or the share of λmax below which an eigenvalue counts as zero: a number in [0, 1)
    ((0, 1) without ``allow_zero``; 1 would leave no eigenvalue)."""
    interval = "[0, 1)" if allow_zero else "(0, 1)"
    checked = checks.real("rank_rtol", rank_rtol, minimum=0.0, maximum=1.0, allow_none=True)
    if checked == 1.0 or (checked == 0.0 and not allow_zero):
        raise ValueError(f"`rank_rtol` must be None or a number in {interval}; got {rank_rtol!r}.")
    return checked


def fisher_energy(
    trace: Tensor | np.ndarray | float, learning_rate: float, batch_size: Tensor | np.ndarray | float
) -> Tensor | np.ndarray | float:
    """l_k = (α_k / |B_k|) · (Tr F̃_k)^½, one term of L_K (seed 004_e5d92837cb57ce8a.txt §3, eq. 8)."""
    return learning_rate / batch_size * namespace(trace).sqrt(trace)


class FisherRunningSums:
    """C̄_K and L_K (seed 004_e5d92837cb57ce8a.txt §3, eq. 7–8) as three running sums, on the
    measurements' device (or a NumPy array on the host for NumPy measurements).

    - C̄_K = (1/K) Σ_k c_k over the finite c_k, K their count (eq. 7);
    - L_K = Σ_k n_k · l_k over the finite l_k (eq. 8), n_k the weight of measurement k (a callback
      measuring every n-th step counts each l_k n times, so L estimates the every-step sum).

    A NaN or infinite c_k / l_k is left out (without a host sync for tensors). Every sum is declared
    with its cross-process reduction in :attr:`reductions` (all ``"sum"``, in the spirit of torchmetrics'
    ``add_state(..., dist_reduce_fx="sum")``); :meth:`sync` applies it with one all-reduce.

    Example:
        >>> sums = FisherRunningSums()
        >>> _ = sums.update(torch.tensor(3.0), torch.tensor(0.5), weight=2)
        >>> c_bar, total = sums.update(torch.tensor(float("nan")), torch.tensor(0.25), weight=2)
        >>> c_bar.item(), total.item()
        (3.0, 1.5)
    """

    reductions: ClassVar[dict[str, str]] = {"condition_sum": "sum", "count": "sum", "energy_sum": "sum"}
    """Each running sum's reduction across processes."""

    def __init__(self) -> None:
        self._sums = torch.zeros(len(self.reductions), dtype=torch.float64)

    def update(
        self, condition: Tensor | np.ndarray | float, energy: Tensor | np.ndarray | float, weight: float = 1.0
    ) -> tuple[Tensor | np.ndarray | float, Tensor | np.ndarray | float]:
        """Add the finite c_k and weight · l_k (0-d, or any shape: every element is a measurement);
        return the updated (C̄_K, L_K). Tensors keep the sums on their device; NumPy numbers keep
        them as a NumPy array on the host (the sums follow the kind of the latest update)."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ValueError(f"`weight` must be a finite number > 0 (e.g. `every_n_steps`); got {weight!r}.")
        xp = namespace(condition, energy)
        condition, energy = float64(condition), float64(energy)
        finite = xp.isfinite(condition)
        step = stack(
            [
                total(where(finite, condition, 0.0)),
                float64(total(finite)),
                weight * total(where(xp.isfinite(energy), energy, 0.0)),
            ]
        )
        self._sums = same_kind(self._sums, step) + step
        return self.compute()

    def compute(self) -> tuple[Tensor | np.ndarray | float, Tensor | np.ndarray | float]:
        """(C̄_K, L_K); C̄_K is NaN before the first finite c_k."""
        condition_sum, count, energy_sum = self._sums
        return where(count > 0, condition_sum / where(count > 0, count, 1.0), math.nan), energy_sum

    def sync(self, all_reduce: Callable[[Tensor], Tensor]) -> None:
        """Combine the sums over processes with one call of ``all_reduce`` (a function returning
        the element-wise sum of a tensor over processes), per :attr:`reductions`.

        For processes that each updated with their own measurements: C̄ becomes the mean of all
        their finite c_k and L the sum of all their weighted l_k. Processes that updated with the
        same rank-combined values (as FisherSpectrum does: l_k needs the global Tr F̃ under its
        square root) already agree and must not sync.
        """
        self._sums = all_reduce(torch.as_tensor(self._sums))

    def reset(self) -> None:
        self._sums = torch.zeros(len(self.reductions), dtype=torch.float64)

    def state_dict(self) -> dict[str, float]:
        return dict(zip(self.reductions, self._sums.tolist()))

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._sums = torch.tensor([float(state_dict[key]) for key in self.reductions], dtype=torch.float64)
