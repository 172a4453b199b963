"""nn.LayerNorm: y = (x - mean) / sqrt(var + eps) ⊙ weight + bias over the normalized dims."""
import torch
from torch import nn
from torch.nn import functional as F

from ghost_engine.layers import module_input, register_layer
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
