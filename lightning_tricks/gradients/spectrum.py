"""Spectral statistics of the approximate Fisher matrix F̃ = JᵀJ (seed 004).

Pure tensor code, no host synchronisation: every statistic stays a 0-d tensor on F̃'s device,
and a non-finite F̃ gives NaN statistics instead of an exception.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class FisherStatistics(NamedTuple):
    """Statistics of one F̃_k (float64 tensors on F̃'s device, 0-d but for ``eigenvalues``)."""

    condition: Tensor
    """c_k = √(max E_k / min E_k), the truncated condition number (seed 004 eq. 7)."""
    trace: Tensor
    """Tr F̃_k = Σ_i ‖∇ℓ_i‖², the energy of F̃_k (seed 004 eq. 8)."""
    lambda_max: Tensor
    """Largest eigenvalue of F̃_k."""
    rank: Tensor
    """|E_k|, the number of eigenvalues above ``rank_rtol · λmax``."""
    noise_scale: Tensor
    """B_simple = tr Σ / ‖ḡ‖², the simple gradient-noise scale estimated from F̃_k alone."""
    batch_size: Tensor
    """B, the number of samples (columns of J_k)."""
    eigenvalues: Tensor
    """(B,) ascending eigenvalues of F̃_k (NaN when F̃_k has a non-finite entry)."""


def default_rank_rtol(batch_size: int, dtype: torch.dtype) -> float:
    """``B · eps(dtype)``: the tolerance ``torch.linalg.matrix_rank`` uses for a B×B matrix whose
    entries were computed in ``dtype`` (the dtype of the gradients, not of F̃'s float64 storage)."""
    return batch_size * torch.finfo(dtype).eps


def truncated_condition_number(eigenvalues: Tensor, rank_rtol: float) -> tuple[Tensor, Tensor]:
    """c = √(max E / min E) over the non-zero set E = {λ : λ > rank_rtol · λmax}, and |E|.

    Seed 004_e5d92837cb57ce8a.txt §3, eq. 7: c_k = σmax(E_k)/σmin(E_k) with σ = λ^½, the ratio of
    the largest to the smallest non-zero singular value of J_k. ``eigenvalues`` are ascending
    (``torch.linalg.eigvalsh``); c is NaN when F̃ has no positive eigenvalue.
    """
    lambda_max = eigenvalues[-1]
    nonzero = eigenvalues > rank_rtol * lambda_max
    inf = torch.full_like(eigenvalues, torch.inf)
    lambda_min = torch.where(nonzero, eigenvalues, inf).amin()
    condition = torch.where(lambda_max > 0, (lambda_max / lambda_min).sqrt(), torch.nan)
    return condition, nonzero.sum().to(eigenvalues.dtype)


def gradient_noise_scale(gram: Tensor) -> Tensor:
    """B_simple = tr Σ / ‖ḡ‖² from F̃ alone (columns of J are the per-sample gradients g_i).

    ‖ḡ‖² = 1ᵀF̃1 / B² (ḡ the mean gradient) and tr Σ = (Tr F̃ − 1ᵀF̃1 / B) / (B − 1), the unbiased
    per-sample variance summed over parameters. NaN for B = 1. The quantity the
    BatchSizeScheduler's adaptive policy reads alongside seed 004 §3.2's dynamic sampling.
    """
    batch = gram.shape[0]
    total = gram.sum()
    if batch < 2:
        return torch.full_like(total, torch.nan)
    trace_sigma = (gram.diagonal().sum() - total / batch) / (batch - 1)
    return trace_sigma / (total / batch**2)


def fisher_statistics(
    gram: Tensor, rank_rtol: float | None = None, grad_dtype: torch.dtype = torch.float32
) -> FisherStatistics:
    """Statistics of F̃_k = J_kᵀJ_k (seed 004_e5d92837cb57ce8a.txt §3, eq. 6–8).

    Args:
        gram: F̃_k, a symmetric (B, B) matrix; promoted to float64.
        rank_rtol: eigenvalues above ``rank_rtol · λmax`` count as non-zero;
            ``None`` → :func:`default_rank_rtol` for ``grad_dtype``.
        grad_dtype: dtype in which the gradients behind F̃ were computed.
    """
    gram = gram.to(torch.float64)
    batch = gram.shape[0]
    if rank_rtol is None:
        rank_rtol = default_rank_rtol(batch, grad_dtype)
    finite = torch.isfinite(gram).all()
    safe_gram = torch.where(finite, gram, torch.zeros_like(gram))
    eigenvalues = torch.linalg.eigvalsh(safe_gram)
    condition, rank = truncated_condition_number(eigenvalues, rank_rtol)
    nan = torch.full_like(condition, torch.nan)
    stats = (condition, gram.diagonal().sum(), eigenvalues[-1], rank, gradient_noise_scale(gram))
    return FisherStatistics(
        *(torch.where(finite, value, nan) for value in stats),
        batch_size=torch.tensor(float(batch), dtype=torch.float64, device=gram.device),
        eigenvalues=torch.where(finite, eigenvalues, torch.nan),
    )


def fisher_energy(trace: Tensor, learning_rate: float, batch_size: int) -> Tensor:
    """l_k = (α_k / |B_k|) · (Tr F̃_k)^½, one term of L_K (seed 004_e5d92837cb57ce8a.txt §3, eq. 8)."""
    return learning_rate / batch_size * trace.sqrt()
