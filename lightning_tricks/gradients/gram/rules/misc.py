"""PReLU, Bilinear and EmbeddingBag: closed-form rules (seed 004_e5d92837cb57ce8a.txt §3, eq. 6).

One function per layer type turning the captured call and the output gradient δ into one factor
per parameter, each an exact description of the per-sample gradients g_i (column i of J_k).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..factors import (
    EmbeddingFactor,
    GradFactor,
    MethodCosts,
    OuterFactor,
    PerSampleFactor,
    cast,
    compute_dtype,
)
from ..registry import register_gram_rule

# -- PReLU ---------------------------------------------------------------------------------------


@register_gram_rule(nn.PReLU, param_names=("weight",))
def prelu_factors(layer: nn.PReLU, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """y = max(x, 0) + a_c·min(x, 0) per channel c (dim 1; one shared a if ``num_parameters`` is 1):
    g_i(a)[c] = Σ_t δ_{ct}·min(x_{ct}, 0) (seed 004 eq. 6)."""
    if layer.num_parameters > 1 and activations.dim() < 2:
        raise ValueError(
            f"PReLU(num_parameters={layer.num_parameters}) got an input of shape {tuple(activations.shape)}; "
            "per-sample gradients need a batched input (B, C, *)"
        )
    dtype = compute_dtype(activations, backprops)
    products = cast(backprops, dtype) * cast(activations, dtype).clamp(max=0)
    batch = len(products)
    if layer.num_parameters == 1:
        return {"weight": PerSampleFactor(products.reshape(batch, -1).sum(1, keepdim=True))}
    return {"weight": PerSampleFactor(products.reshape(batch, layer.num_parameters, -1).sum(-1))}


# -- Bilinear ------------------------------------------------------------------------------------


class BilinearFactor(NamedTuple):
    """g_i(W)[k] = Σ_t δ_{itk}·x1_{it} x2_{it}ᵀ: ``first`` (B, T, p), ``second`` (B, T, q), ``backprops`` (B, T, K)."""

    first: Tensor
    second: Tensor
    backprops: Tensor

    def ghost_gram(self) -> Tensor:
        """G[i, j] = Σ_{t,s} ⟨δ_it, δ_js⟩·⟨x1_it, x1_js⟩·⟨x2_it, x2_js⟩, without forming g_i."""
        products = [torch.einsum("btd,csd->btcs", t, t) for t in (self.backprops, self.first, self.second)]
        return (products[0] * products[1] * products[2]).sum(dim=(1, 3))

    def per_sample(self) -> Tensor:
        """g_i, shape (B, K, p, q)."""
        return torch.einsum("btk,btp,btq->bkpq", self.backprops, self.first, self.second)

    def costs(self) -> MethodCosts:
        """Ghost: B²·T²·(K + p + q). Materialised: B·T·K·p·q + B²·K·p·q."""
        batch, positions, p = self.first.shape
        q, k = self.second.shape[-1], self.backprops.shape[-1]
        return MethodCosts(
            ghost=batch**2 * positions**2 * (k + p + q),
            materialize=batch * positions * k * p * q + batch**2 * k * p * q,
        )

    @staticmethod
    def concat(factors: Sequence[BilinearFactor]) -> BilinearFactor:
        """Several calls of one layer add their gradients: join their positions."""
        return BilinearFactor(*(torch.cat(parts, dim=1) for parts in zip(*factors)))


def bilinear_capture(layer: nn.Bilinear, args: tuple, kwargs: dict, output: Tensor) -> tuple[Tensor, Tensor]:
    """Both inputs of the call."""
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    return bound.arguments["input1"], bound.arguments["input2"]


@register_gram_rule(nn.Bilinear, capture=bilinear_capture)
def bilinear_factors(
    layer: nn.Bilinear, activations: tuple[Tensor, Tensor], backprops: Tensor
) -> dict[str, GradFactor]:
    """y_{tk} = x1_tᵀ W_k x2_t + b_k at each position t of inputs ``(B, *, d1)``, ``(B, *, d2)``:
    g_i(W)[k] = Σ_t δ_{tk} x1_t x2_tᵀ, g_i(b) = Σ_t δ_t (seed 004 eq. 6)."""
    first, second = activations
    dtype = compute_dtype(first, second, backprops)
    batch = len(backprops)
    first, second, outputs = (
        cast(t, dtype).reshape(batch, -1, t.shape[-1]) for t in (first, second, backprops)
    )
    factors: dict[str, GradFactor] = {"weight": BilinearFactor(first, second, outputs)}
    if layer.bias is not None:
        factors["bias"] = PerSampleFactor(outputs.sum(dim=1))
    return factors


# -- EmbeddingBag --------------------------------------------------------------------------------


class Bags(NamedTuple):
    """An EmbeddingBag call as flat indices (N,), the bag of each index (N,), per-sample weights
    (N,) or ``None``, the number of bags B, and for ``mode="max"`` the row chosen per bag and
    feature (B, d)."""

    indices: Tensor
    bags: Tensor
    weights: Tensor | None
    batch: int
    max_rows: Tensor | None


def _bag_arguments(
    layer: nn.EmbeddingBag, args: tuple, kwargs: dict
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    inputs = bound.arguments["input"]
    if inputs.dim() not in (1, 2) or (inputs.dim() == 1) != (
        "offsets" in bound.arguments and bound.arguments["offsets"] is not None
    ):
        raise ValueError(
            f"EmbeddingBag got input of shape {tuple(inputs.shape)}; GramCollector needs a 2-D input (B, N) "
            "without offsets or a 1-D input with offsets"
        )
    return inputs, bound.arguments.get("offsets"), bound.arguments.get("per_sample_weights")


def embedding_bag_batch_size(layer: nn.EmbeddingBag, args: tuple, kwargs: dict) -> int:
    """B: rows of a 2-D input, else the number of offsets (less one with ``include_last_offset``)."""
    inputs, offsets, _ = _bag_arguments(layer, args, kwargs)
    return len(inputs) if offsets is None else len(offsets) - int(layer.include_last_offset)


def embedding_bag_capture(layer: nn.EmbeddingBag, args: tuple, kwargs: dict, output: Tensor) -> Bags:
    """Flatten the call into :class:`Bags`; in ``"max"`` mode also the selected rows, from the
    same kernel the forward ran."""
    inputs, offsets, weights = _bag_arguments(layer, args, kwargs)
    batch = embedding_bag_batch_size(layer, args, kwargs)
    if offsets is None:
        bags = torch.arange(batch, device=inputs.device).repeat_interleave(inputs.shape[1])
        offsets, include_last = (
            torch.arange(0, inputs.numel(), max(inputs.shape[1], 1), device=inputs.device),
            False,
        )
    else:
        starts = offsets[:batch]
        bags = torch.searchsorted(starts, torch.arange(len(inputs), device=inputs.device), right=True) - 1
        include_last = layer.include_last_offset
    indices = inputs.reshape(-1)
    flat_weights = None if weights is None else weights.reshape(-1)
    max_rows = None
    if layer.mode == "max":  # the row chosen per bag and feature (0 in empty bags, whose output is 0)
        with torch.no_grad():
            max_rows = torch.embedding_bag(
                layer.weight,
                indices,
                offsets[: batch + int(include_last)],
                False,
                2,
                False,
                None,
                include_last,
                layer.padding_idx,
            )[3]
    return Bags(indices, bags, flat_weights, batch, max_rows)


@register_gram_rule(
    nn.EmbeddingBag,
    param_names=("weight",),
    capture=embedding_bag_capture,
    batch_size=embedding_bag_batch_size,
)
def embedding_bag_factors(
    layer: nn.EmbeddingBag, activations: Bags, backprops: Tensor
) -> dict[str, GradFactor]:
    """Bag i's output is y_i = Σ_{t∈i} w_t W[idx_t] with w_t the per-sample weight ("sum"), or
    1/|i| ("mean", |i| counting non-padding indices), padding indices having w_t = 0 and
    ``scale_grad_by_freq`` dividing w_t by idx_t's count in the batch as autograd does. Then
    g_i(W) = s_i δ_iᵀ with s_i[v] = Σ_{t∈i, idx_t=v} w_t: a single outer product, (B, V)·(B, d)
    (seed 004 eq. 6). In "max" mode y_{ic} = W[m_{ic}, c] for the row m_{ic} selected per feature
    c, so g_i(W)[v, c] = [m_{ic} = v]·δ_{ic}: an embedding of the flattened (V·d) table."""
    indices, bags, weights, batch, max_rows = activations
    vocab, dim = layer.weight.shape
    outputs = cast(backprops, compute_dtype(backprops))
    keep = (indices != (-1 if layer.padding_idx is None else layer.padding_idx)).to(outputs.dtype)
    sizes = outputs.new_zeros(batch).index_add_(0, bags, keep)
    if max_rows is not None:
        flat = max_rows * dim + torch.arange(dim, device=max_rows.device)
        return {"weight": EmbeddingFactor(flat, (outputs * (sizes > 0)[:, None])[..., None], vocab * dim)}
    w = keep if weights is None else keep * cast(weights, outputs.dtype)
    if layer.mode == "mean":
        w = w / sizes.clamp(min=1)[bags]
    if layer.scale_grad_by_freq:
        counts = outputs.new_zeros(vocab).index_add_(0, indices, torch.ones_like(w))
        w = w / counts[indices]
    rows = (
        outputs.new_zeros(batch * vocab).index_add_(0, bags * vocab + indices, w).reshape(batch, 1, vocab, 1)
    )
    return {"weight": OuterFactor(outputs.reshape(batch, 1, dim, 1), rows, layer.weight.shape)}
