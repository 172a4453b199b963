"""Scores of a gradient store's rows against query vectors (docs/DESIGN.md section 8), streamed chunk by chunk:
`score_store` and the per-block `Preconditioner`. Storage (the files, their checks) is `ghost_results.grad_store`'s.

For a stored row Π_i (float32 [K]) and a query q ([K], the same projection of a query's gradient):

    raw       <Π_i, q>
    cosine    <Π_i, q> / (‖Π_i‖ ‖q‖)       (0 for a zero row or a zero query)
    precond   <Π_i, F⁻¹ q>, F⁻¹ = per block b, (F_b + λ_b I)⁻¹, F_b = (1/N) Σ_i Π_i,b Π_i,bᵀ over the store's
              N rows, λ_b = damping · trace(F_b) / k_b (LoGra, TRAK); the queries are preconditioned once

With trajectory=True the queries are {checkpoint step: [Q, K]} (the same queries projected at several
checkpoints) and row i scores lr_i · weight_i · s(Π_i, q(c(step_i))), c(step) the nearest checkpoint step
(ties: the earlier), s one of the scores above: summed over a run's rows this estimates the in-run first-order
value (Σ_t η_t w_i <∇ℓ_i,t, ∇ℓ_q>).

The stored rows are read from the memory-mapped shards (each verified first; the next ones are verified in
background threads meanwhile) and scored a block of about 2 MiB of float32 at a time: converted to float32 in a
buffer that stays in the cache, one float32 GEMM (one per checkpoint met in the block for trajectories, usually
one), for cosine the row norms from the same buffer; the blocks are shared by one worker thread per CPU, each
with a single-threaded BLAS. Per chunk, a comparison with the running top-k's thresholds and one bincount per
query for the per-domain totals; no Python loop runs per row. What bounds the time (docs/BENCHMARKS.md,
"Gradient store queries"): the bfloat16 conversion and the memory read at few queries, the GEMM's flops at
many (2·Q flops per stored byte of bfloat16), sha256 in a reader's first pass.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import ThreadpoolController

from ghost_common.durable import write_atomically
from ghost_results.grad_store import GradStore, to_float32, usable_cpus

SCORES = ("raw", "cosine", "precond")
PRECONDITIONER_FILE = "preconditioner.npz"
PRECONDITIONER_FORMAT = "ghost.grad_store.preconditioner.v1"
_DOCUMENT_CELLS_MAX = 16 * 2**20  # scores (rows × queries) held for the per-document totals before grouped
_BLAS_LIMITS = ThreadpoolController()


@dataclass
class ScoreResult:
    """What score_store found. `top`: query, rank (0 = best), score, store_row, step, row, domain, doc_id,
    token_offset, lr, weight (the `top` best rows of every query). `domains`: query, domain, total (the sum
    of every row's score), n_rows. `documents` (trajectories only): query, rank, doc_id, domain, score (summed
    over the document's rows at every step), n_rows: the `top` best documents of every query."""

    score: str
    top: pd.DataFrame
    domains: pd.DataFrame
    documents: pd.DataFrame | None
    n_rows: int


def score_store(store, queries, score: str = "raw", top: int = 20, chunk_rows: int = 65536,
                preconditioner: "Preconditioner | None" = None, trajectory: bool = False,
                threads: int | None = None) -> ScoreResult:
    """Score every row of `store` (a GradStore or its directory) against `queries` (float [Q, K], or with
    trajectory=True {checkpoint step: [Q, K]}); see the module docstring. For score="precond" without a
    preconditioner, the store's saved one is used or fitted (and saved) with the defaults. `threads`: workers
    scoring blocks of rows (default: the CPUs this process may use); BLAS runs single-threaded meanwhile."""
    store = store if isinstance(store, GradStore) else GradStore(store)
    if score not in SCORES:
        raise ValueError(f"score={score!r}: one of {', '.join(SCORES)}")
    if int(top) < 1:
        raise ValueError(f"top={top}: at least 1")
    checkpoints, query_sets = _query_sets(queries, trajectory, store.dim)
    if score == "precond":
        if preconditioner is None:
            preconditioner = Preconditioner.load_or_fit(store, chunk_rows=chunk_rows)
        elif preconditioner.fingerprint != store.fingerprint():
            raise ValueError("the preconditioner was fitted on other rows than this store's (another store, or this "
                             "one before rows were appended or dropped): fit it on this store")
        with _BLAS_LIMITS.limit(limits=1, user_api="blas"):  # small products: threads only wait for each other
            query_sets = [preconditioner.apply(q) for q in query_sets]
    if score == "cosine":
        query_sets = [_unit_rows(q) for q in query_sets]
    matrices = [np.ascontiguousarray(q.T, dtype=np.float32) for q in query_sets]  # [K, Q] each
    n_queries = matrices[0].shape[1]
    best = _RunningTop(n_queries, int(top))
    totals = _DomainTotals(len(store.domains), n_queries)
    scorer = _ChunkScorer(store.dim, store.dtype, n_queries, cosine=score == "cosine",
                          threads=usable_cpus() if threads is None else int(threads))
    documents = _DocumentTotals(n_queries, scorer.threads) if trajectory else None

    def take(start, prov, scores):  # [n, Q]: the chunk's buffer, reused two chunks later
        if not np.isfinite(scores).all():  # float32 overflow of stored values near its range: no ranking holds
            row = start + int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])
            raise FloatingPointError(f"the score of store row {row} is not finite in float32 (its values or the "
                                     "queries' are too large to multiply); rescale the queries")
        if trajectory:
            scores *= (prov["lr"] * prov["weight"]).astype(np.float32)[:, None]
            documents.add(prov, scores)
        best.add(start, scores)
        totals.add(prov["domain"], scores)

    try:
        with _BLAS_LIMITS.limit(limits=1, user_api="blas"):
            previous = None  # taken while the workers score the next chunk
            for start, stored, prov in store.iter_stored(chunk_rows):
                which = nearest_checkpoint(prov["step"], checkpoints) if trajectory else None
                scoring = scorer.submit(stored, matrices, which)
                if previous is not None:
                    take(previous[0], previous[1], previous[2]())
                previous = start, prov, scoring
            if previous is not None:
                take(previous[0], previous[1], previous[2]())
    finally:
        scorer.close()
    return ScoreResult(score=score, top=_top_frame(store, *best.result()),
                       domains=totals.frame(store.domains),
                       documents=documents.frame(store.domains, int(top)) if trajectory else None, n_rows=store.n_rows)


