"""Distances of mini-batch gradients to the full-batch gradient (seed ``002_696f8026b30a9c31.txt`` §3.1,
Algorithm 1), pure torch.

At the start of epoch e the parameters θ_e are frozen (:func:`freeze`); for every mini-batch k the
gradient ∇_k of the mean loss at θ_e is taken (:func:`gradient_at`, one forward/backward through
``torch.func.functional_call``, the module's own tensors untouched); :class:`MinibatchDistances`
keeps the ∇_k — exactly (in memory up to a budget, then in a memory-mapped file) or as a seeded
CountSketch (:class:`CountSketch`) — and at the end gives D_{e,k} = ‖∇_k − ∇_e‖ with
∇_e = Σ_k m_k ∇_k / Σ_k m_k (seed 002 eq. 3, m_k the batch sizes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

MODES = ("auto", "exact", "sketch")
DISTANCES = ("l2", "cosine")
CHUNK_ELEMENTS = 1 << 24
"""Stored rows are read back in chunks of at most this many elements (float64 working copies)."""

LossFunction = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(module, batch) -> scalar mean loss``."""


# -- the frozen copy and the per-batch gradient -----------------------------------------------


def freeze(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """θ_e: detached copies of ``module``'s parameters (``requires_grad`` as the originals) and of its
    buffers — the seed's ``net_compare`` (Algorithm 1, line 5) without a second module."""
    params = {
        name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in module.named_parameters()
    }
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    return params, buffers


class _LossCall(nn.Module):
    """Calls ``loss_fn(module, batch)`` as its forward, so ``functional_call`` can swap the tensors."""

    def __init__(self, module: nn.Module, loss_fn: LossFunction) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.module, batch)


def gradient_at(
    module: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    loss_fn: LossFunction,
    batch: Any,
) -> list[Tensor]:
    """∇_k: the gradient of ``loss_fn(module, batch)`` at the frozen ``params`` with respect to those
    that require a gradient (Algorithm 1, lines 13–16); zeros for parameters the loss does not use.

    ``module`` runs with ``params`` and ``buffers`` in place of its own tensors (``functional_call``):
    its parameters, their ``.grad`` and its buffers are not touched; in-place buffer updates (BatchNorm
    running statistics in train mode) land in ``buffers``, the frozen copy's own statistics.
    """
    tensors = {f"module.{name}": t for name, t in {**params, **buffers}.items()}
    loss = torch.func.functional_call(_LossCall(module, loss_fn), tensors, (batch,))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"The loss must be a scalar (mean-reduced) tensor; got {shape}.")
    trainable = [p for p in params.values() if p.requires_grad]
    return list(torch.autograd.grad(loss.reshape(()), trainable, allow_unused=True, materialize_grads=True))


