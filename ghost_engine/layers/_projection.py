"""The projection maths a layer rule uses for its per-sample projected gradients (ghost_engine.projection says
what they are). `mats`: a parameter's projections as the engine holds them, transposed: (P_rᵀ, P_cᵀ) or (Pᵀ,),
each [n, k] in the accumulation dtype on the model's device, None for a side kept whole.
"""
import torch

from ghost_engine.layers import accum_dtype, to_dtype


def apply_side(x: torch.Tensor, p_t) -> torch.Tensor:
    """x [..., n] · Pᵀ (p_t = Pᵀ [n, k]); x itself when the side is kept whole (None)."""
    return x if p_t is None else x @ p_t


def outer_projection(u: torch.Tensor, v: torch.Tensor, mats: tuple, rows: int) -> torch.Tensor:
    """Π_i = Σ_t (P_r u_it)(P_c v_it)ᵀ, flattened: [rows, k_r·k_c] (u: [rows·M, r] or [rows, M, r]; v alike)."""
    dtype = accum_dtype(u)
    pu = apply_side(to_dtype(u, dtype).reshape(rows, -1, u.shape[-1]), mats[0])
    pv = apply_side(to_dtype(v, dtype).reshape(rows, -1, v.shape[-1]), mats[1])
    return torch.bmm(pu.transpose(1, 2), pv).reshape(rows, -1)


def gathered_outer_projection(ids: torch.Tensor, v: torch.Tensor, mats: tuple, n_ids: int) -> torch.Tensor:
    """Π_i for G_i = Σ_t e_{id_t} v_itᵀ (an embedding; v zero where nothing is looked up): P_r e_id is row id of
    P_rᵀ, gathered. ids [rows, T], v [rows, T, c], n_ids the vocabulary (for a side kept whole)."""
    rows, dtype = ids.shape[0], accum_dtype(v)
    pv = apply_side(to_dtype(v, dtype).reshape(rows, -1, v.shape[-1]), mats[1])
    flat = ids.reshape(-1)
    pu = (torch.nn.functional.one_hot(flat, n_ids).to(dtype) if mats[0] is None else mats[0][flat])
    return torch.bmm(pu.reshape(rows, -1, pu.shape[-1]).transpose(1, 2), pv).reshape(rows, -1)


def vector_projection(g: torch.Tensor, mats: tuple) -> torch.Tensor:
    """Π_i = P · vec(G_i) for explicit per-sample gradients g [rows, ...]: [rows, k]."""
    return apply_side(g.reshape(g.shape[0], -1), mats[0])


def dense_projection(total: torch.Tensor, mats: tuple, shape: tuple) -> torch.Tensor:
    """The projection of one dense gradient in the parameter's layout (a validation gradient): [k]."""
    m = to_dtype(total, accum_dtype(total)).reshape(shape)
    if len(shape) == 1:
        return apply_side(m, mats[0])
    left = m if mats[0] is None else mats[0].t() @ m
    return apply_side(left, mats[1]).reshape(-1)


