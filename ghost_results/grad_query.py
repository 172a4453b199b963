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

Every chunk costs one float32 GEMM (one per checkpoint met in the chunk for trajectories, usually one), an
argpartition for the running top-k of every query and one bincount for the per-domain totals: no Python loop
runs per row, so the time is the store's read time plus the GEMM's.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ghost_common.durable import write_atomically
from ghost_results.grad_store import GradStore

SCORES = ("raw", "cosine", "precond")
PRECONDITIONER_FILE = "preconditioner.npz"
PRECONDITIONER_FORMAT = "ghost.grad_store.preconditioner.v1"
_DOCUMENT_PARTIALS_MAX = 2_000_000  # per-document partial sums kept before they are summed up again


@dataclass
class ScoreResult:
    """What score_store found. `top`: query, rank (0 = best), score, store_row, step, row, domain, doc_id,
    token_offset, lr, weight (the `top` best rows of every query). `domains`: query, domain, total (the sum
    of every row's score), n_rows. `documents` (trajectories only): query, doc_id, domain, score (summed over
    the document's rows at every step), n_rows, best first within each query."""

    score: str
    top: pd.DataFrame
    domains: pd.DataFrame
    documents: pd.DataFrame | None
    n_rows: int


def score_store(store, queries, score: str = "raw", top: int = 20, chunk_rows: int = 65536,
                preconditioner: "Preconditioner | None" = None, trajectory: bool = False) -> ScoreResult:
    """Score every row of `store` (a GradStore or its directory) against `queries` (float [Q, K], or with
    trajectory=True {checkpoint step: [Q, K]}); see the module docstring. For score="precond" without a
    preconditioner, the store's saved one is used or fitted (and saved) with the defaults."""
    store = store if isinstance(store, GradStore) else GradStore(store)
    if score not in SCORES:
        raise ValueError(f"score={score!r}: one of {', '.join(SCORES)}")
    if int(top) < 1:
        raise ValueError(f"top={top}: at least 1")
    checkpoints, query_sets = _query_sets(queries, trajectory, store.dim)
    if score == "precond":
        if preconditioner is None:
            preconditioner = Preconditioner.load_or_fit(store, chunk_rows=chunk_rows)
        query_sets = [preconditioner.apply(q) for q in query_sets]
    if score == "cosine":
        query_sets = [_unit_rows(q) for q in query_sets]
    matrices = [np.ascontiguousarray(q.T, dtype=np.float32) for q in query_sets]  # [K, Q] each
    n_queries = matrices[0].shape[1]
    best = _RunningTop(n_queries, int(top))
    totals = _DomainTotals(len(store.domains), n_queries)
    documents = _DocumentTotals(n_queries) if trajectory else None
    for start, rows, prov in store.iter_chunks(chunk_rows):
        if trajectory:
            scores = _trajectory_scores(rows, prov, checkpoints, matrices)
        else:
            scores = rows @ matrices[0]  # [n, Q]
        if score == "cosine":
            scores = _divide_by_row_norms(scores, rows)
        if trajectory:
            scores *= (prov["lr"] * prov["weight"]).astype(np.float32)[:, None]
            documents.add(prov, scores)
        best.add(start, scores)
        totals.add(prov["domain"], scores)
    return ScoreResult(score=score, top=_top_frame(store, *best.result()),
                       domains=totals.frame(store.domains),
                       documents=documents.frame(store.domains) if trajectory else None, n_rows=store.n_rows)


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


def _trajectory_scores(rows, prov, checkpoints, matrices) -> np.ndarray:
    """<row, q(c(step))> [n, Q]: one GEMM per checkpoint the chunk's rows use, on a slice where they are
    contiguous (rows are stored in step order), else on the rows picked out."""
    which = nearest_checkpoint(prov["step"], checkpoints)
    changes = np.flatnonzero(np.diff(which)) + 1
    bounds = np.concatenate([[0], changes, [len(which)]])
    if len(bounds) - 1 <= len(np.unique(which)):
        if len(bounds) == 2:
            return rows @ matrices[which[0]]
        scores = np.empty((len(rows), matrices[0].shape[1]), dtype=np.float32)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            scores[a:b] = rows[a:b] @ matrices[which[a]]
        return scores
    scores = np.empty((len(rows), matrices[0].shape[1]), dtype=np.float32)
    for index in np.unique(which).tolist():
        picked = which == index
        scores[picked] = rows[picked] @ matrices[index]
    return scores


def _unit_rows(q: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    return np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)


