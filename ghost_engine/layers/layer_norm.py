"""nn.LayerNorm: y = (x - mean) / sqrt(var + eps) ⊙ weight + bias over the normalized dims.

A module of another class whose only parameter is ``weight`` and whose forward is weight ⊙ x̂ with x̂ the
mean-centred, variance-normalised last dimension (Cohere's CohereLayerNorm, also with a weight per head for
its q/k norms) is recognised by ``CenteredNormRule.recognise``: its forward is run on a random input with a
random weight and compared with the formula, for each epsilon attribute it has.
"""
import functools

import torch
from torch import nn
from torch.nn import functional as F

from ghost_engine.layers import (EPS_ATTRIBUTES, NORM_PROBE_ROWS, NORM_PROBE_RTOL, module_input, probe_forward,
                                 probe_generator, register_layer, register_recogniser, same_values)
from ghost_engine.layers._affine import (accum, affine_path, affine_per_sample_dots, affine_per_sample_sq_norms,
                                         affine_val_grads)


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
    def path(module, act_tr, act_v, own_only):
        return affine_path(act_tr, len(module.normalized_shape))


def _centred(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(accum(x), x.shape[-1:], None, None, eps)


@register_recogniser
class CenteredNormRule:
    """weight ⊙ (x - mean) / sqrt(var + eps) over the last dimension, weight over the trailing weight.dim()
    dimensions (verified); eps read from ``eps_attr``. Normalised in fp32 and multiplied in fp32, as the
    recognised classes do."""

    eps_attr = None

    @classmethod
    def x_hat(cls, module, x):
        return _centred(x, getattr(module, cls.eps_attr))

    @classmethod
    def capture(cls, module, args, kwargs, output, rows):
        return module_input(args, kwargs, "hidden_states" if "hidden_states" in kwargs else "input"), None

    @classmethod
    def val_grads(cls, module, act_v, grad_v):
        return affine_val_grads(cls.x_hat(module, act_v), accum(grad_v), module.weight.dim(), True, False,
                                module.weight.shape)

    @classmethod
    def per_sample_dots(cls, module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        return affine_per_sample_dots(cls.x_hat(module, act_tr), accum(grad_tr), module.weight.dim(), val_totals)

    @classmethod
    def per_sample_sq_norms(cls, module, act_tr, grad_tr):
        return affine_per_sample_sq_norms(cls.x_hat(module, act_tr), accum(grad_tr), module.weight.dim(), True, False)

    @classmethod
    def path(cls, module, act_tr, act_v, own_only):
        return affine_path(act_tr, module.weight.dim())

    @classmethod
    def recognise(cls, module):
        params = dict(module.named_parameters())
        weight = params.get("weight")
        if (len(params) != 1 or weight is None or weight.dim() == 0 or not weight.dtype.is_floating_point
                or weight.is_meta or weight.shape[-1] < 2):
            return None
        eps_attrs = [a for a in EPS_ATTRIBUTES if type(getattr(module, a, None)) in (float, int)]
        gen = probe_generator()
        w = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
        x = torch.randn((NORM_PROBE_ROWS, *weight.shape), generator=gen, dtype=torch.float64) + 3.0  # a mean to remove
        got = probe_forward(module, {"weight": w}, x)
        for eps_attr in eps_attrs:
            eps = float(getattr(module, eps_attr))
            if not same_values(got, _centred(x, eps) * w, NORM_PROBE_RTOL):
                continue
            if eps > 0:  # rows whose variance is about eps, where x̂ depends on eps as much as on x
                x_eps = x[: NORM_PROBE_ROWS // 2] * eps ** 0.5
                got_eps = probe_forward(module, {"weight": w}, x_eps)
                if not same_values(got_eps, _centred(x_eps, eps) * w, NORM_PROBE_RTOL):
                    continue
            return _rule(eps_attr)
        return None


@functools.cache
def _rule(eps_attr: str):
    return type(f"CenteredNormRule[{eps_attr}]", (CenteredNormRule,), {"eps_attr": eps_attr})
