"""What a step's backward passes leave, and how it is handed out: DotProductResult and the path report.

Owns: the result of one micro-batch (MicroBatchResult: its scaled per-parameter dot products and what a
deferred estimator kept), their assembly into a step's DotProductResult, and the per-layer path report.
Must not touch: the model, its hooks, the optimizer; nothing here runs a forward or a backward.
"""
from dataclasses import dataclass, field

import torch

from ghost_engine.values import ADAMW, COSINE, FIRST_ORDER


@dataclass
class DotProductResult:
    """Per-sample values of one optimizer step (all micro-batches since the last aggregate, in order).

    ``value`` names the estimator the numbers are (docs/METHOD.md section 2.1):
    - "first_order": dot_products[i] = <grad l_i, grad L_val>;
    - "second_order": <grad l_i, lr ⊙ (grad L_val - 1/2 H_val (lr ⊙ g_B))>, the Shapley value of the plain
      gradient step's game expanded to second order (g_B the step's batch gradient, H_val the validation
      Hessian);
    - "adamw": <D ⊙ grad L_val, grad l_i>, D the derivative of AdamW's update with respect to the gradient
      with the second moment held at v_{t-1};
    - "adamw_vt": <S(g_B) ⊙ grad L_val, grad l_i>, S = -dθ_{t+1}/dg the derivative of AdamW's actual update
      at g_B (through v_t as well);
    - "midpoint": <S(g_B/2) ⊙ grad L_val(θ_{t+1}(g_B/2)), grad l_i>, the optimizer's (SGD or Adam/AdamW)
      game differentiated at half the batch gradient (exact for a quadratic game);
    for all four the learning rate is inside: phi_i = w_i · dot_products[i];
    - "cosine": <grad l_i, grad L_val> / (||grad l_i|| · ||grad L_val||); ``grad_norms`` and
      ``val_grad_norm`` hold the two norms.
    ``per_parameter`` splits the same number over the parameters (it sums to ``dot_products``; for
    "cosine" each parameter's dot product is divided by the two total norms).
    """

    dot_products: torch.Tensor  # [B_train] total over all hooked parameters (None: projections only, no validation rows)
    per_parameter: dict  # {parameter name: Tensor [B_train]}
    token_counts: torch.Tensor  # [B_train] targets n_i of each sample
    weights: torch.Tensor  # [B_train] n_i / N_train of the sample's micro-batch (its weight in that batch loss)
    excluded_parameters: list = field(default_factory=list)
    micro_batches: int = 1
    value: str = FIRST_ORDER
    grad_norms: torch.Tensor = None  # cosine: [B_train] ||grad l_i|| over the hooked parameters
    val_grad_norm: torch.Tensor = None  # cosine: 0-dim, ||grad L_val|| over the hooked parameters
    first_order: torch.Tensor = None  # second_order, adamw_vt, midpoint: [B_train] <grad l_i, grad L_val> of the
    #   same rows, which their taps compute anyway (phi_i = lr·w_i·first_order[i])
    projections: torch.Tensor = None  # engine built with projection=: [B_train, K] Π(grad l_i) (ghost_engine.projection)
    val_projection: torch.Tensor = None  # and with a validation batch: [K] Π of what the dot products are taken
    #   against, so that <Π_i, Π_val> ≈ dot_products[i]: Π(grad L_val), under value="adamw" Π(D ⊙ grad L_val)
    #   (cosine and the deferred estimators: Π(grad L_val))


