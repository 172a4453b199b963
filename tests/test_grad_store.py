"""ghost_results.grad_store and grad_query against plain numpy brute force (float64), torch's bfloat16 rounding,
and injected faults: damaged shards, crashes between a shard's files and its manifest, a second writer."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ghost_results import grad_query, grad_store
from ghost_results.grad_query import Preconditioner, nearest_checkpoint, score_store
from ghost_results.grad_store import (PROV_DTYPE, DamagedStore, GradStore, GradStoreWriter, StoreLocked,
                                      bytes_per_row)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = [["h.0.attn.c_attn.weight", 0, 6], ["h.0.mlp.c_fc.weight", 6, 16], ["lm_head.weight", 16, 20]]
DIM = 20
DOMAINS = np.array(["Pile-CC", "ArXiv", "Github"])


def make_batch(rng, steps, rows_per_step=3, dim=DIM, scale=1.0):
    """Rows [len(steps) * rows_per_step, dim] and their provenance dict (domain as strings)."""
    steps = np.repeat(np.asarray(steps), rows_per_step)
    n = len(steps)
    rows = (rng.standard_normal((n, dim)) * scale).astype(np.float32)
    prov = {"step": steps, "row": np.tile(np.arange(rows_per_step), n // rows_per_step),
            "doc_id": rng.integers(0, 7, n), "token_offset": rng.integers(0, 10**9, n),
            "domain": DOMAINS[rng.integers(0, len(DOMAINS), n)], "lr": 1e-3 * (1 + steps % 4),
            "weight": np.full(n, 1 / rows_per_step), "n_tokens": rng.integers(1, 1024, n)}
    return rows, prov


def all_rows(store, chunk_rows=5):
    return np.concatenate([rows.copy() for _, rows, _ in store.iter_chunks(chunk_rows)])


def bf16_reference(x):
    torch = pytest.importorskip("torch")
    return torch.tensor(x).to(torch.bfloat16).float().numpy()


# ---------------------------------------------------------------------------
# Storage


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    rows, prov = make_batch(np.random.default_rng(0), range(1, 9))
    with GradStoreWriter(tmp_path, BLOCKS, dtype=dtype, shard_rows=7) as writer:
        writer.append(rows, prov)
    store = GradStore(tmp_path)
    expected = rows.astype(dtype).astype(np.float32)
    assert store.dtype == dtype and store.dim == DIM and store.n_rows == len(rows)
    assert all_rows(store).tobytes() == expected.tobytes()
    assert store.rows([23, 0, 9]).tobytes() == expected[[23, 0, 9]].tobytes()


def test_bfloat16_rounds_to_nearest_even_like_torch(tmp_path):
    rng = np.random.default_rng(1)
    rows, prov = make_batch(rng, range(1, 5), dim=DIM)
    ties = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0xBF818000, 0x00008000, 0x7F7F0000], dtype=np.uint32)
    rows[0, :len(ties)] = ties.view(np.float32)  # exact halfway cases both ways, just above one, a denormal
    with GradStoreWriter(tmp_path, BLOCKS, shard_rows=5) as writer:
        writer.append(rows, prov)
    got = all_rows(GradStore(tmp_path), chunk_rows=3)
    assert got.tobytes() == bf16_reference(rows).tobytes()
    assert got[0, :2].view(np.uint32).tolist() == [0x3F800000, 0x3F820000]  # to even, not truncated
    # the documented by-hand reading gives the same numbers
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    u16 = np.load(tmp_path / manifest["shards"][0]["rows_file"], mmap_mode="r", allow_pickle=False)
    assert np.array_equal((u16.astype(np.uint32) << 16).view(np.float32), got[:5])
    assert bytes_per_row(4096, "bfloat16") == 4096 * 2 + 60 == 4096 * 2 + PROV_DTYPE.itemsize


def test_provenance_round_trips_with_domains_as_strings(tmp_path):
    rows, prov = make_batch(np.random.default_rng(2), [3, 4, 5])
    prov["lr"] = 6e-4  # a scalar: the same for every row
    with GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=4, meta={"identity": "run-a", "seed": 7}) as w:
        w.append(rows, prov)
    store = GradStore(tmp_path)
    frame = store.provenance()
    assert store.meta == {"identity": "run-a", "seed": 7}
    assert sorted(store.domains) == sorted(set(prov["domain"]))
    assert frame["store_row"].tolist() == list(range(len(rows)))
    for name in ("step", "row", "doc_id", "token_offset", "weight", "n_tokens"):
        assert np.array_equal(frame[name].to_numpy(), prov[name]), name
    assert (frame["lr"] == 6e-4).all() and frame["domain"].tolist() == prov["domain"].tolist()
    assert store.provenance([5, 1])["domain"].tolist() == prov["domain"][[5, 1]].tolist()


def test_append_across_sessions_shard_boundaries_and_flush(tmp_path):
    rng = np.random.default_rng(3)
    first, first_prov = make_batch(rng, range(1, 4), rows_per_step=3)    # 9 rows
    second, second_prov = make_batch(rng, range(4, 6), rows_per_step=4)  # 8 rows
    writer = GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=4)
    writer.append(first[:5], {k: v[:5] if np.ndim(v) else v for k, v in first_prov.items()})
    writer.append(first[5:], {k: v[5:] if np.ndim(v) else v for k, v in first_prov.items()})
    assert GradStore(tmp_path).n_rows == 8  # two full shards written, one row buffered
    writer.flush()
    assert [s["rows"] for s in GradStore(tmp_path).shards] == [4, 4, 1]
    writer.close()
    with GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=4) as writer:
        writer.append(second, second_prov)
        writer.append(second[:0], {k: v[:0] if np.ndim(v) else v for k, v in second_prov.items()})
    store = GradStore(tmp_path)
    assert [s["rows"] for s in store.shards] == [4, 4, 1, 4, 4]
    assert [(s["first_step"], s["last_step"]) for s in store.shards][-2:] == [(4, 4), (5, 5)]
    assert np.array_equal(all_rows(store, chunk_rows=3), np.concatenate([first, second]))
    assert store.provenance()["domain"].tolist() == [*first_prov["domain"], *second_prov["domain"]]


def test_a_store_of_other_blocks_dtype_or_identity_is_refused(tmp_path):
    rows, prov = make_batch(np.random.default_rng(4), [1])
    with GradStoreWriter(tmp_path, BLOCKS, meta={"identity": "run-a"}) as writer:
        writer.append(rows, prov)
    with pytest.raises(ValueError, match="dtype bfloat16, this writer was given float16"):
        GradStoreWriter(tmp_path, BLOCKS, dtype="float16")
    with pytest.raises(ValueError, match="blocks"):
        GradStoreWriter(tmp_path, [["h.0.attn.c_attn.weight", 0, 20]])
    with pytest.raises(ValueError, match="identity 'run-a'.*'run-b'.*never mix"):
        GradStoreWriter(tmp_path, BLOCKS, meta={"identity": "run-b"})
    with GradStoreWriter(tmp_path, BLOCKS, meta={"identity": "run-a"}) as writer:  # the same run: append
        writer.append(rows, prov)
    assert GradStore(tmp_path).n_rows == 2 * len(rows)
    with pytest.raises(ValueError, match="contiguous"):
        GradStoreWriter(tmp_path / "other", [["a", 0, 4], ["b", 5, 8]])


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with GradStoreWriter(tmp_path, BLOCKS):
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()} on"):
            GradStoreWriter(tmp_path, BLOCKS)
    GradStoreWriter(tmp_path, BLOCKS).close()  # released on close


def test_non_finite_or_overflowing_rows_are_refused(tmp_path):
    rows, prov = make_batch(np.random.default_rng(5), [1, 2])
    with GradStoreWriter(tmp_path, BLOCKS, dtype="float16", shard_rows=2) as writer:
        for bad in (np.nan, np.inf):
            broken = rows.copy()
            broken[4, 3] = bad
            with pytest.raises(ValueError, match="row 4 of the appended rows is not finite"):
                writer.append(broken, prov)
        broken = rows.copy()
        broken[2, 0] = 1e6  # finite, but not in float16
        with pytest.raises(ValueError, match="row 2 .* too large for float16"):
            writer.append(broken, prov)
        with pytest.raises(ValueError, match="missing \\['n_tokens'\\]"):
            writer.append(rows, {k: v for k, v in prov.items() if k != "n_tokens"})
    assert GradStore(tmp_path).n_rows == 0 and GradStore(tmp_path).domains == []


def write_three_shards(directory):
    rows, prov = make_batch(np.random.default_rng(6), range(1, 5))  # 12 rows
    with GradStoreWriter(directory, BLOCKS, dtype="float32", shard_rows=5) as writer:
        writer.append(rows, prov)
    return rows


def test_a_damaged_shard_is_named_and_refused(tmp_path):
    rows = write_three_shards(tmp_path)
    rows_file = tmp_path / "shard-000001.rows.npy"
    data = bytearray(rows_file.read_bytes())
    data[-7] ^= 0x10
    rows_file.write_bytes(bytes(data))
    store = GradStore(tmp_path)
    with pytest.raises(DamagedStore, match="shard-000001.rows.npy: its content differs from the sha256"):
        all_rows(store)
    assert np.array_equal(store.rows([0, 4, 11]), rows[[0, 4, 11]])  # the other shards still read
    with pytest.raises(DamagedStore, match="shard-000001"):
        store.rows([6])

    prov_file = tmp_path / "shard-000002.prov.npy"
    prov_file.write_bytes(prov_file.read_bytes()[:-10])
    with pytest.raises(DamagedStore, match="shard-000002.prov.npy: .* bytes, the manifest says"):
        GradStore(tmp_path).rows([11])
    os.remove(tmp_path / "shard-000000.prov.npy")
    with pytest.raises(DamagedStore, match="shard-000000.prov.npy: missing"):
        GradStore(tmp_path).provenance()


def test_a_shard_whose_header_disagrees_with_the_manifest_is_refused(tmp_path):
    """A file that matches its digest but not the manifest's shape (a hand-edited store)."""
    write_three_shards(tmp_path)
    path = tmp_path / "shard-000000.rows.npy"
    np.save(path, np.zeros((5, DIM + 1), dtype=np.float32))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0].update(rows_bytes=os.path.getsize(path), rows_sha256=grad_store._sha256_file(path))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedStore, match="shard-000000.rows.npy: the .npy header says .* shape \\(5, 21\\)"):
        GradStore(tmp_path).rows([0])
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DamagedStore, match="manifest.json: not readable JSON"):
        GradStore(tmp_path)


