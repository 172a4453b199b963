"""`GradDotProdCallback`: a Lightning callback that values every training row at every optimizer step.

The glue is one line in the LightningModule's training_step, the loss:

    from ghost_integrations.lightning import GradDotProdCallback, training_loss

    class LitLM(lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            loss = training_loss(self, self.model, batch)   # was: self.model(**batch).loss
            self.log("train_loss", loss)                    # the training rows' loss
            return loss

    trainer = lightning.Trainer(callbacks=[GradDotProdCallback(val_batch, run_dir="Results/my_run")], ...)
    trainer.fit(LitLM(model), DataLoader(IndexedDataset(train_set), batch_size=8))

`training_loss` stacks the validation rows under the batch's rows, runs the model's own loss on all of them
and returns a tensor whose gradient is that loss's and whose value is the training rows' mean loss, so what
training_step logs and returns is what it was without the callback. Lightning divides the returned loss by
`accumulate_grad_batches` before backward; the callback tells the engine, which then leaves in `.grad`
exactly Lightning's gradient of the training rows. Without the callback (or outside training)
`training_loss` is `model(**batch).loss`. The callback hooks the whole LightningModule: every trainable
parameter must be in a supported layer.

Strategies: a single device, DDP, and FSDP2 through ModelParallelStrategy(data_parallel_size=<processes>,
tensor_parallel_size=1) with fully_shard applied in the module's configure_model (the engine is built at
on_fit_start, after it). Tensor parallelism, DeepSpeed and FSDPStrategy (FSDP1) are refused at fit start.
"""
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                         SingleDeviceStrategy)

from ghost_engine.dropout import check_no_dropout
from ghost_engine.engine import DEFERRED, LR_INSIDE
from ghost_integrations.core import DEEPSPEED_WHY, FSDP1_WHY, ValuationRun, split_batch, with_value
from ghost_results.results_io import file_formats


