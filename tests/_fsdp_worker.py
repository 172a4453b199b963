"""One rank of the FSDP2 check (tests/test_engine_fsdp.py): `torchrun --nproc_per_node 2 _fsdp_worker.py CASES.json`,
each case [MODEL, RESHARD, MICRO_BATCHES, OUT.json, fsdp|hsdp, (reattach|leaves|app|adamw)...], all in one launch. In
each, every rank trains on its own rows of one global
batch through a fully_shard-ed model with the engine attached; rank 0 compares the gathered dot products and the
full .grad with the float64 torch.func reference of the unsharded model on the whole batch. `reattach`: a step
first (no update), then engine.detach() and attach() again, so that the measured step runs on hooks put back
after a detach (FSDP2 keeps the same unsharded parameter objects from step to step). `leaves`: fully_shard also on
the layers accelerate's FSDP2 plugin shards on their own (the input embedding, and the final norm with the output
layer, and with the embedding when they are tied), whose classes FSDP then changes. `app`: the units of the
training app's --fsdp (GradDotProd_LM.training.fsdp_units). `adamw`: value="adamw" under
AdamW, measured at the second step (a first step gives v its values); the reference takes D from the optimizer's
state gathered whole, and the reference model the weights after the first step."""
import copy
import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from _leave import leave_together
from _models import lm_batch, tiny_gpt2, tiny_llama
from _reference import (adamw_sensitivity, reference_adamw_values, reference_dot_products, reference_grads,
                        reference_train_grad)
from ghost_engine import GradDotProdEngine

ROWS_PER_RANK, T = 2, 12


def build(model_name):
    """gpt2 (tied), llama (untied), or FAMILY-tied / FAMILY-untied of tests/test_engine_families.py."""
    if model_name in ("gpt2", "llama"):
        return tiny_gpt2() if model_name == "gpt2" else tiny_llama()
    from test_engine_families import FAMILIES

    family, tie = model_name.rsplit("-", 1)
    return FAMILIES[family](tie == "tied").eval()  # no dropout (OPT has 0.1)


def whole_sensitivity(model, optimizer):
    """adamw's reference D from the sharded optimizer's state, every tensor gathered whole (collective)."""
    named, groups, state = {}, [], {}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            whole = p.full_tensor()
            named[next(n for n, q in model.named_parameters() if q is p)] = whole
            state[whole] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                            for k, v in optimizer.state[p].items()}
            params.append(whole)
        groups.append(dict(group, params=params))
    return adamw_sensitivity(SimpleNamespace(param_groups=groups, state=state), named)


def main(cases_path):
    """Every case of the JSON list at `cases_path` ([model, reshard, micro_batches, out.json, mesh, *flags] each),
    one after the other in this one process group."""
    dist.init_process_group("gloo")
    with open(cases_path) as f:
        cases = json.load(f)
    for model_name, reshard, micro_batches, out_path, mesh_kind, *flags in cases:
        check(model_name, reshard == "reshard", micro_batches, out_path, mesh_kind, *flags)
    leave_together()


