"""RMSNorm: y = x̂ ⊙ (c + weight), x̂ = x / sqrt(mean(x²) + eps) over the weight's dims, c = 0 or 1.

``torch.nn.RMSNorm`` is registered by type. Every model family's own RMSNorm class (Llama, Mistral, Qwen2,
Qwen3, Phi3, OLMo2: weight · x̂; Gemma, Gemma2, Gemma3: (1 + weight) · x̂) is recognised by what it computes:
``RMSNormRule.recognise`` runs the module's forward on a small random input with a random weight and accepts
the module only when the output matches the formula for one epsilon attribute (``eps``, ``variance_epsilon``
or ``epsilon``) and one c. Rows whose mean square is close to eps make a wrong epsilon visible.

Since y is x̂ ⊙ (c + weight), the weight's gradient is Σ_t b_t ⊙ x̂_t whatever c is. Half-precision layers
differ in where x̂ is rounded: Llama casts x̂ back to the input dtype before the weight multiply, Gemma and
OLMo2 multiply in fp32 and cast the product. The recogniser runs the forward in bfloat16 too and keeps the
rounding that reproduces it, so the per-sample gradients use the x̂ the layer used.
"""
import functools

import torch
from torch import nn

from ghost_engine.layers import probe_forward, register_layer, register_recogniser
from ghost_engine.layers._affine import AffineNormRule, accum, computes, norm_probe


def _normalize(x: torch.Tensor, n_dims: int, eps: float) -> torch.Tensor:
    x = accum(x)
    dims = tuple(range(-n_dims, 0))
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


@register_layer(nn.RMSNorm)
class TorchRMSNormRule(AffineNormRule):
    n_dims = staticmethod(lambda module: len(module.normalized_shape))

    @classmethod
    def x_hat(cls, module, x):
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return _normalize(x, len(module.normalized_shape), eps)


@register_recogniser
class RMSNormRule(AffineNormRule):
    """Any module whose only parameter is ``weight`` and whose forward is x̂ ⊙ (c + weight) (verified)."""

    eps_attr = None  # the module attribute holding epsilon
    round_x_hat = False  # x̂ is cast to the input dtype before the weight multiply (Llama)
    n_dims = staticmethod(lambda module: module.weight.dim())

    @classmethod
    def x_hat(cls, module, x):
        x_hat = _normalize(x, module.weight.dim(), getattr(module, cls.eps_attr))
        return accum(x_hat.to(x.dtype)) if cls.round_x_hat else x_hat

    @classmethod
    def recognise(cls, module):
        probe = norm_probe(module)
        if probe is None:
            return None
        eps_attrs, params, x = probe
        w = params["weight"]
        for eps_attr in eps_attrs:
            eps = float(getattr(module, eps_attr))
            for offset in (0.0, 1.0):
                if computes(module, params, x, eps, lambda xi: _normalize(xi, w.dim(), eps) * (offset + w)):
                    return _rule(eps_attr, _rounds_x_hat(module, x, w, eps, offset))
        return None


def _rounds_x_hat(module, x, w, eps, offset) -> bool:
    """Whether the layer rounds x̂ to the input dtype before multiplying by the weight: the rounding whose
    bfloat16 output is closer to the layer's own (False if the layer does not run in bfloat16)."""
    xb, wb = x.bfloat16(), w.bfloat16()
    got = probe_forward(module, {"weight": wb}, xb)
    if not torch.is_tensor(got) or got.shape != xb.shape:
        return False
    x_hat = _normalize(xb, w.dim(), eps).float()
    rounded = (offset + wb) * x_hat.bfloat16()  # Llama: weight * x̂.to(input_dtype)
    unrounded = (x_hat * (offset + wb.float())).bfloat16()  # Gemma, OLMo2: (x̂ * weight).to(input_dtype)
    return bool((got.float() - rounded.float()).abs().max() < (got.float() - unrounded.float()).abs().max())


@functools.cache
def _rule(eps_attr: str, round_x_hat: bool):
    """One rule class per recognised form (shared by every layer of that form)."""
    name = f"RMSNormRule[{eps_attr}{', rounded' if round_x_hat else ''}]"
    return type(name, (RMSNormRule,), {"eps_attr": eps_attr, "round_x_hat": round_x_hat})
