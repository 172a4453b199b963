"""Convolutions, nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d: linear maps of the input's patches.

Per sample i and group, let A_i be the input's patches (im2col, [K, L]: K = C_in/groups · prod(kernel)
entries at each of L output positions) and B_i the output gradient ([p, L], p = C_out/groups). The weight
gradient is G_i = B_i A_iᵀ ([p, K], the weight's layout) and the bias gradient Σ_l b_il. A transposed
convolution is the adjoint of the convolution with its weight, stride, padding, dilation and groups, run
from its output back to its input: the same product with the roles swapped, A = the output gradient's
patches (K = C_out/groups · prod(kernel), at the L input positions) and B = the input (p = C_in/groups).

Two exact ways to get <G_i, G_val>, per group, summed over the groups:
- gram:       Σ_{l,u} (a_il·a_u)(b_il·b_u) over all validation positions u   ≈ 2·N·Nv·(K+p)·groups flops
- projection: Σ_l b_il · (G_val a_il): the convolution of sample i's input with G_val as its kernel,
              dotted with sample i's output gradient (no patches formed)     ≈ 2·N·K·p·groups flops
with N the training positions (rows × L) and Nv the validation ones; the cheaper one runs, as for
nn.Linear. G_val is torch's own weight gradient of the validation rows (``convolution_backward``).
Patches (prod(kernel) × the input's memory) are formed only on the Gram path and for ||G_i||².
For value="cosine", ||G_i||² is Σ_{l,l'} (a_il·a_il')(b_il·b_il') (≈ 2·B·L²·(K+p)·groups flops) or, when
cheaper, the sum of squares of G_i formed row by row (≈ 2·B·L·K·p·groups flops, B·|W| memory per chunk).

Padding is reproduced as nn.ConvNd._conv_forward does it: padding_mode "zeros" pads inside the convolution;
"reflect", "replicate" and "circular" pad the input with F.pad first and convolve with no padding;
padding="same" splits d·(k-1) into (d·(k-1))//2 on the left and the rest on the right. A transposed
convolution's adjoint pads the output gradient with zeros by `padding` and drops what its output_padding
added.

Precision: under autocast the layer's half-precision input is kept (``autocast_input``); Gram and norm products
are summed in fp32 (on a GPU half-precision bmm with fp32 output, elsewhere upcast first), G_val comes from fp32
copies of the validation rows, and the projection convolves in the input's dtype with G_val rounded to it and
sums each row in fp32, as nn.Linear's rule does. On a GPU, fp32 convolutions follow
``torch.backends.cudnn.allow_tf32`` (on by default), as the model's own convolutions do.

Inputs: batched, [rows, C, *spatial]; the engine may also hand over rows whose leading dims were flattened
into the batch by the model ([rows, T, C, *spatial]): those positions then count as sample i's too.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn import grad as conv_grad

from ghost_engine.layers import (LayerPath, accum_dtype, bmm_accum, module_input, register_layer, row_dot,
                                 to_dtype)
from ghost_engine.layers._projection import vector_projection

CONVOLVE = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
WEIGHT_GRAD = {1: conv_grad.conv1d_weight, 2: conv_grad.conv2d_weight, 3: conv_grad.conv3d_weight}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
CHUNK_ELEMENTS = 1 << 24  # bound on the Gram blocks (or per-sample gradients) held at once


def _n_spatial(module) -> int:
    return len(module.kernel_size)


def _check_supported(module):
    for klass in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, klass) and type(module)._conv_forward is not klass._conv_forward:
            raise ValueError(f"{type(module).__name__} overrides {klass.__name__}._conv_forward: the engine cannot "
                             "verify what it computes; register a rule for it")
    if module.padding_mode not in PADDING_MODES:
        raise ValueError(f"{type(module).__name__} has padding_mode={module.padding_mode!r}; supported: "
                         f"{PADDING_MODES}")


def _padding_pairs(module) -> list:
    """(left, right) padding of each spatial dim of a (not transposed) convolution."""
    if module.padding == "valid":
        return [(0, 0)] * _n_spatial(module)
    if module.padding == "same":  # as nn.ConvNd: the odd position on the right
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for k, d in zip(module.kernel_size, module.dilation)]
    return [(p, p) for p in module.padding]


def _pad(x: torch.Tensor, pairs: list, mode: str):
    """(input, padding argument of the convolution): symmetric zero padding is left to the convolution, any
    other is applied with F.pad (negative amounts crop)."""
    if mode == "zeros" and all(left == right >= 0 for left, right in pairs):
        return x, tuple(left for left, _ in pairs)
    zero = (0,) * len(pairs)
    if all(left == right == 0 for left, right in pairs):
        return x, zero
    flat = [amount for pair in reversed(pairs) for amount in pair]  # F.pad lists the last dim first
    return F.pad(x, flat, mode="constant" if mode == "zeros" else mode), zero


def _batched(module, t: torch.Tensor) -> torch.Tensor:
    """[rows, ..., C, *spatial] -> [N, C, *spatial]"""
    return t.reshape(-1, *t.shape[t.dim() - _n_spatial(module) - 1:])


def _operands(module, act, grad):
    """(inp, padding, out), each [N, C, *spatial]: the convolution out = conv(inp, W, stride, padding, dilation,
    groups) whose weight gradient is the module's; `out` is the tensor on its output side."""
    x, g = _batched(module, act), _batched(module, grad)
    if not module.transposed:
        inp, padding = _pad(x, _padding_pairs(module), module.padding_mode)
        return inp, padding, g
    # the adjoint runs on the output gradient: pad it by `padding` and keep the span of x's positions' windows
    pairs = []
    for size_in, size_out, k, s, d, p in zip(x.shape[2:], g.shape[2:], module.kernel_size, module.stride,
                                             module.dilation, module.padding):
        span = (size_in - 1) * s + d * (k - 1) + 1
        pairs.append((p, span - size_out - p))
    inp, padding = _pad(g, pairs, "zeros")
    return inp, padding, x


