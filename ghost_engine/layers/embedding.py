"""nn.Embedding: the weight gradient of sample i is a scatter of its output gradients into the
rows of the tokens it looked up, so <G_i, X> only needs X's rows at sample i's tokens.

Positional embeddings looked up once for the whole batch (ids of shape [1, T], broadcast over the
rows by the model's addition) are expanded to one row per sample at capture time: the values are
unchanged, but the gradient of the expanded output is per sample.

Subclasses with their own forward are recognised by what they compute (``EmbeddingRule.recognise``):
y = weight[ids + offset] · scale, where ids is one argument of the forward (the first, or
``position_ids``), offset an integer attribute ``offset`` (OPT's and BioGPT's learned positions) or 0,
and scale 1, a 0-dim buffer of the module cast to the weight's dtype (Gemma's ``embed_scale`` = sqrt(hidden))
or a number attribute of the module (XGLM's and BioGPT's ``embed_scale``, a Python float).
The candidate is accepted only when the forward, run on random ids with a small random weight, returns
exactly that; for a scale, with the module's own value and with another one put in its place (the forward
must read the scale where the rule reads it, not a constant that happens to equal it). The rule then
scales G_val and the dot products.
"""
import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from ghost_engine.layers import (LayerPath, accum_dtype, module_input, probe_forward, probe_generator,
                                 register_layer, register_recogniser, row_dot, same_values, to_dtype)
from ghost_engine.layers._projection import gathered_outer_projection

PROBE_ROWS, PROBE_VOCAB = 4, 64
PROBE_RTOL = 1e-12  # the probe repeats the forward's own fp64 operations


def _check_supported(module: nn.Embedding):
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise ValueError(f"nn.Embedding with max_norm, scale_grad_by_freq or sparse=True is not supported "
                         f"({module}): its per-sample gradients depend on the rest of the batch")


def _keep(module, ids: torch.Tensor) -> torch.Tensor:
    """Mask of looked-up positions that receive gradient (padding_idx rows never do)."""
    if module.padding_idx is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return ids != module.padding_idx


def _per_row_ids(ids: torch.Tensor, output: torch.Tensor, rows: int):
    """(ids, replacement output): ids shared by the whole batch ([1, ...]) are expanded to every row."""
    if ids.shape[0] == rows or ids.dim() == 0:
        return ids, None
    if ids.shape[0] == 1 and output.shape[0] == 1:  # broadcast over the batch, e.g. GPT-2 position ids
        return ids.expand(rows, *ids.shape[1:]), output.expand(rows, *output.shape[1:])
    raise ValueError(f"embedding input has {ids.shape[0]} rows but the batch has {rows}; "
                     "only per-row ids or ids shared by the whole batch ([1, ...]) are supported")