def _query_sets(queries, trajectory: bool, dim: int):
    """(sorted checkpoint steps or None, [float64 [Q, K] per checkpoint]), checked."""
    if trajectory != isinstance(queries, dict):
        raise ValueError("trajectory=True takes queries as {checkpoint step: [Q, K]}, trajectory=False one "
                         f"array [Q, K]; got {type(queries).__name__} with trajectory={trajectory}")
    named = sorted(queries.items()) if trajectory else [(None, queries)]
    if not named:
        raise ValueError("no checkpoints in the queries")
    sets = []
    for step, q in named:
        q = np.asarray(q, dtype=np.float64)
        q = q[None, :] if q.ndim == 1 else q
        where = "" if step is None else f" of checkpoint {step}"
        if q.ndim != 2 or q.shape[1] != dim or len(q) == 0:
            raise ValueError(f"queries{where} have shape {q.shape}; the store's rows have {dim} columns: "
                             f"expected [Q, {dim}]")
        if not np.isfinite(q).all():
            raise ValueError(f"queries{where} hold NaN or inf")
        if sets and q.shape != sets[0].shape:
            raise ValueError(f"queries{where} have shape {q.shape}, those of the first checkpoint {sets[0].shape}")
        sets.append(q)
    steps = np.array([int(step) for step, _ in named], dtype=np.int64) if trajectory else None
    return steps, sets


