"""Per-sample gradients by recomputation: the generic fallback, MultiheadAttention and the RNNs.

Seed 004_e5d92837cb57ce8a.txt (§3, eq. 6) needs column i of J_k, sample i's gradient g_i. For a
module whose forward has no closed-form rule, g_i is the vector-Jacobian product of the output
gradient δ_i with the module's Jacobian at sample i's inputs, g_i(θ) = ∂/∂θ ⟨δ_i, f(x_i; θ)⟩,
evaluated for all samples at once with ``torch.func.vmap`` over ``torch.func.grad`` of the module
run on its captured inputs (a batch of one inside the map). The recomputation changes nothing the
user trains: parameters enter detached, buffers as copies taken at the forward, the collector's
own hooks are off, random operations are refused (``randomness="error"``, inside
``torch.random.fork_rng``) and no ``.grad`` is written.

The batch dimension of every input and output comes from a small per-type description: the
leading one for any module (inputs whose leading size differs from B are shared by all samples),
dims (T, B, *) unless ``batch_first`` for MultiheadAttention and the RNNs, (layers·directions, B, H)
for RNN states. ``nn.RNN``/``nn.LSTM``/``nn.GRU`` kernels cannot run under ``vmap``; they are
recomputed with an unrolled equivalent of their cells (same equations as the PyTorch docs),
exact up to float rounding. The recomputed outputs are compared with the module's own outputs on
the first use of each module in each mode (train/eval): a module whose samples are coupled, or
that is not what the description assumes, raises instead of giving a wrong matrix.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .gram_rules import GradFactor, GramRule, PerSampleFactor, compute_dtype, register_gram_rule

_STATE = threading.local()
_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[bool]] = weakref.WeakKeyDictionary()


def is_recomputing() -> bool:
    """Whether a fallback recomputation is running (the collector's hooks must then stay idle)."""
    return getattr(_STATE, "depth", 0) > 0


@contextmanager
def _recomputing() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


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
        return PerSampleFactor(g.to(compute_dtype(g)))
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


FALLBACK_RULE = GramRule(recompute_factors, param_names=None, capture_call=generic_capture, method="fallback")
"""Used by :class:`~lightning_tricks.gradients.GramCollector` for any module without a rule."""


# -- MultiheadAttention --------------------------------------------------------------------------


def _mha_arguments(layer: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    if bound.arguments["query"].dim() != 3:
        raise ValueError(
            f"MultiheadAttention got an unbatched query of shape {tuple(bound.arguments['query'].shape)}; "
            "GramCollector needs batched inputs ((L, B, E), or (B, L, E) with batch_first=True)"
        )
    return dict(bound.arguments)


def mha_batch_size(layer: nn.MultiheadAttention, args: tuple, kwargs: dict) -> int:
    """B: dim 1 of the query, dim 0 with ``batch_first``."""
    return _mha_arguments(layer, args, kwargs)["query"].shape[0 if layer.batch_first else 1]


def mha_capture(layer: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> SampledCall:
    """Query, key and value per sample along their batch dim, ``key_padding_mask`` (B, S) along
    dim 0, a 3-D ``attn_mask`` (B·heads, L, S) per sample as (B, heads, L, S); a 2-D mask shared.
    The attention output has the query's layout, the attention weights are batch first."""
    if layer.training and layer.dropout > 0:
        raise ValueError(
            f"MultiheadAttention has dropout={layer.dropout} in training mode; GramCollector cannot "
            "reproduce its dropout masks per sample. Use dropout=0, eval mode, or leave it out with "
            "params=/modules="
        )
    arguments = {
        k: v.detach() if isinstance(v, Tensor) else v for k, v in _mha_arguments(layer, args, kwargs).items()
    }
    dim = 0 if layer.batch_first else 1
    batched = {"query": dim, "key": dim, "value": dim}
    if arguments["key_padding_mask"] is not None:
        batched["key_padding_mask"] = 0
    mask = arguments["attn_mask"]
    if mask is not None and mask.dim() == 3:
        arguments["attn_mask"] = mask.reshape(-1, layer.num_heads, *mask.shape[1:])
        batched["attn_mask"] = 0
    names = list(batched)

    def forward(state: dict[str, Tensor], *inputs: Tensor) -> list[Any]:
        call = dict(arguments, **dict(zip(names, inputs)))
        if "attn_mask" in batched:
            call["attn_mask"] = call["attn_mask"].flatten(0, 1)
        return output_leaves(functional_call(layer, state, (), call))

    def out_dim(k: int, o: Tensor) -> int:
        return dim if k == 0 else 0

    return _sampled_call(
        layer, forward, [arguments[n] for n in names], list(batched.values()), output, out_dim, recurse=True
    )


register_gram_rule(
    nn.MultiheadAttention,
    GramRule(
        recompute_factors,
        param_names=None,
        capture_call=mha_capture,
        batch_size=mha_batch_size,
        composite=True,
        method="vjp",
    ),
)


# -- RNN, LSTM, GRU --------------------------------------------------------------------------------


def _rnn_arguments(layer: nn.RNNBase, args: tuple, kwargs: dict) -> tuple[Tensor, Any]:
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    inputs, hx = bound.arguments["input"], bound.arguments.get("hx")
    if isinstance(inputs, PackedSequence):
        raise ValueError(
            f"{type(layer).__name__} got a PackedSequence; GramCollector needs a padded batch "
            "((T, B, *), or (B, T, *) with batch_first=True) — mask the padded steps in the loss instead"
        )
    if inputs.dim() != 3:
        raise ValueError(
            f"{type(layer).__name__} got an unbatched input of shape {tuple(inputs.shape)}; GramCollector "
            "needs a batch ((T, B, *), or (B, T, *) with batch_first=True)"
        )
    return inputs, hx


def rnn_batch_size(layer: nn.RNNBase, args: tuple, kwargs: dict) -> int:
    """B: dim 1 of the input, dim 0 with ``batch_first``."""
    return _rnn_arguments(layer, args, kwargs)[0].shape[0 if layer.batch_first else 1]


def rnn_capture(layer: nn.RNNBase, args: tuple, kwargs: dict, output: Any) -> SampledCall:
    """Input per sample along its batch dim, initial states (layers·directions, B, H) along dim 1;
    outputs likewise; recomputed by :func:`unrolled_rnn`."""
    if layer.training and layer.dropout > 0 and layer.num_layers > 1:
        raise ValueError(
            f"{type(layer).__name__} has dropout={layer.dropout} between layers in training mode; "
            "GramCollector cannot reproduce its dropout masks per sample. Use dropout=0, eval mode, or "
            "leave it out with params=/modules="
        )
    inputs, hx = _rnn_arguments(layer, args, kwargs)
    states = [] if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
    dim = 0 if layer.batch_first else 1

    def forward(state: dict[str, Tensor], x: Tensor, *initial: Tensor) -> list[Any]:
        return unrolled_rnn(layer, state, x, initial or None)

    def out_dim(k: int, o: Tensor) -> int:
        return dim if k == 0 else 1

    return _sampled_call(
        layer, forward, [inputs, *states], [dim] + [1] * len(states), output, out_dim, recurse=False
    )


def unrolled_rnn(
    layer: nn.RNNBase, weights: dict[str, Tensor], inputs: Tensor, initial: Sequence[Tensor] | None
) -> list[Tensor]:
    """The forward of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (no dropout) step by step, from ``weights``
    named as the module's parameters: [output, h_n] or, for LSTM, [output, h_n, c_n]."""
    x = inputs.transpose(0, 1) if layer.batch_first else inputs
    directions = 2 if layer.bidirectional else 1
    lstm = layer.mode == "LSTM"
    hidden = layer.proj_size if lstm and layer.proj_size > 0 else layer.hidden_size
    shape = (layer.num_layers * directions, x.shape[1])
    h0 = initial[0] if initial else x.new_zeros(*shape, hidden)
    c0 = (initial[1] if initial else x.new_zeros(*shape, layer.hidden_size)) if lstm else None
    finals: list[list[Tensor]] = [[], []]
    for index in range(layer.num_layers):
        outs = []
        for direction in range(directions):
            k = index * directions + direction
            suffix = f"_l{index}" + ("_reverse" if direction else "")
            sequence = x.flip(0) if direction else x
            out, states = _run_cell(layer, weights, suffix, sequence, h0[k], None if c0 is None else c0[k])
            outs.append(out.flip(0) if direction else out)
            for store, state in zip(finals, states):
                store.append(state)
        x = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
    output = x.transpose(0, 1) if layer.batch_first else x
    return [output, *(torch.stack(store) for store in finals if store)]


def _run_cell(
    layer: nn.RNNBase, weights: dict[str, Tensor], suffix: str, x: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer and direction over (T, N, I): the cell equations of the PyTorch documentation."""
    w_hh, b_hh = weights[f"weight_hh{suffix}"], weights.get(f"bias_hh{suffix}")
    projected = F.linear(x, weights[f"weight_ih{suffix}"], weights.get(f"bias_ih{suffix}"))
    outputs = []
    for step in projected:
        recurrent = F.linear(h, w_hh, b_hh)
        if layer.mode == "LSTM":
            i, f, g, o = (step + recurrent).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if layer.proj_size > 0:
                h = F.linear(h, weights[f"weight_hr{suffix}"])
        elif layer.mode == "GRU":
            x_r, x_z, x_n = step.chunk(3, dim=-1)
            h_r, h_z, h_n = recurrent.chunk(3, dim=-1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
        else:
            h = (torch.tanh if layer.mode == "RNN_TANH" else torch.relu)(step + recurrent)
        outputs.append(h)
    return torch.stack(outputs), (h,) if c is None else (h, c)


RNN_RULE = GramRule(
    recompute_factors, param_names=None, capture_call=rnn_capture, batch_size=rnn_batch_size, method="vjp"
)
for _rnn_type in (nn.RNN, nn.LSTM, nn.GRU):
    register_gram_rule(_rnn_type, RNN_RULE)


# -- Transformer layers, sequence first ------------------------------------------------------------


def _transformer_arguments(layer: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    first = arguments.get("src", arguments.get("tgt"))
    if first.dim() != 3:
        raise ValueError(
            f"{type(layer).__name__} got an unbatched input of shape {tuple(first.shape)}; GramCollector "
            "needs a batch (T, B, E)"
        )
    masks = [
        n for n, v in arguments.items() if n.endswith("_mask") and isinstance(v, Tensor) and v.dim() == 3
    ]
    if masks:
        raise ValueError(
            f"{type(layer).__name__} got 3-D {masks}; GramCollector supports shared (T, S) attention masks "
            "and (B, S) key padding masks for sequence-first Transformer layers (or use batch_first=True)"
        )
    return arguments


def transformer_batch_size(layer: nn.Module, args: tuple, kwargs: dict) -> int:
    """B: dim 1 of ``src``/``tgt`` (sequence-first layers)."""
    arguments = _transformer_arguments(layer, args, kwargs)
    return arguments.get("src", arguments.get("tgt")).shape[1]


def transformer_capture(layer: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> SampledCall:
    """A sequence-first ``nn.TransformerEncoderLayer``/``DecoderLayer`` as a whole: its Linear and
    LayerNorm children see (T, B, E), which their rules (batch first) cannot split. ``src``,
    ``tgt``, ``memory`` per sample along dim 1, key padding masks along dim 0, (T, S) masks shared."""
    dropouts = [m.p for m in layer.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if layer.training and dropouts:
        raise ValueError(
            f"{type(layer).__name__} has dropout={dropouts[0]} in training mode; GramCollector cannot "
            "reproduce its dropout masks per sample. Use dropout=0, eval mode, or leave it out with "
            "params=/modules="
        )
    arguments = {
        k: v.detach() if isinstance(v, Tensor) else v
        for k, v in _transformer_arguments(layer, args, kwargs).items()
    }
    batched = {n: 1 for n in ("src", "tgt", "memory") if isinstance(arguments.get(n), Tensor)}
    batched.update(
        {n: 0 for n, v in arguments.items() if n.endswith("key_padding_mask") and isinstance(v, Tensor)}
    )
    names = list(batched)

    def forward(state: dict[str, Tensor], *inputs: Tensor) -> list[Any]:
        return output_leaves(functional_call(layer, state, (), dict(arguments, **dict(zip(names, inputs)))))

    def out_dim(k: int, o: Tensor) -> int:
        return 1

    return _sampled_call(
        layer, forward, [arguments[n] for n in names], list(batched.values()), output, out_dim, recurse=True
    )


TRANSFORMER_RULE = GramRule(
    recompute_factors,
    param_names=None,
    capture_call=transformer_capture,
    batch_size=transformer_batch_size,
    composite=True,
    method="vjp",
    applies=lambda layer: not layer.self_attn.batch_first,
)
for _layer_type in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
    register_gram_rule(_layer_type, TRANSFORMER_RULE)
