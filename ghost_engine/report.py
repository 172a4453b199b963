"""Deprecated: moved to ghost_results.report (import that). The old path gives the same module, with a warning."""
import importlib
import sys
import warnings

warnings.warn("ghost_engine.report moved to ghost_results.report; import it from there (the old path will be removed)",
              DeprecationWarning, stacklevel=1 if __name__ == "__main__" else 2)  # -m: shown as __main__'s
if __name__ == "__main__":  # python -m ghost_engine.report ...: run the new command
    sys.exit(importlib.import_module("ghost_results.report").main())
sys.modules[__name__] = importlib.import_module("ghost_results.report")
