"""The cost floor of an exact engine (docs/METHOD.md section 3) and flop counting of whole steps.

Relative to Regular training on the B training rows alone, an exact engine costs at least
(B+Bv)/B of Regular's flops for the extra rows plus, per linear map (d -> p),
2·N·min(Nv·(d+p), d·p) flops for the per-sample dot products (N, Nv: training and validation tokens).
"""
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ghost_engine.layers.linear import Conv1D


def linear_shapes(model: nn.Module) -> list:
    """(d_in, p_out) of every trainable linear map of the model (Linear and Conv1D)."""
    shapes = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            shapes.append((module.in_features, module.out_features))
        elif Conv1D is not None and isinstance(module, Conv1D) and module.weight.requires_grad:
            shapes.append(tuple(module.weight.shape))
    return shapes


def dot_product_floor_flops(model: nn.Module, train_tokens: int, val_tokens: int) -> float:
    """Σ over linear maps of 2·N·min(Nv·(d+p), d·p)."""
    return sum(2.0 * train_tokens * min(val_tokens * (d + p), d * p) for d, p in linear_shapes(model))


def analytic_floor_ratio(model: nn.Module, batch_size: int, val_batch_size: int, seq_len: int,
                         regular_step_flops: float) -> float:
    """Floor of GradDotProd's flops over Regular's, given Regular's counted flops on the B training rows."""
    extra_rows = (batch_size + val_batch_size) / batch_size * regular_step_flops
    dots = dot_product_floor_flops(model, batch_size * seq_len, val_batch_size * seq_len)
    return (extra_rows + dots) / regular_step_flops


def count_step_flops(fn) -> int:
    """Flops that FlopCounterMode counts while running ``fn()`` (matmuls, attention, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
