"""Loss on fixed batches of the train, validation and test splits, per domain.

The batches are the same at every evaluation (a reader per split and domain, batch indices
0..eval_iter-1), so curves compare like with like. Under DDP every rank evaluates its slice of each
batch and the sums are all-reduced: the numbers do not depend on the number of processes.
"""
import torch
import torch.distributed as dist

from pile_tools.reader import PileReader

EVAL_SPLITS = ("train", "validation", "test")
EVAL_SEED_OFFSET = 1_000_003  # eval batches of the train split differ from the batches trained on


class Evaluator:
    def __init__(self, data_dir, seq_len, eval_iter, eval_bs, seed, rank=0, world_size=1):
        self.seq_len, self.eval_iter, self.eval_bs = seq_len, eval_iter, eval_bs
        self.rank, self.world_size = rank, world_size
        self.readers = {}  # (split, domain) -> PileReader
        for split in EVAL_SPLITS:
            try:
                domains = PileReader(data_dir, split=split, seed=seed).domains
            except (FileNotFoundError, ValueError) as err:
                print(f"evaluation: skipping split {split!r} ({err})", flush=True)
                continue
            for domain in domains:
                reader = PileReader(data_dir, split=split, domains=[domain], seed=seed + EVAL_SEED_OFFSET)
                try:  # fail at start-up, not at the first evaluation after hours of training
                    reader.get_batch(0, 1, seq_len)
                except ValueError as err:
                    raise ValueError(f"evaluation split {split!r}: {err}") from None
                self.readers[split, domain] = reader

    @torch.no_grad()
    def evaluate(self, model, device, autocast):
        """{split: {"loss": mean over the split's evaluated tokens, "domains": {domain: loss}}}."""
        was_training = model.training
        model.eval()
        sums = []  # per (split, domain): [sum of token losses, number of target tokens]
        for reader in self.readers.values():
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            targets = 0
            for i in range(self.eval_iter):
                batch = reader.get_batch(i, self.eval_bs, self.seq_len, rank=self.rank, world_size=self.world_size)
                X = torch.from_numpy(batch.tokens[:, :self.seq_len]).to(device)  # [rows, T]; the model shifts
                with autocast:
                    loss = model(input_ids=X, labels=X).loss  # mean over rows x (T - 1) targets
                n = X.shape[0] * (self.seq_len - 1)
                loss_sum += loss.double() * n
                targets += n
            sums.append(torch.stack([loss_sum, torch.tensor(float(targets), dtype=torch.float64, device=device)]))
        model.train(was_training)
        if not sums:
            return {}
        totals = torch.stack(sums)  # [split x domain, 2]
        if self.world_size > 1:
            dist.all_reduce(totals)
        result = {}
        for (split, domain), (loss_sum, targets) in zip(self.readers, totals.tolist()):
            entry = result.setdefault(split, {"loss": [0.0, 0.0], "domains": {}})
            entry["domains"][domain] = loss_sum / targets
            entry["loss"][0] += loss_sum
            entry["loss"][1] += targets
        for entry in result.values():
            entry["loss"] = entry["loss"][0] / entry["loss"][1]
        return result


def format_eval(step, result):
    lines = [f"eval @ step {step}: " + " | ".join(f"{split} {entry['loss']:.4f}" for split, entry in result.items())]
    for split, entry in result.items():
        lines.append(f"  {split:<10} " + ", ".join(f"{d} {loss:.4f}" for d, loss in entry["domains"].items()))
    return "\n".join(lines)