CRASH_WRITER = """
import os, signal, sys
import numpy as np
from ghost_results import grad_query, grad_store
calls = []
real = grad_store._write_manifest
def dying(directory, manifest):
    calls.append(1)
    if len(calls) == 3:  # the second shard's manifest: its files are on disk
        os.kill(os.getpid(), signal.SIGKILL)
    real(directory, manifest)
grad_store._write_manifest = dying
blocks = [["a", 0, 4]]
w = grad_store.GradStoreWriter(sys.argv[1], blocks, dtype="float32", shard_rows=2)
prov = dict(step=1, row=0, doc_id=0, token_offset=0, domain="x", lr=0.1, weight=0.5, n_tokens=8)
w.append(np.ones((5, 4), np.float32), prov)
"""


def test_a_writer_killed_between_shard_and_manifest_leaves_orphans_that_are_ignored_then_removed(tmp_path):
    done = subprocess.run([sys.executable, "-c", CRASH_WRITER, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / "shard-000001.rows.npy").exists() and (tmp_path / "shard-000001.prov.npy").exists()
    store = GradStore(tmp_path)
    assert store.n_rows == 2 and np.array_equal(all_rows(store), np.ones((2, 4)))  # the orphan is not read
    with GradStoreWriter(tmp_path, [["a", 0, 4]], dtype="float32", shard_rows=2) as writer:
        assert not (tmp_path / "shard-000001.rows.npy").exists()  # removed on open
        writer.append(np.full((3, 4), 2, np.float32), dict(step=2, row=0, doc_id=0, token_offset=0, domain="y",
                                                            lr=0.1, weight=0.5, n_tokens=8))
    store = GradStore(tmp_path)
    assert store.provenance()["step"].tolist() == [1, 1, 2, 2, 2]
    assert [s["name"] for s in store.shards] == ["shard-000000", "shard-000001", "shard-000002"]
    assert sorted(os.listdir(tmp_path)) == sorted([".lock", "manifest.json"] + [
        f"shard-00000{i}.{kind}.npy" for i in range(3) for kind in ("rows", "prov")])


def test_a_failed_manifest_write_leaves_the_old_store(tmp_path, monkeypatch):
    rows, prov = make_batch(np.random.default_rng(7), [1, 2])
    writer = GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=3)

    def no_space(directory, manifest):
        raise OSError(28, "no space left")

    monkeypatch.setattr(grad_store, "_write_manifest", no_space)
    with pytest.raises(OSError, match="no space"):
        writer.append(rows, prov)
    writer._lock.release()
    monkeypatch.undo()
    assert GradStore(tmp_path).n_rows == 0 and (tmp_path / "shard-000000.rows.npy").exists()
    GradStoreWriter(tmp_path, BLOCKS, dtype="float32").close()
    assert not (tmp_path / "shard-000000.rows.npy").exists()


