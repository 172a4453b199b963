"""Independent ground truth for the engine tests: float64 per-sample gradients from torch.func."""
from torch.func import functional_call, grad, vmap


def _loss_fn(model, task):
    buffers = dict(model.named_buffers())

    def loss(params, x, y):
        if x.is_floating_point():  # feature inputs follow the float64 reference model
            x = x.double()
        return functional_call(model, (params, buffers), args=(), kwargs={"input_ids": x, "labels": y}).loss

    return loss


def reference_dot_products(model, X_train, Y_train, X_val, Y_val, task="causal_lm"):
    """{param name: [B] <grad l_i, grad L_val>} with l_i the model's own loss on row i alone."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    loss = _loss_fn(model, task)
    per_sample = vmap(grad(lambda p, x, y: loss(p, x[None], y[None])), in_dims=(None, 0, 0))(params, X_train, Y_train)
    val_grad = grad(loss)(params, X_val, Y_val)
    return {n: per_sample[n].flatten(1) @ val_grad[n].flatten() for n in params}


def reference_train_grad(model, X_train, Y_train, task="causal_lm"):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return grad(_loss_fn(model, task))(params, X_train, Y_train)


def app_first_step_reference(model, data_dir, seed, batch_size, seq_len, val_rows):
    """What the training app must record at step 1 (initial weights, float64): each training row's
    <grad l_i, grad L_val> by plain autograd, one row at a time, its loss, and the validation loss."""
    import torch
    from pile_tools.reader import PileReader

    params = [p for p in model.parameters() if p.requires_grad]
    X_train = torch.from_numpy(PileReader(data_dir, split="train", seed=seed).get_batch(
        1, batch_size, seq_len).tokens[:, :seq_len])
    X_val = torch.from_numpy(PileReader(data_dir, split="validation", seed=seed).fixed_batch(
        val_rows, seq_len).tokens[:, :seq_len])

    def grad_and_loss(X):
        loss = model(input_ids=X, labels=X).loss
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]), loss.item()

    val_grad, val_loss = grad_and_loss(X_val)
    per_sample = [grad_and_loss(X_train[i:i + 1]) for i in range(batch_size)]
    dots = torch.stack([g @ val_grad for g, _ in per_sample]).numpy()
    return dots, [loss for _, loss in per_sample], val_loss


def as_recorded_at_step_1(expected, run, eps=1e-8):
    """First-order dot products `expected` of step 1 as the app recorded them: unchanged under first_order;
    under adamw (its default under AdamW) times lr/eps, since before AdamW's first step v_0 = 0 and D = lr/eps
    for every weight (`eps`: the app's AdamW's)."""
    if run.value == "first_order":
        return expected
    assert run.value == "adamw", run.value
    return expected * run.columns["lr"][run.columns["step"] == 1][0] / eps


# ---- value estimators besides the first-order dot product (docs/METHOD.md section 2.1), written plainly


def reference_grads(model, X_train, Y_train, X_val, Y_val, task="causal_lm"):
    """({param name: [B, *shape]} per-sample gradients of l_i, {param name: gradient of L_val}), float64."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    loss = _loss_fn(model, task)
    per_sample = vmap(grad(lambda p, x, y: loss(p, x[None], y[None])), in_dims=(None, 0, 0))(params, X_train, Y_train)
    return per_sample, grad(loss)(params, X_val, Y_val)


def adamw_sensitivity(optimizer, named_params):
    """{name: D} from the optimizer's real state, for its coming step t = step + 1 with v held at v_{t-1}:
    AdamW's update is -lr·wd·θ - lr/(1-β1^t) · (β1·m + (1-β1)·g) / (sqrt(v)/sqrt(1-β2^t) + eps), whose derivative
    with respect to g is -D with D = lr·(1-β1)/(1-β1^t) / (sqrt(v)/sqrt(1-β2^t) + eps). v = 0 before any step."""
    import math

    import torch

    out = {}
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            name = next(n for n, q in named_params.items() if q is p)
            state = optimizer.state.get(p, {})
            t = int(state["step"]) + 1 if "step" in state else 1
            v = state["exp_avg_sq"].double() if "exp_avg_sq" in state else torch.zeros(p.shape, dtype=torch.float64)
            out[name] = group["lr"] * (1 - beta1) / (1 - beta1 ** t) / (v.sqrt() / math.sqrt(1 - beta2 ** t)
                                                                        + group["eps"])
    return out


def reference_adamw_values(model, X_train, Y_train, X_val, Y_val, sensitivity, task="causal_lm"):
    """{param name: [B] <D ⊙ grad L_val, grad l_i>} with D from adamw_sensitivity."""
    per_sample, val_grad = reference_grads(model, X_train, Y_train, X_val, Y_val, task)
    return {n: per_sample[n].flatten(1) @ (sensitivity[n].double() * val_grad[n]).flatten() for n in per_sample}


