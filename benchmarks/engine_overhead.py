"""What one GradDotProd step costs against a Regular step, next to the analytic floor (docs/METHOD.md section 3).

    python -m benchmarks.engine_overhead --config cpu-small [--reps 7] [--value cosine]

Prints, for a named configuration: median step times of Regular (B training rows), GradDotProd
(B + Bv rows through the engine) and Regular on B + Bv rows (the memory reference), measured in one
process with the methods interleaved; the time ratio; the flop ratio counted by FlopCounterMode;
the analytic floor ratio; and the peak memory of each, with the bound "Regular on B + Bv rows plus
one weight-gradient-sized buffer (the largest parameter)". ``--value adamw|cosine`` adds the engine with that
estimator to the same interleaved run (its time against Regular and against the first-order engine);
``--value adamw|adamw_vt|midpoint`` makes every method's optimizer AdamW with lr 0 instead of SGD with lr 0
(the app's optimizer; their vectors then go through AdamW's update sensitivity).
"""
import argparse
import statistics
import sys
from dataclasses import replace

import torch

from benchmarks._common import (BenchConfig, GRADDOTPROD, PeakMemory, REGULAR, add_timing_arguments,
                                build_bench_model, format_table, graddotprod_method, make_batches, regular_method,
                                run_interleaved)
from ghost_common.flags import FlagParser
from ghost_engine.cost import analytic_floor_ratio, count_step_flops
from ghost_engine.engine import VALUES

CONFIGS = {
    # the CPU configuration: floor ≈ 1.45
    "cpu-small": BenchConfig(architecture="GPT2-Small", n_layer=4, n_head=4, n_embd=256, seq_len=256,
                             batch_size=8, val_batch_size=1),
    # a seconds-long smoke configuration
    "cpu-tiny": BenchConfig(architecture="GPT2-Tiny", seq_len=64, batch_size=4, val_batch_size=1, vocab_size=2048),
    # GPT-2 Small as pretrained in the paper, bf16 autocast on a GPU: floor ≈ 1.35
    "gpt2-small-bf16": BenchConfig(architecture="GPT2-Small", seq_len=1024, batch_size=16, val_batch_size=1,
                                   amp=True, device="cuda"),
}
REGULAR_ALL_ROWS = "Regular (B+Bv rows)"


def measure(cfg: BenchConfig, reps: int, warmup: int, value: str = "first_order"):
    model = build_bench_model(cfg)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=0.0) if value in ("adamw", "adamw_vt", "midpoint")
                 else torch.optim.SGD(model.parameters(), lr=0.0))
    batch = make_batches(cfg, cfg.token_vocab_size())
    x_train, y_train, x_val, y_val = batch
    all_rows = (torch.cat([x_train, x_val]), torch.cat([y_train, y_val]), x_val, y_val)
    methods = [regular_method(model, optimizer, batch, cfg), graddotprod_method(model, optimizer, batch, cfg),
               replace(regular_method(model, optimizer, all_rows, cfg), name=REGULAR_ALL_ROWS)]
    if value != "first_order":
        methods.append(graddotprod_method(model, optimizer, batch, cfg, value=value))
    flops = {}
    for method in methods[:2] + methods[3:]:
        method.setup()
        flops[method.name] = count_step_flops(method.step)
        method.teardown()
    floor = analytic_floor_ratio(model, cfg.batch_size, cfg.val_batch_size, cfg.seq_len, flops[REGULAR])
    meter = PeakMemory(cfg.device)
    results = run_interleaved(methods, reps, cfg.device, warmup=warmup, meter=meter)
    largest_param_mb = max(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return results, flops, floor, largest_param_mb, meter.metric


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-small")
    parser.add_argument("--value", choices=VALUES, default="first_order",
                        help="also time the engine with this value estimator (default: first_order only)")
    add_timing_arguments(parser, reps=7)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--config {args.config} needs a CUDA device")
    results, flops, floor, largest_param_mb, metric = measure(cfg, args.reps, args.warmup, args.value)

    median = {name: statistics.median(r.times_s) for name, r in results.items()}
    time_ratio = median[GRADDOTPROD] / median[REGULAR]
    flop_ratio = flops[GRADDOTPROD] / flops[REGULAR]
    print(f"config {args.config}: {cfg}")
    print(f"device {cfg.device} ({torch.cuda.get_device_name() if cfg.device.startswith('cuda') else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps} interleaved\n")
    rows = [{"method": name, "median": median[name], "min": min(r.times_s), "peak": r.peak_mem_mb,
             "tok": cfg.batch_size * cfg.seq_len / median[name]} for name, r in results.items()]
    print(format_table(rows, [("method", "method", ""), ("median step s", "median", ".4f"),
                              ("min step s", "min", ".4f"), ("train tokens/s", "tok", ",.0f"),
                              (f"peak MB ({metric})", "peak", ",.0f")]))
    bound = results[REGULAR_ALL_ROWS].peak_mem_mb + largest_param_mb
    print(f"\nGradDotProd / Regular time ratio : {time_ratio:.3f}")
    print(f"GradDotProd / Regular flop ratio : {flop_ratio:.3f}  (FlopCounterMode: "
          f"{flops[GRADDOTPROD] / 1e9:.1f} vs {flops[REGULAR] / 1e9:.1f} GFLOP)")
    print(f"analytic floor ratio             : {floor:.3f}")
    print(f"time ratio / floor               : {time_ratio / floor:.3f}")
    print(f"memory: GradDotProd peak {results[GRADDOTPROD].peak_mem_mb:,.0f} MB vs bound {bound:,.0f} MB "
          f"(Regular on B+Bv rows + largest parameter {largest_param_mb:,.0f} MB)")
    if args.value != "first_order":
        other = median[f"{GRADDOTPROD} ({args.value})"]
        name = f"{GRADDOTPROD} ({args.value})"
        print(f"GradDotProd ({args.value}) / Regular time ratio : {other / median[REGULAR]:.3f}, flop ratio "
              f"{flops[name] / flops[REGULAR]:.3f} ({flops[name] / 1e9:.1f} GFLOP)")
        print(f"GradDotProd ({args.value}) / GradDotProd (first_order) time ratio : {other / median[GRADDOTPROD]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
