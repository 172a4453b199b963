"""Ground truth for per-step data values: how well the recorded first-order value (and cheaper
alternatives) track the exact Shapley value of one real optimizer step.

    python -m benchmarks.fidelity                 # SGD, SGD+momentum, AdamW; two lrs each; early and late steps
    python -m benchmarks.fidelity --quick         # a small version for the tests (< 20 s)
    python -m benchmarks.fidelity --planted       # a validation passage planted in one training document

A tiny GPT-2 (the app's model family, built from a config, float64 on CPU) trains on synthetic
Markov-chain "domains" with a real torch optimizer; validation rows come from domain 0. At chosen
steps t the step's cooperative game is

    U(S) = L_val(theta_t) - L_val(theta_{t+1}(S)),

theta_{t+1}(S) being the optimizer's step from the run's state at t (momentum buffer, AdamW moments,
step count, weight decay; clipping with --clip) with the batch gradient replaced by
sum_{j in S} w_j grad l_j, w_j = n_j / N the sample's weight in the full batch loss. Exact Shapley
values come from all 2^B coalitions (B <= 10), otherwise from permutation sampling with standard
errors; leave-one-out is U(N) - U(N - i). The estimators compared with them (docs/FIDELITY.md derives
each):

    first_order        eta w_i <g_i, g_val>                        what the app records (SGD form)
    second_order       eta w_i <g_i, g_val - (eta/2) H_val g_B>    Shapley value of the SGD game's 2nd-order expansion
    adamw_fixed_state  -w_i <g_val, J_fixed g_i>                   AdamW's update linearised with v held at v_{t-1}
    adamw_through_v    -w_i <g_val, J(g_B) g_i>                    derivative of AdamW's actual update at g_B
    midpoint           -w_i <g_i, d L_val(theta_{t+1}(g)) / dg>    at g = g_B / 2; any optimizer, exact if quadratic
    cosine             <g_i, g_val> / (|g_i| |g_val|)

g_i, g_val and H_val are dense float64 per-sample gradients, validation gradient and validation
Hessian at theta_t (torch.func); the first order is also taken from ghost_engine.GradDotProdEngine on
the same rows and checked against the dense one. Prints a table and writes fidelity.csv and
fidelity.png (matplotlib optional) under --out; --planted writes planted.csv and planted_values.csv.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch.func import functional_call, grad, vmap

from benchmarks._common import format_table, positive_float, positive_int, write_csv
from benchmarks._functional_optim import (OPTIMIZERS, FlatState, OptimizerSpec, adamw_fixed_state_jacobian,
                                          build_torch_optimizer, capture_state, functional_step)
from benchmarks._shapley import (exact_shapley, leave_one_out, pearson, permutation_shapley, rank_descending,
                                 spearman)
from ghost_common.flags import FlagParser
from ghost_results.analysis import ADAM_UNRELIABLE_STEPS

MAX_EXACT_B = 10  # exact enumeration (2^B coalitions) up to this batch size, permutation sampling above
ESTIMATORS = ("first_order", "second_order", "adamw_fixed_state", "adamw_through_v", "midpoint", "cosine")
UNITLESS = ("cosine",)  # no scale to compare
SHAPLEY, LOO = "shapley", "loo"
CHUNK_BYTES = 2 ** 27  # memory for one chunk of coalition parameter vectors (larger chunks run no faster)


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class HarnessConfig:
    """Model, data and game of one harness run (the defaults run in a few minutes on 2 CPU cores)."""

    vocab_size: int = 300
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    seq_len: int = 32
    batch_size: int = 10
    val_batch_size: int = 4
    domains: int = 4
    steps: tuple = (5, 300)  # valued steps (1-based); the run trains up to the last
    batches_per_step: int = 2  # the run's batch plus other batches drawn at the same state, pooled
    permutations: int = 200  # when B > MAX_EXACT_B or --shapley permutation
    shapley: str = "auto"  # auto | exact | permutation
    clip: Optional[float] = None
    seed: int = 0


DEFAULT_LRS = {"sgd": (0.1, 1.0), "momentum": (0.01, 0.1), "adamw": (3e-4, 3e-3)}
QUICK = dict(vocab_size=64, n_embd=32, n_head=2, seq_len=16, batch_size=6, val_batch_size=2, steps=(2, 6),
             batches_per_step=1, domains=3)
QUICK_LRS = {"sgd": (0.3,), "momentum": (0.03,), "adamw": (3e-3,)}


@dataclass(frozen=True)
class PlantedConfig:
    """The planted-copy run: a GPT2-Tiny-sized model (2 layers, 2 heads, width 128) on a synthetic corpus."""

    vocab_size: int = 512
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 2
    seq_len: int = 64
    batch_size: int = 8
    domains: int = 4
    docs_per_domain: int = 24
    steps: tuple = (3, 60)  # the planted window is put in the batch at these steps; the run ends at the last
    shift: Optional[int] = None  # the planted window starts this many tokens before the passage (default T/4)
    clip: Optional[float] = None
    seed: int = 0


QUICK_PLANTED = dict(vocab_size=128, n_embd=64, seq_len=32, batch_size=6, docs_per_domain=8, steps=(2, 8))
PLANTED_LRS = {"sgd": (0.3,), "momentum": (0.03,), "adamw": (1e-3,)}


def seeded(seed: int, *stream) -> torch.Generator:
    """A generator seeded by (seed, stream...): every batch is a pure function of its coordinates."""
    digest = hashlib.sha256(repr((seed,) + stream).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---------------------------------------------------------------- data

class MarkovDomains:
    """`domains` first-order Markov chains over the vocabulary: every token has `successors` possible next
    tokens with Dirichlet(1) probabilities, all drawn from `seed`."""

    def __init__(self, vocab_size: int, domains: int, seed: int, successors: int = 8):
        generator = seeded(seed, "markov")
        successors = min(successors, vocab_size)
        self.vocab_size = vocab_size
        self.probs = torch.zeros(domains, vocab_size, vocab_size, dtype=torch.float64)  # [D, from, to]
        for d in range(domains):
            nexts = torch.stack([torch.randperm(vocab_size, generator=generator)[:successors]
                                 for _ in range(vocab_size)])
            weights = -torch.log(torch.rand(vocab_size, successors, generator=generator, dtype=torch.float64))
            self.probs[d].scatter_(1, nexts, weights / weights.sum(1, keepdim=True))

    def sample(self, domain_ids: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
        """int64 [R, length]: row r is a walk of domain domain_ids[r] from a uniform first token."""
        rows = len(domain_ids)
        tokens = torch.empty(rows, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (rows,), generator=generator)
        for t in range(1, length):
            step_probs = self.probs[domain_ids, tokens[:, t - 1]]
            tokens[:, t] = torch.multinomial(step_probs, 1, generator=generator).squeeze(1)
        return tokens


def train_batch(data: MarkovDomains, cfg: HarnessConfig, step: int, replicate: int = 0):
    """The run's batch at `step` (replicate 0), or another batch drawn for the same step. Labels = inputs
    (the model shifts them)."""
    generator = seeded(cfg.seed, "train", step, replicate)
    domains = torch.randint(0, data.probs.shape[0], (cfg.batch_size,), generator=generator)
    x = data.sample(domains, cfg.seq_len, generator)
    return x, x.clone()


def val_batch(data: MarkovDomains, cfg: HarnessConfig):
    """Validation rows, all from domain 0."""
    x = data.sample(torch.zeros(cfg.val_batch_size, dtype=torch.long), cfg.seq_len, seeded(cfg.seed, "val"))
    return x, x.clone()


def sample_weights(y: torch.Tensor) -> torch.Tensor:
    """w_i = n_i / N: each row's weight in the batch's token-mean loss (targets are y[:, 1:] != -100)."""
    counts = (y[:, 1:] != -100).sum(1).to(torch.float64)
    return counts / counts.sum()


# ---------------------------------------------------------------- the model as a function of one flat vector

def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all target tokens of the rows (labels shifted here, -100 ignored),
    in the logits' dtype. Hugging Face's own loss casts the logits to float32 (`logits.float()`), which
    would leave a float64 model with a float32 loss."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def build_float64_model(vocab_size, n_layer, n_embd, n_head, seq_len, seed):
    """The app's GPT-2 (GradDotProd_LM.model.build_model: tied embedding/head, no dropout) in float64,
    eager attention (forward-over-reverse and vmap friendly), the vocabulary unpadded."""
    from GradDotProd_LM.model import build_model

    torch.manual_seed(seed)
    model = build_model("GPT2-Tiny", n_positions=seq_len, attn_implementation="eager", vocab_pad_multiple=1,
                        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return model.double().train()


class FlatModel:
    """`model` evaluated at a flat parameter vector theta [P] (parameters in model.parameters() order; the
    tied embedding/head is one parameter)."""

    def __init__(self, model):
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.params = [p for _, p in named]
        self.size = sum(self.numels)

    def theta(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.params]).clone()

    def loss(self, theta, x, y):
        """Mean next-token cross-entropy over the rows' targets at theta, in float64."""
        views = {n: v.view(s) for n, v, s in zip(self.names, theta.split(self.numels), self.shapes)}
        return lm_loss(functional_call(self.model, views, args=(), kwargs={"input_ids": x}).logits, y)

    def losses(self, thetas, x, y, chunk: int) -> torch.Tensor:
        """[K] losses at thetas [K, P], `chunk` rows per vmap call."""
        batched = vmap(lambda theta: self.loss(theta, x, y))
        return torch.cat([batched(part) for part in thetas.split(chunk)])

    def grad(self, theta, x, y) -> torch.Tensor:
        return grad(self.loss)(theta, x, y)

    def per_sample_grads(self, theta, x, y) -> torch.Tensor:
        """[B, P]: gradient of each row's own loss."""
        return vmap(grad(lambda th, xi, yi: self.loss(th, xi[None], yi[None])), in_dims=(None, 0, 0))(theta, x, y)

    def hvp(self, theta, x, y, v) -> torch.Tensor:
        """H v, H the Hessian of the loss on (x, y) at theta (double backward)."""
        theta = theta.detach().requires_grad_()
        (g,) = torch.autograd.grad(self.loss(theta, x, y), theta, create_graph=True)
        (hv,) = torch.autograd.grad(g @ v, theta)
        return hv

    def chunk_for(self, budget_bytes: int = CHUNK_BYTES) -> int:
        """Coalitions per chunk so that a few [chunk, P] float64 tensors fit in the budget."""
        return max(1, min(256, budget_bytes // (6 * 8 * self.size)))


# ---------------------------------------------------------------- one step: the game, its values, the estimators

@dataclass
class StepResult:
    """Values of the B samples of one batch at one step: exact (or sampled) Shapley, leave-one-out and
    the estimators, all float64 [B]; checks of the harness against independent computations."""

    optimizer: str
    lr: float
    step: int
    batch: int
    weights: torch.Tensor
    estimates: dict
    shapley: Optional[torch.Tensor] = None
    shapley_se: Optional[torch.Tensor] = None  # None when exact
    loo: Optional[torch.Tensor] = None
    checks: dict = field(default_factory=dict)


def step_game(fm: FlatModel, spec: OptimizerSpec, state: FlatState, theta, per_sample, weights, x_val, y_val):
    """U(masks) [K] for coalition masks bool [K, B]."""
    weighted = per_sample * weights.unsqueeze(1)  # [B, P]: w_j g_j
    base_loss = fm.loss(theta, x_val, y_val).detach()
    chunk = fm.chunk_for()

    def value(masks: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for part in masks.split(chunk):
                thetas = functional_step(spec, state, theta, part.to(torch.float64) @ weighted)
                out.append(base_loss - fm.losses(thetas, x_val, y_val, chunk))
        return torch.cat(out)

    return value


def estimates(fm: FlatModel, spec: OptimizerSpec, state: FlatState, theta, per_sample, weights, batch_grad,
              val_grad, x_val, y_val) -> dict:
    """Every estimator of ESTIMATORS that applies to the optimizer: {name: float64 [B]}."""
    lr = spec.lr
    dots = per_sample @ val_grad
    out = {"first_order": lr * weights * dots}
    h_batch = fm.hvp(theta, x_val, y_val, batch_grad)
    out["second_order"] = lr * weights * (dots - (lr / 2) * (per_sample @ h_batch))
    if spec.kind == "adamw":
        out["adamw_fixed_state"] = -weights * (per_sample @ (adamw_fixed_state_jacobian(spec, state) * val_grad))
        # J(g_B)^T g_val by one vector-Jacobian product through the actual update (v_t depends on g)
        g = batch_grad.clone().requires_grad_()
        (jt_val,) = torch.autograd.grad(functional_step(spec, state, theta, g), g, grad_outputs=val_grad)
        out["adamw_through_v"] = -weights * (per_sample @ jt_val)
    # d L_val(theta_{t+1}(g)) / dg at half the batch gradient (the Shapley value of a quadratic game)
    g = (batch_grad / 2).clone().requires_grad_()
    (dloss_dg,) = torch.autograd.grad(fm.loss(functional_step(spec, state, theta, g), x_val, y_val), g)
    out["midpoint"] = -weights * (per_sample @ dloss_dg)
    out["cosine"] = dots / (torch.linalg.vector_norm(per_sample, dim=1) * torch.linalg.vector_norm(val_grad))
    return out


def engine_first_order(model, lr, x, y, x_val, y_val) -> torch.Tensor:
    """eta * w_i * dot_i from ghost_engine.GradDotProdEngine on a copy of the model (the app's record)."""
    from ghost_engine import GradDotProdEngine

    model = copy.deepcopy(model)
    engine = GradDotProdEngine(model, val_batch=(x_val, y_val), task="causal_lm", loss_reduction="mean").attach()
    try:
        x_all, y_all = engine.prepare_forward_input(x, y)
        # the engine's loss_reduction="mean": the mean over all targets of [train; val], here in float64
        lm_loss(model(input_ids=x_all).logits, y_all).backward()
        engine.prepare_gradients()
        result = engine.aggregate_and_log()
    finally:
        engine.detach()
    return lr * result.weights.double() * result.dot_products.double()


def value_step(fm, spec, state, theta, x, y, x_val, y_val, *, shapley: str, permutations: int,
               generator: torch.Generator, loo: bool = True, engine: bool = True, step: int = 0,
               batch: int = 0) -> StepResult:
    """Everything measured at one (state, batch). shapley: "exact", "permutation" or "none"."""
    weights = sample_weights(y)
    per_sample = fm.per_sample_grads(theta, x, y)
    batch_grad = weights @ per_sample
    val_grad = fm.grad(theta, x_val, y_val)
    result = StepResult(spec.kind, spec.lr, step, batch, weights,
                        estimates(fm, spec, state, theta, per_sample, weights, batch_grad, val_grad, x_val, y_val))
    result.checks["batch_grad_max_abs_err"] = float((batch_grad - fm.grad(theta, x, y)).abs().max())
    result.checks["grad_norm"] = float(torch.linalg.vector_norm(batch_grad))  # > --clip: clipping active
    if engine:
        recorded = engine_first_order(fm.model, spec.lr, x, y, x_val, y_val)
        first = result.estimates["first_order"]
        result.checks["engine_rel_err"] = float((recorded - first).abs().max() / first.abs().max())
    value = step_game(fm, spec, state, theta, per_sample, weights, x_val, y_val)
    n = len(weights)
    if shapley == "exact":
        result.shapley, values = exact_shapley(value, n)
        u_empty, u_full = float(values[0]), float(values[-1])
        result.checks["efficiency_residual"] = float(result.shapley.sum()) - (u_full - u_empty)
    elif shapley == "permutation":
        result.shapley, result.shapley_se = permutation_shapley(value, n, permutations, generator)
        u_empty, u_full = (float(u) for u in value(torch.stack([torch.zeros(n, dtype=torch.bool),
                                                                 torch.ones(n, dtype=torch.bool)])))
    if shapley != "none":
        result.checks.update(u_full=u_full, u_empty=u_empty)
    if loo:
        result.loo = leave_one_out(value, n)
    return result


# ---------------------------------------------------------------- the training run

def flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params]).clone()


def train_and_value(spec: OptimizerSpec, cfg: HarnessConfig, data: MarkovDomains, log=print) -> list:
    """Train with the torch optimizer up to the last of cfg.steps; at each valued step value the run's
    batch (and cfg.batches_per_step - 1 other batches) against the state before the step, then check
    that the functional step of the full batch equals the step torch took."""
    model = build_float64_model(cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.seq_len, cfg.seed)
    fm = FlatModel(model)
    optimizer = build_torch_optimizer(spec, fm.params)
    x_val, y_val = val_batch(data, cfg)
    shapley = resolve_shapley(cfg.shapley, cfg.batch_size)
    results = []
    for step in range(1, max(cfg.steps) + 1):
        x, y = train_batch(data, cfg, step)
        valued = step in cfg.steps
        if valued:
            started = time.perf_counter()
            state, theta = capture_state(spec, optimizer, fm.params), fm.theta()
            val_loss = float(fm.loss(theta, x_val, y_val))
            step_results = []
            for replicate in range(cfg.batches_per_step):
                xr, yr = (x, y) if replicate == 0 else train_batch(data, cfg, step, replicate)
                step_results.append(value_step(fm, spec, state, theta, xr, yr, x_val, y_val, shapley=shapley,
                                               permutations=cfg.permutations, step=step, batch=replicate,
                                               generator=seeded(cfg.seed, "permutations", step, replicate)))
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model(input_ids=x).logits, y)
        loss.backward()
        if valued:
            raw_grad = flat_grad(fm.params)
        if spec.clip is not None:
            torch.nn.utils.clip_grad_norm_(fm.params, spec.clip)
        optimizer.step()
        if valued:
            with torch.no_grad():
                step_error = float((functional_step(spec, state, theta, raw_grad) - fm.theta()).abs().max())
            for r in step_results:
                r.checks.update(step_max_abs_err=step_error, val_loss=val_loss, train_loss=loss.item())
            results += step_results
            log(f"  {spec.label} step {step}: val loss {val_loss:.4f}, train loss {loss.item():.4f}, "
                f"{len(step_results)} batch(es) valued in {time.perf_counter() - started:.1f} s")
    return results


