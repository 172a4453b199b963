"""Benchmarks: method comparison (`compare`), profiling sweeps (`profile_sweep`) and their plots (`plots`)."""
