"""ghost_engine.updates against the real torch.optim step: θ_{t+1}(g) equal to optimizer.step() with .grad = g,
and S(g) = -∂θ_{t+1}/∂g equal to central differences of that real step (float64)."""
import copy
import inspect

import pytest
import torch

from ghost_engine import updates

ADAM_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1),
    "adam-coupled-decay": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.3),
    "sgd-momentum-dampened-decay": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, dampening=0.2,
                                                              weight_decay=0.01),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.8, nesterov=True),
}
if ADAM_DECOUPLED:
    OPTIMIZERS["adam-decoupled-decay"] = lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05,
                                                                     decoupled_weight_decay=True)


def real_step(p, optimizer, g):
    p, optimizer = copy.deepcopy((p, optimizer))
    p.grad = g.clone()
    optimizer.step()
    return p.detach()


@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_and_sensitivity_match_the_real_optimizer(name, steps_before):
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(40, dtype=torch.float64, generator=gen))
    optimizer = OPTIMIZERS[name]([p])
    for _ in range(steps_before):
        p.grad = torch.randn(40, dtype=torch.float64, generator=gen)
        p.grad[:5] = 0  # elements that never had a gradient: v = 0 there
        optimizer.step()
    g = torch.randn(40, dtype=torch.float64, generator=gen)
    g[:3] = 0
    group = optimizer.param_groups[0]
    new, sensitivity = updates.step(optimizer, group, p, g)
    torch.testing.assert_close(new, real_step(p, optimizer, g), rtol=1e-12, atol=1e-14)
    adam = isinstance(optimizer, torch.optim.Adam)
    coupled = adam and group["weight_decay"] and not group.get("decoupled_weight_decay", False) and not isinstance(
        optimizer, torch.optim.AdamW)
    g_eff = g + group["weight_decay"] * p.detach() if coupled else g  # the gradient Adam's moments see
    for k in range(40):  # the Jacobian is diagonal: perturb one element at a time
        # Adam's step is smooth on the scale of |g'|; at g' = 0 with v = 0 it has a kink (|g'|/√v_t is ±1/√(1-β2)
        # on either side) and is linear only within |g'| << eps/√(1-β2): a much smaller step there
        kink = adam and g_eff[k] == 0
        eps = 1e-13 if kink else 1e-4 * max(abs(float(g_eff[k])), 1e-2)
        e = torch.zeros_like(g)
        e[k] = eps
        diff = (real_step(p, optimizer, g + e) - real_step(p, optimizer, g - e)) / (2 * eps)
        # truncation (relative) plus the differences' round-off (~1e-16 of θ ≈ 1, over 2·eps)
        assert abs(float(-diff[k] - sensitivity[k])) <= 1e-5 * abs(float(sensitivity[k])) + 1e-15 / eps, (k, name)
        off = diff.clone()
        off[k] = 0
        assert float(off.abs().max()) <= 1e-15 / eps
    assert torch.equal(updates.step(optimizer, group, p, g, update=False)[1], sensitivity)
    assert updates.step(optimizer, group, p, g, update=False)[0] is None


def test_unsupported_optimizers_are_named():
    p = torch.nn.Parameter(torch.zeros(3))
    for optimizer, match in ((torch.optim.RMSprop([p]), "got RMSprop"), (None, "got no optimizer"),
                             (torch.optim.AdamW([p], amsgrad=True), "amsgrad"),
                             (torch.optim.SGD([p], lr=0.1, maximize=True), "maximize")):
        with pytest.raises(ValueError, match=match):
            updates.check_supported(optimizer, "value='midpoint'")