def resolve_shapley(choice: str, batch_size: int) -> str:
    if choice == "auto":
        return "exact" if batch_size <= MAX_EXACT_B else "permutation"
    return choice


# ---------------------------------------------------------------- comparison

def agreement(estimate: torch.Tensor, reference: torch.Tensor, unitless: bool = False) -> dict:
    """Pearson, Spearman, slope = <est, ref> / <ref, ref> (1: same scale along the reference) and
    rel_err = |est - ref| / |ref| (scale-free estimators: only the correlations)."""
    out = dict(pearson=pearson(estimate, reference), spearman=spearman(estimate, reference),
               slope=math.nan, rel_err=math.nan)
    if not unitless:
        ref_sq = float(reference @ reference)
        out["slope"] = float(estimate @ reference) / ref_sq if ref_sq > 0 else math.nan
        out["rel_err"] = float(torch.linalg.vector_norm(estimate - reference)) / math.sqrt(ref_sq) \
            if ref_sq > 0 else math.nan
    return out


def metric_rows(results: list) -> list:
    """One row per (optimizer, lr, step, estimator): agreement with exact Shapley and with leave-one-out,
    the samples of a step's batches pooled."""
    groups = {}
    for r in results:
        groups.setdefault((r.optimizer, r.lr, r.step), []).append(r)
    rows = []
    for (optimizer, lr, step), group in groups.items():
        pool = lambda get: torch.cat([get(r) for r in group])  # noqa: E731
        shapley = pool(lambda r: r.shapley)
        loo = pool(lambda r: r.loo)
        checks = summarise_checks(group)
        names = [n for n in ESTIMATORS if n in group[0].estimates] + ["loo"]
        for name in names:
            est = loo if name == "loo" else pool(lambda r: r.estimates[name])
            vs_shapley = agreement(est, shapley, unitless=name in UNITLESS)
            vs_loo = agreement(est, loo, unitless=name in UNITLESS) if name != "loo" else {}
            row = dict(optimizer=optimizer, lr=lr, step=step, estimator=name, samples=len(shapley),
                       shapley_method="exact" if group[0].shapley_se is None else "permutation",
                       **{f"{k}_shapley": v for k, v in vs_shapley.items()},
                       **{f"{k}_loo": vs_loo.get(k, math.nan) for k in ("pearson", "spearman", "slope", "rel_err")},
                       **checks)
            rows.append(row)
    return rows


