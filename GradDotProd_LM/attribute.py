"""Which training data produced a text, asked after the run: index a corpus into a gradient store, query it.

    graddotprod-attribute index RUN_OR_MODEL --data SOURCE --store DIR [--step S] [--project_dim K] [--seed N]
                                [--seq_len T] [--batch_size B] [--dtype bfloat16|float16|float32]
    graddotprod-attribute query RUN_OR_STORE --queries FILE.jsonl --out DIR [--top 20]
                                [--score cosine|raw|precond]

``index`` passes SOURCE (a tokenized corpus written by pile_tools, a JSONL file of {"text", "domain"?, "doc_id"?}
records, or a Hugging Face dataset saved with save_to_disk, with a "text" or "input_ids" column) through the
model of RUN's checkpoint at step S (the latest by default; or a Hugging Face model directory) in windows of T
tokens, and writes each window's projected loss gradient Π(∇l_i) with its provenance (domain, document, token
offset) to the store DIR (ghost_results.grad_store). One process, or many under torchrun (each process
projects its share of every batch; rank 0 writes). Killed, it resumes where the store's last shard ends when
run again with the same arguments; other arguments on an existing store are refused.

``query`` projects each query's loss gradient with the store's own matrices (the store's manifest describes
them) at the store's model, and scores every stored row: raw inner product, cosine, or preconditioned by the
damped inverse of the rows' second moment per parameter (ghost_results.grad_query). A run trained with
--project_dim has an in-run store (RUN/grad_store) of every training row's projection at the step it was trained
on; its queries are projected at every kept checkpoint and each row is scored against the nearest one, weighted
by its step's learning rate and its weight in the step's loss: Σ_t η_t w_i <Π_i,t, Π_q(θ_c(t))>.
It writes DIR/attribution.parquet (query, rank, score, step, domain, doc_id, token_offset, ...) and
DIR/attribution.md (per query, the top training windows with their text, and per-domain totals).
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from ghost_common.flags import FlagParser
from ghost_results.run_directory import GRAD_STORE as STORE_DIR  # a run's in-run store, under its run directory
from GradDotProd_LM.settings import resolve_run_dir
from pile_tools.tokenizer import EOT_ID, not_gpt2

GPT2_VOCAB = 50257  # the tokens of GPT-2's BPE, which texts and queries are tokenized with

SCORES = ("raw", "cosine", "precond")


def build_parser() -> FlagParser:
    parser = FlagParser(prog="graddotprod-attribute",
                        description="Attribute texts to training data after the run: index a corpus into a "
                                    "gradient store of projected per-sample gradients, then query it.")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="project a corpus's windows at one checkpoint into a gradient store")
    index.add_argument("model", metavar="RUN_OR_MODEL", help="a run directory (or run name) or a Hugging Face "
                                                              "model directory")
    index.add_argument("--data", required=True, metavar="SOURCE", help="a pile_tools corpus directory, a .jsonl "
                                                                       "file or a saved Hugging Face dataset")
    index.add_argument("--store", required=True, metavar="DIR", help="the gradient store to write or continue")
    index.add_argument("--split", default="train", help="the corpus split (pile_tools corpora) [train]")
    index.add_argument("--step", type=int, default=None, help="the run's kept checkpoint of this step [latest]")
    index.add_argument("--project_dim", type=_positive, default=4096,
                       help="projected columns per window, over all parameters [4096]")
    index.add_argument("--seed", type=int, default=0, help="seed of the projection matrices [0]")
    index.add_argument("--seq_len", type=_positive, default=None, help="tokens per window [the run's seq_len, or 512]")
    index.add_argument("--batch_size", type=_positive, default=8, help="windows per forward, per process [8]")
    index.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                       help="stored precision [bfloat16]")
    index.add_argument("--max_windows", type=_positive, default=None, help="stop after this many windows")
    index.add_argument("--shard_rows", type=_positive, default=4096,
                       help="windows per shard: a kill loses at most the windows of the shard being filled [4096]")
    query = commands.add_parser("query", help="score a gradient store's rows against query texts")
    query.add_argument("source", metavar="RUN_OR_STORE", help="a run directory with an in-run store, or a store")
    query.add_argument("--queries", required=True, metavar="FILE.jsonl", help='one {"text": ...} per line')
    query.add_argument("--out", required=True, metavar="DIR", help="where attribution.md and .parquet go")
    query.add_argument("--store", default=None, metavar="DIR", help="the store, when RUN_OR_STORE is a run [RUN/"
                                                                    f"{STORE_DIR}]")
    query.add_argument("--top", type=_positive, default=20, help="training windows listed per query [20]")
    query.add_argument("--score", default="cosine", choices=SCORES,
                       help="raw | cosine | precond: cosine and precond found planted passages at rank 1 about "
                            "twice as often as raw (docs/ATTRIBUTION.md) [cosine]")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} is not a positive integer")
    return value


# ---------------------------------------------------------------------------------------------- models
def resolve(path: str) -> str:
    """A directory as given, or a run name under the results directory."""
    found = resolve_run_dir(path)
    if found is None:
        raise ValueError(f"{path!r}: neither a directory nor a run under the results directory")
    return found


def load_model(source: str, step=None):
    """(model in eval mode, description {kind, path, step, run_id, seq_len}) of a run's kept checkpoint (the app's
    model as trained, padded vocabulary included) or of a Hugging Face model directory."""
    from GradDotProd_LM.checkpoint import checkpoint_path, newest_checkpoint
    from GradDotProd_LM.export import app_model_from_checkpoint, kept_checkpoints, read_checkpoint

    directory = resolve(source)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        kept = kept_checkpoints(directory)
        if step is None:
            newest = newest_checkpoint(directory)
            if newest is None:
                raise ValueError(f"{directory} has no checkpoint ({checkpoint_path(directory)})")
            path = newest[0]
        elif step in kept:
            path = kept[step]
        else:
            raise ValueError(f"{directory} kept no checkpoint of step {step}; it holds steps {sorted(kept)}")
        state = read_checkpoint(path)
        other = not_gpt2(state["config"].get("data_tokenizer"))
        if other:  # queries and texts go through GPT-2's BPE: another tokenizer's ids would be other text
            raise ValueError(f"{directory}: {other}; graddotprod-attribute tokenizes texts with GPT-2's BPE, so it "
                             "values runs of GPT-2-tokenized data")
        model = app_model_from_checkpoint(state)
        return model, {"kind": "run", "path": directory, "step": int(state["step"]), "run_id": state.get("run_id"),
                       "seq_len": state["config"].get("seq_len")}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < GPT2_VOCAB:  # texts are tokenized with GPT-2's BPE: another vocabulary would be read wrongly
        raise ValueError(f"{directory}: the model's embedding has {rows} rows; graddotprod-attribute tokenizes texts "
                         f"with GPT-2's BPE ({GPT2_VOCAB} tokens), so it values models of that vocabulary (the app's "
                         "runs and their exports)")
    return model, {"kind": "hf", "path": directory, "step": None, "run_id": None, "seq_len": None}


def project_rows(model, projection, windows: list, pad_id: int = EOT_ID) -> np.ndarray:
    """Π(∇l_i) of each window (a token array; l_i its mean next-token loss) with `projection`: float32 [n, K]."""
    from ghost_engine import GradDotProdEngine

    length = max(len(w) for w in windows)
    X = torch.full((len(windows), length), pad_id, dtype=torch.long)
    Y = torch.full((len(windows), length), -100, dtype=torch.long)
    for i, w in enumerate(windows):
        X[i, :len(w)] = torch.as_tensor(np.asarray(w, dtype=np.int64))
        Y[i, :len(w)] = X[i, :len(w)]
    device = next(model.parameters()).device
    engine = GradDotProdEngine(model, None, projection=projection).attach()
    try:
        Xc, Yc = engine.prepare_forward_input(X.to(device), Y.to(device))
        model.zero_grad(set_to_none=True)
        model(input_ids=Xc, labels=Yc).loss.backward()
        rows = engine.aggregate_and_log().projections
    finally:
        engine.detach()
        model.zero_grad(set_to_none=True)
    return rows.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------- data
def windows(source: str, seq_len: int, split: str = "train"):
    """Yield (tokens int64 [<= seq_len], domain, doc_id, token_offset) over SOURCE, document by document, in
    consecutive windows of seq_len tokens (the last one of a document may be shorter; one of a single token,
    which has no target, is skipped)."""
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "dataset_info.json")):
        yield from _windows_of_docs(_hf_documents(source), seq_len)
    elif os.path.isdir(source):
        yield from _corpus_windows(source, split, seq_len)
    elif os.path.isfile(source):
        yield from _windows_of_docs(_jsonl_documents(source), seq_len)
    else:
        raise ValueError(f"--data {source!r}: no such file or directory")


def _windows_of_docs(documents, seq_len: int):
    for ids, domain, doc_id in documents:
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len]
            if len(window) >= 2:
                yield window, domain, doc_id, start


def _jsonl_documents(path: str):
    """(tokens, domain, doc_id) per line of a JSONL file of {"text", "domain"?, "doc_id"?} (doc_id: the line)."""
    from pile_tools.tokenizer import load_gpt2_tokenizer

    tokenizer = load_gpt2_tokenizer()
    domain = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{line_no + 1}: not a JSON object with a \"text\" field") from None
            ids = np.asarray(tokenizer.encode(text) + [EOT_ID], dtype=np.int64)
            yield ids, str(record.get("domain", domain)), int(record.get("doc_id", line_no))


def _hf_documents(path: str):
    """(tokens, domain, doc_id) per row of a dataset saved with save_to_disk ("input_ids" or "text")."""
    import datasets

    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        raise ValueError(f"{path} holds splits {list(data)}: give one split's directory")
    if "input_ids" not in data.column_names and "text" not in data.column_names:
        raise ValueError(f"{path}: no 'input_ids' or 'text' column (columns: {data.column_names})")
    tokenizer = None
    for i, row in enumerate(data):
        if "input_ids" in row:
            ids = np.asarray(row["input_ids"], dtype=np.int64)
        else:
            if tokenizer is None:
                from pile_tools.tokenizer import load_gpt2_tokenizer

                tokenizer = load_gpt2_tokenizer()
            ids = np.asarray(tokenizer.encode(row["text"]) + [EOT_ID], dtype=np.int64)
        yield ids, str(row.get("domain", "data")), int(row.get("doc_id", i))


def _corpus_windows(data_dir: str, split: str, seq_len: int):
    """Consecutive windows of every domain of a pile_tools corpus split (documents run on, as in training)."""
    from pile_tools.reader import PileReader

    reader = PileReader(data_dir, split=split)
    other = not_gpt2(reader.tokenizer)
    if other:
        raise ValueError(f"{data_dir}: {other}; graddotprod-attribute indexes GPT-2-tokenized corpora")
    for domain in reader.domains:
        total = reader.num_tokens(domain)
        for start in range(0, total - 1, seq_len):
            window = reader.read_tokens(domain, start, min(seq_len, total - start))
            yield window, domain, int(reader.doc_id_at(domain, start)), start


def window_text(data: dict, domain: str, doc_id: int, token_offset: int, seq_len: int, tokenizer, cache: dict) -> str:
    """The text of a stored window, from the source named in the store's meta ({"source", "split", "kind"})."""
    source = data.get("source")
    try:
        if data.get("kind") == "corpus":
            if "reader" not in cache:
                from pile_tools.reader import PileReader

                cache["reader"] = PileReader(source, split=data.get("split", "train"))
            reader = cache["reader"]
            length = min(seq_len, reader.num_tokens(domain) - token_offset)
            ids = reader.read_tokens(domain, token_offset, length)
        else:
            if "docs" not in cache:
                docs = _jsonl_documents(source) if data.get("kind") == "jsonl" else _hf_documents(source)
                cache["docs"] = {(d, i): ids for ids, d, i in docs}
            ids = cache["docs"][(domain, doc_id)][token_offset:token_offset + seq_len]
        return tokenizer.decode([int(t) for t in ids])
    except Exception as err:  # the report stays useful without one text
        return f"(text unavailable: {type(err).__name__}: {err})"


