"""Normalisation layers: BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm
(seed 004_e5d92837cb57ce8a.txt §3, eq. 6: g_i of the affine parameters γ, β)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..factors import ChannelAffineFactor, GradFactor, PerSampleFactor, cast, compute_dtype
from ..registry import first_tensor, register_gram_rule


def _channel_affine_factors(
    layer: nn.Module, inputs: Tensor, backprops: Tensor, mean: Tensor, rstd: Tensor
) -> dict[str, GradFactor]:
    """y = γ_c·(x − μ)·r + β_c per channel c, inputs and backprops (B, C, *S), μ and r = 1/√(σ² + ε)
    of shape (C,) or (B, C): g_i(γ)[c] = r·Σ_t δ_{ct}(x_{ct} − μ), g_i(β)[c] = Σ_t δ_{ct} (seed 004
    eq. 6), computed when read (:class:`~..factors.ChannelAffineFactor`: same-shaped layers together)."""
    has_weight, has_bias = layer.weight is not None, layer.bias is not None
    names = (
        ("weight", "bias") if has_weight and has_bias else ("weight",) if has_weight else ("bias",)[:has_bias]
    )
    return {name: ChannelAffineFactor(inputs, backprops, mean, rstd, names, name) for name in names}


def _running_stats(layer: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """μ and 1/√(σ² + ε) from the running statistics, in ``dtype``."""
    return cast(layer.running_mean, dtype), (cast(layer.running_var, dtype) + layer.eps).rsqrt()


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


def batch_norm_capture(
    layer: _BatchNorm, args: tuple, kwargs: dict, output: Tensor
) -> Tensor | NormalizedInput:
    """Keep the batch statistics autograd saved for the backward (``save_mean``, ``save_invstd``),
    so the rule needs no second pass over the input; the bare input where they are not exposed."""
    inputs = args[0] if args and isinstance(args[0], Tensor) else first_tensor(args, kwargs)
    node = output.grad_fn
    mean, rstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
    channels = (inputs.shape[1],)
    saved = isinstance(mean, Tensor) and isinstance(rstd, Tensor) and mean.shape == channels == rstd.shape
    if saved and (layer.training or layer.running_mean is None):  # batch statistics (_uses_batch_stats)
        return NormalizedInput(inputs, mean, rstd)
    return inputs


def _batch_norm_statistics(
    layer: _BatchNorm, activations: Tensor | NormalizedInput, dtype: torch.dtype
) -> NormalizedInput:
    """μ and 1/√(σ² + ε) per channel: captured, recomputed from the batch (biased σ²), or running."""
    if isinstance(activations, NormalizedInput):
        inputs, mean, rstd = activations
        if inputs.dtype == mean.dtype == rstd.dtype == dtype:  # the usual case: nothing to cast
            return activations
        return NormalizedInput(cast(inputs, dtype), cast(mean, dtype), cast(rstd, dtype))
    inputs = cast(activations, dtype)
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
    backprops = backprops if backprops.dtype == dtype else backprops.to(dtype)
    return _channel_affine_factors(layer, inputs, backprops, mean, rstd)


@register_gram_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_factors(
    layer: _InstanceNorm, activations: Tensor, backprops: Tensor
) -> dict[str, GradFactor]:
    """x̂ = (x − μ)/√(σ² + ε) per sample and channel (the running statistics in eval mode if
    tracked); g_i as in :func:`_channel_affine_factors` (seed 004 eq. 6)."""
    dtype = compute_dtype(activations, backprops)
    inputs = cast(activations, dtype)
    if layer.training or not layer.track_running_stats:
        mean, rstd = _sample_stats(inputs, inputs.shape[1], layer.eps)
    else:
        mean, rstd = _running_stats(layer, dtype)
    return _channel_affine_factors(layer, inputs, cast(backprops, dtype), mean, rstd)


@register_gram_rule(nn.GroupNorm)
def group_norm_factors(layer: nn.GroupNorm, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """x̂ = (x − μ)/√(σ² + ε) per sample and group of channels, γ and β per channel; g_i as in
    :func:`_channel_affine_factors` (seed 004 eq. 6)."""
    dtype = compute_dtype(activations, backprops)
    inputs = cast(activations, dtype)
    mean, rstd = _sample_stats(inputs, layer.num_groups, layer.eps)
    return _channel_affine_factors(layer, inputs, cast(backprops, dtype), mean, rstd)


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
    normalized = F.layer_norm(cast(activations, dtype), layer.normalized_shape, eps=layer.eps)
    return _trailing_affine_factors(layer, normalized, cast(backprops, dtype))


if hasattr(nn, "RMSNorm"):

    @register_gram_rule(nn.RMSNorm, param_names=("weight",))
    def rms_norm_factors(layer: nn.RMSNorm, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
        """x̂ = x / √(mean(x²) + ε) over the trailing ``normalized_shape`` dims; γ only:
        g_i(γ) = Σ_t δ_t ⊙ x̂_t (seed 004 eq. 6)."""
        dtype = compute_dtype(activations, backprops)
        normalized = F.rms_norm(cast(activations, dtype), layer.normalized_shape, eps=layer.eps)
        return _trailing_affine_factors(layer, normalized, cast(backprops, dtype))