def summarise_checks(group: list) -> dict:
    """The worst of each check over a step's batches, and the step's losses."""
    worst = lambda key: max((abs(r.checks[key]) for r in group if key in r.checks), default=math.nan)  # noqa: E731
    se = [float(r.shapley_se.max()) for r in group if r.shapley_se is not None]
    return dict(val_loss=group[0].checks["val_loss"], train_loss=group[0].checks["train_loss"],
                grad_norm=min(r.checks["grad_norm"] for r in group),
                u_full=group[0].checks.get("u_full", math.nan), u_empty=group[0].checks.get("u_empty", math.nan),
                shapley_max_se=max(se, default=math.nan),
                efficiency_residual=worst("efficiency_residual"), step_max_abs_err=worst("step_max_abs_err"),
                engine_rel_err=worst("engine_rel_err"), batch_grad_max_abs_err=worst("batch_grad_max_abs_err"))


CSV_COLUMNS = ["optimizer", "lr", "step", "estimator", "samples", "shapley_method",
               "pearson_shapley", "spearman_shapley", "slope_shapley", "rel_err_shapley",
               "pearson_loo", "spearman_loo", "slope_loo", "rel_err_loo",
               "val_loss", "train_loss", "grad_norm", "u_full", "u_empty", "shapley_max_se", "efficiency_residual",
               "step_max_abs_err", "engine_rel_err", "batch_grad_max_abs_err"]
