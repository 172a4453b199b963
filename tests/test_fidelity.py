"""benchmarks.fidelity: the functional optimizer steps against torch's, the Shapley machinery against
definitions computed another way, first order against exact Shapley where theory says they agree, the
engine's recorded value against a hand-written float64 one, and the command line."""
import csv
import itertools

import pytest
import torch

from benchmarks import fidelity
from benchmarks._functional_optim import (OptimizerSpec, build_torch_optimizer, capture_state, functional_step)
from benchmarks._shapley import exact_shapley, leave_one_out, pearson, permutation_shapley

VOCAB, T = 61, 12


def tiny_model(seed=0):
    return fidelity.build_float64_model(VOCAB, n_layer=2, n_embd=16, n_head=2, seq_len=T, seed=seed)


def rows(n, seed):
    x = torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))
    return x, x.clone()


def token_mean_nll(model, x, y):
    """Mean next-token NLL over the rows' targets, written out with log_softmax (float64)."""
    log_probs = torch.log_softmax(model(input_ids=x).logits[:, :-1], dim=-1)
    targets = y[:, 1:]
    keep = targets != -100
    return -log_probs[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()


# ---------------------------------------------------------------- functional optimizer steps

@pytest.mark.parametrize("kind, steps_before, clip", [
    ("sgd", 0, None), ("sgd", 3, 0.05), ("momentum", 0, None), ("momentum", 3, None), ("momentum", 3, 0.05),
    ("adamw", 0, None), ("adamw", 3, None), ("adamw", 3, 0.05),
])
def test_functional_step_equals_torch_step(kind, steps_before, clip):
    model = tiny_model()
    params = list(model.parameters())
    spec = OptimizerSpec(kind, lr={"sgd": 0.5, "momentum": 0.05, "adamw": 3e-3}[kind], clip=clip)
    optimizer = build_torch_optimizer(spec, params)

    def backward(step):
        optimizer.zero_grad(set_to_none=True)
        token_mean_nll(model, *rows(4, step)).backward()
        return torch.cat([p.grad.flatten() for p in params]).clone()

    for step in range(steps_before):
        backward(step)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
    state = capture_state(spec, optimizer, params)
    theta = torch.cat([p.detach().flatten() for p in params]).clone()
    grad = backward(99)
    if clip is not None:
        assert torch.nn.utils.clip_grad_norm_(params, clip) > clip  # clipping is active in this step
    optimizer.step()
    torch_theta = torch.cat([p.detach().flatten() for p in params])
    ours = functional_step(spec, state, theta, grad)
    assert (ours - theta).abs().max() > 1e-6  # the step moved the parameters
    assert (ours - torch_theta).abs().max() <= 1e-12
    # batched form: row k of [K, P] gradients gives the step of gradient k
    batched = functional_step(spec, state, theta, torch.stack([torch.zeros_like(grad), grad]))
    assert (batched[1] - torch_theta).abs().max() <= 1e-12


def test_through_v_derivative_matches_the_formula():
    """The harness differentiates AdamW's update through v_t with autograd; docs/FIDELITY.md writes it out."""
    model = tiny_model()
    params = list(model.parameters())
    spec = OptimizerSpec("adamw", lr=1e-3)
    optimizer = build_torch_optimizer(spec, params)
    for step in range(3):
        optimizer.zero_grad()
        token_mean_nll(model, *rows(4, step)).backward()
        optimizer.step()
    state = capture_state(spec, optimizer, params)
    theta = torch.cat([p.detach().flatten() for p in params])
    g = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e-2
    cotangent = torch.randn_like(g)
    g_var = g.clone().requires_grad_()
    (vjp,) = torch.autograd.grad(functional_step(spec, state, theta, g_var), g_var, grad_outputs=cotangent)
    (b1, b2), t = spec.betas, state.step + 1
    m = b1 * state.exp_avg + (1 - b1) * g
    v = b2 * state.exp_avg_sq + (1 - b2) * g * g
    s = torch.sqrt(v / (1 - b2 ** t))
    d = s + spec.eps
    jacobian = -(spec.lr / (1 - b1 ** t)) * ((1 - b1) / d - m * (1 - b2) * g / ((1 - b2 ** t) * s * d * d))
    expected = jacobian * cotangent
    # the formula's two terms nearly cancel in some elements: compare at the scale of the whole vector
    assert (vjp - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert (jacobian - jacobian.mean()).abs().max() > 1e-3 * jacobian.abs().max()  # v_t varies per element


# ---------------------------------------------------------------- Shapley machinery

def table_game(table):
    """A game given by its value on every coalition: table[k] for the coalition with the bits of k."""
    def value(masks):
        index = (masks.long() << torch.arange(masks.shape[1])).sum(1)
        return table[index]
    return value


def vector_sum_game(x):
    """U(S) = f(sum_{j in S} x_j) for a smooth nonlinear f; x [n, d]."""
    def value(masks):
        s = masks.to(torch.float64) @ x
        return torch.tanh(s[:, 0]) + s[:, 1] ** 2 - 0.3 * s[:, 0] * s[:, 2] ** 3
    return value


def test_exact_shapley_efficiency_symmetry_null_player():
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[4] = x[1]  # players 1 and 4 are interchangeable
    x[5] = 0.0  # player 5 never changes the value
    value = vector_sum_game(x)
    phi, values = exact_shapley(value, 6)
    everyone, nobody = value(torch.ones(1, 6, dtype=torch.bool)), value(torch.zeros(1, 6, dtype=torch.bool))
    assert float(phi.sum()) == pytest.approx(float(everyone - nobody), abs=1e-12)
    assert float(phi[1]) == pytest.approx(float(phi[4]), abs=1e-12)
    assert float(phi[5]) == pytest.approx(0.0, abs=1e-12)
    assert (phi - phi.mean()).abs().max() > 1e-3  # not a uniform split
    assert values[0] == nobody and values[-1] == everyone


def test_exact_shapley_equals_the_permutation_definition_on_three_players():
    table = torch.tensor([0.0, 1.0, 2.0, 4.5, -1.0, 0.5, 3.0, 7.0], dtype=torch.float64)
    by_definition = torch.zeros(3, dtype=torch.float64)
    for order in itertools.permutations(range(3)):
        coalition = 0
        for player in order:
            by_definition[player] += table[coalition | (1 << player)] - table[coalition]
            coalition |= 1 << player
    by_definition /= 6
    phi, _ = exact_shapley(table_game(table), 3)
    torch.testing.assert_close(phi, by_definition, rtol=0, atol=1e-14)
    torch.testing.assert_close(leave_one_out(table_game(table), 3), table[7] - table[[6, 5, 3]], rtol=0, atol=0)


def test_permutation_sampling_converges_within_its_standard_errors():
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    value = vector_sum_game(x)
    exact, _ = exact_shapley(value, 7)
    sampled, stderr = permutation_shapley(value, 7, 3000, torch.Generator().manual_seed(3))
    assert (stderr > 0).all()
    assert ((sampled - exact).abs() <= 4 * stderr).all()
    few, few_stderr = permutation_shapley(value, 7, 50, torch.Generator().manual_seed(3))
    assert few_stderr.mean() > 5 * stderr.mean()  # the error shrinks like 1/sqrt(permutations)
    # every sampled order adds up to U(N) - U(empty): the means satisfy efficiency exactly
    assert float(sampled.sum()) == pytest.approx(float(value(torch.ones(1, 7, dtype=torch.bool))
                                                       - value(torch.zeros(1, 7, dtype=torch.bool))), abs=1e-12)


# ---------------------------------------------------------------- the step game

def test_first_order_matches_exact_shapley_under_small_sgd():
    """With plain SGD and a tiny learning rate the game is linear in the subset gradient, so its exact
    Shapley values (from optimizer steps and validation losses) equal eta * w_i * <g_i, g_val>."""
    cfg = fidelity.HarnessConfig(vocab_size=VOCAB, n_embd=16, n_head=2, seq_len=T, batch_size=6, val_batch_size=2,
                                 steps=(3,), batches_per_step=1, domains=2)
    data = fidelity.MarkovDomains(cfg.vocab_size, cfg.domains, cfg.seed)
    (result,) = fidelity.train_and_value(OptimizerSpec("sgd", lr=1e-4), cfg, data, log=lambda *a: None)
    first = result.estimates["first_order"]
    assert pearson(first, result.shapley) > 0.999
    assert float(first @ result.shapley / (result.shapley @ result.shapley)) == pytest.approx(1.0, abs=1e-2)
    assert abs(result.checks["efficiency_residual"]) < 1e-15
    assert result.checks["step_max_abs_err"] <= 1e-12


def test_engine_and_dense_first_order_equal_a_hand_written_reference():
    model = tiny_model(seed=1)
    x, y = rows(5, 10)
    y[1, 7:] = -100  # unequal target counts: unequal weights
    y[3, :4] = -100
    x_val, y_val = rows(2, 11)
    lr = 0.01
    params = list(model.parameters())

    def flat_grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    val_grad = flat_grad(token_mean_nll(model, x_val, y_val))
    counts = (y[:, 1:] != -100).sum(1).double()
    weights = counts / counts.sum()
    reference = torch.stack([lr * weights[i] * (flat_grad(token_mean_nll(model, x[i:i + 1], y[i:i + 1])) @ val_grad)
                             for i in range(5)])

    recorded = fidelity.engine_first_order(model, lr, x, y, x_val, y_val)
    torch.testing.assert_close(recorded, reference, rtol=1e-10, atol=0)
    fm = fidelity.FlatModel(model)
    theta = fm.theta()
    dense = lr * fidelity.sample_weights(y) * (fm.per_sample_grads(theta, x, y) @ fm.grad(theta, x_val, y_val))
    torch.testing.assert_close(dense, reference, rtol=1e-10, atol=0)
    assert all(p.grad is None for p in params)  # the engine ran on a copy


# ---------------------------------------------------------------- command line

def test_quick_run_writes_the_table(tmp_path, capsys):
    assert fidelity.main(["--quick", "--threads", "1", "--optimizers", "sgd,adamw", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "fidelity.csv") as handle:
        table = list(csv.DictReader(handle))
    configs = {(r["optimizer"], r["step"]) for r in table}
    assert configs == {("sgd", "2"), ("sgd", "6"), ("adamw", "2"), ("adamw", "6")}
    assert {r["estimator"] for r in table if r["optimizer"] == "adamw"} == set(fidelity.ESTIMATORS) | {"loo"}
    for r in table:
        assert abs(float(r["efficiency_residual"])) < 1e-12
        assert float(r["step_max_abs_err"]) <= 1e-12
        assert float(r["engine_rel_err"]) < 1e-10
        assert -1 <= float(r["pearson_shapley"]) <= 1
    out = capsys.readouterr().out
    assert "Best estimator against exact Shapley" in out


def test_quick_planted_run_ranks_the_planted_window(tmp_path):
    assert fidelity.main(["--planted", "--quick", "--steps", "2,3", "--threads", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "planted.csv") as handle:
        table = list(csv.DictReader(handle))
    assert {r["step"] for r in table} == {"2", "3"}
    assert {r["estimator"] for r in table} >= {"shapley", "loo", "first_order", "cosine"}
    for r in table:
        assert 1 <= int(r["rank_in_batch"]) <= int(r["batch_size"])
    with open(tmp_path / "planted_values.csv") as handle:
        values = list(csv.DictReader(handle))
    assert sum(r["planted"] == "True" for r in values) == 2
    assert all(int(r["passage_tokens"]) > 0 for r in values if r["planted"] == "True")


@pytest.mark.parametrize("argv", [
    ["--bogus"],
    ["--adamw-lr", "1e-3"],  # abbreviations are refused
    ["--steps", "0"],
    ["--optimizers", "adam"],
    ["--sgd-lrs", "-1"],
    ["--n-embd", "30", "--n-head", "4"],
    ["--batch-size", "1"],
    ["--planted", "--permutations", "10"],
    ["--planted", "--batch-size", "12"],
])
def test_bad_flags_exit_2(argv, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        fidelity.main(argv + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()