def nearest_checkpoint(steps: np.ndarray, checkpoints: np.ndarray) -> np.ndarray:
    """Index into sorted `checkpoints` of the nearest one to every step (ties: the earlier checkpoint)."""
    after = np.clip(np.searchsorted(checkpoints, steps, side="left"), 1, max(len(checkpoints) - 1, 1))
    before = after - 1
    if len(checkpoints) == 1:
        return np.zeros(len(steps), dtype=np.int64)
    take_before = (steps - checkpoints[before]) <= (checkpoints[after] - steps)
    return np.where(take_before, before, after)


class _ChunkScorer:
    """Scores of chunks of stored rows: float32 [n, Q], into two arrays used in turn (a chunk's scores are
    taken while the next chunk is scored).

    The rows are converted to float32 a block at a time (BLOCK_BYTES of float32, so that the block is still in
    the cache when the GEMM and, for cosine, the row norms read it), and each block's GEMM writes its slice of
    the scores: one pass over the stored bytes, none over a chunk-sized float32 copy. `threads` workers take
    the blocks in turn, each converting and multiplying its own with a single-threaded BLAS (numpy's ufuncs
    and BLAS release the GIL): on a loaded machine a multi-threaded BLAS call on such blocks waits for its
    slowest thread every call, and was measured 10-30x slower on the 2-core VM (docs/BENCHMARKS.md)."""

    BLOCK_BYTES = 2 * 2**20

    def __init__(self, dim: int, dtype: str, n_queries: int, cosine: bool, threads: int):
        self.dim, self.dtype, self.cosine, self.threads = dim, dtype, cosine, threads
        self.block_rows = max(1, self.BLOCK_BYTES // (4 * dim))
        self.outs = [np.empty((0, n_queries), dtype=np.float32) for _ in range(2)]
        self.turn = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grad_query") if threads > 1 else None
        self._lock = threading.Lock()
        self._local = threading.local()  # each thread's float32 block

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def submit(self, stored: np.ndarray, matrices: list, which: np.ndarray | None = None):
        """Start scoring every stored row [n, K] against matrices[0] [K, Q] (or, with `which` [n], against
        matrices[which[i]]: the trajectory's checkpoint of every row), divided by the row norms for cosine;
        returns a function that waits and returns the scores [n, Q]. At most two chunks at a time."""
        n = len(stored)
        self.turn = 1 - self.turn
        if len(self.outs[self.turn]) < n:
            self.outs[self.turn] = np.empty((n, self.outs[self.turn].shape[1]), dtype=np.float32)
        out = self.outs[self.turn][:n]
        starts = iter(range(0, n, self.block_rows))
        if self._pool is None:
            self._work(starts, stored, matrices, which, out)
            return lambda: out
        running = [self._pool.submit(self._work, starts, stored, matrices, which, out) for _ in range(self.threads)]

        def result():
            for worker in running:
                worker.result()
            return out
        return result

    def _work(self, starts, stored, matrices, which, out) -> None:
        """Score blocks taken from `starts` (shared by the workers) until none is left."""
        block = getattr(self._local, "block", None)
        if block is None:
            block = self._local.block = np.empty((self.block_rows, self.dim), dtype=np.float32)
        while True:
            with self._lock:
                a = next(starts, None)
            if a is None:
                return
            b = min(a + self.block_rows, len(stored))
            rows = to_float32(stored[a:b], self.dtype, out=block[:b - a])
            if which is None:
                np.matmul(rows, matrices[0], out=out[a:b])
            else:
                _trajectory_scores(rows, which[a:b], matrices, out[a:b])
            if self.cosine:
                _divide_by_row_norms(out[a:b], rows)


def _trajectory_scores(rows, which, matrices, out) -> None:
    """out = <row, q(c(step))> [n, Q]: one GEMM per checkpoint the rows use, on a slice where they are
    contiguous (rows are stored in step order), else on the rows picked out."""
    changes = np.flatnonzero(np.diff(which)) + 1
    bounds = np.concatenate([[0], changes, [len(which)]])
    if len(bounds) - 1 <= len(np.unique(which)):
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            np.matmul(rows[a:b], matrices[which[a]], out=out[a:b])
        return
    for index in np.unique(which).tolist():
        picked = which == index
        out[picked] = rows[picked] @ matrices[index]


def _unit_rows(q: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    return np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)


def _row_dots(rows: np.ndarray) -> np.ndarray:
    """<row, row> for every row of rows [n, K] (float32): np.vecdot, 3-4x faster than einsum (numpy >= 2)."""
    if hasattr(np, "vecdot"):
        return np.vecdot(rows, rows)
    return np.einsum("ij,ij->i", rows, rows, dtype=np.float32)


def _divide_by_row_norms(scores: np.ndarray, rows: np.ndarray) -> None:
    """scores [n, Q] /= the norms of rows [n, K] (float32), in place; 0 for a zero row."""
    norms = np.sqrt(_row_dots(rows))
    zero = norms == 0
    norms[zero] = 1
    np.divide(scores, norms[:, None], out=scores)
    scores[zero] = 0


class _RunningTop:
    """The `top` highest scores of every query seen so far, with their store rows; equal scores go to the
    earlier row. Once a query holds `top` rows, a row of a later chunk enters only above the lowest of them,
    so after the first chunk a chunk costs one comparison per score and a merge of the few that pass."""

    def __init__(self, n_queries: int, top: int):
        self.top, self.n_queries = top, n_queries
        self.queries = np.empty(0, dtype=np.int64)  # kept entries, sorted by (query, -score, store row)
        self.rows = np.empty(0, dtype=np.int64)
        self.scores = np.empty(0, dtype=np.float32)
        self.threshold = np.full(n_queries, -np.inf, dtype=np.float32)  # the lowest kept score once full

    def add(self, start: int, scores: np.ndarray) -> None:
        n = len(scores)
        above = scores > self.threshold  # [n, Q]
        crowded = np.flatnonzero(np.count_nonzero(above, axis=0) > self.top)
        if len(crowded):  # the chunk's own top (and ties) of these queries
            columns = np.ascontiguousarray(scores[:, crowded].T)  # [c, n]
            kth = np.partition(columns, n - self.top, axis=1)[:, n - self.top]
            above[:, crowded] &= scores[:, crowded] >= kth
        new_rows, new_queries = np.nonzero(above)
        queries = np.concatenate([self.queries, new_queries])
        rows = np.concatenate([self.rows, new_rows + start])
        values = np.concatenate([self.scores, scores[new_rows, new_queries]])
        order = np.lexsort((rows, -values.astype(np.float64), queries))
        queries, rows, values = queries[order], rows[order], values[order]
        rank = np.arange(len(queries)) - np.searchsorted(queries, np.arange(self.n_queries))[queries]
        keep = rank < self.top
        self.queries, self.rows, self.scores = queries[keep], rows[keep], values[keep]
        if len(self.queries) == self.top * self.n_queries:  # every query full (they fill up together)
            self.threshold = self.scores[self.top - 1::self.top].copy()

    def result(self):
        """(scores [Q, k], store rows [Q, k]) best first; equal scores by store row."""
        shape = (self.n_queries, len(self.queries) // self.n_queries)
        return self.scores.reshape(shape), self.rows.reshape(shape)


class _DomainTotals:
    """Per (domain, query): the sum of the scores (float64) and the number of rows."""

    def __init__(self, n_domains: int, n_queries: int):
        self.sums = np.zeros((n_domains, n_queries))
        self.counts = np.zeros(n_domains, dtype=np.int64)

    def add(self, domains: np.ndarray, scores: np.ndarray) -> None:
        n_domains = len(self.counts)
        domains = domains.astype(np.intp)
        for query, column in enumerate(scores.T.astype(np.float64)):  # one bincount a query: 22 bins stay in cache
            self.sums[:, query] += np.bincount(domains, weights=column, minlength=n_domains)
        self.counts += np.bincount(domains, minlength=n_domains)

    def frame(self, names) -> pd.DataFrame:
        n_domains, n_queries = self.sums.shape
        return pd.DataFrame({"query": np.repeat(np.arange(n_queries), n_domains),
                             "domain": np.tile(np.asarray(names, dtype=object), n_queries),
                             "total": self.sums.T.ravel(), "n_rows": np.tile(self.counts, n_queries)})


class _DocumentTotals:
    """Per (doc_id, domain): the sum of every query's scores over the document's rows (all steps), float64.
    The chunks' scores are kept as they come, one contiguous row per query, and grouped by document at the
    end one query at a time (on `threads` threads), keeping only each query's best documents; before the end
    only when they hold more than _DOCUMENT_CELLS_MAX scores and twice the documents of the last grouping (so
    a grouping sorts at most three times the rows it keeps)."""

    def __init__(self, n_queries: int, threads: int):
        self.n_queries, self.threads = n_queries, threads
        self.parts = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((n_queries, 0)),
                       np.empty(0, np.int64))]  # (doc_ids [n], domains [n], scores [Q, n], n_rows [n])
        self.held = self.grouped = 0  # rows in parts; documents the last grouping left

    def add(self, prov: np.ndarray, scores: np.ndarray) -> None:
        self.parts.append((prov["doc_id"].astype(np.int64), prov["domain"].astype(np.int64),
                           scores.T.copy(), np.ones(len(scores), dtype=np.int64)))  # a copy: the buffer is reused
        self.held += len(scores)
        if self.held * self.n_queries > _DOCUMENT_CELLS_MAX and self.held > 2 * self.grouped:
            groups, n_rows = self._grouping()
            self.parts = [(groups.doc_ids, groups.domains, np.stack(self._each_query(groups.sums)), n_rows)]
            self.held = self.grouped = len(n_rows)

    def _grouping(self) -> tuple:
        """(the parts' rows grouped by document, the documents' numbers of rows)."""
        groups = _Documents(*(np.concatenate([part[i] for part in self.parts]) for i in (0, 1)))
        return groups, groups.sums(np.concatenate([part[3] for part in self.parts]))

    def _each_query(self, function) -> list:
        """[function(every part's scores of query q, concatenated) for q in range(Q)], on the threads."""
        column = lambda q: function(np.concatenate([part[2][q] for part in self.parts]))
        if self.threads < 2 or self.n_queries < 2:
            return [column(q) for q in range(self.n_queries)]
        with ThreadPoolExecutor(min(self.threads, self.n_queries), thread_name_prefix="grad_query") as pool:
            return list(pool.map(column, range(self.n_queries)))

    def frame(self, names, top: int) -> pd.DataFrame:
        """The `top` best documents of every query, best first; equal scores by (doc_id, domain)."""
        groups, n_rows = self._grouping()

        def best(column):
            sums = groups.sums(column)
            picked = _best_first(sums, top)
            return picked, sums[picked]
        picked, scores = zip(*self._each_query(best))
        order = np.concatenate(picked)
        return pd.DataFrame({"query": np.repeat(np.arange(self.n_queries, dtype=np.int64), [len(p) for p in picked]),
                             "rank": np.concatenate([np.arange(len(p)) for p in picked]),
                             "doc_id": groups.doc_ids[order],
                             "domain": np.asarray(names, dtype=object)[groups.domains[order]],
                             "score": np.concatenate(scores), "n_rows": n_rows[order]})


