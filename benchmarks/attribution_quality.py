"""Attribution quality of the in-run gradient store (`--project_dim`): a self-check against the run's exact
first-order values, and planted copies of training text found again.

    python -m benchmarks.attribution_quality [--dims 1024,4096,16384] [--steps 48] [--batch_size 8] [--seq_len 64]
        [--val_batch_size 4] [--intervals 1,8,24] [--planted 20] [--passage 32] [--planted_interval 8]
        [--data_dir DIR] [--work_dir DIR] [--seed 0]

For every K of --dims it trains (or reuses, under --work_dir, a temporary directory by default) one GPT2-Tiny run
of the app (`python -m GradDotProd_LM.train ... --project_dim K --checkpoint_interval 1 --keep_checkpoints 0`,
AdamW lr 1e-3 to 1e-4, warmup 5, no gradient clipping, `--value first_order`: the values the trajectory scores
estimate, where AdamW's default would record adamw values; the command is printed). Every run has the same seed and
data, hence the same weights; only the stored projections differ. A run with a checkpoint at every step stands in
for a run with --checkpoint_interval C: its queries use only the checkpoints such a run keeps (steps C, 2C, ...
and the last one).

1. Self-check. The query is the run's own validation batch (valset.pkl). ∇L_val is the target-count-weighted
   mean of the validation rows' gradients (all rows have seq_len - 1 targets, so the plain mean), and its
   projection at a checkpoint is the mean of the rows' `attribute.project_rows`. Every stored row is scored
   with the trajectory score (`grad_query.score_store(..., trajectory=True)`, raw) and compared, row by row,
   with the exact in-run value lr · batch_weight · dot_product of the run's dot-product files: Pearson,
   Spearman and the least-squares slope through 0 of the estimate on the exact value (1 = the right scale).
   Two mappings of a row of step t to a checkpoint:
     late     the nearest kept checkpoint to t (ties: the earlier), what `graddotprod-attribute query` did
              before 2026-12-07. Checkpoint step s holds the weights AFTER step s's update, so at interval 1
              the query is taken at θ_t while the row was trained at θ_{t-1}: one update late.
     app      the nearest kept checkpoint to t - 1, what `graddotprod-attribute query` does now (without θ_0:
              rows before the first kept checkpoint use it).
     trained  the nearest kept checkpoint to t - 1 (the weights the row was trained at), with the initial
              weights θ_0 rebuilt from the run's seed as the app builds them (checked below); at interval 1
              this is exact, and only the projection's (JL) error is left.
   Beside them, "JL only": lr · w · <Π_i,t, Π_val,t> with Π_val,t from <run>/grad_store_validation (the
   validation gradient projected at the step's own weights during training).
   Checks printed: Π_val(θ_s) projected here against grad_store_validation's row of step s + 1 (same weights,
   same matrices: they should agree to float32 rounding), and ‖Π(∇L_val)‖² / ‖∇L_val‖² at the last
   checkpoint with the share of ‖∇L_val‖² of its largest parameter: one draw of the matrices scales every
   score against the query by about this ratio, which is what a slope away from 1 reflects.

2. Planted copies. --planted training windows that the run trained on (from the store's provenance, distinct
   documents, the passage inside one document), a verbatim passage of --passage tokens from the middle of
   each, decoded to text and re-encoded (only passages whose round trip gives the same tokens are used).
   They are the queries after the run, scored (app mapping, the checkpoints of interval --planted_interval)
   with raw, cosine and precond. Reported: the rate at which the source document (doc_id and domain) is at
   top-1 and within the top 10 stored rows ("rows": the documents of the best rows), and of the per-document
   totals over all steps (ScoreResult.documents, "docs"). Baseline: every stored window ranked by the 4-gram
   Jaccard overlap of its tokens (read from the corpus at its domain and token_offset) with the query's.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from benchmarks._common import format_table
from ghost_common.flags import FlagParser
from ghost_engine.projection import Projection
from ghost_results import load_run
from ghost_results.grad_query import score_store
from ghost_results.grad_store import GradStore
from ghost_results.results_io import safe_load_pickle
from ghost_results.run_directory import GRAD_STORE, GRAD_STORE_VALIDATION
from GradDotProd_LM.attribute import project_rows
from GradDotProd_LM.export import app_model_from_checkpoint, kept_checkpoints, read_checkpoint
from pile_tools.reader import PileReader
from pile_tools.tokenizer import load_gpt2_tokenizer

NGRAM = 4


def _int_list(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser():
    parser = FlagParser(prog="python -m benchmarks.attribution_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=_int_list, default=[1024, 4096, 16384], help="--project_dim of each run")
    parser.add_argument("--steps", type=int, default=48, help="training steps of each run [48]")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--val_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--intervals", type=_int_list, default=[1, 8, 24], help="checkpoint intervals emulated")
    parser.add_argument("--planted", type=int, default=20, help="planted passages (queries)")
    parser.add_argument("--passage", type=int, default=32, help="tokens per planted passage")
    parser.add_argument("--planted_interval", type=int, default=8, help="checkpoint interval of the planted queries")
    parser.add_argument("--data_dir", default=None, help="tokenized corpus [the app's default: the bundled sample]")
    parser.add_argument("--work_dir", default=None, help="where the runs go (reused if complete) [a temp dir]")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ---------------------------------------------------------------------------------------------- runs
def train_command(args, dim: int, results_dir: str, name: str) -> list:
    command = [sys.executable, "-m", "GradDotProd_LM.train", "--architecture", "GPT2-Tiny",
               "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
               "--val_batch_size", str(args.val_batch_size), "--max_steps", str(args.steps), "--warmup_step", "5",
               "--optimizer", "AdamW", "--value", "first_order", "--learning_rate", str(args.learning_rate),
               "--min_lr", str(args.learning_rate / 10), "--grad_clip", "0", "--eval_interval", "100000",
               "--eval_iter", "1", "--eval_bs", "4", "--dot_prod_save_interval", "8", "--checkpoint_interval", "1",
               "--keep_checkpoints", "0", "--seed", str(args.seed), "--project_dim", str(dim),
               "--project_dtype", "float32", "--results_dir", results_dir, "--run_name", name]
    return command + (["--data_dir", args.data_dir] if args.data_dir else [])


def ensure_run(args, dim: int, work_dir: str) -> str:
    """The run directory of --project_dim `dim`, trained unless a complete one is there."""
    name = f"K{dim}-steps{args.steps}-seed{args.seed}"
    run_dir = os.path.join(work_dir, name)
    command = train_command(args, dim, work_dir, name)
    print("$ " + " ".join(command[1:] if command[0] == sys.executable else command), flush=True)
    if os.path.isfile(os.path.join(run_dir, "checkpoints", f"step_{args.steps:06d}.pt")):
        print(f"  (reusing the complete run {run_dir})", flush=True)
        return run_dir
    with open(os.path.join(work_dir, name + ".log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    return run_dir


def initial_model(run_dir: str, checkpoint_path: str):
    """θ_0 of the run, rebuilt as the app builds it (its seed, then build_model), in eval mode."""
    from GradDotProd_LM.model import build_model

    config = read_checkpoint(checkpoint_path)["config"]
    torch.manual_seed(config["seed"])
    model = build_model(config["architecture"], n_positions=max(1024, config["seq_len"]),
                        vocab_pad_multiple=config.get("vocab_pad_multiple", 1),
                        model_config=config.get("model_config"))
    return model.eval()


def project_queries(run_dir: str, projection, token_sets: dict) -> dict:
    """{step: {name: float32 [n, K]}} of every kept checkpoint and of θ_0 (step 0)."""
    kept = kept_checkpoints(run_dir)
    projected = {}
    for step in [0] + sorted(kept):
        model = initial_model(run_dir, kept[max(kept)]) if step == 0 else app_model_from_checkpoint(read_checkpoint(kept[step]))
        projected[step] = {name: project_rows(model, projection, list(tokens)) for name, tokens in token_sets.items()}
    return projected


def emulated_checkpoints(steps: int, interval: int) -> list:
    """The checkpoint steps a run with --checkpoint_interval `interval` keeps (and its last step's)."""
    return sorted({s for s in range(interval, steps + 1, interval)} | {steps})


# ---------------------------------------------------------------------------------------------- 1. self-check
def agreement(estimate: np.ndarray, exact: np.ndarray) -> dict:
    return {"n": len(exact), "pearson": float(np.corrcoef(estimate, exact)[0, 1]),
            "spearman": float(spearmanr(estimate, exact).statistic),
            "slope": float(estimate @ exact / (exact @ exact))}


def self_check(args, run_dir: str, store: GradStore, queries: dict) -> list:
    """Rows of the self-check table for one run."""
    dots = load_run(run_dir)
    exact_by_row = (dots["lr"] * dots["batch_weight"] * dots["dot_products"]).to_numpy()
    exact_by_row = pd.Series(exact_by_row, index=pd.MultiIndex.from_arrays([dots["step"], dots["sample_index"]]))
    prov = store.provenance()
    keys = list(zip(prov["step"], prov["row"]))
    exact = exact_by_row.reindex(keys).to_numpy()
    val = {s: q["val"].mean(axis=0) for s, q in queries.items()}  # Π(∇L_val) at each checkpoint: rows' mean
    rows = []
    for interval in args.intervals:
        kept = emulated_checkpoints(args.steps, interval)
        for mapping, trajectory in (("late", {s: val[s] for s in kept}), ("app", {s + 1: val[s] for s in kept}),
                                    ("trained", {s + 1: val[s] for s in [0] + kept})):
            result = score_store(store, trajectory, score="raw", top=store.n_rows, trajectory=True)
            estimate = result.top.sort_values("store_row")["score"].to_numpy(dtype=np.float64)
            rows.append(dict(K=store.dim, interval=interval, mapping=mapping, **agreement(estimate, exact)))
    validation = GradStore(os.path.join(run_dir, GRAD_STORE_VALIDATION))
    by_step = dict(zip(validation.provenance()["step"], validation.rows(np.arange(len(validation)))))
    stored = store.rows(np.arange(store.n_rows))
    jl = np.einsum("ik,ik->i", stored, np.stack([by_step[s] for s in prov["step"]]))
    jl *= (prov["lr"] * prov["weight"]).to_numpy()
    rows.append(dict(K=store.dim, interval=1, mapping="JL only (grad_store_validation)", **agreement(jl, exact)))
    # Π_val(θ_s) projected here against the run's own projection of step s + 1 (trained at θ_s)
    errors = [np.abs(val[s] - by_step[s + 1]).max() / np.abs(by_step[s + 1]).max() for s in val if s + 1 in by_step]
    print(f"  K={store.dim}: Π_val(θ_s) here vs grad_store_validation step s+1: max relative error "
          f"{max(errors):.2e} over {len(errors)} steps (θ_0 rebuilt from the seed: {errors[0]:.2e})", flush=True)
    return rows


def norm_distortion(run_dir: str, projection, val_tokens: np.ndarray, projected_val: np.ndarray) -> str:
    """‖Π(∇L_val)‖² / ‖∇L_val‖² at the last checkpoint, overall and for the parameter of the largest share of
    ‖∇L_val‖²: the scale error that one draw of the matrices puts on every score against this query."""
    kept = kept_checkpoints(run_dir)
    model = app_model_from_checkpoint(read_checkpoint(kept[max(kept)]))
    X = torch.as_tensor(val_tokens)
    model(input_ids=X, labels=X).loss.backward()
    exact = {name: float(p.grad.double().square().sum()) for name, p in model.named_parameters() if p.grad is not None}
    block = max(projection.blocks, key=lambda b: exact.get(b.name, 0.0))
    ratio = float(np.square(projected_val.astype(np.float64)).sum()) / sum(exact.values())
    share = exact[block.name] / sum(exact.values())
    block_ratio = float(np.square(projected_val[block.start:block.stop].astype(np.float64)).sum()) / exact[block.name]
    return (f"‖Π_val‖²/‖∇L_val‖² at step {max(kept)}: {ratio:.3f}; {block.name} holds {share:.1%} of ‖∇L_val‖² "
            f"in {block.stop - block.start} columns, ratio {block_ratio:.3f}")


# ---------------------------------------------------------------------------------------------- 2. planted
def pick_passages(args, store: GradStore, reader: PileReader, tokenizer) -> pd.DataFrame:
    """--planted windows of distinct documents with a passage inside one document whose text round-trips."""
    prov = store.provenance().drop_duplicates(["domain", "doc_id"])
    order = np.random.default_rng(args.seed).permutation(len(prov))
    start_in_window = (args.seq_len - args.passage) // 2
    picked, failed = [], 0
    for i in order:
        row = prov.iloc[i]
        start = int(row["token_offset"]) + start_in_window
        if reader.doc_id_at(row["domain"], [start, start + args.passage - 1]).tolist() != [row["doc_id"]] * 2:
            continue  # the passage would cross into another document
        tokens = reader.read_tokens(row["domain"], start, args.passage)
        text = tokenizer.decode(tokens.tolist())
        if tokenizer.encode(text) != tokens.tolist():
            failed += 1
            continue
        picked.append(dict(domain=row["domain"], doc_id=int(row["doc_id"]), text=text, tokens=tokens))
        if len(picked) == args.planted:
            break
    print(f"planted: {len(picked)} passages of {args.passage} tokens from distinct documents; {failed} candidate(s) "
          "left out because decode/encode did not give the same tokens", flush=True)
    return pd.DataFrame(picked)


def hits(ranked_docs: list, source: tuple) -> tuple:
    """(source at rank 1, source within the first 10) of documents [(domain, doc_id)] best first."""
    return float(ranked_docs[:1] == [source]), float(source in ranked_docs[:10])


def planted_scores(store: GradStore, planted: pd.DataFrame, queries: dict, interval: int, steps: int) -> list:
    rows = []
    kept = emulated_checkpoints(steps, interval)
    for score in ("raw", "cosine", "precond"):
        result = score_store(store, {s: queries[s]["planted"] for s in kept}, score=score, top=10, trajectory=True)
        row_hits, doc_hits = [], []
        for q, source in enumerate(zip(planted["domain"], planted["doc_id"])):
            top = result.top[result.top["query"] == q]
            row_hits.append(hits(_distinct(zip(top["domain"], top["doc_id"])), source))
            docs = result.documents[result.documents["query"] == q]
            doc_hits.append(hits(list(zip(docs["domain"], docs["doc_id"])), source))
        rows.append(_rates(store.dim, interval, score, row_hits, doc_hits))
    return rows


def overlap_baseline(store: GradStore, planted: pd.DataFrame, reader: PileReader, seq_len: int) -> dict:
    """Every stored window ranked by 4-gram Jaccard overlap with each passage (ties: store order)."""
    prov = store.provenance()
    grams = [_ngrams(reader.read_tokens(d, int(o), min(seq_len, reader.num_tokens(d) - int(o))))
             for d, o in zip(prov["domain"], prov["token_offset"])]
    docs = list(zip(prov["domain"], prov["doc_id"]))
    row_hits = []
    for tokens, source in zip(planted["tokens"], zip(planted["domain"], planted["doc_id"])):
        query = _ngrams(tokens)
        jaccard = np.array([len(query & g) / max(len(query | g), 1) for g in grams])
        order = np.argsort(-jaccard, kind="stable")
        row_hits.append(hits(_distinct(docs[i] for i in order[:10]), source))
    return _rates(store.dim, "-", "4-gram Jaccard (text)", row_hits, row_hits)


def _ngrams(tokens) -> set:
    tokens = [int(t) for t in tokens]
    return {tuple(tokens[i:i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)}


def _distinct(docs) -> list:
    """Documents in order of first appearance."""
    return list(dict.fromkeys(docs))


def _rates(dim, interval, score, row_hits, doc_hits) -> dict:
    row_hits, doc_hits = np.array(row_hits), np.array(doc_hits)
    return dict(K=dim, interval=interval, score=score, n=len(row_hits), rows_top1=row_hits[:, 0].mean(),
                rows_top10=row_hits[:, 1].mean(), docs_top1=doc_hits[:, 0].mean(), docs_top10=doc_hits[:, 1].mean())


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="attribution_quality-")
    os.makedirs(work_dir, exist_ok=True)
    runs = {dim: ensure_run(args, dim, work_dir) for dim in args.dims}
    tokenizer = load_gpt2_tokenizer()
    first = GradStore(os.path.join(runs[args.dims[0]], GRAD_STORE))
    reader = PileReader(first.meta["data"]["source"], split="train")
    planted = pick_passages(args, first, reader, tokenizer)
    valset = safe_load_pickle(os.path.join(runs[args.dims[0]], "valset.pkl"))
    val_tokens = np.asarray(valset["tokens"])[:, :args.seq_len]  # what the model saw: seq_len - 1 targets a row
    check_rows, planted_rows = [], []
    for dim, run_dir in runs.items():
        store = GradStore(os.path.join(run_dir, GRAD_STORE))
        projection = Projection.from_description(store.meta["projection"])
        queries = project_queries(run_dir, projection, {"val": val_tokens, "planted": list(planted["tokens"])})
        check_rows += self_check(args, run_dir, store, queries)
        print("  " + norm_distortion(run_dir, projection, val_tokens, queries[args.steps]["val"].mean(axis=0)))
        planted_rows += planted_scores(store, planted, queries, args.planted_interval, args.steps)
    planted_rows.append(overlap_baseline(first, planted, reader, args.seq_len))
    print("\nSelf-check: trajectory score of the run's validation batch against lr·w·dot (exact), per stored row")
    print(format_table(check_rows, [("K", "K", ""), ("interval", "interval", ""),
                                    ("checkpoint of row t", "mapping", ""), ("rows", "n", ""),
                                    ("Pearson", "pearson", ".4f"), ("Spearman", "spearman", ".4f"),
                                    ("slope", "slope", ".3f")]))
    print(f"\nPlanted copies: source document found (rate over {len(planted)} passages of {args.passage} tokens)")
    print(format_table(planted_rows, [("K", "K", ""), ("interval", "interval", ""), ("score", "score", ""),
                                      ("n", "n", ""), ("rows top-1", "rows_top1", ".2f"),
                                      ("rows top-10", "rows_top10", ".2f"), ("docs top-1", "docs_top1", ".2f"),
                                      ("docs top-10", "docs_top10", ".2f")]))
    with open(os.path.join(work_dir, "attribution_quality.json"), "w") as f:
        json.dump({"self_check": check_rows, "planted": planted_rows}, f, indent=1, default=str)
    print(f"\nruns and attribution_quality.json in {work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
