"""Run by test_integrations_hf through torchrun: GradDotProdTrainer on 2 CPU processes (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_hf_ddp_worker.py OUT_DIR

Writes OUT_DIR/graddotprod (the run), and on rank 0 OUT_DIR/grads.pt (.grad before the first update) and
OUT_DIR/log_history.json.
"""
import json
import os
import sys

import torch
from transformers import TrainingArguments

from _integrations import GradCapture, model_and_rows, train_items
from _leave import leave_together
from ghost_integrations.hf import GradDotProdTrainer


def main(out_dir):
    model, X, Y, X_val, Y_val = model_and_rows(4)
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                             train_sampling_strategy="sequential")
    capture = GradCapture(model)
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y), callbacks=[capture],
                                 val_batch={"input_ids": X_val, "labels": Y_val}, value="first_order")
    trainer.train()
    if trainer.args.process_index == 0:
        assert trainer.args.world_size == 2
        torch.save(capture.grads, os.path.join(out_dir, "grads.pt"))
        with open(os.path.join(out_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
    leave_together()


if __name__ == "__main__":
    main(sys.argv[1])
