"""Per-sample gradients by recomputation: the generic fallback, also behind the "vjp" rules.

Seed 004_e5d92837cb57ce8a.txt (§3, eq. 6) needs column i of J_k, sample i's gradient g_i. For a
module whose forward has no closed-form rule, g_i is the vector-Jacobian product of the output
gradient δ_i with the module's Jacobian at sample i's inputs, g_i(θ) = ∂/∂θ ⟨δ_i, f(x_i; θ)⟩,
evaluated for all samples at once with ``torch.func.vmap`` over ``torch.func.grad`` of the module
run on its captured inputs (a batch of one inside the map). The recomputation changes nothing the
user trains: parameters enter detached, buffers as copies taken at the forward, the collector's
own hooks are off, random operations are refused (``randomness="error"``, inside
``torch.random.fork_rng``) and no ``.grad`` is written.

A module that draws random numbers (dropout in training mode) cannot be recomputed: new draws
would give other masks. Its g_i are read from the graph the step itself built, masks included
(:func:`graph_factors`): inside the backward, as the module's output gradient δ arrives, one
backward of the module's part of the graph per sample i with δ_i (δ with the other samples
zeroed), batched with ``is_grads_batched``; B times the module's backward, exact.

The batch dimension of every input and output comes from the rule's capture: here the leading
one for any module (inputs whose leading size differs from B are shared by all samples); the
attention and recurrent rules (:mod:`.rules.attention`, :mod:`.rules.recurrent`) describe their
own layouts and reuse :func:`recompute_factors`. The recomputed outputs are compared with the
module's own outputs on the first use of each module in each mode (train/eval): a module whose
samples are coupled, or that is not what the description assumes, raises instead of giving a
wrong matrix.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .factors import GradFactor, PerSampleFactor, cast, compute_dtype
from .registry import GramRule


class _RecomputeState(threading.local):
    depth = 0


RECOMPUTING = _RecomputeState()
"""``RECOMPUTING.depth > 0`` while a fallback recomputation runs in this thread (an attribute
read: the collector's hooks check it at every call)."""

_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[bool]] = weakref.WeakKeyDictionary()

_DRAWING: weakref.WeakKeyDictionary[nn.Module, set[bool]] = weakref.WeakKeyDictionary()
"""Modules found to draw random numbers in a mode (train/eval): measured from the step's graph."""


@contextmanager
def _recomputing() -> Iterator[None]:
    RECOMPUTING.depth += 1
    try:
        yield
    finally:
        RECOMPUTING.depth -= 1


def output_leaves(output: Any) -> list[Any]:
    """The leaves of a module's output (tensors, ``None`` and other values), in a fixed order."""
    return tree_leaves(output)


class SampledCall(NamedTuple):
    """One captured call, split into what varies per sample and what the samples share.

    ``forward(state, *inputs)`` runs the module on ``inputs`` that carry a batch dimension of size
    one at ``in_dims`` and returns its output leaves; ``state`` maps parameter and buffer names of
    the module's subtree to tensors. ``buffers`` are copies taken at the forward; ``outputs`` the
    output leaves (detached, ``None`` for non-tensors) with their batch dims ``out_dims`` (``None``
    where an output has none) and version counters; ``nodes`` where the outputs sit in the
    graph (:class:`GraphCall`), for a module found to draw random numbers.
    """

    forward: Callable[..., list[Any]]
    inputs: tuple[Tensor, ...]
    in_dims: tuple[int, ...]
    buffers: dict[str, Tensor]
    outputs: tuple[Tensor | None, ...]
    out_dims: tuple[int | None, ...]
    versions: tuple[int, ...]
    recurse: bool
    nodes: tuple[tuple[str, int] | None, ...] = ()


def _sampled_call(
    layer: nn.Module,
    forward: Callable[..., list[Any]],
    inputs: Sequence[Tensor],
    in_dims: Sequence[int],
    output: Any,
    out_dim: Callable[[int, Tensor], int | None],
    recurse: bool,
) -> SampledCall:
    inputs = tuple(x.detach() for x in inputs)
    leaves = output_leaves(output)
    outputs = tuple(o.detach() if isinstance(o, Tensor) else None for o in leaves)
    return SampledCall(
        forward,
        inputs,
        tuple(in_dims),
        {name: b.detach().clone() for name, b in layer.named_buffers(recurse=True)},
        outputs,
        tuple(None if o is None else out_dim(k, o) for k, o in enumerate(outputs)),
        tuple(t._version for t in (*inputs, *(o for o in outputs if o is not None))),
        recurse,
        _graph_nodes(leaves),
    )


# -- the per-sample vector-Jacobian products -------------------------------------------------------


