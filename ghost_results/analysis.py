"""In-Run Data Shapley from a run's stored dot products: values, ranking, domains.

Everything works on pandas DataFrames as returned by
`ghost_results.results_io.load_run`, and on plain column dicts (name -> 1-D
numpy array, one entry per row) as in `read_run(...).columns` / `load_dotprods`:
given a DataFrame, a function returns a DataFrame where it would return a
column dict, and a Series (on the frame's index) where it would return a
per-row array.

Sign convention: dot_i = <grad l_i, grad L_val>. An SGD step on sample i moves
the validation loss by about -lr * w_i * dot_i, so a positive value means the
sample lowered the validation loss.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ghost_results.results_io import FIRST_ORDER_COLUMN, LR_INSIDE, VALUES  # what a run's dot products hold

CONVENTIONS = ("first_order", "raw", "step_normalised")

# Key columns: a "sample" is one training window, the same (domain, token_offset)
# seen at several steps sums; a "document" is (domain, doc_id).
SAMPLE_KEY = ("domain", "token_offset")
DOCUMENT_KEY = ("domain", "doc_id")


def _like(columns, table: dict):
    """`table` as a DataFrame if the input `columns` was one, else as it is."""
    return pd.DataFrame(table) if isinstance(columns, pd.DataFrame) else table


def _per_row(columns, values: np.ndarray):
    """Per-row `values` as a Series on the frame's index if `columns` is a DataFrame, else as they are."""
    return pd.Series(values, index=columns.index) if isinstance(columns, pd.DataFrame) else values


def compute_values(columns, convention: str = "first_order", value: str | None = None,
                   dots: str = "dot_products"):
    """Per-row (per occurrence) value, float64 [rows]. `value` is the estimator the run's dot products hold
    (`Run.value`, the files' "value"; None: a DataFrame's `attrs["config"]["value"]`, else first_order):
    first_order <grad l_i, grad L_val>; second_order, adamw, adamw_vt and midpoint <grad l_i, u> with the
    learning rate inside u (docs/METHOD.md section 2.1); cosine a cosine. `dots`: the column valued,
    "dot_products", or "first_order_dot_products", the first-order dot products that a second_order,
    adamw_vt or midpoint run records beside its own (valued as first_order; NaN in rows without them).

    first_order:     lr_t * w_i * dot_i   (In-Run Data Shapley of the step); w_i * dot_i for the estimators
                     with the learning rate inside; not defined for cosine (use raw)
    raw:             dot_i
    step_normalised: dot_i / sum_j |dot_j| over the rows of the same step, so
                     every step weighs the same whatever its learning rate or
                     gradient scale.
    """
    if dots == FIRST_ORDER_COLUMN:
        if value not in (None, "first_order"):
            raise ValueError(f"dots={dots!r} holds first-order dot products, not {value!r} ones")
        value = "first_order"
    elif dots != "dot_products":
        raise ValueError(f"dots={dots!r}: one of 'dot_products', {FIRST_ORDER_COLUMN!r}")
    if value is None:
        config = columns.attrs.get("config", {}) if isinstance(columns, pd.DataFrame) else {}
        value = config.get("value", "first_order")
    if value not in VALUES:
        raise ValueError(f"unknown estimator {value!r}; one of {VALUES}")
    if dots not in columns:
        raise ValueError(f"no {dots!r} column: only runs of the second_order, adamw_vt and midpoint estimators "
                         "record first-order dot products beside their own")
    dots = np.asarray(columns[dots], dtype=np.float64)
    if convention == "first_order":
        if value == "cosine":
            raise ValueError("a cosine run has no first-order value: use convention 'raw' (the cosines) or "
                             "'step_normalised'")
        weight = np.asarray(columns["batch_weight"], np.float64)
        lr = 1.0 if value in LR_INSIDE else np.asarray(columns["lr"], dtype=np.float64)
        return _per_row(columns, lr * weight * dots)
    if convention == "raw":
        return _per_row(columns, dots)
    if convention == "step_normalised":
        _, step_of_row = np.unique(np.asarray(columns["step"]), return_inverse=True)
        abs_sum = np.bincount(step_of_row, weights=np.abs(dots))
        scale = abs_sum[step_of_row]
        return _per_row(columns, np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0))
    raise ValueError(f"unknown value convention {convention!r}; choose one of {CONVENTIONS}")


def _group_index(columns: dict, key: tuple):
    """(group id per row [rows], first row of every group [groups])."""
    if len(columns["step"]) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    domain_codes = np.unique(np.asarray(columns[key[0]]), return_inverse=True)[1]
    key_matrix = np.stack([domain_codes, np.asarray(columns[key[1]], dtype=np.int64)], axis=1)
    _, first_row, group_of_row = np.unique(key_matrix, axis=0, return_index=True, return_inverse=True)
    return group_of_row.reshape(-1), first_row