def _patches(module, inp: torch.Tensor, padding: tuple) -> torch.Tensor:
    """im2col of [N, C, *spatial] for the convolution: [groups, N, L, K] with K in the weight's (C/groups, *kernel)
    order."""
    n = _n_spatial(module)
    if any(padding):
        inp = F.pad(inp, [p for p in reversed(padding) for _ in range(2)])
    x = inp
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # dim 2+i: the windows; a new last dim: their span
    if any(d > 1 for d in module.dilation):
        x = x[(..., *(slice(None, None, d) for d in module.dilation))]
    x = x.unflatten(1, (module.groups, -1))  # [N, groups, C/groups, *L, *kernel]
    x = x.permute(1, 0, *range(3, 3 + n), 2, *range(3 + n, 3 + 2 * n))
    return x.reshape(module.groups, x.shape[1], -1, math.prod(module.weight.shape[1:]))


def _channels_last(module, out: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] -> [groups, N, L, C/groups] (a view)"""
    return out.unflatten(1, (module.groups, -1)).flatten(3).permute(1, 0, 3, 2)


def _factors(module, act, grad, rows):
    """(patches [groups, rows, M, K], outputs [groups, rows, M, p]) with M a row's positions."""
    inp, padding, out = _operands(module, act, grad)
    q, p = _patches(module, inp, padding), _channels_last(module, out)
    return q.reshape(q.shape[0], rows, -1, q.shape[-1]), p.reshape(p.shape[0], rows, -1, p.shape[-1])


def _row_chunks(rows: int, per_row: int) -> list:
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def _cat(parts: list) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _gram_dots(module, act_tr, grad_tr, act_v, grad_v, rows) -> torch.Tensor:
    """Σ_{l,u} (a_l·a_u)(b_l·b_u) per training row, summed over the groups."""
    q, p = _factors(module, act_tr, grad_tr, rows)
    q_v, p_v = _factors(module, act_v, grad_v, act_v.shape[0])
    groups = q.shape[0]
    q_v = q_v.reshape(groups, -1, q_v.shape[-1]).transpose(1, 2)  # [groups, K, Nv]
    p_v = p_v.reshape(groups, -1, p_v.shape[-1]).transpose(1, 2)  # [groups, p, Nv]
    out = []
    for sl in _row_chunks(rows, groups * q.shape[2] * q_v.shape[2]):
        qs, ps = q[:, sl].flatten(1, 2), p[:, sl].flatten(1, 2)  # [groups, chunk · M, K or p]
        blocks = bmm_accum(qs, q_v) * bmm_accum(ps, p_v)  # [groups, chunk · M, Nv]
        out.append(blocks.reshape(groups, sl.stop - sl.start, -1).sum((0, 2)))
    return _cat(out)


