"""Run by test_integrations_lightning through torchrun: GradDotProdCallback with Lightning's DDP strategy on
2 CPU processes (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_lightning_ddp_worker.py OUT_DIR [plain]

Writes OUT_DIR/run (the callback's run) and, on rank 0, OUT_DIR/grads.pt (.grad before the first update);
with `plain`, no callback (plain Lightning DDP) and OUT_DIR/grads_plain.pt.
"""
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from _integrations import model_and_rows, train_items
from _leave import leave_together
from ghost_integrations import IndexedDataset
from ghost_integrations.lightning import GradDotProdCallback
from test_integrations_lightning import LitLM


def main(out_dir, plain):
    model, X, Y, X_val, Y_val = model_and_rows(4)
    module = LitLM(model)
    callbacks = [] if plain else [GradDotProdCallback({"input_ids": X_val, "labels": Y_val},
                                                      run_dir=os.path.join(out_dir, "run"), save_interval=1)]
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", devices=2, strategy="ddp",
                        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out_dir)
    trainer.fit(module, DataLoader(IndexedDataset(train_items(X, Y)), batch_size=2, shuffle=False))
    assert trainer.world_size == 2
    if trainer.global_rank == 0:
        torch.save(module.first_grads, os.path.join(out_dir, "grads_plain.pt" if plain else "grads.pt"))
    leave_together()  # Lightning leaves the process group up


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] == ["plain"])
