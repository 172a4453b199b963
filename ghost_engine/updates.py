"""The coming optimizer step of one parameter as a function of its gradient g: θ_{t+1}(g) and the
(diagonal) sensitivity S(g) = -∂θ_{t+1}/∂g, written out for torch.optim.SGD and torch.optim.Adam/AdamW
from their hyper-parameters and state. The engine's update-aware estimators (docs/METHOD.md section 2.1)
take dot products with S ⊙ (a validation gradient); nothing here changes the optimizer or the parameters.

Both follow torch.optim's single-tensor formulas exactly (the foreach and fused implementations compute
the same), for the step t = state["step"] + 1 about to be taken:

    SGD:   g' = g + wd·θ;  b = g' (first step) or μ·b + (1 - dampening)·g';  d = g' + μ·b (Nesterov) or b
           (d = g' without momentum);  θ_{t+1} = θ - lr·d
    Adam:  g' = g + wd·θ (Adam) or θ ← θ·(1 - lr·wd) (AdamW, decoupled);  m = β1·m + (1 - β1)·g';
           v = β2·v + (1 - β2)·g'²;  θ_{t+1} = θ - lr/(1 - β1^t) · m / (√v / √(1 - β2^t) + eps)
"""
import torch

# S for Adam: (lr/bc1)·[(1-β1)/den - m·(1-β2)·g' / (√bc2 · √v · den²)] with den = √v/√bc2 + eps. The second
# term is AdamW's saturation (a larger gradient also raises v). Where v = 0 the gradient is 0 and so is m
# (v_{t-1} = 0 means every earlier gradient was 0): the term is 0 there.


def check_supported(optimizer, what: str):
    """Raise a ValueError unless ``optimizer`` is an SGD or Adam/AdamW whose step this module writes out."""
    if isinstance(optimizer, torch.optim.Adam):  # torch.optim.AdamW is an Adam
        for group in optimizer.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError(f"{what} supports Adam/AdamW with amsgrad=False and maximize=False")
        return
    if isinstance(optimizer, torch.optim.SGD):
        if any(group.get("maximize") for group in optimizer.param_groups):
            raise ValueError(f"{what} supports SGD with maximize=False")
        return
    got = "no optimizer" if optimizer is None else type(optimizer).__name__
    raise ValueError(f"{what} needs the torch.optim.SGD, Adam or AdamW that steps the model, passed to "
                     f"attach(optimizer); got {got}")


def _decoupled(optimizer, group) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def _adam_terms(optimizer, group, p, g):
    """(θ after decoupled decay, m_t, v_t, g', lr/bc1, √bc2, den) in g's dtype and device."""
    state = optimizer.state.get(p, {})
    dtype, device = g.dtype, g.device
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    lr = torch.as_tensor(lr, dtype=dtype, device=device)
    theta = p.detach().to(dtype)
    if wd and _decoupled(optimizer, group):
        theta = theta * (1 - lr * wd)
    elif wd:
        g = g + wd * p.detach().to(dtype)
    # t as a tensor: fused/capturable Adam keep `step` on the device, and reading it would synchronise
    t = torch.as_tensor(state.get("step", 0.0)).to(device=device, dtype=dtype) + 1
    m = state["exp_avg"].detach().to(dtype) * beta1 if "exp_avg" in state else torch.zeros_like(g)
    v = state["exp_avg_sq"].detach().to(dtype) * beta2 if "exp_avg_sq" in state else torch.zeros_like(g)
    m = m + (1 - beta1) * g
    v = v + (1 - beta2) * g * g
    sqrt_bc2 = torch.sqrt(1 - beta2 ** t)
    den = v.sqrt() / sqrt_bc2 + eps
    return theta, m, v, g, lr / (1 - beta1 ** t), sqrt_bc2, den


def _sgd_direction(group, state, p, g):
    """(d, ∂d/∂g as a number) of torch.optim.SGD's step θ - lr·d."""
    momentum, dampening, nesterov, wd = (group["momentum"], group["dampening"], group["nesterov"],
                                         group["weight_decay"])
    if wd:
        g = g + wd * p.detach().to(g.dtype)
    if not momentum:
        return g, 1.0
    buf = state.get("momentum_buffer")
    if buf is None:  # the first step copies the gradient, without dampening
        buf, dbuf = g, 1.0
    else:
        buf, dbuf = momentum * buf.detach().to(g.dtype) + (1 - dampening) * g, 1.0 - dampening
    if nesterov:
        return g + momentum * buf, 1.0 + momentum * dbuf
    return buf, dbuf


def updated(optimizer, group, p, g: torch.Tensor) -> torch.Tensor:
    """θ_{t+1}: the parameter after the optimizer's coming step with gradient ``g`` (in g's dtype)."""
    if isinstance(optimizer, torch.optim.Adam):
        theta, m, _, _, step_size, _, den = _adam_terms(optimizer, group, p, g)
        return theta - step_size * m / den
    d, _ = _sgd_direction(group, optimizer.state.get(p, {}), p, g)
    return p.detach().to(g.dtype) - group["lr"] * d


def sensitivity(optimizer, group, p, g: torch.Tensor) -> torch.Tensor:
    """S(g) = -∂θ_{t+1}/∂g (elementwise; the update's Jacobian is diagonal), in g's dtype."""
    if isinstance(optimizer, torch.optim.Adam):
        _, m, v, g_eff, step_size, sqrt_bc2, den = _adam_terms(optimizer, group, p, g)
        root = v.sqrt()
        saturation = torch.where(root > 0, m * g_eff / torch.where(root > 0, root, 1.0), 0.0)
        beta1, beta2 = group["betas"]
        return step_size * ((1 - beta1) / den - (1 - beta2) * saturation / (sqrt_bc2 * den * den))
    _, slope = _sgd_direction(group, optimizer.state.get(p, {}), p, g)
    return torch.full_like(g, group["lr"] * slope)
