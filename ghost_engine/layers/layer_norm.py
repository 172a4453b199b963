"""nn.LayerNorm: y = (x - mean) / sqrt(var + eps) ⊙ weight + bias over the normalized dims.

Two other forms are recognised by what their forward computes, run on a random input with random parameters
and compared with the formula for each epsilon attribute the module has:
- ``CenteredNormRule``: the only parameter is ``weight`` and the forward is weight ⊙ x̂ with x̂ the
  mean-centred, variance-normalised last dimension (Cohere's CohereLayerNorm, also with a weight per head
  for its q/k norms);
- ``OffsetLayerNormRule``: the parameters are ``weight`` and ``bias`` and the forward is x̂ ⊙ (c + weight) + bias
  over the weight's dimensions, c = 0 or 1 (Nemotron's NemotronLayerNorm1P, an nn.LayerNorm subclass with
  its own forward: ``F.layer_norm(x, shape, weight + 1, bias, eps)``).
Since y is x̂ ⊙ (c + weight) + bias, the weight's gradient is Σ_t b_t ⊙ x̂_t whatever c is, the bias's Σ_t b_t.
"""
import functools

import torch
from torch import nn
from torch.nn import functional as F

from ghost_engine.layers import module_input, register_layer, register_recogniser
from ghost_engine.layers._affine import (AffineNormRule, accum, affine_path, affine_per_sample_dots,
                                         affine_per_sample_grads, affine_per_sample_sq_norms, affine_val_grads,
                                         computes, norm_probe)


def _x_hat(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(accum(x), module.normalized_shape, None, None, module.eps)


@register_layer(nn.LayerNorm)
class LayerNormRule:
    @staticmethod
    def capture(module, args, kwargs, output, rows):
        return module_input(args, kwargs), None

    @staticmethod
    def val_grads(module, act_v, grad_v):
        return affine_val_grads(_x_hat(module, act_v), accum(grad_v), len(module.normalized_shape),
                                module.weight is not None, module.bias is not None, module.normalized_shape)

    @staticmethod
    def per_sample_dots(module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        return affine_per_sample_dots(_x_hat(module, act_tr), accum(grad_tr), len(module.normalized_shape),
                                      val_totals)

    @staticmethod
    def per_sample_sq_norms(module, act_tr, grad_tr):
        return affine_per_sample_sq_norms(_x_hat(module, act_tr), accum(grad_tr), len(module.normalized_shape),
                                          module.weight is not None, module.bias is not None)

    @staticmethod
    def per_sample_grads(module, act_tr, grad_tr):
        return affine_per_sample_grads(_x_hat(module, act_tr), accum(grad_tr), len(module.normalized_shape),
                                       module.weight is not None, module.bias is not None)

    @staticmethod
    def path(module, act_tr, act_v, own_only):
        return affine_path(act_tr, len(module.normalized_shape))


def _centred(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(accum(x), x.shape[-1:], None, None, eps)


@register_recogniser
class CenteredNormRule(AffineNormRule):
    """weight ⊙ (x - mean) / sqrt(var + eps) over the last dimension, weight over the trailing weight.dim()
    dimensions (verified); eps read from ``eps_attr``. Normalised in fp32 and multiplied in fp32, as the
    recognised classes do."""

    eps_attr = None
    n_dims = staticmethod(lambda module: module.weight.dim())

    @classmethod
    def x_hat(cls, module, x):
        return _centred(x, getattr(module, cls.eps_attr))

    @classmethod
    def recognise(cls, module):
        probe = norm_probe(module, shift=3.0)  # a mean to remove
        if probe is None or module.weight.shape[-1] < 2:
            return None
        eps_attrs, params, x = probe
        w = params["weight"]
        for eps_attr in eps_attrs:
            eps = float(getattr(module, eps_attr))
            if computes(module, params, x, eps, lambda xi: _centred(xi, eps) * w):
                return _rule(CenteredNormRule, eps_attr)
        return None


@register_recogniser
class OffsetLayerNormRule(AffineNormRule):
    """x̂ ⊙ (c + weight) + bias, x̂ the layer norm over the weight's dimensions, c = 0 or 1 (verified); eps read
    from ``eps_attr``."""

    eps_attr = None
    has_bias = True
    n_dims = staticmethod(lambda module: module.weight.dim())

    @classmethod
    def x_hat(cls, module, x):
        return F.layer_norm(accum(x), module.weight.shape, None, None, getattr(module, cls.eps_attr))

    @classmethod
    def recognise(cls, module):
        probe = norm_probe(module, shift=3.0, names=("weight", "bias"))
        if probe is None:
            return None
        eps_attrs, params, x = probe
        w, b = params["weight"], params["bias"]
        for eps_attr in eps_attrs:
            eps = float(getattr(module, eps_attr))
            for offset in (0.0, 1.0):
                if computes(module, params, x, eps, lambda xi: F.layer_norm(xi, w.shape, offset + w, b, eps)):
                    return _rule(OffsetLayerNormRule, eps_attr)
        return None


@functools.cache
def _rule(base, eps_attr: str):
    """One rule class per recognised form (shared by every layer of that form)."""
    return type(f"{base.__name__}[{eps_attr}]", (base,), {"eps_attr": eps_attr})