def recompute_factors(layer: nn.Module, call: SampledCall, backprops: Any) -> dict[str, GradFactor]:
    """g_i(θ) = ∂/∂θ ⟨δ_i, f(x_i; θ)⟩ for every parameter θ of the module (of its subtree for a
    composite rule), one ``vmap``-ed ``grad`` over the samples (seed 004 eq. 6); for a module that
    draws random numbers (dropout in training mode), from the step's own graph instead
    (:func:`graph_factors`, which keeps the masks drawn)."""
    grads = backprops if isinstance(backprops, tuple) else (backprops,)
    _check_versions(layer, call)
    used = [k for k, g in enumerate(grads) if g is not None]
    for k in used:
        if call.out_dims[k] is None:
            raise RuntimeError(
                f"output {k} of {type(layer).__name__} (shape {tuple(call.outputs[k].shape)}) has no batch "
                "dimension but received a gradient; per-sample gradients cannot be split from it"
            )
    named = dict(layer.named_parameters(recurse=call.recurse))
    primals = {n: p.detach() for n, p in named.items() if p.requires_grad}
    shared = {n: p.detach() for n, p in layer.named_parameters(recurse=True) if n not in primals}
    out_dims = tuple(call.out_dims[k] for k in used)

    def sample_loss(weights: dict[str, Tensor], inputs: tuple, output_grads: tuple) -> tuple[Tensor, tuple]:
        inputs = [x.unsqueeze(d) for x, d in zip(inputs, call.in_dims)]
        buffers = {name: b.clone() for name, b in call.buffers.items()}  # forwards may update them in place
        outputs = call.forward({**shared, **buffers, **weights}, *inputs)
        picked = [outputs[k] for k in used]
        total = sum((o * g.unsqueeze(d)).sum() for o, g, d in zip(picked, output_grads, out_dims))
        return total, tuple(o.squeeze(d) for o, d in zip(picked, out_dims))

    per_sample = vmap(
        grad(sample_loss, has_aux=True),
        in_dims=(None, call.in_dims, out_dims),
        out_dims=(0, out_dims),
        randomness="error",
    )
    drawing = _DRAWING.setdefault(layer, set())
    if layer.training not in drawing:
        try:
            with _fork_rng(call.inputs), _recomputing(), _batched_kernels():
                sample_grads, outputs = per_sample(primals, call.inputs, tuple(grads[k] for k in used))
        except RuntimeError as error:
            if "random" not in str(error):
                raise
            drawing.add(layer.training)
    if layer.training in drawing:  # dropout in training mode: a recomputation would draw other masks
        return graph_factors(layer, GraphCall(call.nodes, call.out_dims, call.recurse), backprops)
    _check_outputs(layer, call, used, outputs)
    return {name: _factor(sample_grads, name, param, call, grads, used) for name, param in named.items()}


def _factor(
    sample_grads: dict[str, Tensor],
    name: str,
    param: Tensor,
    call: SampledCall,
    grads: tuple,
    used: list[int],
) -> PerSampleFactor:
    if name in sample_grads:
        g = sample_grads[name]
        return PerSampleFactor(cast(g, compute_dtype(g)))
    k = used[0]
    batch = grads[k].shape[call.out_dims[k]]
    return PerSampleFactor(param.new_zeros((), dtype=compute_dtype(param)).expand(batch, *param.shape))