def data_kind(source: str) -> str:
    if os.path.isdir(source):
        return "hf" if os.path.isfile(os.path.join(source, "dataset_info.json")) else "corpus"
    return "jsonl"


# ---------------------------------------------------------------------------------------------- index
def index(args) -> int:
    """The index command (see the module docstring); returns the exit status."""
    from ghost_results.grad_store import GradStoreWriter, read_manifest
    from pile_tools.identity import source_identity

    rank, world = _init_distributed()
    model, origin = load_model(args.model, args.step)
    seq_len = args.seq_len or origin["seq_len"] or 512
    data = {"source": os.path.abspath(args.data), "kind": data_kind(args.data), "split": args.split,
            "identity": source_identity(args.data)}  # a resume on other data is another index
    existing = read_manifest(args.store) if os.path.isfile(os.path.join(args.store, "manifest.json")) else None
    # the projection these arguments draw (the same on a resume with the same ones: the identity below compares)
    projection = _engine_projection(model, {"total": args.project_dim, "seed": args.seed})
    description = projection.describe()
    identity = _identity(origin, data, seq_len, description)
    done = int(sum(s["rows"] for s in existing["shards"])) if existing is not None else 0
    if existing is not None and existing["meta"].get("identity") != identity:
        raise ValueError(f"--store {args.store} holds another index (model, step, data, seq_len or projection "
                         "differ); give a new --store")
    meta = {"identity": identity, "kind": "index", "projection": description, "model": origin, "data": data,
            "seq_len": seq_len}
    writer = GradStoreWriter(args.store, [[b.name, b.start, b.stop] for b in projection.blocks], dtype=args.dtype,
                             shard_rows=args.shard_rows, meta=meta) if rank == 0 else None
    step, total, batch = origin["step"] or 0, done, []
    try:
        for i, window in enumerate(windows(args.data, seq_len, args.split)):
            if i < done:
                continue
            if args.max_windows is not None and i >= args.max_windows:
                break
            batch.append(window)
            if (i + 1) % (args.batch_size * world) == 0:  # the batches of an uninterrupted run, also after a resume
                total += _index_batch(model, projection, batch, total, step, writer, rank, world)
                batch = []
        if batch:
            total += _index_batch(model, projection, batch, total, step, writer, rank, world)
    finally:
        if writer is not None:
            writer.close()
    if rank == 0:
        print(f"indexed {total - done} window(s) into {args.store} ({total} in all, {projection.dim} columns)")
    return 0


