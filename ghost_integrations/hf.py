"""`GradDotProdTrainer`: Hugging Face `transformers.Trainer` that values every training row at every step.

    trainer = GradDotProdTrainer(model=model, args=TrainingArguments(...), train_dataset=train_set,
                                 val_batch={"input_ids": X_val, "labels": X_val})
    trainer.train()        # results in <output_dir>/graddotprod: python -m ghost_results.report <that dir>

Where the Trainer is changed, and why:
- the training set is wrapped in `IndexedDataset` and the collator in `ProvenanceCollator`, so every row
  keeps its index in the training set (and its domain, doc_id, token_offset if the items have them);
- `compute_loss` (training only) stacks the validation rows under the micro-batch, runs the model's own
  loss over all rows *without* `num_items_in_batch` (a mean over every target of [train; val]) and
  back-propagates it times the factor that turns the training rows' mean into the loss Regular Trainer
  back-propagates: n_train * processes / num_items_in_batch when the Trainer counts items (its default for
  causal LMs), else 1 / gradient_accumulation_steps. The engine removes the validation rows' share from
  `.grad`, which is then Regular Trainer's gradient; the returned (and logged) value is Regular Trainer's
  loss of the training rows alone;
- a callback files each optimizer step's dot products just before `optimizer.step()`; at the start of training it
  attaches the engine to the model as accelerate prepared it: under FSDP2 (fsdp=True, fsdp_config={"version": 2})
  accelerate applies fully_shard in train(), which replaces every parameter by a DTensor shard, so the engine is
  built again there, after it, with the optimizer accelerate switched to the shards.
Evaluation and prediction run the plain Trainer code on the rows they are given.
"""
import os

import torch
import transformers
from transformers import Trainer, TrainerCallback

from ghost_engine.dropout import check_no_dropout
from ghost_engine.losses import target_counts
from ghost_integrations.core import (DEEPSPEED_WHY, FSDP1_WHY, PROVENANCE_KEY, IndexedDataset, ProvenanceCollator,
                                     ValuationRun, split_batch, with_value)


