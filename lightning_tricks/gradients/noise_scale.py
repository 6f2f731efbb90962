"""The gradient-noise scale from gradients at two batch sizes (McCandlish et al. 2018, appendix A.1).

Without per-sample gradients, tr Σ and |G|² still follow from the squared norms of two batch
gradients, since E‖g_B‖² = |G|² + tr Σ / B. :func:`half_batch_noise_parts` measures them on one
training batch by splitting it in halves: one extra forward/backward of the batch, at the current
parameters, that leaves the module, its gradients, its buffers and the random stream untouched.
The BatchSizeScheduler's adaptive policy uses it where no FisherSpectrum measures F̃.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .minibatch_distance import LossFunction, flatten, gradient_at, rng_devices


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
