"""One optimizer step's rows of a dot-product file (schema in ghost_results.results_io): this process's rows
as plain numpy, then every process's rows gathered on rank 0. Used by the training app and the integrations."""
import numpy as np
import torch
import torch.distributed as dist


def local_rows(result, batch_weights, provenance) -> dict:
    """This process's rows of a step record.

    result: the engine's DotProductResult of the step; batch_weights: [B] each row's weight in the step's
    loss (the whole step over every process); provenance: {"domain": B str, "token_offset", "doc_id",
    "sample_index": B ints}, rows in the order the engine saw them.
    """
    rows = {
        "batch_weights": torch.as_tensor(batch_weights).float().cpu().numpy(),
        "token_counts": result.token_counts.long().cpu().numpy(),
        "domain": [str(d) for d in provenance["domain"]],
        "token_offset": np.asarray(provenance["token_offset"], dtype=np.int64),
        "doc_id": np.asarray(provenance["doc_id"], dtype=np.int64),
        "sample_index": np.asarray(provenance["sample_index"], dtype=np.int64),
    }
    if result.dot_products is not None:  # None: an engine that keeps projections only
        per_parameter = torch.stack(list(result.per_parameter.values())).float().cpu().numpy()  # one copy to host
        rows["dot_products"] = result.dot_products.float().cpu().numpy()  # [B], rows in batch order
        rows["per_layer"] = dict(zip(result.per_parameter, per_parameter))
    if result.projections is not None:  # [B, K] Π(grad l_i)
        rows["projections"] = result.projections.float().cpu().numpy()
    if result.first_order is not None:  # a deferred estimator: <grad l_i, grad L_val> of the same rows too
        rows["first_order_dot_products"] = result.first_order.float().cpu().numpy()
    return rows


def gather_rows(local, world_size):
    """Concatenate every rank's per-row dict on rank 0 (None on the other ranks), ordered by sample_index.
    Every rank must call it (a collective when world_size > 1)."""
    parts = [local]
    if world_size > 1:
        parts = [None] * world_size if dist.get_rank() == 0 else None
        dist.gather_object(local, parts, dst=0)
        if dist.get_rank() != 0:
            return None
    merged = {}
    for key in local:
        if key == "per_layer":
            merged[key] = {name: np.concatenate([p[key][name] for p in parts]) for name in local[key]}
        elif key == "domain":
            merged[key] = [d for p in parts for d in p[key]]
        else:
            merged[key] = np.concatenate([p[key] for p in parts])
    order = np.argsort(merged["sample_index"], kind="stable")
    for key, value in merged.items():
        if key == "per_layer":
            merged[key] = {name: v[order] for name, v in value.items()}
        elif key == "domain":
            merged[key] = [value[i] for i in order]
        else:
            merged[key] = value[order]
    return merged