class GradDotProdCallback(pl.Callback):
    """Records, at every optimizer step, each training row's <grad l_i, grad L_val> (docs/INTEGRATIONS.md).

    Args:
        val_batch: {"input_ids": [Bv, T], "labels": (default input_ids), "attention_mask": ...}, the fixed
            validation rows.
        run_dir: results directory (default: <trainer.default_root_dir>/graddotprod).
        run_name: the name the result files carry (default: run_dir's name).
        config: extra entries for config.json (e.g. data_dir, seq_len, val_domain for the report).
        save_interval: write the records every this many steps (and at the end of fitting).
        value: the engine's estimator (docs/METHOD.md section 2.1); default "auto": "adamw" under an Adam/AdamW
            optimizer, else "first_order" (docs/FIDELITY.md). The update-aware ones
            read the trainer's (one) optimizer; the deferred ones (second_order, adamw_vt, midpoint) take the batch
            gradient in on_before_optimizer_step, before Lightning's clipping, so they refuse gradient_clip_val.
        results_format: the files written, "parquet" (default), "pickle" or "both", as the app's --results_format.
        project_dim, project_seed, project_dtype: as the app's --project_dim ...: every training row's projected
            gradient into the run's gradient store (docs/ATTRIBUTION.md); 0 = off.
    """

    def __init__(self, val_batch, run_dir=None, run_name=None, config=None, save_interval=10, value="auto",
                 results_format="parquet", project_dim=0, project_seed=0, project_dtype="bfloat16"):
        file_formats(results_format)  # a bad choice fails here, not at on_fit_start
        self.val_batch, self.run_dir, self.run_name = val_batch, run_dir, run_name
        self.config, self.save_interval, self.value = config, save_interval, value
        self.results_format = results_format
        self.projection = (project_dim, project_seed, project_dtype)
        self.valuation = None
        self._trainer = None

    def on_fit_start(self, trainer, pl_module):
        self._check_supported(trainer, pl_module, self.value)
        check_no_dropout(pl_module, "GradDotProdCallback")  # before any step (the engine checks every forward too)
        run_dir = os.fspath(self.run_dir or os.path.join(trainer.default_root_dir, "graddotprod"))
        run_name = self.run_name or os.path.basename(os.path.normpath(run_dir))
        self.valuation = ValuationRun(pl_module, self.val_batch, run_dir, run_name, self.config, self.save_interval,
                                      self.value, self.results_format, *self.projection)
        self._trainer = trainer

    def on_train_start(self, trainer, pl_module):
        # here, not at on_fit_start: Lightning restores a checkpoint's step (fit(ckpt_path=...)) in between
        max_steps = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        settings = {"integration": "lightning", "lightning": pl.__version__, "module": type(pl_module).__name__,
                    "accumulate_grad_batches": trainer.accumulate_grad_batches, "precision": str(trainer.precision),
                    "default_root_dir": trainer.default_root_dir}
        self.valuation.begin(trainer.global_step, max_steps if max_steps != float("inf") else None, settings,
                             trainer.optimizers[0] if len(trainer.optimizers) == 1 else None)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.valuation is not None:
            self.valuation.sync()  # the steps up to this checkpoint are on disk before it is: a resume keeps them

    @staticmethod
    def _check_supported(trainer, pl_module, value="first_order"):
        problems = [
            (value in DEFERRED and trainer.gradient_clip_val, f"gradient_clip_val with value={value!r} (Lightning "
                                                              "clips after on_before_optimizer_step)"),
            (value in LR_INSIDE and len(trainer.optimizers) != 1, f"value={value!r} with other than one optimizer"),
            (not pl_module.automatic_optimization, "manual optimization (the loss scaling before backward is "
                                                   "unknown)"),
            *_strategy_problems(trainer.strategy, pl_module),
            (getattr(trainer.precision_plugin, "scaler", None) is not None,
             "precision with a gradient scaler (16-mixed; use bf16-mixed)"),
        ]
        unsupported = [what for bad, what in problems if bad]
        if unsupported:
            raise ValueError(f"GradDotProdCallback does not support {'; '.join(unsupported)}")

    def loss(self, model, batch):
        """The stacked loss of one micro-batch with the training rows' loss as its value (see module doc)."""
        if self.valuation is None:
            raise RuntimeError("GradDotProdCallback.loss() before the fit started")
        loss, train_loss = self.valuation.forward(model, batch, 1.0 / self._trainer.accumulate_grad_batches)
        return with_value(loss, train_loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.valuation.end_step(trainer.global_step + 1, [g["lr"] for g in optimizer.param_groups])

    def on_fit_end(self, trainer, pl_module):
        self._finish()

    def on_exception(self, trainer, pl_module, exception):
        self._finish()  # the steps completed so far are written

    def _finish(self):
        if self.valuation is not None:
            self.valuation.finish()
            self.valuation = None


FSDP2_WAY = ("ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) with fully_shard on "
             "self.device_mesh['data_parallel'] in configure_model (FSDP2), or DDP")


def _strategy_problems(strategy, pl_module):
    """[(unsupported, what)] of the trainer's strategy: a single device, DDP, and ModelParallelStrategy when the
    module is sharded by FSDP2 alone (fully_shard on the data-parallel mesh; the engine is built after it, at
    on_fit_start) are supported."""
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        return [(True, f"{name} ({DEEPSPEED_WHY}; use {FSDP2_WAY})")]
    if isinstance(strategy, FSDPStrategy):
        return [(True, f"{name} (FSDP1: {FSDP1_WHY}; use {FSDP2_WAY})")]
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.fsdp import FSDPModule

        tensor_parallel = strategy.device_mesh["tensor_parallel"].size()
        return [(tensor_parallel > 1, f"tensor parallelism ({name}'s tensor_parallel mesh dimension has size "
                                      f"{tensor_parallel}: layers would see a shard of the activations, which the "
                                      f"layer rules do not cover; use {FSDP2_WAY})"),
                (tensor_parallel == 1 and not any(isinstance(m, FSDPModule) for m in pl_module.modules()),
                 f"{name} without fully_shard (configure_model sharded nothing, so no process averages the "
                 f"gradients; use {FSDP2_WAY})")]
    return [(type(strategy) not in (SingleDeviceStrategy, DDPStrategy),
             f"strategy {name} (use a single device, DDP or {FSDP2_WAY})")]


def training_loss(module, model, batch):
    """The loss a LightningModule's training_step returns: with a GradDotProdCallback in the trainer and in
    training, the callback's stacked loss; otherwise `model(**batch).loss` (provenance entries removed)."""
    try:
        callbacks = [c for c in module.trainer.callbacks if isinstance(c, GradDotProdCallback)]
    except RuntimeError:  # the module is used outside a Trainer
        callbacks = []
    if len(callbacks) > 1:
        raise ValueError("the trainer has more than one GradDotProdCallback")
    if callbacks and callbacks[0].valuation is not None and model.training and torch.is_grad_enabled():
        return callbacks[0].loss(model, batch)
    inputs, _ = split_batch(batch)
    return model(**inputs).loss
