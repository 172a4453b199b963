"""nn.Linear and Hugging Face's Conv1D (GPT-2): s = a·M + bias with M = W.T (Linear) or W (Conv1D).

Per sample i the weight gradient is G_i = Σ_t a_it ⊗ b_it ([d, p] in "in x out" layout) and the
validation gradient is G_val = Σ_{v,u} a_vu ⊗ b_vu. Two exact ways to get <G_i, G_val>:
- gram:       Σ_{t,u} (a_it·a_u)(b_it·b_u)       ≈ 2·N·Nv·(d+p) flops
- projection: Σ_t a_it · (G_val b_it)             ≈ 2·N·d·p flops (G_val is formed anyway)
and the cheaper one runs. Per-sample weight gradients are never formed.
"""

import torch
from torch import nn

from ghost_engine.layers import (LayerPath, accum_dtype, matmul_accum, module_input, probe_forward, probe_generator,
                                register_layer, register_recogniser, row_dot, same_values, to_dtype)
from ghost_engine.layers._projection import outer_projection, vector_projection

try:  # Hugging Face GPT-2 uses a transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for the engine itself
    Conv1D = None

GRAM_CHUNK_ELEMENTS = 1 << 24  # bound on the [tokens, Nv] Gram blocks held at once


def _is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _weight_in_out(module: nn.Module, weight_like: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in [d_in, p_out] layout."""
    return weight_like if _is_conv1d(module) else weight_like.t()


def _gram_dots(a_tr, g_tr, a_v, g_v, rows: int) -> torch.Tensor:
    """Σ_{t,u} (a_t·a_u)(b_t·b_u) per training row; chunked over training tokens."""
    a, g = _flat(a_tr), _flat(g_tr)
    av, gv = _flat(a_v), _flat(g_v)
    tokens_per_row = a.shape[0] // rows
    chunk_rows = max(1, GRAM_CHUNK_ELEMENTS // max(1, tokens_per_row * av.shape[0]))
    if chunk_rows >= rows:  # one chunk: no slices, no concatenation (a copy)
        return row_dot(a @ av.t(), g @ gv.t(), rows)
    out = []
    for start in range(0, rows, chunk_rows):
        sl = slice(start * tokens_per_row, min(rows, start + chunk_rows) * tokens_per_row)
        chunk = min(rows, start + chunk_rows) - start
        out.append(row_dot(a[sl] @ av.t(), g[sl] @ gv.t(), chunk))  # Gram blocks [chunk tokens, Nv]
    return torch.cat(out)


def _projection_dots(a_tr, g_tr, val_in_out: torch.Tensor, rows: int) -> torch.Tensor:
    """Σ_t a_t · (M b_t) per training row, projecting onto the narrower side."""
    a, g = _flat(a_tr), _flat(g_tr)
    m = to_dtype(val_in_out, a.dtype)  # [d, p]
    if m.shape[0] <= m.shape[1]:
        return row_dot(g @ m.t(), a, rows)  # via [N, d]
    return row_dot(a @ m, g, rows)  # via [N, p]


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, ..., k] -> [rows, tokens, k] in the accumulation dtype."""
    return to_dtype(t.reshape(rows, -1, t.shape[-1]), accum_dtype(t))


def _sizes(module, act_tr, act_v) -> tuple:
    """(training tokens, validation tokens, d_in, p_out)"""
    d = act_tr.shape[-1]
    p = module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0]
    return act_tr.numel() // d, act_v.numel() // d, d, p


def _use_gram(n_tr: int, n_v: int, d: int, p: int) -> bool:
    return n_v * (d + p) < d * p


