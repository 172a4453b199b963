"""Shared math of element-wise affine layers y = x̂ ⊙ weight (+ bias), used by the norm layers.

Their per-sample gradients are parameter-sized and cheap ([B, d]): G_i(weight) = Σ_t b_it ⊙ x̂_it,
G_i(bias) = Σ_t b_it. They are formed explicitly, in fp32 (or fp64 for an fp64 model).
"""
import torch

from ghost_engine.layers import LayerPath


def _per_row(t: torch.Tensor, n_feature_dims: int) -> torch.Tensor:
    """[rows, ..., *features] -> [rows, tokens, prod(features)]"""
    rows = t.shape[0]
    features = t.shape[t.dim() - n_feature_dims:]
    return t.reshape(rows, -1, features.numel())


def affine_val_grads(x_hat_v, grad_v, n_feature_dims, has_weight, has_bias, weight_shape):
    g = _per_row(grad_v, n_feature_dims)
    grads = {}
    if has_weight:
        grads["weight"] = (g * _per_row(x_hat_v, n_feature_dims)).sum((0, 1)).reshape(weight_shape)
    if has_bias:
        grads["bias"] = g.sum((0, 1)).reshape(weight_shape)
    return grads


def affine_per_sample_dots(x_hat_tr, grad_tr, n_feature_dims, val_totals):
    g = _per_row(grad_tr, n_feature_dims)
    out = {}
    if "weight" in val_totals:
        per_sample = (g * _per_row(x_hat_tr, n_feature_dims)).sum(1)  # [B, d]
        out["weight"] = per_sample @ val_totals["weight"].reshape(-1).to(per_sample.dtype)
    if "bias" in val_totals:
        out["bias"] = g.sum(1) @ val_totals["bias"].reshape(-1).to(g.dtype)
    return out


def affine_path(act_tr, n_feature_dims) -> LayerPath:
    return LayerPath("explicit", 4.0 * act_tr.numel())


def accum(t: torch.Tensor) -> torch.Tensor:
    """Norm statistics in fp32 (fp64 for an fp64 model), as the layers themselves compute them."""
    return t.double() if t.dtype == torch.float64 else t.float()
