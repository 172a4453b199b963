"""Shared pieces of the benchmarks: configuration, model and batches, the Regular and
GradDotProd steps, interleaved timing with peak memory, the analytic floor and the CSV schema.

A "step" is what one training step of a method costs: forward, backward, whatever the
method needs to leave the training gradient in `p.grad` (and, for every method but
Regular, the per-sample dot products), and `optimizer.step()`. The optimizer is SGD with
lr=0: the update costs the same for every method, and the parameters stay fixed, so every
repetition values the same point and the methods' dot products can be compared.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import math
import os
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

# One row per (configuration, method); compare.py and profile_sweep.py write the same columns.
CSV_COLUMNS = [
    "method", "architecture", "n_layer", "n_head", "n_embd", "vocab_size",
    "seq_len", "batch_size", "val_batch_size", "amp", "grad_ckpt", "attn_impl", "device",
    "reps", "step_time_s", "step_time_min_s", "tokens_per_s", "peak_mem_mb", "base_mem_mb",
    "mem_metric", "time_vs_regular", "floor_ratio", "time_vs_floor", "rel_err", "status",
]

REGULAR = "Regular"
GRADDOTPROD = "GradDotProd"
STATUS_OK = "ok"
STATUS_OOM = "skipped (out of memory)"
ATTN_IMPLS = ("sdpa", "eager")


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration. n_layer/n_head/n_embd/vocab_size override the architecture."""

    architecture: str = "GPT2-Tiny"
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    vocab_size: Optional[int] = None
    seq_len: int = 64
    batch_size: int = 16
    val_batch_size: int = 1
    amp: bool = False
    grad_ckpt: bool = False
    attn_impl: str = "sdpa"
    device: str = "cpu"
    seed: int = 0

    def token_vocab_size(self) -> int:
        """Token ids are drawn below this: the real vocabulary, never the padded rows of the model's."""
        from GradDotProd_LM.model import GPT2_VOCAB_SIZE

        return self.vocab_size or GPT2_VOCAB_SIZE

    def model_overrides(self) -> dict:
        names = ("n_layer", "n_head", "n_embd", "vocab_size")
        overrides = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.vocab_size is not None:
            # GPT-2's <|endoftext|> (50256) must lie inside a reduced vocabulary
            overrides.update(bos_token_id=self.vocab_size - 1, eos_token_id=self.vocab_size - 1)
        return overrides


@dataclass
class Method:
    """A method under test. `step` returns the dot products [B] (None for Regular).

    `setup`/`teardown` run outside the timed region (GradDotProd attaches and detaches its hooks
    there, so the other methods run on a model without hooks).
    """

    name: str
    step: Callable[[], Optional[torch.Tensor]]
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None


@dataclass
class MethodResult:
    name: str
    times_s: list = field(default_factory=list)
    peak_mem_mb: float = math.nan
    base_mem_mb: float = math.nan
    dot_products: Optional[torch.Tensor] = None  # float32 [B], from the first (warm-up) step
    status: str = STATUS_OK


# ---------------------------------------------------------------- model, batches, steps

def build_bench_model(cfg: BenchConfig) -> torch.nn.Module:
    from GradDotProd_LM.model import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.architecture, n_positions=max(1024, cfg.seq_len), attn_implementation=cfg.attn_impl,
                        gradient_checkpointing=cfg.grad_ckpt, **cfg.model_overrides())
    return model.to(cfg.device).train()