def _projection_dots(module, act_tr, grad_tr, val_weight, rows) -> torch.Tensor:
    """Σ_l b_l · (G_val a_l) per training row: the convolution with G_val as its kernel."""
    inp, padding, out = _operands(module, act_tr, grad_tr)
    projected = CONVOLVE[_n_spatial(module)](inp, to_dtype(val_weight, inp.dtype), None, module.stride, padding,
                                             module.dilation, module.groups)
    return row_dot(projected, out, rows)


def _gram_sq_norms(q, p, rows) -> torch.Tensor:
    """Σ_{l,l'} (a_l·a_l')(b_l·b_l') per row and group, summed over the groups: [rows]."""
    groups, m = q.shape[0], q.shape[2]
    out = []
    for sl in _row_chunks(rows, groups * m * m):
        qs, ps = q[:, sl].flatten(0, 1), p[:, sl].flatten(0, 1)  # [groups · chunk, M, K or p]
        blocks = bmm_accum(qs, qs.transpose(1, 2)) * bmm_accum(ps, ps.transpose(1, 2))  # [groups · chunk, M, M]
        out.append(blocks.reshape(groups, sl.stop - sl.start, -1).sum((0, 2)))
    return _cat(out)


def _explicit_sq_norms(q, p, rows) -> torch.Tensor:
    """||G_i||² from G_i = B_i A_iᵀ formed per group, a chunk of rows at a time: [rows]."""
    groups = q.shape[0]
    out = []
    for sl in _row_chunks(rows, groups * q.shape[3] * p.shape[3]):
        qs, ps = q[:, sl].flatten(0, 1), p[:, sl].flatten(0, 1)
        grads = bmm_accum(ps.transpose(1, 2), qs)  # [groups · chunk, p, K]
        out.append(grads.square().reshape(groups, sl.stop - sl.start, -1).sum((0, 2)))
    return _cat(out)


def _sizes(module, act_tr, act_v) -> tuple:
    """(training positions, validation positions, K, p, groups) of the convolution behind the module."""
    n = _n_spatial(module)

    def positions(act):
        batch = act.numel() // act.shape[act.dim() - n - 1:].numel()  # rows × any leading dims
        spatial = act.shape[act.dim() - n:]
        if module.transposed:  # the adjoint's outputs are the module's input positions
            return batch * math.prod(spatial)
        # a list, not a generator: torch.compile traces the backward of the taps, this included
        return batch * math.prod([(size + left + right - d * (k - 1) - 1) // s + 1 for size, (left, right), k, s, d
                                  in zip(spatial, _padding_pairs(module), module.kernel_size, module.stride,
                                         module.dilation)])

    shape = module.weight.shape
    return positions(act_tr), positions(act_v), math.prod(shape[1:]), shape[0] // module.groups, module.groups


def _use_gram(n_other: int, k: int, p: int) -> bool:
    """Whether products with `n_other` positions cost less than the projection through a [p, K] matrix."""
    return n_other * (k + p) < k * p


