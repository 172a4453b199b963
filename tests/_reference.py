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
