"""Training-step cost of Regular and GradDotProd as the app trains: bf16 autocast, fused AdamW, clipping,
eager and torch.compile, with MFU, peak memory, the analytic floor and the top kernels of a profiled step.

    python -m benchmarks.gpu_step --architecture GPT2-Small --batch_size 16 --compile off,on --profile
    python -m benchmarks.gpu_step --architecture GPT2-Tiny --seq_len 64 --batch_size 4 --device cpu --amp off

Methods, interleaved in one process (for rep: for method: one step):
- Regular: forward and backward of the B training rows, clip, AdamW step.
- GradDotProd: the B training rows and Bv validation rows through the engine (dot products
  of every training row, Regular's gradient in .grad), clip, AdamW step.
- Regular (B+Bv rows): the memory reference; GradDotProd's peak must stay under it plus the largest parameter.

MFU = training tokens/s x (6·N + 12·L·H·Q·T) / peak bf16 flop/s (nanoGPT's estimate; N: parameters
without the position table; peak 989 TFLOP/s for an H100 SXM unless --peak_tflops says otherwise).
The floor is docs/METHOD.md section 3 from Regular's counted flops.
"""
import argparse
import statistics
import sys
from contextlib import nullcontext

import torch

from benchmarks._common import (PeakMemory, add_timing_arguments, format_table, on_off, positive_int,
                                run_interleaved, Method)
from ghost_common.flags import FlagParser
from ghost_engine import GradDotProdEngine
from ghost_engine.cost import analytic_floor_ratio, count_step_flops
from GradDotProd_LM.model import ARCHITECTURES, VOCAB_PAD_MULTIPLE, build_model

REGULAR, GRADDOTPROD, REGULAR_ALL = "Regular", "GradDotProd", "Regular (B+Bv rows)"


def mfu_flops_per_token(model, seq_len: int) -> float:
    """nanoGPT's estimate of training flops per token: 6·N + 12·L·H·Q·T."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len


def make_methods(model, step_model, optimizer, batch, engine, autocast, clip):
    x_train, x_val = batch
    x_all = torch.cat([x_train, x_val])

    def regular_on(x):
        def step():
            with autocast:
                loss = step_model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def graddotprod():
        x, y = engine.prepare_forward_input(x_train, x_train)
        with autocast:
            loss = step_model(input_ids=x, labels=y).loss
        loss.backward()
        engine.prepare_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return engine.aggregate_and_log().dot_products

    return [Method(REGULAR, regular_on(x_train)),
            Method(GRADDOTPROD, graddotprod, setup=lambda: engine.attach(optimizer), teardown=engine.detach),
            Method(REGULAR_ALL, regular_on(x_all))]


def top_kernels(step, device: str, count: int) -> str:
    """torch.profiler table of the `count` kernels with the most self device time in one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=count, max_name_column_width=60,
                                                              max_shapes_column_width=60)