TABLE_COLUMNS = [("optimizer", "optimizer", ""), ("lr", "lr", "g"), ("step", "step", "d"),
                 ("estimator", "estimator", ""), ("Pearson Sh", "pearson_shapley", ".3f"),
                 ("Spearman Sh", "spearman_shapley", ".3f"), ("slope Sh", "slope_shapley", ".3g"),
                 ("rel err Sh", "rel_err_shapley", ".3g"), ("Pearson LOO", "pearson_loo", ".3f"),
                 ("Spearman LOO", "spearman_loo", ".3f"), ("slope LOO", "slope_loo", ".3g")]
CHECK_COLUMNS = [("optimizer", "optimizer", ""), ("lr", "lr", "g"), ("step", "step", "d"),
                 ("val loss", "val_loss", ".3f"), ("min |g_B|", "grad_norm", ".3g"), ("U(N)", "u_full", ".3g"),
                 ("U(empty)", "u_empty", ".3g"),
                 ("efficiency resid", "efficiency_residual", ".1e"), ("max SE", "shapley_max_se", ".1e"),
                 ("step vs torch", "step_max_abs_err", ".1e"), ("engine rel err", "engine_rel_err", ".1e"),
                 ("sum w g_i vs batch grad", "batch_grad_max_abs_err", ".1e")]


