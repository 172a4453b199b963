"""Low-rank causal attention: exact attention inside a block of c tokens, r learned summaries per earlier block.

The sequence is cut into blocks of c positions (the end padded up to a multiple of c). Every block b is
summarised by r key and r value vectors,

    K̃_b = E · K_b,   Ṽ_b = F · V_b          E, F ∈ R^{r×c}, one pair per layer, shared by all heads,

and a query at position t of block n attends, in one softmax, to

    the keys K_s of its own block with s ≤ t        (exact causal attention, c scores at most)
    the summaries K̃_0 .. K̃_{n-1} of earlier blocks  (n·r scores), each score raised by log(c/r).

Causality: block m < n ends at position (m+1)·c − 1 < n·c ≤ t, so a summary seen from t mixes only positions
before t; inside the block the usual mask keeps s ≤ t. Padded positions (≥ T) lie in the last block only,
after every real query, so the mask keeps them out and no later block summarises them. Nothing at a position
after t reaches position t's output (tests/test_lowrank_attention.py changes the later tokens and checks).

log(c/r): a summary stands for c/r keys. With E, F initialised to averages over c/r consecutive positions
(the default), a block whose c/r keys in each segment were equal would get exactly the weight full
attention gives it. With r = c and E = F = I the summaries are the keys themselves, log(c/r) = 0 and the
result is standard causal attention (tested).

Cost per query: c + n·r ≤ c + (T/c)·r scores instead of up to T. Query blocks are processed a few at a
time; with `recompute` (the default) the scores of a chunk are not kept for the backward pass but
recomputed there (torch.utils.checkpoint), so the memory the attention holds between forward and backward
is that of its inputs, linear in T, and only one chunk's scores exist at a time.

E and F are nn.Linear(c, r, bias=False) applied along the positions of a block to a tensor whose first
dimension is the batch row ([rows, kv_heads, blocks, head_dim, c]), so GradDotProdEngine treats them as
ordinary linear layers and its per-sample dot products stay exact. The rest of the model (projections,
RoPE, norms, MLP) is transformers' own code; this file registers the attention function and its mask
function under the name "lowrank" with transformers' AttentionInterface / AttentionMaskInterface.

Not supported (each raises): a padding mask or any other non-causal mask, a KV cache (generation), and
attention dropout.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import causal_mask_function
from transformers.models.llama.modeling_llama import LlamaAttention

NAME = "lowrank"
# Attention classes that call transformers' attention interface with (module, query, key, value, ...).
SUPPORTED_ATTENTION = (LlamaAttention,)
QUERIES_PER_CHUNK = 256  # query positions whose scores exist at one time (rounded to whole blocks)


def segment_mean(rank, block):
    """[rank, block]: row i averages the i-th of `rank` consecutive, near-equal segments of the block
    (the identity when rank == block)."""
    edges = [round(i * block / rank) for i in range(rank + 1)]
    matrix = torch.zeros(rank, block)
    for i in range(rank):
        matrix[i, edges[i]:edges[i + 1]] = 1.0 / (edges[i + 1] - edges[i])
    return matrix


class LowRankCompression(nn.Module):
    """The E (`key`) and F (`value`) maps of one attention layer: `block` positions -> `rank` summaries."""

    def __init__(self, rank, block, device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= block:
            raise ValueError(f"attention rank {rank} must be between 1 and the block length {block}")
        # skip_init: no random numbers are drawn (the weights are set below), so adding the maps does not
        # change what the seed gives the rest of the run
        device = torch.get_default_device() if device is None else device
        self.key = nn.utils.skip_init(nn.Linear, block, rank, bias=False, device=device, dtype=dtype)
        self.value = nn.utils.skip_init(nn.Linear, block, rank, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            for linear in (self.key, self.value):
                linear.weight.copy_(segment_mean(rank, block))
        self.recompute = True  # torch.func transforms do not support checkpointing: turn off under them

    @property
    def rank(self):
        return self.key.out_features

    @property
    def block(self):
        return self.key.in_features

    def extra_repr(self):
        return f"rank={self.rank}, block={self.block}, recompute={self.recompute}"


def add_lowrank_attention(model, rank, block):
    """Give every attention layer of `model` its E/F maps and switch the model to the "lowrank" attention."""
    layers = [m for m in model.modules() if isinstance(m, SUPPORTED_ATTENTION)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layer of a supported type "
                         f"({', '.join(c.__name__ for c in SUPPORTED_ATTENTION)}); low-rank attention is "
                         "available for the Llama family only")
    for layer in layers:
        weight = layer.k_proj.weight
        layer.lowrank = LowRankCompression(rank, block, device=weight.device, dtype=weight.dtype)
    model.set_attn_implementation(NAME)
    return model


def lowrank_causal_attention(query, key, value, compression, scaling):
    """query [B, H, T, D], key [B, Hkv, T, D], value [B, Hkv, T, Dv] (H a multiple of Hkv, grouped-query
    attention: query head h reads key/value head h // (H / Hkv)) -> [B, H, T, Dv]."""
    B, H, T, D = query.shape
    kv_heads, Dv = key.shape[1], value.shape[-1]
    groups = H // kv_heads
    c, r = compression.block, compression.rank
    blocks = -(-T // c)
    pad = blocks * c - T
    if pad:
        query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    q = query.reshape(B, kv_heads, groups, blocks, c, D)  # views: only T and H are split
    k = key.reshape(B, kv_heads, blocks, c, D)
    v = value.reshape(B, kv_heads, blocks, c, Dv)
    # E, F act along the block's positions (last axis); the batch row stays first for the engine
    k_sum = compression.key(k.transpose(-1, -2)).transpose(-1, -2).reshape(B, kv_heads, blocks * r, D)
    v_sum = compression.value(v.transpose(-1, -2)).transpose(-1, -2).reshape(B, kv_heads, blocks * r, Dv)

    per_chunk = max(1, QUERIES_PER_CHUNK // c)
    recompute = compression.recompute and torch.is_grad_enabled()
    outputs = []
    for first in range(0, blocks, per_chunk):
        last = min(blocks, first + per_chunk)
        seen = (last - 1) * r  # summaries of blocks before the chunk's last block
        args = (q[:, :, :, first:last], k[:, :, first:last], v[:, :, first:last], k_sum[:, :, :seen],
                v_sum[:, :, :seen], first, r, scaling)
        if recompute:  # nothing random inside: no RNG state to keep
            outputs.append(checkpoint(_chunk_attention, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            outputs.append(_chunk_attention(*args))
    out = torch.cat(outputs, dim=3) if len(outputs) > 1 else outputs[0]  # [B, Hkv, groups, blocks, c, Dv]
    return out.reshape(B, H, blocks * c, Dv)[:, :, :T]


def _chunk_attention(q, k, v, k_sum, v_sum, first_block, rank, scaling):
    """Query blocks first_block .. first_block + n - 1: q [B, Hkv, g, n, c, D], their own keys/values
    k, v [B, Hkv, n, c, ·], the summaries of the blocks before the last of them k_sum, v_sum [B, Hkv, S, ·]."""
    n, c, seen = q.shape[3], q.shape[4], k_sum.shape[2]
    own = torch.einsum("bkgncd,bknsd->bkgncs", q, k) * scaling  # [B, Hkv, g, n, c, c]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    own = own.masked_fill(~causal, float("-inf"))
    summary = torch.einsum("bkgncd,bksd->bkgncs", q, k_sum) * scaling + math.log(c / rank)  # [..., n, c, S]
    block_of_summary = torch.arange(seen, device=q.device) // rank
    earlier = block_of_summary[None, :] < first_block + torch.arange(n, device=q.device)[:, None]  # [n, S]
    summary = summary.masked_fill(~earlier[:, None, :], float("-inf"))
    # softmax in float32 at least, as transformers' eager attention does (float64 stays float64)
    weights = torch.softmax(torch.cat([summary, own], dim=-1), dim=-1,
                            dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    w_summary, w_own = weights.split([seen, c], dim=-1)
    return (torch.einsum("bkgncs,bknsd->bkgncd", w_own, v)
            + torch.einsum("bkgncs,bksd->bkgncd", w_summary, v_sum))


def lowrank_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function interface: (module, query [B, H, T, D], key, value, mask, ...) ->
    (output [B, T, H, Dv], None)."""
    compression = getattr(module, "lowrank", None)
    if compression is None:
        raise ValueError(f"{type(module).__name__} has no low-rank maps: build the model with "
                         "GradDotProd_LM.lowrank_attention.add_lowrank_attention")
    if attention_mask is not None:
        raise ValueError("low-rank attention got an attention mask: it computes plain causal attention over "
                         "unpadded rows only (pass no attention_mask, or one without padding)")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"low-rank attention got {query.shape[2]} queries for {key.shape[2]} keys: a KV cache "
                         "(incremental generation) is not supported; run the whole sequence at once")
    if dropout:
        raise ValueError(f"low-rank attention has no attention dropout (got {dropout})")
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and torch.compiler.is_compiling():  # see lowrank_mask
        consecutive = (position_ids.diff(dim=-1) == 1).all()  # transformers' own test for packing
        torch._assert_async(consecutive, "low-rank attention: position_ids that restart inside a row (packed "
                                         "sequences) are not supported")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = lowrank_causal_attention(query, key, value, compression, scaling)
    return out.transpose(1, 2).contiguous(), None


def lowrank_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                 attention_mask=None, **kwargs):
    """The mask transformers builds for "lowrank": none (the attention applies its own block masks, so no
    [T, T] mask is ever made). Anything but plain causal attention over unpadded rows raises."""
    # Under torch.compile transformers cannot tell whether position_ids pack several sequences into a row and
    # always passes its packed-sequence mask function; lowrank_attention_forward checks the positions then.
    if mask_function is not causal_mask_function and not torch.compiler.is_compiling():
        raise ValueError("low-rank attention supports plain causal attention only (no packed sequences, "
                         "sliding windows or extra mask functions)")
    if q_offset or kv_offset or q_length != kv_length:
        raise ValueError("low-rank attention does not support a KV cache (incremental generation)")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("low-rank attention got a padding mask: train on unpadded rows (the app's rows have "
                         "no padding), or use --attention standard")
    return None


AttentionInterface.register(NAME, lowrank_attention_forward)
AttentionMaskInterface.register(NAME, lowrank_mask)
