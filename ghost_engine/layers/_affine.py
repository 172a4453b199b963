"""Shared math of element-wise affine layers y = x̂ ⊙ weight (+ bias), used by the norm layers.

Their per-sample gradients are parameter-sized and cheap ([B, d]): G_i(weight) = Σ_t b_it ⊙ x̂_it,
G_i(bias) = Σ_t b_it. They are formed explicitly, in fp32 (or fp64 for an fp64 model).
"""
import torch

from ghost_engine.layers import (EPS_ATTRIBUTES, NORM_PROBE_ROWS, NORM_PROBE_RTOL, LayerPath, module_input,
                                 probe_forward, probe_generator, row_sum, same_values, to_dtype)


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


def affine_per_sample_grads(x_hat_tr, grad_tr, n_feature_dims, has_weight, has_bias):
    """The explicit per-sample gradients Σ_t b_it ⊙ x̂_it and Σ_t b_it, [B, d] (d: the features, flattened)."""
    rows = grad_tr.shape[0]
    g = _tokens(grad_tr, n_feature_dims)
    g = g.reshape(rows, -1, g.shape[-1])
    out = {}
    if has_weight:
        out["weight"] = (g * _tokens(x_hat_tr, n_feature_dims).reshape(g.shape)).sum(1)
    if has_bias:
        out["bias"] = g.sum(1)
    return out


def affine_per_sample_sq_norms(x_hat_tr, grad_tr, n_feature_dims, has_weight, has_bias):
    """||G_i||² per row from the explicit per-sample gradients."""
    grads = affine_per_sample_grads(x_hat_tr, grad_tr, n_feature_dims, has_weight, has_bias)
    return {name: g.square().sum(1) for name, g in grads.items()}


def affine_path(act_tr, n_feature_dims) -> LayerPath:
    return LayerPath("explicit", 4.0 * act_tr.numel())


def accum(t: torch.Tensor) -> torch.Tensor:
    """Norm statistics in fp32 (fp64 for an fp64 model), as the layers themselves compute them."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class AffineNormRule:
    """The rule of a norm y = x̂ ⊙ f(weight) (+ bias): the weight's gradient is Σ_t b_t ⊙ x̂_t whatever f adds or
    scales, the bias's Σ_t b_t. Subclasses define ``x_hat(module, x)``, ``n_dims(module)`` and ``has_bias``."""

    has_bias = False  # the module has a bias added after the weight

    @classmethod
    def capture(cls, module, args, kwargs, output, rows):
        return module_input(args, kwargs, "hidden_states" if "hidden_states" in kwargs else "input"), None

    @classmethod
    def val_grads(cls, module, act_v, grad_v):
        return affine_val_grads(cls.x_hat(module, act_v), accum(grad_v), cls.n_dims(module),
                                module.weight is not None, cls.has_bias, module.weight.shape)

    @classmethod
    def per_sample_dots(cls, module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        return affine_per_sample_dots(cls.x_hat(module, act_tr), accum(grad_tr), cls.n_dims(module), val_totals)

    @classmethod
    def per_sample_sq_norms(cls, module, act_tr, grad_tr):
        return affine_per_sample_sq_norms(cls.x_hat(module, act_tr), accum(grad_tr), cls.n_dims(module),
                                          module.weight is not None, cls.has_bias)

    @classmethod
    def per_sample_grads(cls, module, act_tr, grad_tr):
        return affine_per_sample_grads(cls.x_hat(module, act_tr), accum(grad_tr), cls.n_dims(module),
                                       module.weight is not None, cls.has_bias)

    @classmethod
    def path(cls, module, act_tr, act_v, own_only):
        return affine_path(act_tr, cls.n_dims(module))


def norm_probe(module, shift: float = 0.0, names: tuple = ("weight",)):
    """For a module that may be a norm with parameters `names` (``weight`` first): (eps attribute names,
    {name: random float64 tensor of the weight's shape}, probe input x [NORM_PROBE_ROWS, *weight.shape] + shift),
    or None when its parameters are not `names`, all floating and of the weight's shape, or it has no epsilon
    attribute."""
    params = dict(module.named_parameters())
    weight = params.get("weight")
    if (set(params) != set(names) or weight.dim() == 0 or weight.is_meta
            or any(p.shape != weight.shape or not p.dtype.is_floating_point for p in params.values())):
        return None
    eps_attrs = [a for a in EPS_ATTRIBUTES if type(getattr(module, a, None)) in (float, int)]
    if not eps_attrs:
        return None
    gen = probe_generator()
    randoms = {name: torch.randn(weight.shape, generator=gen, dtype=torch.float64) for name in names}
    x = torch.randn((NORM_PROBE_ROWS, *weight.shape), generator=gen, dtype=torch.float64) + shift
    return eps_attrs, randoms, x


def computes(module, params, x, eps: float, formula) -> bool:
    """Whether the module's forward with `params` (name -> tensor) in place of its parameters equals formula(x)
    on x and, for eps > 0, on half the rows scaled to a mean square (or variance) about eps (where x̂ depends on
    eps as much as on x, so a wrong epsilon shows)."""
    inputs = [x] + ([x[: NORM_PROBE_ROWS // 2] * eps ** 0.5] if eps > 0 else [])
    return all(same_values(probe_forward(module, params, xi), formula(xi), NORM_PROBE_RTOL) for xi in inputs)
