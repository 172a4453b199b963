"""Shared pytest settings: deterministic, single-threaded-friendly CPU runs; the bundled sample corpus."""
import pytest
import torch

from pile_tools import ensure_sample_dataset

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The bundled sample, tokenized once per test session (tests that change data change a copy)."""
    return ensure_sample_dataset(str(tmp_path_factory.mktemp("sample")))
