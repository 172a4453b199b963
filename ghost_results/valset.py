"""`valset.pkl`: the validation rows a run's dot products were taken against (plain python/numpy).

    {"schema": "graddotprod.valset", "schema_version": 1, "run_id": str | None (the run's identity),
     "val_domain": str | None, "seq_len": int, "data_dir": str | None,
     "tokens": int64 [Bv, L],      the model sees tokens[:, :seq_len] (the app: L = seq_len + 1; the
                                   integrations: L = seq_len, the validation input_ids as given)
     "domain": [Bv] str, "doc_id": int64 [Bv], "token_offset": int64 [Bv], "sample_index": int64 [Bv]}

One writer, called by the run directory's owner (ghost_results.run_directory.RunDirectory.write_valset) for
the training app and the integrations; the report reads it (ghost_results.report.validation_rows)
with ghost_results.results_io.safe_load_pickle.
"""
import os
import pickle

import numpy as np

from ghost_common.durable import write_atomically

VALSET_SCHEMA = "graddotprod.valset"
VALSET_SCHEMA_VERSION = 1
VALSET_FILE = "valset.pkl"


def write_valset_file(path, tokens, seq_len, domain, doc_id, token_offset, sample_index, val_domain=None,
                      data_dir=None, run_id=None) -> dict:
    """Write `path` durably in the schema above; returns the payload written."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2:
        raise ValueError(f"{path}: validation tokens must be [rows, length], not shape {tokens.shape}")
    rows = tokens.shape[0]
    payload = {
        "schema": VALSET_SCHEMA, "schema_version": VALSET_SCHEMA_VERSION, "run_id": run_id,
        "val_domain": None if val_domain is None else str(val_domain), "seq_len": int(seq_len),
        "data_dir": None if data_dir is None else os.fspath(data_dir),
        "tokens": tokens,
        "domain": [str(d) for d in domain],
        "token_offset": np.asarray(token_offset, dtype=np.int64).reshape(-1),
        "doc_id": np.asarray(doc_id, dtype=np.int64).reshape(-1),
        "sample_index": np.asarray(sample_index, dtype=np.int64).reshape(-1),
    }
    for name in ("domain", "token_offset", "doc_id", "sample_index"):
        if len(payload[name]) != rows:
            raise ValueError(f"{path}: {name} has {len(payload[name])} entries for {rows} validation rows")
    write_atomically(path, lambda f: pickle.dump(payload, f, protocol=4))
    return payload
