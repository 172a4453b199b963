"""ghost_engine: exact per-sample training/validation gradient dot products in one backward pass.

Names are imported on first use, so that torch-free parts (ghost_engine.values, read by the app's flag
parser before torch) can be imported without torch. The engine imports none of this project's other
packages (docs/ARCHITECTURE.md); the results files are read with ghost_results.load_dotprods.
"""
import importlib

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

_EXPORTS = {
    "GradDotProdEngine": "ghost_engine.engine",
    "DotProductResult": "ghost_engine.engine",
    "register_layer": "ghost_engine.layers",
    "register_recogniser": "ghost_engine.layers",
    "per_sample_loss": "ghost_engine.losses",
    "disable_dropout": "ghost_engine.dropout",
    "Projection": "ghost_engine.projection",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ghost_engine' has no attribute {name!r}")
