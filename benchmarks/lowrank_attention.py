"""Low-rank attention against standard attention on one Llama-style model: memory, time, and validation
loss after a fixed number of training steps (docs/BENCHMARKS.md).

    python -m benchmarks.lowrank_attention [--seq_lens 512,1024,2048] [--train_steps 6] [--device cpu]
        [--standard sdpa,eager] [--out Results/logs/lowrank_attention.csv] [--plot Results/plots/lowrank_attention.png]

For every sequence length T and attention - standard through transformers' SDPA path, standard through
its eager path (the explicit T×T score matrix), and lowrank (GradDotProd_LM/lowrank_attention.py) -
one fresh process, so that a CPU peak is that configuration's alone:
  - builds the model from the same seed: every weight is the same in all of them (the lowrank maps
    start as segment averages and draw no random numbers);
  - measures the first attention layer alone (projections, RoPE, attention, output projection; forward
    and backward on random hidden states): "layer ms" the median of 3 after a warm-up, "layer MB" the
    largest memory above the layer's start;
  - trains --train_steps AdamW steps (constant learning rate, no clipping) on the same batches of the
    bundled sample (pile_tools), or --data_dir, and times each; the first (AdamW allocates its state)
    is left out: "step s" is the median of the others, "peak MB" the largest peak among them and
    "step MB" the largest peak less the memory held when its step began (weights, AdamW state, data);
  - evaluates the mean next-token loss on --eval_rows fixed validation rows of T tokens.
Time: on CPU the process's CPU time, on CUDA the wall clock. Memory (benchmarks._common.PeakMemory): on
CPU the process's peak resident set size, reset before each measurement; on CUDA
torch.cuda.max_memory_allocated. "scores/query" is the mean number of attention scores a query computes:
(T+1)/2 for causal attention; for lowrank its position in its block + 1, plus r per earlier block.
Ratios (x) are against the first attention measured at the same T. Machines shared with other jobs make
absolute times noisy: compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks._common import format_table, positive_int, write_csv
from ghost_common.flags import FlagParser

STANDARD_IMPLS = ("sdpa", "eager")
LOWRANK = "lowrank"
CSV_COLUMNS = ["attention", "architecture", "seq_len", "batch_size", "attention_rank", "attention_block",
               "scores_per_query", "layer_time_ms", "layer_mem_mb", "train_steps", "step_time_s", "step_time_min_s",
               "peak_mem_mb", "step_mem_mb", "mem_metric", "val_loss", "layer_mem_vs_standard",
               "layer_time_vs_standard", "mem_vs_standard", "time_vs_standard", "device", "status"]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scores_per_query(seq_len: int, attention: str, rank: int, block: int) -> float:
    """Mean over the T queries of the attention scores each computes."""
    if attention != LOWRANK:
        return (seq_len + 1) / 2
    return sum(t % block + 1 + (t // block) * rank for t in range(seq_len)) / seq_len


# ---------------------------------------------------------------- one configuration (its own process)

def run_configuration(spec: dict) -> dict:
    import torch

    from benchmarks._common import PeakMemory
    from GradDotProd_LM.model import build_model
    from pile_tools.reader import PileReader

    device, T, B = spec["device"], spec["seq_len"], spec["batch_size"]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    lowrank = spec["attention"] == LOWRANK
    model = build_model(spec["architecture"], n_positions=max(1024, T),
                        attn_implementation="sdpa" if lowrank else spec["attention"],
                        attention=LOWRANK if lowrank else "standard", attention_rank=spec["attention_rank"],
                        attention_block=spec["attention_block"]).to(device)
    meter = PeakMemory(device)
    result = dict(mem_metric=meter.metric, **attention_layer_cost(model, B, T, device, meter))

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["learning_rate"], betas=(0.9, 0.95),
                                  weight_decay=0.0)
    train_reader = PileReader(spec["data_dir"], split="train", seed=spec["seed"])
    val_tokens = torch.from_numpy(PileReader(spec["data_dir"], split="validation", seed=spec["seed"]).fixed_batch(
        spec["eval_rows"], T).tokens[:, :T]).to(device)
    clock = _clock(device)
    times, peaks, step_mem = [], [], []
    for step in range(1, spec["train_steps"] + 1):
        x = torch.from_numpy(train_reader.get_batch(step, B, T).tokens[:, :T]).to(device)  # labels = inputs
        base = meter.reset()
        start = clock()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = clock() - start
        if step > 1:
            times.append(elapsed)
            peaks.append(meter.peak())
            step_mem.append(meter.peak() - base)
    model.eval()
    with torch.no_grad():
        val_loss = sum(model(input_ids=row[None], labels=row[None]).loss.item() for row in val_tokens) / len(val_tokens)
    return dict(result, step_time_s=statistics.median(times), step_time_min_s=min(times), peak_mem_mb=max(peaks),
                step_mem_mb=max(step_mem), val_loss=val_loss)


def attention_layer_cost(model, batch_size: int, seq_len: int, device: str, meter, reps: int = 3) -> dict:
    """The first attention layer alone (projections, RoPE, attention, output projection), forward and
    backward on random hidden states: median time and the largest memory above the start, in MB."""
    import torch

    attention = model.model.layers[0].self_attn
    hidden = torch.randn(batch_size, seq_len, model.config.hidden_size, device=device, requires_grad=True)
    positions = torch.arange(seq_len, device=device)[None]
    clock = _clock(device)
    times, memory = [], []
    for _ in range(reps + 1):  # the first is a warm-up
        base = meter.reset()
        start = clock()
        rope = model.model.rotary_emb(hidden, position_ids=positions)
        out, _ = attention(hidden, position_embeddings=rope, attention_mask=None, position_ids=positions)
        out.sum().backward()
        times.append(clock() - start)
        memory.append(meter.peak() - base)
        hidden.grad = None
        model.zero_grad(set_to_none=True)
    return dict(layer_time_ms=1000 * statistics.median(times[1:]), layer_mem_mb=max(memory[1:]))


def _clock(device: str):
    """CPU: the process's CPU time, which other jobs on a shared machine disturb far less than the wall
    clock (with --threads 1 it is the work done); CUDA: the wall clock after a synchronisation."""
    if not device.startswith("cuda"):
        return time.process_time
    import torch

    def wall():
        torch.cuda.synchronize()
        return time.perf_counter()

    return wall


def measure_in_subprocess(spec: dict, timeout_s: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.lowrank_attention", "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(status=f"timed out after {timeout_s:.0f} s")
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(status=f"failed: {tail[:200]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), status="ok")


# ---------------------------------------------------------------- the table, CSV and plot

RATIOS = {"layer_mem_vs_standard": "layer_mem_mb", "layer_time_vs_standard": "layer_time_ms",
          "mem_vs_standard": "step_mem_mb", "time_vs_standard": "step_time_s"}


def add_ratios(rows: list) -> None:
    """The *_vs_standard columns: against the first attention measured at the same T (a standard one)."""
    for row in rows:
        reference = next(r for r in rows if r["seq_len"] == row["seq_len"])
        if row["status"] == "ok" and reference["status"] == "ok":
            for ratio, key in RATIOS.items():
                row[ratio] = row[key] / reference[key]


def write_plot(path: str, rows: list) -> str | None:
    """Memory of the attention layer and of the training step, step time and validation loss against T,
    one line per attention; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = [("layer_mem_mb", "attention layer alone: MB above its start"),
              ("step_mem_mb", "training step: MB above its start"), ("step_time_s", "training step time (s)"),
              ("val_loss", "validation loss")]
    for attention in dict.fromkeys(r["attention"] for r in rows):
        ok = [r for r in rows if r["attention"] == attention and r["status"] == "ok"]
        for ax, (key, label) in zip(axes, panels):
            ax.plot([r["seq_len"] for r in ok], [r[key] for r in ok], marker="o", label=attention)
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
    axes[0].legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _int_list(text: str) -> list:
    values = [positive_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return values


def _impl_list(text: str) -> list:
    impls = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [impl for impl in impls if impl not in STANDARD_IMPLS]
    if unknown or not impls:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(STANDARD_IMPLS)}")
    return impls


