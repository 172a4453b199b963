"""GPT-2 pretraining on the Pile, optionally valuing every training sample against a validation batch: the
training script behind `python -m GradDotProd_LM.train` (which parses the flags first, then calls `run`).

Read it top to bottom: `run` (DDP set-up from torchrun's variables) -> `_run` (hold the run directory) ->
`_train`, which calls the named steps in order: `load_data` -> `resumed_data` (identity, data unchanged) ->
`build_state` (model, FSDP2 sharding with --fsdp, optimizer, checkpoint) -> `attach_engine` (engine, then
compile and DDP) -> `open_run` (the run directory: ghost_results.run_directory.RunDirectory, which owns every
file of it) ->
`train_loop` (`train_step`: micro-batches, backward, engine, clip, update; evaluations, stop signals, `save_all`
checkpoints, `save_after_failure`). Step numbers count from 1: step t
trains on the reader's global batch t and is the t-th optimizer update.
"""
import gc
import math
import os
import platform
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP

from ghost_engine import GradDotProdEngine, per_sample_loss
from ghost_engine.recording import gather_rows, local_rows
from ghost_results.results_io import new_run_id
from ghost_results.run_directory import (DamagedRunFile, ForeignRunFile, RunBusyError, RunDirectory, check_identity,
                                         grad_store_artifacts, read_config, read_training_log, read_valset_tokens,
                                         sharded_checkpoint_path, unwritable)
from GradDotProd_LM.args import launch_record, model_name, run_dir_of
from GradDotProd_LM.checkpoint import (app_state, checkpoint_writer, free_space, newest_checkpoint, nonfinite_state,
                                       restore, save_sharded, set_rng_state)
