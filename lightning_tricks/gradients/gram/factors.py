"""Factors: exact, compact descriptions of one parameter's per-sample gradients (seed 004_e5d92837cb57ce8a.txt §3, eq. 6).

Seed 004 builds F̃_k = J_kᵀ J_k layer by layer, F̃_k = Σ_l J_(k,l)ᵀ J_(k,l) (§4, "Implementation"),
where J_(k,l) holds the rows of J_k for layer l's parameters. A rule (:mod:`.rules`) turns a
layer's captured activations and output gradients into one *factor* per parameter, describing
that parameter's per-sample gradients g_i (column i of J_(k,l)):

- :class:`OuterFactor`: g_i[k] = Σ_t δ_{i,k,t} ⊗ a_{i,k,t}, a sum over positions t (sequence
  steps, pixels) of outer products of an output-gradient vector δ and an input vector a, per group
  k (Linear weights; :class:`ConvFactor` is the same for ConvNd and ConvTransposeNd weights, with
  a = receptive-field patches). Both exact methods apply: *ghost*, the Gram from inner products
  of the a's and of the δ's without ever forming g_i, and *materialised*, the g_i themselves
  followed by their Gram.
- :class:`EmbeddingFactor`: g_i[v] = Σ_t [idx_{i,t} = v] δ_{i,t}, with the same two methods.
- :class:`PerSampleFactor`: the g_i outright, when they are no larger than one activation channel
  per sample (biases, normalisation affine parameters), or computed by per-sample VJPs.

Each factor carries the cost of both methods in multiply-adds, so that the collector can pick the
cheaper one per layer and parameter. Every formula below is a column of J_k of seed 004 eq. 6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MethodCosts(NamedTuple):
    """Multiply-adds of the ghost and of the materialised method for one parameter."""

    ghost: float
    materialize: float


def _outer_costs(batch: int, groups: int, positions: int, p: int, q: int) -> MethodCosts:
    """Ghost: B²·K·T²·(p + q) (the two T×T inner-product blocks per pair of samples).
    Materialised: B·K·T·p·q (per-sample gradients) + B²·K·p·q (their Gram)."""
    return MethodCosts(
        ghost=batch**2 * groups * positions**2 * (p + q),
        materialize=batch * groups * positions * p * q + batch**2 * groups * p * q,
    )


class OuterFactor(NamedTuple):
    """g_i[k] = Σ_t δ[i, k, :, t] ⊗ a[i, k, :, t], reshaped to the parameter's shape.

    Shapes: ``activations`` (B, K, p, T), ``backprops`` (B, K, q, T) for K groups, p inputs and q
    outputs per group and T positions; g_i has K·q·p entries.
    """

    activations: Tensor
    backprops: Tensor
    shape: torch.Size

    def ghost_gram(self) -> Tensor:
        """G[i, j] = Σ_k Σ_{t,s} ⟨a_{ikt}, a_{jks}⟩·⟨δ_{ikt}, δ_{jks}⟩: seed 004 eq. 6 without forming g_i."""
        return self.ghost_grams(1)[0]

    def ghost_grams(self, count: int) -> Tensor:
        """:meth:`ghost_gram` of each of ``count`` layers whose samples are stacked in the batch
        dimension (n·B, K, p, T): the diagonal (B, B) blocks only, (n, B, B)."""
        input_products = _position_products(self.activations.reshape(count, -1, *self.activations.shape[1:]))
        output_products = _position_products(self.backprops.reshape(count, -1, *self.backprops.shape[1:]))
        return (input_products * output_products).sum(dim=(1, 3, 5))

    def per_sample(self) -> Tensor:
        """g_i[k] = Σ_t δ_{ikt} a_{ikt}ᵀ, shape (B, *shape)."""
        grads = torch.einsum("bkqt,bkpt->bkqp", self.backprops, self.activations)
        return grads.reshape(grads.shape[0], *self.shape)

    def costs(self) -> MethodCosts:
        """See ``_outer_costs``."""
        batch, groups, p, positions = self.activations.shape
        return _outer_costs(batch, groups, positions, p, self.backprops.shape[2])

    @staticmethod
    def concat(factors: Sequence[OuterFactor]) -> OuterFactor:
        """Several calls of one layer add their gradients: join their positions."""
        return OuterFactor(
            torch.cat([f.activations for f in factors], dim=-1),
            torch.cat([f.backprops for f in factors], dim=-1),
            factors[0].shape,
        )


def _position_products(x: Tensor) -> Tensor:
    """⟨x_{ikt}, x_{jks}⟩ for every pair of (sample, position) of each layer n and group k:
    (n, B, K, p, T) → (n, K, B, T, B, T), one batched product over the n·K (B·T, p) row blocks
    (on small maps 3× faster than the equivalent ``einsum``, which permutes its output)."""
    layers, batch, groups, width, positions = x.shape
    rows = x.permute(0, 2, 1, 4, 3).reshape(layers * groups, batch * positions, width)
    products = torch.bmm(rows, rows.transpose(1, 2))
    return products.reshape(layers, groups, batch, positions, batch, positions)


UNFOLD_MAX_POSITIONS = 64
"""Convolutions with at most this many positions (small maps) get per-sample gradients from batched
matrix products on the tensor read through the kernel (shifted views, else unfolded patches)."""

SHIFTED_STACK_MAX_ENTRIES = 2**19
"""Shifted products whose windows, stacked for all kernel offsets, have at most this many entries
(small maps and batches: a host-bound step) are one batched product on one copy of the stacked
windows; larger ones read each window in place, one product per kernel offset (no copy).
Measured (five same-shaped 3×3 layers computed together, one thread, ms, stacked / per offset):
C = 8 on 8×8, B = 8 (230k entries) 0.41 / 0.69; C = 16 on 4×4, B = 16 (276k) 0.86 / 0.99; C = 32
on 4×4, B = 8 (276k) 1.22 / 1.40 and 1.24 / 1.45; B = 16 (553k) 1.71 / 1.89; C = 64 on 2×2,
B = 8 (184k) 3.1 / 3.5; B = 16 (369k) 6.2 / 6.8; C = 64 on 4×4, B = 8 (553k) 3.78 / 3.77; C = 64
on 8×8, B = 8 (1.8M) 8.6 / 7.6."""

UNFOLD_MAX_PATCH = 32
"""Convolutions whose unfolded patch has at most this many entries (C_in/groups · Πk: a stem
convolution on RGB images) get per-sample gradients from unfolded patches on any map size."""

GROUPED_MIN_POSITIONS_PER_CHANNEL = 2
"""On small maps (CPU, stride 1), the grouped convolution backward beats the shifted products where
T ≥ this × C, C the larger of the layer's input and output channels per group, T its positions:
its cost per group grows with C², the shifted products' overhead with T. Measured (3×3 kernels,
five same-shaped layers computed together as in a measured step, one thread, thread CPU time,
medians of alternating rounds; ms, grouped / shifted, for B = 8 | 32 | 128): C = 8 on 4×4
0.39 / 0.32 | 0.73 / 1.45; C = 16 on 4×4 0.81 / 0.80 | 1.8 / 2.5; C = 32 on 4×4 3.0 / 1.7 |
5.7 / 6.2 | 62 / 51; C = 64 on 4×4 15 / 6.2 | 58 / 34; C = 32 on 2×2 1.5 / 1.0; C = 16 on 8×8
0.64 / 0.73 | 2.6 / 3.9 | 11 / 23; C = 32 on 8×8 2.5 / 3.1 | 9.0 / 12 | 64 / 78; C = 64 on 8×8
12.5 / 10.5 | 31 / 41 | 345 / 274. With stride > 1 the two other methods (grouped, patches)
measured within noise of each other on small maps (e.g. 16 → 32 channels, 8×8 → 4×4, B = 8:
0.38 / 0.36 ms), so patches stay there."""


class ConvFactor(NamedTuple):
    """Weight of a ConvNd or ConvTransposeNd layer: g_i(W)[k] = Σ_t δ_{kt} patch_{kt}ᵀ (see the rules).

    Shapes: ``inputs`` (B, C_in, *S), the layer's input, and ``backprops`` (B, C_out, *S'), the
    gradient of its output, both as autograd saw them (unpadded, in the layer's dtype); per-sample
    gradients are computed in ``dtype`` by one of three exact methods (:meth:`per_sample_method`):
    one convolution backward in which the batch becomes B·groups groups (large maps), one batched
    matrix product per kernel offset on shifted views of the flattened, padded map (small maps,
    stride 1: no patches copied), or a batched matrix product of unfolded patches.
    """

    inputs: Tensor
    backprops: Tensor
    layer: nn.Module
    dtype: torch.dtype

    def per_sample_method(self) -> str:
        """On CPU: ``"patches"`` for small patches (≤ ``UNFOLD_MAX_PATCH`` entries); else
        ``"grouped"`` (one B·groups-group convolution backward) on large maps (more than
        ``UNFOLD_MAX_POSITIONS`` positions); on small maps ``"patches"`` for stride > 1, else
        ``"grouped"`` where there are few channels per position
        (:data:`GROUPED_MIN_POSITIONS_PER_CHANNEL`), else ``"shifted"``.
        Elsewhere (GPU: few kernel launches matter more than multiply-adds) ``"patches"`` on small
        maps, else ``"grouped"``."""
        positions, patch, outputs = self._sizes()
        if self.inputs.device.type != "cpu":
            return "patches" if positions <= UNFOLD_MAX_POSITIONS else "grouped"
        if patch <= UNFOLD_MAX_PATCH:
            return "patches"
        if positions > UNFOLD_MAX_POSITIONS:
            return "grouped"
        if max(self.layer.stride) > 1:
            return "patches"
        channels = max(patch // math.prod(self.layer.kernel_size), outputs)
        return "grouped" if positions >= GROUPED_MIN_POSITIONS_PER_CHANNEL * channels else "shifted"

    def per_sample(self) -> Tensor:
        """g_i for every i at once, shape (B, *W.shape)."""
        method = self.per_sample_method()
        if method == "patches":
            return self.as_outer().per_sample()
        if method == "shifted":
            grads, stacked = self._shifted_products()  # (Πk, B·K, q, p/Πk) → (B, K·q, p/Πk, *kernel)
            batch, kernel = self.inputs.shape[0], self.layer.kernel_size
            if stacked:
                n, q, _ = grads.shape
                grads = grads.view(n, q, math.prod(kernel), -1).permute(2, 0, 1, 3)
            grads = grads.reshape(*kernel, batch, self.layer.groups, *grads.shape[2:])
            dims = len(kernel)
            grads = grads.permute(dims, dims + 1, dims + 2, dims + 3, *range(dims))
            return grads.reshape(batch, *self.layer.weight.shape)
        batch = self.inputs.shape[0]
        inputs, padding = self._convolved()
        flat = [
            cast(t, self.dtype).reshape(1, batch * t.shape[1], *t.shape[2:]) for t in (inputs, self.backprops)
        ]
        grads = self._weight_backward(flat[0], flat[1], padding, batch)
        return grads.reshape(batch, *self.layer.weight.shape)

    def rows(self) -> Tensor:
        """g_i flattened, (B, W.numel()), or split by kernel offset, (Πk, B, W.numel()/Πk) when
        shifted one offset at a time (G = Σ over the splits of their Grams; no copy into
        per-sample order)."""
        if self.per_sample_method() == "shifted":
            grads, stacked = self._shifted_products()
            if stacked:  # per-sample order already
                return grads.reshape(self.inputs.shape[0], -1)
            return grads.reshape(grads.shape[0], self.inputs.shape[0], -1)
        grads = self.per_sample()
        return grads.reshape(grads.shape[0], -1)

    def _shifted_products(self) -> tuple[Tensor, bool]:
        """g_i[k][κ] = Σ_t o_{ikt} r_{ik}[t + κ·d]ᵀ for stride 1, (Πk, B·K, q, p/Πk), or, with
        ``True`` (stacked windows, :data:`SHIFTED_STACK_MAX_ENTRIES`), (B·K, q, Πk·p/Πk) with
        columns in (κ, input) order: o is the side
        indexed by positions t (output gradient of a ConvNd, input of a ConvTransposeNd), r the
        zero-padded side read through the kernel at offset κ (``_read_and_other``).

        Both are flattened over space, o zero-padded to r's sizes in every spatial dim but the
        first, so that for each κ the window t + κ·d of r is one contiguous slice of r's flat
        positions: one batched matrix product per kernel offset (or one on the windows stacked), the
        padded zeros of o cancelling
        the wrapped-around entries of r (seed 004 eq. 6 in the layout of the weight's kernel offsets).
        """
        layer, groups = self.layer, self.layer.groups
        read, other = self._read_and_other()
        dtype = self.dtype
        read = read if read.dtype == dtype else read.to(dtype)
        other = other if other.dtype == dtype else other.to(dtype)
        sizes, extent = read.shape[2:], other.shape[2:]
        pad = [side for r, o in zip(reversed(sizes[1:]), reversed(extent[1:])) for side in (0, r - o)]
        other = torch.constant_pad_nd(other, pad) if any(pad) else other
        span = math.prod(other.shape[2:])
        jumps = [dil * math.prod(sizes[d + 1 :]) for d, dil in enumerate(layer.dilation)]
        last = sum([(k - 1) * jump for k, jump in zip(layer.kernel_size, jumps)])
        batch = read.shape[0]
        flat = read.reshape(batch * groups, read.shape[1] // groups, -1)
        if last + span > flat.shape[-1]:
            flat = torch.constant_pad_nd(flat, (0, last + span - flat.shape[-1]))
        rows = other.reshape(batch * groups, other.shape[1] // groups, span)
        offsets, (n, q), c = math.prod(layer.kernel_size), rows.shape[:2], flat.shape[1]
        if n * span * offsets * c <= SHIFTED_STACK_MAX_ENTRIES:
            stacked = _stacked_windows(flat, layer.kernel_size, jumps, span)
            return torch.bmm(rows, stacked.transpose(1, 2)), True
        grads = rows.new_empty(offsets, n, q, c)
        for out, window in zip(grads.unbind(0), _windows(flat, layer.kernel_size, jumps, span)):
            torch.bmm(rows, window, out=out)
        return grads, False

    def ghost_gram(self) -> Tensor:
        """G[i, j] from the unfolded patches (:meth:`OuterFactor.ghost_gram`, seed 004 eq. 6)."""
        return self.as_outer().ghost_gram()

    def costs(self) -> MethodCosts:
        """Those of the equivalent :class:`OuterFactor`, from shapes only."""
        return _outer_costs(self.inputs.shape[0], self.layer.groups, *self._sizes())

    def _sizes(self) -> tuple[int, int, int]:
        """(T, p, q) of the equivalent :class:`OuterFactor`."""
        channels_in, channels_out = self.inputs.shape[1], self.backprops.shape[1]
        groups, kernel = self.layer.groups, math.prod(self.layer.kernel_size)
        if self.layer.transposed:
            return math.prod(self.inputs.shape[2:]), channels_out // groups * kernel, channels_in // groups
        return math.prod(self.backprops.shape[2:]), channels_in // groups * kernel, channels_out // groups

    def _read_and_other(self) -> tuple[Tensor, Tensor]:
        """The side read through the kernel, zero-padded (a ConvNd's input as convolved, a
        ConvTransposeNd's output gradient cut to the (in − 1)·s + d·(k − 1) + 1 entries per dim that
        the input positions reach: ``output_padding`` may add more), and the other side (indexed by
        positions t)."""
        layer = self.layer
        if not layer.transposed:
            return _zero_pad(*self._convolved()), self.backprops
        read = _zero_pad(self.backprops, layer.padding)
        geometry = zip(self.inputs.shape[2:], layer.stride, layer.dilation, layer.kernel_size)
        reach = [slice(0, (size - 1) * s + d * (k - 1) + 1) for size, s, d, k in geometry]
        return read[(slice(None), slice(None), *reach)], self.inputs

    def as_outer(self) -> OuterFactor:
        """The same gradients as sums of outer products over unfolded positions of the side read
        through the kernel (``_read_and_other``)."""
        layer = self.layer
        read, other = self._read_and_other()
        patches = unfold_patches(cast(read, self.dtype), layer.kernel_size, layer.stride, layer.dilation)
        batch, groups = patches.shape[0], layer.groups
        return OuterFactor(
            _positions_last(patches, batch, groups),
            _positions_last(cast(other, self.dtype), batch, groups),
            layer.weight.shape,
        )

    @staticmethod
    def grams(factors: Sequence[ConvFactor], ghost: bool = False) -> Tensor:
        """The blocks G_l, (n, B, B), of n convolutions with the same geometry, operand shapes and
        dtypes, from one computation on the n·B samples stacked (each sample's g_i depends on its
        own operands only, seed 004 eq. 6): materialised, R_l R_lᵀ by one batched product of their
        per-sample gradients R_l (rows split by kernel offset κ: Σ_κ R_(l,κ) R_(l,κ)ᵀ, one product
        over all (κ, l), no copy back into per-sample order); ``ghost``,
        :meth:`OuterFactor.ghost_grams` of the unfolded patches."""
        first = factors[0]
        count, batch = len(factors), first.inputs.shape[0]
        joined = ConvFactor(
            torch.cat([f.inputs for f in factors]),
            torch.cat([f.backprops for f in factors]),
            first.layer,
            first.dtype,
        )
        if ghost:
            return joined.as_outer().ghost_grams(count)
        rows = joined.rows()
        if rows.dim() == 3:  # (Πk, n·B, P/Πk) split by kernel offset: a partial Gram per (κ, l)
            offsets = rows.shape[0]
            rows = rows.reshape(offsets * count, batch, -1)
            grams = torch.bmm(rows, rows.transpose(1, 2))
            return grams.view(offsets, count, batch, batch).sum(0)
        rows = rows.reshape(count, batch, -1)
        return torch.bmm(rows, rows.transpose(1, 2))

    @staticmethod
    def concat(factors: Sequence[ConvFactor]) -> OuterFactor:
        """Several calls (possibly of different sizes) add their gradients: join unfolded positions."""
        return OuterFactor.concat([f.as_outer() for f in factors])

    def _convolved(self) -> tuple[Tensor, tuple[int, ...]]:
        """The tensor ``aten.convolution`` received in the forward and the padding it applied: the
        input itself, or the input padded first (``padding_mode`` other than zeros; the asymmetric
        part of ``padding="same"``), as ``nn.ConvNd`` and ``F.conv*d`` do."""
        layer, inputs = self.layer, self.inputs
        dims = len(layer.kernel_size)
        if layer.transposed:
            return inputs, tuple(layer.padding)
        if layer.padding_mode != "zeros":
            return F.pad(inputs, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0,) * dims
        if layer.padding == "valid":
            return inputs, (0,) * dims
        if layer.padding != "same":
            return inputs, tuple(layer.padding)
        totals = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation)]
        left = tuple(total // 2 for total in totals)
        extra = [side for total in reversed(totals) for side in (0, total % 2)]
        return (torch.constant_pad_nd(inputs, extra) if any(extra) else inputs), left

    def _weight_backward(
        self, inputs: Tensor, backprops: Tensor, padding: tuple[int, ...], batch_groups: int
    ) -> Tensor:
        """The weight gradient of the layer's convolution, with ``batch_groups`` times its groups
        (``inputs``/``backprops`` then carry the batch in their channels)."""
        layer = self.layer
        weight = layer.weight
        if batch_groups > 1 or weight.dtype != inputs.dtype:
            weight = inputs.new_empty((batch_groups * weight.shape[0], *weight.shape[1:]))
        output_padding = (
            _output_padding(layer, inputs, backprops, padding) if layer.transposed else (0,) * len(padding)
        )
        return torch.ops.aten.convolution_backward(
            backprops,
            inputs,
            weight,
            None,
            layer.stride,
            padding,
            layer.dilation,
            layer.transposed,
            output_padding,
            batch_groups * layer.groups,
            (False, True, False),
        )[1]


def _stacked_windows(flat: Tensor, kernel: Sequence[int], jumps: Sequence[int], span: int) -> Tensor:
    """The windows of :func:`_windows`, transposed and stacked, (N, Πk·C, span) with rows in (κ, c)
    order: one strided view of ``flat`` (N, C, L), copied once (Πk times its entries, in
    contiguous runs of ``span``)."""
    sample, channel, position = flat.stride()
    sizes = (flat.shape[0], *kernel, flat.shape[1], span)
    windows = flat.as_strided(sizes, (sample, *[jump * position for jump in jumps], channel, position))
    return windows.reshape(flat.shape[0], -1, span)


def _windows(flat: Tensor, kernel: Sequence[int], jumps: Sequence[int], span: int) -> list[Tensor]:
    """``flat[:, :, o : o + span].transpose(1, 2)`` for every kernel offset κ, o = Σ_d κ_d·jump_d, in
    ``itertools.product`` order: the same views, cut from one strided view of ``flat`` (N, C, L) by
    a few ``unbind`` instead of a slice and a transpose per offset."""
    sample, channel, position = flat.stride()
    sizes = (*kernel, flat.shape[0], span, flat.shape[1])
    windows = flat.as_strided(sizes, (*[jump * position for jump in jumps], sample, position, channel))
    views = [windows]
    for _ in kernel:
        views = [view for stacked in views for view in stacked.unbind(0)]
    return views


def _zero_pad(x: Tensor, padding: Sequence[int]) -> Tensor:
    """``x`` (B, C, *S) with ``padding[d]`` zeros on both sides of spatial dim d (``F.pad``'s
    constant padding, without its Python frames)."""
    if not any(padding):
        return x
    return torch.constant_pad_nd(x, [p for p in reversed(padding) for _ in range(2)])


def _output_padding(
    layer: nn.Module, inputs: Tensor, backprops: Tensor, padding: Sequence[int]
) -> tuple[int, ...]:
    """Output padding a transposed convolution used (``output_size`` may have changed it):
    out = (in − 1)·s − 2p + d·(k − 1) + output_padding + 1."""
    geometry = zip(
        backprops.shape[2:], inputs.shape[2:], layer.stride, padding, layer.dilation, layer.kernel_size
    )
    return tuple(out - ((size - 1) * s - 2 * p + d * (k - 1) + 1) for out, size, s, p, d, k in geometry)


class EmbeddingFactor(NamedTuple):
    """g_i[v] = Σ_t [idx_{i,t} = v] δ_{i,t}: ``indices`` (B, T) int, ``backprops`` (B, T, d)."""

    indices: Tensor
    backprops: Tensor
    num_embeddings: int

    def ghost_gram(self) -> Tensor:
        """G[i, j] = Σ_{t,s} [idx_{it} = idx_{js}] · ⟨δ_{it}, δ_{js}⟩."""
        same_row = self.indices[:, :, None, None] == self.indices[None, None, :, :]
        output_products = torch.einsum("btd,csd->btcs", self.backprops, self.backprops)
        return (output_products * same_row).sum(dim=(1, 3))

    def per_sample(self) -> Tensor:
        """Dense g_i, shape (B, V, d): each δ_{it} added into row idx_{it} of sample i's copy."""
        batch, positions, dim = self.backprops.shape
        rows = self.indices + self.num_embeddings * torch.arange(batch, device=self.indices.device)[:, None]
        grads = self.backprops.new_zeros(batch * self.num_embeddings, dim)
        grads.index_add_(0, rows.reshape(-1), self.backprops.reshape(-1, dim))
        return grads.reshape(batch, self.num_embeddings, dim)

    def costs(self) -> MethodCosts:
        """Ghost: B²·T²·(d + 1). Materialised: B·T·d (scatter) + B²·V·d (Gram of dense g_i)."""
        batch, positions, dim = self.backprops.shape
        return MethodCosts(
            ghost=batch**2 * positions**2 * (dim + 1),
            materialize=batch * positions * dim + batch**2 * self.num_embeddings * dim,
        )

    @staticmethod
    def concat(factors: Sequence[EmbeddingFactor]) -> EmbeddingFactor:
        """Several calls of one embedding add their gradients: join their positions."""
        return EmbeddingFactor(
            torch.cat([f.indices for f in factors], dim=1),
            torch.cat([f.backprops for f in factors], dim=1),
            factors[0].num_embeddings,
        )


class PerSampleFactor(NamedTuple):
    """The per-sample gradients themselves, ``grads`` of shape (B, *parameter shape)."""

    grads: Tensor

    def per_sample(self) -> Tensor:
        """g_i, shape (B, *shape)."""
        return self.grads

    def costs(self) -> MethodCosts:
        """Materialised only: B²·P multiply-adds for the Gram."""
        return MethodCosts(math.inf, self.grads.shape[0] ** 2 * math.prod(self.grads.shape[1:]))

    @staticmethod
    def concat(factors: Sequence[PerSampleFactor]) -> PerSampleFactor:
        """Several calls of one layer add their gradients."""
        return PerSampleFactor(torch.stack([f.grads for f in factors]).sum(0))


class ChannelAffineFactor(NamedTuple):
    """γ and β of y = γ_c·(x − μ)·r + β_c per channel c (normalisation layers), kept as the layer's
    input and output gradient until read: g_i(γ)[c] = r·Σ_t δ_{ct}(x_{ct} − μ), g_i(β)[c] = Σ_t δ_{ct}
    (seed 004 eq. 6).

    ``inputs`` and ``backprops`` (B, C, *S) in the compute dtype, μ = ``mean`` and r = 1/√(σ² + ε)
    = ``rstd`` of shape (C,) or (B, C); ``names`` the affine parameters present (``"weight"`` for
    γ, ``"bias"`` for β, in that order), ``part`` the one this factor describes (the layer's
    factors differ in ``part`` only). Both reductions run in one pass of the batch-norm backward
    kernel with the batch folded into the channels, so that each (sample, channel) is reduced on
    its own; several layers of one shape in one pass (:meth:`grams`).
    """

    inputs: Tensor
    backprops: Tensor
    mean: Tensor
    rstd: Tensor
    names: tuple[str, ...]
    part: str

    def per_sample(self) -> Tensor:
        """g_i of ``part``, shape (B, C)."""
        batch, channels = self.inputs.shape[:2]
        grads = _affine_grads((self,), [self.part == name for name in ("weight", "bias")])
        return grads.reshape(batch, channels)

    def rows(self) -> Tensor:
        """[g_i(γ), g_i(β)] of the layer, interleaved per channel, (B, C·len(names)): the rows
        whose Gram is the layer's block (the order of entries does not change it)."""
        wanted = [name in self.names for name in ("weight", "bias")]
        return _affine_grads((self,), wanted).view(self.inputs.shape[0], -1)

    @staticmethod
    def grams(factors: Sequence[ChannelAffineFactor]) -> Tensor:
        """The layers' blocks G_l = R_l R_lᵀ, (n, B, B), for n factors of one shape, dtype and
        ``names``: one batch-norm backward and one batched product for all of them."""
        rows = _affine_rows(factors)
        return torch.bmm(rows, rows.transpose(1, 2))

    @staticmethod
    def concat(factors: Sequence[ChannelAffineFactor]) -> PerSampleFactor:
        """Several calls of one layer add their gradients."""
        return PerSampleFactor(torch.stack([f.per_sample() for f in factors]).sum(0))


def _affine_rows(factors: Sequence[ChannelAffineFactor]) -> Tensor:
    """(n, B, C·len(names)): per layer and sample, g(γ) and g(β) interleaved per channel."""
    first = factors[0]
    batch, channels = first.inputs.shape[:2]
    wanted = [name in first.names for name in ("weight", "bias")]
    grads = _affine_grads(factors, wanted)
    return grads.view(len(factors), batch, channels * len(first.names))


def _affine_grads(factors: Sequence[ChannelAffineFactor], wanted: list[bool]) -> Tensor:
    """The wanted reductions of the factors' (sample, channel) pairs, stacked last, (n·B·C, k) (one
    wanted: (n·B·C,)), from one ``native_batch_norm_backward`` on the folded batch. The kernel's
    weight only scales the input gradient, which is not asked for; CUDA's kernel needs one all the
    same."""
    first = factors[0]
    batch, channels = first.inputs.shape[:2]
    folded = len(factors) * batch * channels
    if len(factors) == 1:
        inputs, backprops, mean, rstd = first.inputs, first.backprops, first.mean, first.rstd
        if mean.dim() == 1:
            mean, rstd = mean.expand(batch, channels), rstd.expand(batch, channels)
    else:
        inputs = torch.stack([f.inputs for f in factors])
        backprops = torch.stack([f.backprops for f in factors])
        mean = _stacked_stats([f.mean for f in factors], batch)
        rstd = _stacked_stats([f.rstd for f in factors], batch)
    folded_rstd = rstd.reshape(-1)
    _, weight_grads, bias_grads = torch.ops.aten.native_batch_norm_backward(
        backprops.reshape(1, folded, -1),
        inputs.reshape(1, folded, -1),
        folded_rstd.new_ones(folded),
        None,
        None,
        mean.reshape(-1),
        folded_rstd,
        True,
        0.0,
        [False, *wanted],
    )
    grads = [g for g, w in zip((weight_grads, bias_grads), wanted) if w]
    return grads[0] if len(grads) == 1 else torch.stack(grads, dim=-1)


def _stacked_stats(stats: list[Tensor], batch: int) -> Tensor:
    """Per-layer statistics of shape (C,) or (B, C), as (n, B, C)."""
    if stats[0].dim() == 1:
        stacked = torch.stack(stats)
        return stacked[:, None].expand(len(stats), batch, stacked.shape[1])
    return torch.stack(stats)


GradFactor = Union[OuterFactor, ConvFactor, EmbeddingFactor, PerSampleFactor, ChannelAffineFactor]


def concat_factors(factors: Sequence[GradFactor]) -> GradFactor:
    """The factor of a parameter used by several calls of its layer: gradients of all calls added."""
    return factors[0].concat(factors) if len(factors) > 1 else factors[0]


_BELOW_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the Gram is computed in: the promoted floating dtype, at least float32 (no
    dispatched ``promote_types`` for the usual float32/16-bit tensors)."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.dtype not in _BELOW_FLOAT32:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without dispatching an op where it already has that dtype."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _positions_last(tensor: Tensor, batch: int, groups: int) -> Tensor:
    """(B, C, *positions) → (B, K, C/K, T)."""
    return tensor.reshape(batch, groups, tensor.shape[1] // groups, -1)


IM2COL_MAX_POSITIONS = 8
"""2-D patches with at most this many positions (tiny maps) come from one im2col (``F.unfold``);
the views' copy there moves runs of a few entries at a time (twice as slow at 2×2 positions), while
on larger maps it is the faster of the two. The same entries either way."""


def unfold_patches(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """Receptive-field patches of an already padded ``x`` (B, C, *S): (B, C·Πk, T).

    Patch t of channel c holds x[c, o_t·stride + κ·dilation] for each kernel offset κ, in the
    (C, *kernel) order of a ConvNd weight; T = Π output sizes (:data:`IM2COL_MAX_POSITIONS`).
    """
    dims = len(kernel_size)
    positions = 1
    for size, k, s, d in zip(x.shape[2:], kernel_size, stride, dilation):
        positions *= (size - d * (k - 1) - 1) // s + 1
    if dims == 2 and positions <= IM2COL_MAX_POSITIONS:  # F.unfold's op, without its Python frames
        return torch.ops.aten.im2col(x, kernel_size, dilation, (0, 0), stride)
    for d, (k, s, dil) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)[..., ::dil]
    x = x.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return x.reshape(x.shape[0], x.shape[1] * math.prod(kernel_size), -1)
