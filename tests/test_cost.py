"""The engine's counted flops sit between the analytic floor and the floor plus forming G_val."""
import torch

from _models import lm_batch, tiny_gpt2
from ghost_engine import GradDotProdEngine
from ghost_engine.cost import analytic_floor_ratio, count_step_flops, linear_shapes


def test_engine_flops_are_the_floor_plus_the_validation_gradient():
    g = torch.Generator().manual_seed(0)
    model = tiny_gpt2(n_embd=64, n_layer=2, n_positions=64)
    B, Bv, T = 4, 1, 64
    X, Y = lm_batch(B, T, g)
    Xv, Yv = lm_batch(Bv, T, g)

    regular_flops = count_step_flops(lambda: model(input_ids=X, labels=Y).loss.backward())
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()

    def ghost_step():
        Xc, Yc = engine.prepare_forward_input(X, Y)
        model(input_ids=Xc, labels=Yc).loss.backward()
        engine.prepare_gradients()

    ghost_flops = count_step_flops(ghost_step)
    floor = analytic_floor_ratio(model, B, Bv, T, regular_flops)
    val_grad_flops = sum(2.0 * Bv * T * d * p for d, p in linear_shapes(model))
    # tied wte/lm_head: lm_head's per-sample gradients against the embedding's validation rows,
    # at most one row per validation token: 2·N·Nv·d
    tie_flops = 2.0 * (B * T) * (Bv * T) * model.config.n_embd
    ratio = ghost_flops / regular_flops
    assert floor <= ratio, (ratio, floor)  # no exact engine can do less
    # beyond the floor the engine forms G_val once per linear layer, the tie's cross term, and the
    # per-row reductions of the dot products (batched matrix-vector products, under 1%)
    assert ratio <= floor + (val_grad_flops + tie_flops) / regular_flops + 0.01, (ratio, floor)
