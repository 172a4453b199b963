"""How well projected gradients keep the engine's exact dot products (Johnson-Lindenstrauss fidelity).

    python -m benchmarks.projection_fidelity [--models GPT2-Tiny Llama-Tiny] [--ks 64 1024] [--seeds 0 1]

For each model, once at random initialisation ("init") and once after `--train_steps` AdamW steps on the
bundled sample ("trained", so the per-sample gradients are those of a model that has started to learn), the
engine runs with ``projection=dict(total=K, seed=s, kind=...)`` over `--batches` training batches against one
fixed validation batch, the parameters held fixed. Each batch gives, per training row i, the exact dot product
<∇l_i, ∇L_val> (``result.dot_products``) and its projected estimate <Π_i, Π_val> (``result.projections @
result.val_projection``). Printed per (model, state, kind, K), over the projection seeds:

- K asked (``total=``) and K actual (``engine.projection.dim``: the largest equal side per parameter that fits);
- Pearson and Spearman correlation of the estimates with the exact dot products, pooled over the batches
  (mean and minimum over the seeds);
- the relative scale: the least-squares slope through the origin, Σ xy / Σ x² (x exact, y estimated), which
  is 1 in expectation (E‖Px‖² = ‖x‖² for every kind).

Models (the app's configs, GradDotProd_LM/architectures.py, built from config, nothing downloaded):
GPT2-Tiny; "GPT2-Small-4x256", GPT2-Small's family at the shape of benchmarks.engine_overhead's cpu-small
(4 layers, width 256, the full tied vocabulary); Llama-Tiny (transformers' LlamaConfig: RoPE, RMSNorm, SwiGLU,
grouped-query attention, tied head). Tokens: the bundled sample (pile_tools' sample, built once into the app's
SAMPLE_DATA_DIR as training does), training rows from the train split and validation rows from its Github
domain; `--tokens random` draws random ids instead. One more set of rows compares the projection kinds
(gaussian, rademacher, orthonormal) at `--kinds_k`.
"""
import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch

from benchmarks._common import BenchConfig, build_bench_model, format_table, make_batches, positive_float, positive_int
from benchmarks._shapley import pearson, spearman
from ghost_common.flags import FlagParser
from ghost_engine import GradDotProdEngine
from ghost_engine.projection import KINDS

MODELS = {
    "GPT2-Tiny": BenchConfig(architecture="GPT2-Tiny"),
    # benchmarks.engine_overhead's cpu-small shape (GPT2-Small's family, 4 layers, 4 heads, width 256)
    "GPT2-Small-4x256": BenchConfig(architecture="GPT2-Small", n_layer=4, n_head=4, n_embd=256),
    "Llama-Tiny": BenchConfig(architecture="Llama-Tiny"),
}
STATES = ("init", "trained")


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--ks", nargs="+", type=positive_int, default=[64, 256, 1024, 4096, 16384],
                        help="total projection sizes per row (projection=dict(total=K))")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="projection seeds")
    parser.add_argument("--allocations", nargs="+", choices=("size", "equal"), default=["size"],
                        help="how total=K is shared among the parameters (Projection.for_shapes's allocate)")
    parser.add_argument("--states", nargs="+", choices=STATES, default=list(STATES))
    parser.add_argument("--kinds_k", type=positive_int, default=1024,
                        help="K of the rows comparing gaussian, rademacher and orthonormal (first model, trained)")
    data = parser.add_argument_group("data")
    data.add_argument("--batches", type=positive_int, default=4, help="training batches pooled per K")
    data.add_argument("--batch_size", type=positive_int, default=16, help="training rows per batch")
    data.add_argument("--val_batch_size", type=positive_int, default=4, help="validation rows (one fixed batch)")
    data.add_argument("--seq_len", type=positive_int, default=64)
    data.add_argument("--tokens", choices=("sample", "random"), default="sample",
                      help="the bundled sample (default) or random token ids")
    data.add_argument("--train_steps", type=int, default=20, help="AdamW steps before the 'trained' state")
    data.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate of those steps")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    return parser


# ---------------------------------------------------------------- data