def reference_cosine_values(model, X_train, Y_train, X_val, Y_val, task="causal_lm"):
    """({param name: [B] <g_i(param), G(param)> / (||g_i|| ||G||)}, [B] ||g_i||, ||G||) with g_i = grad l_i and
    G = grad L_val over all trainable parameters, from dense per-sample gradients."""
    per_sample, val_grad = reference_grads(model, X_train, Y_train, X_val, Y_val, task)
    norms = sum(g.flatten(1).square().sum(1) for g in per_sample.values()).sqrt()
    val_norm = sum(g.square().sum() for g in val_grad.values()).sqrt()
    values = {n: per_sample[n].flatten(1) @ val_grad[n].flatten() / (norms * val_norm) for n in per_sample}
    return values, norms, val_norm


# ---- the update-aware estimators (second_order, adamw_vt, midpoint): the real torch optimizer's step on a
# float64 copy, differentiated by central differences, and validation gradients by autograd


def float64_copy(model, optimizer):
    """(model, optimizer) in float64: the same parameter groups and hyper-parameters, the state cast."""
    import copy

    model64 = copy.deepcopy(model).double()
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params64 = list(model64.parameters())
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [params64[index[id(p)]] for p in group["params"]]} for group in optimizer.param_groups]
    optimizer64 = type(optimizer)(groups)
    optimizer64.load_state_dict(optimizer.state_dict())
    return model64, optimizer64


def stepped(model, optimizer, grads):
    """{name: θ_{t+1}}: the parameters after the optimizer's real step with .grad = grads, on copies."""
    import copy

    model, optimizer = copy.deepcopy((model, optimizer))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = grads[name].clone()
    optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def val_grad_at(model, params, X_val, Y_val, task="causal_lm"):
    return grad(_loss_fn(model, task))(params, X_val, Y_val)


def batch_gradient(model, X_train, Y_train, micro_batches=1, task="causal_lm"):
    """g_B as .grad holds it: the mean over micro-batches of each micro-batch's mean loss gradient."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    parts = [grad(_loss_fn(model, task))(params, x, y)
             for x, y in zip(X_train.chunk(micro_batches), Y_train.chunk(micro_batches))]
    return {n: sum(part[n] for part in parts) / micro_batches for n in params}


def update_derivative(model, optimizer, g, direction, rel_step=1e-6):
    """{name: dθ_{t+1}(g + ε·direction)/dε at 0}, central differences of the real optimizer step."""
    import math

    scale = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
    size = math.sqrt(sum(float(v.square().sum()) for v in direction.values()))
    eps = rel_step * scale / size
    plus = stepped(model, optimizer, {n: g[n] + eps * direction[n] for n in g})
    minus = stepped(model, optimizer, {n: g[n] - eps * direction[n] for n in g})
    return {n: (plus[n] - minus[n]) / (2 * eps) for n in g}


def reference_update_values(model, optimizer, X_train, Y_train, X_val, Y_val, value, micro_batches=1,
                            task="causal_lm"):
    """{param name: [B] <grad l_i, u>}, phi_i = w_i·<grad l_i, u> (docs/METHOD.md section 2.1):
        second_order  lr ⊙ (grad L_val - 1/2 H_val (lr ⊙ g_B)),  H_val·v by central differences of grad L_val
        adamw_vt      -(dθ_{t+1}/dg at g_B)^T grad L_val,        the derivative along each grad l_i
        midpoint      -(dθ_{t+1}/dg at g_B/2)^T grad L_val(θ_{t+1}(g_B/2))
    `model` and `optimizer` are the run's; the reference works on float64 copies."""
    import torch

    model, optimizer = float64_copy(model, optimizer)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    per_sample, val_grad = reference_grads(model, X_train, Y_train, X_val, Y_val, task)
    g_batch = batch_gradient(model, X_train, Y_train, micro_batches, task)
    rows = X_train.shape[0]
    if value == "second_order":
        lr = {n: next(group["lr"] for group in optimizer.param_groups if any(p is q for q in group["params"]))
              for n, p in model.named_parameters() if p.requires_grad}
        v = {n: lr[n] * g_batch[n] for n in params}
        eps = 1e-4 / max(float(t.abs().max()) for t in v.values())
        plus = val_grad_at(model, {n: params[n] + eps * v[n] for n in params}, X_val, Y_val, task)
        minus = val_grad_at(model, {n: params[n] - eps * v[n] for n in params}, X_val, Y_val, task)
        u = {n: lr[n] * (val_grad[n] - 0.5 * (plus[n] - minus[n]) / (2 * eps)) for n in params}
        return {n: per_sample[n].flatten(1) @ u[n].flatten() for n in params}
    if value == "midpoint":
        g_batch = {n: t / 2 for n, t in g_batch.items()}
        val_grad = val_grad_at(model, stepped(model, optimizer, g_batch), X_val, Y_val, task)
    out = {n: torch.zeros(rows, dtype=torch.float64) for n in params}
    for i in range(rows):
        moved = update_derivative(model, optimizer, g_batch, {n: per_sample[n][i] for n in params})
        for n in params:
            out[n][i] = -(moved[n] * val_grad[n]).sum()
    return out