@contextmanager
def _batched_kernels() -> Iterator[None]:
    """Inside the per-sample map: ``scaled_dot_product_attention`` on its math backend, whose ops
    all have vmap batching rules (the fused CPU kernels have none, so vmap would loop over the
    samples and warn), and :func:`_quiet_batching`."""
    with _quiet_batching(), sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def _quiet_batching() -> Iterator[None]:
    """An op without a vmap batching rule runs exactly, as a loop over the batched dimension;
    torch's warning about it ("There is a performance drop … Please file us an issue") addresses
    torch's developers and is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        yield


def _fork_rng(tensors: Sequence[Tensor]) -> Any:
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def _check_versions(layer: nn.Module, call: SampledCall) -> None:
    current = tuple(t._version for t in call.inputs)
    if current != call.versions[: len(call.inputs)]:
        raise RuntimeError(
            f"an input of {type(layer).__name__} was modified in place after its forward; GramCollector's "
            "fallback recomputes the module from its inputs and needs them unchanged until the backward"
        )


def _check_outputs(layer: nn.Module, call: SampledCall, used: list[int], outputs: tuple[Tensor, ...]) -> None:
    """On the first recomputation of ``layer`` in its current mode: the recomputed outputs equal the
    module's own (relative error ≤ √ε of their dtype), else the samples are coupled (batch
    statistics, a batch-wide reduction) or the batch dims are not what the fallback assumed."""
    checked = _CHECKED.setdefault(layer, set())
    if layer.training in checked:
        return
    captured = [o for o in call.outputs if o is not None]
    versions = call.versions[len(call.inputs) :]
    changed = {id(o) for o, v in zip(captured, versions) if o._version != v}
    for k, recomputed in zip(used, outputs):
        expected = call.outputs[k]
        if id(expected) in changed or not expected.is_floating_point():
            continue
        error = (recomputed - expected).norm() / expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)
        if error.item() > torch.finfo(expected.dtype).eps ** 0.5:
            raise RuntimeError(
                f"GramCollector's per-sample recomputation of {type(layer).__name__} does not reproduce its "
                f"output {k} (relative error {error.item():.1e}): its samples are coupled (batch statistics, "
                "a reduction over the batch) or an input does not carry the batch in the dimension assumed "
                "(the leading one). Register a rule for it (register_gram_rule or rules=) or leave its "
                "module out of the measurement with exclude=[...] (GramCollector, FisherSpectrum)"
            )
    checked.add(layer.training)


# -- any module ----------------------------------------------------------------------------------


def generic_capture(
    layer: nn.Module, args: tuple, kwargs: dict, output: Any, recurse: bool = False
) -> SampledCall:
    """Any module: tensor arguments whose leading size is B (that of the first tensor argument) are
    per-sample along dim 0, the others shared; outputs with leading size B are per-sample. The
    module's own parameters are measured, or those of its whole subtree with ``recurse``."""
    leaves, spec = tree_flatten((args, kwargs))
    leaves = [leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
    batch = len(next(leaf for leaf in leaves if isinstance(leaf, Tensor)))
    positions = [
        k
        for k, leaf in enumerate(leaves)
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and len(leaf) == batch
    ]

    def forward(state: dict[str, Tensor], *inputs: Tensor) -> list[Any]:
        call_leaves = list(leaves)
        for k, x in zip(positions, inputs):
            call_leaves[k] = x
        call_args, call_kwargs = tree_unflatten(call_leaves, spec)
        return output_leaves(functional_call(layer, state, call_args, call_kwargs))

    def out_dim(k: int, o: Tensor) -> int | None:
        return 0 if o.dim() > 0 and len(o) == batch else None

    inputs = [leaves[k] for k in positions]
    return _sampled_call(layer, forward, inputs, [0] * len(inputs), output, out_dim, recurse=recurse)


def generic_unit_capture(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> SampledCall:
    """:func:`generic_capture` of a module measured whole (the parameters of its subtree)."""
    return generic_capture(layer, args, kwargs, output, recurse=True)


FALLBACK_RULE = GramRule(recompute_factors, param_names=None, capture=generic_capture, method="fallback")
"""Used by :class:`~lightning_tricks.gradients.GramCollector` for any module without a rule."""


# -- from the step's own graph --------------------------------------------------------------------


GRAPH_CHUNK_ENTRIES = 2**24
""":func:`graph_factors` runs its per-sample backwards in chunks of samples whose batched output
gradients hold about this many entries (each is the whole batch's output gradient, one sample's
part non-zero), bounding its extra memory."""


class GraphCall(NamedTuple):
    """One captured call, to be read from the autograd graph it built: for each output leaf that
    requires grad, the name of its graph node and its index there (``None`` for other leaves),
    their batch dims ``out_dims``, and whether the parameters of the module's subtree are measured
    (``recurse``). No reference to the graph: the hook holding this hangs on the graph, and a
    step without a backward must leave nothing alive; the nodes are found when the output
    gradient arrives (``_output_edges``)."""

    nodes: tuple[tuple[str, int] | None, ...]
    out_dims: tuple[int | None, ...]
    recurse: bool


def graph_capture(
    layer: nn.Module, output: Any, out_dim: Callable[[int, Tensor], int | None], recurse: bool
) -> GraphCall:
    """What :func:`graph_factors` needs of a call whose random draws (dropout) a recomputation
    would not reproduce: where its outputs sit in the graph."""
    leaves = output_leaves(output)
    nodes = _graph_nodes(leaves)
    out_dims = tuple(None if n is None else out_dim(k, o) for k, (n, o) in enumerate(zip(nodes, leaves)))
    return GraphCall(nodes, out_dims, recurse)


def _graph_nodes(leaves: Sequence[Any]) -> tuple[tuple[str, int] | None, ...]:
    """(name of its graph node, its index there) of each output leaf with a graph, else ``None``."""
    return tuple(
        (o.grad_fn.name(), o.output_nr) if isinstance(o, Tensor) and o.grad_fn is not None else None
        for o in leaves
    )


def graph_factors(layer: nn.Module, call: GraphCall, backprops: Any) -> dict[str, GradFactor]:
    """g_i(θ) = ∂/∂θ ⟨δ_i, f(x; θ)⟩ through the graph the step ran (its dropout masks included),
    δ_i the output gradient with every sample but i zeroed (seed 004 eq. 6): one backward of the
    module's graph per sample, batched (``is_grads_batched``, in chunks of samples:
    :data:`GRAPH_CHUNK_ENTRIES`), so it costs B times the module's backward. The module's samples must not interact (true of attention and Transformer layers:
    each sample attends within itself). Hooks on the parameters (the user's, other callbacks')
    do not see these gradients, and nothing is written to ``.grad``. Runs inside the step's
    backward, from the collector's hook on the call's outputs."""
    grads = backprops if isinstance(backprops, tuple) else (backprops,)
    edges = _output_edges(layer, call)
    used = [k for k, g in enumerate(grads) if g is not None and edges[k] is not None]
    named = dict(layer.named_parameters(recurse=call.recurse))
    wanted = {n: p for n, p in named.items() if p.requires_grad}
    batch = grads[used[0]].shape[call.out_dims[used[0]]]
    chunk = max(1, GRAPH_CHUNK_ENTRIES // sum(grads[k].numel() for k in used))
    chunks = []
    with _without_tensor_hooks(wanted.values()), _quiet_batching(), _recomputing():
        for start in range(0, batch, chunk):
            samples = range(start, min(start + chunk, batch))
            chunks.append(
                torch.autograd.grad(
                    [edges[k] for k in used],
                    list(wanted.values()),
                    [_one_sample_each(grads[k], call.out_dims[k], samples) for k in used],
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
            )
    found = {n: torch.cat([c[j] for c in chunks]) for j, n in enumerate(wanted) if chunks[0][j] is not None}
    return {name: _graph_factor(found.get(name), param, batch) for name, param in named.items()}


def _output_edges(layer: nn.Module, call: GraphCall) -> list[GradientEdge | None]:
    """The graph edges of the call's outputs, from the node the backward is running: the
    collector's hook on a single output runs as that output's node is reached; for several
    outputs, as the identity node joining them is (its inputs are the outputs' edges)."""
    current = torch._C._current_autograd_node()
    hooked = [k for k, node in enumerate(call.nodes) if node is not None]
    edges: list[GradientEdge | None] = [None] * len(call.nodes)
    if len(hooked) == 1 and current is not None and current.name() == call.nodes[hooked[0]][0]:
        edges[hooked[0]] = GradientEdge(current, call.nodes[hooked[0]][1])
        return edges
    joined = [] if current is None else [edge for edge in current.next_functions if edge[0] is not None]
    if len(joined) == len(hooked) and all(
        edge[0].name() == call.nodes[k][0] for edge, k in zip(joined, hooked)
    ):
        for (node, index), k in zip(joined, hooked):
            edges[k] = GradientEdge(node, index)
        return edges
    raise RuntimeError(
        f"GramCollector could not find the graph of {type(layer).__name__}'s outputs in the backward "
        f"(running {current.name() if current is not None else 'no node'}); was its output modified "
        "in place, or its gradient hooked by another hook that runs this rule?"
    )


def _one_sample_each(grad: Tensor, dim: int, samples: range) -> Tensor:
    """(len(samples), *grad.shape): entry j is ``grad`` with every sample but ``samples[j]``
    (along ``dim``) zeroed."""
    shape = [1] * grad.dim()
    shape[dim] = grad.shape[dim]
    rows = torch.eye(grad.shape[dim], dtype=grad.dtype, device=grad.device)[samples.start : samples.stop]
    return grad.unsqueeze(0) * rows.reshape(len(samples), *shape)


def _graph_factor(grads: Tensor | None, param: Tensor, batch: int) -> PerSampleFactor:
    if grads is None:
        return PerSampleFactor(param.new_zeros((), dtype=compute_dtype(param)).expand(batch, *param.shape))
    return PerSampleFactor(cast(grads, compute_dtype(grads)))


@contextmanager
def _without_tensor_hooks(params: Iterable[Tensor]) -> Iterator[None]:
    """The parameters' Python gradient hooks set aside (and put back, in order) while the
    per-sample backward runs: they are meant for the step's gradient, not for these."""
    saved = [(p, dict(p._backward_hooks)) for p in params if p._backward_hooks]
    for param, _ in saved:
        param._backward_hooks.clear()
    try:
        yield
    finally:
        for param, hooks in saved:
            param._backward_hooks.update(hooks)