@register_layer(nn.Embedding)
@register_recogniser
class EmbeddingRule:
    row_sparse = True  # validation gradients live on the looked-up rows only: can open a tie (engine)
    check_supported = staticmethod(_check_supported)
    # the form a recognised subclass computes (see `recognise`); nn.Embedding itself: weight[input]
    ids_arg = None  # (position after self, name) of the forward argument holding the ids
    offset_attr = None  # integer attribute added to the ids
    scale_attr = None  # 0-dim buffer or number attribute multiplying the looked-up rows

    @classmethod
    def capture(cls, module, args, kwargs, output, rows):
        if cls.ids_arg is None:
            return _per_row_ids(module_input(args, kwargs), output, rows)
        position, name = cls.ids_arg
        ids = args[position] if len(args) > position else kwargs.get(name)
        if not torch.is_tensor(ids):
            raise ValueError(f"{type(module).__name__} was called without {name!r}: the engine takes the ids "
                             f"it looks up from that argument")
        if cls.offset_attr is not None:
            ids = ids + getattr(module, cls.offset_attr)
        return _per_row_ids(ids, output, rows)

    @classmethod
    def scale(cls, module, dtype):
        """The factor the looked-up rows are multiplied by, in `dtype` (None: 1)."""
        if cls.scale_attr is None:
            return None
        scale = getattr(module, cls.scale_attr)
        if not torch.is_tensor(scale):  # a Python number: multiplies the rows as it is
            return float(scale)
        return scale.to(module.weight.dtype).to(dtype)

    @classmethod
    def val_grads(cls, module, act_v, grad_v):
        """The dense weight-shaped validation gradient: a scatter-add of the output gradients (static
        shapes: padding_idx positions add zeros instead of being filtered out)."""
        ids = act_v.reshape(-1)
        grads = to_dtype(grad_v.reshape(ids.shape[0], -1), accum_dtype(grad_v))
        if module.padding_idx is not None:
            grads = grads * _keep(module, ids)[:, None].to(grads.dtype)
        scale = cls.scale(module, grads.dtype)
        if scale is not None:
            grads = grads * scale
        dense = torch.zeros(module.weight.shape, dtype=grads.dtype, device=grads.device)
        return {"weight": dense.index_add_(0, ids, grads)}

    @classmethod
    def per_sample_dots(cls, module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        dots = _gather_dots(module, act_tr, grad_tr, val_totals["weight"])
        scale = cls.scale(module, dots.dtype)
        return {"weight": dots if scale is None else dots * scale}

    @classmethod
    def per_sample_sq_norms(cls, module, act_tr, grad_tr):
        """||G_i||² per training row: Σ_{t,u} [id_t = id_u] (b_t·b_u) over the positions that get gradient
        (token co-occurrence; 2·N·T·d flops), times the scale²."""
        ids, g = _kept_rows(module, act_tr, grad_tr)
        same = (ids[:, :, None] == ids[:, None, :]).to(g.dtype)
        sq = ((g @ g.transpose(1, 2)) * same).sum((1, 2))
        scale = cls.scale(module, sq.dtype)
        return {"weight": sq if scale is None else sq * scale * scale}

    @classmethod
    def tied_cross(cls, module, act_tr, grad_tr, m, r):
        """<G_i(this use), G_i(the linear use)> per training row, = Σ_{t,u} r[i,u,t] (m_iu · b_it), from the
        linear's factors m ([B·U, k] or [B, U, k]) and r [B, U, T] (LinearRule.make_stash, row_stash)."""
        ids, g = _kept_rows(module, act_tr, grad_tr)
        m = m.reshape(ids.shape[0], -1, m.shape[-1]).to(g.dtype)
        cross = (r.to(g.dtype) * (m @ g.transpose(1, 2))).sum((1, 2))
        scale = cls.scale(module, cross.dtype)
        return cross if scale is None else cross * scale

    factored = ("weight",)  # G_i = Σ_t e_{id_t} b_tᵀ · scale, [vocabulary, d]

    @classmethod
    def per_sample_projection(cls, module, act_tr, grad_tr, mats):
        """Π_i = Σ_t (P_r e_{id_t})(P_c b_t)ᵀ · scale: columns of P_r gathered by the ids."""
        ids, g = _kept_rows(module, act_tr, grad_tr)
        projected = gathered_outer_projection(ids, g, mats["weight"], module.num_embeddings)
        scale = cls.scale(module, projected.dtype)
        return {"weight": projected if scale is None else projected * scale}

    @staticmethod
    def path(module, act_tr, act_v, own_only):
        return LayerPath("gather", 2.0 * grad_tr_numel(act_tr, module))

    @classmethod
    def recognise(cls, module):
        if (not isinstance(module, nn.Embedding) or len(dict(module.named_parameters())) != 1
                or module.weight.is_meta):
            return None
        params = list(inspect.signature(module.forward).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional:
            return None
        id_args = [(0, positional[0].name)]
        id_args += [(i, p.name) for i, p in enumerate(positional) if p.name == "position_ids" and i > 0]
        offsets = [None] + (["offset"] if type(getattr(module, "offset", None)) is int else [])
        scales = [None] + [name for name, b in module.named_buffers(recurse=False)
                           if b.dim() == 0 and b.dtype.is_floating_point]
        scales += [name for name, value in vars(module).items()
                   if type(value) in (int, float) and name not in nn.Embedding.__constants__]  # not bool
        for ids_arg in id_args:
            for offset_attr in offsets:
                for scale_attr in scales:
                    if _computes(module, positional, ids_arg, offset_attr, scale_attr):
                        return _rule(ids_arg, offset_attr, scale_attr)
        return None


def _computes(module, positional, ids_arg, offset_attr, scale_attr) -> bool:
    """Whether the forward returns weight[ids + offset] · scale for random ids and a random small weight
    (for a scale, with the module's own value and another one: the forward must read that buffer or
    attribute)."""
    gen = probe_generator()
    offset = getattr(module, offset_attr) if offset_attr else 0
    vocab = min(PROBE_VOCAB, module.num_embeddings)
    if not 0 <= offset < vocab:
        return False
    w = torch.randn((vocab, module.embedding_dim), generator=gen, dtype=torch.float64)
    ids = torch.randint(0, vocab - offset, (PROBE_ROWS, 3), generator=gen)
    position, name = ids_arg
    # ids passed where the model passes them; required arguments before them get ones (OPT's attention mask)
    args = [ids] if position == 0 else [torch.ones_like(ids) for p in positional[:position] if p.default is p.empty]
    kwargs = {} if position == 0 else {name: ids}
    if scale_attr is None:
        return same_values(probe_forward(module, {"weight": w}, *args, **kwargs), F.embedding(ids + offset, w),
                           PROBE_RTOL)
    own = getattr(module, scale_attr)
    in_buffer = torch.is_tensor(own)
    own = own.detach().cpu() if in_buffer else own
    for value in (own, own * 1.5 + 0.25):
        expected = F.embedding(ids + offset, w) * (value.to(w.dtype) if in_buffer else value)
        if in_buffer:
            got = probe_forward(module, {"weight": w, scale_attr: value}, *args, **kwargs)
        else:
            got = _with_attribute(module, scale_attr, value, probe_forward, module, {"weight": w}, *args, **kwargs)
        if not same_values(got, expected, PROBE_RTOL):
            return False
    return True


def _with_attribute(module, name, value, call, *args, **kwargs):
    """call(*args, **kwargs) with the module's attribute `name` set to `value` for the call, restored after it
    (also when it raises)."""
    own = getattr(module, name)
    setattr(module, name, value)
    try:
        return call(*args, **kwargs)
    finally:
        setattr(module, name, own)


@functools.cache
def _rule(ids_arg, offset_attr, scale_attr):
    """One rule class per recognised form."""
    parts = [f"ids={ids_arg[1]}"] + [f"+{offset_attr}"] * bool(offset_attr) + [f"*{scale_attr}"] * bool(scale_attr)
    return type(f"EmbeddingRule[{', '.join(parts)}]", (EmbeddingRule,),
                {"ids_arg": ids_arg, "offset_attr": offset_attr, "scale_attr": scale_attr})


def grad_tr_numel(act_tr, module) -> int:
    return act_tr.numel() * module.embedding_dim


def _kept_rows(module, ids, grad):
    """(ids [B, T], output gradients [B, T, d] in the accumulation dtype, zero where padding_idx was looked up)."""
    rows = ids.shape[0]
    ids = ids.reshape(rows, -1)
    g = to_dtype(grad.reshape(rows, ids.shape[1], -1), accum_dtype(grad))
    if module.padding_idx is not None:
        g = g * _keep(module, ids)[..., None].to(g.dtype)
    return ids, g


def _gather_dots(module, ids, grad, dense_val) -> torch.Tensor:
    """Σ_t b_it · X[id_it] per training row."""
    rows = ids.shape[0]
    flat_ids = ids.reshape(-1)
    picked = dense_val[flat_ids]  # [N, d]
    if module.padding_idx is not None:
        picked = picked * _keep(module, flat_ids)[:, None].to(picked.dtype)
    return row_dot(picked, grad, rows)
