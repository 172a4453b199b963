"""Peak memory per process of `./train.sh --fsdp` against DDP, 2 processes each, for a model whose parameters
and AdamW state dominate its memory (a wide Llama-style model, a small batch).

    python -m benchmarks.fsdp_memory [--hidden 768] [--layers 24] [--steps 3] [--value auto] [--dir DIR]

Both runs train the same model on the bundled sample (AdamW, --batch_size 2, --seq_len 32, one validation row,
no evaluation but the last step's) under torchrun with 2 gloo processes on CPU; each process's peak resident
memory (ru_maxrss) is read when it exits (benchmarks/_peak_rss.py). The table gives the model's parameter,
gradient and AdamW bytes, each process's peak and time per step, and the last line the ratio of the largest
FSDP process to the largest DDP process (target <= 0.6). A process's baseline (the interpreter, torch and the
libraries, the data's memory maps) is in both peaks, as it is on a GPU host."""
import json
import os
import re
import subprocess
import sys
import tempfile

from ghost_common.flags import FlagParser
from pile_tools import ensure_sample_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_config(hidden, layers):
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "num_key_value_heads": max(1, hidden // 64), "max_position_embeddings": 64, "tie_word_embeddings": False}


def run(kind, work, data_dir, config_path, steps, value):
    out = os.path.join(work, kind)
    os.makedirs(out)
    args = ["--model_config", config_path, "--batch_size", "2", "--seq_len", "32", "--val_batch_size", "1",
            "--max_steps", str(steps), "--warmup_step", "1", "--eval_interval", str(steps), "--eval_iter", "1",
            "--eval_bs", "2", "--checkpoint_interval", str(10 * steps), "--vocab_pad_multiple", "1",
            "--value", value, "--data_dir", data_dir, "--results_dir", os.path.join(work, "results"),
            "--run_name", kind, *(["--fsdp"] if kind == "fsdp" else [])]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(REPO, "benchmarks", "_peak_rss.py"), out, "GradDotProd_LM.train", *args],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    peaks = [int(open(os.path.join(out, f"rank{r}.txt")).read()) / 2**20 for r in range(2)]  # GiB
    times = [float(t) for t in re.findall(r"\| (\d+) ms \|", done.stdout)][1:]  # the first step compiles nothing
    return peaks, sum(times) / max(len(times), 1)


def build_parser():
    parser = FlagParser(prog="python -m benchmarks.fsdp_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768, help="the model's width [768]")
    parser.add_argument("--layers", type=int, default=24, help="its blocks [24]")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each run [3]")
    parser.add_argument("--value", default="auto", help="the runs' --value [auto: adamw]")
    parser.add_argument("--dir", default=None, help="work directory [a temporary one]")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="fsdp_memory-")
    data_dir = ensure_sample_dataset(os.path.join(work, "sample"))
    config_path = os.path.join(work, "llama.json")
    with open(config_path, "w") as f:
        json.dump(llama_config(args.hidden, args.layers), f)

    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**{**llama_config(args.hidden, args.layers), "vocab_size": 50257})).parameters())
    state_gib = n * 4 * 4 / 2**30  # fp32 parameters, gradients, AdamW's two moments
    print(f"model: Llama-style, hidden {args.hidden}, {args.layers} layers, {n / 1e6:.1f}M parameters; "
          f"parameters + gradients + AdamW state {state_gib:.2f} GiB (fp32); --value {args.value}")
    rows = {kind: run(kind, work, data_dir, config_path, args.steps, args.value) for kind in ("ddp", "fsdp")}
    print("\n| run | rank 0 peak (GiB) | rank 1 peak (GiB) | ms / step |")
    print("|---|---|---|---|")
    for kind, (peaks, ms) in rows.items():
        print(f"| {kind} | {peaks[0]:.2f} | {peaks[1]:.2f} | {ms:.0f} |")
    ratio = max(rows["fsdp"][0]) / max(rows["ddp"][0])
    print(f"\nFSDP / DDP peak memory per process (the largest of each): {ratio:.3f} (target <= 0.6)")


if __name__ == "__main__":
    main()
