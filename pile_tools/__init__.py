"""Data side of the project: tokenize Pile-format shards, read training/validation batches, bundled sample."""


def ensure_sample_dataset(cache_dir: str) -> str:
    """Build and tokenize the bundled sample under `cache_dir` once; returns the tokenized directory."""
    from pile_tools.sample_data import ensure_sample_dataset as _ensure

    return _ensure(cache_dir)


__all__ = ["ensure_sample_dataset"]
