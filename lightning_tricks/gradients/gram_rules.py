"""Per-layer rules for the Gram matrix of per-sample gradients (seed 004_e5d92837cb57ce8a.txt §3, eq. 6).

Seed 004 builds F̃_k = J_kᵀ J_k layer by layer, F̃_k = Σ_l J_(k,l)ᵀ J_(k,l) (§4, "Implementation"),
where J_(k,l) holds the rows of J_k for layer l's parameters. Here a layer's contribution comes
from the activations its forward received and the gradient its output received in the ordinary
batched backward, through one small rule per layer type.

A rule turns ``(layer, activations, backprops)`` into one *factor* per parameter: a compact,
exact description of that parameter's per-sample gradients g_i (column i of J_(k,l)).

- :class:`OuterFactor`: g_i[k] = Σ_t δ_{i,k,t} ⊗ a_{i,k,t}, a sum over positions t (sequence
  steps, pixels) of outer products of an output-gradient vector δ and an input vector a, per group
  k (Linear weights; :class:`ConvFactor` is the same for ConvNd and ConvTransposeNd weights, with
  a = receptive-field patches). Both exact methods apply: *ghost*, the Gram from inner products
  of the a's and of the δ's without ever forming g_i, and *materialised*, the g_i themselves
  followed by their Gram.
- :class:`EmbeddingFactor`: g_i[v] = Σ_t [idx_{i,t} = v] δ_{i,t}, with the same two methods.
- :class:`PerSampleFactor`: the g_i outright, when they are no larger than one activation channel
  per sample (biases, normalisation affine parameters).

Each factor carries the cost of both methods in multiply-adds, so that the collector can pick the
cheaper one per layer and parameter. Adding a layer type is adding one function decorated with
:func:`register_gram_rule`. Every formula below is a column of J_k of seed 004 eq. 6.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_leaves


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


class MatmulGradient(NamedTuple):
    """The weight gradient of ``y = x Wᵀ (+ b)`` exactly as autograd computes it.

    ``inputs`` (N, d_in) and ``backprops`` (N, d_out) are the 2-D views autograd's matrix product
    saw (leading dims folded by ``reshape``, as ``F.linear`` and ``matmul`` fold them).
    """

    inputs: Tensor
    backprops: Tensor
    weight: Tensor

    def __call__(self) -> Tensor:
        """∇W = δᵀ x with the operands, transposes and output layout of autograd's ``mm`` backward
        (``mm_mat2_backward`` for the operand Wᵀ), so the bits are those of a plain backward."""
        transposed = self.weight.t()
        rows = transposed.shape[0]
        if transposed.stride() == (1, rows):
            return self.backprops.t().mm(self.inputs)
        return self.inputs.t().mm(self.backprops).t()


class OuterFactor(NamedTuple):
    """g_i[k] = Σ_t δ[i, k, :, t] ⊗ a[i, k, :, t], reshaped to the parameter's shape.

    Shapes: ``activations`` (B, K, p, T), ``backprops`` (B, K, q, T) for K groups, p inputs and q
    outputs per group and T positions; g_i has K·q·p entries. ``exact``, where given, computes
    the batch gradient with autograd's own kernel (bit-identical to a plain backward).
    """

    activations: Tensor
    backprops: Tensor
    shape: torch.Size
    exact: MatmulGradient | None = None

    def ghost_gram(self) -> Tensor:
        """G[i, j] = Σ_k Σ_{t,s} ⟨a_{ikt}, a_{jks}⟩·⟨δ_{ikt}, δ_{jks}⟩: seed 004 eq. 6 without forming g_i."""
        input_products = torch.einsum("bkpt,ckps->bckts", self.activations, self.activations)
        output_products = torch.einsum("bkqt,ckqs->bckts", self.backprops, self.backprops)
        return (input_products * output_products).sum(dim=(2, 3, 4))

    def per_sample(self) -> Tensor:
        """g_i[k] = Σ_t δ_{ikt} a_{ikt}ᵀ, shape (B, *shape)."""
        grads = torch.einsum("bkqt,bkpt->bkqp", self.backprops, self.activations)
        return grads.reshape(len(grads), *self.shape)

    def batch_gradient(self) -> Tensor:
        """Σ_i g_i = Σ_{i,t} δ_{ikt} a_{ikt}ᵀ, the parameter's batch gradient, shape ``shape``."""
        if self.exact is not None:
            return self.exact()
        return torch.einsum("bkqt,bkpt->kqp", self.backprops, self.activations).reshape(self.shape)

    def costs(self) -> MethodCosts:
        """See :func:`_outer_costs`."""
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