def _engine_projection(model, spec):
    """The Projection an engine on `model` builds from `spec` (the hooked parameters and their shapes)."""
    from ghost_engine import GradDotProdEngine

    return GradDotProdEngine(model, None, projection=spec).projection


def _identity(origin: dict, data: dict, seq_len: int, projection: dict) -> str:
    text = json.dumps([origin["path"], origin["step"], origin["run_id"], data, seq_len, projection], sort_keys=True)
    return "index:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _index_batch(model, projection, batch, first, step, writer, rank, world) -> int:
    """Project this process's share of `batch` (windows first, first + 1, ...); rank 0 appends every share in order."""
    share = -(-len(batch) // world)
    mine = batch[rank * share:(rank + 1) * share]
    rows = project_rows(model, projection, [w[0] for w in mine]) if mine else np.zeros((0, projection.dim), "f4")
    parts = [rows]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, rows)
    if writer is not None:
        n = len(batch)
        writer.append(np.concatenate(parts), {
            "step": np.full(n, step), "row": np.arange(first, first + n), "doc_id": np.array([w[2] for w in batch]),
            "token_offset": np.array([w[3] for w in batch]), "domain": np.array([w[1] for w in batch]),
            "lr": np.ones(n), "weight": np.ones(n), "n_tokens": np.array([len(w[0]) - 1 for w in batch])})
    return len(batch)


