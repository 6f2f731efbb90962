"""RNN, LSTM and GRU: per-sample vector-Jacobian products of an unrolled recomputation
(seed 004_e5d92837cb57ce8a.txt §3, eq. 6; :func:`..fallback.recompute_factors`).

``nn.RNN``/``nn.LSTM``/``nn.GRU`` kernels cannot run under ``vmap``; they are recomputed with an
unrolled equivalent of their cells (same equations as the PyTorch docs), exact up to float rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..factors import GradFactor
from ..fallback import SampledCall, _sampled_call, recompute_factors
from ..registry import register_gram_rule


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


@register_gram_rule(
    nn.RNN, nn.LSTM, nn.GRU, param_names=None, capture=rnn_capture, batch_size=rnn_batch_size, method="vjp"
)
def recurrent_factors(layer: nn.RNNBase, activations: SampledCall, backprops: Any) -> dict[str, GradFactor]:
    """g_i of every weight and bias of the recurrent layer: the per-sample VJP of
    :func:`unrolled_rnn` (seed 004 eq. 6)."""
    return recompute_factors(layer, activations, backprops)
