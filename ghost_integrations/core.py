"""What every training-framework integration shares (docs/INTEGRATIONS.md).

`ValuationRun` owns the engine of one training run and does, for a framework's training loop:
- at the start, `begin(...)`: opens the run directory (ghost_results.run_directory.RunDirectory, the owner
  the app uses too, which names, orders and writes every file): config.json, the validation rows, the
  set-aside of the files of steps a resumed run redoes;
- per micro-batch, `forward(model, batch, loss_multiplier)`: stack the fixed validation rows under the
  batch's rows (padding the shorter side on the right when their lengths differ), run the model's own
  loss on [train; val] and return it with the training rows' loss alone, for logging;
- per optimizer step, `end_step(step, lrs)`: the engine's dot products, every process's rows gathered on
  rank 0, recorded with the run directory, which writes them every `save_interval` steps as the app's
  dot-product files (--results_format: Parquet by default), so `python -m ghost_results.report RUN_DIR` reads an
  integration's run as it reads the app's. The frameworks write their own checkpoints.

The integrations only translate their framework's loss scaling into `loss_multiplier`: the factor the
model's loss is multiplied by before backward, relative to the mean over the micro-batch's targets. The
engine then leaves in `.grad` exactly what Regular training on the training rows leaves.

Rows carry provenance: `sample_index` (required: the row's index in the training set), `domain`,
`doc_id` and `token_offset` (defaults: "train", the sample index, the sample index). A sample of the report
is a (domain, token_offset) pair. `IndexedDataset` adds them to any map-style dataset of dicts.
"""
import os
import platform
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from ghost_engine.engine import LR_INSIDE, GradDotProdEngine
from ghost_engine.values import AUTO, FIRST_ORDER, value_for
from ghost_engine.losses import IGNORE_INDEX, per_sample_loss, target_counts
from ghost_engine.recording import gather_rows, local_rows
from ghost_results.results_io import file_formats
from ghost_results.run_directory import RunDirectory, grad_store_artifacts, resumed_run_id

# why the engine cannot run under these (the integrations' refusals name what to use instead)
DEEPSPEED_WHY = ("ZeRO-3 gathers every parameter inside DeepSpeed's own hooks, where the engine cannot see the "
                 "parameters a layer uses, and every stage scales the loss and keeps the gradients in DeepSpeed's own "
                 "buffers, outside .grad")
FSDP1_WHY = ("FlatParameters: each wrapped module's parameters flattened into one tensor and handed to the layers as "
             "new views at every forward, which the engine does not follow")
PROVENANCE_KEY = "graddotprod_rows"  # a batch's provenance, {field: [B] values}
PROVENANCE_FIELDS = ("sample_index", "domain", "doc_id", "token_offset")
DEFAULT_DOMAIN = "train"


# ---------------------------------------------------------------------------------------------- provenance


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset of dicts whose items also carry their provenance under PROVENANCE_KEY.

    The item's own "sample_index", "domain", "doc_id" and "token_offset" entries are moved there; missing
    ones default to the item's index (sample_index, doc_id, token_offset) and "train" (domain).
    """

    def __init__(self, dataset):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(f"{type(dataset).__name__} is not a map-style dataset (no __len__ / indexing): the "
                             "integrations identify a training row by its index in the dataset")
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"item {index} of the training set is a {type(item).__name__}; the integrations need "
                            "dicts (input_ids, labels, ...)")
        item = dict(item)
        rows = {"sample_index": index, "domain": DEFAULT_DOMAIN, "doc_id": None, "token_offset": None}
        for name in PROVENANCE_FIELDS:
            if name in item:
                rows[name] = item.pop(name)
        rows["sample_index"] = int(rows["sample_index"])
        for name in ("doc_id", "token_offset"):
            rows[name] = rows["sample_index"] if rows[name] is None else int(rows[name])
        rows["domain"] = str(rows["domain"])
        item[PROVENANCE_KEY] = rows
        return item


class ProvenanceCollator:
    """Wraps a collator: it collates the items without their provenance, which joins the batch as
    {field: [B] tensor (list of str for domain)} under PROVENANCE_KEY."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        rows = [f.get(PROVENANCE_KEY) if isinstance(f, Mapping) else None for f in features]
        if any(r is None for r in rows):
            return self.collator(features)
        batch = self.collator([{k: v for k, v in f.items() if k != PROVENANCE_KEY} for f in features])
        batch[PROVENANCE_KEY] = {name: [r[name] for r in rows] if name == "domain"
                                 else torch.tensor([r[name] for r in rows], dtype=torch.int64)
                                 for name in PROVENANCE_FIELDS}
        return batch