@dataclass(eq=False)
class MicroBatchResult:
    """One micro-batch once its backward ran (MicroBatch.finish)."""

    counts: torch.Tensor  # [B] n_i
    n_train_targets: int
    seen: dict  # layer name -> (training, validation) input shapes
    deferred: list  # DEFERRED: (layer, act_tr, grad_tr, act_v, grad_v) per tap
    val_grads: dict  # DEFERRED: parameter name -> grad L_val
    autocast: tuple  # DEFERRED: (device type, dtype) of the forward's autocast, or None
    norm_scale: torch.Tensor  # cosine, DEFERRED: [B] 1 / (c·n_i)
    per_param: torch.Tensor = None  # [P, B] per-parameter dot products (scaled by scale())
    weights: torch.Tensor = None  # [B] n_i / N_train
    norms: tuple = None  # cosine: ([B] ||grad l_i||, 0-dim ||grad L_val||)
    projections: torch.Tensor = None  # projecting: [B, K] Π(grad l_i)
    val_projection: torch.Tensor = None  # projecting with validation rows: [K] Π(grad L_val) (adamw: Π(D ⊙ grad L_val))

    def scale(self, raw, dot_scale, raw_norms, val_norm_scale, cosine: bool):
        """The dot products from the sinks' raw gradients (raw [P, B]; cosine: raw_norms [P, B + 1], the raw
        ||G_i||² and, last column, ||G_val||²)."""
        dtype = dot_scale.dtype
        self.weights = self.counts.to(dtype) / self.n_train_targets
        per_param = raw.to(dtype) * dot_scale  # [P, B] per-parameter dots
        if cosine:
            grad_norms = raw_norms[:, :-1].sum(0).clamp(min=0).sqrt() * self.norm_scale  # ||grad l_i||
            val_norm = raw_norms[:, -1].sum().clamp(min=0).sqrt() * val_norm_scale  # ||grad L_val||
            denom = grad_norms * val_norm
            per_param = torch.where(denom > 0, per_param / torch.where(denom > 0, denom, 1.0), 0.0)
            self.norms = (grad_norms, val_norm)
        self.per_param = per_param


def assemble(finished: list, hooked_params: list, excluded_parameters: list, value: str,
             deferred_dots=None) -> DotProductResult:
    """The step's DotProductResult from its MicroBatchResults, in order; deferred_dots: a DEFERRED estimator's
    [P, B_step] values (the taps' own dot products are then its ``first_order``). Without validation rows
    (projections only) its dot products are None."""
    extra = {}
    if finished[0].projections is not None:  # Π(grad L_val) is the same for every micro-batch: the first one's
        extra = dict(projections=torch.cat([f.projections for f in finished]),
                     val_projection=finished[0].val_projection)
    if finished[0].per_param is None:
        return DotProductResult(dot_products=None, per_parameter={}, token_counts=torch.cat([f.counts for f in finished]),
                                weights=torch.cat([f.counts / f.n_train_targets for f in finished]),
                                excluded_parameters=list(excluded_parameters), micro_batches=len(finished),
                                value=value, **extra)
    per_param = torch.cat([f.per_param for f in finished], dim=1)  # [P, B_step]
    if deferred_dots is not None:  # the taps' first-order dot products come for free
        extra["first_order"] = per_param.sum(0)
        per_param = deferred_dots
    if value == COSINE:  # ||grad L_val|| is the same for every micro-batch: the first one's
        extra = dict(extra, grad_norms=torch.cat([f.norms[0] for f in finished]), val_grad_norm=finished[0].norms[1])
    return DotProductResult(dot_products=per_param.sum(0), per_parameter=dict(zip(hooked_params, per_param.unbind(0))),
                            token_counts=torch.cat([f.counts for f in finished]),
                            weights=torch.cat([f.weights for f in finished]),
                            excluded_parameters=list(excluded_parameters), micro_batches=len(finished),
                            value=value, **extra)


def path_report(layers: list, shapes: dict, value: str) -> list:
    """Per hooked layer: name, type, exact path used in the last step and its extra flops (shapes: layer name ->
    its last (training, validation) input shapes)."""
    rows = []
    for layer in layers:
        path = None
        if layer.name in shapes:
            act_tr, act_v = (torch.empty(shape, device="meta") for shape in shapes[layer.name])
            own_only = not any(layer.tied.values()) and value != ADAMW  # D ⊙ G_val: no Gram path
            path = layer.rule.path(layer.module, act_tr, act_v, own_only)
        rows.append({"layer": layer.name, "type": type(layer.module).__name__,
                     "parameters": sorted(layer.params.values()),
                     "tied": any(layer.tied.values()),
                     "path": path.path if path else "not run",
                     "flops": path.flops if path else 0.0})
    return rows


def format_path_report(rows: list) -> str:
    width = max(len(r["layer"]) for r in rows)
    kind = max([4] + [len(r["type"]) for r in rows])
    lines = [f"{'layer':<{width}}  {'type':<{kind}} {'path':<10} {'GFLOP':>9}  tied"]
    for r in rows:
        lines.append(f"{r['layer']:<{width}}  {r['type']:<{kind}} {r['path']:<10} {r['flops'] / 1e9:>9.3f}  "
                     f"{'yes' if r['tied'] else ''}")
    return "\n".join(lines)
