"""The gradient-noise scale B_noise = tr Σ / |G|² (McCandlish et al. 2018): its ratio, its pooling
over measurements, the one estimate per run that measurers feed and policies read, and a measurement
from gradients at two batch sizes.

- :func:`noise_scale_ratio` and :func:`pooled_noise_scale`: the formula, once.
- :class:`EpochNoiseScale` and :func:`shared_noise_scale`: the current epoch's pooled estimate of a
  run (one per Trainer), fed at measured steps by whoever measures (FisherSpectrum from F̃, or the
  BatchSizeScheduler's own half-batch estimate) and read by batch-size policies, so that no callback
  imports another.
- Without per-sample gradients, tr Σ and |G|² still follow from the squared norms of two batch
  gradients, since E‖g_B‖² = |G|² + tr Σ / B. :func:`half_batch_noise_parts` measures them on one
  training batch by splitting it in halves: one extra forward/backward of the batch, at the current
  parameters, that leaves the module, its gradients, its buffers and the random stream untouched.
"""

from __future__ import annotations

import math
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._arrays import namespace, numeric, quiet, same_kind, where
from .minibatch_distance import LossFunction, flatten, gradient_at, rng_devices


@quiet
def noise_scale_ratio(
    trace_sigma: Tensor | np.ndarray | float, grad_sq_norm: Tensor | np.ndarray | float
) -> Tensor | np.ndarray | float:
    """B_simple = tr Σ / |G|², the simple gradient-noise scale (McCandlish et al. 2018, §2).

    Where the |G|² estimate is ≤ 0 while tr Σ > 0 the noise hides the mean gradient: B_simple is
    beyond what the samples behind the estimate can resolve and the result is +inf (the value a
    shrinking positive |G|² tends to, so medians and quantiles over batches stay right). NaN where
    an input is NaN or both are ≤ 0 (no signal and no noise). Elementwise; tensors (no host sync) or
    NumPy float64 arrays and numbers.
    """
    trace_sigma, grad_sq_norm = numeric(trace_sigma), numeric(grad_sq_norm)
    ratio = trace_sigma / grad_sq_norm
    hidden = where((trace_sigma > 0) & (grad_sq_norm <= 0), math.inf, math.nan)
    return where(grad_sq_norm > 0, ratio, hidden)


def pooled_noise_scale(
    trace_sigma: Tensor | np.ndarray | float, grad_sq_norm: Tensor | np.ndarray | float, dim: int = -1
) -> Tensor | np.ndarray | float:
    """B_simple = mean(tr Σ) / mean(|G|²) over ``dim``: average the unbiased parts, then divide.

    McCandlish et al. 2018, appendix A recommend this ratio of averages over a window of
    measurements instead of an average of one-batch ratios (a ratio of unbiased estimates is biased
    and has heavy tails). Pairs with a non-finite part are left out of both means.
    """
    xp = namespace(trace_sigma, grad_sq_norm)
    finite = xp.isfinite(trace_sigma) & xp.isfinite(grad_sq_norm)
    numerator = where(finite, trace_sigma, 0.0).sum(dim)
    denominator = where(finite, grad_sq_norm, 0.0).sum(dim)
    return noise_scale_ratio(numerator, denominator)  # equal counts cancel


class EpochNoiseScale:
    """B_noise of one epoch, pooled over its measurements (:func:`pooled_noise_scale`): the sums of
    the finite (tr Σ, |G|²) pairs :meth:`add` receives, and their count: a float64 tensor on the
    measurements' device (no host sync until a reader asks for a value), or a NumPy array while it
    is fed Python numbers (a measurer's host values: no tensor op a measurement).

    A measurement of another epoch starts the pool afresh, so the pool is always the latest measured
    epoch's. Under DDP a feeder adds either values already combined over the processes (the same on
    every rank) or each process's own; in the second case the reader sums :meth:`parts` over the
    processes before pooling (the ratio of sums is the pooled value of all measurements).

    Example:
        >>> estimate = EpochNoiseScale()
        >>> for trace_sigma, grad_sq_norm in [(100.0, 2.0), (100.0, -0.5), (100.0, float("nan"))]:
        ...     estimate.add(0, trace_sigma, grad_sq_norm)
        >>> estimate.value(), estimate.value(epoch=1)
        (133.33333333333334, nan)
    """

    def __init__(self) -> None:
        self.epoch = -1
        self.feeders: set[str] = set()
        """The names of those that measure into this estimate (a reader measures itself if none)."""
        self._sums = torch.zeros(3, dtype=torch.float64)

    def start(self, epoch: int) -> None:
        """Begin ``epoch``: the pool empties unless it already holds that epoch (a resumed epoch)."""
        if epoch != self.epoch:
            self.epoch, self._sums = epoch, torch.zeros(3, dtype=torch.float64)

    def add(self, epoch: int, trace_sigma: Tensor | float, grad_sq_norm: Tensor | float) -> None:
        """Pool one measurement of ``epoch`` (a pair with a non-finite part is left out); a pair of
        Python numbers is checked in Python and added in NumPy."""
        self.start(epoch)
        if not isinstance(trace_sigma, Tensor) and not isinstance(grad_sq_norm, Tensor):
            if math.isfinite(trace_sigma) and math.isfinite(grad_sq_norm):
                step = np.array([trace_sigma, grad_sq_norm, 1.0])
                self._sums = same_kind(self._sums, step) + step  # a new array: earlier parts() unchanged
            return
        parts = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in (trace_sigma, grad_sq_norm)])
        step = torch.cat([parts, parts.new_ones(1)])
        self._sums = same_kind(self._sums, step) + torch.where(torch.isfinite(parts).all(), step, 0.0)

    def parts(self, epoch: int | None = None) -> Tensor:
        """``(Σ tr Σ, Σ |G|², count)`` of ``epoch`` (default: the latest measured), zeros for another;
        a float64 tensor."""
        sums = torch.as_tensor(self._sums)
        return sums if epoch is None or epoch == self.epoch else torch.zeros_like(sums)

    def value(self, epoch: int | None = None, parts: Tensor | None = None) -> float:
        """The pooled B_noise of ``epoch`` (or of ``parts`` summed over processes); NaN if unmeasured."""
        trace_sigma, grad_sq_norm, _ = self.parts(epoch) if parts is None else parts
        return pooled_noise_scale(trace_sigma, grad_sq_norm).item()

    def state_dict(self) -> list[dict[str, float]]:
        """The pool as one record ``{"epoch", "trace_sigma", "grad_sq_norm"}`` of sums (none if empty);
        a list of such records, one per measurement, loads too."""
        trace_sigma, grad_sq_norm, count = self._sums.tolist()
        return (
            [{"epoch": self.epoch, "trace_sigma": trace_sigma, "grad_sq_norm": grad_sq_norm}] if count else []
        )

    def load_state_dict(self, records: list[dict[str, float]]) -> None:
        self.epoch, self._sums = -1, torch.zeros(3, dtype=torch.float64)
        for record in records:
            self.add(int(record["epoch"]), record["trace_sigma"], record["grad_sq_norm"])


