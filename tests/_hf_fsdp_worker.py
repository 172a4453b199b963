"""Run by test_integrations_hf through torchrun: GradDotProdTrainer under accelerate's FSDP2 plugin on 2 CPU
processes (gloo), for each estimator given.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_hf_fsdp_worker.py OUT_DIR VALUE...

Each VALUE (first_order, auto) trains `fsdp_training_args` (tests/_integrations.py) into OUT_DIR/VALUE: the run
directory (graddotprod/), and on rank 0 log_history.json, weights.pt (every parameter after the last step, gathered
from its shards) and sharding.json (what fully_shard did). accelerate keeps the FSDP plugin on the CPU only with
`accept_fsdp_plugin_on_cpu` (see there).
"""
import json
import os
import sys

import torch
from accelerate.state import AcceleratorState

from _integrations import (accept_fsdp_plugin_on_cpu, fsdp_training_args, model_and_rows, sharding_report,
                           train_items)
from _leave import leave_together
from ghost_integrations.hf import GradDotProdTrainer


def main(out_dir, values):
    AcceleratorState.__init__ = accept_fsdp_plugin_on_cpu(AcceleratorState.__init__)
    for value in values:
        model, X, Y, X_val, Y_val = model_and_rows(4)
        case_dir = os.path.join(out_dir, value)
        args = fsdp_training_args(case_dir, value, processes=2)
        trainer = GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y),
                                     val_batch={"input_ids": X_val, "labels": Y_val}, value=value, save_interval=1)
        assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
        trainer.train()
        assert trainer.valuation.engine.model is model  # fully_shard works in place: the engine hooks that model
        weights = {name: p.full_tensor() for name, p in model.named_parameters()}  # a collective: every rank
        if trainer.args.process_index == 0:
            assert trainer.args.world_size == 2
            torch.save(weights, os.path.join(case_dir, "weights.pt"))
            with open(os.path.join(case_dir, "log_history.json"), "w") as f:
                json.dump(trainer.state.log_history, f)
            with open(os.path.join(case_dir, "sharding.json"), "w") as f:
                json.dump(sharding_report(model, trainer.optimizer), f)
    leave_together()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
