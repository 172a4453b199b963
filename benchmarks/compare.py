"""Side-by-side cost of Regular training, GradDotProd and two per-sample baselines.

    python -m benchmarks.compare --seq_len 64 --batch_size 16 --val_batch_size 1 --out Results/logs/compare.csv

On one model, training batch and validation batch, in one process, with repetitions
interleaved (for rep: for method: one step), it measures step time, tokens/s and peak memory of

    Regular         forward + backward on the training rows;
    GradDotProd     the engine: one forward + backward over [train; val];
    NaivePerSample  one backward per training sample plus one for the validation batch,
                    dot products of the flattened gradients;
    VmapPerSample   torch.func per-sample gradients (functional_call + grad + vmap, in chunks).

The two baselines are written here from the definition (docs/METHOD.md section 1), independently of
the engine. The dot products of the engine and of vmap are checked against the naive ones.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from benchmarks._common import (CORE_METHODS, GRADDOTPROD, REGULAR, BenchConfig, Method, add_config_arguments,
                                add_timing_arguments, autocast, config_from_args, format_table, measure_config,
                                positive_int, skipped_row, write_csv)
from ghost_common.flags import FlagParser

NAIVE = "NaivePerSample"
VMAP = "VmapPerSample"
METHOD_NAMES = (REGULAR, GRADDOTPROD, NAIVE, VMAP)
DEFAULTS = BenchConfig(architecture="GPT2-Tiny", seq_len=64, batch_size=16, val_batch_size=1)
# Default agreement tolerances on rel_err: fp32 methods differ by rounding only; under bf16
# autocast every method rounds its own intermediate products to 8 mantissa bits.
DEFAULT_TOL = {False: 1e-3, True: 1e-1}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all target tokens of the rows (HF shift, -100 ignored).

    logits [R, T, V], labels [R, T] -> scalar float32.
    """
    shifted_logits = logits[:, :-1]
    if shifted_logits.dtype in (torch.float16, torch.bfloat16):
        shifted_logits = shifted_logits.float()  # as HF does: the softmax of low-precision logits in fp32
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
                           ignore_index=-100)


def sample_weights(labels: torch.Tensor) -> torch.Tensor:
    """Weight of each row in the batch's token-mean loss: n_i / N. labels [B, T] -> float64 [B]."""
    target_counts = (labels[:, 1:] != -100).sum(dim=1).double()
    return target_counts / target_counts.sum()


def naive_method(model, optimizer, batch, cfg: BenchConfig) -> Method:
    """B + 1 backward passes; per-sample dot products with the validation gradient.

    The tied wte/lm_head is one entry of model.parameters(), so its gradient sums both uses.
    The training gradient is rebuilt as sum_i w_i * grad l_i, what Regular training holds.
    """
    x_train, y_train, x_val, y_val = batch
    params = [p for p in model.parameters() if p.requires_grad]
    weights = sample_weights(y_train).tolist()

    def loss_of(x, y):
        with autocast(cfg):
            logits = model(input_ids=x).logits
        return causal_lm_loss(logits, y)

    def step():
        val_grad = torch.autograd.grad(loss_of(x_val, y_val), params)
        dot_products = torch.zeros(len(weights), dtype=torch.float64, device=x_train.device)
        for i, weight in enumerate(weights):
            sample_grad = torch.autograd.grad(loss_of(x_train[i:i + 1], y_train[i:i + 1]), params)
            # <flatten(sample_grad), flatten(val_grad)>, accumulated parameter by parameter
            dot_products[i] = sum(torch.dot(g.reshape(-1), v.reshape(-1)).double()
                                  for g, v in zip(sample_grad, val_grad))
            for param, g in zip(params, sample_grad):
                if param.grad is None:
                    param.grad = g * weight
                else:
                    param.grad.add_(g, alpha=weight)
        optimizer.step()
        return dot_products.float()

    return Method(NAIVE, step, setup=lambda: optimizer.zero_grad(set_to_none=True))


