"""Integrations of the engine into training frameworks (docs/INTEGRATIONS.md).

    ghost_integrations.hf.GradDotProdTrainer         transformers.Trainer subclass
    ghost_integrations.lightning.GradDotProdCallback  Lightning callback (+ training_loss in training_step)

Both write a run directory in the training app's format (config.json, grad_dotprods/iter_XXXXXX.parquet), read by
ghost_results.results_io.load_run and `python -m ghost_results.report`. Shared logic: ghost_integrations.core.
Each framework module imports its framework; importing this package imports neither.
"""
from ghost_integrations.core import IndexedDataset, ProvenanceCollator, ValuationRun

__all__ = ["IndexedDataset", "ProvenanceCollator", "ValuationRun"]
