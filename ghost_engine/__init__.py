"""ghost_engine: exact per-sample training/validation gradient dot products in one backward pass."""
from ghost_engine.engine import DotProductResult, GradDotProdEngine
from ghost_engine.layers import register_layer
from ghost_engine.losses import per_sample_loss

__all__ = ["GradDotProdEngine", "DotProductResult", "register_layer", "per_sample_loss", "load_dotprods"]


def __getattr__(name):
    if name == "load_dotprods":  # results IO pulls in numpy/pickle machinery only when asked for
        from ghost_engine.results_io import load_dotprods

        return load_dotprods
    raise AttributeError(f"module 'ghost_engine' has no attribute {name!r}")
