"""Run by test_integrations_lightning through torchrun: GradDotProdCallback with Lightning's ModelParallelStrategy
(FSDP2: fully_shard in configure_model) on 2 CPU processes (gloo), for each estimator given, then the refusal of a
tensor-parallel mesh.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_lightning_fsdp_worker.py OUT_DIR VALUE...

Each VALUE (first_order: SGD, auto: AdamW) fits `fsdp_fit` (test_integrations_lightning.py) into OUT_DIR/VALUE: the
callback's run (run/) and, on rank 0, weights.pt (every parameter after the last step, gathered from its shards) and
sharding.json. Then a mesh of 1 data-parallel x 2 tensor-parallel processes: rank 0 writes the error to
OUT_DIR/tensor_parallel.txt.
"""
import json
import os
import sys

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from _integrations import sharding_report
from _leave import leave_together
from test_integrations_lightning import fsdp_fit


def main(out_dir, values):
    for value in values:
        case_dir = os.path.join(out_dir, value)
        trainer, module = fsdp_fit(case_dir, value, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
        weights = {name: p.full_tensor() for name, p in module.named_parameters()}  # a collective: every rank
        if trainer.global_rank == 0:
            assert trainer.world_size == 2
            torch.save(weights, os.path.join(case_dir, "weights.pt"))
            with open(os.path.join(case_dir, "sharding.json"), "w") as f:
                json.dump(sharding_report(module, trainer.optimizers[0]), f)
    try:
        fsdp_fit(os.path.join(out_dir, "tp"), "first_order",
                 ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
        refusal = "no error"
    except ValueError as error:
        refusal = str(error)
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(out_dir, "tensor_parallel.txt"), "w") as f:
            f.write(refusal)
    leave_together()  # Lightning leaves the process group up


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
