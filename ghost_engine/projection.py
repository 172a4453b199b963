"""Projected per-sample gradients: the fixed matrices, their layout, and the per-layer projection (docs/METHOD.md
section 7).

For a hooked parameter whose per-sample gradient G_i is a matrix (r × c in the parameter's own layout, a
convolution's weight as [C_out, C_in/groups · kernel]) the engine keeps

    Π_i = P_r · G_i · P_cᵀ = Σ_t (P_r u_it)(P_c v_it)ᵀ           (k_r × k_c, flattened row-major)

where G_i = Σ_t u_it v_itᵀ is how the layer's rule factors the gradient (an nn.Linear weight: u = the output
gradient, v = the input; an embedding: u = the one-hot token, so P_r u is a column of P_r). Per-sample
gradients are never formed. vec(Π_i) = (P_r ⊗ P_c)·vec(G_i). A parameter whose gradient is a vector (biases,
norm weights: any parameter the rule does not factor) is projected with one matrix, Π_i = P · vec(G_i).
A side whose projection would be as large as the side itself is kept whole (P = identity, no product).

The matrices are drawn from ``seed`` and the parameter's name, so a later process (a query, an index of
another corpus) rebuilds them from a Projection's description alone: Gaussian N(0, 1/k) or Rademacher
±1/√k entries (E‖Px‖² = ‖x‖²), or "orthonormal": orthonormal rows scaled by √(n/k) (the same expectation).

Owns: the layout of the projected row (``blocks``: each parameter's columns), the matrices and the projection of
one layer's rows (``project``). Must not touch: hooks, the micro-batch state, the optimizer.
"""
import json
import math
import zlib
from dataclasses import dataclass

import torch

from ghost_engine.layers._projection import dense_projection, vector_projection

KINDS = ("gaussian", "rademacher", "orthonormal")


@dataclass(frozen=True)
class Block:
    """One parameter's columns in the projected row: [start, stop), of its gradient's `shape` (r, c) projected to
    `dims` (k_r, k_c), or (n,) to (k,)."""

    name: str
    shape: tuple
    dims: tuple
    start: int
    stop: int


def side_dim(size: int, k: int) -> int:
    """A side of `size` projected to at most `k` (kept whole when k >= size)."""
    return min(size, k)


class Projection:
    """The projection of every hooked parameter of a model: a list of Blocks and the matrices, drawn from a seed.

    Build it with ``Projection.for_shapes`` (what the engine does from ``projection=``) or rebuild it from
    ``describe()`` with ``Projection.from_description``; ``matrices(name)`` gives (P_r, P_c) or (P,) as
    [k, n] float64 CPU tensors, None for a side kept whole.
    """

    def __init__(self, blocks: list, seed: int, kind: str):
        if kind not in KINDS:
            raise ValueError(f"projection kind={kind!r}; expected one of {KINDS}")
        self.blocks, self.seed, self.kind = list(blocks), int(seed), kind
        self.dim = self.blocks[-1].stop if self.blocks else 0
        self._by_name = {b.name: b for b in self.blocks}

    @classmethod
    def for_shapes(cls, shapes: dict, *, dim: int = None, total: int = None, dims: dict = None, seed: int = 0,
                   kind: str = "gaussian", allocate: str = "size"):
        """shapes: {parameter name: (r, c) for a factored gradient or (n,)}, in row order. Sizes: ``dims``
        {name: (k_r, k_c) or k} for some or all parameters; the others get ``dim`` per side (k × k columns for a
        matrix, k² for a vector), or share ``total`` (a budget of columns per row): allocate="size" (default)
        gives each parameter columns in proportion to √(its size) (a matrix: sides √ of that, each at most its
        own side), "equal" the largest equal side k with Σ_parameters k_r·k_c <= total."""
        if allocate not in ("size", "equal"):
            raise ValueError(f"projection allocate={allocate!r}; expected 'size' or 'equal'")
        dims = dict(dims or {})
        if total is not None and dim is None and allocate == "size" and len(dims) < len(shapes):
            rest = {n: sh for n, sh in shapes.items() if n not in dims}
            dims.update(_by_size(rest, total - _columns(shapes, dims)))
        unknown = sorted(set(dims) - set(shapes))
        if unknown:
            raise ValueError(f"projection dims for unknown parameters {unknown[:3]}; valued: {list(shapes)[:5]}...")
        if (dim is None) == (total is None) and len(dims) < len(shapes):
            raise ValueError("give the projection size per side (dim) or the total per row (total), not both")
        if dim is not None and dim < 1:
            raise ValueError(f"projection dim={dim} must be >= 1")
        if dim is None and len(dims) < len(shapes):
            dim = _side_for_total({n: s for n, s in shapes.items() if n not in dims}, total - _columns(shapes, dims))
        blocks, start = [], 0
        for name, shape in shapes.items():
            k = dims.get(name, dim)
            if len(shape) == 2:
                kr, kc = (k, k) if isinstance(k, int) else tuple(k)
                out = (side_dim(shape[0], kr), side_dim(shape[1], kc))
            else:
                out = (side_dim(shape[0], k * k if name not in dims else int(k)),)
            stop = start + math.prod(out)
            blocks.append(Block(name, tuple(shape), out, start, stop))
            start = stop
        return cls(blocks, seed, kind)

    def describe(self) -> dict:
        """A JSON-able description from which from_description rebuilds the same matrices."""
        return {"seed": self.seed, "kind": self.kind, "dim": self.dim,
                "blocks": [[b.name, list(b.shape), list(b.dims), b.start, b.stop] for b in self.blocks]}

    @classmethod
    def from_description(cls, desc: dict):
        blocks = [Block(n, tuple(s), tuple(d), a, b) for n, s, d, a, b in desc["blocks"]]
        return cls(blocks, desc["seed"], desc["kind"])

    def block(self, name: str) -> Block:
        return self._by_name[name]

    def matrices(self, name: str) -> tuple:
        """(P_r, P_c) or (P,): [k, n] float64 CPU tensors drawn from the seed and the name; None: kept whole."""
        b = self._by_name[name]
        return tuple(None if k == n else _draw(self.kind, k, n, self.seed, f"{name}/{i}")
                     for i, (n, k) in enumerate(zip(b.shape, b.dims)))

    def __eq__(self, other):
        return isinstance(other, Projection) and json.dumps(self.describe()) == json.dumps(other.describe())

    def __repr__(self):
        return f"Projection({len(self.blocks)} parameters, {self.dim} columns, seed={self.seed}, kind={self.kind!r})"


