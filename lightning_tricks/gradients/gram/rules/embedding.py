"""Embedding: g_i(W)[v] = Σ_t [idx_t = v] δ_t (seed 004_e5d92837cb57ce8a.txt §3, eq. 6)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..factors import EmbeddingFactor, GradFactor, cast, compute_dtype
from ..registry import register_gram_rule


@register_gram_rule(nn.Embedding, param_names=("weight",))
def embedding_factors(layer: nn.Embedding, activations: Tensor, backprops: Tensor) -> dict[str, GradFactor]:
    """y_t = W[idx_t]: g_i(W)[v] = Σ_t [idx_t = v] δ_t. Rows at ``padding_idx`` get no gradient; with
    ``scale_grad_by_freq`` each δ_t is divided by idx_t's count in the whole batch (as autograd
    does), so g_i is sample i's contribution to the batch gradient (seed 004 eq. 6)."""
    batch = len(activations)
    indices = activations.reshape(batch, -1)
    outputs = cast(backprops, compute_dtype(backprops)).reshape(batch, indices.shape[1], layer.embedding_dim)
    if layer.padding_idx is not None:
        outputs = outputs * (indices != layer.padding_idx)[..., None]
    if layer.scale_grad_by_freq:
        counts = torch.bincount(indices.reshape(-1), minlength=layer.num_embeddings)
        outputs = outputs / counts[indices][..., None]
    return {"weight": EmbeddingFactor(indices, outputs, layer.num_embeddings)}