def best_rows(rows: list) -> list:
    """Per (optimizer, lr, step): the estimator with the highest Pearson against Shapley, and first order's."""
    out = {}
    for row in rows:
        if row["estimator"] == "loo":
            continue
        key = (row["optimizer"], row["lr"], row["step"])
        entry = out.setdefault(key, dict(optimizer=key[0], lr=key[1], step=key[2], best="", best_pearson=-2.0))
        if row["estimator"] == "first_order":
            entry.update(first_order_pearson=row["pearson_shapley"], first_order_slope=row["slope_shapley"])
        if row["pearson_shapley"] > entry["best_pearson"]:
            entry.update(best=row["estimator"], best_pearson=row["pearson_shapley"],
                         best_spearman=row["spearman_shapley"], best_slope=row["slope_shapley"])
    return list(out.values())


BEST_COLUMNS = [("optimizer", "optimizer", ""), ("lr", "lr", "g"), ("step", "step", "d"),
                ("first_order Pearson", "first_order_pearson", ".3f"),
                ("first_order slope", "first_order_slope", ".3g"),
                ("best estimator", "best", ""), ("its Pearson", "best_pearson", ".3f"),
                ("its Spearman", "best_spearman", ".3f"), ("its slope", "best_slope", ".3g")]


def plot(rows: list, path: str) -> Optional[str]:
    """Heat maps of Pearson, Spearman and slope of each estimator (rows) per configuration (columns),
    against exact Shapley and against leave-one-out. Returns a notice instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "notice: matplotlib is not installed, no plot made (pip install -e \".[plot]\")"
    configs = list(dict.fromkeys((r["optimizer"], r["lr"], r["step"]) for r in rows))
    names = [n for n in ESTIMATORS + ("loo",) if any(r["estimator"] == n for r in rows)]
    by_key = {(r["optimizer"], r["lr"], r["step"], r["estimator"]): r for r in rows}
    panels = [(f"{metric}_{ref}", f"{label} vs {ref_label}") for ref, ref_label in ((SHAPLEY, "exact Shapley"),
                                                                                   (LOO, "leave-one-out"))
              for metric, label in (("pearson", "Pearson"), ("spearman", "Spearman"), ("slope", "slope"))]
    fig, axes = plt.subplots(2, 3, figsize=(3 * (1.5 + 0.55 * len(configs)), 2 * (1.6 + 0.35 * len(names))),
                             squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        shown = [n for n in names if not (key.endswith(LOO) and n == "loo")]
        grid = torch.tensor([[by_key.get(c + (name,), {}).get(key, math.nan) for c in configs] for name in shown])
        slope = key.startswith("slope")
        # slopes: 1 = the reference's scale, shown white; correlations: 1 blue, -1 red
        centre = 1.0 if slope else 0.0
        image = ax.imshow(grid.numpy(), cmap="RdBu", vmin=centre - 1, vmax=centre + 1, aspect="auto")
        for i, j in itertools.product(range(len(shown)), range(len(configs))):
            value = grid[i, j].item()
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(value - centre) > 0.6 else "black")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([f"{o}\n{lr:g}\nstep {s}" for o, lr, s in configs], fontsize=6)
        ax.set_yticks(range(len(shown)))
        ax.set_yticklabels(shown, fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- planted copy

@dataclass
class PlantedCorpus:
    """Per domain one token stream of concatenated documents (like a tokenized Pile domain), and the
    validation passage planted verbatim in one document of `planted_domain`."""

    streams: list  # int64 [tokens] per domain
    doc_starts: list  # int64 [documents] per domain
    passage: torch.Tensor  # int64 [T]
    planted_domain: int
    planted_doc: int
    planted_offset: int  # where the passage starts in its domain's stream


def build_planted_corpus(cfg: PlantedConfig, data: MarkovDomains) -> PlantedCorpus:
    """Documents of 2T..8T tokens from each domain's chain; the passage, a fresh walk of the validation
    domain (0), is inserted into a document of domain 1."""
    generator = seeded(cfg.seed, "corpus")
    streams, doc_starts = [], []
    passage = data.sample(torch.zeros(1, dtype=torch.long), cfg.seq_len, generator)[0]
    planted_domain = 1 % cfg.domains
    planted_doc = int(torch.randint(0, cfg.docs_per_domain, (1,), generator=generator))
    planted_offset = None
    for d in range(cfg.domains):
        docs = []
        for k in range(cfg.docs_per_domain):
            length = int(torch.randint(2 * cfg.seq_len, 8 * cfg.seq_len + 1, (1,), generator=generator))
            doc = data.sample(torch.tensor([d]), length, generator)[0]
            if d == planted_domain and k == planted_doc:
                cut = int(torch.randint(cfg.seq_len, length - cfg.seq_len, (1,), generator=generator))
                planted_offset = sum(len(x) for x in docs) + cut
                doc = torch.cat([doc[:cut], passage, doc[cut:]])
            docs.append(doc)
        streams.append(torch.cat(docs))
        doc_starts.append(torch.tensor([0] + [len(x) for x in docs[:-1]]).cumsum(0))
    return PlantedCorpus(streams, doc_starts, passage, planted_domain, planted_doc, planted_offset)


def planted_batch(corpus: PlantedCorpus, cfg: PlantedConfig, step: int):
    """(x, y, provenance) of `step`: windows at uniform offsets of uniformly chosen domains; at the planted
    steps one row (at a seeded position) is the window starting `shift` tokens before the passage."""
    generator = seeded(cfg.seed, "planted-train", step)
    domains = torch.randint(0, cfg.domains, (cfg.batch_size,), generator=generator).tolist()
    offsets = [int(torch.randint(0, len(corpus.streams[d]) - cfg.seq_len + 1, (1,), generator=generator))
               for d in domains]
    planted_row = None
    if step in cfg.steps:
        planted_row = int(torch.randint(0, cfg.batch_size, (1,), generator=generator))
        domains[planted_row] = corpus.planted_domain
        offsets[planted_row] = corpus.planted_offset - planted_shift(cfg)
    x = torch.stack([corpus.streams[d][o:o + cfg.seq_len] for d, o in zip(domains, offsets)])
    p_start, p_end = corpus.planted_offset, corpus.planted_offset + cfg.seq_len
    provenance = [dict(domain=d, offset=o, doc=int(torch.searchsorted(corpus.doc_starts[d], o, right=True)) - 1,
                       passage_tokens=max(0, min(o + cfg.seq_len, p_end) - max(o, p_start))
                       if d == corpus.planted_domain else 0, planted=row == planted_row)
                  for row, (d, o) in enumerate(zip(domains, offsets))]
    return x, x.clone(), provenance


def planted_shift(cfg: PlantedConfig) -> int:
    return cfg.seq_len // 4 if cfg.shift is None else cfg.shift


def run_planted(spec: OptimizerSpec, cfg: PlantedConfig, log=print) -> tuple:
    """Train on the planted corpus, valuing every row of every step with the estimators and leave-one-out,
    and the planted steps' batches also with exact Shapley. Returns (rank rows, per-occurrence rows)."""
    data = MarkovDomains(cfg.vocab_size, cfg.domains, cfg.seed)
    corpus = build_planted_corpus(cfg, data)
    model = build_float64_model(cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.seq_len, cfg.seed)
    fm = FlatModel(model)
    optimizer = build_torch_optimizer(spec, fm.params)
    x_val = corpus.passage.unsqueeze(0)
    y_val = x_val.clone()
    occurrences, planted_results = [], {}
    for step in range(1, max(cfg.steps) + 1):
        x, y, provenance = planted_batch(corpus, cfg, step)
        state, theta = capture_state(spec, optimizer, fm.params), fm.theta()
        shapley = "exact" if step in cfg.steps else "none"
        result = value_step(fm, spec, state, theta, x, y, x_val, y_val, shapley=shapley, permutations=0,
                            generator=seeded(cfg.seed, "planted-permutations", step), engine=False, step=step)
        if step in cfg.steps:
            planted_results[step] = (result, next(i for i, p in enumerate(provenance) if p["planted"]))
        for row, prov in enumerate(provenance):
            occurrences.append(dict(optimizer=spec.kind, lr=spec.lr, step=step, row=row, **prov,
                                    loo=float(result.loo[row]),
                                    **{name: float(v[row]) for name, v in result.estimates.items()},
                                    shapley=float(result.shapley[row]) if result.shapley is not None else math.nan))
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model(input_ids=x).logits, y).backward()
        if spec.clip is not None:
            torch.nn.utils.clip_grad_norm_(fm.params, spec.clip)
        optimizer.step()
        if step in cfg.steps:
            log(f"  {spec.label} step {step}: planted window in row {planted_results[step][1]}, "
                f"val loss {float(fm.loss(theta, x_val, y_val)):.4f}")
    return planted_rank_rows(spec, cfg, corpus, planted_results, occurrences), occurrences


