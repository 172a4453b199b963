"""Shared math of element-wise affine layers y = x̂ ⊙ weight (+ bias), used by the norm layers.

Their per-sample gradients are parameter-sized and cheap ([B, d]): G_i(weight) = Σ_t b_it ⊙ x̂_it,
G_i(bias) = Σ_t b_it. They are formed explicitly, in fp32 (or fp64 for an fp64 model).
"""
import torch

from ghost_engine.layers import LayerPath, row_sum, to_dtype


def _tokens(t: torch.Tensor, n_feature_dims: int) -> torch.Tensor:
    """[rows, ..., *features] -> [tokens, prod(features)]"""
    return t.reshape(-1, t.shape[t.dim() - n_feature_dims:].numel())


def _column_sum(m: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """The sum of m's rows as ``ones @ m``: a matrix-vector product, one pass, no strided reduction
    (`ones`: a vector of m.shape[0] ones, shared by the weight's and the bias's sums)."""
    return (ones if ones.dtype == m.dtype else m.new_ones(m.shape[0])) @ m


def affine_val_grads(x_hat_v, grad_v, n_feature_dims, has_weight, has_bias, weight_shape):
    g = _tokens(grad_v, n_feature_dims)
    ones = g.new_ones(g.shape[0])
    grads = {}
    if has_weight:
        grads["weight"] = _column_sum(g * _tokens(x_hat_v, n_feature_dims), ones).reshape(weight_shape)
    if has_bias:
        grads["bias"] = _column_sum(g, ones).reshape(weight_shape)
    return grads


def affine_per_sample_dots(x_hat_tr, grad_tr, n_feature_dims, val_totals):
    """<Σ_t b_it ⊙ x̂_it, V_w> = Σ_t (b_it ⊙ x̂_it)·V_w, per row, without forming [B, d] sums."""
    rows = grad_tr.shape[0]
    g = _tokens(grad_tr, n_feature_dims)
    out = {}
    if "weight" in val_totals:
        weighted = g * _tokens(x_hat_tr, n_feature_dims)
        out["weight"] = row_sum(weighted @ to_dtype(val_totals["weight"].reshape(-1), g.dtype), rows)
    if "bias" in val_totals:
        out["bias"] = row_sum(g @ to_dtype(val_totals["bias"].reshape(-1), g.dtype), rows)
    return out


def affine_per_sample_sq_norms(x_hat_tr, grad_tr, n_feature_dims, has_weight, has_bias):
    """||G_i||² per row from the explicit per-sample gradients Σ_t b_it ⊙ x̂_it and Σ_t b_it ([B, d])."""
    rows = grad_tr.shape[0]
    g = _tokens(grad_tr, n_feature_dims)
    g = g.reshape(rows, -1, g.shape[-1])
    out = {}
    if has_weight:
        out["weight"] = (g * _tokens(x_hat_tr, n_feature_dims).reshape(g.shape)).sum(1).square().sum(1)
    if has_bias:
        out["bias"] = g.sum(1).square().sum(1)
    return out


def affine_path(act_tr, n_feature_dims) -> LayerPath:
    return LayerPath("explicit", 4.0 * act_tr.numel())


def accum(t: torch.Tensor) -> torch.Tensor:
    """Norm statistics in fp32 (fp64 for an fp64 model), as the layers themselves compute them."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
