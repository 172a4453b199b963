"""ghost_results: a run's dot-product files (pickle and Parquet), their analysis and the report.

    ghost_results.results_io   the file format: writing, validating, loading (load_run: a DataFrame;
                               read_run: numpy columns; load_dotprods)
    ghost_results.run_directory  RunDirectory, the one owner of a run directory (its files, their order and
                               durability, the lock, identity, set-aside on resume, the checkpoint series),
                               used by the training app and the framework integrations
    ghost_results.analysis     In-Run Data Shapley values, rankings, per-domain tables (dicts or DataFrames)
    ghost_results.report       python -m ghost_results.report RUN: report.md, CSV tables, plots
    ghost_results.convert      python -m ghost_results convert RUN: Parquet files for runs saved as pickles
                               (the command line of python -m ghost_results: convert, compact)
    ghost_results.compact      python -m ghost_results compact RUN: step files merged into few large Parquet
                               files, one verified segment per step file
    ghost_results.scan         scan_run: a lazy pyarrow Dataset (or polars LazyFrame) over a run's Parquet files
    ghost_results.grad_store   the store of projected per-sample gradients: manifest + .npy shards,
                               GradStoreWriter (one locked writer), GradStore (verified, memory-mapped reader)
    ghost_results.grad_query   score_store (raw, cosine, precond, trajectory; streamed top-k and per-domain
                               totals) and the per-block Preconditioner

The engine (ghost_engine) needs torch alone; this package needs numpy, pandas and pyarrow, and torch not
at all. It imports ghost_common and (the report's sample texts) pile_tools, nothing else of the project.
"""
from ghost_results.grad_query import Preconditioner, score_store
from ghost_results.grad_store import GradStore, GradStoreWriter
from ghost_results.results_io import load_dotprods, load_run, read_run
from ghost_results.scan import scan_run

__all__ = ["GradStore", "GradStoreWriter", "Preconditioner", "load_dotprods", "load_run", "read_run", "scan_run",
           "score_store"]