def run_ranks(occurrences, name, run_index, planted_key) -> tuple:
    """(rank of occurrence `run_index` among `occurrences` by `name`, rank of the document `planted_key` by the
    summed value of its windows, number of documents)."""
    doc_keys = sorted({(o["domain"], o["doc"]) for o in occurrences})
    run_values = torch.tensor([o[name] for o in occurrences], dtype=torch.float64)
    doc_values = torch.zeros(len(doc_keys), dtype=torch.float64)
    for o, v in zip(occurrences, run_values):
        doc_values[doc_keys.index((o["domain"], o["doc"]))] += v
    return rank_descending(run_values, run_index), rank_descending(doc_values, doc_keys.index(planted_key)), \
        len(doc_keys)


def planted_rank_rows(spec, cfg, corpus, planted_results, occurrences) -> list:
    """Rank (1 = most valuable) of the planted window in its batch and among all rows of the run, and of
    the planted document among all documents by the summed value of its windows, per estimator; the last two
    also as the report ranks (an AdamW run without its steps 1-2, ghost_results.analysis.unreliable_steps)."""
    names = [SHAPLEY, LOO] + [n for n in ESTIMATORS if n in occurrences[0]]
    doc_keys = sorted({(o["domain"], o["doc"]) for o in occurrences})
    planted_key = (corpus.planted_domain, corpus.planted_doc)
    left_out = ADAM_UNRELIABLE_STEPS if spec.kind == "adamw" else ()
    reported = [o for o in occurrences if o["step"] not in left_out]
    rows = []
    for step, (result, planted_row) in planted_results.items():
        run_index = next(i for i, o in enumerate(occurrences) if o["step"] == step and o["planted"])
        for name in names:
            batch_values = {SHAPLEY: result.shapley, LOO: result.loo}.get(name, result.estimates.get(name))
            row = dict(optimizer=spec.kind, lr=spec.lr, step=step, estimator=name,
                       rank_in_batch=rank_descending(batch_values, planted_row), batch_size=len(batch_values),
                       rank_in_run=math.nan, occurrences=len(occurrences), doc_rank=math.nan, documents=len(doc_keys),
                       rank_reported=math.nan, doc_rank_reported=math.nan, documents_reported=len(doc_keys))
            if name != SHAPLEY:  # Shapley is computed at the planted steps only
                rank, doc_rank, _ = run_ranks(occurrences, name, run_index, planted_key)
                row.update(rank_in_run=rank, doc_rank=doc_rank)
                if step not in left_out:
                    rank, doc_rank, documents = run_ranks(reported, name, reported.index(occurrences[run_index]),
                                                          planted_key)
                    row.update(rank_reported=rank, doc_rank_reported=doc_rank, documents_reported=documents)
            rows.append(row)
    return rows


