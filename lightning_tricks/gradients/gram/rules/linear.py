"""Linear: g_i(W) = Σ_t δ_t a_tᵀ, g_i(b) = Σ_t δ_t (seed 004_e5d92837cb57ce8a.txt §3, eq. 6; §4)."""

from __future__ import annotations

from torch import Tensor, nn

from ..factors import GradFactor, OuterFactor, PerSampleFactor, cast, compute_dtype
from ..registry import register_gram_rule


@register_gram_rule(nn.Linear)
def linear_factors(layer: nn.Linear, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """y_t = W a_t + b at each position t of an input (B, *, d_in) (seed 004 §4, fully-connected):
    g_i(W) = Σ_t δ_t a_tᵀ, g_i(b) = Σ_t δ_t (eq. 6)."""
    dtype = compute_dtype(activations, backprops)
    batch = activations.shape[0]
    inputs = cast(activations.reshape(batch, 1, -1, layer.in_features).transpose(2, 3), dtype)
    outputs = cast(backprops.reshape(batch, 1, -1, layer.out_features).transpose(2, 3), dtype)
    factors: dict[str, GradFactor] = {"weight": OuterFactor(inputs, outputs, layer.weight.shape)}
    if layer.bias is not None:
        factors["bias"] = PerSampleFactor(outputs.sum(dim=-1).reshape(batch, -1))
    return factors