def build_parser() -> FlagParser:
    from GradDotProd_LM.model import LLAMA_ARCHITECTURES

    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=sorted(LLAMA_ARCHITECTURES), default="Llama-Tiny")
    parser.add_argument("--seq_lens", type=_int_list, default=[512, 1024, 2048], help="[512,1024,2048]")
    parser.add_argument("--standard", type=_impl_list, default=list(STANDARD_IMPLS),
                        help="standard attention paths to measure, the first is the ratios' reference [sdpa,eager]")
    parser.add_argument("--attention_rank", type=positive_int, default=16, help="[16]")
    parser.add_argument("--attention_block", type=positive_int, default=64, help="[64]")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="[1]")
    parser.add_argument("--train_steps", type=positive_int, default=6,
                        help="AdamW steps; the first is not timed [6]")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="[2e-3]")
    parser.add_argument("--eval_rows", type=positive_int, default=4, help="validation rows of T tokens [4]")
    parser.add_argument("--seed", type=int, default=0, help="[0]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu]")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each measuring process, 0 = torch's default [1: on a shared CPU "
                             "the CPU time of one thread is the steadiest measure of work]")
    parser.add_argument("--data_dir", help="tokenized Pile [the bundled sample, built once under the settings' "
                                           "sample directory]")
    parser.add_argument("--timeout_s", type=positive_int, default=1800, help="per configuration [1800]")
    parser.add_argument("--out", default="Results/logs/lowrank_attention.csv", help="CSV [%(default)s]")
    parser.add_argument("--plot", default="Results/plots/lowrank_attention.png",
                        help="PNG, needs matplotlib (the plot extra) [%(default)s]")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration, JSON spec: used by main
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_configuration(json.loads(args.worker))))
        return 0
    import torch

    if args.train_steps < 2:
        parser.error("--train_steps must be >= 2 (the first step is not timed)")
    if args.attention_rank > args.attention_block:
        parser.error(f"--attention_rank {args.attention_rank} must not exceed --attention_block {args.attention_block}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device")
    if args.data_dir is None:
        from GradDotProd_LM.settings import load_settings
        from pile_tools import ensure_sample_dataset

        args.data_dir = ensure_sample_dataset(load_settings().sample_data_dir)
    elif not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir}: no such directory")

    machine = (f"{torch.cuda.get_device_name(args.device)}, times on the wall clock" if args.device.startswith("cuda")
               else f"CPU ({os.cpu_count()} cores), {args.threads or torch.get_num_threads()} torch thread(s), "
                    "times are process CPU time")
    print(f"{args.architecture}, batch {args.batch_size}, lowrank r={args.attention_rank} c={args.attention_block}, "
          f"{args.train_steps} AdamW steps (lr {args.learning_rate}), {args.eval_rows} validation rows; {machine}; "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for T in args.seq_lens:
        for attention in [*args.standard, LOWRANK]:
            spec = dict(attention=attention, architecture=args.architecture, seq_len=T, batch_size=args.batch_size,
                        attention_rank=args.attention_rank, attention_block=args.attention_block,
                        train_steps=args.train_steps, learning_rate=args.learning_rate, eval_rows=args.eval_rows,
                        seed=args.seed, device=args.device, threads=args.threads,
                        data_dir=os.path.abspath(args.data_dir))
            result = measure_in_subprocess(spec, args.timeout_s)
            row = {key: spec.get(key) for key in CSV_COLUMNS}
            row.update(result, scores_per_query=scores_per_query(T, attention, args.attention_rank,
                                                                 args.attention_block))
            print(f"  T={T} {attention}: {row['status']}", flush=True)
            rows.append(row)
    add_ratios(rows)
    print(format_table(rows, [("T", "seq_len", "d"), ("attention", "attention", ""),
                              ("scores/query", "scores_per_query", ".0f"), ("layer ms", "layer_time_ms", ".1f"),
                              ("x", "layer_time_vs_standard", ".2f"), ("layer MB", "layer_mem_mb", ".0f"),
                              ("x", "layer_mem_vs_standard", ".2f"), ("step s", "step_time_s", ".3f"),
                              ("x", "time_vs_standard", ".2f"), ("peak MB", "peak_mem_mb", ".0f"),
                              ("step MB", "step_mem_mb", ".0f"), ("x", "mem_vs_standard", ".2f"),
                              ("val loss", "val_loss", ".4f"), ("status", "status", "")]))
    write_csv(args.out, rows, CSV_COLUMNS)
    plot = write_plot(args.plot, rows)
    print(f"wrote {args.out}" + (f" and {plot}" if plot else "; no plot (matplotlib is not installed)"))
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