def _columns(shapes: dict, dims: dict) -> int:
    """Columns of the parameters with explicit dims."""
    total = 0
    for name, k in dims.items():
        shape = shapes[name]
        if len(shape) == 2:
            kr, kc = (k, k) if isinstance(k, int) else tuple(k)
            total += side_dim(shape[0], kr) * side_dim(shape[1], kc)
        else:
            total += side_dim(shape[0], int(k))
    return total


def _by_size(shapes: dict, total: int) -> dict:
    """{name: (k_r, k_c) or k}: columns ∝ √(size) of each parameter, within `total`."""
    if total is None or total < len(shapes):
        raise ValueError(f"projection total={total} is below one column per valued parameter ({len(shapes)})")
    weights = {n: math.sqrt(math.prod(sh)) for n, sh in shapes.items()}
    norm = sum(weights.values())
    dims = {}
    for name, shape in shapes.items():
        columns = max(1, int(total * weights[name] / norm))
        if len(shape) == 2:
            kr = min(shape[0], max(1, math.isqrt(columns)))
            dims[name] = (kr, min(shape[1], max(1, columns // kr)))
        else:
            dims[name] = min(shape[0], columns)
    return dims


def _side_for_total(shapes: dict, total: int) -> int:
    """The largest side k >= 1 whose columns over `shapes` fit `total`."""
    def columns(k):
        return sum(side_dim(s[0], k) * side_dim(s[1], k) if len(s) == 2 else side_dim(s[0], k * k)
                   for s in shapes.values())

    if total is None or total < columns(1):
        raise ValueError(f"projection total={total} is below one column per valued parameter ({columns(1)})")
    lo, hi = 1, max(max(s) for s in shapes.values())
    while lo < hi:  # columns(k) grows with k
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if columns(mid) <= total else (lo, mid - 1)
    return lo


def _draw(kind: str, k: int, n: int, seed: int, key: str) -> torch.Tensor:
    """A [k, n] float64 projection with E‖Px‖² = ‖x‖², from (seed, key) alone."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))
    if kind == "gaussian":
        return torch.randn((k, n), generator=gen, dtype=torch.float64) / math.sqrt(k)
    if kind == "rademacher":
        return (torch.randint(0, 2, (k, n), generator=gen).to(torch.float64) * 2 - 1) / math.sqrt(k)
    q, _ = torch.linalg.qr(torch.randn((n, k), generator=gen, dtype=torch.float64))  # [n, k] orthonormal columns
    return q.t().contiguous() * math.sqrt(n / k)


def projection_shape(rule, local: str, param) -> tuple:
    """The shape a parameter's gradient is projected in: (r, c) for a parameter the rule factors (``factored``:
    G_i = Σ_t u_t v_tᵀ in the layout [shape[0], rest]), else (numel,)."""
    if local in getattr(rule, "factored", ()):
        return (param.shape[0], param.numel() // param.shape[0])
    return (param.numel(),)


def project_rows(layer, act_tr, grad_tr, mats: tuple, val_grads: dict, own_val: list) -> list:
    """Per parameter of the layer, [rows + 1, k]: Π_i of the training rows (this layer's use of the parameter),
    then the projection of its validation gradient (zero where ``own_val`` is False: a tied parameter's later use,
    whose G_val the first use holds; zero without validation rows). ``mats``: two per parameter (see above)."""
    by_local = {local: (mats[2 * j], mats[2 * j + 1]) for j, local in enumerate(layer.params)}
    rule, module = layer.rule, layer.module
    if hasattr(rule, "per_sample_projection"):
        rows = rule.per_sample_projection(module, act_tr, grad_tr, by_local)
    else:  # explicit per-sample gradients (norm layers: [rows, n], small)
        grads = rule.per_sample_grads(module, act_tr, grad_tr)
        rows = {local: vector_projection(grads[local], by_local[local]) for local in layer.params}
    out = []
    for (local, p), own in zip(zip(layer.params, layer.tensors), own_val):
        r = rows[local]
        if own and local in val_grads:
            v = dense_projection(val_grads[local], by_local[local], projection_shape(rule, local, p)).to(r.dtype)
        else:
            v = r.new_zeros(r.shape[1])
        out.append(torch.cat([r, v[None]]))
    return out