class Tokens:
    """Training batches by step and one fixed validation batch: (input_ids, labels) pairs, labels = inputs (the
    Hugging Face model shifts them)."""

    def __init__(self, args, cfg: BenchConfig):
        self.args, self.cfg = args, cfg
        if args.tokens == "sample":
            from GradDotProd_LM.settings import load_settings
            from pile_tools import ensure_sample_dataset
            from pile_tools.reader import PileReader

            data_dir = ensure_sample_dataset(load_settings().sample_data_dir)
            self.train = PileReader(data_dir, split="train", seed=cfg.seed)
            self.val = self._pair(PileReader(data_dir, split="validation", domains=["Github"])
                                  .fixed_batch(args.val_batch_size, args.seq_len).tokens)
        else:
            _, _, x_val, y_val = make_batches(self._cfg(0), cfg.token_vocab_size())
            self.val = (x_val, y_val)

    def _cfg(self, step: int) -> BenchConfig:
        return replace(self.cfg, batch_size=self.args.batch_size, val_batch_size=self.args.val_batch_size,
                       seq_len=self.args.seq_len, seed=self.cfg.seed + step)

    def _pair(self, tokens):
        x = torch.as_tensor(tokens[:, :self.args.seq_len], dtype=torch.long)
        return x, x.clone()

    def batch(self, step: int):
        if self.args.tokens == "sample":
            return self._pair(self.train.get_batch(step, self.args.batch_size, self.args.seq_len).tokens)
        x, y, _, _ = make_batches(self._cfg(step), self.cfg.token_vocab_size())
        return x, y


# ---------------------------------------------------------------- measuring

def train(model, tokens: Tokens, steps: int, lr: float):
    """A few AdamW steps (Regular training, no engine) so the gradients are not those of a random model."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = tokens.batch(step)
        model(input_ids=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def exact_and_projected(model, tokens: Tokens, batch_steps: list, projection: dict):
    """(exact dot products [N], <Π_i, Π_val> [N], the projection's actual K) pooled over the batches."""
    engine = GradDotProdEngine(model, val_batch=tokens.val, task="causal_lm", loss_reduction="mean",
                               projection=projection).attach()
    exact, projected = [], []
    try:
        for step in batch_steps:
            x, y = engine.prepare_forward_input(*tokens.batch(step))
            model(input_ids=x, labels=y).loss.backward()
            engine.prepare_gradients()
            result = engine.aggregate_and_log()
            model.zero_grad(set_to_none=True)
            exact.append(result.dot_products.double())
            projected.append(result.projections.double() @ result.val_projection.double())
    finally:
        engine.detach()
    return torch.cat(exact), torch.cat(projected), engine.projection.dim


def fidelity_row(model, tokens, batch_steps, K: int, seeds: list, kind: str, allocate: str = "size") -> dict:
    pearsons, spearmans, slopes = [], [], []
    for seed in seeds:
        exact, projected, actual = exact_and_projected(model, tokens, batch_steps,
                                                       dict(total=K, seed=seed, kind=kind, allocate=allocate))
        pearsons.append(pearson(exact, projected))
        spearmans.append(spearman(exact, projected))
        slopes.append(float(exact @ projected / (exact @ exact)))
    return dict(kind=kind, allocate=allocate, K=K, actual=actual, n=len(exact), pearson=statistics.mean(pearsons),
                pearson_min=min(pearsons), spearman=statistics.mean(spearmans), spearman_min=min(spearmans),
                slope=statistics.mean(slopes), slope_min=min(slopes), slope_max=max(slopes))


def measure_model(name: str, args) -> list:
    cfg = replace(MODELS[name], seq_len=args.seq_len)
    model = build_bench_model(cfg)
    tokens = Tokens(args, cfg)
    batch_steps = [10_000 + j for j in range(args.batches)]  # measured batches: not among the training steps
    rows = []
    for state in args.states:
        if state == "trained":
            train(model, tokens, args.train_steps, args.lr)
        started = time.perf_counter()
        kinds = [(K, "gaussian", allocate) for allocate in args.allocations for K in args.ks]
        if state == "trained" and name == args.models[0] and args.kinds_k:
            kinds += [(args.kinds_k, kind, args.allocations[0]) for kind in KINDS if kind != "gaussian"]
        for K, kind, allocate in kinds:
            rows.append(dict(model=name, state=state,
                             **fidelity_row(model, tokens, batch_steps, K, args.seeds, kind, allocate)))
        print(f"  {name} {state}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += measure_model(name, args)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, fp32; tokens: {args.tokens}; "
          f"{args.batches} batches × {args.batch_size} rows × {args.seq_len} tokens pooled per row, "
          f"{args.val_batch_size} validation rows; trained = {args.train_steps} AdamW steps at lr {args.lr}; "
          f"projection seeds {args.seeds} (mean and min over seeds)\n")
    print(format_table(rows, [("model", "model", ""), ("state", "state", ""), ("kind", "kind", ""),
                              ("allocate", "allocate", ""),
                              ("K", "K", "d"), ("K actual", "actual", "d"), ("rows", "n", "d"),
                              ("pearson", "pearson", ".4f"), ("pearson min", "pearson_min", ".4f"),
                              ("spearman", "spearman", ".4f"), ("spearman min", "spearman_min", ".4f"),
                              ("slope", "slope", ".3f"), ("slope min", "slope_min", ".3f"),
                              ("slope max", "slope_max", ".3f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