def split_batch(batch):
    """(model inputs, provenance or None): provenance from PROVENANCE_KEY or from top-level fields."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"the training batch is a {type(batch).__name__}; the integrations need a dict "
                        "(input_ids, labels, attention_mask, ...)")
    inputs = dict(batch)
    rows = inputs.pop(PROVENANCE_KEY, None)
    if rows is None and "sample_index" in inputs:
        rows = {name: inputs.pop(name) for name in PROVENANCE_FIELDS if name in inputs}
    if rows is None:
        return inputs, None
    sample_index = _ints(rows["sample_index"])
    provenance = {
        "sample_index": sample_index,
        "domain": [str(d) for d in rows["domain"]] if "domain" in rows else [DEFAULT_DOMAIN] * len(sample_index),
        "doc_id": _ints(rows["doc_id"]) if "doc_id" in rows else sample_index,
        "token_offset": _ints(rows["token_offset"]) if "token_offset" in rows else sample_index,
    }
    return inputs, provenance


def _ints(values) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.cpu()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _val_provenance(val: dict, rows: int) -> dict:
    """The validation rows' provenance, taken out of `val` (the val_batch's entries but input_ids): "domain" (a
    str for every row, or one per row), "doc_id", "token_offset", "sample_index" (one int per row); None where
    not given (valset.pkl then gets the defaults, see ValuationRun._write_valset)."""
    provenance = {}
    for name in PROVENANCE_FIELDS:
        given = val.pop(name, None)
        if given is None:
            provenance[name] = None
            continue
        if name == "domain":
            values = [given] * rows if isinstance(given, str) else [str(d) for d in given]
        else:
            values = _ints(given).tolist()
        if len(values) != rows:
            raise ValueError(f"val_batch[{name!r}] has {len(values)} entries for {rows} validation rows; give one "
                             "per row" + (" (or one str for all)" if name == "domain" else ""))
        provenance[name] = values
    return provenance


def with_value(loss: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`loss`'s gradient, `value`'s value: what a framework back-propagates and what it logs."""
    return loss + (value.to(loss.dtype) - loss).detach()


# ---------------------------------------------------------------------------------------------- the run


