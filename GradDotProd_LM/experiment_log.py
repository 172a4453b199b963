"""The run's experiment log, written by rank 0: training_log.jsonl, and the sinks of --report_to.

`ExperimentLog` is the log hook of the run directory's owner (ghost_results.run_directory.RunDirectory:
step, eval, sync, close): it stays in the app because its sinks need app-only libraries (torch's
TensorBoard writer, wandb), which the owner's package may not import.

training_log.jsonl (always) holds one JSON object a line, appended and flushed to the operating system
after every step and every evaluation, so `tail -f` follows a run and a kill -9 keeps every completed
step's line; it is fsynced before every checkpoint, so a power cut keeps at least the steps the checkpoint
covers:

    {"kind": "step", "step": 12, "time": <unix s>, "loss", "val_loss" (GradDotProd), "lr", "grad_norm"
     (null without clipping), "tokens_per_s", "step_time_s",
     "dot_products_by_domain": {domain: sum of the step's dot products over its rows of that domain}}
    {"kind": "eval", "step": 12, "time": <unix s>, "train"|"validation"|"test": {"loss", "domains": {...}}}

Lines are in step order. A resume from the checkpoint of step s first moves the lines of later steps to
superseded/<time>/training_log.jsonl (ghost_results.run_directory.RunDirectory.open), so every step has one line.

--report_to sinks get the same numbers as flat scalars: loss, val_loss, lr, grad_norm, tokens_per_s,
step_time_s, dot_products/<domain>; eval/<split>/loss and eval/<split>/<domain> for evaluations.
    csv          training_log.csv and eval_log.csv in the run directory; rebuilt from training_log.jsonl
                 when a run starts (so a resume never repeats a row), then appended and flushed every step
    tensorboard  tensorboard/ in the run directory (torch.utils.tensorboard); a resume purges the
                 events of the steps it redoes (purge_step)
    wandb        one W&B run per launch, grouped under the run name (W&B's step must only grow, so a resume
                 starts a new W&B run); its files under $WANDB_DIR or the run directory
"""
import csv
import importlib.util
import io
import json
import os
import time

import numpy as np

from ghost_common.durable import write_atomically
from ghost_results.results_io import TRAINING_LOG_JSONL

SINKS = ("csv", "tensorboard", "wandb")
# sink -> the package it needs, installed by `pip install -e ".[logging]"`
SINK_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class SinkError(RuntimeError):
    """A --report_to sink could not start (e.g. W&B without a login); nothing was trained."""


def missing_packages(sinks):
    """{sink: package} for the sinks whose package is not installed."""
    return {sink: SINK_PACKAGES[sink] for sink in sinks
            if sink in SINK_PACKAGES and importlib.util.find_spec(SINK_PACKAGES[sink]) is None}


def domain_sums(domains, dot_products, all_domains):
    """{domain: sum of the dot products of that domain's rows} for every domain in all_domains (0.0 if the
    step had no row of it), summed in float64."""
    domains = np.asarray(domains)
    dot_products = np.asarray(dot_products, dtype=np.float64)
    return {name: float(dot_products[domains == name].sum()) for name in all_domains}


def flat_scalars(record):
    """A jsonl record -> {name: number} for the sinks (None values left out), without step and time."""
    flat = {}
    if record["kind"] == "step":
        for key, value in record.items():
            if key == "dot_products_by_domain":
                flat.update({f"dot_products/{domain}": v for domain, v in value.items()})
            elif key not in ("kind", "step", "time", "run_id"):
                flat[key] = value
    else:
        for split in ("train", "validation", "test"):
            if split in record:
                flat[f"eval/{split}/loss"] = record[split]["loss"]
                flat.update({f"eval/{split}/{domain}": v for domain, v in record[split]["domains"].items()})
    return {name: value for name, value in flat.items() if value is not None}