from GradDotProd_LM.evaluate import Evaluator, format_eval
from GradDotProd_LM.experiment_log import ExperimentLog, SinkError, domain_sums
from GradDotProd_LM.model import build_model
from GradDotProd_LM.prefetch import BatchPrefetcher
from pile_tools.identity import data_identity, describe_data_change
from GradDotProd_LM.settings import load_settings
from pile_tools import ensure_sample_dataset
from pile_tools.reader import PileReader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lr_at(step, cfg):
    """Learning rate of step t (1-based): linear warmup over warmup_step steps, then cosine to min_lr at
    lr_decay_steps, min_lr after."""
    peak, floor, warmup, decay = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_step"], cfg["lr_decay_steps"]
    if step <= warmup:
        return peak * step / warmup
    if step >= decay:
        return floor
    progress = (step - warmup) / (decay - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def build_optimizer(model, cfg, device):
    """AdamW (beta 0.9/0.95) with weight decay 0.1 on matrices and embeddings only; or plain SGD."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head appears once
    if cfg["optimizer"] == "SGD":
        return torch.optim.SGD(params, lr=cfg["learning_rate"])
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(0.9, 0.95), fused=device.type == "cuda")


def resolve_data_dir(cfg, master, world_size):
    """--data_dir, else the tokenized Pile at the settings' pile_data_dir, else the bundled sample (built once)."""
    if cfg["data_dir"] is not None:
        return cfg["data_dir"]
    dirs = load_settings()
    if os.path.exists(os.path.join(dirs.pile_data_dir, "train", "ingest.json")):
        return dirs.pile_data_dir
    if master:
        print(f"No tokenized Pile at {dirs.pile_data_dir} (give --data_dir or set "
              f"GRADDOTPROD_PILE_DATA_DIR): training on the bundled sample, tokenized once into "
              f"{dirs.sample_data_dir}", flush=True)
        data_dir = ensure_sample_dataset(dirs.sample_data_dir)
    if world_size > 1:
        dist.barrier()  # rank 0 builds the sample; the others then only find it
    if not master:
        data_dir = ensure_sample_dataset(dirs.sample_data_dir)
    return os.path.abspath(data_dir)


class RunStopped(RuntimeError):
    """The run cannot go on; the steps before it are saved (main prints the message and exits 1)."""


class DivergedWeights(RunStopped):
    """An update left the weights or optimizer state non-finite; the last finite checkpoint was kept."""


class NonFiniteStep(RunStopped):
    """A step produced a non-finite loss, gradient norm or dot product; it was not applied."""

    def __init__(self, step, loss, grad_norm):
        super().__init__(f"step {step}: the training loss is {loss}, the gradient norm {grad_norm}, or a dot "
                         "product is not finite (the run diverged: lower --learning_rate, or check the data); "
                         "the step was not applied")


def rank0_error_stops_all(error, world_size, device) -> bool:
    """True on every rank when rank 0 found `error` (None: no error), which rank 0 prints; every rank
    must leave together or the others would wait in the next collective forever."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    if world_size > 1:
        dist.all_reduce(flag)
    if error is not None:
        print(f"train.sh: error: {error}", file=sys.stderr, flush=True)
    return bool(flag.item())


def checkpoint_space_shortfall(run_dir, model, optimizer):
    """None if the results file system has room for a checkpoint (model + optimizer state, with 10% to
    spare), else the error to print: better now than at the first checkpoint after hours of training."""
    tensors = list(model.state_dict().values()) + [
        v for state in optimizer.state_dict()["state"].values() for v in state.values() if torch.is_tensor(v)]
    needed = sum(t.numel() * t.element_size() for t in tensors)
    if not optimizer.state_dict()["state"] and isinstance(optimizer, torch.optim.AdamW):
        needed += 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # moments to come
    needed = int(needed * 1.1)
    existing, free = free_space(run_dir)
    if free >= needed:
        return None
    return (f"{existing} has {free / 2**20:,.0f} MiB free but a checkpoint of this run needs about "
            f"{needed / 2**20:,.0f} MiB; free space or pass another --results_dir")


def data_vocabulary(train_reader, other_readers, model_config):
    """The vocabulary size of the data: every split read must come from the train split's tokenizer, every
    domain's recorded largest id must fit it, and a --model_config's vocab_size must hold it."""
    identity = train_reader.tokenizer
    vocab = identity["vocab_size"]
    for reader in (train_reader, *other_readers):
        if reader.tokenizer != identity:
            raise ValueError(f"split {reader.split!r} was tokenized with another vocabulary ({reader.tokenizer}) "
                             f"than the train split ({identity}); tokenize every split with the same one")
        reader.check_vocabulary(vocab)  # the maxima recorded at ingest; every batch is checked too
    configured = (model_config or {}).get("vocab_size")
    if configured is not None and configured < vocab:
        raise ValueError(f"--model_config has vocab_size {configured}, fewer than the data's {vocab} token ids")
    return vocab


def check_token_ids(batch, step, data_dir, world_size, device, vocab):
    """Token ids must lie in [0, the data's vocabulary): an id outside means corrupt token files. Every rank
    stops together (one small all-reduce), naming what the rank that saw it saw."""
    largest, smallest = int(batch.tokens.max()), int(batch.tokens.min())
    outside = largest >= vocab or smallest < 0
    bad = torch.tensor([float(outside)], device=device)
    if world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if outside:
        worst = largest if largest >= vocab else smallest
        row = int(np.argmax((batch.tokens == worst).any(axis=1)))
        raise RunStopped(f"step {step}: token id {worst} outside [0, {vocab}) in domain {batch.domain[row]!r} "
                         f"at token offset {batch.token_offset[row]} of {data_dir}: the token files are corrupt "
                         "or were written with another vocabulary; tokenize that domain again")
    if bad.item():
        raise RunStopped(f"step {step}: another process found a token id outside the vocabulary (see its "
                         "message)")


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (the step in flight completes)."""

    def __init__(self):
        self.signum = None  # the first signal received
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def finished_before(run_dir, step, cfg):
    """True if a run resumed at `step` >= max_steps has nothing left to do: no evaluation due at that step is
    missing from its log (a failure in the final evaluation leaves one to redo)."""
    if not (step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]):
        return True
    try:
        return any(e["step"] == step for e in read_training_log(run_dir, step, cfg["run_id"])["evals"])
    except (DamagedRunFile, ForeignRunFile):
        return False  # the full start-up path names the file


def report_progress(step, max_steps, record, started, first_step):
    """One compact line per step: loss, lr, throughput, time left."""
    done = step - first_step + 1
    eta = (time.perf_counter() - started) / done * (max_steps - step)
    val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
    print(f"step {step}/{max_steps} | loss {record['loss']:.4f}{val} | lr {record['lr']:.2e} | "
          f"{record['tokens_per_s']:,.0f} tok/s | {record['step_time_s'] * 1e3:.0f} ms | eta {eta:.0f}s", flush=True)


def run(cfg, argv, world_size, ddp) -> int:
    """Train (or evaluate) the run `cfg` describes (GradDotProd_LM.args.parse_config); returns the exit status.
    Under torchrun (ddp) every rank calls it."""
    # ---------------------------------------------------------------- DDP set-up from torchrun's variables
    if ddp:
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        rank = 0
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    master = rank == 0
    stop = StopRequest()
    stop.install()
    try:
        code = _run(cfg, argv, rank, world_size, device, master, stop)
        if ddp:  # leave together: a rank that tears gloo down while rank 0 still writes aborts (SIGABRT), and
            dist.barrier()  # torchrun then stops rank 0 with SIGTERM
        return code
    except RunStopped as err:
        if master:
            print(f"train.sh: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.restore()
        if ddp:
            # the model, its DDP reducer and the work they hold on the process group may sit in reference cycles:
            # free them now, not while the interpreter finalizes (gloo then aborts in its threads)
            gc.collect()
            dist.destroy_process_group()


def _run(cfg, argv, rank, world_size, device, master, stop):
    """Train while holding the run directory (eval-only runs read it without holding it)."""
    files = RunDirectory(run_dir_of(cfg))
    if cfg["resume"] or not cfg["eval_only"]:  # eval-only with --resume writes its result into the run
        problem = unwritable(run_dir_of(cfg)) if master else None
        if rank0_error_stops_all(problem, world_size, device):
            return 2
    if not cfg["eval_only"]:
        busy = None
        if master:
            try:
                files.acquire()
            except (RunBusyError, OSError) as err:
                busy = err
        if rank0_error_stops_all(busy, world_size, device):
            return 2
    try:
        return _train(cfg, argv, rank, world_size, device, master, stop, files)
    finally:
        files.release(remove_if_empty=master and not cfg["eval_only"])  # stopped before writing: no trace


class StartError(Exception):
    """The run cannot start (bad data, a damaged or foreign run file); nothing was changed. Every rank finds it
    alike; rank 0 prints it and the process exits 2."""


@dataclass
class Data:
    """What the run reads: the training batches, the fixed validation rows, the evaluation splits."""

    train_reader: PileReader
    batches: BatchPrefetcher  # the train reader's batches, read a step ahead (pinned on a GPU)
    val_batch: object  # the reader's batch of validation rows (tokens, provenance), None for --val_batch_size 0
    evaluator: Evaluator
    vocab: int  # the data's vocabulary size


@dataclass
class State:
    """What one step changes: the model (and the compiled/DDP wrapper the step runs), its optimizer, the engine."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    start_step: int  # optimizer steps completed before this launch (the checkpoint's)
    sharded: bool = False  # --fsdp over several processes: parameters and optimizer state are FSDP2 shards
    engine: GradDotProdEngine = None
    step_model: torch.nn.Module = None


def _train(cfg, argv, rank, world_size, device, master, stop, files):
    """The run, top to bottom: data, state (fresh or restored), the run directory (`files`, held by rank 0),
    the loop."""
    train_dtype = cfg["train_dtype"] if cfg["train_dtype"] != "auto" else (
        "bfloat16" if device.type == "cuda" else "float32")
    # sharded: bfloat16 through FSDP2's MixedPrecisionPolicy, not autocast
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if train_dtype == "bfloat16" and not shards(cfg, world_size) else nullcontext())
    run_dir = run_dir_of(cfg)
    try:
        data = load_data(cfg, rank, world_size, master)
        resumed = resumed_data(cfg, run_dir, data)
        state = build_state(cfg, data, device, world_size, train_dtype)
    except StartError as err:
        if master:
            print(f"train.sh: error: {err}", file=sys.stderr, flush=True)
        return 2

    if cfg["eval_only"]:
        result = data.evaluator.evaluate(state.model, device, autocast)
        if master:
            print(format_eval(state.start_step, result), flush=True)
            if cfg["resume"]:
                files.write_eval_only(state.start_step, result, cfg["run_id"])
        return 0
    if state.start_step >= cfg["max_steps"] and finished_before(run_dir, state.start_step, cfg):
        if master:  # nothing is written: config.json keeps the command that trained the run
            print(f"Nothing to train: {run_dir} is at step {state.start_step} and --max_steps is "
                  f"{cfg['max_steps']}; pass a larger --max_steps to extend it", flush=True)
        return 0

    attach_engine(cfg, state, data, device, world_size)
    if rank0_error_stops_all(checkpoint_space_shortfall(run_dir, state.model, state.optimizer) if master else None,
                             world_size, device):
        return 2
    start_error = None  # rank 0 writes the run's files
    if master:
        try:
            open_run(files, cfg, argv, state, data, resumed, world_size, device, train_dtype)
        except (StartError, SinkError) as err:
            start_error = err
    else:
        files = None
    if rank0_error_stops_all(start_error, world_size, device):
        return 2
    if master:
        value = f" | value {cfg['value']}" if cfg["method"] == "GradDotProd" else ""
        print(f"{cfg['method']}{value} | {model_name(cfg)} | {sum(p.numel() for p in state.model.parameters()) / 1e6:.1f}M "
              f"params | global batch {cfg['batch_size']} x {cfg['seq_len']} tokens | {world_size} process(es) on "
              f"{device} | {train_dtype} | steps {state.start_step + 1}..{cfg['max_steps']} | results {run_dir}",
              flush=True)
        if cfg["fsdp"]:
            replicas = cfg["replicate_degree"]
            print(f"FSDP2: parameters, gradients and optimizer state sharded over {world_size // replicas} "
                  f"process(es)" + (f" in each of {replicas} replicas (HSDP)" if replicas > 1 else "")
                  + "; sharded checkpoints" if state.sharded else
                  "note: --fsdp with one process: nothing to shard, the model is trained whole and checkpointed "
                  "as checkpoints/latest.pt", flush=True)
        if cfg["method"] == "GradDotProd" and cfg["optimizer"] == "AdamW" and state.start_step < 2:
            print("note: steps 1-2 are AdamW's first updates, where no per-step value is faithful "
                  "(docs/FIDELITY.md): recorded, and left out by the report", flush=True)
    return train_loop(cfg, state, data, files, rank, world_size, device, master, stop, autocast)


def load_data(cfg, rank, world_size, master) -> Data:
    """The readers of the run's splits, checked before any step: every domain holds a window, every split was
    tokenized with one vocabulary that the model can hold."""
    B, T = cfg["batch_size"], cfg["seq_len"]
    cfg["data_dir"] = resolve_data_dir(cfg, master, world_size)
    try:
        train_reader = PileReader(cfg["data_dir"], split="train", domains=cfg["train_domains"], seed=cfg["seed"])
        val_reader = PileReader(cfg["data_dir"], split="validation",
                                domains=None if cfg["val_domain"] is None else [cfg["val_domain"]], seed=cfg["seed"])
        try:
            val_batch = val_reader.fixed_batch(cfg["val_batch_size"], T) if cfg["val_batch_size"] else None
        except ValueError as err:
            raise ValueError(f"split 'validation' (--val_batch_size {cfg['val_batch_size']}, --seq_len {T}): "
                             f"{err}") from None
        try:
            train_reader.get_batch(1, B, T, rank=rank, world_size=world_size)  # every domain holds a window
        except ValueError as err:
            raise ValueError(f"split 'train': {err}") from None
        evaluator = Evaluator(cfg["data_dir"], T, cfg["eval_iter"], cfg["eval_bs"], cfg["seed"], rank, world_size)
        vocab = data_vocabulary(train_reader, (val_reader, *evaluator.readers.values()), cfg["model_config"])
    except (FileNotFoundError, ValueError) as err:
        raise StartError(f"data in {cfg['data_dir']}: {err}") from None
    cfg["data_tokenizer"] = train_reader.tokenizer  # saved with the run and its checkpoints (export reads it)
    batches = BatchPrefetcher(train_reader, B, T, rank, world_size, cfg["max_steps"],
                              pin=torch.cuda.is_available())
    return Data(train_reader, batches, val_batch, evaluator, vocab)


def resumed_data(cfg, run_dir, data) -> dict:
    """The run's identity (kept by a resumed run, new otherwise: cfg["run_id"]) and, for --resume, what its
    config.json says of the data it started on; a resumed run continues on that data, against the same
    validation rows (valset.pkl), unless --accept_data_change."""
    saved_config = read_config(run_dir) if cfg["resume"] else {}
    # the identity goes into every file the run writes; None: a run started before identities, matched by name
    cfg["run_id"] = saved_config.get("run_id") if cfg["resume"] else new_run_id()
    if cfg["eval_only"]:
        saved_config = {}  # an evaluation neither trains nor records data
    identity = data_identity(cfg["data_dir"])
    data_change = describe_data_change(saved_config["data_identity"], identity) if "data_identity" in saved_config \
        else ""
    try:
        saved_val = read_valset_tokens(run_dir, cfg["run_id"]) if saved_config and data.val_batch is not None \
            else None
    except (DamagedRunFile, ForeignRunFile) as err:
        raise StartError(f"--resume: {err}") from None
    val_changed = saved_val is not None and not np.array_equal(saved_val, data.val_batch.tokens)
    if (data_change or val_changed) and not cfg["accept_data_change"]:
        raise StartError(f"--resume: the data under {cfg['data_dir']} changed since {run_dir} started ("
                         f"{data_change or 'the validation rows differ from valset.pkl'}); the run would continue "
                         "on another mixture. Restore the data, start a new --run_name, or pass "
                         "--accept_data_change to continue anyway (recorded in config.json; valset.pkl is kept)")
    return {"saved_config": saved_config, "data_identity": identity, "data_change": data_change,
            "val_changed": bool(val_changed)}


def build_state(cfg, data, device, world_size, train_dtype) -> State:
    """The model of the run's seed (sharded with --fsdp over several processes), its optimizer, both restored
    from the run's newest checkpoint when resuming (a latest.pt or a sharded one, written by any number of
    processes)."""
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank and in every run of this seed
    model = build_model(cfg["architecture"], n_positions=max(1024, cfg["seq_len"]), init_from=cfg["init_from"],
                        gradient_checkpointing=cfg["grad_ckpt"], vocab_pad_multiple=cfg["vocab_pad_multiple"],
                        model_config=cfg["model_config"], attention=cfg["attention"],
                        attention_rank=cfg["attention_rank"], attention_block=cfg["attention_block"],
                        vocab_size=data.vocab)
    model.to(device=device, dtype=DTYPES[cfg["model_dtype"]])
    model.train()
    sharded = shards(cfg, world_size)
    if sharded:
        shard_model(model, device, world_size, cfg["replicate_degree"], train_dtype)
    state = State(model, build_optimizer(model, cfg, device), start_step=0, sharded=sharded)
    newest = newest_checkpoint(run_dir_of(cfg)) if cfg["resume"] else None
    if newest is not None:
        path = newest[0]
        try:
            saved = restore(model, state.optimizer, path)
        except Exception as err:  # truncated or corrupt: torch raises several types
            raise StartError(f"cannot read the checkpoint {path} ({type(err).__name__}: {err}); restore it from a "
                             "backup, or keep this run's results and start a new --run_name") from None
        try:
            check_identity(path, saved.get("run_id"), cfg["run_id"])
        except ForeignRunFile as err:
            raise StartError(f"--resume: {err}") from None
        set_rng_state(saved["rng"])
        state.start_step = saved["step"]
    return state


def shards(cfg, world_size) -> bool:
    """--fsdp over more than one process (one process has nothing to shard: it trains the model whole)."""
    return cfg["fsdp"] and world_size > 1


def fsdp_units(model):
    """The model's FSDP2 units below the root, in the order fully_shard is applied, as (module or list of modules,
    reshard_after_forward): every transformer block (the longest nn.ModuleList whose children are all of one
    class); then the embedding and the output layer, a large share of the parameters with a 50K vocabulary, as
    units of their own rather than in the root's: unsharded only around their use, the output layer from its
    forward to its backward, which follows at once (tied: one unit for both). The root holds the rest."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0
             and len({type(child) for child in m}) == 1]
    if not lists:
        raise StartError(f"--fsdp: {type(model).__name__} has no list of repeated blocks to shard one by one")
    units = [(block, True) for block in max(lists, key=len)]
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        return units + [([embedding, output], False)]
    return units + [(embedding, True)] + ([(output, False)] if output is not None else [])


