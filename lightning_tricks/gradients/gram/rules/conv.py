"""ConvNd and ConvTransposeNd: g_i(W)[k] = Σ_t δ_{kt} patch_{kt}ᵀ, g_i(b) = Σ_t δ_t
(seed 004_e5d92837cb57ce8a.txt §3, eq. 6; the per-sample methods live in :class:`..factors.ConvFactor`)."""

from __future__ import annotations

from torch import Tensor, nn

from ..factors import ConvFactor, GradFactor, PerSampleFactor, cast, compute_dtype
from ..registry import register_gram_rule


def _check_batched(layer: nn.Module, tensor: Tensor, spatial_dims: int) -> None:
    """Raise: per-sample gradients need a batched input (called where its rank is wrong)."""
    if tensor.dim() != spatial_dims + 2:
        raise ValueError(
            f"{type(layer).__name__} got an input of shape {tuple(tensor.shape)}; per-sample gradients "
            f"need a batched input (B, C, {spatial_dims} spatial dims)"
        )


@register_gram_rule(
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
)  # fmt: skip
def conv_factors(layer: nn.Module, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """y[o_t] = Σ_κ W[:, :, κ] x[o_t·s − p + κ·d] + b per group (seed 004 §4, convolution):
    g_i(W)[k] = Σ_t δ_{kt} patch_{kt}ᵀ over output positions t, g_i(b) = Σ_t δ_t (eq. 6).

    A transposed convolution is the adjoint of the convolution with the same stride, padding and
    dilation, so there g_i(W)[k] = Σ_t x_{kt} patch(δ)_{kt}ᵀ over *input* positions t, patch(δ)
    unfolding the output gradient like a convolution input (:class:`ConvFactor` reads which)."""
    if activations.dim() != len(layer.kernel_size) + 2:
        _check_batched(layer, activations, len(layer.kernel_size))
    dtype = compute_dtype(activations, backprops)
    factors: dict[str, GradFactor] = {"weight": ConvFactor(activations, backprops, layer, dtype)}
    if layer.bias is not None:
        factors["bias"] = PerSampleFactor(cast(backprops, dtype).flatten(2).sum(dim=-1))
    return factors