def test_drop_steps_after_keeps_exactly_the_earlier_steps(tmp_path):
    rows, prov = make_batch(np.random.default_rng(8), range(1, 11))  # 30 rows, steps 1..10
    with GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=7) as writer:
        writer.append(rows, prov)  # shards [1-3], [3-5], [5-7], [7-9], 2 rows of step 10 buffered
        assert writer.drop_steps_after(4) == 30 - 12
        assert writer.n_rows == 12
    store = GradStore(tmp_path)
    keep = prov["step"] <= 4
    assert np.array_equal(all_rows(store, chunk_rows=4), rows[keep])
    assert store.provenance()["doc_id"].tolist() == prov["doc_id"][keep].tolist()
    superseded = sorted(os.listdir(tmp_path / "superseded"))
    assert superseded == sorted(f"shard-00000{i}.{kind}.npy" for i in (1, 2, 3) for kind in ("rows", "prov"))
    assert [s["name"] for s in store.shards] == ["shard-000000", "shard-000004"]  # the straddling one rewritten
    moved = np.load(tmp_path / "superseded" / "shard-000002.rows.npy", allow_pickle=False)
    assert np.array_equal(moved, rows[14:21])  # moved whole, never changed


def test_a_drop_interrupted_after_its_manifest_leaves_files_for_superseded(tmp_path, monkeypatch):
    rows, prov = make_batch(np.random.default_rng(9), range(1, 5))
    with GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=6) as writer:
        writer.append(rows, prov)
    writer = GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=6)
    monkeypatch.setattr(writer, "_supersede", lambda name: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        writer.drop_steps_after(2)
    writer._lock.release()
    assert GradStore(tmp_path).n_rows == 6 and (tmp_path / "shard-000001.rows.npy").exists()
    GradStoreWriter(tmp_path, BLOCKS, dtype="float32").close()
    assert sorted(os.listdir(tmp_path / "superseded")) == ["shard-000001.prov.npy", "shard-000001.rows.npy"]


def test_grad_store_modules_do_not_import_torch():
    probe = "import sys, ghost_results.grad_store, ghost_results.grad_query; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert done.stdout.strip() == "False", done.stderr


# ---------------------------------------------------------------------------
# Scoring, against float64 brute force


@pytest.fixture
def scored_store(tmp_path):
    """A float32 store of 13-row shards (chunks of 5 never divide them), one zero row, and its rows in float64."""
    rows, prov = make_batch(np.random.default_rng(10), range(1, 21), rows_per_step=4)  # 80 rows
    rows[17] = 0
    with GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=13) as writer:
        writer.append(rows, prov)
    return GradStore(tmp_path), rows.astype(np.float64), prov