PLANTED_COLUMNS = ["optimizer", "lr", "step", "estimator", "rank_in_batch", "batch_size", "rank_in_run", "occurrences",
                   "doc_rank", "documents", "rank_reported", "doc_rank_reported", "documents_reported"]
PLANTED_TABLE = [("optimizer", "optimizer", ""), ("lr", "lr", "g"), ("step", "step", "d"),
                 ("estimator", "estimator", ""), ("rank in batch", "rank_in_batch", "d"), ("of", "batch_size", "d"),
                 ("rank in run", "rank_in_run", ".0f"), ("of", "occurrences", "d"),
                 ("doc rank (run sum)", "doc_rank", ".0f"), ("of", "documents", "d"),
                 ("rank in run, as reported", "rank_reported", ".0f"),
                 ("doc rank, as reported", "doc_rank_reported", ".0f"), ("of", "documents_reported", "d")]
OCCURRENCE_COLUMNS = ["optimizer", "lr", "step", "row", "domain", "doc", "offset", "passage_tokens", "planted",
                      SHAPLEY, LOO, *ESTIMATORS]


# ---------------------------------------------------------------- command line

def float_list(text: str) -> tuple:
    values = tuple(positive_float(v) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more learning rates > 0")
    return values


def step_list(text: str) -> tuple:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of steps") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more steps >= 1 (1 = the first step)")
    return values


def optimizer_list(text: str) -> tuple:
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [v for v in values if v not in OPTIMIZERS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(OPTIMIZERS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="python -m benchmarks.fidelity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small configuration (< 20 s) for the tests")
    parser.add_argument("--planted", action="store_true",
                        help="the planted-copy experiment instead of the estimator table")
    parser.add_argument("--optimizers", type=optimizer_list, default=None,
                        help="comma list of sgd,momentum,adamw (default: all three; --planted: adamw)")
    for kind in OPTIMIZERS:
        defaults = ",".join(map(str, DEFAULT_LRS[kind]))
        parser.add_argument(f"--{kind}_lrs", type=float_list, default=None,
                            help=f"comma list of learning rates for {kind} (default {defaults}; "
                                 f"--planted {PLANTED_LRS[kind][0]})")
    parser.add_argument("--steps", type=step_list, default=None,
                        help=f"valued steps, 1-based (default {','.join(map(str, HarnessConfig.steps))}; "
                             f"--planted: the steps the planted window is sampled, default "
                             f"{','.join(map(str, PlantedConfig.steps))})")
    parser.add_argument("--clip", type=positive_float, default=None,
                        help="clip the gradient to this norm (default off)")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help=f"B (default {HarnessConfig.batch_size}; exact Shapley up to {MAX_EXACT_B})")
    parser.add_argument("--val_batch_size", type=positive_int, default=None, help="validation rows")
    parser.add_argument("--batches_per_step", type=positive_int, default=None,
                        help="batches valued per step, pooled: the run's own and others drawn at the same state")
    parser.add_argument("--shapley", choices=("auto", "exact", "permutation"), default="auto",
                        help=f"auto: exact enumeration up to B={MAX_EXACT_B}, permutation sampling above")
    parser.add_argument("--permutations", type=positive_int, default=None, help="permutations per batch when sampling")
    parser.add_argument("--seq_len", type=positive_int, default=None, help="tokens per row (T)")
    parser.add_argument("--vocab_size", type=positive_int, default=None)
    parser.add_argument("--n_layer", type=positive_int, default=None)
    parser.add_argument("--n_embd", type=positive_int, default=None)
    parser.add_argument("--n_head", type=positive_int, default=None)
    parser.add_argument("--shift", type=int, default=None,
                        help="--planted: the planted window starts this many tokens before the passage (default T/4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (the matrices are tiny: more threads do not help)")
    parser.add_argument("--out", default="Results/fidelity", help="directory for the CSV files and the plot")
    return parser


