"""Throughput of the training app, Regular against GradDotProd, in interleaved rounds.

    python -m GradDotProd_LM.bench_throughput --rounds 3 --steps 20 -- --architecture GPT2-Tiny \
        --batch_size 8 --seq_len 64
    python -m GradDotProd_LM.bench_throughput -- --architecture GPT2-Small --batch_size 16 --seq_len 1024 \
        --val_batch_size 1 --train_dtype bfloat16          # on a GPU

Each round runs both methods through `GradDotProd_LM.train.main` (same code path as ./train.sh) for
--steps steps and reads the per-step times from training_log.json; the first --skip steps of every run
(warm-up, compilation) are left out. Prints a table; numbers are measurements, nothing is asserted.
"""
import json
import os
import platform
import resource
import tempfile

import numpy as np
import torch

from ghost_common.flags import FlagParser
from GradDotProd_LM import train

METHODS = ("Regular", "GradDotProd")


def run_once(method, round_index, steps, results_dir, train_flags):
    run_name = f"{method}-round{round_index}"
    flags = [*train_flags, "--method", method, "--max_steps", str(steps), "--eval_interval", str(10 ** 9),
             "--eval_iter", "1", "--checkpoint_interval", str(10 ** 9), "--results_dir", results_dir,
             "--run_name", run_name]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    if train.main(flags) != 0:
        raise SystemExit(f"training run failed: {' '.join(flags)}")
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.path.join(results_dir, run_name, "training_log.json")) as f:
        log = json.load(f)["steps"]
    return {
        "step_time_s": [r["step_time_s"] for r in log],
        "tokens_per_s": [r["tokens_per_s"] for r in log],
        "cpu_s": (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime),
        "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan"),
    }


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.split("\n")[0],
                        usage="%(prog)s [--rounds N] [--steps N] [--skip N] -- TRAIN FLAGS")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="first steps of every run left out (warm-up)")
    return parser


def main(argv=None):
    parser = build_parser()
    args, train_flags = parser.parse_known_args(argv)
    train_flags = [f for f in train_flags if f != "--"]
    if args.steps <= args.skip:
        parser.error(f"--steps {args.steps} must exceed --skip {args.skip}")

    runs = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as results_dir:
        for round_index in range(args.rounds):
            for method in METHODS:  # interleaved: drifting machine load hits both methods alike
                runs[method].append(run_once(method, round_index, args.steps, results_dir, train_flags))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\n{device} | torch {torch.__version__} | train flags: {' '.join(train_flags)}")
    print(f"{args.rounds} rounds x {args.steps} steps, first {args.skip} of each run skipped; medians over steps")
    print("| method | tokens/s | step ms | CPU s per run | peak GPU GiB | time vs Regular |")
    print("|---|---|---|---|---|---|")
    regular_ms = np.median([t for r in runs["Regular"] for t in r["step_time_s"][args.skip:]]) * 1e3
    for method in METHODS:
        times = np.array([t for r in runs[method] for t in r["step_time_s"][args.skip:]])
        tps = np.array([t for r in runs[method] for t in r["tokens_per_s"][args.skip:]])
        cpu = np.median([r["cpu_s"] for r in runs[method]])
        peak = max(r["peak_gib"] for r in runs[method])
        step_ms = np.median(times) * 1e3
        print(f"| {method} | {np.median(tps):,.0f} | {step_ms:.1f} | {cpu:.1f} | {peak:.2f} | "
              f"{step_ms / regular_ms:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
