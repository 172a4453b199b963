"""The state of one micro-batch, from prepare_forward_input() to its filing: MicroBatch.

arm() fills it for the coming forward and backward (the scales below, the sinks the taps' backward writes to);
the taps (ghost_engine.tap) read and fill it; finish() reads the sinks once the backward ran and clears it.

Scaling. With the model's loss L = s·Σ_all ce_t (s = 1/N_all for a mean, 1 for a sum) multiplied by
``loss_multiplier`` m before backward, every hooked output gradient carries the factor c = m·s, so
    grad l_i     = G_i / (c·n_i)          (l_i: mean over sample i's n_i targets)
    grad L_val   = G_val / (c·N_val)
    dot_i        = <G_i, G_val> / (c²·n_i·N_val)
    Regular grad = m·s_train·Σ_train ∇ce = (full − G_val)·(s_train / s).

Must not touch: the model, its hooks, the optimizer. One MicroBatch lives as long as its engine and is refilled,
never replaced: torch.compile guards on the identity of the objects its traced hooks read.
"""
from dataclasses import dataclass, field

import torch

from ghost_engine.layers import accum_dtype
from ghost_engine.result import MicroBatchResult
from ghost_engine.values import COSINE, DEFERRED


@dataclass(eq=False)
class MicroBatch:
    """The armed micro-batch. One object for the engine's lifetime, refilled by prepare_forward_input:
    torch.compile guards on the identity of the objects its traced hooks read."""

    value: str  # the engine's estimator (ghost_engine.values)
    loss_reduction: str  # "mean" or "sum"
    hooked_params: list  # the names of the hooked parameters: the rows of the sinks
    armed: bool = False
    generation: int = 0  # counts prepared micro-batches: a tap of an earlier one must not run its backward
    n_train: int = 0
    rows: int = 0
    row_len: int = 0  # dim 1 of the inputs (T for token ids), 0 for inputs with one dim
    counts: torch.Tensor = None  # [B] n_i
    n_train_targets: int = 0
    dot_scale: torch.Tensor = None  # [B] 1 / (c²·n_i·N_val), 0 where n_i = 0
    # s_train / s while armed, else 1: a CPU scalar tensor the parameters' gradient hooks multiply by (a C function,
    # no Python frame per parameter; on a GPU a CPU scalar is a kernel argument, nothing waits)
    grad_scale: torch.Tensor = field(default_factory=lambda: torch.ones((), dtype=torch.float64))
    sink: torch.Tensor = None  # [P, B] leaf, one row per hooked parameter; .grad collects raw <G_i, G_val>
    sinks: dict = field(default_factory=dict)  # parameter name -> its row of `sink` (a view)
    seen: dict = field(default_factory=dict)  # layer name -> (training, validation) input shapes
    channels: dict = field(default_factory=dict)  # tied parameter -> (support, first, channels, training ids)
    precond: dict = field(default_factory=dict)  # adamw: parameter name -> D (parameter layout)
    deferred: list = field(default_factory=list)  # DEFERRED: (layer, act_tr, grad_tr, act_v, grad_v) per tap
    val_grads: dict = field(default_factory=dict)  # DEFERRED: parameter name -> grad L_val (from the taps)
    autocast: tuple = None  # DEFERRED: (device type, dtype) of the autocast the forward ran under, or None
    norm_sink: torch.Tensor = None  # cosine: [P, B + 1] leaf; .grad: raw ||G_i||², last column ||G_val||²
    norm_sinks: dict = field(default_factory=dict)  # cosine: parameter name -> its row of `norm_sink`
    norm_scale: torch.Tensor = None  # cosine, DEFERRED: [B] 1 / (c·n_i), 0 where n_i = 0
    val_norm_scale: float = 0.0  # cosine, DEFERRED, projections: 1 / (c·N_val)
    # projections (ghost_engine.projection), set by the engine: parameter name -> its two matrices (transposed, on the
    # device; None: a side kept whole) and each parameter's columns, in hooked_params order
    proj_mats: dict = field(default_factory=dict)
    proj_sizes: list = field(default_factory=list)
    proj_sink: torch.Tensor = None  # [B + 1, K] leaf; .grad: raw Π_i per row, last row the validation gradient's
    proj_sinks: dict = field(default_factory=dict)  # parameter name -> its columns of `proj_sink` (a view)

    def arm(self, X_train, counts, n_train_targets: int, val_rows: int, n_val_targets: int, loss_multiplier: float,
            param, precond):
        """Fill the state for the coming forward and backward of [X_train; val_rows validation rows]; counts: [B]
        n_i; param: a parameter of the model (its accumulation dtype is the sinks'); precond: adamw's D, else None."""
        n_all = n_train_targets + n_val_targets
        s, s_train = (1.0 / n_all, 1.0 / n_train_targets) if self.loss_reduction == "mean" else (1.0, 1.0)
        c = loss_multiplier * s
        dtype = accum_dtype(param)
        counts_f = counts.to(dtype)
        self.generation += 1
        self.n_train, self.rows = X_train.shape[0], X_train.shape[0] + val_rows
        self.row_len = X_train.shape[1] if X_train.dim() > 1 else 0
        self.counts, self.n_train_targets = counts, n_train_targets
        self.dot_scale = torch.where(counts > 0, 1.0 / (c * c * max(n_val_targets, 1) * counts_f.clamp(min=1)),
                                     torch.zeros_like(counts_f))
        self.grad_scale.fill_(s_train / s)
        # one leaf for every parameter's dot products: one allocation and one accumulation per micro-batch
        self.sink = torch.zeros(len(self.hooked_params), self.n_train, dtype=dtype, device=X_train.device,
                                requires_grad=True)
        self.sinks = dict(zip(self.hooked_params, self.sink.unbind(0)))
        if precond is not None:
            self.precond = precond
        elif self.value == COSINE:
            self.norm_sink = torch.zeros(len(self.hooked_params), self.n_train + 1, dtype=dtype,
                                         device=X_train.device, requires_grad=True)
            self.norm_sinks = dict(zip(self.hooked_params, self.norm_sink.unbind(0)))
        if self.proj_mats:
            self.proj_sink = torch.zeros(self.n_train + 1, sum(self.proj_sizes), dtype=dtype, device=X_train.device,
                                         requires_grad=True)
            self.proj_sinks = dict(zip(self.hooked_params, self.proj_sink.split(self.proj_sizes, dim=1)))
        if self.value in (COSINE, *DEFERRED) or self.proj_mats:  # grad l_i = G_i/(c·n_i), grad L_val = G_val/(c·N_val)
            self.norm_scale = torch.where(counts > 0, 1.0 / (c * counts_f.clamp(min=1)), torch.zeros_like(counts_f))
            self.val_norm_scale = 1.0 / (c * n_val_targets) if n_val_targets else 0.0
        self.seen.clear()
        self.channels.clear()
        self.armed = True

    def disarm(self):
        """Drop the micro-batch (filed, void or detached): the taps of its forward no longer run their backward."""
        self.armed = False
        self.grad_scale.fill_(1.0)
        self.sink, self.sinks, self.counts, self.dot_scale = None, {}, None, None
        self.precond, self.norm_sink, self.norm_sinks, self.norm_scale = {}, None, {}, None
        self.deferred, self.val_grads, self.autocast = [], {}, None
        self.proj_sink, self.proj_sinks = None, {}
        self.seen.clear()
        self.channels.clear()

    def finish(self) -> MicroBatchResult:
        """Read the sinks once the backward ran, and disarm."""
        raw = self.sink.grad  # [P, B]
        raw_norms = None if self.norm_sink is None else self.norm_sink.grad  # cosine: [P, B + 1]
        projecting, raw_proj = self.proj_sink is not None, None if self.proj_sink is None else self.proj_sink.grad
        val_rows = self.rows - self.n_train
        finished = MicroBatchResult(counts=self.counts, n_train_targets=self.n_train_targets, seen=dict(self.seen),
                                    deferred=self.deferred, val_grads=self.val_grads, autocast=self.autocast,
                                    norm_scale=self.norm_scale)
        dot_scale, val_norm_scale = self.dot_scale, self.val_norm_scale
        self.disarm()
        if (raw is None and val_rows) or (projecting and raw_proj is None):
            raise RuntimeError("no gradient reached the engine since prepare_forward_input(): run the forward "
                               "on its output and call backward() before preparing the next batch or the gradients")
        if projecting:  # Π of grad l_i = Π_i / (c·n_i); of grad L_val = Π_val / (c·N_val) (None without validation rows)
            finished.projections = raw_proj[:-1] * finished.norm_scale[:, None]
            finished.val_projection = raw_proj[-1] * val_norm_scale if val_rows else None
        if not val_rows:  # projections only
            return finished
        if self.value in DEFERRED:
            missing = set(finished.seen) - {entry[0].name for entry in finished.deferred}
            if missing:  # a compiled backward ran the taps where Python state cannot be kept
                raise RuntimeError(f"value={self.value!r}: the backward of {sorted(missing)[:3]} kept no rows for "
                                   "aggregate_and_log(); this estimator runs eagerly only, not under torch.compile")
        finished.scale(raw, dot_scale, raw_norms, val_norm_scale, self.value == COSINE)
        return finished