_SHARED: WeakKeyDictionary[object, EpochNoiseScale] = WeakKeyDictionary()


def shared_noise_scale(owner: object, feeder: str | None = None) -> EpochNoiseScale:
    """The one :class:`EpochNoiseScale` of ``owner`` (a Trainer), made on first use and dropped with it.

    A ``feeder`` (a callback that measures B_noise, at ``setup``) names itself: the estimate starts
    empty for the new fit and readers see in :attr:`EpochNoiseScale.feeders` that it is fed."""
    estimate = _SHARED.setdefault(owner, EpochNoiseScale())
    if feeder is not None:
        estimate.load_state_dict([])
        estimate.feeders.add(feeder)
    return estimate


def two_batch_noise_parts(
    small_sq_norm: Tensor, big_sq_norm: Tensor, small: int, big: int
) -> tuple[Tensor, Tensor]:
    """Unbiased (tr Σ, |G|²) from ‖g‖² at batch sizes ``small`` < ``big`` (McCandlish et al. 2018,
    appendix A.1, from E‖g_B‖² = |G|² + tr Σ / B):

    |G|² = (B_big‖g_big‖² − B_small‖g_small‖²) / (B_big − B_small),
    tr Σ = (‖g_small‖² − ‖g_big‖²) / (1/B_small − 1/B_big).
    """
    grad_sq_norm = (big * big_sq_norm - small * small_sq_norm) / (big - small)
    trace_sigma = (small_sq_norm - big_sq_norm) / (1.0 / small - 1.0 / big)
    return trace_sigma, grad_sq_norm


def split_batch(batch: Any, batch_size: int) -> tuple[Any, Any]:
    """The batch's first and second halves (``batch_size // 2`` samples each; an odd last sample is
    left out): every tensor whose leading size is ``batch_size`` is sliced, other leaves are kept."""
    half = batch_size // 2
    leaves, spec = tree_flatten(batch)

    def part(start: int) -> Any:
        sliced = [
            leaf[start : start + half]
            if isinstance(leaf, Tensor) and leaf.dim() and len(leaf) == batch_size
            else leaf
            for leaf in leaves
        ]
        return tree_unflatten(sliced, spec)

    return part(0), part(half)


def half_batch_noise_parts(
    module: nn.Module, loss_fn: LossFunction, batch: Any, batch_size: int
) -> tuple[Tensor, Tensor]:
    """(tr Σ, |G|²) of one batch from its two halves' gradients g₁, g₂ at the module's current
    parameters: B_small = B/2 with ‖g_small‖² = (‖g₁‖² + ‖g₂‖²)/2, and B_big = B with
    g_big = (g₁ + g₂)/2 (the loss is a mean), in :func:`two_batch_noise_parts`.

    The halves run through ``torch.func.functional_call`` with the module's parameters (not copied)
    and copies of its buffers, under ``torch.random.fork_rng``: parameters, ``.grad``, buffers
    (BatchNorm statistics) and the RNG are untouched. Needs ``batch_size >= 2``; float64 results on
    the parameters' device, no host sync.
    """
    params = {name: p.detach().requires_grad_(p.requires_grad) for name, p in module.named_parameters()}
    first, second = split_batch(batch, batch_size)
    with torch.random.fork_rng(devices=rng_devices(module)):
        gradients = [
            flatten(
                gradient_at(
                    module, params, {n: b.detach().clone() for n, b in module.named_buffers()}, loss_fn, half
                )
            ).double()
            for half in (first, second)
        ]
    small_sq_norm = (gradients[0].square().sum() + gradients[1].square().sum()) / 2
    big_sq_norm = ((gradients[0] + gradients[1]) / 2).square().sum()
    half = batch_size // 2
    return two_batch_noise_parts(small_sq_norm, big_sq_norm, half, 2 * half)
