"""Statistics for small evaluations: means, bootstrap intervals, paired tests, Holm correction.

Why these: the paper's yes/no results are single runs on a 166-question test set, where one
question moves accuracy by ~0.6 points. Two sources of noise matter and both are resampled
here: the *seed* (initialisation, data order) and the *test items* (which questions or which
held-out abstracts happen to be in the test set).

- `bootstrap_ci(x)`: percentile bootstrap of the mean of a 1-D sample.
- `ratio_bootstrap(num, den)`: two-level bootstrap of sum(num)/sum(den) for a (seeds x units)
  matrix: seeds (rows) and units (columns) are resampled independently. With den = 1 it is
  accuracy over questions pooled over seeds; with num = per-sample loss sums and den = masked
  token counts it is the token-level mean MLM loss.
- `compare_ratio(a, b)`: the same two-level bootstrap for the *difference* of two arms; units
  are paired (the same test questions / held-out samples for both arms, resampled with the same
  indices), seeds are resampled independently per arm (arm A's seed 1 has nothing to do with
  arm B's seed 1). Returns the difference, its CI and a two-sided bootstrap p-value.
- `permutation_test(a, b)`: exact (or Monte-Carlo) permutation test on per-seed values;
  `paired=True` flips signs of paired differences. With 3 seeds per arm the smallest
  attainable two-sided p is 0.1 (unpaired) / 0.25 (paired): seeds alone cannot show
  significance, which is why the item-level bootstrap above is the primary test.
- `holm(p)`: Holm-Bonferroni adjusted p-values for a family of comparisons.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_std of an empty sequence")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def _percentile_ci(stats: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [a, 1.0 - a])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], n_boot: int = 10000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values`."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci of an empty sequence")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    return _percentile_ci(x[idx].mean(axis=1), level)


def _as_matrix(a) -> np.ndarray:
    m = np.asarray(a, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.size == 0:
        raise ValueError("expected a non-empty (seeds x units) matrix")
    return m


def _boot_ratio(num: np.ndarray, den: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """sum(num[r, c]) / sum(den[r, c]) for each replicate's row and column draws.

    Column draws are turned into counts so each replicate costs O(seeds x units), not a
    gather of seeds x units x n_boot elements.
    """
    n_boot, n_units = cols.shape
    col_counts = np.zeros((n_boot, n_units))
    np.add.at(col_counts, (np.arange(n_boot)[:, None], cols), 1.0)
    row_counts = np.zeros((n_boot, num.shape[0]))
    np.add.at(row_counts, (np.arange(n_boot)[:, None], rows), 1.0)
    # replicate b: sum_r sum_c rc[b,r] cc[b,c] num[r,c]
    top = np.einsum("br,rc,bc->b", row_counts, num, col_counts)
    bot = np.einsum("br,rc,bc->b", row_counts, den, col_counts)
    return top / bot


def ratio_bootstrap(num, den=None, n_boot: int = 10000, level: float = 0.95, seed: int = 0,
                    resample_seeds: bool = True) -> dict:
    """Point estimate and two-level bootstrap CI of sum(num)/sum(den) over a (seeds x units) matrix."""
    num = _as_matrix(num)
    den = np.ones_like(num) if den is None else _as_matrix(den)
    if den.shape != num.shape:
        raise ValueError(f"num {num.shape} and den {den.shape} differ in shape")
    rng = np.random.default_rng(seed)
    s, u = num.shape
    rows = rng.integers(0, s, size=(n_boot, s)) if resample_seeds else np.tile(np.arange(s), (n_boot, 1))
    cols = rng.integers(0, u, size=(n_boot, u))
    stats = _boot_ratio(num, den, rows, cols)
    lo, hi = _percentile_ci(stats, level)
    return {"value": float(num.sum() / den.sum()), "ci": [lo, hi], "level": level, "n_boot": n_boot,
            "seeds": s, "units": u}


def compare_ratio(a_num, b_num, a_den=None, b_den=None, n_boot: int = 10000, level: float = 0.95,
                  seed: int = 0) -> dict:
    """Difference (A - B) of two arms' ratios with a paired-units, independent-seeds bootstrap.

    p is the two-sided bootstrap p-value: twice the smaller tail mass of the replicate
    differences on either side of 0 (floored at 1/n_boot).
    """
    a_num, b_num = _as_matrix(a_num), _as_matrix(b_num)
    a_den = np.ones_like(a_num) if a_den is None else _as_matrix(a_den)
    b_den = np.ones_like(b_num) if b_den is None else _as_matrix(b_den)
    if a_num.shape[1] != b_num.shape[1]:
        raise ValueError("paired comparison needs the same units (columns) in both arms")
    rng = np.random.default_rng(seed)
    u = a_num.shape[1]
    cols = rng.integers(0, u, size=(n_boot, u))
    ra = rng.integers(0, a_num.shape[0], size=(n_boot, a_num.shape[0]))
    rb = rng.integers(0, b_num.shape[0], size=(n_boot, b_num.shape[0]))
    d = _boot_ratio(a_num, a_den, ra, cols) - _boot_ratio(b_num, b_den, rb, cols)
    diff = float(a_num.sum() / a_den.sum() - b_num.sum() / b_den.sum())
    lo, hi = _percentile_ci(d, level)
    p = 2.0 * min(float((d <= 0).mean()), float((d >= 0).mean()))
    return {"diff": diff, "ci": [lo, hi], "p": float(min(1.0, max(p, 1.0 / n_boot))), "level": level,
            "n_boot": n_boot}


def permutation_test(a: Sequence[float], b: Sequence[float], paired: bool = False,
                     n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided permutation p-value for mean(a) - mean(b).

    Exact enumeration when the number of permutations is at most `n_perm`, else Monte Carlo
    (with the +1 correction). The observed arrangement counts as one of the permutations.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    eps = 1e-12
    if paired:
        if a.shape != b.shape:
            raise ValueError("paired permutation test needs equally long samples")
        d = a - b
        obs = abs(d.mean())
        n = d.size
        if 2 ** n <= n_perm:
            signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
            stats = np.abs((signs * d).mean(axis=1))
            return float((stats >= obs - eps).mean())
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(n_perm, n))
        stats = np.abs((signs * d).mean(axis=1))
        return float(((stats >= obs - eps).sum() + 1) / (n_perm + 1))
    pooled = np.concatenate([a, b])
    na, n = a.size, a.size + b.size
    obs = abs(a.mean() - b.mean())
    if math.comb(n, na) <= n_perm:
        stats = []
        for idx in itertools.combinations(range(n), na):
            mask = np.zeros(n, dtype=bool)
            mask[list(idx)] = True
            stats.append(abs(pooled[mask].mean() - pooled[~mask].mean()))
        return float((np.asarray(stats) >= obs - eps).mean())
    rng = np.random.default_rng(seed)
    count = 0
    for _ in range(n_perm):
        p = rng.permutation(pooled)
        count += abs(p[:na].mean() - p[na:].mean()) >= obs - eps
    return float((count + 1) / (n_perm + 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as the input)."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adj[i] = min(1.0, running)
    return adj.tolist()


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-label F1 (a label never predicted nor present scores 0)."""
    y_true, y_pred = list(y_true), list(y_pred)
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    f1s = []
    for lab in labels:
        tp = sum(t == lab and p == lab for t, p in zip(y_true, y_pred))
        fp = sum(t != lab and p == lab for t, p in zip(y_true, y_pred))
        fn = sum(t == lab and p != lab for t, p in zip(y_true, y_pred))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def majority_label(labels: Sequence) -> object:
    """Most frequent label; ties go to the label that sorts first (deterministic)."""
    counts = Counter(labels)
    best = max(counts.values())
    return sorted(k for k, v in counts.items() if v == best)[0]


def majority_baseline(train_labels: Sequence, test_labels: Sequence, labels: Sequence | None = None) -> dict:
    """Accuracy and macro-F1 of always predicting the train split's majority label on test."""
    maj = majority_label(train_labels)
    test_labels = list(test_labels)
    pred = [maj] * len(test_labels)
    acc = float(np.mean([t == maj for t in test_labels])) if test_labels else float("nan")
    return {"label": maj, "accuracy": acc, "macro_f1": macro_f1(test_labels, pred, labels)}