def damped_inverse_moments(rows, blocks, damping):
    """The reference (F_b + λ_b I)⁻¹ per block, dense, float64 numpy."""
    inverses = []
    for _, start, stop in blocks:
        block = rows[:, start:stop]
        moment = block.T @ block / len(rows)
        inverses.append(np.linalg.inv(moment + damping * np.trace(moment) / (stop - start) * np.eye(stop - start)))
    return inverses


def check_result(result, reference, domains, store, top):
    """`result` of score_store against reference scores [N, Q]: top rows and scores, per-domain totals."""
    scale = np.abs(reference).max()
    for q in range(reference.shape[1]):
        order = np.argsort(-reference[:, q], kind="stable")[:top]
        got = result.top[result.top["query"] == q]
        assert got["store_row"].tolist() == order.tolist()
        np.testing.assert_allclose(got["score"], reference[order, q], rtol=1e-5, atol=1e-6 * scale)
        assert got["rank"].tolist() == list(range(top))
    for d, name in enumerate(store.domains):
        mine = domains == name
        got = result.domains[(result.domains["domain"] == name)].sort_values("query")
        np.testing.assert_allclose(got["total"], reference[mine].sum(axis=0), rtol=1e-5, atol=1e-5 * scale)
        assert (got["n_rows"] == mine.sum()).all()


