"""GPT-2 pretraining on the Pile with per-sample training/validation gradient dot products.

Entry point: `python -m GradDotProd_LM.train [flags]` (or `./train.sh`); see docs/training.md.
"""
