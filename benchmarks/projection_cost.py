"""What projected per-sample gradients cost: a training step with projections against one without.

    python -m benchmarks.projection_cost [--config gpt2-tiny cpu-small] [--ks 1024 16384] [--reps 7] [--profile]

Methods, interleaved in one process (for rep: for method: one step; the median of the timed steps is kept):
  (a) Regular: forward, backward and optimizer step of the B training rows, no engine;
  (b) Projections K: the engine without validation rows (``val_batch=None``, ``projection=dict(total=K)``):
      .grad as Regular leaves it, plus Π(∇l_i) [B, K];
  (c) GradDotProd: the exact engine, B training + Bv validation rows, the dot products [B];
  (d) GradDotProd + projections K: (c) with ``projection=dict(total=K)``, plus Π(∇l_i) and Π(∇L_val).
Printed: median and minimum step times, each method's ratio to Regular, and the ratios b/a and d/c (the
issue's targets: b/a <= 1.10, d/c <= 1.05). The optimizer is SGD with lr 0, as in benchmarks.engine_overhead
(the same cheap update for every method; the parameters stay fixed). ``--profile`` adds torch.profiler's top
operators (self CPU time) of one step of (a), (b) and (d) at the largest K.

Configurations: gpt2-tiny (GPT2-Tiny with the full tied vocabulary, B=8, T=128, Bv=1) and the named ones of
benchmarks.engine_overhead (cpu-small: GPT-2 with 4 layers, width 256, T=256, B=8, Bv=1; gpt2-small-bf16:
GPT-2 Small, T=1024, B=16, Bv=1, bf16 autocast on a CUDA device).
"""
import argparse
import statistics
import sys

import torch

from benchmarks._common import (BenchConfig, GRADDOTPROD, REGULAR, add_timing_arguments, build_bench_model,
                                format_table, graddotprod_method, make_batches, positive_int, regular_method,
                                run_interleaved)
from benchmarks.engine_overhead import CONFIGS as OVERHEAD_CONFIGS
from ghost_common.flags import FlagParser
from ghost_engine import GradDotProdEngine

CONFIGS = {
    "gpt2-tiny": BenchConfig(architecture="GPT2-Tiny", seq_len=128, batch_size=8, val_batch_size=1),
    **OVERHEAD_CONFIGS,
}
TARGETS = {"projections": 1.10, "dots": 1.05}  # b/a and d/c


def projections_name(k: int) -> str:
    return f"Projections K={k}"


def both_name(k: int) -> str:
    return f"GradDotProd + projections K={k}"


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["gpt2-tiny", "cpu-small"])
    parser.add_argument("--ks", nargs="+", type=positive_int, default=[1024, 16384],
                        help="total projection sizes per row (projection=dict(total=K))")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators of one step of Regular and the projections")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    add_timing_arguments(parser, reps=7)
    return parser


def methods_for(model, optimizer, batch, cfg: BenchConfig, ks: list) -> list:
    """(a), (b) per K, (c), (d) per K, in run order."""
    methods = [regular_method(model, optimizer, batch, cfg)]
    methods += [graddotprod_method(model, optimizer, batch, cfg, projection=dict(total=k), validation=False,
                                   name=projections_name(k)) for k in ks]
    methods.append(graddotprod_method(model, optimizer, batch, cfg))
    methods += [graddotprod_method(model, optimizer, batch, cfg, projection=dict(total=k), name=both_name(k))
                for k in ks]
    return methods


def profile_step(method, rows: int = 12) -> str:
    """torch.profiler's operators of one step of `method`, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    method.setup()
    try:
        method.step()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            method.step()
    finally:
        method.teardown()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def measure(name: str, cfg: BenchConfig, args) -> list:
    model = build_bench_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = make_batches(cfg, cfg.token_vocab_size())
    actual = {k: GradDotProdEngine(model, None, projection=dict(total=k)).projection.dim for k in args.ks}
    methods = methods_for(model, optimizer, batch, cfg, args.ks)
    results = run_interleaved(methods, args.reps, cfg.device, warmup=args.warmup)
    median = {m: statistics.median(r.times_s) for m, r in results.items()}
    rows = []
    for method, result in results.items():
        k = next((k for k in args.ks if method in (projections_name(k), both_name(k))), None)
        rows.append(dict(config=name, method=method, K=actual.get(k), median=median[method], min=min(result.times_s),
                         vs_regular=median[method] / median[REGULAR], vs_dots=median[method] / median[GRADDOTPROD]))
    print(f"config {name}: {cfg}")
    print(format_table(rows, [("config", "config", ""), ("method", "method", ""), ("K actual", "K", "d"),
                              ("median step s", "median", ".4f"), ("min step s", "min", ".4f"),
                              ("/ Regular", "vs_regular", ".3f"), ("/ GradDotProd", "vs_dots", ".3f")]))
    fastest = {m: min(r.times_s) for m, r in results.items()}
    for k in args.ks:
        b_a = median[projections_name(k)] / median[REGULAR]
        d_c = median[both_name(k)] / median[GRADDOTPROD]
        print(f"K={k} (actual {actual[k]}): b/a = {b_a:.3f} (target <= {TARGETS['projections']:.2f}, "
              f"{'met' if b_a <= TARGETS['projections'] else 'missed'}), d/c = {d_c:.3f} "
              f"(target <= {TARGETS['dots']:.2f}, {'met' if d_c <= TARGETS['dots'] else 'missed'}); "
              f"ratios of the fastest steps (steadier on a loaded machine): "
              f"b/a {fastest[projections_name(k)] / fastest[REGULAR]:.3f}, "
              f"d/c {fastest[both_name(k)] / fastest[GRADDOTPROD]:.3f}")
    if args.profile:
        by_name = {m.name: m for m in methods}
        k = max(args.ks)
        for method in (REGULAR, projections_name(k), both_name(k)):
            print(f"\ntorch.profiler, one step of {method} ({name}), top operators by self CPU time:")
            print(profile_step(by_name[method]))
    print()
    return rows


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in args.config:
        if CONFIGS[name].device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--config {name} needs a CUDA device")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, {device}, CPU threads {torch.get_num_threads()}; {args.reps} timed steps "
          f"per method after {args.warmup} warm-up, methods interleaved; SGD lr 0\n")
    for name in args.config:
        measure(name, CONFIGS[name], args)
    print("GPU (not run here): python -m benchmarks.projection_cost --config gpt2-small-bf16 --ks 1024 16384 --reps 10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