@pytest.mark.parametrize("score", ["raw", "cosine", "precond"])
def test_scores_top_k_and_domain_totals_equal_brute_force(scored_store, score):
    store, rows, prov = scored_store
    queries = np.random.default_rng(11).standard_normal((3, DIM))
    queries[2] *= 1e-3
    if score == "raw":
        reference = rows @ queries.T
    elif score == "cosine":
        norms = np.linalg.norm(rows, axis=1)[:, None]
        reference = np.where(norms > 0, rows @ queries.T / np.where(norms > 0, norms, 1), 0)
        reference = reference / np.linalg.norm(queries, axis=1)
    else:
        inverses = damped_inverse_moments(rows, BLOCKS, 0.1)
        preconditioned = np.concatenate([queries[:, a:b] @ inv for (_, a, b), inv in zip(BLOCKS, inverses)], axis=1)
        reference = rows @ preconditioned.T
    result = score_store(store, queries, score=score, top=6, chunk_rows=5)
    check_result(result, reference, prov["domain"], store, top=6)
    assert result.top.loc[0, ["step", "row", "doc_id", "token_offset"]].tolist() == [
        prov[k][result.top.loc[0, "store_row"]] for k in ("step", "row", "doc_id", "token_offset")]
    assert result.top.loc[0, "domain"] == prov["domain"][result.top.loc[0, "store_row"]]
    if score == "cosine":
        assert np.abs(result.top["score"]).max() <= 1 + 1e-6


@pytest.mark.parametrize("n_queries, top, threads, cells_max", [(2, 5, 1, None), (2, 5, 2, 1), (2, 1000, 2, None),
                                                                  (1, 5, 1, None)])
def test_trajectory_scores_equal_brute_force(scored_store, monkeypatch, n_queries, top, threads, cells_max):
    store, rows, prov = scored_store
    if cells_max is not None:  # the per-document sums grouped before the end, after every few chunks
        monkeypatch.setattr(grad_query, "_DOCUMENT_CELLS_MAX", cells_max)
    rng = np.random.default_rng(12)
    queries = {c: rng.standard_normal((n_queries, DIM)) for c in (0, 10, 16)}  # one query: [n, 1] scores
    checkpoints = sorted(queries)
    reference = np.empty((len(rows), n_queries))
    for i, step in enumerate(prov["step"].tolist()):  # one row at a time: the definition
        distances = [abs(step - c) for c in checkpoints]
        nearest = checkpoints[distances.index(min(distances))]  # the first of equals: the earlier
        reference[i] = prov["lr"][i] * prov["weight"][i] * (queries[nearest] @ rows[i])
    result = score_store(store, queries, trajectory=True, top=top, chunk_rows=5, threads=threads)
    check_result(result, reference, prov["domain"], store, top=min(top, len(rows)))
    keys = pd.DataFrame({"doc_id": prov["doc_id"], "domain": prov["domain"]}).groupby(["doc_id", "domain"]).indices
    assert 1 < len(keys) < len(rows) and min(map(len, keys.values())) == 1  # documents of one row and of several
    for q in range(n_queries):
        totals = sorted(((-reference[where, q].sum(), doc_id, domain, len(where))
                         for (doc_id, domain), where in keys.items()))[:top]
        got = result.documents[result.documents["query"] == q]
        assert got["rank"].tolist() == list(range(len(totals)))
        assert got["doc_id"].tolist() == [t[1] for t in totals] and got["domain"].tolist() == [t[2] for t in totals]
        np.testing.assert_allclose(got["score"], [-t[0] for t in totals], rtol=1e-5, atol=1e-9)
        assert got["n_rows"].tolist() == [t[3] for t in totals]
    assert nearest_checkpoint(np.array([5, 13, 14, 100, -3]), np.array([0, 10, 16])).tolist() == [0, 1, 2, 2, 0]  # 5, 13: ties