def measure(args, compiled: bool):
    torch.manual_seed(0)
    model = build_model(args.architecture, vocab_pad_multiple=args.vocab_pad_multiple,
                        n_positions=max(1024, args.seq_len)).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-12, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=args.device.startswith("cuda"))
    gen = torch.Generator().manual_seed(1)
    vocab = min(model.config.vocab_size, 50257)  # real token ids only: padded rows are never looked up
    x_train = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(args.device)
    x_val = torch.randint(0, vocab, (args.val_batch_size, args.seq_len), generator=gen).to(args.device)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.amp else nullcontext()
    engine = GradDotProdEngine(model, val_batch=(x_val, x_val))
    step_model = torch.compile(model) if compiled else model
    methods = make_methods(model, step_model, optimizer, (x_train, x_val), engine, autocast, args.clip)

    eager_regular = make_methods(model, model, optimizer, (x_train, x_val), engine, autocast, args.clip)[0]
    regular_flops = count_step_flops(eager_regular.step)  # eager: a compiled module first run under
    # FlopCounterMode is never compiled afterwards
    floor = analytic_floor_ratio(model, args.batch_size, args.val_batch_size, args.seq_len, regular_flops)
    meter = PeakMemory(args.device)
    results = run_interleaved(methods, args.reps, args.device, warmup=args.warmup, meter=meter)
    profiles = {}
    if args.profile:
        for method in methods[:2]:
            method.setup()
            try:
                profiles[method.name] = top_kernels(method.step, args.device, args.profile_rows)
            finally:
                method.teardown()
    largest_mb = max(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    flops_per_token = mfu_flops_per_token(model, args.seq_len)
    del model, optimizer, engine, step_model, methods
    torch._dynamo.reset()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results, floor, largest_mb, flops_per_token, profiles, meter.metric


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="GPT2-Small", choices=sorted(ARCHITECTURES))
    parser.add_argument("--seq_len", type=positive_int, default=1024)
    parser.add_argument("--batch_size", type=positive_int, default=16, help="training rows B")
    parser.add_argument("--val_batch_size", type=positive_int, default=1, help="validation rows Bv")
    parser.add_argument("--vocab_pad_multiple", type=positive_int, default=VOCAB_PAD_MULTIPLE, help="1: no padding")
    parser.add_argument("--amp", type=on_off, default=True, help="bf16 autocast on/off")
    parser.add_argument("--compile", default="off,on", help="comma list of off/on")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the device")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one step per method")
    parser.add_argument("--profile_rows", type=positive_int, default=12)
    add_timing_arguments(parser, reps=10)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here; pass --device cpu")
    modes = [on_off(m) for m in args.compile.split(",")]
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{args.architecture} T={args.seq_len} B={args.batch_size} Bv={args.val_batch_size} "
          f"vocab pad {args.vocab_pad_multiple} amp={'bf16' if args.amp else 'off'} | {name} | torch {torch.__version__}"
          f" | median of {args.reps} interleaved steps after {args.warmup} warm-up", flush=True)
    rows, notes = [], []
    for compiled in modes:
        results, floor, largest_mb, fpt, profiles, metric = measure(args, compiled)
        median = {n: statistics.median(r.times_s) if r.times_s else float("nan") for n, r in results.items()}
        tag = "compiled" if compiled else "eager"
        for n, r in results.items():
            tok_s = args.batch_size * args.seq_len / median[n]
            rows.append({"mode": tag, "method": n, "ms": median[n] * 1e3, "tok": tok_s,
                         "mfu": 100 * tok_s * fpt / (args.peak_tflops * 1e12), "peak": r.peak_mem_mb / 1024,
                         "ratio": median[n] / median[REGULAR], "vs_floor": median[n] / median[REGULAR] / floor,
                         "status": r.status})
        bound = results[REGULAR_ALL].peak_mem_mb + largest_mb
        notes.append(f"{tag}: floor {floor:.3f}; GradDotProd/Regular {median[GRADDOTPROD] / median[REGULAR]:.3f} "
                     f"= {median[GRADDOTPROD] / median[REGULAR] / floor:.3f} x floor; GradDotProd peak "
                     f"{results[GRADDOTPROD].peak_mem_mb / 1024:.2f} GiB vs bound {bound / 1024:.2f} GiB "
                     f"(Regular on B+Bv rows + largest parameter {largest_mb:.0f} MB; {metric})")
        for method_name, table in profiles.items():
            print(f"\n--- {tag} {method_name}: top kernels of one step\n{table}", flush=True)
    print()
    print(format_table(rows, [("mode", "mode", ""), ("method", "method", ""), ("step ms", "ms", ".1f"),
                              ("train tok/s", "tok", ",.0f"), ("MFU %", "mfu", ".1f"), ("peak GiB", "peak", ".2f"),
                              ("x Regular", "ratio", ".3f"), ("x floor", "vs_floor", ".3f"), ("status", "status", "")]))
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