class GradDotProdTrainer(Trainer):
    """`transformers.Trainer` recording, at every optimizer step, each training row's
    <grad l_i, grad L_val> (docs/INTEGRATIONS.md).

    Args (beyond Trainer's):
        val_batch: {"input_ids": [Bv, T], "labels": (default input_ids), "attention_mask": ...}, the fixed
            validation rows.
        run_dir: results directory (default: <args.output_dir>/graddotprod).
        run_name: the name the result files carry (default: the output directory's name).
        run_config: extra entries for config.json (e.g. data_dir, seq_len, val_domain for the report).
        save_interval: write the records every this many steps (and at the end of training).
        value: the engine's estimator (docs/METHOD.md section 2.1); default "auto": "adamw" under an Adam/AdamW
            optimizer, else "first_order" (docs/FIDELITY.md). The update-aware ones
            read the Trainer's optimizer; the deferred ones (second_order, adamw_vt, midpoint) take the batch
            gradient after the Trainer's clipping, just before its optimizer step.
        results_format: the files written, "parquet" (default), "pickle" or "both", as the app's --results_format.
        project_dim, project_seed, project_dtype: as the app's --project_dim ...: every training row's projected
            gradient into the run's gradient store (docs/ATTRIBUTION.md); 0 = off.
    """

    loss_is_scaled_for_ga = True  # compute_loss returns the loss exactly as Regular Trainer back-propagates it

    def __init__(self, *args, val_batch, run_dir=None, run_name=None, run_config=None, save_interval=10,
                 value="auto", results_format="parquet", project_dim=0, project_seed=0,
                 project_dtype="bfloat16", **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()
        check_no_dropout(self.model, "GradDotProdTrainer")  # before any step (the engine checks every forward too)
        output_dir = os.path.normpath(self.args.output_dir)
        self.valuation = ValuationRun(self.model, val_batch, run_dir or os.path.join(output_dir, "graddotprod"),
                                      run_name or os.path.basename(output_dir), run_config, save_interval, value,
                                      results_format, project_dim, project_seed, project_dtype)
        self.add_callback(_StepRecorder(self))

    def _check_supported(self):
        if not hasattr(Trainer, "loss_is_scaled_for_ga"):
            raise ValueError(f"GradDotProdTrainer needs a transformers whose Trainer has loss_is_scaled_for_ga (5.x; "
                             f"tested with 5.23), not {transformers.__version__}: it says how the Trainer scales the "
                             "loss for gradient accumulation")
        args = self.args
        fsdp_version = self.accelerator.state.fsdp_plugin.fsdp_version if self.is_fsdp_enabled else None
        problems = [
            (self.model_init is not None, "model_init (the engine hooks the model given at construction)"),
            (self.model is None, "a Trainer without a model"),
            (args.n_gpu > 1, "DataParallel over several GPUs in one process (launch one process per GPU with torchrun)"),
            (self.is_deepspeed_enabled, f"DeepSpeed ({DEEPSPEED_WHY}; use FSDP2, TrainingArguments(fsdp=True, "
                                        "fsdp_config={'version': 2}), or DDP)"),
            (fsdp_version == 1, f"FSDP1 (fsdp_config version 1: {FSDP1_WHY}; use FSDP2, fsdp_config={{'version': 2}}, "
                                "the default)"),
            (self.is_fsdp_xla_enabled, "FSDP on XLA (use FSDP2 on GPUs, or DDP)"),
            (self.get_tp_size() * self.get_cp_size() * self.get_sp_size() > 1,
             "tensor, context or sequence parallelism (layers see a shard of the activations or of the sequence, "
             "which the layer rules do not cover; use FSDP2 or DDP)"),
            (args.fp16 or self.accelerator.scaler is not None, "fp16 with a gradient scaler (use bf16)"),
            (self.label_smoother is not None, "label_smoothing_factor"),
            (self.compute_loss_func is not None, "compute_loss_func (the model's own loss is valued)"),
        ]
        unsupported = [what for bad, what in problems if bad]
        if unsupported:
            raise ValueError(f"GradDotProdTrainer does not support {'; '.join(unsupported)}")

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.valuation.finish()  # the steps completed so far are written, even after an error

    def _save_checkpoint(self, *args, **kwargs):
        self.valuation.sync()  # the steps up to this checkpoint are on disk before it is: a resume keeps them
        return super()._save_checkpoint(*args, **kwargs)

    def get_train_dataloader(self):
        dataset, collator = self.train_dataset, self.data_collator
        self.train_dataset, self.data_collator = IndexedDataset(dataset), ProvenanceCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator

    def _set_signature_columns_if_needed(self):
        # the rows' provenance must survive remove_unused_columns on its way to the collator
        super()._set_signature_columns_if_needed()
        if PROVENANCE_KEY not in self._signature_columns:
            self._signature_columns.append(PROVENANCE_KEY)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and torch.is_grad_enabled()):  # evaluation / prediction: the plain Trainer
            inputs, _ = split_batch(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            raise ValueError("GradDotProdTrainer.compute_loss(return_outputs=True) in training: the outputs would "
                             "hold the validation rows too")
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # Regular: sum of the training rows' token losses / num_items_in_batch, times the processes when
            # the count is global (average_tokens_across_devices), as Trainer.compute_loss does
            processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            n_train = int(target_counts(inputs["labels"], "causal_lm").sum())
            multiplier = n_train * processes / float(num_items_in_batch)
        else:  # Regular: the micro-batch's mean loss / the accumulation steps
            multiplier = 1.0 / self.current_gradient_accumulation_steps
        loss, train_loss = self.valuation.forward(model, inputs, multiplier)
        return with_value(loss * multiplier, train_loss * multiplier)


class _StepRecorder(TrainerCallback):
    """Begins the run with the Trainer's state and files each step's dot products before the update."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        settings = {"integration": "transformers.Trainer", "transformers": transformers.__version__,
                    "model": type(trainer.model).__name__,
                    "per_device_train_batch_size": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "learning_rate": args.learning_rate, "seed": args.seed, "bf16": bool(args.bf16),
                    "counts_items_in_batch": bool(trainer.model_accepts_loss_kwargs),
                    "average_tokens_across_devices": bool(args.average_tokens_across_devices),
                    "output_dir": args.output_dir}
        if trainer.is_fsdp_enabled:
            settings["fsdp_version"] = trainer.accelerator.state.fsdp_plugin.fsdp_version
        # trainer.model: the model as accelerate prepared it (FSDP2: fully_shard applied, in place, just now)
        trainer.valuation.begin(state.global_step, state.max_steps, settings,
                                kwargs.get("optimizer") or trainer.optimizer, model=trainer.model)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        optimizer = optimizer if optimizer is not None else self.trainer.optimizer
        self.trainer.valuation.end_step(state.global_step + 1, [g["lr"] for g in optimizer.param_groups])
