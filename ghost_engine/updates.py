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

from ghost_engine.model_map import is_dtensor


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


def step(optimizer, group, p, g: torch.Tensor, update: bool = True):
    """(θ_{t+1} or None, S): the parameter after the optimizer's coming step with gradient ``g`` (when
    ``update``) and the sensitivity S(g) = -∂θ_{t+1}/∂g (elementwise: the update's Jacobian is diagonal), both
    in g's dtype. The optimizer and ``p`` are not changed."""
    if isinstance(optimizer, torch.optim.Adam):
        return _adam(optimizer, group, p, g, update)
    return _sgd(group, optimizer.state.get(p, {}), p, g, update)


def _scalar(x):
    """A step count or hyper-parameter as a float when it lives on the CPU; a device tensor stays one (fused
    or capturable Adam keep `step` on the device, and reading it would synchronise)."""
    if torch.is_tensor(x) and x.device.type == "cpu":
        return float(x)
    return x


def _adam(optimizer, group, p, g, update):
    state = optimizer.state.get(p, {})
    (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
    lr = _scalar(group["lr"])
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    theta = p.detach()
    if wd and not decoupled:
        g = g + wd * theta.to(g.dtype)
    t = _scalar(state.get("step", 0.0)) + 1
    bc1, sqrt_bc2 = 1 - beta1 ** t, (1 - beta2 ** t) ** 0.5
    m = torch.lerp(state["exp_avg"].to(g.dtype), g, 1 - beta1) if "exp_avg" in state else g * (1 - beta1)
    v = state["exp_avg_sq"].to(g.dtype) * beta2 if "exp_avg_sq" in state else torch.zeros_like(g)
    root = v.addcmul_(g, g, value=1 - beta2).sqrt_()  # √v_t
    den = (root / sqrt_bc2).add_(eps)
    new = None
    if update:
        new = theta.to(g.dtype) * (1 - lr * wd) if wd and decoupled else theta.to(g.dtype).clone()
        new -= (lr / bc1) * m / den
    # S = lr/bc1 · [(1-β1) - (1-β2)·m·g' / (√bc2 · √v_t · den)] / den. The second term is AdamW's saturation
    # (a larger gradient also raises v_t); where v_t = 0 the gradient is 0 and so is m (v_{t-1} = 0 means every
    # earlier gradient was 0), and the clamp keeps that term 0 instead of 0/0.
    saturation = (m * g).div_(root.mul_(den).clamp_(min=torch.finfo(root.dtype).tiny))
    sensitivity = saturation.mul_(-(1 - beta2) / sqrt_bc2).add_(1 - beta1).div_(den).mul_(lr / bc1)
    return new, sensitivity


def fixed_state_sensitivity(optimizer, group, p, dtype, out=None) -> torch.Tensor:
    """D = -∂θ_{t+1}/∂g of Adam/AdamW with the second moment held at v_{t-1} (the "adamw" estimator's form):
    lr·(1-β1)/(1-β1^t) / (√v_{t-1}/√(1-β2^t) + eps), in `dtype`; v_{t-1} = 0 before the first step. Neither
    weight decay depends on g here (the coupled one shifts g by a constant). `out`: the previous step's D of
    this parameter, written over (no new allocation, on CPU no new pages to fault in). An FSDP2 parameter (a
    DTensor) gets a DTensor D of the same placements: each process computes its shard's."""
    state = optimizer.state.get(p, {})
    (beta1, beta2), eps = group["betas"], group["eps"]
    t = _scalar(state.get("step", 0.0)) + 1
    sqrt_bc2 = (1 - beta2 ** t) ** 0.5
    # D = c / (√v + eps·√bc2) with c = lr·(1-β1)/bc1·√bc2: three passes over v
    c = _scalar(group["lr"]) * (1 - beta1) / (1 - beta1 ** t) * sqrt_bc2
    v = state.get("exp_avg_sq")
    sharded = is_dtensor(p)  # an FSDP2 parameter: D of this process's shard, in the parameter's layout
    local = p.to_local() if sharded else p
    if sharded:
        v = None if v is None else v.to_local()
        out = None if out is None else out.to_local()
    reuse = out is not None and out.shape == local.shape and out.dtype == dtype and out.device == local.device
    root = out if reuse else torch.empty(local.shape, dtype=dtype, device=local.device)
    if v is not None:
        torch.sqrt(v.detach().to(device=local.device, dtype=dtype), out=root)
    else:
        root.zero_()
    root.add_(eps * sqrt_bc2).reciprocal_().mul_(c)
    if sharded:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(root, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return root


def _sgd(group, state, p, g, update):
    momentum, dampening, nesterov, wd = (group["momentum"], group["dampening"], group["nesterov"],
                                         group["weight_decay"])
    lr = _scalar(group["lr"])
    if wd:
        g = g + wd * p.detach().to(g.dtype)
    d, slope = g, 1.0
    if momentum:
        buf = state.get("momentum_buffer")
        if buf is None:  # the first step copies the gradient, without dampening
            buf, slope = g, 1.0
        else:
            buf, slope = momentum * buf.detach().to(g.dtype) + (1 - dampening) * g, 1.0 - dampening
        d, slope = (g + momentum * buf, 1.0 + momentum * slope) if nesterov else (buf, slope)
    new = p.detach().to(g.dtype) - lr * d if update else None
    return new, torch.full_like(g, 1.0) * (lr * slope)
