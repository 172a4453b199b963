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