@register_layer(nn.Linear, *(() if Conv1D is None else (Conv1D,)))
class LinearRule:
    # Under autocast the layer multiplies a half-precision copy of its input, and autograd keeps only
    # that copy; the engine keeps one too instead of holding on to an fp32 input.
    autocast_input = True

    @staticmethod
    def capture(module, args, kwargs, output, rows):
        return module_input(args, kwargs), None

    @staticmethod
    def val_grads(module, act_v, grad_v):
        av, gv = _flat(act_v), _flat(grad_v)
        grads = {}  # the trainable parameters only: a frozen weight (bias-only fine-tuning) needs no G_val
        if module.weight.requires_grad:  # parameter layout
            grads["weight"] = matmul_accum(av.t(), gv) if _is_conv1d(module) else matmul_accum(gv.t(), av)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = gv.sum(0, dtype=accum_dtype(gv))
        return grads

    @staticmethod
    def per_sample_dots(module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        rows = act_tr.shape[0]
        out = {}
        if "weight" in val_totals:  # not when frozen
            if own_only["weight"] and _use_gram(*_sizes(module, act_tr, act_v)):
                out["weight"] = _gram_dots(act_tr, grad_tr, act_v, grad_v, rows)
            else:  # G_val dense, parameter layout
                total = _weight_in_out(module, val_totals["weight"])
                out["weight"] = _projection_dots(act_tr, grad_tr, total, rows)
        if "bias" in val_totals:  # Σ_t b_t·v = (Σ_t b_t)·v: the row's token sum in fp32, then one product
            dtype = accum_dtype(grad_tr)
            total = to_dtype(val_totals["bias"], dtype)
            out["bias"] = grad_tr.reshape(rows, -1, total.shape[0]).sum(1, dtype=dtype) @ total
        return out

    factored = ("weight",)  # G_i = Σ_t b_t a_tᵀ (Linear, [p, d]) or Σ_t a_t b_tᵀ (Conv1D, [d, p])

    @staticmethod
    def per_sample_projection(module, act_tr, grad_tr, mats):
        """Π_i of the weight, Σ_t (P_r u_t)(P_c v_t)ᵀ in the parameter's layout, and P·(Σ_t b_t) of the bias."""
        rows = act_tr.shape[0]
        out = {}
        if "weight" in mats:
            u, v = (act_tr, grad_tr) if _is_conv1d(module) else (grad_tr, act_tr)
            out["weight"] = outer_projection(_flat(u), _flat(v), mats["weight"], rows)
        if "bias" in mats:
            out["bias"] = vector_projection(_per_row(grad_tr, rows).sum(1), mats["bias"])
        return out

    @staticmethod
    def path(module, act_tr, act_v, own_only):
        n_tr, n_v, d, p = _sizes(module, act_tr, act_v)
        if own_only and _use_gram(n_tr, n_v, d, p):
            return LayerPath("gram", 2.0 * n_tr * n_v * (d + p))
        return LayerPath("projection", 2.0 * n_tr * d * p)

    @staticmethod
    def per_sample_sq_norms(module, act_tr, grad_tr):
        """||G_i||² per training row without forming G_i: Σ_{t,u} (a_t·a_u)(b_t·b_u) (the Gram form of ghost
        clipping, 2·N·T·(d+p) flops); the bias's ||Σ_t b_t||²."""
        rows = act_tr.shape[0]
        a, g = _per_row(act_tr, rows), _per_row(grad_tr, rows)
        out = {"weight": ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))}
        if module.bias is not None:
            out["bias"] = g.sum(1).square().sum(1)
        return out

    # ---- ties with an embedding (GPT-2's lm_head shares wte.weight), see ghost_engine.tap ----
    @staticmethod
    def stash_shapes(module, n_tokens, n_support):
        """Shapes of make_stash's tensors for `n_tokens` training tokens and `n_support` weight rows."""
        other = module.weight.shape[1]  # Linear [p, d]: d; Conv1D [d, p]: p
        return [(n_tokens, other), (n_tokens, n_support)]

    @staticmethod
    def make_stash(module, local, act_tr, grad_tr, support):
        """(M, R): what <G_i, X> needs for an X living on the weight rows `support` (sorted, with repeats)
        only: G_i's rows there are Σ_t R_t[u] ⊗ M_t."""
        a, g = _flat(act_tr), _flat(grad_tr)
        if _is_conv1d(module):  # rows index the input features
            return g, a[:, support]
        return a, g[:, support]

    @staticmethod
    def stash_dots(stash, val_grad, support, first, rows):
        """<G_i, X> per training row for X = `val_grad` (dense, the other use's validation gradient, zero off
        `support`); each row of `support` counted once (`first`: its first occurrence)."""
        m, r = stash
        x = val_grad[support] * first[:, None].to(val_grad.dtype)  # [U, other]
        return row_dot(r @ x.to(r.dtype), m, rows)

    @staticmethod
    def row_stash(module, act_tr, grad_tr, ids_tr):
        """r [B, U, T]: for the training tokens u of each row and the ids ids_tr [B, T] the embedding looked up
        in that row, r[i, u, t] = (row-indexed factor of token u)[ids_tr[i, t]], so that the rows of G_i at
        those ids are Σ_u r[i, u, t] m_iu, with m the other factor (make_stash's first tensor)."""
        rows = act_tr.shape[0]
        indexed = (act_tr if _is_conv1d(module) else grad_tr).reshape(rows, -1, module.weight.shape[0])
        ids = ids_tr.reshape(rows, 1, -1)
        return torch.gather(indexed, 2, ids.expand(rows, indexed.shape[1], ids.shape[2]))


@register_recogniser
class RecognisedLinearRule(LinearRule):
    """An nn.Linear subclass with its own forward that still computes x @ weight.T + bias (verified on a random
    input with random parameters), such as Falcon's FalconLinear. Any other forward is refused."""

    @classmethod
    def recognise(cls, module):
        if not isinstance(module, nn.Linear) or module.weight.is_meta or not module.weight.dtype.is_floating_point:
            return None
        if set(dict(module.named_parameters())) - {"weight", "bias"}:
            return None
        gen = probe_generator()
        weight = torch.randn(module.weight.shape, generator=gen, dtype=torch.float64)
        bias = None if module.bias is None else torch.randn(module.bias.shape, generator=gen, dtype=torch.float64)
        x = torch.randn((3, 5, weight.shape[1]), generator=gen, dtype=torch.float64)
        replacements = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        got = probe_forward(module, replacements, x)
        return cls if same_values(got, torch.nn.functional.linear(x, weight, bias), 1e-12) else None