def rng_devices(module: nn.Module) -> list[int]:
    """The CUDA devices whose RNG ``torch.random.fork_rng`` must save around ``module``'s extra
    forwards (none on CPU), so that they leave training's random stream untouched."""
    device = next(module.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One vector of all ``tensors`` (float32 at least), in order."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32) if tensors else torch.float32
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


# -- sketch ------------------------------------------------------------------------------------


class CountSketch:
    r"""Seeded sparse random projection R^P → R^d (Charikar, Chen & Farach-Colton 2002): coordinate i
    goes to bucket h(i) with sign s(i), ``(Sx)_j = Σ_{i: h(i)=j} s(i) x_i``. O(P) per vector, 12·P
    bytes of hash tables, linear (so S(∇_k − ∇_e) = S∇_k − S∇_e).

    A Johnson–Lindenstrauss-type embedding: E‖Sx‖² = ‖x‖² and Var ‖Sx‖² = (2/d)(‖x‖⁴ − ‖x‖₄⁴)
    ≤ 2‖x‖⁴/d (Thorup & Zhang 2012), so by Chebyshev, for each vector,
    P(|‖Sx‖² − ‖x‖²| > ε‖x‖²) ≤ 2/(d ε²) — and then also |‖Sx‖ − ‖x‖| ≤ ε‖x‖. See
    :func:`sketch_failure_probability` and :func:`sketch_dim_for`.

    The tables come from a CPU generator seeded with ``seed``, so every process and every run with
    the same ``(dim, sketch_dim, seed)`` gets the same sketch.
    """

    def __init__(self, dim: int, sketch_dim: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        generator = torch.Generator().manual_seed(seed)
        self.dim, self.sketch_dim = dim, sketch_dim
        self.buckets = torch.randint(0, sketch_dim, (dim,), generator=generator).to(device)
        self.signs = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(device, torch.float32)

    def __call__(self, vector: Tensor) -> Tensor:
        """``S @ vector`` for a ``(P,)`` vector, as ``(d,)``."""
        out = torch.zeros(self.sketch_dim, device=vector.device, dtype=vector.dtype)
        return out.index_add_(0, self.buckets, vector * self.signs.to(vector.dtype))


def sketch_failure_probability(sketch_dim: int, eps: float) -> float:
    """Bound on P(|D̃ − D| > ε·D) for one distance D measured through a ``sketch_dim`` CountSketch:
    ``min(1, 2 / (d ε²))`` (Chebyshev on the variance in :class:`CountSketch`)."""
    return min(1.0, 2.0 / (sketch_dim * eps**2))


def sketch_dim_for(eps: float, delta: float) -> int:
    """The smallest ``sketch_dim`` with each distance within relative error ``eps`` with
    probability ``>= 1 - delta``: ``⌈2 / (ε² δ)⌉``."""
    return math.ceil(2.0 / (eps**2 * delta))


# -- stores --------------------------------------------------------------------------------------


class _RowStore:
    """``rows × dim`` float32 rows: the first ones in a device tensor up to ``memory_budget`` bytes,
    the rest in a memory-mapped file at ``spill_path`` (created on the first spilled row)."""

    def __init__(
        self, rows: int, dim: int, device: torch.device, memory_budget: int, spill_path: str | None
    ) -> None:
        self.rows, self.dim, self.device = rows, dim, device
        in_memory = min(rows, memory_budget // (4 * dim)) if dim else rows
        if in_memory < rows and spill_path is None:
            raise ValueError(
                f"{rows} gradients of {dim} values need {rows * dim * 4} bytes, more than `memory_budget`="
                f"{memory_budget}, and no spill file was given; raise the budget or use mode='sketch'."
            )
        self._memory = torch.empty(in_memory, dim, device=device)
        self._spill_path = spill_path
        self._spill: Tensor | None = None

    @property
    def spilled(self) -> bool:
        return self._spill is not None

    def put(self, index: int, row: Tensor) -> None:
        if index < len(self._memory):
            self._memory[index].copy_(row)
            return
        if self._spill is None:
            os.makedirs(os.path.dirname(os.path.abspath(self._spill_path)), exist_ok=True)
            array = np.lib.format.open_memmap(
                self._spill_path, mode="w+", dtype=np.float32, shape=(self.rows - len(self._memory), self.dim)
            )
            self._spill = torch.from_numpy(array)
        self._spill[index - len(self._memory)].copy_(row)

    def chunks(self) -> Iterator[tuple[int, Tensor]]:
        """``(first row, rows)`` on the device, at most :data:`CHUNK_ELEMENTS` values at a time."""
        step = max(1, CHUNK_ELEMENTS // max(self.dim, 1))
        for start in range(0, self.rows, step):
            stop = min(start + step, self.rows)
            parts = []
            if start < len(self._memory):
                parts.append(self._memory[start : min(stop, len(self._memory))])
            if stop > len(self._memory) and self._spill is not None:
                offset = len(self._memory)
                parts.append(self._spill[max(start, offset) - offset : stop - offset].to(self.device))
            if parts:
                yield start, torch.cat(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        """Release the rows and remove the spill file."""
        self._memory = self._memory[:0]
        if self._spill is not None:
            self._spill = None
            if os.path.exists(self._spill_path):
                os.remove(self._spill_path)


def resolve_mode(mode: str, num_batches: int, dim: int, memory_budget: int) -> str:
    """``"exact"`` or ``"sketch"``: ``"auto"`` is exact when the ``num_batches × dim`` float32 gradients
    fit ``memory_budget`` bytes."""
    if mode != "auto":
        return mode
    return "exact" if num_batches * dim * 4 <= memory_budget else "sketch"


class MinibatchDistances:
    """One epoch of Algorithm 1 (seed ``002_696f8026b30a9c31.txt`` §3.1): collect ∇_k, k < K, then
    D_{e,k} = ‖∇_k − ∇_e‖ (``"l2"``) or 1 − cos(∇_k, ∇_e) (``"cosine"``), with the full-batch gradient
    ∇_e = Σ_k m_k ∇_k / Σ_k m_k (eq. 3; the batch-size-weighted mean, the seed's 1/K Σ_k ∇_k of
    line 19 when all batches have the same size).

    Use :meth:`project` on each flattened ∇_k (identity in exact mode, the sketch otherwise; linear,
    so a sum over processes can be taken after it), then :meth:`add`; :meth:`distances` at the end;
    :meth:`close` to free memory and remove a spill file.

    Args:
        num_batches: K.
        dim: P, the number of gradient values.
        mode: ``"exact"``, ``"sketch"`` or ``"auto"`` (:func:`resolve_mode`).
        memory_budget: bytes of exact gradients kept in memory before spilling to ``spill_path``.
        sketch_dim: d of the sketch.
        seed: seed of the sketch.
        device: where the rows and the running sum live.
        spill_path: the memory-mapped ``.npy`` file for rows beyond the budget (exact mode).
        store: keep rows (``False``: only :meth:`project`, for processes that hand their rows on).
    """

    def __init__(
        self,
        num_batches: int,
        dim: int,
        *,
        mode: str = "auto",
        memory_budget: int = 1 << 30,
        sketch_dim: int = 1024,
        seed: int = 0,
        device: torch.device | str = "cpu",
        spill_path: str | None = None,
        store: bool = True,
    ) -> None:
        device = torch.device(device)
        self.mode = resolve_mode(mode, num_batches, dim, memory_budget)
        self.sketch = CountSketch(dim, sketch_dim, seed, device) if self.mode == "sketch" else None
        width = sketch_dim if self.sketch is not None else dim
        budget = memory_budget if self.sketch is None else max(memory_budget, num_batches * width * 4)
        self._store = _RowStore(num_batches if store else 0, width, device, budget, spill_path)
        self._sum = torch.zeros(width if store else 0, device=device, dtype=torch.float64)
        self._weights = torch.zeros(num_batches, device=device, dtype=torch.float64)

    @property
    def spilled(self) -> bool:
        """Whether some rows went to the memory-mapped file."""
        return self._store.spilled

    def project(self, gradient: Tensor) -> Tensor:
        """The stored form of a flattened gradient: itself (exact) or its sketch."""
        return gradient if self.sketch is None else self.sketch(gradient)

    def add(self, index: int, row: Tensor, weight: float | Tensor) -> None:
        """Store the projected ∇_k of batch ``index`` with weight m_k (its number of samples)."""
        self._store.put(index, row)
        if isinstance(weight, Tensor):  # a size summed over processes: no host sync
            self._sum.add_(row.to(torch.float64) * weight)
        else:
            self._sum.add_(row, alpha=weight)  # accumulated in float64
        self._weights[index] = weight

    def full_gradient(self) -> Tensor:
        """∇_e (projected), float64."""
        return self._sum / self._weights.sum()

    def distances(self, kind: str = "l2") -> Tensor:
        """D_{e,k} for every k, ``(K,)`` float64; NaN for batches never added."""
        full = self.full_gradient()
        out = torch.full_like(self._weights, math.nan)
        for start, rows in self._store.chunks():
            out[start : start + len(rows)] = _distance(rows.to(torch.float64), full, kind)
        return torch.where(self._weights > 0, out, math.nan)

    def close(self) -> None:
        """Free the stored ∇_k and remove a spill file."""
        self._store.close()


def _distance(rows: Tensor, full: Tensor, kind: str) -> Tensor:
    """‖r − f‖ per row (``"l2"``) or 1 − ⟨r, f⟩ / (‖r‖ ‖f‖) (``"cosine"``)."""
    if kind == "l2":
        return (rows - full).norm(dim=1)
    return 1.0 - (rows @ full) / (rows.norm(dim=1) * full.norm())