def test_best_documents_equal_a_stable_sort_with_ties():
    scores = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 2.0, -1.0])
    for top in range(1, 9):
        assert grad_query._best_first(scores, top).tolist() == np.argsort(-scores, kind="stable")[:top].tolist()
    assert grad_query._best_first(np.empty(0), 3).tolist() == []


def test_to_float32_is_exact_for_every_finite_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
    assert grad_store.to_float32(bits, "bfloat16").view(np.uint32).tolist() == (
        bits.astype(np.uint32) << 16).tolist()
    halves = bits.view(np.float16)
    finite = np.isfinite(halves)  # a store holds no inf or NaN (the writer refuses them)
    got = grad_store.to_float32(halves, "float16", out=np.full(bits.shape, np.nan, dtype=np.float32))
    assert got[finite].view(np.uint32).tolist() == halves[finite].astype(np.float32).view(np.uint32).tolist()


def stored_by_hand(directory):
    """A store's rows read with numpy alone, as the module docstring says, in float64."""
    manifest = json.loads((directory / "manifest.json").read_text())
    parts = []
    for shard in manifest["shards"]:
        stored = np.load(directory / shard["rows_file"], allow_pickle=False)
        if manifest["dtype"] == "bfloat16":
            stored = (stored.astype(np.uint32) << 16).view(np.float32)
        parts.append(stored.astype(np.float64))
    return np.concatenate(parts)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_threaded_scores_of_every_dtype_equal_float64_numpy(tmp_path, monkeypatch, dtype, threads):
    """score_store converts and multiplies blocks of rows (here 3 rows a block, chunks of 7 rows, shards of 13,
    so that blocks end inside chunks and chunks inside shards) in `threads` workers: every score, top row and
    domain total against plain float64 numpy on the stored values, for every score and the trajectory. The
    float16 rows hold subnormal values (the bit conversion's hard case) and one row is zero (cosine 0)."""
    monkeypatch.setattr(grad_query._ChunkScorer, "BLOCK_BYTES", 3 * 4 * DIM)
    rows, prov = make_batch(np.random.default_rng(20), range(1, 31), rows_per_step=3)  # 90 rows
    rows[::4, :5] *= 1e-6  # below float16's smallest normal (6.1e-5)
    rows[40] = 0
    with GradStoreWriter(tmp_path, BLOCKS, dtype=dtype, shard_rows=13) as writer:
        writer.append(rows, prov)
    store = GradStore(tmp_path)
    stored = stored_by_hand(tmp_path)
    if dtype == "float16":
        assert (np.abs(stored[stored != 0]) < 6.1e-5).any()
    queries = np.random.default_rng(21).standard_normal((4, DIM))
    norms = np.linalg.norm(stored, axis=1)[:, None]
    inverses = damped_inverse_moments(stored, BLOCKS, 0.1)
    preconditioned = np.concatenate([queries[:, a:b] @ inv for (_, a, b), inv in zip(BLOCKS, inverses)], axis=1)
    references = {"raw": stored @ queries.T,
                  "cosine": np.where(norms > 0, stored @ queries.T / np.where(norms > 0, norms, 1), 0)
                  / np.linalg.norm(queries, axis=1),
                  "precond": stored @ preconditioned.T}
    for score, reference in references.items():
        result = score_store(store, queries, score=score, top=7, chunk_rows=7, threads=threads)
        check_result(result, reference, prov["domain"], store, top=7)
    checkpoints = {0: queries, 12: queries[::-1] * 2, 25: -queries}
    nearest = np.array([0, 12, 25])[nearest_checkpoint(prov["step"], np.array([0, 12, 25]))]
    reference = np.stack([stored[i] @ checkpoints[c].T for i, c in enumerate(nearest.tolist())])
    reference *= (prov["lr"] * prov["weight"])[:, None]
    result = score_store(store, checkpoints, trajectory=True, top=7, chunk_rows=7, threads=threads)
    check_result(result, reference, prov["domain"], store, top=7)


