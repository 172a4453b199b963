"""RMSNorm: y = x / sqrt(mean(x²) + eps) ⊙ weight (torch.nn.RMSNorm and Hugging Face's LlamaRMSNorm).

LlamaRMSNorm normalises in fp32 and casts x̂ back to the input dtype before the weight multiply;
the rule reproduces that rounding so the per-sample gradients match the layer's own.
"""
import torch
from torch import nn

from ghost_engine.layers import module_input, register_layer
from ghost_engine.layers._affine import accum, affine_path, affine_per_sample_dots, affine_val_grads

try:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
except ImportError:
    LlamaRMSNorm = None


def _normalize(x: torch.Tensor, n_dims: int, eps: float) -> torch.Tensor:
    x = accum(x)
    dims = tuple(range(-n_dims, 0))
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


def _torch_x_hat(module: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    return _normalize(x, len(module.normalized_shape), eps)


def _llama_x_hat(module, x: torch.Tensor) -> torch.Tensor:
    return accum(_normalize(x, 1, module.variance_epsilon).to(x.dtype))


class _RMSNormRule:
    x_hat = None  # set by subclasses
    n_dims = None

    @classmethod
    def capture(cls, module, args, kwargs, output, rows):
        return module_input(args, kwargs, "hidden_states" if "hidden_states" in kwargs else "input"), None

    @classmethod
    def val_grads(cls, module, act_v, grad_v):
        return affine_val_grads(cls.x_hat(module, act_v), accum(grad_v), cls.n_dims(module),
                                module.weight is not None, False, module.weight.shape)

    @classmethod
    def per_sample_dots(cls, module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        return affine_per_sample_dots(cls.x_hat(module, act_tr), accum(grad_tr), cls.n_dims(module), val_totals)

    @classmethod
    def path(cls, module, act_tr, act_v, own_only):
        return affine_path(act_tr, cls.n_dims(module))


@register_layer(nn.RMSNorm)
class TorchRMSNormRule(_RMSNormRule):
    x_hat = staticmethod(_torch_x_hat)
    n_dims = staticmethod(lambda module: len(module.normalized_shape))


if LlamaRMSNorm is not None:

    @register_layer(LlamaRMSNorm)
    class LlamaRMSNormRule(_RMSNormRule):
        x_hat = staticmethod(_llama_x_hat)
        n_dims = staticmethod(lambda module: 1)
