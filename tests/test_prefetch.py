"""The training batches read one step ahead (GradDotProd_LM.prefetch) are the reader's own batches, whatever order
the steps are asked in; the next step is read on the worker thread, and a failed read is raised in the step
that needs it."""
import threading

import numpy as np
import pytest

from GradDotProd_LM.prefetch import BatchPrefetcher
from pile_tools.reader import PileReader

B, T = 4, 16


class CountingReader:
    """A PileReader that records which thread read which step, and fails to read step `fail`."""

    def __init__(self, reader, fail=None):
        self.reader, self.fail, self.reads = reader, fail, []

    def get_batch(self, step, *args, **kwargs):
        self.reads.append((step, threading.current_thread().name))
        if step == self.fail:
            raise ValueError(f"step {step}: unreadable")
        return self.reader.get_batch(step, *args, **kwargs)


@pytest.mark.parametrize("rank", [0, 1])
def test_prefetched_batches_are_the_readers_own_in_any_order(data_dir, rank):
    reader = PileReader(data_dir, split="train", seed=3)
    counting = CountingReader(reader)
    batches = BatchPrefetcher(counting, B, T, rank, 2, last_step=6)
    try:
        for step in (1, 2, 3, 5, 6):  # 4 skipped: the read ahead is dropped and 5 read at once
            batch, tokens = batches.get(step)
            expected = reader.get_batch(step, B, T, rank=rank, world_size=2)
            np.testing.assert_array_equal(batch.tokens, expected.tokens)
            np.testing.assert_array_equal(tokens.numpy(), expected.tokens[:, :T])
            np.testing.assert_array_equal(batch.token_offset, expected.token_offset)
            assert batch.domain == expected.domain
    finally:
        batches.close()
    ahead = {step for step, thread in counting.reads if thread.startswith("batch-prefetch")}
    assert {2, 3, 6} <= ahead  # read while the step before trained
    assert 7 not in {step for step, _ in counting.reads}  # nothing past the last step


def test_a_failed_read_ahead_is_raised_in_its_step(data_dir):
    batches = BatchPrefetcher(CountingReader(PileReader(data_dir, split="train"), fail=2), B, T, 0, 1, last_step=3)
    try:
        batches.get(1)
        with pytest.raises(ValueError, match="step 2: unreadable"):
            batches.get(2)
    finally:
        batches.close()