def test_equal_scores_go_to_the_earlier_row_across_and_within_chunks(tmp_path):
    """20 equal rows (more than `top` in one chunk and across chunks) and one better: the top is the better row,
    then the equal ones in store order."""
    rows, prov = make_batch(np.random.default_rng(22), range(1, 8), rows_per_step=3)  # 21 rows
    rows[:] = rows[0]
    rows[9] *= 2
    with GradStoreWriter(tmp_path, BLOCKS, dtype="float32", shard_rows=10) as writer:
        writer.append(rows, prov)
    query = rows[0].astype(np.float64)
    for chunk_rows in (4, 10, 64):
        top = score_store(GradStore(tmp_path), query, top=6, chunk_rows=chunk_rows).top
        assert top["store_row"].tolist() == [9, 0, 1, 2, 3, 4], chunk_rows


def test_a_damaged_later_shard_fails_the_query(tmp_path):
    """Shards are verified ahead of the scoring in a background thread: a damaged last shard still fails
    score_store (no result of unverified rows), and names the file."""
    write_three_shards(tmp_path)
    rows_file = tmp_path / "shard-000002.rows.npy"
    data = bytearray(rows_file.read_bytes())
    data[-3] ^= 0x01
    rows_file.write_bytes(bytes(data))
    with pytest.raises(DamagedStore, match="shard-000002.rows.npy: its content differs from the sha256"):
        score_store(GradStore(tmp_path), np.ones(DIM), chunk_rows=2)


def test_queries_of_the_wrong_width_or_not_finite_are_refused(scored_store):
    store = scored_store[0]
    with pytest.raises(ValueError, match="expected \\[Q, 20\\]"):
        score_store(store, np.ones((2, 19)))
    with pytest.raises(ValueError, match="NaN"):
        score_store(store, np.full((1, DIM), np.nan))
    with pytest.raises(ValueError, match="trajectory=True takes queries as"):
        score_store(store, np.ones((1, DIM)), trajectory=True)


def test_preconditioner_dense_equals_solve_and_is_saved_once(scored_store):
    store, rows, _ = scored_store
    queries = np.random.default_rng(13).standard_normal((4, DIM))
    fitted = Preconditioner.fit(store, damping=0.05, chunk_rows=7)
    for (_, a, b), inverse in zip(BLOCKS, damped_inverse_moments(rows, BLOCKS, 0.05)):
        block = rows[:, a:b]
        moment = block.T @ block / len(rows)
        solved = np.linalg.solve(moment + 0.05 * np.trace(moment) / (b - a) * np.eye(b - a), queries[:, a:b].T).T
        np.testing.assert_allclose(fitted.apply(queries)[:, a:b], solved, rtol=1e-9, atol=1e-12)
    path = fitted.save(store.directory)
    assert path == os.path.join(store.directory, "preconditioner.npz")
    loaded = Preconditioner.load(store.directory, store)
    np.testing.assert_array_equal(loaded.apply(queries), fitted.apply(queries))
    assert Preconditioner.load_or_fit(store, damping=0.05).fingerprint == fitted.fingerprint
    rows_more, prov_more = make_batch(np.random.default_rng(14), [21])
    with GradStoreWriter(store.directory, BLOCKS, dtype="float32", shard_rows=13) as writer:
        writer.append(rows_more, prov_more)
    with pytest.raises(ValueError, match="fitted on other rows"):
        Preconditioner.load(store.directory, GradStore(store.directory))


