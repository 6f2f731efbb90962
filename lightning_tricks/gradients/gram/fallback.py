"""Per-sample gradients by recomputation: the generic fallback, also behind the "vjp" rules.

Seed 004_e5d92837cb57ce8a.txt (§3, eq. 6) needs column i of J_k, sample i's gradient g_i. For a
module whose forward has no closed-form rule, g_i is the vector-Jacobian product of the output
gradient δ_i with the module's Jacobian at sample i's inputs, g_i(θ) = ∂/∂θ ⟨δ_i, f(x_i; θ)⟩,
evaluated for all samples at once with ``torch.func.vmap`` over ``torch.func.grad`` of the module
run on its captured inputs (a batch of one inside the map). The recomputation changes nothing the
user trains: parameters enter detached, buffers as copies taken at the forward, the collector's
own hooks are off, random operations are refused (``randomness="error"``, inside
``torch.random.fork_rng``) and no ``.grad`` is written.

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
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .factors import GradFactor, PerSampleFactor, cast, compute_dtype
from .registry import GramRule


class _RecomputeState(threading.local):
    depth = 0


RECOMPUTING = _RecomputeState()
"""``RECOMPUTING.depth > 0`` while a fallback recomputation runs in this thread (an attribute
read: the collector's hooks check it at every call)."""

_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[bool]] = weakref.WeakKeyDictionary()


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
    where an output has none) and version counters.
    """

    forward: Callable[..., list[Any]]
    inputs: tuple[Tensor, ...]
    in_dims: tuple[int, ...]
    buffers: dict[str, Tensor]
    outputs: tuple[Tensor | None, ...]
    out_dims: tuple[int | None, ...]
    versions: tuple[int, ...]
    recurse: bool


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
    outputs = tuple(o.detach() if isinstance(o, Tensor) else None for o in output_leaves(output))
    return SampledCall(
        forward,
        inputs,
        tuple(in_dims),
        {name: b.detach().clone() for name, b in layer.named_buffers(recurse=True)},
        outputs,
        tuple(None if o is None else out_dim(k, o) for k, o in enumerate(outputs)),
        tuple(t._version for t in (*inputs, *(o for o in outputs if o is not None))),
        recurse,
    )

# -- the per-sample vector-Jacobian products -------------------------------------------------------


def recompute_factors(layer: nn.Module, call: SampledCall, backprops: Any) -> dict[str, GradFactor]:
    """g_i(θ) = ∂/∂θ ⟨δ_i, f(x_i; θ)⟩ for every parameter θ of the module (of its subtree for a
    composite rule), one ``vmap``-ed ``grad`` over the samples (seed 004 eq. 6)."""
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
    with _fork_rng(call.inputs), _recomputing():
        try:
            sample_grads, outputs = per_sample(primals, call.inputs, tuple(grads[k] for k in used))
        except RuntimeError as error:
            if "random" not in str(error):
                raise
            raise RuntimeError(
                f"GramCollector's fallback cannot recompute {type(layer).__name__}: its forward draws random "
                "numbers (dropout in training mode?), so the per-sample recomputation would not see the "
                "same masks. Set the dropout to 0, run it in eval mode, register a rule for it, or leave "
                "its parameters out with params=/modules="
            ) from error
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
                "parameters out with params=/modules="
            )
    checked.add(layer.training)

# -- any module ----------------------------------------------------------------------------------


def generic_capture(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> SampledCall:
    """Any module: tensor arguments whose leading size is B (that of the first tensor argument) are
    per-sample along dim 0, the others shared; outputs with leading size B are per-sample."""
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
    return _sampled_call(layer, forward, inputs, [0] * len(inputs), output, out_dim, recurse=False)


FALLBACK_RULE = GramRule(recompute_factors, param_names=None, capture=generic_capture, method="fallback")
"""Used by :class:`~lightning_tricks.gradients.GramCollector` for any module without a rule."""