class _Documents:
    """Rows grouped by their (doc_id, domain) keys: the distinct keys, sorted, and `sums` of a value per row
    over each key's rows. A key of one row is copied, and only the rows of the others go through reduceat."""

    def __init__(self, doc_ids: np.ndarray, domains: np.ndarray):
        order = np.lexsort((domains, doc_ids))
        doc_ids, domains = doc_ids[order], domains[order]
        starts = np.flatnonzero(np.concatenate([[len(order) > 0],
                                                (doc_ids[1:] != doc_ids[:-1]) | (domains[1:] != domains[:-1])]))
        self.doc_ids, self.domains = doc_ids[starts], domains[starts]
        lengths = np.diff(starts, append=len(order))
        self.firsts = order[starts]
        self.several = np.flatnonzero(lengths > 1)
        self.rows = order[np.repeat(lengths > 1, lengths)]  # the rows of those keys, key by key
        self.bounds = np.concatenate([[0], np.cumsum(lengths[self.several])[:-1]]).astype(np.intp)

    def sums(self, values: np.ndarray) -> np.ndarray:
        """values [n] (one per row): their sums per key [u]; float64 for floats."""
        kind = np.float64 if values.dtype.kind == "f" else values.dtype
        sums = values[self.firsts].astype(kind)
        if len(self.several):
            sums[self.several] = np.add.reduceat(values[self.rows].astype(kind), self.bounds)
        return sums


