"""Host cost the engine adds per hooked layer: a GPT-2 so small that Python and per-op dispatch dominate.

    python -m benchmarks.host_overhead [--n_layer 12 --n_embd 64 --vocab_size 512 --seq_len 16 --batch_size 4]

On a GPU, an eager GradDotProd step of a large model can be bound by the host launching kernels rather than
by the device (docs/BENCHMARKS.md, "Where the time goes"). This benchmark isolates that host cost on the CPU:
with a width of 64, one thread and 16 tokens per row, a step is mostly Python, hooks and dispatching ops,
so the difference between the two methods is the engine's host overhead. It is a proxy for the GPU's launch
overhead, not a measurement of it.

Methods, interleaved (for rep: for method: `--steps` steps, timed together; the median of the reps is kept):
- Regular: forward and backward of the B training rows, AdamW step.
- GradDotProd: the B training rows and Bv validation rows through the engine, AdamW step, the dot products.

Printed per method: the median ms per step, the top-level aten ops of one step (ops that no other aten op
called: what Python and the autograd engine dispatch, torch.profiler), and for GradDotProd the overhead per
hooked layer, (GradDotProd - Regular) / hooked layers, in µs. The overhead includes the Bv validation
rows' share of the model's own ops, which at these sizes costs little beside the dispatch.
"""
import argparse
import statistics
import sys
import time

import torch

from benchmarks._common import (BenchConfig, GRADDOTPROD, REGULAR, build_bench_model, format_table, make_batches,
                                non_negative_int, positive_int)
from ghost_common.flags import FlagParser
from ghost_engine import GradDotProdEngine


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("model and batch (GPT-2 sizes)")
    group.add_argument("--n_layer", type=positive_int, default=12)
    group.add_argument("--n_head", type=positive_int, default=4)
    group.add_argument("--n_embd", type=positive_int, default=64)
    group.add_argument("--vocab_size", type=positive_int, default=512)
    group.add_argument("--seq_len", type=positive_int, default=16)
    group.add_argument("--batch_size", type=positive_int, default=4)
    group.add_argument("--val_batch_size", type=positive_int, default=1)
    timing = parser.add_argument_group("timing")
    timing.add_argument("--reps", type=positive_int, default=5, help="interleaved repetitions per method (median kept)")
    timing.add_argument("--steps", type=positive_int, default=50, help="steps timed together in one repetition")
    timing.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps per method first")
    timing.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads while measuring")
    return parser


def _methods(model, optimizer, batch):
    """{name: (setup, step, teardown)}; the engine is attached only around its own repetitions."""
    x_train, y_train, x_val, y_val = batch
    engine = GradDotProdEngine(model, val_batch=(x_val, y_val), task="causal_lm", loss_reduction="mean")

    def regular_step():
        model(input_ids=x_train, labels=y_train).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def engine_step():
        x, y = engine.prepare_forward_input(x_train, y_train)
        model(input_ids=x, labels=y).loss.backward()
        engine.prepare_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        engine.aggregate_and_log()

    def nothing():
        return None

    return engine, {REGULAR: (nothing, regular_step, nothing),
                    GRADDOTPROD: (lambda: engine.attach(optimizer), engine_step, engine.detach)}


def count_top_level_ops(step) -> int:
    """aten ops of one call of `step` that no other aten op called (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def measure(args) -> dict:
    """{method: {"ms": median ms per step, "ops": top-level aten ops per step}} and the number of hooked layers."""
    cfg = BenchConfig(architecture="GPT2-Small", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size,
                      val_batch_size=args.val_batch_size)
    model = build_bench_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, methods = _methods(model, optimizer, make_batches(cfg, cfg.token_vocab_size()))
    times = {name: [] for name in methods}
    ops = {}
    for rep in range(-1, args.reps):  # rep -1: warm-up and the op count
        for name, (setup, step, teardown) in methods.items():
            setup()
            try:
                if rep < 0:
                    for _ in range(args.warmup):
                        step()
                    ops[name] = count_top_level_ops(step)
                    continue
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - start) / args.steps)
            finally:
                teardown()
    rows = {name: {"ms": statistics.median(times[name]) * 1e3, "ops": ops[name]} for name in methods}
    return rows, len(engine.layers)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows, hooked = measure(args)
    finally:
        torch.set_num_threads(threads)
    overhead_us = (rows[GRADDOTPROD]["ms"] - rows[REGULAR]["ms"]) * 1e3 / hooked
    table = [{"method": REGULAR, **rows[REGULAR]},
             {"method": GRADDOTPROD, **rows[GRADDOTPROD], "per_layer": overhead_us}]
    print(f"GPT-2: n_layer {args.n_layer}, n_embd {args.n_embd}, n_head {args.n_head}, vocab {args.vocab_size}; "
          f"B {args.batch_size} + Bv {args.val_batch_size} rows of {args.seq_len} tokens; {hooked} hooked layers")
    print(f"CPU, {args.threads} thread(s), torch {torch.__version__}; {args.reps} interleaved reps of {args.steps} "
          f"steps (median)\n")
    print(format_table(table, [("method", "method", ""), ("ms/step", "ms", ".2f"),
                               ("aten ops/step", "ops", "d"), ("overhead µs/hooked layer", "per_layer", ".1f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
