"""GPT-2 pretraining on the Pile, optionally valuing every training sample against a validation batch.

    python -m GradDotProd_LM.train --architecture GPT2-Tiny --max_steps 50 --batch_size 8 --seq_len 128
    torchrun --nproc_per_node 2 -m GradDotProd_LM.train ...

The flags are parsed before torch and transformers are imported, so `-h` and a bad flag answer at once; the
training script itself is GradDotProd_LM/training.py.
"""
import os
import sys

from GradDotProd_LM.args import parse_config


def main(argv=None) -> int:
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # launched by torchrun
    world_size = int(os.environ["WORLD_SIZE"]) if ddp else 1
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse_config(argv, world_size=world_size)
    except SystemExit as exit_request:  # argparse: -h (0) or a bad flag (2), message already printed
        return exit_request.code
    from GradDotProd_LM import training  # torch, transformers and the model: only for a run that will train

    return training.run(cfg, argv, world_size, ddp)


if __name__ == "__main__":
    sys.exit(main())