def _best_first(scores: np.ndarray, top: int) -> np.ndarray:
    """Indices of the `top` highest of `scores` (1-D), best first, equal scores by index: a full stable sort's
    first `top`, found by one partition (linear) and a sort of the few at or above the top-th score."""
    if len(scores) > top:
        kth = np.partition(scores, len(scores) - top)[len(scores) - top]
        candidates = np.flatnonzero(scores >= kth)  # ascending: the stable sort below keeps index order for ties
    else:
        candidates = np.arange(len(scores))
    return candidates[np.argsort(-scores[candidates], kind="stable")][:top]


def _top_frame(store: GradStore, scores: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
    n_queries, k = scores.shape
    prov = store.provenance(rows.ravel())
    frame = pd.DataFrame({"query": np.repeat(np.arange(n_queries), k), "rank": np.tile(np.arange(k), n_queries),
                          "score": scores.ravel()})
    for name in ("store_row", "step", "row", "domain", "doc_id", "token_offset", "lr", "weight"):
        frame[name] = prov[name].to_numpy()
    return frame


# ---------------------------------------------------------------------------
# The preconditioner


class Preconditioner:
    """(F_b + λ_b I)⁻¹ for every block b of a store (module docstring). A block of k_b <= max_dense columns
    keeps the dense inverse; a larger one F_b ≈ U Λ Uᵀ + diag(d) (`rank` directions from a randomized range
    finder with one power iteration, three passes over the store, refined as a factor model: _lowrank_part),
    inverted by Woodbury. Its error grows with the part of F_b outside the captured range that is not
    diagonal: measured in tests/test_grad_store.py (about 1% on a low-rank-plus-diagonal F). A block whose
    rows are all zero gets 0 (its scores are 0 whatever the query)."""

    def __init__(self, blocks, damping: float, parts: list, fingerprint: str, n_rows: int):
        self.blocks = [tuple(b) for b in blocks]
        self.damping = float(damping)
        self.parts = parts  # per block: {"kind": "dense", "inverse"} or {"kind": "lowrank", "U", "eigenvalues",
        #                     "diagonal", "lam"}
        self.fingerprint = fingerprint
        self.n_rows = int(n_rows)

    @classmethod
    def fit(cls, store, damping: float = 0.1, max_dense: int = 2048, rank: int = 256, chunk_rows: int = 65536,
            oversample: int = 10, seed: int = 0) -> "Preconditioner":
        """Fit on every row of `store` (a GradStore or its directory), accumulating in float64."""
        store = store if isinstance(store, GradStore) else GradStore(store)
        if store.n_rows == 0:
            raise ValueError(f"{store.directory}: the store is empty; nothing to fit a preconditioner on")
        rng = np.random.default_rng(seed)
        sketches = {}
        for index, (_, start, stop) in enumerate(store.blocks):
            width = stop - start
            if width > max_dense:
                sketches[index] = rng.standard_normal((width, min(width, rank + oversample)))
        moments, diagonals, ranges = _first_pass(store, chunk_rows, max_dense, sketches)
        bases = {index: np.linalg.qr(y)[0] for index, y in ranges.items()}  # range of F Ω
        projected = {}
        if bases:  # one power iteration (range of F² Ω), then F on that range for Rayleigh-Ritz
            bases = {index: np.linalg.qr(y)[0] for index, y in _product_pass(store, chunk_rows, bases).items()}
            projected = _product_pass(store, chunk_rows, bases)
        parts = []
        for index in range(len(store.blocks)):
            if index in moments:
                parts.append(_dense_part(moments[index] / store.n_rows, damping))
            else:
                parts.append(_lowrank_part(bases[index], projected[index] / store.n_rows,
                                           diagonals[index] / store.n_rows, damping, rank))
        return cls(store.blocks, damping, parts, store.fingerprint(), store.n_rows)

    def apply(self, queries) -> np.ndarray:
        """(F + λ I)⁻¹ q for every query row, block by block: float64 [Q, K]."""
        queries = np.asarray(queries, dtype=np.float64)
        queries = queries[None, :] if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.blocks[-1][2]:
            raise ValueError(f"queries of shape {queries.shape}; this preconditioner's blocks cover "
                             f"{self.blocks[-1][2]} columns")
        out = np.empty_like(queries)
        for (_, start, stop), part in zip(self.blocks, self.parts):
            out[:, start:stop] = _apply_part(part, queries[:, start:stop])
        return out

    def save(self, path) -> str:
        """Write to `path` (a .npz of plain arrays and a JSON header, no pickle), durably; a store directory
        means its preconditioner.npz. Returns the path written."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, PRECONDITIONER_FILE)
        header = {"format": PRECONDITIONER_FORMAT, "blocks": [list(b) for b in self.blocks],
                  "damping": self.damping, "fingerprint": self.fingerprint, "n_rows": self.n_rows,
                  "kinds": [p["kind"] for p in self.parts], "lams": [float(p.get("lam", 0.0)) for p in self.parts]}
        arrays = {"header": np.array(json.dumps(header))}
        for index, part in enumerate(self.parts):
            arrays.update({f"b{index}.{key}": value for key, value in part.items() if isinstance(value, np.ndarray)})
        write_atomically(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path, store: GradStore | None = None) -> "Preconditioner":
        """Read a saved preconditioner (a store directory means its preconditioner.npz); with `store`, refuse
        one fitted on other rows than the store holds now."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, PRECONDITIONER_FILE)
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            if header.get("format") != PRECONDITIONER_FORMAT:
                raise ValueError(f"{path}: not a gradient-store preconditioner ({PRECONDITIONER_FORMAT})")
            parts = []
            for index, kind in enumerate(header["kinds"]):
                part = {key.split(".", 1)[1]: npz[key] for key in npz.files if key.startswith(f"b{index}.")}
                parts.append(dict(part, kind=kind, lam=header["lams"][index]))
        loaded = cls(header["blocks"], header["damping"], parts, header["fingerprint"], header["n_rows"])
        if store is not None and loaded.fingerprint != store.fingerprint():
            raise ValueError(f"{path}: fitted on other rows than {store.directory} holds now (the store changed "
                             "since); fit it again")
        return loaded

    @classmethod
    def load_or_fit(cls, store, damping: float = 0.1, **fit_args) -> "Preconditioner":
        """The store's saved preconditioner if it was fitted on the store's current rows with `damping`, else
        a new fit, saved in the store directory."""
        store = store if isinstance(store, GradStore) else GradStore(store)
        path = os.path.join(store.directory, PRECONDITIONER_FILE)
        if os.path.exists(path):
            try:
                loaded = cls.load(path, store)
                if loaded.damping == float(damping):
                    return loaded
            except ValueError:
                pass
        fitted = cls.fit(store, damping=damping, **fit_args)
        fitted.save(path)
        return fitted


def _first_pass(store: GradStore, chunk_rows: int, max_dense: int, sketches: dict):
    """Σ xᵀx of the dense blocks; Σ x² and Σ xᵀ(x Ω) of the others (float64)."""
    moments, diagonals, ranges = {}, {}, {}
    for _, rows, _ in store.iter_chunks(chunk_rows):
        for index, (_, start, stop) in enumerate(store.blocks):
            block = rows[:, start:stop].astype(np.float64)
            if index in sketches:
                diagonals[index] = diagonals.get(index, 0.0) + np.einsum("ij,ij->j", block, block)
                ranges[index] = ranges.get(index, 0.0) + block.T @ (block @ sketches[index])
            else:
                moments[index] = moments.get(index, 0.0) + block.T @ block
    return moments, diagonals, ranges


def _product_pass(store: GradStore, chunk_rows: int, bases: dict) -> dict:
    """N F B = Σ xᵀ(x B) for every low-rank block's basis B (float64): one pass over the store."""
    projected = {}
    for _, rows, _ in store.iter_chunks(chunk_rows):
        for index, basis in bases.items():
            start, stop = store.blocks[index][1:]
            block = rows[:, start:stop].astype(np.float64)
            projected[index] = projected.get(index, 0.0) + block.T @ (block @ basis)
    return projected


def _dense_part(moment: np.ndarray, damping: float) -> dict:
    width = len(moment)
    lam = damping * np.trace(moment) / width
    if lam <= 0:
        return {"kind": "dense", "inverse": np.zeros((width, width)), "lam": 0.0}
    inverse = np.linalg.solve(moment + lam * np.eye(width), np.eye(width))
    return {"kind": "dense", "inverse": (inverse + inverse.T) / 2, "lam": float(lam)}


def _lowrank_part(basis: np.ndarray, projected: np.ndarray, diagonal: np.ndarray, damping: float, rank: int,
                  refinements: int = 20) -> dict:
    """F ≈ U M Uᵀ + diag(d) on the range basis B (F B = `projected`, diag(F) = `diagonal`): U the top `rank`
    Ritz vectors, then the principal-factor iteration M = Uᵀ F U − Uᵀ diag(d) U, d = diag(F) − diag(U M Uᵀ)
    (a contraction: |U_i|² < 1), so that the part of diag(F) inside the captured range is not counted twice.
    Exact when F is U M Uᵀ + diag(d) and the basis holds U's range."""
    small = basis.T @ projected
    eigenvalues, vectors = np.linalg.eigh((small + small.T) / 2)
    top = np.argsort(eigenvalues)[::-1][:rank]
    U, ritz = basis @ vectors[:, top], np.diag(eigenvalues[top])  # ritz = Uᵀ F U
    rest = diagonal - ((U @ ritz) * U).sum(axis=1)
    for _ in range(refinements):
        middle = ritz - U.T @ (U * np.clip(rest, 0, None)[:, None])
        rest = diagonal - ((U @ middle) * U).sum(axis=1)
    eigenvalues, vectors = np.linalg.eigh((middle + middle.T) / 2 if refinements else ritz)
    U, eigenvalues = U @ vectors, np.clip(eigenvalues, 0, None)
    rest = np.clip(diagonal - (U * U) @ eigenvalues, 0, None)
    lam = damping * diagonal.sum() / len(diagonal)
    return {"kind": "lowrank", "U": U, "eigenvalues": eigenvalues, "diagonal": rest, "lam": float(lam)}


def _apply_part(part: dict, q: np.ndarray) -> np.ndarray:
    """One block's (F_b + λ_b I)⁻¹ q; low-rank by Woodbury with W = U Λ^½, A = diag(d) + λ I:
    (A + W Wᵀ)⁻¹ = A⁻¹ − A⁻¹ W (I + Wᵀ A⁻¹ W)⁻¹ Wᵀ A⁻¹."""
    if part["kind"] == "dense":
        return q @ part["inverse"]
    if part["lam"] <= 0:
        return np.zeros_like(q)
    inv_a = 1.0 / (part["diagonal"] + part["lam"])  # [k]
    W = part["U"] * np.sqrt(part["eigenvalues"])  # [k, r]
    inner = np.eye(W.shape[1]) + W.T @ (W * inv_a[:, None])
    scaled = q * inv_a  # A⁻¹ q, [Q, k]
    return scaled - np.linalg.solve(inner, W.T @ scaled.T).T @ (W * inv_a[:, None]).T