def shard_model(model, device, world_size, replicate_degree, train_dtype):
    """FSDP2: fully_shard on each of `fsdp_units`, then on the root; parameters Shard(0) over the processes, or
    with --replicate_degree R > 1 over a mesh of R replicas (HSDP). bfloat16 training computes through FSDP2's
    MixedPrecisionPolicy (bfloat16 parameters in the forward and backward, gradients reduced in float32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if replicate_degree > 1:
        mesh = init_device_mesh(device.type, (replicate_degree, world_size // replicate_degree),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if train_dtype == "bfloat16" else MixedPrecisionPolicy())
    for unit, reshard in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def attach_engine(cfg, state, data, device, world_size):
    """The engine on the model (GradDotProd), then torch.compile and DDP around it, in that order."""
    projection = dict(total=cfg["project_dim"], seed=cfg["project_seed"]) if cfg["project_dim"] else None
    if cfg["method"] == "GradDotProd" or projection:  # Regular with --project_dim: projections only
        val_batch = None
        if cfg["method"] == "GradDotProd":
            X_val = torch.from_numpy(data.val_batch.tokens[:, :cfg["seq_len"]]).to(device)  # [Bv, T]; labels = inputs
            val_batch = (X_val, X_val)
        state.engine = GradDotProdEngine(state.model, val_batch=val_batch, task="causal_lm", loss_reduction="mean",
                                         value=cfg["value"], projection=projection)
        # the header says it once instead: step 1's adamw values are recorded, and the report leaves them out
        warnings.filterwarnings("ignore", message="value='adamw' before the optimizer's first step")
        state.engine.attach(state.optimizer)
    state.step_model = torch.compile(state.model) if cfg["compile"] else state.model
    if world_size > 1 and not state.sharded:
        state.step_model = DDP(state.step_model, device_ids=[device.index] if device.type == "cuda" else None)


def open_run(files, cfg, argv, state, data, resumed, world_size, device, train_dtype):
    """Open the run directory at the checkpoint's step: read the log of the steps kept, set aside the files of
    steps to redo, start the log's sinks, write config.json (and the validation rows the first time).
    StartError/SinkError before anything is changed."""
    start_step = state.start_step
    saved = resumed["saved_config"]
    # a change of the data recorded after the checkpoint: the steps from the checkpoint to it trained on the data
    # before it, which the directory no longer holds, so redoing them is a change of data too
    later = [c for c in saved.get("data_changes", []) if int(c.get("from_step", 0)) > start_step + 1]
    if later and not cfg["accept_data_change"]:
        raise StartError(f"--resume from step {start_step}: the data changed from step {later[0]['from_step']} on "
                         f"(config.json's data_changes: {later[0].get('change') or 'the validation rows'}), after "
                         f"this checkpoint; steps {start_step + 1}..{int(later[0]['from_step']) - 1} trained on the "
                         "data before that change. Restore that data, resume from a later checkpoint, or pass "
                         "--accept_data_change to redo them on the data as it is now (recorded in config.json)")
    try:
        moved, destination = files.open(
            start_step, run_id=cfg["run_id"], run_name=cfg["run_name"], world_size=world_size,
            results_format=cfg["results_format"], value=cfg["value"], save_interval=cfg["dot_prod_save_interval"],
            checkpoint_interval=cfg["checkpoint_interval"], keep_checkpoints=cfg["keep_checkpoints"])
    except (DamagedRunFile, ForeignRunFile) as err:
        raise StartError(f"--resume: {err}") from None
    if cfg["resume"]:
        print(f"Resuming {files.path} from step {start_step}" + ("" if start_step else " (no checkpoint yet)")
              + (f"; moved {len(moved)} file(s) of later steps to {destination}" if moved else ""), flush=True)
    files.log_hook = ExperimentLog(files.path, cfg["report_to"], cfg, start_step, files.log)
    config_record = dict(cfg, world_size=world_size, train_dtype_resolved=train_dtype, device=str(device),
                         torch=torch.__version__, transformers=transformers.__version__,
                         python=platform.python_version(), argv=argv, data_identity=resumed["data_identity"],
                         data_changes=[c for c in saved.get("data_changes", []) if c not in later],
                         divergences=saved.get("divergences", []),
                         launches=[*saved.get("launches", []), launch_record(saved, cfg, argv, start_step)])
    if resumed["data_change"] or resumed["val_changed"] or later:
        back = "; ".join(f"back before the change from step {c['from_step']} ({c.get('change') or 'validation rows'})"
                         for c in later)
        config_record["data_changes"].append({"from_step": start_step + 1,
                                              "change": "; ".join(filter(None, [resumed["data_change"], back])),
                                              "validation_rows_changed": resumed["val_changed"]})
    if state.engine is not None and state.engine.projection is not None:  # --project_dim: the gradient stores
        try:
            files.open_grad_stores(state.engine.projection.describe(), dtype=cfg["project_dtype"],
                                   seq_len=cfg["seq_len"], validation=cfg["method"] == "GradDotProd",
                                   value=state.engine.value,
                                   data={"source": cfg["data_dir"], "kind": "corpus", "split": "train"})
        except ValueError as err:
            raise StartError(str(err)) from None
    files.write_config(config_record)
    if data.val_batch is not None:  # the rows the dot products are taken against, and where they came from
        val = data.val_batch
        provenance = dict(domain=val.domain, doc_id=val.doc_id, token_offset=val.token_offset,
                          sample_index=val.sample_index)
        files.write_valset(val.tokens, cfg["seq_len"], provenance, val_domain=cfg["val_domain"],  # [Bv, T + 1]
                           data_dir=cfg["data_dir"], changed=resumed["val_changed"])


def train_loop(cfg, state, data, files, rank, world_size, device, master, stop, autocast):
    """Steps start_step+1..max_steps, with evaluations, checkpoints and stop signals; on a failure the steps
    completed are saved as a stop signal would save them, then the failure is raised."""
    start_step = step = done = state.start_step  # done: the last step whose update and dot products are complete
    started = time.perf_counter()
    finished = False

    def eval_due(step):
        return step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]

    def evaluate(step):
        result = data.evaluator.evaluate(state.model, device, autocast)
        if master:
            files.record_eval(step, result)
            print(format_eval(step, result), flush=True)

    try:
        # an evaluation due at the checkpoint's step that an exception interrupted (the failure handler wrote
        # the checkpoint after it): the checkpoint holds the model it evaluates, so evaluate it now
        missing_eval = torch.tensor([float(master and start_step > 0 and eval_due(start_step)
                                           and all(e["step"] != start_step for e in files.log["evals"]))],
                                    device=device)
        if world_size > 1:
            dist.all_reduce(missing_eval)
        if missing_eval.item():
            evaluate(start_step)
            if master:
                files.write_log()
        while step < cfg["max_steps"]:
            step += 1
            record, rows = train_step(cfg, state, data, step, rank, world_size, device, autocast)
            done = step  # the update and the step's dot products are complete
            if master:
                artifacts = None if rows is None or "projections" not in rows else grad_store_artifacts(rows, record)
                if rows is not None and "dot_products" not in rows:  # projections only
                    rows = None
                by_domain = None if rows is None else domain_sums(rows["domain"], rows["dot_products"],
                                                                  data.train_reader.domains)
                files.record_step(record, rows, by_domain, artifacts)
                report_progress(step, cfg["max_steps"], record, started, start_step + 1)
            if eval_due(step):
                evaluate(step)
            # every rank must agree to stop at the same step, or the next collective would hang
            stop_now = torch.tensor([float(stop.signum or 0)], device=device)
            if world_size > 1:
                dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)
            if stop_now.item() or step % cfg["checkpoint_interval"] == 0 or step == cfg["max_steps"]:
                bad = save_all(cfg, step, state, files, master)
                if bad:
                    raise diverged(cfg, step, bad, files)
            if stop_now.item():
                stop.signum = stop.signum or int(stop_now.item())  # a signal another rank received
                if master:
                    print(f"Stopped by {signal.Signals(stop.signum).name} after step {step}; checkpoint written. "
                          f"Continue with: ./train.sh --run_name {cfg['run_name']} --resume", flush=True)
                break
        finished = True
    except DivergedWeights:
        raise  # save_all has saved what can be saved
    except Exception as failure:
        save_after_failure(cfg, state, files, master, start_step, done, failure)
        raise
    finally:
        data.batches.close()
        if master:
            files.close(failed=not finished)

    if state.engine is not None:
        state.engine.detach()
    if stop.signum:  # interrupted, not finished: scripts tell the two apart by the exit status (130, 143)
        return 128 + stop.signum
    if master:
        print(f"Done: steps {start_step + 1}..{step} in {time.perf_counter() - started:.1f}s. Results in "
              f"{run_dir_of(cfg)}", flush=True)
    return 0


def train_step(cfg, state, data, step, rank, world_size, device, autocast):
    """One optimizer step: forward and backward of every micro-batch over [training rows; validation rows], the
    engine's gradient and dot products, clipping, the non-finite check on every rank, the update. Returns the
    step's log record and, with GradDotProd, its rows (every rank's, on rank 0)."""
    B, T, A = cfg["batch_size"], cfg["seq_len"], cfg["grad_accum"]
    micro_rows = B // (world_size * A)  # rows of one micro-batch on one rank
    engine, model, optimizer = state.engine, state.model, state.optimizer
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    batch, tokens = data.batches.get(step)  # this rank's B/W rows, read while the previous step trained
    check_token_ids(batch, step, cfg["data_dir"], world_size, device, data.vocab)
    train_loss_sum, val_loss = 0.0, None  # sum over this rank's rows of the row losses (a tensor)
    for micro in range(A):
        rows = slice(micro * micro_rows, (micro + 1) * micro_rows)
        X = tokens[rows].to(device, non_blocking=True)  # [b, T], labels = X
        last_micro = micro == A - 1
        valuing = engine is not None and engine.val_batch_size > 0  # validation rows under the training rows
        # DDP all-reduces the last micro-batch's gradients only; FSDP2 reduce-scatters each micro-batch's
        with nullcontext() if last_micro or world_size == 1 or state.sharded else state.step_model.no_sync():
            X_in = X
            if engine is not None:
                X_in, _ = engine.prepare_forward_input(X, X, loss_multiplier=1.0 / A)  # [b + Bv, T]
            with autocast:
                out = state.step_model(input_ids=X_in, labels=X_in)
            if engine is not None and not engine.loss_checked:  # eager checks by itself; compiled does not
                engine.check_loss(out.loss, out.logits, X_in)
            (out.loss / A).backward()
        micro_loss = out.loss.detach()  # mean CE over every row's seq_len - 1 targets
        if valuing:
            # out.loss also averages the validation rows (the same rows, hence the same loss, in every
            # micro-batch): take their mean out rather than recomputing the training rows' CE
            if micro == 0:
                val_loss = per_sample_loss(out.logits[micro_rows:].detach(), X_in[micro_rows:]).mean()
            Bv = engine.val_batch_size
            micro_loss = (micro_loss * (micro_rows + Bv) - val_loss * Bv) / micro_rows
        train_loss_sum = train_loss_sum + micro_loss.double() * micro_rows
        del out
    if engine is not None:
        engine.prepare_gradients()  # .grad = Regular gradient of the train rows (DDP-averaged)
    if val_loss is not None:
        val_loss = val_loss.item()
    grad_norm = None
    if cfg["grad_clip"] > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        grad_norm = (grad_norm.full_tensor() if state.sharded else grad_norm).item()  # sharded: a DTensor
    result = engine.aggregate_and_log() if engine is not None else None
    nonfinite = (grad_norm is not None and not math.isfinite(grad_norm)) or (result is not None and not all(
        bool(torch.isfinite(t).all()) for t in (result.dot_products, result.projections) if t is not None))

    # every row has T - 1 targets, so the step's loss is the mean of the row losses over all ranks; the third
    # entry makes every rank see a non-finite value any rank saw
    loss_sum = torch.stack([train_loss_sum, torch.tensor(float(B // world_size), dtype=torch.float64, device=device),
                            torch.tensor(float(nonfinite), dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(loss_sum)
    loss = (loss_sum[0] / loss_sum[1]).item()
    if loss_sum[2].item() > 0 or not math.isfinite(loss):
        raise NonFiniteStep(step, loss, grad_norm)  # before the update: steps 1..step-1 are saved

    rows_all = None
    if engine is not None:
        local = local_rows(result, result.weights.double() / (A * world_size), vars(batch))  # [B/W] rows
        rows_all = gather_rows(local, world_size)
        if rows_all is not None and result.val_projection is not None:  # the same on every rank
            rows_all["val_projection"] = result.val_projection.float().cpu().numpy()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_time = time.perf_counter() - t0
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": B * T / step_time,
              "step_time_s": step_time}
    if val_loss is not None:
        record["val_loss"] = val_loss
    if device.type == "cuda":  # the most GPU memory the process's tensors have held so far (rank 0's record)
        record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record, rows_all


def save_all(cfg, step, state, files, master):
    """Dot products and log first: a checkpoint at step s implies they cover steps 1..s. A model or optimizer
    state that is not finite is never checkpointed (the last finite checkpoint stays, and config.json records
    where a resume restarts); returns the names of the non-finite tensors ([] when the checkpoint was written)."""
    if master:
        files.sync()
    bad = nonfinite_state(state.model, state.optimizer)  # the same on every rank (replicas equal, or all-reduced)
    if bad:
        if master:
            files.record_divergence(step, bad)
        return bad
    if state.sharded:  # every rank writes its shards into the directory rank 0 made; rank 0 commits it
        if os.path.isdir(sharded_checkpoint_path(run_dir_of(cfg), step)):
            # complete already: the checkpoint this run resumed from, which no update changed since (a failure in
            # the step after a resume saves its step again); replacing a complete directory is not atomic
            return []
        if master:
            files.prepare_sharded_checkpoint(step)
        dist.barrier()
        save_sharded(state.model, state.optimizer, sharded_checkpoint_path(run_dir_of(cfg), step, partial=True))
        if master:
            files.commit_sharded_checkpoint(step, app_state(step, cfg, dist.get_world_size()))
        dist.barrier()
    elif master:
        files.checkpoint(step, checkpoint_writer(state.model, state.optimizer, step, cfg))
    return []


def diverged(cfg, step, bad, files, cause=None):
    last = (files.last_checkpoint if files is not None else None) or 0
    return DivergedWeights(
        f"{f'{cause}; ' if cause else ''}after step {step} the model's weights or optimizer state are not finite "
        f"({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the run diverged; no checkpoint of "
        f"them was written, the last finite one is step {last}. Continue from it with a lower rate: ./train.sh "
        f"--run_name {cfg['run_name']} --resume --learning_rate LR (the later steps' files are set aside)")


def save_after_failure(cfg, state, files, master, start_step, done, failure):
    """Keep what was complete when `failure` interrupted the loop: its dot products, log and a checkpoint at
    step `done`, as a stop signal would; raises DivergedWeights instead if that state is not finite."""
    if master:
        files.keep_until(done)
    if state.sharded and not isinstance(failure, RunStopped):
        # a failure of one rank (a full disk on rank 0): the others cannot join the collective sharded save
        if master:
            try:
                files.sync()
            except Exception as save_error:
                print(f"train.sh: could not save after the failure: {save_error}", file=sys.stderr, flush=True)
                return
            print(f"train.sh: steps {start_step + 1}..{done} have their dot products and log; continue from the "
                  f"last checkpoint (step {files.last_checkpoint or 0}) with: ./train.sh --run_name "
                  f"{cfg['run_name']} --resume", file=sys.stderr, flush=True)
        return
    try:
        bad = save_all(cfg, done, state, files, master)
        if master and not bad:
            print(f"train.sh: steps {start_step + 1}..{done} are saved (dot products, log, checkpoint); continue "
                  f"with: ./train.sh --run_name {cfg['run_name']} --resume", file=sys.stderr, flush=True)
    except Exception as save_error:  # e.g. the disk is still full: report both, lose nothing more
        print(f"train.sh: could not save after the failure: {save_error}", file=sys.stderr, flush=True)
        return
    if bad:
        raise diverged(cfg, done, bad, files, cause=failure if isinstance(failure, RunStopped) else None) \
            from failure
