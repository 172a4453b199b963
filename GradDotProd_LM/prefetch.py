"""The training batches, read one step ahead: while step t trains, a worker thread reads the reader's batch of
step t + 1 (the token files' pages fault in there, not in the step) and, on a GPU, copies its tokens into pinned
(page-locked) host memory, from which the step's host-to-device copies run asynchronously (non_blocking).

The batches are the reader's own (`PileReader.get_batch(step, ...)`, a function of the step alone), so reading
ahead changes no row: a step asked for out of order (the first step of a resumed run) is read at once."""
from concurrent.futures import ThreadPoolExecutor

import torch


class BatchPrefetcher:
    """`get(step)` -> (the reader's Batch of this rank's rows of the global batch `batch_size` of `step`, its tokens
    [rows, seq_len] as a tensor, pinned when `pin`); starts reading step + 1 (up to `last_step`) before returning."""

    def __init__(self, reader, batch_size, seq_len, rank, world_size, last_step, pin=False):
        self.reader, self.batch_size, self.seq_len = reader, batch_size, seq_len
        self.rank, self.world_size, self.last_step, self.pin = rank, world_size, last_step, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self._ahead = None  # (step, future) of the batch being read ahead

    def _read(self, step):
        batch = self.reader.get_batch(step, self.batch_size, self.seq_len, rank=self.rank, world_size=self.world_size)
        tokens = torch.from_numpy(batch.tokens[:, :self.seq_len].copy())  # [rows, T], labels = inputs
        return batch, tokens.pin_memory() if self.pin else tokens

    def get(self, step):
        if self._ahead is not None and self._ahead[0] == step:
            found = self._ahead[1].result()  # a failure of the read is raised here, in the step that needs it
        else:
            if self._ahead is not None:
                self._ahead[1].cancel()
            found = self._read(step)
        self._ahead = (step + 1, self._pool.submit(self._read, step + 1)) if step < self.last_step else None
        return found

    def close(self):
        if self._ahead is not None:
            self._ahead[1].cancel()
        self._pool.shutdown(wait=True)
