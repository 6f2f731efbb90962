"""MultiheadAttention and sequence-first Transformer layers: per-sample vector-Jacobian products
(seed 004_e5d92837cb57ce8a.txt §3, eq. 6): of the recomputed forward
(:func:`..fallback.recompute_factors`), or, with dropout in training mode, of the graph the step
ran, its dropout masks included (:func:`..fallback.graph_factors`)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from ..factors import GradFactor
from ..fallback import (
    GraphCall,
    SampledCall,
    _sampled_call,
    graph_capture,
    graph_factors,
    output_leaves,
    recompute_factors,
)
from ..registry import register_gram_rule

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


def mha_capture(
    layer: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any
) -> SampledCall | GraphCall:
    """Query, key and value per sample along their batch dim, ``key_padding_mask`` (B, S) along
    dim 0, a 3-D ``attn_mask`` (B·heads, L, S) per sample as (B, heads, L, S); a 2-D mask shared.
    The attention output has the query's layout, the attention weights are batch first. With
    dropout in training mode: the call's own graph (:func:`..fallback.graph_capture`)."""
    dim = 0 if layer.batch_first else 1
    if layer.training and layer.dropout > 0:
        return graph_capture(layer, output, lambda k, o: dim if k == 0 else 0, recurse=True)
    arguments = {
        k: v.detach() if isinstance(v, Tensor) else v for k, v in _mha_arguments(layer, args, kwargs).items()
    }
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


@register_gram_rule(
    nn.MultiheadAttention,
    param_names=None,
    capture=mha_capture,
    batch_size=mha_batch_size,
    composite=True,
    method="vjp",
)
def attention_factors(
    layer: nn.MultiheadAttention, activations: SampledCall, backprops: Any
) -> dict[str, GradFactor]:
    """g_i of every parameter of the attention (``in_proj``, ``out_proj``, biases): the per-sample
    VJP of its recomputed forward, or of its own graph with dropout in training (seed 004 eq. 6)."""
    if isinstance(activations, GraphCall):
        return graph_factors(layer, activations, backprops)
    return recompute_factors(layer, activations, backprops)


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


def transformer_capture(
    layer: nn.Module, args: tuple, kwargs: dict, output: Tensor
) -> SampledCall | GraphCall:
    """A sequence-first ``nn.TransformerEncoderLayer``/``DecoderLayer`` as a whole: its Linear and
    LayerNorm children see (T, B, E), which their rules (batch first) cannot split. ``src``,
    ``tgt``, ``memory`` per sample along dim 1, key padding masks along dim 0, (T, S) masks shared.
    With dropout in training mode: the call's own graph (:func:`..fallback.graph_capture`)."""
    if layer.training and any(_dropout(m) > 0 for m in layer.modules()):
        return graph_capture(layer, output, lambda k, o: 1, recurse=True)
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


def _dropout(module: nn.Module) -> float:
    if isinstance(module, nn.Dropout):
        return module.p
    return module.dropout if isinstance(module, nn.MultiheadAttention) else 0.0


@register_gram_rule(
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    param_names=None,
    capture=transformer_capture,
    batch_size=transformer_batch_size,
    composite=True,
    method="vjp",
    applies=lambda layer: not layer.self_attn.batch_first,
)
def transformer_factors(layer: nn.Module, activations: SampledCall, backprops: Any) -> dict[str, GradFactor]:
    """g_i of every parameter of a sequence-first Transformer layer: the per-sample VJP of its
    recomputed forward, or of its own graph with dropout in training (seed 004 eq. 6); batch-first
    layers are served by their children's rules."""
    if isinstance(activations, GraphCall):
        return graph_factors(layer, activations, backprops)
    return recompute_factors(layer, activations, backprops)