UNFOLD_MAX_POSITIONS = 64
"""Convolutions with at most this many positions (small maps) get per-sample gradients from batched
matrix products on the tensor read through the kernel (shifted views, else unfolded patches)."""

UNFOLD_MAX_PATCH = 32
"""Convolutions whose unfolded patch has at most this many entries (C_in/groups · Πk: a stem
convolution on RGB images) get per-sample gradients from unfolded patches on any map size."""


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
        """On CPU: ``"patches"`` for small patches (≤ ``UNFOLD_MAX_PATCH`` entries), else
        ``"shifted"`` or (stride > 1) ``"patches"`` on small maps (≤ ``UNFOLD_MAX_POSITIONS``
        positions), else ``"grouped"`` (one B·groups-group convolution backward; slow on small
        maps). Elsewhere (GPU: few kernel launches matter more than multiply-adds) ``"patches"`` on
        small maps, else ``"grouped"``."""
        positions, patch, _ = self._sizes()
        if self.inputs.device.type != "cpu":
            return "patches" if positions <= UNFOLD_MAX_POSITIONS else "grouped"
        if patch <= UNFOLD_MAX_PATCH:
            return "patches"
        if positions > UNFOLD_MAX_POSITIONS:
            return "grouped"
        return "shifted" if all(s == 1 for s in self.layer.stride) else "patches"

    def per_sample(self) -> Tensor:
        """g_i for every i at once, shape (B, *W.shape)."""
        method = self.per_sample_method()
        if method == "patches":
            return self.as_outer().per_sample()
        if method == "shifted":
            grads = self._shifted_products()  # (Πk, B·K, q, p/Πk) → (B, K·q, p/Πk, *kernel)
            batch, kernel = len(self.inputs), self.layer.kernel_size
            grads = grads.reshape(*kernel, batch, self.layer.groups, *grads.shape[2:])
            dims = len(kernel)
            grads = grads.permute(dims, dims + 1, dims + 2, dims + 3, *range(dims))
            return grads.reshape(batch, *self.layer.weight.shape)
        batch = len(self.inputs)
        inputs, padding = self._convolved()
        flat = [
            t.to(self.dtype).reshape(1, batch * t.shape[1], *t.shape[2:]) for t in (inputs, self.backprops)
        ]
        grads = self._weight_backward(flat[0], flat[1], padding, batch)
        return grads.reshape(batch, *self.layer.weight.shape)

    def rows(self) -> Tensor:
        """g_i flattened, (B, W.numel()), or split by kernel offset, (Πk, B, W.numel()/Πk) when
        shifted (G = Σ over the splits of their Grams; no copy into per-sample order)."""
        if self.per_sample_method() == "shifted":
            grads = self._shifted_products()
            return grads.reshape(len(grads), len(self.inputs), -1)
        grads = self.per_sample()
        return grads.reshape(len(grads), -1)

    def _shifted_products(self) -> Tensor:
        """g_i[k][κ] = Σ_t o_{ikt} r_{ik}[t + κ·d]ᵀ for stride 1, (Πk, B·K, q, p/Πk): o is the side
        indexed by positions t (output gradient of a ConvNd, input of a ConvTransposeNd), r the
        zero-padded side read through the kernel at offset κ (:meth:`_read_and_other`).

        Both are flattened over space, o zero-padded to r's sizes in every spatial dim but the
        first, so that for each κ the window t + κ·d of r is one contiguous slice of r's flat
        positions: one batched matrix product per kernel offset, the padded zeros of o cancelling
        the wrapped-around entries of r (seed 004 eq. 6 in the layout of the weight's kernel offsets).
        """
        layer, groups = self.layer, self.layer.groups
        read, other = self._read_and_other()
        read, other = read.to(self.dtype), other.to(self.dtype)
        sizes, extent = read.shape[2:], other.shape[2:]
        pad = [side for r, o in zip(reversed(sizes[1:]), reversed(extent[1:])) for side in (0, r - o)]
        other = F.pad(other, pad) if any(pad) else other
        span = other[0, 0].numel()
        steps = [math.prod(sizes[d + 1 :]) for d in range(len(sizes))]
        offsets = [
            sum(k * dil * step for k, dil, step in zip(kappa, layer.dilation, steps))
            for kappa in itertools.product(*map(range, layer.kernel_size))
        ]
        batch = len(read)
        flat = read.reshape(batch * groups, read.shape[1] // groups, -1)
        if offsets[-1] + span > flat.shape[-1]:
            flat = F.pad(flat, (0, offsets[-1] + span - flat.shape[-1]))
        rows = other.reshape(batch * groups, other.shape[1] // groups, span)
        grads = rows.new_empty(len(offsets), batch * groups, rows.shape[1], flat.shape[1])
        for n, offset in enumerate(offsets):
            torch.bmm(rows, flat[:, :, offset : offset + span].transpose(1, 2), out=grads[n])
        return grads

    def batch_gradient(self) -> Tensor:
        """Σ_i g_i from autograd's own kernel: ``convolution_backward`` on the tensor the forward
        convolved, with its padding, so the bits are those of a plain backward."""
        inputs, padding = self._convolved()
        return self._weight_backward(inputs, self.backprops, padding, 1)

    def ghost_gram(self) -> Tensor:
        """G[i, j] from the unfolded patches (:meth:`OuterFactor.ghost_gram`, seed 004 eq. 6)."""
        return self.as_outer().ghost_gram()

    def costs(self) -> MethodCosts:
        """Those of the equivalent :class:`OuterFactor`, from shapes only."""
        return _outer_costs(len(self.inputs), self.layer.groups, *self._sizes())

    def _sizes(self) -> tuple[int, int, int]:
        """(T, p, q) of the equivalent :class:`OuterFactor`."""
        channels_in, channels_out = self.inputs.shape[1], self.backprops.shape[1]
        groups, kernel = self.layer.groups, math.prod(self.layer.kernel_size)
        if self.layer.transposed:
            return self.inputs[0, 0].numel(), channels_out // groups * kernel, channels_in // groups
        return self.backprops[0, 0].numel(), channels_in // groups * kernel, channels_out // groups

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
        through the kernel (:meth:`_read_and_other`)."""
        layer = self.layer
        read, other = self._read_and_other()
        patches = unfold_patches(read.to(self.dtype), layer.kernel_size, layer.stride, layer.dilation)
        batch, groups = len(patches), layer.groups
        return OuterFactor(
            _positions_last(patches, batch, groups),
            _positions_last(other.to(self.dtype), batch, groups),
            layer.weight.shape,
        )

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
        return (F.pad(inputs, extra) if any(extra) else inputs), left

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


def _zero_pad(x: Tensor, padding: Sequence[int]) -> Tensor:
    """``x`` (B, C, *S) with ``padding[d]`` zeros on both sides of spatial dim d."""
    if not any(padding):
        return x
    return F.pad(x, [p for p in reversed(padding) for _ in range(2)])


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

    def batch_gradient(self) -> Tensor:
        """Σ_i g_i, shape (V, d)."""
        dim = self.backprops.shape[-1]
        grads = self.backprops.new_zeros(self.num_embeddings, dim)
        return grads.index_add_(0, self.indices.reshape(-1), self.backprops.reshape(-1, dim))

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

    def batch_gradient(self) -> Tensor:
        """Σ_i g_i."""
        return self.grads.sum(0)

    def costs(self) -> MethodCosts:
        """Materialised only: B²·P multiply-adds for the Gram."""
        return MethodCosts(math.inf, len(self.grads) ** 2 * self.grads[0].numel())

    @staticmethod
    def concat(factors: Sequence[PerSampleFactor]) -> PerSampleFactor:
        """Several calls of one layer add their gradients."""
        return PerSampleFactor(torch.stack([f.grads for f in factors]).sum(0))


GradFactor = Union[OuterFactor, ConvFactor, EmbeddingFactor, PerSampleFactor]


def concat_factors(factors: Sequence[GradFactor]) -> GradFactor:
    """The factor of a parameter used by several calls of its layer: gradients of all calls added."""
    return factors[0].concat(factors) if len(factors) > 1 else factors[0]


Rule = Callable[[nn.Module, Any, Any], dict[str, GradFactor]]
"""``factorize(layer, activations, backprops)``; ``backprops`` is the output gradient (a tuple of
them, ``None`` where none arrived, for a module with several tensor outputs)."""


Capture = Callable[[nn.Module, Tensor, Tensor], Any]
"""``capture(layer, input, output)``: what the rule keeps of a forward, from its first input."""


CallCapture = Callable[[nn.Module, tuple, dict, Any], Any]
"""``capture_call(layer, args, kwargs, output)``: the same from the whole call."""


BatchSize = Callable[[nn.Module, tuple, dict], int]
"""``batch_size(layer, args, kwargs)``: B of a call; raises ``ValueError`` on an unsupported layout."""


def capture_input(layer: nn.Module, inputs: Tensor, output: Tensor) -> Tensor:
    """Default capture: the rule's ``activations`` are the layer's input."""
    return inputs


def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The first tensor among a call's arguments (positional, then keyword), or ``None``."""
    if args and isinstance(args[0], Tensor):  # the usual call, without walking the pytree
        return args[0]
    return next((leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)), None)


def leading_batch_size(layer: nn.Module, args: tuple, kwargs: dict) -> int:
    """Default B: the leading dimension of the first tensor argument."""
    inputs = first_tensor(args, kwargs)
    if inputs is None or inputs.dim() == 0:
        raise ValueError(
            f"{type(layer).__name__} was called without a batched tensor argument; per-sample gradients "
            "need the batch dimension first in its first tensor argument"
        )
    return len(inputs)


class GramRule(NamedTuple):
    """A registered rule: ``factorize(layer, activations, backprops) -> {parameter name: factor}``.

    ``param_names`` lists the parameters the rule covers (``None``: all the module has);
    ``fusable`` those whose batch gradient the collector may compute from the factor instead of
    letting autograd compute it; ``capture(layer, inputs, output)`` runs right after the forward
    and returns what the rule receives as ``activations`` (by default the input), unless
    ``capture_call(layer, args, kwargs, output)`` is given, which sees the whole call.
    ``batch_size(layer, args, kwargs)`` gives B of a call (default: the leading dimension of the
    first tensor argument). A ``composite`` rule covers the parameters of the module's whole
    subtree, named relative to it (``"out_proj.weight"``): for modules that call children
    functionally, whose own hooks never fire. ``method`` names how the rule computes per-sample
    gradients in :attr:`GramCollector.methods` when it is not a ghost/materialise choice.
    ``applies(layer)``, if given, says whether the rule serves this instance (else the search
    goes on up the type hierarchy).
    """

    factorize: Rule
    param_names: tuple[str, ...] | None = ("weight", "bias")
    fusable: tuple[str, ...] = ()
    capture: Capture = capture_input
    capture_call: CallCapture | None = None
    batch_size: BatchSize = leading_batch_size
    composite: bool = False
    method: str | None = None
    applies: Callable[[nn.Module], bool] | None = None

    def activations(self, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """What ``factorize`` receives as ``activations`` for this call."""
        if self.capture_call is not None:
            return self.capture_call(layer, args, kwargs, output)
        return self.capture(layer, first_tensor(args, kwargs), output)

    def covers(self, name: str) -> bool:
        """Whether the rule gives the factor of parameter ``name``."""
        return self.param_names is None or name in self.param_names


GRAM_RULES: dict[type[nn.Module], GramRule] = {}
"""The global registry, module type → rule; read through :func:`gram_rule_for`."""


def register_gram_rule(
    *args: Any,
    overwrite: bool = False,
    param_names: tuple[str, ...] | None = ("weight", "bias"),
    fusable: tuple[str, ...] = (),
    capture: Capture = capture_input,
) -> Any:
    """Register a rule for a module type (and, by the type hierarchy, its subclasses).

    Two forms::

        register_gram_rule(MyLayer, GramRule(my_factors, ("weight",)))   # returns the rule

        @register_gram_rule(MyLayer, OtherLayer, param_names=("weight",))  # decorator on factorize
        def my_factors(layer, activations, backprops): ...

    A type that already has a rule raises ``ValueError`` unless ``overwrite=True``.
    """
    if len(args) == 2 and isinstance(args[1], GramRule):
        module_type, rule = args
        _add_rule(module_type, rule, overwrite)
        return rule
    for module_type in args:
        _check_module_type(module_type)

    def register(factorize: Rule) -> Rule:
        for module_type in args:
            _add_rule(module_type, GramRule(factorize, param_names, fusable, capture), overwrite)
        return factorize

    return register


def _check_module_type(module_type: Any) -> None:
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"register_gram_rule takes torch.nn.Module subclasses and a GramRule, got {module_type!r}; "
            "call register_gram_rule(ModuleType, GramRule(factorize, param_names)) or use it as a "
            "decorator, @register_gram_rule(ModuleType, param_names=...)"
        )


def _add_rule(module_type: Any, rule: GramRule, overwrite: bool) -> None:
    _check_module_type(module_type)
    if not isinstance(rule, GramRule):
        raise TypeError(f"rule must be a GramRule, got {type(rule).__name__}")
    if module_type in GRAM_RULES and not overwrite:
        raise ValueError(
            f"{module_type.__name__} already has a Gram rule ({GRAM_RULES[module_type].factorize.__name__}); "
            "pass overwrite=True to replace it, or rules={...} to GramCollector to override it there only"
        )
    GRAM_RULES[module_type] = rule


def gram_rule_for(
    layer: nn.Module, rules: Mapping[type[nn.Module], GramRule | None] | None = None
) -> GramRule | None:
    """The rule of the nearest class in ``type(layer).__mro__`` registered in ``rules`` (which wins)
    or in :data:`GRAM_RULES`, or ``None``. A ``None`` in ``rules`` stops the search (no rule).

    A rule found for a base class serves a subclass only if the subclass inherits that class's
    ``forward`` (a subclass computing something else would get a wrong gradient). A rule whose
    ``applies(layer)`` is false is passed over.
    """
    rules = rules or {}
    for cls in type(layer).__mro__:
        if cls in rules or cls in GRAM_RULES:
            rule = rules[cls] if cls in rules else GRAM_RULES[cls]
            if rule is not None and rule.applies is not None and not rule.applies(layer):
                continue
            return rule if rule is None or type(layer).forward is cls.forward else None
    return None


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the Gram is computed in: the promoted floating dtype, at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _positions_last(tensor: Tensor, batch: int, groups: int) -> Tensor:
    """(B, C, *positions) → (B, K, C/K, T)."""
    return tensor.reshape(batch, groups, tensor.shape[1] // groups, -1)


def unfold_patches(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """Receptive-field patches of an already padded ``x`` (B, C, *S): (B, C·Πk, T).

    Patch t of channel c holds x[c, o_t·stride + κ·dilation] for each kernel offset κ, in the
    (C, *kernel) order of a ConvNd weight; T = Π output sizes.
    """
    dims = len(kernel_size)
    for d, (k, s, dil) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)[..., ::dil]
    x = x.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return x.reshape(x.shape[0], x.shape[1] * math.prod(kernel_size), -1)


def _check_batched(layer: nn.Module, tensor: Tensor, spatial_dims: int) -> None:
    if tensor.dim() != spatial_dims + 2:
        raise ValueError(
            f"{type(layer).__name__} got an input of shape {tuple(tensor.shape)}; per-sample gradients "
            f"need a batched input (B, C, {spatial_dims} spatial dims)"
        )


@register_gram_rule(nn.Linear, fusable=("weight",))
def linear_factors(layer: nn.Linear, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """y_t = W a_t + b at each position t of an input (B, *, d_in) (seed 004 §4, fully-connected):
    g_i(W) = Σ_t δ_t a_tᵀ, g_i(b) = Σ_t δ_t (eq. 6)."""
    dtype = compute_dtype(activations, backprops)
    batch = len(activations)
    inputs = activations.reshape(batch, 1, -1, layer.in_features).transpose(2, 3).to(dtype)
    outputs = backprops.reshape(batch, 1, -1, layer.out_features).transpose(2, 3).to(dtype)
    exact = MatmulGradient(
        activations.reshape(-1, layer.in_features), backprops.reshape(-1, layer.out_features), layer.weight
    )
    factors: dict[str, GradFactor] = {"weight": OuterFactor(inputs, outputs, layer.weight.shape, exact)}
    if layer.bias is not None:
        factors["bias"] = PerSampleFactor(outputs.sum(dim=-1).reshape(batch, -1))
    return factors


@register_gram_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, fusable=("weight",))
def conv_factors(layer: nn.Module, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """y[o_t] = Σ_κ W[:, :, κ] x[o_t·s − p + κ·d] + b per group (seed 004 §4, convolution):
    g_i(W)[k] = Σ_t δ_{kt} patch_{kt}ᵀ over output positions t, g_i(b) = Σ_t δ_t (eq. 6)."""
    _check_batched(layer, activations, len(layer.kernel_size))
    dtype = compute_dtype(activations, backprops)
    factors: dict[str, GradFactor] = {"weight": ConvFactor(activations, backprops, layer, dtype)}
    if layer.bias is not None:
        factors["bias"] = PerSampleFactor(backprops.to(dtype).flatten(2).sum(dim=-1))
    return factors


@register_gram_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, fusable=("weight",))
def conv_transpose_factors(layer: nn.Module, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """A transposed convolution is the adjoint of the convolution with the same stride, padding and
    dilation, so g_i(W)[k] = Σ_t x_{kt} patch(δ)_{kt}ᵀ over *input* positions t, where patch(δ)
    unfolds the output gradient like a convolution input; g_i(b) = Σ_t δ_t (seed 004 eq. 6)."""
    _check_batched(layer, activations, len(layer.kernel_size))
    dtype = compute_dtype(activations, backprops)
    factors: dict[str, GradFactor] = {"weight": ConvFactor(activations, backprops, layer, dtype)}
    if layer.bias is not None:
        factors["bias"] = PerSampleFactor(backprops.to(dtype).flatten(2).sum(dim=-1))
    return factors


def _channel_affine_factors(
    layer: nn.Module, inputs: Tensor, backprops: Tensor, mean: Tensor, rstd: Tensor
) -> dict[str, GradFactor]:
    """y = γ_c·(x − μ)·r + β_c per channel c, inputs and backprops (B, C, *S), μ and r = 1/√(σ² + ε)
    of shape (C,) or (B, C): g_i(γ)[c] = r·Σ_t δ_{ct}(x_{ct} − μ), g_i(β)[c] = Σ_t δ_{ct} (seed 004 eq. 6).

    Both reductions run in one pass of the batch-norm backward kernel, with the batch folded into
    the channels so that each (sample, channel) is reduced on its own. The kernel's weight only
    scales the input gradient, which is not asked for; CUDA's kernel needs one all the same.
    """
    batch, channels = inputs.shape[:2]
    folded_mean, folded_rstd = (t.expand(batch, channels).reshape(-1) for t in (mean, rstd))
    _, weight_grads, bias_grads = torch.ops.aten.native_batch_norm_backward(
        backprops.reshape(1, batch * channels, -1),
        inputs.reshape(1, batch * channels, -1),
        folded_rstd.new_ones(batch * channels),
        None,
        None,
        folded_mean,
        folded_rstd,
        True,
        0.0,
        [False, layer.weight is not None, layer.bias is not None],
    )
    factors: dict[str, GradFactor] = {}
    if layer.weight is not None:
        factors["weight"] = PerSampleFactor(weight_grads.reshape(batch, channels))
    if layer.bias is not None:
        factors["bias"] = PerSampleFactor(bias_grads.reshape(batch, channels))
    return factors


def _running_stats(layer: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """μ and 1/√(σ² + ε) from the running statistics, in ``dtype``."""
    return layer.running_mean.to(dtype), (layer.running_var.to(dtype) + layer.eps).rsqrt()


def _sample_stats(inputs: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """μ and 1/√(σ² + ε) (biased σ²) per sample and group of channels, repeated per channel (B, C)."""
    batch, channels = inputs.shape[:2]
    var, mean = torch.var_mean(inputs.reshape(batch, groups, -1), dim=2, correction=0)
    return (t.repeat_interleave(channels // groups, dim=1) for t in (mean, (var + eps).rsqrt()))


class NormalizedInput(NamedTuple):
    """A normalisation layer's input with the per-channel mean μ and 1/√(σ² + ε) it used."""

    inputs: Tensor
    mean: Tensor
    rstd: Tensor


def _uses_batch_stats(layer: _BatchNorm) -> bool:
    return layer.training or layer.running_mean is None


def batch_norm_capture(layer: _BatchNorm, inputs: Tensor, output: Tensor) -> Tensor | NormalizedInput:
    """Keep the batch statistics autograd saved for the backward (``save_mean``, ``save_invstd``),
    so the rule needs no second pass over the input; the bare input where they are not exposed."""
    node = output.grad_fn
    mean, rstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
    channels = (inputs.shape[1],)
    if _uses_batch_stats(layer) and all(isinstance(t, Tensor) and t.shape == channels for t in (mean, rstd)):
        return NormalizedInput(inputs, mean, rstd)
    return inputs


def _batch_norm_statistics(
    layer: _BatchNorm, activations: Tensor | NormalizedInput, dtype: torch.dtype
) -> NormalizedInput:
    """μ and 1/√(σ² + ε) per channel: captured, recomputed from the batch (biased σ²), or running."""
    if isinstance(activations, NormalizedInput):
        return NormalizedInput(*(t.to(dtype) for t in activations))
    inputs = activations.to(dtype)
    if not _uses_batch_stats(layer):
        return NormalizedInput(inputs, *_running_stats(layer, dtype))
    var, mean = torch.var_mean(inputs, dim=(0, *range(2, inputs.dim())), correction=0)
    return NormalizedInput(inputs, mean, (var + layer.eps).rsqrt())


@register_gram_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, capture=batch_norm_capture)
def batch_norm_factors(
    layer: _BatchNorm, activations: Tensor | NormalizedInput, backprops: Tensor
) -> dict[str, GradFactor]:
    """x̂ = (x − μ)/√(σ² + ε) per channel, with the batch's statistics in training mode — then the
    samples are coupled and g_i is sample i's contribution to the batch gradient — and the running
    ones otherwise (seed 004 §4, batch normalisation); g_i as in :func:`_channel_affine_factors`."""
    raw = activations.inputs if isinstance(activations, NormalizedInput) else activations
    dtype = compute_dtype(raw, backprops)
    inputs, mean, rstd = _batch_norm_statistics(layer, activations, dtype)
    return _channel_affine_factors(layer, inputs, backprops.to(dtype), mean, rstd)


@register_gram_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_factors(
    layer: _InstanceNorm, activations: Tensor, backprops: Tensor
) -> dict[str, GradFactor]:
    """x̂ = (x − μ)/√(σ² + ε) per sample and channel (the running statistics in eval mode if
    tracked); g_i as in :func:`_channel_affine_factors` (seed 004 eq. 6)."""
    dtype = compute_dtype(activations, backprops)
    inputs = activations.to(dtype)
    if layer.training or not layer.track_running_stats:
        mean, rstd = _sample_stats(inputs, inputs.shape[1], layer.eps)
    else:
        mean, rstd = _running_stats(layer, dtype)
    return _channel_affine_factors(layer, inputs, backprops.to(dtype), mean, rstd)


@register_gram_rule(nn.GroupNorm)
def group_norm_factors(layer: nn.GroupNorm, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """x̂ = (x − μ)/√(σ² + ε) per sample and group of channels, γ and β per channel; g_i as in
    :func:`_channel_affine_factors` (seed 004 eq. 6)."""
    dtype = compute_dtype(activations, backprops)
    inputs = activations.to(dtype)
    mean, rstd = _sample_stats(inputs, layer.num_groups, layer.eps)
    return _channel_affine_factors(layer, inputs, backprops.to(dtype), mean, rstd)


def _trailing_affine_factors(
    layer: nn.Module, normalized: Tensor, backprops: Tensor
) -> dict[str, GradFactor]:
    """y = γ ⊙ x̂ + β over the trailing dims of (B, *positions, *γ.shape):
    g_i(γ) = Σ_t δ_t ⊙ x̂_t, g_i(β) = Σ_t δ_t."""
    positions = tuple(range(1, backprops.dim() - len(layer.normalized_shape)))
    factors: dict[str, GradFactor] = {}
    if layer.weight is not None:
        products = backprops * normalized
        factors["weight"] = PerSampleFactor(products.sum(dim=positions) if positions else products)
    if getattr(layer, "bias", None) is not None:
        factors["bias"] = PerSampleFactor(backprops.sum(dim=positions) if positions else backprops)
    return factors


@register_gram_rule(nn.LayerNorm)
def layer_norm_factors(layer: nn.LayerNorm, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """x̂ = (x − μ)/√(σ² + ε) over the trailing ``normalized_shape`` dims of (B, *, *normalized_shape);
    g_i as in :func:`_trailing_affine_factors` (seed 004 eq. 6)."""
    dtype = compute_dtype(activations, backprops)
    normalized = F.layer_norm(activations.to(dtype), layer.normalized_shape, eps=layer.eps)
    return _trailing_affine_factors(layer, normalized, backprops.to(dtype))


if hasattr(nn, "RMSNorm"):

    @register_gram_rule(nn.RMSNorm, param_names=("weight",))
    def rms_norm_factors(layer: nn.RMSNorm, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
        """x̂ = x / √(mean(x²) + ε) over the trailing ``normalized_shape`` dims; γ only:
        g_i(γ) = Σ_t δ_t ⊙ x̂_t (seed 004 eq. 6)."""
        dtype = compute_dtype(activations, backprops)
        normalized = F.rms_norm(activations.to(dtype), layer.normalized_shape, eps=layer.eps)
        return _trailing_affine_factors(layer, normalized, backprops.to(dtype))


@register_gram_rule(nn.Embedding, param_names=("weight",))
def embedding_factors(layer: nn.Embedding, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """y_t = W[idx_t]: g_i(W)[v] = Σ_t [idx_t = v] δ_t. Rows at ``padding_idx`` get no gradient; with
    ``scale_grad_by_freq`` each δ_t is divided by idx_t's count in the whole batch (as autograd
    does), so g_i is sample i's contribution to the batch gradient (seed 004 eq. 6)."""
    batch = len(activations)
    indices = activations.reshape(batch, -1)
    outputs = backprops.to(compute_dtype(backprops)).reshape(batch, indices.shape[1], layer.embedding_dim)
    if layer.padding_idx is not None:
        outputs = outputs * (indices != layer.padding_idx)[..., None]
    if layer.scale_grad_by_freq:
        counts = torch.bincount(indices.reshape(-1), minlength=layer.num_embeddings)
        outputs = outputs / counts[indices][..., None]
    return {"weight": EmbeddingFactor(indices, outputs, layer.num_embeddings)}
