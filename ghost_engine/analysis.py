"""Deprecated: moved to ghost_results.analysis (import that). The old path gives the same module, with a warning."""
import importlib
import sys
import warnings

warnings.warn("ghost_engine.analysis moved to ghost_results.analysis; import it from there (the old path will be removed)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("ghost_results.analysis")
