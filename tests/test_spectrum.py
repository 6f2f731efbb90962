"""Spectrum engine against independent references: per-sample gradient loops, numpy eigenvalues,
synthetic gradients of known noise scale, and plain Python loops for the running measures."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tricks.gradients import gradient_tests, spectrum
from lightning_tricks.gradients.fisher_capture import step_measures
from lightning_tricks.gradients.spectrum import (
    FisherRunningSums,
    NoiseScaleEstimate,
    default_rank_rtol,
    fisher_statistics,
    gradient_noise_parts,
    noise_scale_ratio,
    pooled_noise_scale,
    truncated_condition_number,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


# -- references -------------------------------------------------------------------------------


def per_sample_gradients(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(B, P) per-sample loss gradients, one autograd call per sample."""
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(net.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


def reference_noise_parts(samples: np.ndarray) -> tuple[float, float]:
    """tr Σ as the sample variance summed over coordinates; |G|² as the mean of ⟨g_i, g_j⟩, i ≠ j."""
    batch = len(samples)
    trace_sigma = ((samples - samples.mean(0)) ** 2).sum() / (batch - 1)
    cross = sum(float(samples[i] @ samples[j]) for i in range(batch) for j in range(batch) if i != j)
    return trace_sigma, cross / (batch * (batch - 1))


def reference_condition(gram: np.ndarray, rtol: float) -> tuple[float, int]:
    """c = √(max E / min E) and |E| with E = {λ > rtol · λmax} of numpy's float64 eigenvalues."""
    eigenvalues = np.linalg.eigvalsh(gram)
    kept = [lam for lam in eigenvalues if lam > rtol * eigenvalues.max()]
    return math.sqrt(max(kept) / min(kept)), len(kept)


def gram_with_spectrum(eigenvalues: np.ndarray, seed: int) -> torch.Tensor:
    """F̃ = JᵀJ with J = diag(√λ) Q for a random orthogonal Q: F̃'s eigenvalues are ``eigenvalues``."""
    generator = torch.Generator().manual_seed(seed)
    size = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    jacobian = torch.from_numpy(np.sqrt(eigenvalues))[:, None] * q
    return jacobian.T @ jacobian


def synthetic_grams(
    noise_scales: list[float], batches: int, batch: int, dim: int, seed: int
) -> dict[float, list[torch.Tensor]]:
    """F̃ = JᵀJ of per-sample gradients g_i = G + n_i in P = ``dim`` dimensions, |G|² = 1 and
    n_i ~ N(0, (B_simple / P) I_P), so tr Σ / |G|² = B_simple exactly.

    J is written in an orthonormal basis of span{G, n_1, …, n_B} (a rotation of parameter space,
    which leaves F̃ unchanged): row 0 holds the components along G, 1 + s·z_i with z ~ N(0, I_B);
    the B rows below hold s·Lᵀ, where LLᵀ ~ Wishart_B(P − 1, I) is drawn by Bartlett's
    decomposition (L lower triangular, L_jj² ~ χ²(P − j), below the diagonal N(0, 1)). Exact in
    distribution for any P at O(B²) cost a batch. The same draws serve every noise scale.
    """
    rng = np.random.default_rng(seed)
    grams: dict[float, list[torch.Tensor]] = {scale: [] for scale in noise_scales}
    for _ in range(batches):
        along_g = rng.standard_normal(batch)
        bartlett = np.tril(rng.standard_normal((batch, batch)), -1)
        bartlett[np.diag_indices(batch)] = np.sqrt(rng.chisquare(dim - 1 - np.arange(batch)))
        for scale in noise_scales:
            s = math.sqrt(scale / dim)
            jacobian = torch.from_numpy(np.vstack([1.0 + s * along_g, s * bartlett.T]))
            grams[scale].append(jacobian.T @ jacobian)
    return grams


def test_synthetic_grams_have_the_expected_mean() -> None:
    """E[F̃] = |G|² 11ᵀ + (tr Σ) I for the construction above (checked on 400 draws)."""
    batch, scale = 6, 50.0
    grams = torch.stack(synthetic_grams([scale], batches=400, batch=batch, dim=1000, seed=4)[scale])
    expected = torch.ones(batch, batch, dtype=torch.float64) + scale * torch.eye(batch, dtype=torch.float64)
    torch.testing.assert_close(grams.mean(0), expected, atol=1.5, rtol=0.05)


# -- gradient-noise scale ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("batch", [2, 5, 12])
def test_noise_parts_match_per_sample_loop(arch: str, batch: int) -> None:
    torch.manual_seed(batch)
    if arch == "mlp":
        net = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4)).double()
        x = torch.randn(batch, 7, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
        x = torch.randn(batch, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (batch,))
    samples = per_sample_gradients(net, x, y)
    gram = torch.from_numpy(samples @ samples.T)
    trace_sigma, grad_sq_norm = gradient_noise_parts(gram)
    ref_trace_sigma, ref_grad_sq_norm = reference_noise_parts(samples)
    assert trace_sigma.item() == pytest.approx(ref_trace_sigma, rel=1e-10)
    assert grad_sq_norm.item() == pytest.approx(ref_grad_sq_norm, rel=1e-9, abs=1e-12)
    stats = fisher_statistics(gram)
    assert stats.trace_sigma.item() == pytest.approx(ref_trace_sigma, rel=1e-10)
    assert stats.grad_sq_norm.item() == pytest.approx(ref_grad_sq_norm, rel=1e-9, abs=1e-12)
    if ref_grad_sq_norm > 0:
        assert stats.noise_scale.item() == pytest.approx(ref_trace_sigma / ref_grad_sq_norm, rel=1e-8)


def test_noise_scale_median_recovers_known_truth_where_the_biased_one_caps_near_b() -> None:
    """B = 128, per-sample gradients of known tr Σ / |G|² = 16, 128, 2048 (P = 10⁵)."""
    batch = 128
    grams = synthetic_grams([16.0, 128.0, 2048.0], batches=200, batch=batch, dim=100_000, seed=0)
    for truth, matrices in grams.items():
        stats = [fisher_statistics(gram) for gram in matrices]
        median = torch.stack([s.noise_scale for s in stats]).median().item()
        assert median == pytest.approx(truth, rel=0.03), truth
    # the former estimator tr Σ / ‖ḡ‖² with the batch mean ‖ḡ‖² = 1ᵀF̃1 / B² reads ≈ 2048 / 17
    biased = torch.stack([s.trace_sigma / (g.sum() / batch**2) for s, g in zip(stats, matrices)])
    assert biased.median().item() < batch
    assert biased.max().item() < 1.2 * batch


def test_pooled_noise_scale_converges_where_one_batch_ratios_do_not() -> None:
    """B = 16 at true B_simple = 128 with P = 512: one-batch |G|² estimates are often ≤ 0 (ratio
    +inf), yet the ratio of averages (McCandlish et al. 2018, appendix A) converges."""
    truth, batch, dim, batches = 128.0, 16, 512, 2000
    generator = torch.Generator().manual_seed(3)
    noise = math.sqrt(truth / dim) * torch.randn(
        batches, dim, batch, generator=generator, dtype=torch.float64
    )
    noise[:, 0] += 1.0
    grams = noise.transpose(1, 2) @ noise
    trace_sigma, grad_sq_norm = gradient_noise_parts(grams)  # batched over the 2000 matrices
    for k in (0, 999):
        assert torch.equal(
            torch.stack(gradient_noise_parts(grams[k])), torch.stack([trace_sigma[k], grad_sq_norm[k]])
        )
    one_batch = noise_scale_ratio(trace_sigma, grad_sq_norm)
    assert torch.isinf(one_batch).sum() > 20 and torch.isinf(one_batch.mean())
    errors = [
        abs(pooled_noise_scale(trace_sigma[:n], grad_sq_norm[:n]).item() / truth - 1) for n in (20, 2000)
    ]
    assert errors[1] < 0.04
    assert errors[1] < errors[0]
    estimate = NoiseScaleEstimate(decay=1.0)
    for t, g in zip(trace_sigma, grad_sq_norm):
        estimate.update(t, g)
    expected = pooled_noise_scale(trace_sigma, grad_sq_norm)
    assert estimate.estimate.item() == pytest.approx(expected.item(), rel=1e-10)
    assert estimate.grad_sq_norm.item() == pytest.approx(grad_sq_norm.mean().item(), rel=1e-10)


def test_pooled_noise_scale_over_a_dimension_skips_non_finite_pairs() -> None:
    trace_sigma = torch.tensor([[4.0, math.nan, 8.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    grad_sq_norm = torch.tensor([[1.0, 5.0, math.inf], [0.5, -0.25, 0.75]], dtype=torch.float64)
    pooled = pooled_noise_scale(trace_sigma, grad_sq_norm, dim=1)
    assert pooled.tolist() == pytest.approx([4.0, 6.0 / 1.0])


def test_noise_scale_ratio_conventions() -> None:
    t = torch.tensor([6.0, 6.0, 6.0, 0.0, 0.0, math.nan, 6.0], dtype=torch.float64)
    g = torch.tensor([2.0, 0.0, -1.0, 0.0, 2.0, 2.0, math.nan], dtype=torch.float64)
    ratio = noise_scale_ratio(t, g)
    assert ratio.dtype == torch.float64
    assert ratio[[0, 1, 2, 4]].tolist() == [3.0, math.inf, math.inf, 0.0]
    assert math.isnan(ratio[3]) and math.isnan(ratio[5]) and math.isnan(ratio[6])


def test_noise_parts_nan_for_one_sample_or_non_finite_gram() -> None:
    one = fisher_statistics(torch.tensor([[2.0]], dtype=torch.float64))
    assert all(math.isnan(v) for v in (one.trace_sigma, one.grad_sq_norm, one.noise_scale))
    gram = torch.eye(3, dtype=torch.float64)
    gram[0, 1] = math.nan
    bad = fisher_statistics(gram)
    assert all(math.isnan(v) for v in (bad.trace_sigma, bad.grad_sq_norm, bad.noise_scale, bad.condition))


def test_noise_scale_estimate_ema_matches_a_loop_and_resumes() -> None:
    rng = np.random.default_rng(5)
    values = [(float(rng.uniform(10, 20)), float(rng.uniform(-0.5, 2))) for _ in range(30)]
    values[4] = (math.nan, 1.0)
    values[9] = (3.0, math.inf)
    decay = 0.9
    estimate = NoiseScaleEstimate(decay=decay)
    sums = [0.0, 0.0, 0.0]
    for k, (t, g) in enumerate(values):
        if k == 15:  # resume from a state dict half-way
            restored = NoiseScaleEstimate(decay=0.5)
            restored.load_state_dict(estimate.state_dict())
            estimate = restored
        result = estimate.update(torch.tensor(t, dtype=torch.float64), torch.tensor(g, dtype=torch.float64))
        if math.isfinite(t) and math.isfinite(g):
            sums = [decay * sums[0] + t, decay * sums[1] + g, decay * sums[2] + 1]
        assert estimate.trace_sigma.item() == pytest.approx(sums[0] / sums[2], rel=1e-12)
        assert estimate.grad_sq_norm.item() == pytest.approx(sums[1] / sums[2], rel=1e-12)
        if sums[1] > 0:
            assert result.item() == pytest.approx(sums[0] / sums[1], rel=1e-12)
    assert estimate.decay == decay


@pytest.mark.parametrize("decay", [0, 1.5, -0.1, True, "0.9"])
def test_noise_scale_estimate_rejects_bad_decay(decay) -> None:
    with pytest.raises(ValueError, match="decay"):
        NoiseScaleEstimate(decay=decay)


def test_noise_scale_estimate_is_nan_before_any_finite_measurement() -> None:
    estimate = NoiseScaleEstimate()
    estimate.update(torch.tensor(math.nan, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    assert math.isnan(estimate.estimate) and math.isnan(estimate.trace_sigma)


# -- what counts as non-zero ------------------------------------------------------------------


@pytest.mark.parametrize("batch", [16, 128, 512])
def test_rtol_rule_caps_the_condition_number_at_b_eps(batch: int) -> None:
    """F̃ of true condition √(1e12) = 1e6: the default B · eps(float32) rule cuts the spectrum and
    reports c < (B · eps)^-½ (256 at B = 128), matching a numpy reference with the same cut."""
    eigenvalues = np.logspace(-12, 0, batch)
    gram = gram_with_spectrum(eigenvalues, seed=batch)
    rtol = default_rank_rtol(batch, torch.float32)
    cap = rtol**-0.5
    stats = fisher_statistics(gram)
    ref_c, ref_rank = reference_condition(gram.numpy(), rtol)
    assert stats.condition.item() == pytest.approx(ref_c, rel=1e-8)
    assert stats.rank.item() == ref_rank < batch
    assert stats.condition.item() < cap
    assert stats.condition.item() > 0.5 * cap  # the cut, not the data, sets c
    if batch == 128:
        assert cap == pytest.approx(256.0)


def test_rtol_rule_cap_holds_on_rank_deficient_grams() -> None:
    """Rank-deficient F̃ (P < B): float64 round-off eigenvalues are never taken as non-zero."""
    rng = np.random.default_rng(0)
    for batch, dim in [(32, 10), (128, 40), (128, 127)]:
        jacobian = rng.standard_normal((dim, batch)) * np.logspace(0, -3, batch)
        gram = torch.from_numpy(jacobian.T @ jacobian)
        rtol = default_rank_rtol(batch, torch.float32)
        stats = fisher_statistics(gram)
        ref_c, ref_rank = reference_condition(gram.numpy(), rtol)
        assert stats.rank.item() == ref_rank <= dim
        assert stats.condition.item() == pytest.approx(ref_c, rel=1e-8)
        assert stats.condition.item() < rtol**-0.5


def svd_reference(jacobian: np.ndarray) -> tuple[float, int]:
    """c = σmax/σmin over the non-zero singular values of J (P, B) and their count, by numpy's SVD
    of J in float64 with ``numpy.linalg.matrix_rank``'s cut max(P, B) · eps(J's dtype) · σmax."""
    sigma = np.linalg.svd(jacobian.astype(np.float64), compute_uv=False)
    kept = sigma[sigma > max(jacobian.shape) * np.finfo(jacobian.dtype).eps * sigma.max()]
    return float(kept.max() / kept.min()), len(kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("deficiency", ["P<B", "zero columns", "duplicate columns"])
def test_rank_never_exceeds_the_rank_of_j_on_rank_deficient_grams(dtype, deficiency) -> None:
    """Issue 19 #1: F̃ = JᵀJ of a 20-parameter J with B = 32 samples (rank ≤ min(P, B) = 20), also
    with zero and duplicate per-sample gradients: |E_k| and c_k equal the SVD of J's (brute force)."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        jacobian = torch.from_numpy(rng.standard_normal((20, 32))).to(dtype)
        if deficiency == "zero columns":
            jacobian[:, [3, 9, 17]] = 0.0
        elif deficiency == "duplicate columns":
            jacobian[:, 24:] = jacobian[:, :8]
        ref_c, ref_rank = svd_reference(jacobian.numpy())
        stats = fisher_statistics(jacobian.T @ jacobian, grad_dtype=dtype)
        assert stats.rank.item() == ref_rank <= min(jacobian.shape)
        assert stats.condition.item() == pytest.approx(ref_c, rel=1e-4 if dtype == torch.float32 else 1e-10)


def test_fisher_statistics_has_no_rule_that_counts_round_off() -> None:
    """Issue 19 #1: `nonzero="exact_zero"` (float32 eigenvalues > 0) counted round-off as
    eigenvalues (rank 21–24 for 20 parameters) and is gone; nothing in seed 004 states it."""
    with pytest.raises(TypeError, match="nonzero"):
        fisher_statistics(torch.eye(3, dtype=torch.float64), nonzero="exact_zero")
    assert not hasattr(spectrum, "NONZERO_RULES")


def test_truncated_condition_number_with_zero_rtol_keeps_every_positive_eigenvalue() -> None:
    eigenvalues = torch.tensor([-1e-9, 0.0, 1e-20, 1.0], dtype=torch.float64)
    condition, rank = truncated_condition_number(eigenvalues, 0.0)
    assert rank.item() == 2 and condition.item() == pytest.approx(1e10)
    condition, rank = truncated_condition_number(torch.zeros(3, dtype=torch.float64), 0.0)
    assert math.isnan(condition) and rank.item() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank_rtol": 1.0}, "rank_rtol"),
        ({"rank_rtol": -1e-3}, "rank_rtol"),
    ],
)
def test_fisher_statistics_rejects_bad_rank_rtol(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        fisher_statistics(torch.eye(3, dtype=torch.float64), **kwargs)


# -- running C̄_K and L_K ----------------------------------------------------------------------


def loop_running(measurements: list[tuple[float, float]], weight: float) -> list[tuple[float, float]]:
    """(C̄_K, L_K) after each measurement, the dumbest way: lists of the finite values so far."""
    conditions, energies, out = [], [], []
    for c, energy in measurements:
        if math.isfinite(c):
            conditions.append(c)
        if math.isfinite(energy):
            energies.append(weight * energy)
        out.append((sum(conditions) / len(conditions) if conditions else math.nan, sum(energies)))
    return out


def random_measurements(seed: int, n: int = 40) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    values = [(float(rng.uniform(1, 300)), float(rng.uniform(0, 0.1))) for _ in range(n)]
    values[0] = (math.nan, math.nan)
    values[7] = (math.nan, 0.02)
    values[11] = (math.inf, math.inf)
    values[12] = (50.0, -math.inf)
    return values


def assert_close(actual: tuple[torch.Tensor, torch.Tensor], expected: tuple[float, float]) -> None:
    c_bar, total = (v.item() for v in actual)
    if math.isnan(expected[0]):
        assert math.isnan(c_bar)
    else:
        assert c_bar == pytest.approx(expected[0], rel=1e-12)
    assert total == pytest.approx(expected[1], rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("weight", [1, 20, 2.5])
def test_running_sums_match_a_python_loop(weight: float) -> None:
    measurements = random_measurements(seed=int(weight * 10))
    expected = loop_running(measurements, weight)
    sums = FisherRunningSums()
    for k, ((c, energy), reference) in enumerate(zip(measurements, expected)):
        if k == 20:  # resume half-way from a state dict (what a checkpoint holds)
            resumed = FisherRunningSums()
            resumed.load_state_dict(sums.state_dict())
            sums = resumed
        result = sums.update(
            torch.tensor(c, dtype=torch.float64), torch.tensor(energy, dtype=torch.float64), weight
        )
        assert_close(result, reference)
        assert_close(sums.compute(), reference)
    assert set(sums.state_dict()) == set(FisherRunningSums.reductions)


def test_running_sums_vectorised_update_equals_sequential_updates() -> None:
    measurements = random_measurements(seed=1)
    conditions = torch.tensor([c for c, _ in measurements], dtype=torch.float64)
    energies = torch.tensor([energy for _, energy in measurements], dtype=torch.float64)
    sums = FisherRunningSums()
    assert_close(sums.update(conditions, energies, weight=3), loop_running(measurements, 3)[-1])


def test_running_sums_sync_combines_processes_like_one() -> None:
    """Two 'processes' with their own measurements; all_reduce = the element-wise sum of both."""
    first, second = random_measurements(seed=2), random_measurements(seed=3)
    processes = [FisherRunningSums(), FisherRunningSums()]
    for sums, measurements in zip(processes, (first, second)):
        for c, energy in measurements:
            sums.update(
                torch.tensor(c, dtype=torch.float64), torch.tensor(energy, dtype=torch.float64), weight=5
            )
    states = [sums._sums.clone() for sums in processes]
    for sums in processes:
        sums.sync(lambda local: states[0] + states[1])
    expected = loop_running(first + second, 5)[-1]
    for sums in processes:
        assert_close(sums.compute(), expected)


def test_running_sums_are_nan_then_reset() -> None:
    sums = FisherRunningSums()
    c_bar, total = sums.compute()
    assert math.isnan(c_bar) and total.item() == 0.0
    sums.update(torch.tensor(2.0), torch.tensor(1.0))
    sums.reset()
    assert math.isnan(sums.compute()[0])


@pytest.mark.parametrize("weight", [0, -1, math.inf, True, "2"])
def test_running_sums_reject_bad_weight(weight) -> None:
    with pytest.raises(ValueError, match="weight"):
        FisherRunningSums().update(torch.tensor(1.0), torch.tensor(1.0), weight=weight)


def test_docstring_examples_run() -> None:
    assert doctest.testmod(spectrum, raise_on_error=True).attempted >= 2


# -- one formula, two kinds of arrays: tensors and NumPy (FisherSpectrum's host path) --------------


def host_case(name: str) -> torch.Tensor:
    """F̃ of the cases every statistic has a branch for."""
    generator = torch.Generator().manual_seed(len(name))
    if name == "one sample":
        return torch.tensor([[2.0]], dtype=torch.float64)
    if name == "zero":
        return torch.zeros(4, 4, dtype=torch.float64)
    grads = torch.randn(8, 30, generator=generator, dtype=torch.float64)
    if name == "rank deficient":  # B = 8 samples in 3 directions
        grads = torch.randn(8, 3, generator=generator, dtype=torch.float64) @ grads[:3]
    if name == "hidden mean":  # a small mean in large noise: |G|² < 0, B_simple = inf
        grads = grads - grads.mean(0) + 0.05 * torch.randn(30, generator=generator, dtype=torch.float64)
    gram = grads @ grads.T
    if name in ("nan", "inf"):
        gram[2, 5] = math.nan if name == "nan" else math.inf
    return gram


HOST_CASES = ["full rank", "rank deficient", "hidden mean", "one sample", "zero", "nan", "inf"]


def assert_same_values(from_numpy, from_tensor) -> None:
    """Each NumPy value equals the tensor value (to float64 round-off; NaN and ±inf alike)."""
    for host, tensor in zip(from_numpy, from_tensor):
        assert isinstance(tensor, torch.Tensor) and not isinstance(host, torch.Tensor)
        np.testing.assert_allclose(np.asarray(host), tensor.numpy(), rtol=1e-13, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", HOST_CASES)
def test_numpy_statistics_equal_the_tensor_statistics(case: str) -> None:
    """The same functions on F̃'s NumPy view (FisherSpectrum's host path) give the tensor values,
    as NumPy numbers (Python floats), with the very same eigenvalues and without a NumPy warning."""
    gram = host_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "divide by zero" / "invalid value" from NumPy
        host = fisher_statistics(gram.numpy())
        assert_same_values(gradient_noise_parts(gram.numpy()), gradient_noise_parts(gram))
        assert_same_values(gradient_tests(gram.numpy()), gradient_tests(gram))
    tensor = fisher_statistics(gram)
    assert_same_values(host, tensor)
    assert all(isinstance(value, float) for value in host[:-1])
    np.testing.assert_array_equal(host.eigenvalues, tensor.eigenvalues.numpy())  # one LAPACK call


def test_numpy_statistics_of_a_batch_of_grams_equal_the_tensor_ones() -> None:
    grams = torch.stack([host_case(case) for case in ("full rank", "hidden mean", "nan")])
    assert_same_values(gradient_noise_parts(grams.numpy()), gradient_noise_parts(grams))
    assert_same_values(gradient_tests(grams.numpy()), gradient_tests(grams))


def test_noise_scale_ratio_and_pooling_take_numbers() -> None:
    t = np.array([6.0, 5.0, 5.0, math.nan, 0.0, 0.0])
    g = np.array([2.0, 0.0, -1.0, 2.0, 2.0, -1.0])
    for index in range(len(t)):  # NumPy numbers and Python floats, one pair at a time
        expected = noise_scale_ratio(torch.tensor(t[index]), torch.tensor(g[index])).item()
        for pair in ((t[index], g[index]), (float(t[index]), float(g[index]))):
            np.testing.assert_equal(noise_scale_ratio(*pair), expected)
    np.testing.assert_equal(
        pooled_noise_scale(t, g), pooled_noise_scale(torch.tensor(t), torch.tensor(g)).item()
    )


def test_running_sums_take_numpy_numbers_and_tensors_alike() -> None:
    """Updates with NumPy numbers (the host path), Python floats and tensors, mixed, resumed and
    synced, give the sums of the dumbest loop."""
    measurements = random_measurements(seed=6)
    expected = loop_running(measurements, 4)
    sums = FisherRunningSums()
    kinds = (np.float64, float, lambda value: torch.tensor(value, dtype=torch.float64))
    for k, ((c, energy), reference) in enumerate(zip(measurements, expected)):
        if k == 20:
            resumed = FisherRunningSums()
            resumed.load_state_dict(sums.state_dict())
            sums = resumed
        kind = kinds[k % 3]
        result = sums.update(kind(c), kind(energy), weight=4)
        assert_close(tuple(torch.as_tensor(value) for value in result), reference)
    sums.update(np.float64(1.0), np.float64(0.0), weight=4)  # the sums are a NumPy array now
    state = sums.state_dict()
    sums.sync(lambda local: 2 * local)
    assert sums.state_dict() == {name: 2 * value for name, value in state.items()}


class OpCounter(TorchDispatchMode):
    """Every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("finite", [True, False])
def test_step_measures_runs_a_handful_of_tensor_ops_whatever_the_batch(batch: int, finite: bool) -> None:
    """F̃ → logged values on the host: the eigenvalues (one LAPACK call) and no other tensor
    arithmetic — the statistics are NumPy numbers (it was ≈ 130 ops of 0-d tensors)."""
    grads = torch.randn(batch, 3 * batch, dtype=torch.float64)
    gram = grads @ grads.T
    if not finite:
        gram[0, 0] = math.nan
    running = FisherRunningSums()
    with OpCounter() as counter:
        values, eigenvalues = step_measures(gram, running, 0.1, 1)
    assert sum(op.startswith("_linalg_eigh") for op in counter.ops) == 1
    assert len(counter.ops) <= 8, (
        counter.ops
    )  # the rest: the NumPy views' detach/lift_fresh, LAPACK's workspace
    assert all(type(value) is float for value in values.values()) and eigenvalues.shape == (batch,)
    assert math.isfinite(values["trace"]) == finite and math.isnan(values["C_bar"]) != finite


@pytest.mark.parametrize("ranks", [1, 2])
def test_step_measures_equal_the_tensor_statistics(ranks: int) -> None:
    """Against the tensor functions, alone and with a combine that sums (Tr F̃, B) and averages the
    rest over ``ranks`` identical processes: l_k = (α/|B|)·√Tr F̃ and C̄, L from the running sums."""
    gram = host_case("full rank")
    stats, tests = fisher_statistics(gram), gradient_tests(gram)

    def combine(summed, averaged):
        return ranks * summed, averaged

    running = FisherRunningSums()
    values, _ = step_measures(gram, running, 0.1, 3, combine=None if ranks == 1 else combine)
    trace, batch = ranks * stats.trace.item(), ranks * stats.batch_size.item()
    energy = 0.1 / batch * math.sqrt(trace)
    expected = {
        "c_k": stats.condition, "l_k": energy, "C_bar": stats.condition, "L": 3 * energy, "trace": trace,
        "lambda_max": stats.lambda_max, "rank": stats.rank, "noise_scale": stats.noise_scale,
        "trace_sigma": stats.trace_sigma, "grad_sq_norm": stats.grad_sq_norm, "batch_size": batch,
        "norm_test": tests.norm_test, "inner_test": tests.inner_test, "ortho_test": tests.ortho_test,
        "log10_trace": math.log10(trace), "log10_lambda_max": math.log10(stats.lambda_max),
    }  # fmt: skip
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name] == pytest.approx(float(value), rel=1e-13), name
