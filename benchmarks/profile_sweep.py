"""Profiling sweeps of Regular and GradDotProd: one setting varied, tokens/s and peak memory to CSV.

    python -m benchmarks.profile_sweep --sweep seq_len --values 16,32,64,128
    python -m benchmarks.profile_sweep --sweep batch_size --amp both
    python -m benchmarks.profile_sweep --sweep val_batch_size --values 1,2,4,8

Every value of the swept setting is a fresh model and batch (same seed), measured with the two
methods interleaved (benchmarks._common.run_interleaved). Rows go to
Results/logs/profile_<sweep>.csv (columns: docs/compare.md); the file is rewritten after every
value, so an interrupted sweep keeps what it measured. Defaults fit a CPU in a few minutes; pass
--device cuda and larger --values for a GPU.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from benchmarks._common import (CORE_METHODS, BenchConfig, add_config_arguments, add_timing_arguments,
                                config_from_args, format_table, measure_config, on_off, positive_int, write_csv)
from ghost_common.flags import FlagParser

# sweep name -> (how one value is parsed, default values on CPU)
SWEEPS = {
    "seq_len": (positive_int, "16,32,64,128"),
    "batch_size": (positive_int, "1,2,4,8"),
    "val_batch_size": (positive_int, "1,2,4,8"),
    "amp": (on_off, "off,on"),
    "grad_ckpt": (on_off, "off,on"),
    "attn_impl": (str, "sdpa,eager"),
}
AMP_SETTINGS = {"off": (False,), "on": (True,), "both": (False, True)}
DEFAULTS = BenchConfig(architecture="GPT2-Tiny", seq_len=64, batch_size=4, val_batch_size=1)

TABLE_COLUMNS = [("method", "method", ""), ("T", "seq_len", "d"), ("B", "batch_size", "d"),
                 ("Bv", "val_batch_size", "d"), ("amp", "amp", "d"), ("ckpt", "grad_ckpt", "d"),
                 ("attn", "attn_impl", ""), ("step s", "step_time_s", ".4f"), ("tokens/s", "tokens_per_s", ".0f"),
                 ("peak MB", "peak_mem_mb", ".0f"), ("x Regular", "time_vs_regular", ".2f"),
                 ("floor", "floor_ratio", ".2f"), ("status", "status", "")]


def build_parser() -> FlagParser:
    parser = FlagParser(prog="python -m benchmarks.profile_sweep", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sweep", required=True, choices=sorted(SWEEPS), help="the setting that varies")
    parser.add_argument("--values", default=None,
                        help="comma-separated values of the swept setting (default per sweep: "
                             + "; ".join(f"{name}: {values}" for name, (_, values) in SWEEPS.items()) + ")")
    parser.add_argument("--amp_settings", choices=sorted(AMP_SETTINGS), default=None,
                        help="also cross the sweep with AMP off/on/both (overrides --amp; not for --sweep amp)")
    add_config_arguments(parser, DEFAULTS)
    add_timing_arguments(parser, reps=3)
    parser.add_argument("--out", default=None, help="CSV path (default Results/logs/profile_<sweep>.csv)")
    return parser


def parse_values(parser, sweep: str, text: str) -> list:
    parse_one, _ = SWEEPS[sweep]
    values = []
    for item in (part.strip() for part in text.split(",")):
        try:
            values.append(parse_one(item))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"--values {text!r} for --sweep {sweep}: {exc}")
    if sweep == "attn_impl" and any(value not in ("sdpa", "eager") for value in values):
        parser.error(f"--values {text!r} for --sweep attn_impl: use sdpa and/or eager")
    if not values:
        parser.error(f"--values {text!r}: give at least one value")
    return values


def sweep_configs(base: BenchConfig, sweep: str, values: list, amp_settings: tuple) -> list:
    """The configurations of one sweep, in run order: for each value, for each AMP setting."""
    if sweep == "amp":
        return [replace(base, amp=value) for value in values]
    return [replace(base, amp=amp, **{sweep: value}) for value in values for amp in amp_settings]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    base = config_from_args(parser, args)
    if args.sweep == "amp" and args.amp_settings is not None:
        parser.error("--amp_settings crosses a sweep with AMP; --sweep amp already varies it")
    values = parse_values(parser, args.sweep, args.values or SWEEPS[args.sweep][1])
    amp_settings = AMP_SETTINGS[args.amp_settings] if args.amp_settings else (base.amp,)
    configs = sweep_configs(base, args.sweep, values, amp_settings)
    for cfg in configs:
        if cfg.seq_len < 2:
            parser.error(f"--values: seq_len {cfg.seq_len} leaves no target token; use >= 2")
    out = args.out or f"Results/logs/profile_{args.sweep}.csv"

    rows = []
    for index, cfg in enumerate(configs, start=1):
        print(f"[{index}/{len(configs)}] {args.sweep}={getattr(cfg, args.sweep)} amp={'on' if cfg.amp else 'off'}",
              flush=True)
        config_rows, _ = measure_config(cfg, CORE_METHODS, reps=args.reps, warmup=args.warmup)
        rows.extend(config_rows)
        write_csv(out, rows)
    print(format_table(rows, TABLE_COLUMNS))
    print(f"peak memory: {rows[0]['mem_metric']}; CSV: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