def read_log_records(path):
    """The records of a training_log.jsonl, in file order."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f]


class ExperimentLog:
    """Rank 0's writer of training_log.jsonl and the --report_to sinks. `earlier` is the run's JSON summary up
    to the resumed step (read_training_log): it seeds training_log.jsonl for a run started before the .jsonl
    existed."""

    def __init__(self, run_dir, sinks, cfg, start_step, earlier):
        self.path = os.path.join(run_dir, TRAINING_LOG_JSONL)
        self._run_id = cfg.get("run_id")  # every line names the run it belongs to (None: a run without one)
        seed = not os.path.exists(self.path)
        records = []  # the records of steps <= start_step (set_aside_after has cut the .jsonl there)
        if seed:
            records = [dict(kind="step", **r, **self._identity()) for r in earlier["steps"]]
            records += [dict(kind="eval", **r, **self._identity()) for r in earlier["evals"]]
            records.sort(key=lambda r: (r["step"], r["kind"] == "eval"))  # a step's evaluation follows it
        elif "csv" in sinks:
            records = read_log_records(self.path)
        self._sinks, self._file = [], None
        for sink in sinks:  # before any file is written: a sink that cannot start leaves the run as it was
            try:
                self._sinks.append(SINK_CLASSES[sink](run_dir, cfg, start_step, records))
            except Exception as err:
                self.close(failed=True)
                raise SinkError(f"--report_to {sink}: cannot start it ({type(err).__name__}: {err})") from err
        if seed and records:
            write_atomically(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
        self._file = open(self.path, "ab", buffering=0)  # every write goes to the operating system at once

    def step(self, record, dot_products_by_domain=None):
        """Append a step's record (the keys of training_log.json's steps) with its time and domain sums."""
        line = {"kind": "step", "step": record["step"], "time": time.time(),
                **{k: v for k, v in record.items() if k != "step"}}
        if dot_products_by_domain is not None:
            line["dot_products_by_domain"] = dot_products_by_domain
        self._write(line)

    def eval(self, step, result):
        self._write({"kind": "eval", "step": step, "time": time.time(), **result})

    def _identity(self):
        return {} if self._run_id is None else {"run_id": self._run_id}

    def _write(self, line):
        line.update(self._identity())
        data = memoryview((json.dumps(line) + "\n").encode())
        while data:  # one write of the whole line (a regular file takes it whole unless the disk is full)
            data = data[self._file.write(data):]
        for sink in self._sinks:
            sink.write(line)

    def sync(self):
        """Make every line written so far durable (before a checkpoint: the checkpoint implies its lines)."""
        os.fsync(self._file.fileno())
        for sink in self._sinks:
            sink.flush()

    def close(self, failed=False):
        """Close the file and every sink; failed=True marks a W&B run as failed."""
        for sink in self._sinks:
            sink.close(failed)
        self._sinks = []
        if self._file is not None and not self._file.closed:
            self._file.close()


class CsvSink:
    """training_log.csv (steps) and eval_log.csv: one row per record, columns as flat_scalars names."""

    def __init__(self, run_dir, cfg, start_step, earlier_records):
        self._files = {"step": os.path.join(run_dir, "training_log.csv"), "eval": os.path.join(run_dir, "eval_log.csv")}
        self._earlier = {"step": [], "eval": []}
        for record in earlier_records:
            self._earlier[record["kind"]].append(self._row(record))
        self._writers = {}

    @staticmethod
    def _row(record):
        return {"step": record["step"], "time": record.get("time"), **flat_scalars(record)}

    def write(self, record):
        kind, row = record["kind"], self._row(record)
        if kind not in self._writers:  # rewrite the file from the log: the rows of earlier steps, once each
            columns = list(dict.fromkeys([name for r in self._earlier[kind] for name in r] + list(row)))

            def write_earlier(f):
                text = io.StringIO(newline="")
                writer = csv.DictWriter(text, columns)
                writer.writeheader()
                writer.writerows(self._earlier[kind])
                f.write(text.getvalue().encode())

            write_atomically(self._files[kind], write_earlier)
            file = open(self._files[kind], "a", encoding="utf-8", newline="")
            self._writers[kind] = (file, csv.DictWriter(file, columns))
        file, writer = self._writers[kind]
        writer.writerow(row)
        file.flush()

    def flush(self):
        for file, _ in self._writers.values():
            file.flush()
            os.fsync(file.fileno())

    def close(self, failed=False):
        for file, _ in self._writers.values():
            file.close()
        self._writers = {}


class TensorBoardSink:
    """Scalars under tensorboard/ in the run directory, one event per value with the step and wall time."""

    def __init__(self, run_dir, cfg, start_step, earlier_records):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events of steps >= it that an interrupted launch had written
        self._writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=10,
                                     purge_step=start_step + 1 if start_step else None)

    def write(self, record):
        for name, value in flat_scalars(record).items():
            self._writer.add_scalar(name, value, global_step=record["step"], walltime=record["time"])

    def flush(self):
        self._writer.flush()

    def close(self, failed=False):
        self._writer.close()


class WandbSink:
    """One W&B run per launch in group <run_name> (project $WANDB_PROJECT, else "graddotprod"); offline with
    WANDB_MODE=offline."""

    def __init__(self, run_dir, cfg, start_step, earlier_records):
        import wandb

        name = cfg["run_name"] if start_step == 0 else f"{cfg['run_name']} from step {start_step + 1}"
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "graddotprod"), name=name,
                               group=cfg["run_name"], config=cfg, dir=os.environ.get("WANDB_DIR", run_dir))

    def write(self, record):
        self._run.log(flat_scalars(record), step=record["step"])

    def flush(self):
        pass  # W&B sends and stores in its own process

    def close(self, failed=False):
        self._run.finish(exit_code=1 if failed else 0)


SINK_CLASSES = {"csv": CsvSink, "tensorboard": TensorBoardSink, "wandb": WandbSink}