class ValuationRun:
    """The engine of one training run and its per-step bookkeeping; its run directory is written by
    `ghost_results.run_directory.RunDirectory` (`self.files`, rank 0), as the app's is.

    Args:
        model: the module whose trainable parameters the optimizer updates (un-wrapped).
        val_batch: the fixed validation rows, in the model's input format: {"input_ids": [Bv, T], "labels": [Bv, T]
            (unshifted: the model shifts them; default: input_ids, -100 where attention_mask is 0),
            "attention_mask": [Bv, T] (default: all ones), any other per-row tensor the training batches also
            carry (position_ids, ...), and the rows' provenance for valset.pkl: "domain" (a str, or one per row),
            "doc_id", "token_offset", "sample_index" (one int per row; defaults in _write_valset)}.
        run_dir, run_name: where the results go and the name their files carry.
        config: extra entries for config.json (e.g. data_dir, seq_len, val_domain for the report).
        save_interval: write the records every this many steps (and at the end).
        value: the engine's estimator (docs/METHOD.md section 2.1); the update-aware ones read the optimizer
            given to begin(), and the deferred ones (second_order, adamw_vt, midpoint) .grad at end_step().
            "auto" (the default) follows that optimizer: "adamw" under an Adam/AdamW, else "first_order"
            (docs/FIDELITY.md); config.json and the files name the estimator it became.
        results_format: "parquet" (default), "pickle" or "both": the files written, as the app's --results_format.
        project_dim, project_seed, project_dtype: as the app's flags: with project_dim K > 0 every training row's
            projected gradient (K columns) and the validation gradient's go to the run's gradient stores
            (docs/ATTRIBUTION.md).
    """

    def __init__(self, model, val_batch, run_dir, run_name, config=None, save_interval=10, value=AUTO,
                 results_format="parquet", project_dim=0, project_seed=0, project_dtype="bfloat16"):
        if not isinstance(val_batch, Mapping) or "input_ids" not in val_batch:
            raise ValueError("val_batch must be a dict with 'input_ids' (and 'labels', default: the input_ids)")
        if save_interval < 1:
            raise ValueError(f"save_interval={save_interval} must be >= 1")
        self.results_format, self.formats = results_format, file_formats(results_format)
        val = dict(val_batch)
        X_val = val.pop("input_ids")
        if not torch.is_tensor(X_val) or X_val.dim() != 2:
            raise ValueError(f"val_batch['input_ids'] must be a [rows, length] tensor of token ids, not "
                             f"{type(X_val).__name__}{tuple(X_val.shape) if torch.is_tensor(X_val) else ''}")
        self.val_provenance = _val_provenance(val, X_val.shape[0])  # removes the provenance entries from val
        for name, tensor in val.items():
            if not torch.is_tensor(tensor) or tensor.shape[:1] != X_val.shape[:1]:
                raise ValueError(f"val_batch[{name!r}] must be a tensor with {X_val.shape[0]} rows (one per row "
                                 f"of val_batch['input_ids']), not {type(tensor).__name__}"
                                 f"{tuple(tensor.shape) if torch.is_tensor(tensor) else ''}")
        Y_val = val.pop("labels", None)
        if Y_val is None:  # the model shifts the labels; positions the attention mask leaves out are no targets
            Y_val = X_val.clone()
            if "attention_mask" in val:
                Y_val[val["attention_mask"] == 0] = IGNORE_INDEX
        projection = dict(total=project_dim, seed=project_seed) if project_dim else None
        self._engine_args = dict(val_batch=(X_val, Y_val), task="causal_lm", loss_reduction="mean",
                                 val_forward=self._val_logits, projection=projection)
        self.value = value  # as given ("auto": the engine's value is chosen by begin(), from the optimizer)
        self.engine = GradDotProdEngine(model, value=FIRST_ORDER if value == AUTO else value, **self._engine_args)
        self.project_dtype = project_dtype
        self._forward_model = None  # the model forward() runs (un-wrapped from DDP), for _val_logits
        self._val = {"input_ids": X_val, "labels": Y_val, **val}  # the validation rows as given
        self._val_on = {}  # (device, T) -> the validation rows there, padded to T
        self.run_dir, self.run_name = os.fspath(run_dir), str(run_name)
        self.config = dict(config or {})
        self.save_interval = save_interval
        self.rank, self.world_size = 0, 1
        self.files = None  # the run directory, opened by begin() on rank 0
        self.run_id = None  # set by begin() on rank 0
        self._reset_step()

    def _val_logits(self, model, X_val):
        """The deferred estimators' validation forward: the model forward() runs, on the validation rows with
        their other inputs (attention_mask, ...) at the length the engine holds them; `model` (the engine's)
        has the parameters in place that the engine put there, and the forward model is, or is inside, it."""
        val = next((v for v in self._val_on.values() if v["input_ids"] is X_val), self._val)
        extra = {name: value for name, value in val.items() if name not in ("input_ids", "labels")}
        return _field((self._forward_model or model)(input_ids=X_val, **extra), "logits")

    def _reset_step(self):
        self._multipliers, self._provenance = [], []  # per micro-batch
        self._train_ce, self._train_targets, self._val_loss, self._device = 0.0, 0, None, None

    # ------------------------------------------------------------------ run
    def begin(self, start_step, max_steps, settings, optimizer=None, model=None):
        """Attach the engine (with `optimizer`, the torch optimizer that steps the model, for the update-aware
        estimators); rank 0 writes config.json (`settings`: the framework's, then the user's `config`) and sets
        aside files of steps after `start_step` (a resumed run writes them again). `model`: the module to value as
        the framework prepared it for training (default: the one given at construction)."""
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        optimizer = _torch_optimizer(optimizer)
        if not self.engine.attached:
            model = self.engine.model if model is None else model
            value = value_for(self.value, isinstance(optimizer, torch.optim.Adam))
            # a new engine where "auto" became another estimator (AdamW: adamw), or where the framework changed the
            # parameters since the engine was built: accelerate's FSDP2 applies fully_shard in Trainer.train(), which
            # replaces every parameter by a DTensor shard (the engine must be built after fully_shard)
            if value != self.engine.value or model is not self.engine.model or _parameters_replaced(self.engine):
                self.engine = GradDotProdEngine(model, value=value, **self._engine_args)
            self.engine.attach(optimizer if self.engine.value in LR_INSIDE else None)
        self._reset_step()
        if self.rank != 0:
            return
        self.run_id = resumed_run_id(self.run_dir, start_step)
        self.files = RunDirectory(self.run_dir).acquire()  # RunBusyError naming the holder: one run a directory
        self.files.open(start_step, run_id=self.run_id, run_name=self.run_name, world_size=self.world_size,
                        results_format=self.results_format, value=self.engine.value, save_interval=self.save_interval)
        X_val = self._val["input_ids"]
        config = {"run_name": self.run_name, "run_id": self.run_id, "method": "GradDotProd", "start_step": start_step,
                  "world_size": self.world_size, "value": self.engine.value, "val_batch_size": int(X_val.shape[0]),
                  "val_seq_len": int(X_val.shape[1]), "dot_prod_save_interval": self.save_interval,
                  "results_format": self.results_format,
                  "optimizer": None if optimizer is None else type(optimizer).__name__,
                  "torch": torch.__version__, "python": platform.python_version(), **settings, **self.config}
        if max_steps is not None and max_steps > 0:
            config["max_steps"] = int(max_steps)
        self.files.write_config(config)
        self._write_valset(config)
        if self.engine.projection is not None:
            data = {"source": config.get("data_dir"), "kind": config.get("data_kind", "corpus"), "split": "train"}
            self.files.open_grad_stores(self.engine.projection.describe(), dtype=self.project_dtype,
                                        seq_len=config.get("seq_len", int(X_val.shape[1])), data=data,
                                        value=self.engine.value)

    def _write_valset(self, config):
        """The validation rows in the app's schema (ghost_results.valset): the validation input_ids as given
        (seq_len: their length) and their provenance; defaults: domain the config's val_domain (else
        "validation"), doc_id, token_offset and sample_index the row's index. A resumed run keeps the valset.pkl
        it finds when its rows are these; other rows go beside it, as the app's --accept_data_change does."""
        tokens = self._val["input_ids"].detach().cpu().numpy()
        index = list(range(tokens.shape[0]))
        given, val_domain = self.val_provenance, config.get("val_domain")
        domain = given["domain"] or [str(val_domain) if val_domain is not None else "validation"] * len(index)
        provenance = {"domain": domain, "doc_id": given["doc_id"] or index,
                      "token_offset": given["token_offset"] or index, "sample_index": given["sample_index"] or index}
        self.files.write_valset(tokens, tokens.shape[1], provenance, val_domain=val_domain,
                                data_dir=config.get("data_dir"))

    def sync(self):
        """Make every step filed so far durable (the records, the step sinks): call it before the framework writes
        a checkpoint, so that a resume from it finds all of its steps (it sets aside the files that run past it)."""
        if self.rank == 0 and self.files is not None:
            self.files.sync()

    def finish(self):
        """Write the pending records, release the run directory and detach the engine (safe to call twice)."""
        if self.rank == 0 and self.files is not None:
            try:
                self.files.flush()
                self.files.close()
            finally:
                self.files.release()
                self.files = None
        self.engine.detach()

    # ------------------------------------------------------------------ micro-batch
    def forward(self, model, batch, loss_multiplier):
        """Run `model` on [train; val] rows of one micro-batch.

        Returns (loss, train_loss): the model's loss over every row (mean over all targets, with its graph;
        back-propagate it times `loss_multiplier`) and the training rows' mean loss (detached).
        """
        inputs, provenance = split_batch(batch)
        if provenance is None:
            raise ValueError("the training batch carries no 'sample_index' (the rows' indices in the training set): "
                             "wrap the training set in ghost_integrations.IndexedDataset, or give every "
                             "item a 'sample_index'")
        if "input_ids" not in inputs or "labels" not in inputs:
            raise ValueError(f"the training batch has keys {sorted(inputs)}; it needs 'input_ids' and 'labels'")
        if "shift_labels" in inputs:
            raise ValueError("batches with 'shift_labels' are not supported; give unshifted 'labels'")
        X, Y = inputs.pop("input_ids"), inputs.pop("labels")
        B = X.shape[0]
        if len(provenance["sample_index"]) != B:
            raise ValueError(f"the batch has {B} rows but provenance for {len(provenance['sample_index'])}")
        train, val = self._common_length(X, Y, inputs)
        Xc, Yc = self.engine.prepare_forward_input(train.pop("input_ids"), train.pop("labels"), loss_multiplier)
        stacked = {"input_ids": Xc, "labels": Yc}
        for name, value in train.items():
            stacked[name] = torch.cat([value, val[name]]) if name in val else value
        out = model(**stacked)
        self._forward_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        loss, logits = _field(out, "loss"), _field(out, "logits")
        if loss is None or logits is None:
            raise ValueError("the model returned no loss or no logits; the integrations need both")
        # the training rows' loss, from the model's mean over all rows less the validation rows' share
        n_train = int(target_counts(Yc[:B], "causal_lm").sum())
        n_val = self.engine.n_val_targets
        val_counts = target_counts(Yc[B:], "causal_lm")
        val_ce = (per_sample_loss(logits[B:].detach(), Yc[B:]).double() * val_counts).sum()
        train_ce = loss.detach().double() * (n_train + n_val) - val_ce
        if self._val_loss is None:
            self._val_loss = float(val_ce) / n_val  # at the step's parameters: same in every micro-batch
        self._train_ce += train_ce
        self._train_targets += n_train
        self._device = loss.device
        self._multipliers.append((B, float(loss_multiplier)))
        self._provenance.append(provenance)
        return loss, train_ce / n_train

    def _common_length(self, X, Y, extra):
        """Training and validation rows padded on the right to a common length: exact for a causal LM (no
        earlier position sees a later one; padded positions are no targets, attention_mask 0 there)."""
        T = max(X.shape[1], self._val["input_ids"].shape[1])
        key = (X.device, T)
        if key not in self._val_on:
            self._val_on[key] = {name: _pad(name, value.to(X.device), T) for name, value in self._val.items()}
        val = self._val_on[key]
        if self.engine.X_val is not val["input_ids"]:
            self.engine.set_val_batch(val["input_ids"], val["labels"])
        train = {"input_ids": _pad("input_ids", X, T), "labels": _pad("labels", Y, T)}
        for name, value in extra.items():
            rowwise = torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == X.shape[0]
            if not rowwise:
                train[name] = value
                continue
            if name not in val:
                if name != "attention_mask":
                    raise ValueError(f"the training batch has {name!r} but the validation batch does not; add it "
                                     "to val_batch")
                val[name] = torch.ones_like(val["input_ids"])
            train[name] = _pad(name, value, T)
        for name in val:  # the validation rows' other inputs reach the model only beside the training rows'
            if name in train:
                continue
            if name != "attention_mask":
                raise ValueError(f"val_batch has {name!r} but the training batch does not; give the training "
                                 f"batches {name!r} too (one per row), or leave it out of val_batch")
            train[name] = _pad(name, torch.ones_like(X), T)  # what a missing mask means: every position
        return train, val

    # ------------------------------------------------------------------ step
    def end_step(self, step, lrs):
        """File the step's dot products (every rank must call it: rows are gathered on rank 0); `lrs`: the step's
        learning rate of every parameter group (they must agree unless the value carries them)."""
        if not self._provenance:
            raise RuntimeError(f"step {step}: no micro-batch went through ValuationRun.forward since the last step")
        if len(set(lrs)) > 1 and self.engine.value not in LR_INSIDE:
            raise ValueError(f"step {step}: the optimizer's parameter groups have learning rates {sorted(set(lrs))}; "
                             f"value={self.engine.value!r} records one rate per step (its value is lr·w_i·dot_i), "
                             "so it would be wrong for the other groups: use one rate, or value='adamw' (AdamW), "
                             "whose values carry each group's rate")
        lr = float(lrs[0])
        result = self.engine.aggregate_and_log()
        # a row's weight in the step's loss: n_i / N_mb (the engine) times its micro-batch's multiplier, over
        # the processes whose gradients DDP averages
        multipliers = torch.cat([torch.full((rows,), m, dtype=torch.float64) for rows, m in self._multipliers])
        weights = result.weights.double().cpu() * multipliers / self.world_size
        provenance = {name: [v for p in self._provenance for v in p[name]] for name in PROVENANCE_FIELDS}
        local = local_rows(result, weights, provenance)
        sums = torch.stack([torch.as_tensor(self._train_ce, dtype=torch.float64, device=self._device),
                            torch.tensor(float(self._train_targets), dtype=torch.float64, device=self._device)])
        if self.world_size > 1:
            dist.all_reduce(sums)
        rows = gather_rows(local, self.world_size)
        val_loss = self._val_loss
        self._reset_step()
        if self.rank != 0:
            return
        record = {"step": int(step), "lr": float(lr), "loss": float(sums[0] / sums[1]), "val_loss": float(val_loss)}
        artifacts = None
        if result.projections is not None:
            rows["val_projection"] = result.val_projection.float().cpu().numpy()
            artifacts = grad_store_artifacts(rows, record)
        self.files.record_step(record, rows, artifacts=artifacts, log=False)  # the framework keeps its own log


def _field(out, name):
    return out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)


def _parameters_replaced(engine) -> bool:
    """Whether the engine's model no longer holds the trainable parameters the engine was built on."""
    return {id(p) for p in engine.model.parameters() if p.requires_grad} != set(engine.param_names)


def _torch_optimizer(optimizer):
    """The torch.optim optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer, ...)."""
    while optimizer is not None and not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _pad(name, value, T):
    """Right-pad [R, t, ...] to [R, T, ...]: labels with IGNORE_INDEX, everything else with 0."""
    missing = T - value.shape[1]
    if missing == 0:
        return value
    if name not in ("input_ids", "labels", "attention_mask"):
        raise ValueError(f"training rows of length {value.shape[1]} and validation rows of another length need "
                         f"padding, which is defined for input_ids, labels and attention_mask only, not {name!r}; "
                         "give the validation rows the training rows' length")
    fill = IGNORE_INDEX if name == "labels" else 0
    pad = value.new_full((value.shape[0], missing, *value.shape[2:]), fill)
    return torch.cat([value, pad], dim=1)