def aggregate(columns, values, by: str = "sample"):
    """Sum per-row values per training sample or per document.

    Returns columns, one entry per group, in key order: the key columns, "value"
    (sum over occurrences), "occurrences", "first_step", "last_step",
    "best_step" (the step of the group's highest-valued occurrence) and, for
    samples, "token_count"; for documents "best_token_offset" / "best_token_count"
    (the window of that highest occurrence, for showing text).
    """
    key = {"sample": SAMPLE_KEY, "document": DOCUMENT_KEY}.get(by)
    if key is None:
        raise ValueError(f"aggregate(by={by!r}): choose 'sample' or 'document'")
    values = np.asarray(values, dtype=np.float64)
    group_of_row, first_row = _group_index(columns, key)
    n_groups = len(first_row)
    steps = np.asarray(columns["step"], dtype=np.int64)
    # the highest-valued row of each group: sort rows by value, last write per group wins
    best_row = np.zeros(n_groups, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    best_row[group_of_row[order]] = order
    table = {name: np.asarray(columns[name])[first_row] for name in key}
    table["value"] = np.bincount(group_of_row, weights=values, minlength=n_groups)
    table["occurrences"] = np.bincount(group_of_row, minlength=n_groups).astype(np.int64)
    first_step = np.full(n_groups, np.iinfo(np.int64).max)
    np.minimum.at(first_step, group_of_row, steps)
    last_step = np.full(n_groups, np.iinfo(np.int64).min)
    np.maximum.at(last_step, group_of_row, steps)
    table["first_step"], table["last_step"] = first_step, last_step
    table["best_step"] = steps[best_row]
    if by == "sample":
        table["token_count"] = np.asarray(columns["token_count"])[first_row]
        table["doc_id"] = np.asarray(columns["doc_id"])[first_row]
    else:
        table["best_token_offset"] = np.asarray(columns["token_offset"])[best_row]
        table["best_token_count"] = np.asarray(columns["token_count"])[best_row]
    return _like(columns, table)


def rank(table, k: int | None = None, column: str = "value", lowest: bool = False) -> np.ndarray:
    """Positions of the k highest (or lowest) entries of table[column], best first.
    Ties keep table order, so rankings are reproducible."""
    values = np.asarray(table[column], dtype=np.float64)
    order = np.argsort(values if lowest else -values, kind="stable")
    return order if k is None else order[:k]


def take(table, indices):
    """The rows at positions `indices` of a column table (of a DataFrame: `.iloc[indices]`)."""
    if isinstance(table, pd.DataFrame):
        return table.iloc[np.asarray(indices)]
    return {name: np.asarray(col)[indices] for name, col in table.items()}


def domain_summary(samples):
    """Per domain over a sample table (see `aggregate`): samples, total value,
    mean value per sample, share of samples with a positive value.
    Returns columns sorted by total value, highest first."""
    domains, group = np.unique(np.asarray(samples["domain"]), return_inverse=True)
    values = np.asarray(samples["value"], dtype=np.float64)
    count = np.bincount(group, minlength=len(domains))
    total = np.bincount(group, weights=values, minlength=len(domains))
    positive = np.bincount(group, weights=(values > 0).astype(np.float64), minlength=len(domains))
    table = {"domain": domains, "samples": count.astype(np.int64), "total": total,
             "mean": total / np.maximum(count, 1), "share_positive": positive / np.maximum(count, 1)}
    return _like(samples, take(table, np.argsort(-total, kind="stable")))


def cumulative_by_domain(columns, values):
    """Cumulative value per domain after each recorded step.

    Returns (steps [S], {domain: cumulative value [S]}): the stage-dependence view
    (which domains help early, which late). Given a DataFrame: a DataFrame indexed
    by step with one column per domain."""
    steps, step_of_row = np.unique(np.asarray(columns["step"]), return_inverse=True)
    domains = np.asarray(columns["domain"])
    values = np.asarray(values, dtype=np.float64)
    curves = {}
    for domain in np.unique(domains):
        in_domain = domains == domain
        per_step = np.bincount(step_of_row[in_domain], weights=values[in_domain], minlength=len(steps))
        curves[str(domain)] = np.cumsum(per_step)
    if isinstance(columns, pd.DataFrame):
        return pd.DataFrame(curves, index=pd.Index(steps, name="step"))
    return steps, curves


def normalised_recall_at_k(samples, domain: str, k: int) -> float:
    """Share of `domain` among the top-k samples by value, divided by that
    domain's share of all samples seen. 1 = no better than chance; NaN when
    the domain never appears in the training samples."""
    if k < 1:
        raise ValueError(f"normalised_recall_at_k: k must be >= 1, got {k}")
    in_domain = np.asarray(samples["domain"]) == domain
    base_share = in_domain.mean() if len(in_domain) else 0.0
    if base_share == 0:
        return float("nan")
    top = rank(samples, k)
    return float(in_domain[top].mean() / base_share)


# docs/FIDELITY.md section 3: over the first two updates of Adam/AdamW no per-step estimator tracks the step's
# exact Shapley value (best Pearson 0.77 at step 1, 0.95 at step 2: the first update is nearly -lr·sign(g), and
# "adamw" holds v at v_0 = 0, so its step-1 values are about 1/eps times first order).
ADAM_OPTIMIZERS = ("AdamW", "Adam")
ADAM_UNRELIABLE_STEPS = (1, 2)


def unreliable_steps(config: dict) -> tuple:
    """The steps whose values no estimator makes faithful: steps 1 and 2 of a run whose config.json names an
    Adam/AdamW "optimizer" (the app's --optimizer; the integrations record the optimizer's class); else ()."""
    return ADAM_UNRELIABLE_STEPS if config.get("optimizer") in ADAM_OPTIMIZERS else ()


def steps_left_out(columns, config: dict) -> list:
    """The run's recorded steps that `unreliable_steps` names, as the report leaves them out: none when they
    are all the run has (such a run is valued whole, and flagged)."""
    recorded = np.unique(np.asarray(columns["step"]))
    unreliable = [s for s in unreliable_steps(config) if s in recorded]
    return [] if len(unreliable) == len(recorded) else unreliable


def without_steps(columns, steps):
    """`columns` (dict or DataFrame) without the rows recorded at any of `steps`."""
    keep = ~np.asarray(rows_in_steps(columns, steps))
    if isinstance(columns, pd.DataFrame):
        return columns[keep]
    return {name: np.asarray(column)[keep] for name, column in columns.items()}


def rows_in_steps(columns, steps):
    """Boolean mask [rows] of the rows recorded at any of `steps`."""
    return _per_row(columns, np.isin(np.asarray(columns["step"]), np.asarray(list(steps))))