def _bias_sums(module, grad, rows: int) -> torch.Tensor:
    """Σ of the output gradient over each row's positions: [rows, C_out] in the accumulation dtype."""
    g = _batched(module, grad)
    return g.reshape(rows, -1, g.shape[1], math.prod(g.shape[2:])).sum((1, 3), dtype=accum_dtype(g))


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvRule:
    # under autocast the convolution runs on a half-precision copy of its input: the engine keeps that one
    autocast_input = True
    check_supported = staticmethod(_check_supported)

    @staticmethod
    def capture(module, args, kwargs, output, rows):
        x = module_input(args, kwargs)
        if x.dim() != _n_spatial(module) + 2:
            raise ValueError(f"{type(module).__name__} got an input of shape {tuple(x.shape)}: the engine needs "
                             f"batched inputs [rows, C, *spatial] ({_n_spatial(module) + 2} dims)")
        return x, None

    @staticmethod
    def val_grads(module, act_v, grad_v):
        grads = {}
        if module.weight.requires_grad:
            inp, padding, out = _operands(module, act_v, grad_v)
            dtype = accum_dtype(inp)
            grads["weight"] = WEIGHT_GRAD[_n_spatial(module)](
                to_dtype(inp, dtype), module.weight.shape, to_dtype(out, dtype), module.stride, padding,
                module.dilation, module.groups)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = _bias_sums(module, grad_v, 1)[0]
        return grads

    @staticmethod
    def per_sample_dots(module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        rows = act_tr.shape[0]
        out = {}
        if "weight" in val_totals:
            n_tr, n_v, k, p, _ = _sizes(module, act_tr, act_v)
            if own_only.get("weight") and _use_gram(n_v, k, p):
                out["weight"] = _gram_dots(module, act_tr, grad_tr, act_v, grad_v, rows)
            else:
                out["weight"] = _projection_dots(module, act_tr, grad_tr, val_totals["weight"], rows)
        if "bias" in val_totals:
            sums = _bias_sums(module, grad_tr, rows)
            out["bias"] = sums @ to_dtype(val_totals["bias"], sums.dtype)
        return out

    factored = ("weight",)  # the weight as [groups · p, K]: group g's rows are Σ_l b_l a_lᵀ of its patches

    @staticmethod
    def per_sample_projection(module, act_tr, grad_tr, mats):
        """Π_i = Σ_g Σ_l (P_r[:, group g] b_gl)(P_c a_gl)ᵀ from the patches (formed, as for ||G_i||²); the bias's
        P·(Σ_l b_l)."""
        rows = act_tr.shape[0]
        out = {}
        if "weight" in mats:
            q, p = _factors(module, act_tr, grad_tr, rows)  # [groups, rows, M, K], [groups, rows, M, p]
            dtype = accum_dtype(q)
            p_r, p_c = mats["weight"]
            if p_r is None:  # kept whole: each group's channels in its own rows
                p_r = torch.eye(module.weight.shape[0], dtype=dtype, device=q.device)
            groups = q.shape[0]
            pu = to_dtype(p, dtype) @ p_r.reshape(groups, 1, -1, p_r.shape[-1])  # [groups, rows, M, k_r]
            pv = to_dtype(q, dtype) if p_c is None else to_dtype(q, dtype) @ p_c  # [groups, rows, M, k_c]
            pu, pv = (t.permute(1, 0, 2, 3).reshape(rows, -1, t.shape[-1]) for t in (pu, pv))
            out["weight"] = torch.bmm(pu.transpose(1, 2), pv).reshape(rows, -1)
        if "bias" in mats:
            out["bias"] = vector_projection(_bias_sums(module, grad_tr, rows), mats["bias"])
        return out

    @staticmethod
    def path(module, act_tr, act_v, own_only):
        n_tr, n_v, k, p, groups = _sizes(module, act_tr, act_v)
        if own_only and _use_gram(n_v, k, p):
            return LayerPath("gram", 2.0 * n_tr * n_v * (k + p) * groups)
        return LayerPath("projection", 2.0 * n_tr * k * p * groups)

    @staticmethod
    def per_sample_sq_norms(module, act_tr, grad_tr):
        """||G_i||² per training row: Σ_{l,l'} (a_l·a_l')(b_l·b_l') per group, or G_i formed when that is
        cheaper (many positions per row); the bias's ||Σ_l b_l||²."""
        rows = act_tr.shape[0]
        out = {}
        if module.weight.requires_grad:
            q, p = _factors(module, act_tr, grad_tr, rows)  # [groups, rows, M, K], [groups, rows, M, p]
            gram = _use_gram(q.shape[2], q.shape[3], p.shape[3])
            out["weight"] = (_gram_sq_norms if gram else _explicit_sq_norms)(q, p, rows)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = _bias_sums(module, grad_tr, rows).square().sum(1)
        return out
