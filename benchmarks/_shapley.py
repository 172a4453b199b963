"""Shapley values of a cooperative game, leave-one-out, and rank statistics.

A game is a function `value(masks) -> Tensor [K]` of coalition masks (bool [K, n], row k marks the
players in coalition k), so that many coalitions are evaluated in one call.

    Shapley:  phi_i = sum_{S not containing i} |S|! (n - |S| - 1)! / n! * (U(S + i) - U(S))
    leave-one-out:  U(N) - U(N - i)

`exact_shapley` enumerates all 2^n coalitions (n <= 20); `permutation_shapley` averages the marginal
contributions of each player over random orders and gives the standard error of each mean.
"""
from __future__ import annotations

import math

import torch

MAX_EXACT_PLAYERS = 20


def all_coalitions(n: int) -> torch.Tensor:
    """bool [2^n, n]: row k holds the bits of k (player j is in coalition k iff bit j of k is set)."""
    index = torch.arange(2 ** n).unsqueeze(1)
    return (index >> torch.arange(n)) & 1 == 1


def exact_shapley(value, n: int) -> tuple:
    """(phi [n], values [2^n]) by enumeration; values[k] is U of the coalition with the bits of k."""
    if not 1 <= n <= MAX_EXACT_PLAYERS:
        raise ValueError(f"exact Shapley enumerates 2^n coalitions; n={n} must be in 1..{MAX_EXACT_PLAYERS}")
    values = value(all_coalitions(n)).to(torch.float64)
    index = torch.arange(2 ** n)
    size = all_coalitions(n).sum(1)
    # weight of a coalition S (not containing i) of each size s: s! (n - s - 1)! / n!
    weight = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)],
                          dtype=torch.float64)
    phi = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        without = index[(index >> i) & 1 == 0]
        phi[i] = (weight[size[without]] * (values[without | (1 << i)] - values[without])).sum()
    return phi, values


def permutation_shapley(value, n: int, permutations: int, generator: torch.Generator, chunk: int = 64) -> tuple:
    """(phi [n], standard error [n]): mean marginal contribution over `permutations` random orders."""
    if permutations < 2:
        raise ValueError(f"permutations={permutations}: at least 2 are needed for a standard error")
    marginals = torch.empty(permutations, n, dtype=torch.float64)
    for start in range(0, permutations, chunk):
        orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(min(chunk, permutations - start))])
        # prefixes of each order: coalition k holds the first k players (k = 0..n)
        rank = torch.empty_like(orders)
        rank.scatter_(1, orders, torch.arange(n).expand_as(orders))
        masks = rank.unsqueeze(1) < torch.arange(n + 1).view(1, -1, 1)  # [m, n + 1, n]
        values = value(masks.reshape(-1, n)).to(torch.float64).view(len(orders), n + 1)
        gains = values[:, 1:] - values[:, :-1]  # gain of the player at each position
        marginals[start:start + len(orders)] = torch.empty_like(gains).scatter_(1, orders, gains)
    return marginals.mean(0), marginals.std(0) / math.sqrt(permutations)


def leave_one_out(value, n: int) -> torch.Tensor:
    """U(N) - U(N - i) for each player i: float64 [n]."""
    masks = torch.ones(n + 1, n, dtype=torch.bool)
    masks[torch.arange(n), torch.arange(n)] = False  # row i leaves out i; the last row is N
    values = value(masks).to(torch.float64)
    return values[-1] - values[:-1]


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1 = smallest), ties sharing the mean of their positions: float64, same shape."""
    x = x.to(torch.float64)
    order = torch.argsort(x)
    sorted_x = x[order]
    position = torch.arange(1, len(x) + 1, dtype=torch.float64)
    # group equal values; each group gets the mean position
    new_group = torch.ones(len(x), dtype=torch.bool)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(new_group, 0) - 1
    mean_position = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, position)
    mean_position /= torch.bincount(group).to(torch.float64)
    out = torch.empty_like(position)
    out[order] = mean_position[group]
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.to(torch.float64) - x.double().mean(), y.to(torch.float64) - y.double().mean()
    denominator = float(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))
    return float(x @ y) / denominator if denominator > 0 else math.nan


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(ranks(x), ranks(y))


def rank_descending(values: torch.Tensor, index: int) -> int:
    """1 + how many entries are strictly larger than values[index] (1 = the largest)."""
    return int((values > values[index]).sum()) + 1