def _init_distributed():
    """(rank, world size): under torchrun, the process group (gloo on CPU, NCCL on GPUs)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# ---------------------------------------------------------------------------------------------- query
def query(args) -> int:
    """The query command (see the module docstring); returns the exit status."""
    from ghost_engine.projection import Projection
    from ghost_results.grad_query import score_store
    from ghost_results.grad_store import GradStore

    source = resolve(args.source)
    in_run_dir = os.path.join(source, STORE_DIR)
    store = GradStore(args.store or (in_run_dir if os.path.isdir(in_run_dir) else source))
    meta = store.meta
    config = None  # an in-run store's run: its config.json
    if meta.get("kind") == "in_run":  # its rows are scored at this run's checkpoints: they must be its rows
        from ghost_results.run_directory import read_config

        config = read_config(source)
        if meta.get("identity") != config.get("run_id"):
            raise ValueError(f"the store {store.directory} holds the rows of run {meta.get('identity')!r}, and "
                             f"{source} is run {config.get('run_id')!r}: query a run with its own store")
    projection = Projection.from_description(meta["projection"])
    texts = read_queries(args.queries)
    seq_len = int(meta["seq_len"])
    tokenized = [_tokenize(t)[:seq_len] for t in texts]
    in_run = meta.get("kind") == "in_run"
    if in_run:  # every kept checkpoint: Π(∇l_q(θ_c)), c(t) the one nearest each row's step
        from GradDotProd_LM.export import kept_checkpoints

        steps = sorted(kept_checkpoints(source))
        if not steps:
            raise ValueError(f"{source} kept no checkpoint: an in-run store is queried at the run's checkpoints")
        # checkpoint s holds θ_s, the weights step s + 1 trained at: its projections score the rows of the steps
        # nearest s + 1 (a row of step t was projected at θ_{t-1})
        queries = {s + 1: project_rows(load_model(source, s)[0], projection, tokenized) for s in steps}
    else:
        origin = meta["model"]
        queries = project_rows(load_model(origin["path"], origin["step"])[0], projection, tokenized)
    result = score_store(store, queries, score=args.score, top=args.top, trajectory=in_run)
    if in_run:
        meta = dict(meta, fidelity=in_run_fidelity(source, store, config))
    meta = dict(meta, texts_withheld=texts_withheld(meta, config))
    os.makedirs(args.out, exist_ok=True)
    top = result.top.copy()
    top.insert(1, "query_text", [texts[q] for q in top["query"]])
    top.to_parquet(os.path.join(args.out, "attribution.parquet"), index=False)
    with open(os.path.join(args.out, "attribution.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(texts, result, meta, projection, args.score, seq_len))
    print(f"wrote {os.path.join(args.out, 'attribution.md')} and attribution.parquet ({len(texts)} queries, "
          f"{result.n_rows} stored rows, score {args.score})")
    return 0


def in_run_fidelity(run_dir: str, store, config: dict) -> str:
    """How well <Π_i,t, Π_val,t> (the stored projections; Π_val,t that of what step t's dot products were taken
    against: ∇L_val, or D ⊙ ∇L_val under adamw) reproduces the run's exact recorded dot products of the same rows
    and steps: Pearson, Spearman and the least-squares slope, as text (`config`: the run's config.json). AdamW's
    first two steps are left out as the report leaves them out (ghost_results.analysis.unreliable_steps)."""
    from ghost_results import load_run
    from ghost_results.analysis import steps_left_out
    from ghost_results.grad_store import GradStore
    from ghost_results.run_directory import GRAD_STORE_VALIDATION, validation_vector

    try:
        val = GradStore(os.path.join(run_dir, GRAD_STORE_VALIDATION))
        dots = load_run(run_dir)
    except (OSError, ValueError) as err:
        return f"not measured ({err})"
    value = config.get("value", "first_order")
    stored_vector = val.meta.get("vector", validation_vector("first_order"))  # stores before "vector": ∇L_val
    if value not in ("first_order", "adamw"):
        return (f"not measured (the run recorded {value} values, which an inner product of projections does not "
                "estimate)")
    if stored_vector != validation_vector(value):
        return (f"not measured (the run recorded {value} values, taken against {validation_vector(value)}; its "
                f"validation store holds the projections of {stored_vector})")
    left_out = steps_left_out(dots, config)
    by_step = {s: r for s, r in zip(val.provenance()["step"], val.rows(np.arange(len(val)))) if s not in left_out}
    prov = store.provenance()
    keep = prov["step"].isin(list(by_step)).to_numpy()
    rows = store.rows(np.flatnonzero(keep))
    estimate = np.einsum("ik,ik->i", rows, np.stack([by_step[s] for s in prov["step"][keep]])) if keep.any() \
        else np.empty(0)
    exact = dots.set_index(["step", "sample_index"])["dot_products"].reindex(
        list(zip(prov["step"][keep], prov["row"][keep]))).to_numpy()
    ok = np.isfinite(exact)
    if ok.sum() < 3:
        return "not measured (fewer than 3 rows with a recorded dot product)"
    estimate, exact = estimate[ok], exact[ok]
    pearson = np.corrcoef(estimate, exact)[0, 1]
    spearman = np.corrcoef(np.argsort(np.argsort(estimate)), np.argsort(np.argsort(exact)))[0, 1]
    slope = float(estimate @ exact / (exact @ exact))
    without = f", steps {', '.join(map(str, left_out))} left out as in the report" if left_out else ""
    return (f"Pearson {pearson:.3f}, Spearman {spearman:.3f}, slope {slope:.3f} (1 = the exact scale) over "
            f"{ok.sum()} rows of {value} values{without}")


def texts_withheld(meta: dict, config: dict | None) -> str:
    """Why the stored windows' texts are not shown ("" when they are): the data they were read from is no longer
    the data recorded (an in-run store: its run's `config`, config.json; an index: its manifest), or the run
    accepted a change of its data mid-run."""
    from pile_tools.identity import changed_since

    data = meta.get("data", {})
    if not data.get("source"):
        return "the store names no data source"
    try:
        if config is not None:
            return changed_since(config.get("data_identity"), data["source"], config.get("data_changes"))
        return changed_since(data.get("identity"), data["source"])
    except (OSError, ValueError) as err:
        return f"cannot read the data's identity ({err})"


def read_queries(path: str) -> list:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f'{path}:{line_no + 1}: not a JSON object with a "text" field') from None
    if not texts:
        raise ValueError(f"{path} holds no query")
    return texts


def _tokenize(text: str) -> np.ndarray:
    from pile_tools.tokenizer import load_gpt2_tokenizer

    ids = load_gpt2_tokenizer().encode(text)
    if len(ids) < 2:
        raise ValueError(f"the query {text!r} has fewer than 2 tokens: it has no next-token loss")
    return np.asarray(ids, dtype=np.int64)


def render_markdown(texts, result, meta, projection, score, seq_len) -> str:
    """attribution.md: what was scored, then per query its top windows with their text, for an in-run store its
    top documents (scores summed over every step), and per-domain totals."""
    from pile_tools.tokenizer import load_gpt2_tokenizer

    tokenizer, cache, data = load_gpt2_tokenizer(), {}, meta.get("data", {})
    kind = "in-run (trajectory: Σ_t η_t w_i <Π_i,t, Π_q>)" if meta.get("kind") == "in_run" else "index"
    lines = ["# Attribution", "", f"- store: {kind}, {result.n_rows} rows", f"- score: {score}",
             f"- projection: {projection.dim} columns over {len(projection.blocks)} parameters, "
             f"{projection.kind}, seed {projection.seed}"]
    if meta.get("fidelity"):
        lines.append(f"- fidelity of this projection against the run's exact values: {meta['fidelity']}")
    withheld = meta.get("texts_withheld")
    if withheld:
        lines.append(f"- texts not shown: {withheld}")
    for q, text in enumerate(texts):
        lines += ["", f"## Query {q}", "", "    " + " ".join(text.split())[:400], "",
                  "| rank | score | step | domain | doc_id | token_offset | text |", "|---|---|---|---|---|---|---|"]
        for _, r in result.top[result.top["query"] == q].iterrows():
            window = "(not shown)" if withheld else window_text(data, r["domain"], int(r["doc_id"]),
                                                               int(r["token_offset"]), seq_len, tokenizer, cache)
            cell = " ".join(window.split())[:160].replace("|", "\\|")
            lines.append(f"| {int(r['rank']) + 1} | {r['score']:.4g} | {int(r['step'])} | {r['domain']} | "
                         f"{int(r['doc_id'])} | {int(r['token_offset'])} | {cell} |")
        if result.documents is not None:  # in-run: the documents' scores summed over every step they trained in
            lines += ["", "| rank | document score (all steps) | rows | domain | doc_id |", "|---|---|---|---|---|"]
            lines += [f"| {int(d['rank']) + 1} | {d['score']:.4g} | {int(d['n_rows'])} | {d['domain']} | "
                      f"{int(d['doc_id'])} |" for _, d in result.documents[result.documents["query"] == q].iterrows()]
        domains = result.domains[result.domains["query"] == q].sort_values("total", ascending=False)
        lines += ["", "| domain | total score | rows |", "|---|---|---|"]
        lines += [f"| {d['domain']} | {d['total']:.4g} | {int(d['n_rows'])} |" for _, d in domains.iterrows()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return index(args) if args.command == "index" else query(args)
    except (ValueError, OSError) as err:
        print(f"graddotprod-attribute {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
