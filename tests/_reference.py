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
