"""Gradient tests for adaptive batch sizes — the norm test, the inner-product test and the
orthogonality test — read from the per-sample gradient Gram F̃ that FisherSpectrum already holds.

Each test asks whether the mini-batch gradient ḡ = (1/B) Σ_i g_i is accurate enough for a step
(g_i = ∇ℓ_i, sample i's loss gradient), with a variance estimated from the batch itself. All the
inner products these tests need are entries of F̃ = JᵀJ, F̃_ij = g_iᵀg_j (seed
``004_e5d92837cb57ce8a.txt`` §3, eq. 6, where J's columns are the per-sample gradients):

- Σ_i ‖g_i‖² = Tr F̃,
- ‖ḡ‖² = 1ᵀF̃1 / B²,
- p_i = g_iᵀḡ = (F̃1)_i / B, the projection of sample i's gradient on the batch gradient.

So the tests cost one (B, B) matrix–vector product on top of what the callback computes anyway
(Cockpit computes them from BackPACK's per-sample gradients instead).

Like Cockpit (Schneider, Dangel & Hennig 2021, ``cockpit/quantities/{norm,inner,ortho}_test.py``),
each function returns the smallest threshold for which its test passes on this batch — θ for the
norm and inner-product tests, ν for the orthogonality test: a test with threshold θ passes iff the
statistic is ≤ θ. Since every statistic² scales as 1/B for a fixed gradient distribution, the
batch size at which a test with threshold θ would pass is B · (statistic / θ)²
(:func:`needed_batch_size`, the sample-size rules of both papers). Equation numbers below are
those Cockpit's sources cite.

**The norm test is the noise scale in disguise.** With the unbiased parts of
:func:`~lightning_tricks.gradients.spectrum.gradient_noise_parts`, ‖ḡ‖² = |G|² + tr Σ / B exactly,
so θ_norm² = tr Σ / (B|G|² + tr Σ) = B_simple / (B + B_simple) with B_simple = tr Σ / |G|² of the
same batch (McCandlish et al. 2018): θ_norm < 1 exactly when |G|² > 0 (θ_norm > 1 where FisherSpectrum
logs ``noise_scale = inf``), and the test with threshold θ < 1 passes iff B ≥ B_simple · (1 − θ²) / θ².

Every statistic is invariant to scaling all g_i by one factor, so it does not matter whether F̃
holds the gradients of the per-sample losses or of the mean loss (F̃ / B²), nor whether a loss
scale or ``RandomGradient``'s factor r multiplied them. Written once for tensors (no host sync) and
NumPy float64 arrays (FisherSpectrum's host path), as :mod:`~lightning_tricks.gradients.spectrum`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from torch import Tensor

from ._arrays import constant, float64, namespace, nonnegative, quiet, stack, where
from .spectrum import gradient_noise_parts


class GradientTests(NamedTuple):
    """The three gradient-test statistics of one batch (float64: 0-d tensors on F̃'s device for a
    tensor F̃, ``numpy.float64`` numbers for a NumPy F̃).

    Each is the smallest threshold for which its test passes (the quantity Cockpit plots); NaN
    for B = 1, an all-zero or non-finite F̃; +inf when the batch gradient is zero but the
    per-sample gradients are not (no threshold passes).
    """

    norm_test: Tensor | np.ndarray | float
    """θ_norm = (tr Σ / (B‖ḡ‖²))^½ — Byrd et al. 2012, eq. (3.9)."""
    inner_test: Tensor | np.ndarray | float
    """θ_inner = (Var_i(g_iᵀḡ) / (B‖ḡ‖⁴))^½ — Bollapragada et al. 2018, eq. (2.6)."""
    ortho_test: Tensor | np.ndarray | float
    """ν = (E_i‖g_i − (g_iᵀḡ/‖ḡ‖²)ḡ‖² / (B‖ḡ‖²))^½ — Bollapragada et al. 2018, eq. (3.3)."""
    batch_size: Tensor | np.ndarray | float
    """B, the number of samples behind F̃."""


@quiet
def gradient_tests(
    gram: Tensor | np.ndarray, trace_sigma: Tensor | np.ndarray | float | None = None
) -> GradientTests:
    """θ_norm, θ_inner and ν of one batch from F̃ = JᵀJ (B×B), F̃_ij = g_iᵀg_j.

    With s = Tr F̃ = Σ‖g_i‖², m = ‖ḡ‖² = 1ᵀF̃1/B² and p = F̃1/B (p_i = g_iᵀḡ, mean m):

    - **norm test** (Byrd, Chin, Nocedal & Wu 2012, *Sample size selection in optimization
      methods for machine learning*, eq. (3.9)): ‖Var_i(g_i)‖₁ / B ≤ θ² ‖ḡ‖², with the sample
      variance ‖Var_i(g_i)‖₁ = Σ_i ‖g_i − ḡ‖² / (B − 1) = (s − B m) / (B − 1), the unbiased tr Σ
      of :func:`~lightning_tricks.gradients.spectrum.gradient_noise_parts`. Statistic:
      θ_norm² = tr Σ / (B m).
    - **inner-product test** (Bollapragada, Byrd & Nocedal 2018, *Adaptive sampling strategies
      for stochastic optimization*, SIAM J. Optim. 28(4), eq. (2.6), its practical form): Var_i(g_iᵀḡ) / B
      ≤ θ² ‖ḡ‖⁴, with Var_i(p_i) = (Σ p_i² − B m²) / (B − 1). Statistic: θ_inner² = Var_i(p_i) / (B m²).
    - **orthogonality test** (the same paper, eq. (3.3)): E_i‖g_i − (p_i/m) ḡ‖² / B ≤ ν² ‖ḡ‖²,
      the sample variance of the components orthogonal to ḡ (their mean is 0):
      (s − Σ p_i² / m) / (B − 1). Statistic: ν² = that / (B m).

    These are Cockpit's ``NormTest``, ``InnerTest`` and ``OrthoTest`` (which read Σ‖g_i‖² and the
    pairwise products from BackPACK's gradients of the mean loss, ∇ℓ_i / B, and undo the 1/B).
    The variance of the norm test splits into the other two: θ_norm² = θ_inner² + ν².

    Variances are clamped at 0 against round-off. ``gram`` is promoted to float64; it may carry
    leading batch dimensions (..., B, B). Edge cases, never an exception: B = 1 → NaN (no sample
    variance); F̃ = 0 → NaN (0/0); ḡ = 0 with non-zero g_i → +inf; a non-finite entry → NaN.
    ``trace_sigma``: tr Σ of this F̃ where the caller has it already (:func:`fisher_statistics
    <lightning_tricks.gradients.spectrum.fisher_statistics>`), so that it is not computed twice.
    """
    xp = namespace(gram)
    gram = float64(gram)
    batch = gram.shape[-1]
    finite = xp.isfinite(gram).all((-2, -1))
    size = constant(finite, float(batch))
    if batch < 2:
        nan = constant(finite, math.nan)
        return GradientTests(nan, nan, nan, size)
    gram = where(finite if finite.ndim == 0 else finite[..., None, None], gram, 0.0)  # one F̃: no copy
    if trace_sigma is None:
        trace_sigma, _ = gradient_noise_parts(gram)  # (s − B m) / (B − 1)
    projections = gram.sum(-1) / batch  # p_i = g_iᵀḡ
    mean_sq_norm = projections.sum(-1) / batch  # m = ‖ḡ‖² = 1ᵀF̃1 / B²
    signal = mean_sq_norm > 0  # ‖Σ g_i‖² ≥ 0: a round-off negative is a zero gradient
    safe_m = where(signal, mean_sq_norm, 1.0)
    projection_sq = (projections * projections).sum(-1)
    inner_var = nonnegative((projection_sq - batch * (safe_m * safe_m)) / (batch - 1))
    trace = gram.diagonal(0, -2, -1).sum(-1)
    ortho_var = nonnegative((trace - projection_sq / safe_m) / (batch - 1))
    squared = stack(  # θ_norm², θ_inner², ν²: their roots in one pass
        [
            trace_sigma / (batch * safe_m),
            inner_var / (batch * (safe_m * safe_m)),
            ortho_var / (batch * safe_m),
        ]
    )
    norm_test, inner_test, ortho_test = _statistic(squared, signal, trace_sigma > 0, finite)
    return GradientTests(norm_test, inner_test, ortho_test, batch_size=size)


def _statistic(
    squared: Tensor | np.ndarray | float,
    signal: Tensor | np.ndarray | float,
    noise: Tensor | np.ndarray | float,
    finite: Tensor | np.ndarray | float,
) -> Tensor | np.ndarray | float:
    """√squared where ‖ḡ‖² > 0; +inf where ḡ = 0 but the g_i scatter; NaN with neither, or a
    non-finite F̃ (``squared`` may stack several statistics in front of the others' dims)."""
    value = where(signal, namespace(squared).sqrt(squared), where(noise, math.inf, math.nan))
    return where(finite, value, math.nan)


def needed_batch_size(
    statistic: Tensor | np.ndarray | float, batch_size: Tensor | np.ndarray | float, threshold: float
) -> Tensor | np.ndarray | float:
    """B · (statistic / threshold)²: the batch size at which a test with ``threshold`` would pass,
    with this batch's variance and gradient estimates.

    The sample-size rule of both papers, written with the statistics of :func:`gradient_tests`:
    when a test fails, grow the batch to the size at which it would hold with the current
    estimates — |S| = ‖Var_i(g_i)‖₁ / (θ²‖ḡ‖²) for the norm test (Byrd et al. 2012),
    Var_i(g_iᵀḡ) / (θ²‖ḡ‖⁴) for the inner-product test and E_i‖g_i − (p_i/m)ḡ‖² / (ν²‖ḡ‖²) for
    the orthogonality test (Bollapragada et al. 2018, whose augmented test takes the larger of the
    last two). There is no threshold-free choice: the norm test's θ_norm is below 1 whenever
    |G|² > 0 (module docstring), so at θ = 1 it asks for less than B. NaN and +inf statistics stay
    NaN and +inf.

    Raises:
        ValueError: ``threshold`` not a finite number > 0.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
        raise ValueError(f"`threshold` must be a finite number > 0 (θ or ν of the test); got {threshold!r}.")
    ratio = statistic / threshold
    return batch_size * (ratio * ratio)