def make_batches(cfg: BenchConfig, vocab_size: int):
    """Random token rows (seeded) with ids below `vocab_size`. Labels are the inputs: the HF model shifts
    them itself."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    x_train = torch.randint(0, vocab_size, (cfg.batch_size, cfg.seq_len), generator=generator)
    x_val = torch.randint(0, vocab_size, (cfg.val_batch_size, cfg.seq_len), generator=generator)
    x_train, x_val = x_train.to(cfg.device), x_val.to(cfg.device)
    return x_train, x_train.clone(), x_val, x_val.clone()


def autocast(cfg: BenchConfig):
    """bf16 autocast when cfg.amp (CPU autocast on CPU, CUDA autocast on GPU); a no-op otherwise."""
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.amp)


def fresh_grads(optimizer):
    return lambda: optimizer.zero_grad(set_to_none=True)


def regular_method(model, optimizer, batch, cfg: BenchConfig) -> Method:
    x_train, y_train, _, _ = batch

    def step():
        with autocast(cfg):
            loss = model(input_ids=x_train, labels=y_train).loss
        loss.backward()
        optimizer.step()
        return None

    return Method(REGULAR, step, setup=fresh_grads(optimizer))


def graddotprod_method(model, optimizer, batch, cfg: BenchConfig, value: str = "first_order", projection=None,
                       validation: bool = True, name: Optional[str] = None) -> Method:
    """The engine's step; ``value`` picks its estimator and ``projection`` adds projected gradients
    (GradDotProdEngine's ``value`` and ``projection``); ``validation=False`` runs without the validation rows
    (projections only). The method is named ``name``, else GradDotProd with the estimator in parentheses when it
    is not the first-order one."""
    from ghost_engine import GradDotProdEngine

    x_train, y_train, x_val, y_val = batch
    engine = GradDotProdEngine(model, val_batch=(x_val, y_val) if validation else None, task="causal_lm",
                               loss_reduction="mean", value=value, projection=projection)

    attached = []  # the engine's hooks live only inside GradDotProd's own steps

    def setup():
        optimizer.zero_grad(set_to_none=True)
        engine.attach(optimizer)
        attached.append(True)

    def step():
        x, y = engine.prepare_forward_input(x_train, y_train, loss_multiplier=1.0)
        with autocast(cfg):
            loss = model(input_ids=x, labels=y).loss
        loss.backward()
        engine.prepare_gradients()
        dots = engine.aggregate_and_log().dot_products  # before the update: some estimators read .grad
        optimizer.step()
        return dots

    def teardown():
        if attached:
            attached.clear()
            engine.detach()

    if name is None:
        name = GRADDOTPROD if value == "first_order" else f"{GRADDOTPROD} ({value})"
    return Method(name, step, setup=setup, teardown=teardown)


CORE_METHODS = {REGULAR: regular_method, GRADDOTPROD: graddotprod_method}


# ---------------------------------------------------------------- memory

_RSS_FIELD = re.compile(r"^(VmHWM|VmRSS):\s+(\d+) kB", re.MULTILINE)


def _proc_status_mb() -> dict:
    with open("/proc/self/status") as status:
        return {name: int(kb) / 1024 for name, kb in _RSS_FIELD.findall(status.read())}


class PeakMemory:
    """Peak memory of one step.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats ("cuda_max_allocated").
    CPU on Linux: the process's peak resident set size during the step ("cpu_peak_rss"): freed
    heap memory is handed back (malloc_trim), then the kernel's high-water mark VmHWM is reset
    to the current RSS (writing 5 to /proc/self/clear_refs) and read after the step.
    Elsewhere: ru_maxrss, the peak since the process started ("cpu_peak_rss_since_start").
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self._libc = None
        if self.cuda:
            self.metric = "cuda_max_allocated"
        elif self._can_reset_rss_peak():
            self.metric = "cpu_peak_rss"
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None
        else:
            self.metric = "cpu_peak_rss_since_start"

    @staticmethod
    def _can_reset_rss_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            return "VmHWM" in _proc_status_mb()
        except OSError:
            return False

    def reset(self) -> float:
        """Start a measurement; returns the memory held now, in MB."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        if self.metric == "cpu_peak_rss":
            if self._libc is not None:
                self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            return _proc_status_mb()["VmRSS"]
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        """Peak since the last reset, in MB."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.metric == "cpu_peak_rss":
            return _proc_status_mb()["VmHWM"]
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def release_memory(device: str):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- timing

def _synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_interleaved(methods: list, reps: int, device: str, warmup: int = 1, meter: PeakMemory | None = None):
    """for rep: for method: one step. Warm-up steps first, untimed, also interleaved.

    Returns {name: MethodResult}. A method that runs out of memory is marked skipped and dropped
    from the remaining repetitions; any other error propagates.
    """
    meter = meter or PeakMemory(device)
    results = {method.name: MethodResult(method.name) for method in methods}
    active = list(methods)
    for rep in range(warmup + reps):
        for method in list(active):
            result = results[method.name]
            out_of_memory = False
            try:
                method.setup()
                base_mb = meter.reset()
                _synchronize(device)
                start = time.perf_counter()
                dot_products = method.step()
                _synchronize(device)
                elapsed = time.perf_counter() - start
                peak_mb = meter.peak()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                out_of_memory = True
            finally:
                method.teardown()
            if out_of_memory:
                # handled outside the except block: the traceback would keep the step's tensors alive
                result.status, result.times_s = STATUS_OOM, []
                result.peak_mem_mb = result.base_mem_mb = math.nan
                result.dot_products = None
                active.remove(method)
                release_memory(device)
                continue
            if result.dot_products is None and dot_products is not None:
                result.dot_products = dot_products.detach().float().cpu()
            result.peak_mem_mb = peak_mb if math.isnan(result.peak_mem_mb) else max(result.peak_mem_mb, peak_mb)
            result.base_mem_mb = base_mb if math.isnan(result.base_mem_mb) else min(result.base_mem_mb, base_mb)
            if rep >= warmup:
                result.times_s.append(elapsed)
    return results


# ---------------------------------------------------------------- the analytic floor

def floor_ratio(model, optimizer, batch, cfg: BenchConfig) -> float:
    """docs/METHOD.md section 3 floor for this configuration, from the flops of one Regular step."""
    from ghost_engine.cost import analytic_floor_ratio, count_step_flops

    regular = regular_method(model, optimizer, batch, cfg)
    regular.setup()
    regular_step_flops = count_step_flops(regular.step)
    optimizer.zero_grad(set_to_none=True)
    return float(analytic_floor_ratio(model, cfg.batch_size, cfg.val_batch_size, cfg.seq_len, regular_step_flops))


# ---------------------------------------------------------------- one configuration end to end

def measure_config(cfg: BenchConfig, method_factories: dict, reps: int, warmup: int = 1):
    """Build the model and batches of `cfg`, run the methods interleaved, return (rows, results).

    method_factories: {name: factory(model, optimizer, batch, cfg) -> Method}, in run order.
    Sizes that do not fit give rows with status "skipped (out of memory)".
    """
    meter = PeakMemory(cfg.device)
    model = optimizer = batch = None
    floor = math.nan
    try:
        model = build_bench_model(cfg)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        batch = make_batches(cfg, cfg.token_vocab_size())
        floor = floor_ratio(model, optimizer, batch, cfg)
        methods = [factory(model, optimizer, batch, cfg) for factory in method_factories.values()]
        results = run_interleaved(methods, reps, cfg.device, warmup=warmup, meter=meter)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        results = None
    if results is None:
        # the model, the batch or the floor's Regular step did not fit
        model = optimizer = batch = None
        release_memory(cfg.device)
        results = {name: MethodResult(name, status=STATUS_OOM) for name in method_factories}
    config_fields = _config_fields(cfg, model)
    rows = [_row(config_fields, results[name], results, floor, reps, meter.metric) for name in method_factories]
    del model, optimizer, batch
    release_memory(cfg.device)
    return rows, results


def skipped_row(template: dict, method: str, status: str) -> dict:
    """A row for a method that was not run, with the configuration of `template` (a measured row)."""
    row = dict(template, method=method, status=status)
    for key in ("step_time_s", "step_time_min_s", "tokens_per_s", "peak_mem_mb", "base_mem_mb", "time_vs_regular",
                "time_vs_floor", "rel_err"):
        row[key] = math.nan
    return row


def _config_fields(cfg: BenchConfig, model) -> dict:
    fields = asdict(cfg)
    fields.pop("seed")
    if model is not None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
            fields[name] = getattr(model.config, name)
    fields["amp"] = int(cfg.amp)
    fields["grad_ckpt"] = int(cfg.grad_ckpt)
    return fields


def _row(config_fields: dict, result: MethodResult, results: dict, floor: float, reps: int, mem_metric: str) -> dict:
    row = dict(config_fields, method=result.name, reps=reps, mem_metric=mem_metric, status=result.status,
               floor_ratio=floor, rel_err=math.nan)
    tokens_per_step = config_fields["batch_size"] * config_fields["seq_len"]
    median = statistics.median(result.times_s) if result.times_s else math.nan
    regular = results.get(REGULAR)
    regular_median = statistics.median(regular.times_s) if regular is not None and regular.times_s else math.nan
    row.update(step_time_s=median, step_time_min_s=min(result.times_s, default=math.nan),
               tokens_per_s=tokens_per_step / median if result.times_s else math.nan,
               peak_mem_mb=result.peak_mem_mb, base_mem_mb=result.base_mem_mb,
               time_vs_regular=median / regular_median)
    row["time_vs_floor"] = row["time_vs_regular"] / floor
    return row


# ---------------------------------------------------------------- output

def write_csv(path: str, rows: list, columns: list = CSV_COLUMNS):
    """rows (dicts) as CSV with `columns`; NaN and None as empty cells, floats to 6 significant digits."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({name: _csv_value(row.get(name)) for name in columns})


def _csv_value(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def format_table(rows: list, columns: list) -> str:
    """Fixed-width text table; columns: [(header, key, format spec)]."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                line.append("-")
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [bool(spec) for _, _, spec in columns]  # numbers right-aligned, text left-aligned
    text = [" | ".join(cell.rjust(width) if right else cell.ljust(width)
                       for cell, width, right in zip(line, widths, numeric)).rstrip() for line in cells]
    text.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(text)


# ---------------------------------------------------------------- command line

def _number(kind, wording: str, accept, bound: str):
    """An argparse type: `kind` of the flag's text, for which accept(value) holds (a NaN never does)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wording}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    return parse


positive_int = _number(int, "an integer", lambda v: v >= 1, ">= 1")
positive_float = _number(float, "a number", lambda v: v > 0, "> 0")
non_negative_int = _number(int, "an integer", lambda v: v >= 0, ">= 0")


def add_timing_arguments(parser: argparse.ArgumentParser, reps: int):
    """--reps and --warmup, shared by every benchmark that times interleaved steps."""
    group = parser.add_argument_group("timing")
    group.add_argument("--reps", type=positive_int, default=reps, help="timed repetitions per method (median kept)")
    group.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps per method before timing")


def on_off(text: str) -> bool:
    choices = {"on": True, "off": False, "1": True, "0": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"{text!r}: use on or off")
    return choices[text.lower()]


def add_config_arguments(parser: argparse.ArgumentParser, defaults: BenchConfig):
    """Flags for every BenchConfig field (the sweeps and compare share them)."""
    from GradDotProd_LM.model import ARCHITECTURES

    group = parser.add_argument_group("model and batch")
    group.add_argument("--architecture", default=defaults.architecture, choices=sorted(ARCHITECTURES))
    group.add_argument("--n_layer", type=positive_int, default=defaults.n_layer, help="override the architecture")
    group.add_argument("--n_head", type=positive_int, default=defaults.n_head, help="override the architecture")
    group.add_argument("--n_embd", type=positive_int, default=defaults.n_embd, help="override the architecture")
    group.add_argument("--vocab_size", type=positive_int, default=defaults.vocab_size,
                       help="override GPT-2's 50257 (smaller heads for quick CPU runs)")
    group.add_argument("--seq_len", type=positive_int, default=defaults.seq_len, help="tokens per row (T)")
    group.add_argument("--batch_size", type=positive_int, default=defaults.batch_size, help="training rows (B)")
    group.add_argument("--val_batch_size", type=positive_int, default=defaults.val_batch_size,
                       help="validation rows (Bv)")
    group.add_argument("--amp", type=on_off, default=defaults.amp,
                       help="on: bf16 autocast (CUDA autocast on GPU, CPU autocast on CPU)")
    group.add_argument("--grad_ckpt", type=on_off, default=defaults.grad_ckpt, help="gradient checkpointing on/off")
    group.add_argument("--attn_impl", default=defaults.attn_impl, choices=ATTN_IMPLS)
    group.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")


def config_from_args(parser: argparse.ArgumentParser, args) -> BenchConfig:
    """BenchConfig from parsed flags; bad combinations exit with argparse's code 2."""
    cfg = BenchConfig(architecture=args.architecture, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size,
                      val_batch_size=args.val_batch_size, amp=args.amp, grad_ckpt=args.grad_ckpt,
                      attn_impl=args.attn_impl, device=args.device, seed=args.seed)
    check_config(parser, cfg)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return cfg


def check_config(parser: argparse.ArgumentParser, cfg: BenchConfig):
    from GradDotProd_LM.model import ARCHITECTURES

    if cfg.seq_len < 2:
        parser.error(f"--seq_len {cfg.seq_len}: a causal LM row needs at least 2 tokens (one target)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    if not (cfg.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", cfg.device)):
        parser.error(f"--device {cfg.device!r}: use cpu, cuda or cuda:N")
    n_embd = cfg.n_embd or ARCHITECTURES[cfg.architecture]["n_embd"]
    n_head = cfg.n_head or ARCHITECTURES[cfg.architecture]["n_head"]
    if n_embd % n_head:
        parser.error(f"n_embd={n_embd} is not divisible by n_head={n_head}: pass --n_head dividing --n_embd")