def vmap_method(model, optimizer, batch, cfg: BenchConfig, chunk_size: int = 8) -> Method:
    """torch.func per-sample gradients, `chunk_size` samples per vmap call ([chunk, params] in memory)."""
    x_train, y_train, x_val, y_val = batch
    named_params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # tied: listed once
    buffers = dict(model.named_buffers())
    weights = sample_weights(y_train)  # [B]

    def loss_fn(params, x, y):  # x, y: [R, T]
        with autocast(cfg):
            # functional_call ties lm_head.weight to the wte entry (tie_weights=True)
            logits = functional_call(model, (params, buffers), args=(), kwargs={"input_ids": x}).logits
        return causal_lm_loss(logits, y)

    def sample_loss(params, x, y):  # x, y: [T]
        return loss_fn(params, x.unsqueeze(0), y.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step():
        params = {name: p.detach() for name, p in named_params}
        with warnings.catch_warnings():
            # torch.func falls back to a loop for SDPA's missing batching rule; that is its real cost
            warnings.filterwarnings("ignore", message="There is a performance drop")
            val_grad = grad(loss_fn)(params, x_val, y_val)
            train_grad = {name: torch.zeros_like(p) for name, p in params.items()}
            dot_chunks = []
            for start in range(0, x_train.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                chunk_grads = per_sample_grads(params, x_train[rows], y_train[rows])  # {name: [c, *shape]}
                dot_chunks.append(sum((chunk_grads[name].flatten(1) @ val_grad[name].reshape(-1)).double()
                                      for name in params))
                for name in params:
                    train_grad[name] += torch.tensordot(weights[rows].to(chunk_grads[name].dtype),
                                                        chunk_grads[name], dims=1)
                del chunk_grads
        for name, p in named_params:
            p.grad = train_grad[name]
        optimizer.step()
        return torch.cat(dot_chunks).float()

    return Method(VMAP, step, setup=lambda: optimizer.zero_grad(set_to_none=True))


def relative_error(values: torch.Tensor, reference: torch.Tensor) -> float:
    """max_i |values_i - reference_i| / max_i |reference_i|."""
    scale = reference.abs().max().item()
    if scale == 0.0:
        raise ValueError("the reference dot products are all zero: relative error is undefined")
    return (values - reference).abs().max().item() / scale


def add_agreement(rows: list, results: dict) -> str | None:
    """Fill rel_err of GradDotProd and vmap against the naive dot products (vmap's if naive was
    skipped); returns the reference's name, or None when no two methods produced dot products."""
    available = [name for name in (NAIVE, VMAP) if name in results and results[name].dot_products is not None]
    if not available:
        return None
    reference = available[0]
    reference_dots = results[reference].dot_products
    compared = 0
    for row in rows:
        dots = results[row["method"]].dot_products
        if row["method"] != reference and dots is not None:
            row["rel_err"] = relative_error(dots, reference_dots)
            compared += 1
    return reference if compared else None


TABLE_COLUMNS = [("method", "method", ""), ("step s", "step_time_s", ".4f"), ("tokens/s", "tokens_per_s", ".0f"),
                 ("peak MB", "peak_mem_mb", ".0f"), ("x Regular", "time_vs_regular", ".2f"),
                 ("x floor", "time_vs_floor", ".2f"), ("rel err", "rel_err", ".1e"), ("status", "status", "")]


def build_parser() -> FlagParser:
    parser = FlagParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser, DEFAULTS)
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help=f"comma-separated subset of {','.join(METHOD_NAMES)}")
    add_timing_arguments(parser, reps=5)
    parser.add_argument("--vmap_chunk", type=positive_int, default=8, help="samples per vmap call")
    parser.add_argument("--tol", type=float, default=None,
                        help=f"largest accepted rel_err (default {DEFAULT_TOL[False]:g}, "
                             f"{DEFAULT_TOL[True]:g} with --amp on)")
    parser.add_argument("--out", default="Results/logs/compare.csv", help="CSV written here")
    return parser


def parse_methods(parser, text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown or not names:
        parser.error(f"--methods {text!r}: unknown {unknown}; choose from {','.join(METHOD_NAMES)}")
    return [name for name in METHOD_NAMES if name in names]  # run order: Regular first


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(parser, args)
    tolerance = args.tol if args.tol is not None else DEFAULT_TOL[cfg.amp]
    factories = {**CORE_METHODS, NAIVE: naive_method, VMAP: partial(vmap_method, chunk_size=args.vmap_chunk)}
    selected = {name: factories[name] for name in parse_methods(parser, args.methods)}

    unsupported = {}
    if cfg.grad_ckpt and VMAP in selected:
        # HF's checkpointing hook calls requires_grad_() inside the forward, which torch.func forbids
        unsupported[VMAP] = "skipped (torch.func cannot run with gradient checkpointing)"
        del selected[VMAP]
        if not selected:
            parser.error("--grad_ckpt on: VmapPerSample cannot run with gradient checkpointing; add other --methods")

    rows, results = measure_config(cfg, selected, reps=args.reps, warmup=args.warmup)
    reference = add_agreement(rows, results)
    rows += [skipped_row(rows[0], name, status) for name, status in unsupported.items()]
    write_csv(args.out, rows)

    print(f"{cfg.architecture} n_layer={rows[0]['n_layer']} n_embd={rows[0]['n_embd']} "
          f"vocab={rows[0]['vocab_size']} T={cfg.seq_len} B={cfg.batch_size} Bv={cfg.val_batch_size} "
          f"amp={'bf16' if cfg.amp else 'off'} grad_ckpt={'on' if cfg.grad_ckpt else 'off'} "
          f"attn={cfg.attn_impl} device={cfg.device} threads={torch.get_num_threads()}")
    print(f"median of {args.reps} interleaved steps; peak memory: {rows[0]['mem_metric']}; "
          f"analytic floor (docs/METHOD.md section 3) = {rows[0]['floor_ratio']:.3f} x Regular")
    print(format_table(rows, TABLE_COLUMNS))
    print(f"CSV: {args.out}")

    if reference is None:
        print("agreement: not checked (fewer than two methods produced dot products)")
        return 0
    errors = {row["method"]: row["rel_err"] for row in rows if not math.isnan(row["rel_err"])}
    worst = max(errors.values())
    verdict = "AGREE" if worst <= tolerance else "DISAGREE"
    print(f"agreement: rel_err = max_i |a_i - b_i| / max_i |b_i| against {reference}: "
          + ", ".join(f"{name} {error:.2e}" for name, error in errors.items())
          + f" -> {verdict} (tolerance {tolerance:g})")
    return 0 if verdict == "AGREE" else 1


if __name__ == "__main__":
    sys.exit(main())