def _divide_by_row_norms(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float32))[:, None]
    return np.divide(scores, norms, out=np.zeros_like(scores), where=norms > 0)


class _RunningTop:
    """The `top` highest scores of every query seen so far, with their store rows."""

    def __init__(self, n_queries: int, top: int):
        self.top = top
        self.scores = np.empty((n_queries, 0), dtype=np.float32)
        self.rows = np.empty((n_queries, 0), dtype=np.int64)

    def add(self, start: int, scores: np.ndarray) -> None:
        n = len(scores)
        if n > self.top:
            picked = np.argpartition(scores, n - self.top, axis=0)[n - self.top:]  # [top, Q]
        else:
            picked = np.broadcast_to(np.arange(n)[:, None], scores.shape)
        merged_scores = np.concatenate([self.scores, np.take_along_axis(scores, picked, axis=0).T], axis=1)
        merged_rows = np.concatenate([self.rows, picked.T + start], axis=1)
        if merged_scores.shape[1] > self.top:
            keep = np.argpartition(merged_scores, merged_scores.shape[1] - self.top, axis=1)[:, -self.top:]
            merged_scores = np.take_along_axis(merged_scores, keep, axis=1)
            merged_rows = np.take_along_axis(merged_rows, keep, axis=1)
        self.scores, self.rows = merged_scores, merged_rows

    def result(self):
        """(scores [Q, k], store rows [Q, k]) best first; equal scores by store row."""
        order = np.lexsort((self.rows, -self.scores.astype(np.float64)), axis=1)
        return np.take_along_axis(self.scores, order, axis=1), np.take_along_axis(self.rows, order, axis=1)


class _DomainTotals:
    """Per (domain, query): the sum of the scores (float64) and the number of rows."""

    def __init__(self, n_domains: int, n_queries: int):
        self.sums = np.zeros((n_domains, n_queries))
        self.counts = np.zeros(n_domains, dtype=np.int64)

    def add(self, domains: np.ndarray, scores: np.ndarray) -> None:
        n_domains, n_queries = self.sums.shape
        cells = (domains.astype(np.int64)[:, None] * n_queries + np.arange(n_queries)).ravel()
        self.sums += np.bincount(cells, weights=scores.ravel(), minlength=n_domains * n_queries).reshape(
            n_domains, n_queries)
        self.counts += np.bincount(domains, minlength=n_domains)

    def frame(self, names) -> pd.DataFrame:
        n_domains, n_queries = self.sums.shape
        return pd.DataFrame({"query": np.repeat(np.arange(n_queries), n_domains),
                             "domain": np.tile(np.asarray(names, dtype=object), n_queries),
                             "total": self.sums.T.ravel(), "n_rows": np.tile(self.counts, n_queries)})


class _DocumentTotals:
    """Per (doc_id, domain): the sum of every query's scores over the document's rows (all steps)."""

    def __init__(self, n_queries: int):
        self.columns = [f"q{j}" for j in range(n_queries)]
        self.partials, self.n_partial = [], 0

    def add(self, prov: np.ndarray, scores: np.ndarray) -> None:
        frame = pd.DataFrame(scores.astype(np.float64), columns=self.columns)
        frame["doc_id"], frame["domain"], frame["n_rows"] = prov["doc_id"], prov["domain"], 1
        self.partials.append(frame.groupby(["doc_id", "domain"], sort=False).sum())
        self.n_partial += len(self.partials[-1])
        if self.n_partial > _DOCUMENT_PARTIALS_MAX:
            self.partials = [self._summed()]
            self.n_partial = len(self.partials[0])

    def _summed(self) -> pd.DataFrame:
        return pd.concat(self.partials).groupby(level=["doc_id", "domain"]).sum()

    def frame(self, names) -> pd.DataFrame:
        summed = self._summed() if self.partials else pd.DataFrame(
            columns=self.columns + ["n_rows"], index=pd.MultiIndex.from_arrays([[], []], names=["doc_id", "domain"]))
        long = summed.reset_index().melt(id_vars=["doc_id", "domain", "n_rows"], value_vars=self.columns,
                                         var_name="query", value_name="score")
        long["query"] = long["query"].str[1:].astype(np.int64)
        long["domain"] = np.asarray(names, dtype=object)[long["domain"].to_numpy(dtype=np.int64)]
        long = long.sort_values(["query", "score", "doc_id"], ascending=[True, False, True], ignore_index=True)
        return long[["query", "doc_id", "domain", "score", "n_rows"]]


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