def test_low_rank_plus_diagonal_equals_the_dense_inverse(tmp_path):
    """Rows whose second moment is exactly U Λ Uᵀ + diag(d) (k=300, rank 6): the low-rank form (max_dense=64,
    rank 6 and rank 12) against the dense damped inverse of the same F: within 2% (measured 1.1%; what is left
    is the part of U outside the range the sketch found); with every eigenpair, equal."""
    rng = np.random.default_rng(15)
    k, rank, n = 300, 6, 400
    U = np.linalg.qr(rng.standard_normal((k, rank)))[0]
    moment = U @ np.diag(np.geomspace(400, 40, rank)) @ U.T + np.diag(rng.uniform(0.5, 1.5, k))
    white = np.linalg.qr(rng.standard_normal((n, k)))[0] * np.sqrt(n)  # whiteᵀ white / n = I exactly
    rows = (white @ np.linalg.cholesky(moment).T).astype(np.float32)
    prov = {"step": 1, "row": np.arange(n), "doc_id": 0, "token_offset": 0, "domain": "x", "lr": 1.0,
            "weight": 1.0, "n_tokens": 1}
    with GradStoreWriter(tmp_path, [["big", 0, k]], dtype="float32", shard_rows=150) as writer:
        writer.append(rows, prov)
    store = GradStore(tmp_path)
    stored = all_rows(store, chunk_rows=128).astype(np.float64)
    moment = stored.T @ stored / n  # the stored rows' F (float32 rounding moved it slightly)
    queries = rng.standard_normal((3, k))
    damping = 0.1
    dense = np.linalg.solve(moment + damping * np.trace(moment) / k * np.eye(k), queries.T).T
    for fit_rank in (rank, 2 * rank):
        lowrank = Preconditioner.fit(store, damping=damping, max_dense=64, rank=fit_rank, chunk_rows=128)
        assert lowrank.parts[0]["kind"] == "lowrank" and lowrank.parts[0]["U"].shape == (k, fit_rank)
        got = lowrank.apply(queries)
        assert np.linalg.norm(got - dense) / np.linalg.norm(dense) < 2e-2, fit_rank
    full = Preconditioner.fit(store, damping=damping, max_dense=64, rank=k, chunk_rows=128)  # every eigenpair
    np.testing.assert_allclose(full.apply(queries), dense, rtol=1e-6, atol=1e-9)


def test_bad_inputs_of_reads_and_scores_are_refused(scored_store, tmp_path):
    """A boolean mask selects rows (it is not the row numbers 0 and 1); a preconditioner of other rows, and scores
    that overflow float32, are refused rather than ranked."""
    store, rows, prov = scored_store
    mask = np.asarray(prov["step"]) == 5
    np.testing.assert_array_equal(store.rows(mask), rows[mask].astype(np.float32))
    assert store.provenance(mask)["store_row"].tolist() == np.flatnonzero(mask).tolist()
    with pytest.raises(IndexError, match="boolean mask"):
        store.rows(mask[:-1])
    other_rows, other_prov = make_batch(np.random.default_rng(3), range(1, 4))
    with GradStoreWriter(tmp_path / "other", BLOCKS, dtype="float32") as writer:
        writer.append(other_rows, other_prov)
    foreign = Preconditioner.fit(GradStore(tmp_path / "other"))
    with pytest.raises(ValueError, match="fitted on other rows"):
        score_store(store, np.ones((1, DIM)), score="precond", preconditioner=foreign)
    huge = np.zeros((2, DIM), np.float32)
    huge[:, :2] = 3e38
    steps = {k: np.asarray(v)[:2] for k, v in prov.items()}
    with GradStoreWriter(tmp_path / "huge", BLOCKS, dtype="float32") as writer:
        writer.append(huge, steps)
    with pytest.raises(FloatingPointError, match="store row 0 is not finite"):
        score_store(GradStore(tmp_path / "huge"), np.full((2, DIM), 10.0))
