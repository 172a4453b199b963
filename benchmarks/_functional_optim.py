"""One optimizer step as a pure function of (parameters, optimizer state, gradient), on flat vectors.

The fidelity harness (benchmarks/fidelity.py) needs the step the real run takes from one state, but
with the batch gradient replaced by the gradient of a subset of the batch, for hundreds of subsets at
once. Here the state of a `torch.optim.SGD` / `torch.optim.AdamW` is copied into flat float64 vectors
(one entry per parameter element, parameters in `model.parameters()` order) and the update is written
out as torch's single-tensor implementation writes it, with a leading batch dimension:

    SGD (momentum mu, dampening 0, weight decay lambda coupled):
        d = g + lambda*theta;  buf = d at the first step, mu*buf + d after;  theta' = theta - lr*buf
    AdamW (betas b1, b2, eps, decoupled weight decay lambda, t = the step being taken, 1-based):
        theta <- theta*(1 - lr*lambda)
        m = lerp(m_prev, g, 1 - b1);  v = b2*v_prev + (1 - b2)*g*g
        theta' = theta - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Gradient clipping (`clip_grad_norm_(max_norm)`) scales each row's gradient by
min(1, max_norm / (|g| + 1e-6)) before the step, as torch does. The tests check `functional_step`
against torch's own `optimizer.step()` to 1e-12 in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

OPTIMIZERS = ("sgd", "momentum", "adamw")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by total_norm + 1e-6


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer of the harness. AdamW follows the app (GradDotProd_LM/training.py): betas 0.9/0.95,
    weight decay 0.1 on matrices and embeddings only. SGD is plain (no weight decay)."""

    kind: str
    lr: float
    momentum: float = 0.9
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: Optional[float] = None  # max gradient norm; None: no clipping

    def __post_init__(self):
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.kind!r}: choose one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: must be > 0")

    @property
    def label(self) -> str:
        return f"{self.kind} lr={self.lr:g}" + (f" clip={self.clip:g}" if self.clip else "")


def build_torch_optimizer(spec: OptimizerSpec, params: list) -> torch.optim.Optimizer:
    """The torch optimizer the run trains with (single-tensor implementation: foreach=False)."""
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, foreach=False)
    if spec.kind == "momentum":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, foreach=False)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=spec.betas, eps=spec.eps,
                             foreach=False)


@dataclass
class FlatState:
    """The optimizer's state before step `step + 1`, flattened in `params` order (float64 [P] each)."""

    step: int  # steps already taken
    weight_decay: torch.Tensor  # per element
    momentum_buffer: Optional[torch.Tensor] = None  # momentum: None before the first step
    exp_avg: Optional[torch.Tensor] = None  # adamw
    exp_avg_sq: Optional[torch.Tensor] = None  # adamw


def capture_state(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, params: list) -> FlatState:
    """Copy `optimizer`'s state for `params` (the order of the flat vectors) into a FlatState."""
    decay, steps, buffers, exp_avgs, exp_avg_sqs = {}, set(), [], [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            decay[id(p)] = group.get("weight_decay", 0.0)
    for p in params:
        state = optimizer.state.get(p, {})
        if spec.kind == "momentum":
            buffers.append(state.get("momentum_buffer"))
        elif spec.kind == "adamw":
            steps.add(int(state["step"]) if "step" in state else 0)
            exp_avgs.append(state["exp_avg"].flatten() if state else torch.zeros(p.numel(), dtype=p.dtype))
            exp_avg_sqs.append(state["exp_avg_sq"].flatten() if state else torch.zeros(p.numel(), dtype=p.dtype))
    if len(steps) > 1:
        raise ValueError(f"parameters at different AdamW steps {sorted(steps)}: one step count is needed")
    weight_decay = torch.cat([torch.full((p.numel(),), float(decay[id(p)]), dtype=p.dtype) for p in params])
    flat = FlatState(step=steps.pop() if steps else 0, weight_decay=weight_decay)
    if spec.kind == "momentum" and any(b is not None for b in buffers):
        flat.momentum_buffer = torch.cat([b.flatten() for b in buffers]).clone()
    if spec.kind == "adamw":
        flat.exp_avg, flat.exp_avg_sq = torch.cat(exp_avgs).clone(), torch.cat(exp_avg_sqs).clone()
    return flat


def clip_rows(spec: OptimizerSpec, grad: torch.Tensor) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ applied to each row of grad [K, P] (or [P]) separately."""
    if spec.clip is None:
        return grad
    norm = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
    return grad * torch.clamp(spec.clip / (norm + CLIP_EPS), max=1.0)


def functional_step(spec: OptimizerSpec, state: FlatState, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """theta_{t+1} from theta [P] and gradients grad [K, P] (or [P]); `state` is not modified.

    Differentiable in `grad` (the harness takes derivatives of the update through it)."""
    grad = clip_rows(spec, grad)
    lr = spec.lr
    if spec.kind != "adamw":
        d = grad + state.weight_decay * theta if state.weight_decay.any() else grad
        if state.momentum_buffer is not None:
            d = spec.momentum * state.momentum_buffer + d
        return theta - lr * d
    beta1, beta2 = spec.betas
    t = state.step + 1
    decayed = theta * (1 - lr * state.weight_decay)
    exp_avg = torch.lerp(state.exp_avg.expand_as(grad), grad, 1 - beta1)
    exp_avg_sq = state.exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    bias_correction1 = 1 - beta1 ** t
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** t)
    denom = _sqrt(exp_avg_sq) / bias_correction2_sqrt + spec.eps
    return decayed - (lr / bias_correction1) * (exp_avg / denom)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) with derivative 0 instead of inf where v = 0 (there g = 0 too, so d v / d g = 0 and the
    derivative of the update is 0 * inf = nan with the plain sqrt)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), 0.0)


def adamw_fixed_state_jacobian(spec: OptimizerSpec, state: FlatState) -> torch.Tensor:
    """Elementwise d(theta_{t+1})/dg of AdamW with the second moment held at v_{t-1} (float64 [P]):

        -(lr / (1 - b1^t)) * (1 - b1) / (sqrt(v_{t-1}) / sqrt(1 - b2^t) + eps)

    (t the step being taken; bias corrections of step t)."""
    if spec.kind != "adamw":
        raise ValueError(f"the fixed-state Jacobian is AdamW's; the optimizer is {spec.kind}")
    beta1, beta2 = spec.betas
    t = state.step + 1
    denom = state.exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t) + spec.eps
    return -(spec.lr / (1 - beta1 ** t)) * (1 - beta1) / denom
