"""nn.Embedding: the weight gradient of sample i is a scatter of its output gradients into the
rows of the tokens it looked up, so <G_i, X> only needs X's rows at sample i's tokens.

Positional embeddings looked up once for the whole batch (ids of shape [1, T], broadcast over the
rows by the model's addition) are expanded to one row per sample at capture time: the values are
unchanged, but the gradient of the expanded output is per sample.
"""
import torch
from torch import nn

from ghost_engine.layers import LayerPath, accum_dtype, module_input, register_layer, row_dot


def _check_supported(module: nn.Embedding):
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise ValueError(f"nn.Embedding with max_norm, scale_grad_by_freq or sparse=True is not supported "
                         f"({module}): its per-sample gradients depend on the rest of the batch")


def _keep(module, ids: torch.Tensor) -> torch.Tensor:
    """Mask of looked-up positions that receive gradient (padding_idx rows never do)."""
    if module.padding_idx is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return ids != module.padding_idx


@register_layer(nn.Embedding)
class EmbeddingRule:
    row_sparse = True  # validation gradients live on the looked-up rows only: can open a tie (engine)
    check_supported = staticmethod(_check_supported)

    @staticmethod
    def capture(module, args, kwargs, output, rows):
        ids = module_input(args, kwargs)
        if ids.shape[0] == rows or ids.dim() == 0:
            return ids, None
        if ids.shape[0] == 1 and output.shape[0] == 1:  # broadcast over the batch, e.g. GPT-2 position ids
            return ids.expand(rows, *ids.shape[1:]), output.expand(rows, *output.shape[1:])
        raise ValueError(f"embedding input has {ids.shape[0]} rows but the batch has {rows}; "
                         "only per-row ids or ids shared by the whole batch ([1, ...]) are supported")

    @staticmethod
    def val_grads(module, act_v, grad_v):
        """The dense weight-shaped validation gradient: a scatter-add of the output gradients (static
        shapes: padding_idx positions add zeros instead of being filtered out)."""
        ids = act_v.reshape(-1)
        grads = grad_v.reshape(ids.shape[0], -1).to(accum_dtype(grad_v))
        if module.padding_idx is not None:
            grads = grads * _keep(module, ids)[:, None].to(grads.dtype)
        dense = torch.zeros(module.weight.shape, dtype=grads.dtype, device=grads.device)
        return {"weight": dense.index_add_(0, ids, grads)}

    @staticmethod
    def per_sample_dots(module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        return {"weight": _gather_dots(module, act_tr, grad_tr, val_totals["weight"])}

    @staticmethod
    def path(module, act_tr, act_v, own_only):
        return LayerPath("gather", 2.0 * grad_tr_numel(act_tr, module))


def grad_tr_numel(act_tr, module) -> int:
    return act_tr.numel() * module.embedding_dim


def _gather_dots(module, ids, grad, dense_val) -> torch.Tensor:
    """Σ_t b_it · X[id_it] per training row."""
    rows = ids.shape[0]
    flat_ids = ids.reshape(-1)
    picked = dense_val[flat_ids]  # [N, d]
    if module.padding_idx is not None:
        picked = picked * _keep(module, flat_ids)[:, None].to(picked.dtype)
    return row_dot(picked, grad, rows)