def check(model_name, reshard, micro_batches, out_path, mesh_kind="fsdp", *flags):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build(model_name)
    reference = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(1)
    X, Y = lm_batch(ROWS_PER_RANK * world, T, g)
    Xv, Yv = lm_batch(2, T, g)
    # fsdp: parameters Shard(0) over the ranks; hsdp: (Replicate, Shard(0)) on a [world replicas, 1 shard] mesh
    mesh = (init_device_mesh("cpu", (world,)) if mesh_kind == "fsdp"
            else init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")))
    blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))  # the transformer blocks
    if "app" in flags:  # the training app's units (GradDotProd_LM.training.fsdp_units, ./train.sh --fsdp)
        from GradDotProd_LM.training import fsdp_units

        for unit, unit_reshard in fsdp_units(model):
            fully_shard(unit, mesh=mesh, reshard_after_forward=unit_reshard and reshard)
        blocks = []
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    if "leaves" in flags:  # as accelerate's fsdp2_prepare_model
        embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
        final_norm = next(m for name, m in model.named_modules() if name.endswith("norm") and "layers" not in name)
        tied = embedding.weight is output.weight
        if not tied:
            fully_shard(embedding, mesh=mesh, reshard_after_forward=reshard)
        fully_shard([final_norm, embedding, output] if tied else [final_norm, output], mesh=mesh,
                    reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)

    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    if "adamw" in flags:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine = GradDotProdEngine(model, val_batch=(Xv, Yv), value="adamw").attach(optimizer)
        Xc, Yc = engine.prepare_forward_input(X[mine], Y[mine])
        model(input_ids=Xc, labels=Yc).loss.backward()
        engine.prepare_gradients()
        engine.aggregate_and_log()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reference.load_state_dict({k: v.full_tensor().double() for k, v in model.state_dict().items()})
        sensitivity = whole_sensitivity(model, optimizer)
    else:
        projection = dict(dim=3, seed=1) if "project" in flags else None
        engine = GradDotProdEngine(model, val_batch=(Xv, Yv), projection=projection).attach()
    if "reattach" in flags:
        Xc, Yc = engine.prepare_forward_input(X[mine], Y[mine])
        model(input_ids=Xc, labels=Yc).loss.backward()
        engine.prepare_gradients()
        engine.aggregate_and_log()
        model.zero_grad(set_to_none=True)
        engine.detach()
        engine.attach()
    for Xm, Ym in zip(X[mine].chunk(micro_batches), Y[mine].chunk(micro_batches)):
        Xc, Yc = engine.prepare_forward_input(Xm, Ym, loss_multiplier=1.0 / micro_batches)
        (model(input_ids=Xc, labels=Yc).loss / micro_batches).backward()
    engine.prepare_gradients()
    result = engine.aggregate_and_log()
    dots = result.dot_products
    gathered = [torch.empty_like(dots) for _ in range(world)]
    dist.all_gather(gathered, dots)
    if "project" in flags:  # each rank's rows' projections, and the validation gradient's (the same on every rank)
        projected = [torch.empty_like(result.projections) for _ in range(world)]
        dist.all_gather(projected, result.projections.contiguous())
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # collective
    whole = sensitivity if "adamw" in flags else None
    if rank == 0:
        ref_dots = sum((reference_adamw_values(reference, X, Y, Xv, Yv, whole) if whole is not None
                        else reference_dot_products(reference, X, Y, Xv, Yv)).values())
        ref_grads = reference_train_grad(reference, X, Y)
        got = torch.cat(gathered).double()
        scale = max(float(r.abs().max()) for r in ref_grads.values())
        report = {"dots": float((got - ref_dots).abs().max() / ref_dots.abs().max()),
                  "grads": {name: float((grads[name].double() - r).abs().max() / max(float(r.abs().max()),
                                                                                     1e-6 * scale))
                            for name, r in ref_grads.items()},
                  "sharded": [name for name, p in model.named_parameters() if type(p).__name__ == "DTensor"],
                  "sharded_leaves": sorted(name for name, m in model.named_modules()
                                           if isinstance(m, FSDPModule) and not list(m.children())),
                  "placements": sorted({str(p.placements) for p in model.parameters()})}
        if "project" in flags:  # against the dense (Kronecker) projection of float64 per-sample gradients
            from test_engine_projection import dense_projection

            per_sample, val_grad = reference_grads(reference, X, Y, Xv, Yv)
            want, want_val = (dense_projection(engine.projection, g, rows) for g, rows in ((per_sample, True),
                                                                                          (val_grad, False)))
            got_rows = torch.cat(projected).double()
            report["projections"] = float((got_rows - want).norm() / want.norm())
            report["val_projection"] = float((result.val_projection.double() - want_val).norm() / want_val.norm())
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