def harness_config(parser, args) -> HarnessConfig:
    overrides = dict(QUICK) if args.quick else {}
    for name in ("batch_size", "val_batch_size", "batches_per_step", "permutations", "seq_len", "vocab_size",
                 "n_layer", "n_embd", "n_head", "steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = replace(HarnessConfig(), shapley=args.shapley, clip=args.clip, seed=args.seed, **overrides)
    check_model_flags(parser, cfg)
    if cfg.shapley == "exact" and cfg.batch_size > 20:
        parser.error(f"--shapley exact --batch-size {cfg.batch_size}: 2^B coalitions; use B <= 20 or permutation")
    if resolve_shapley(cfg.shapley, cfg.batch_size) == "permutation" and cfg.permutations < 2:
        parser.error("--permutations must be >= 2 (the standard error needs two)")
    if cfg.batch_size < 2:
        parser.error(f"--batch-size {cfg.batch_size}: a game needs at least 2 players")
    return cfg


def planted_config(parser, args) -> PlantedConfig:
    for flag in ("val_batch_size", "batches_per_step", "permutations"):
        if getattr(args, flag) is not None:
            parser.error(f"--{flag.replace('_', '-')} does not apply to --planted (one validation passage, "
                         "the run's own batches, exact Shapley)")
    if args.shapley != "auto":
        parser.error("--shapley does not apply to --planted (exact Shapley at the planted steps)")
    overrides = dict(QUICK_PLANTED) if args.quick else {}
    for name in ("batch_size", "seq_len", "vocab_size", "n_layer", "n_embd", "n_head", "steps", "shift"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = replace(PlantedConfig(), clip=args.clip, seed=args.seed, **overrides)
    check_model_flags(parser, cfg)
    if not 2 <= cfg.batch_size <= MAX_EXACT_B:
        parser.error(f"--batch-size {cfg.batch_size}: --planted values its batches exactly; use 2..{MAX_EXACT_B}")
    if not 0 <= planted_shift(cfg) < cfg.seq_len:
        parser.error(f"--shift {cfg.shift}: must be in 0..{cfg.seq_len - 1}")
    return cfg


def check_model_flags(parser, cfg):
    if cfg.n_embd % cfg.n_head:
        parser.error(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}")
    if cfg.seq_len < 2:
        parser.error(f"--seq-len {cfg.seq_len}: a row needs at least 2 tokens (one target)")
    if cfg.vocab_size < 2:
        parser.error(f"--vocab-size {cfg.vocab_size}: at least 2 tokens")


def optimizer_specs(args, lrs_default: dict, kinds: tuple, clip) -> list:
    specs = []
    for kind in kinds:
        lrs = getattr(args, f"{kind}_lrs") or lrs_default[kind]
        specs += [OptimizerSpec(kind, lr, clip=clip) for lr in lrs]
    return specs


def describe_machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return main_planted(parser, args) if args.planted else main_table(parser, args)
    finally:
        torch.set_num_threads(threads)


def main_table(parser, args) -> int:
    started = time.perf_counter()
    cfg = harness_config(parser, args)
    specs = optimizer_specs(args, QUICK_LRS if args.quick else DEFAULT_LRS, args.optimizers or OPTIMIZERS, cfg.clip)
    data = MarkovDomains(cfg.vocab_size, cfg.domains, cfg.seed)
    print(f"GPT-2 n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} vocab={cfg.vocab_size} "
          f"T={cfg.seq_len} B={cfg.batch_size} Bv={cfg.val_batch_size}, float64; {cfg.domains} Markov domains, "
          f"validation from domain 0; steps {','.join(map(str, cfg.steps))}; {cfg.batches_per_step} batch(es) per "
          f"step; Shapley: {resolve_shapley(cfg.shapley, cfg.batch_size)}; clip "
          f"{cfg.clip if cfg.clip else 'off'}; seed {cfg.seed}; {describe_machine()}")
    results = []
    for spec in specs:
        results += train_and_value(spec, cfg, data)
    rows = metric_rows(results)
    csv_path, png_path = os.path.join(args.out, "fidelity.csv"), os.path.join(args.out, "fidelity.png")
    write_csv(csv_path, rows, CSV_COLUMNS)
    print("\nAgreement with exact Shapley (Sh) and leave-one-out (LOO) of the step's game, samples of a step's "
          "batches pooled; slope = <est, ref> / <ref, ref>; rel err = |est - ref| / |ref|")
    print(format_table(rows, TABLE_COLUMNS))
    print("\nBest estimator against exact Shapley (by Pearson)")
    print(format_table(best_rows(rows), BEST_COLUMNS))
    print("\nChecks: efficiency = sum of Shapley values - (U(N) - U(empty)); functional full-batch step vs torch's "
          "optimizer.step(); engine first order vs dense")
    print(format_table([r for r in rows if r["estimator"] == "first_order"], CHECK_COLUMNS))
    notice = plot(rows, png_path)
    print(f"\nCSV: {csv_path}")
    print(notice or f"plot: {png_path}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


def main_planted(parser, args) -> int:
    started = time.perf_counter()
    cfg = planted_config(parser, args)
    specs = optimizer_specs(args, PLANTED_LRS, args.optimizers or ("adamw",), cfg.clip)
    print(f"planted copy: GPT-2 n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} vocab={cfg.vocab_size} "
          f"T={cfg.seq_len} B={cfg.batch_size}, float64; {cfg.domains} Markov domains x {cfg.docs_per_domain} "
          f"documents; validation = one passage of domain 0 planted verbatim in a document of domain 1; the window "
          f"starting {planted_shift(cfg)} tokens before it is in the batch at steps {','.join(map(str, cfg.steps))}; "
          f"clip {cfg.clip if cfg.clip else 'off'}; seed {cfg.seed}; {describe_machine()}")
    rank_rows, occurrences = [], []
    for spec in specs:
        ranks_of_spec, occurrences_of_spec = run_planted(spec, cfg)
        rank_rows += ranks_of_spec
        occurrences += occurrences_of_spec
    write_csv(os.path.join(args.out, "planted.csv"), rank_rows, PLANTED_COLUMNS)
    write_csv(os.path.join(args.out, "planted_values.csv"), occurrences, OCCURRENCE_COLUMNS)
    print("\nRank of the planted window (1 = most valuable): in its batch, among all rows of the run, and of its "
          "document among all documents by the run's summed value (Shapley: at the planted steps only)")
    print(format_table(rank_rows, PLANTED_TABLE))
    others = sum(1 for o in occurrences if o["passage_tokens"] > 0 and not o["planted"])
    print(f"\nother sampled windows overlapping the passage: {others}")
    print(f"CSV: {os.path.join(args.out, 'planted.csv')}, {os.path.join(args.out, 'planted_values.csv')}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
