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
- `compare_seeds(a, b)`: the comparison to use with few seeds. The unit is the training seed:
  Welch t on per-seed values (Welch-Satterthwaite df) plus the variance from sampling the
  (paired) test items; p, CI, and the minimum detectable difference `mde`. `compare_ratio`'s
  percentile bootstrap over 3 seeds is too narrow (false-positive rate up to ~20% at α = 0.05
  in simulation, `kdcl-dist bench stats`); it is kept for the figures it produced.
- `nest_seeds(rows, groups)`: one row per training seed (fine-tuning seeds averaged).
- `compare_to_constant(x, value=)`: one arm against a fixed number or a per-item reference.
- `t_cdf`, `t_sf`, `t_ppf`, `betainc`: Student's t without scipy.
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


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
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


def ratio_bootstrap(
    num,
    den=None,
    n_boot: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    resample_seeds: bool = True,
) -> dict:
    """Point estimate and two-level bootstrap CI of sum(num)/sum(den) over a (seeds x units) matrix."""
    num = _as_matrix(num)
    den = np.ones_like(num) if den is None else _as_matrix(den)
    if den.shape != num.shape:
        raise ValueError(f"num {num.shape} and den {den.shape} differ in shape")
    rng = np.random.default_rng(seed)
    s, u = num.shape
    rows = (
        rng.integers(0, s, size=(n_boot, s))
        if resample_seeds
        else np.tile(np.arange(s), (n_boot, 1))
    )
    cols = rng.integers(0, u, size=(n_boot, u))
    stats = _boot_ratio(num, den, rows, cols)
    lo, hi = _percentile_ci(stats, level)
    return {
        "value": float(num.sum() / den.sum()),
        "ci": [lo, hi],
        "level": level,
        "n_boot": n_boot,
        "seeds": s,
        "units": u,
    }


def compare_ratio(
    a_num, b_num, a_den=None, b_den=None, n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> dict:
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
    return {
        "diff": diff,
        "ci": [lo, hi],
        "p": float(min(1.0, max(p, 1.0 / n_boot))),
        "level": level,
        "n_boot": n_boot,
    }


def permutation_test(
    a: Sequence[float], b: Sequence[float], paired: bool = False, n_perm: int = 20000, seed: int = 0
) -> float:
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
        if 2**n <= n_perm:
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


def majority_baseline(
    train_labels: Sequence, test_labels: Sequence, labels: Sequence | None = None
) -> dict:
    """Accuracy and macro-F1 of always predicting the train split's majority label on test."""
    maj = majority_label(train_labels)
    test_labels = list(test_labels)
    pred = [maj] * len(test_labels)
    acc = float(np.mean([t == maj for t in test_labels])) if test_labels else float("nan")
    return {"label": maj, "accuracy": acc, "macro_f1": macro_f1(test_labels, pred, labels)}


# -- Student t distribution ------------------------------------------------------------------
# scipy is not a dependency of this package (and not installed in the venv), so the t
# distribution is computed here: the regularised incomplete beta function by its continued
# fraction (modified Lentz), vectorised over arrays, and quantiles by safeguarded Newton steps.
# Tested against table values in tests/test_stats_calibration.py.

_TINY = 1e-300
_NORMAL_DF = 1e7  # beyond this many degrees of freedom the t distribution is taken as normal

_lgamma = np.frompyfunc(math.lgamma, 1, 1)
_erfc = np.frompyfunc(math.erfc, 1, 1)


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, max_iter: int = 3000) -> np.ndarray:
    """Continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < _TINY, _TINY, d)
    d = 1.0 / d
    h = d.copy()
    todo = np.ones(x.shape, dtype=bool)
    for m in range(1, max_iter + 1):
        m2 = 2.0 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < _TINY, _TINY, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < _TINY, _TINY, c)
        d = 1.0 / d
        h = np.where(todo, h * d * c, h)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < _TINY, _TINY, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < _TINY, _TINY, c)
        d = 1.0 / d
        delta = d * c
        h = np.where(todo, h * delta, h)
        todo &= np.abs(delta - 1.0) > 1e-15
        if not todo.any():
            break
    return h


def betainc(a, b, x) -> np.ndarray:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1 (broadcast)."""
    a, b, x = np.broadcast_arrays(
        np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(x, np.float64)
    )
    out = np.empty(x.shape)
    inner = (x > 0) & (x < 1)
    out[x <= 0] = 0.0
    out[x >= 1] = 1.0
    if inner.any():
        a, b, x = a[inner], b[inner], x[inner]
        log_front = (
            (_lgamma(a + b) - _lgamma(a) - _lgamma(b)).astype(np.float64)
            + a * np.log(x)
            + b * np.log1p(-x)
        )
        front = np.exp(log_front)
        direct = x < (a + 1.0) / (a + b + 2.0)
        res = np.empty(x.shape)
        if direct.any():
            res[direct] = front[direct] * _betacf(a[direct], b[direct], x[direct]) / a[direct]
        flip = ~direct
        if flip.any():
            res[flip] = 1.0 - front[flip] * _betacf(b[flip], a[flip], 1.0 - x[flip]) / b[flip]
        out[inner] = res
    return out


def _normal_sf(z: np.ndarray) -> np.ndarray:
    return 0.5 * _erfc(np.asarray(z, np.float64) / math.sqrt(2.0)).astype(np.float64)


def t_sf(t, df) -> np.ndarray:
    """Upper tail P(T > t) of Student's t with `df` (> 0, may be fractional or inf) degrees of freedom."""
    t, df = np.broadcast_arrays(np.asarray(t, np.float64), np.asarray(df, np.float64))
    out = np.full(t.shape, np.nan)
    ok = np.isfinite(t) & (df > 0)
    out[np.isposinf(t) & (df > 0)] = 0.0
    out[np.isneginf(t) & (df > 0)] = 1.0
    norm = ok & (df > _NORMAL_DF)
    if norm.any():
        out[norm] = _normal_sf(t[norm])
    beta = ok & ~norm
    if beta.any():
        tt, nu = t[beta], df[beta]
        # P(|T| > |t|) = I_{nu / (nu + t^2)}(nu / 2, 1 / 2)
        two_tail = betainc(nu / 2.0, 0.5, nu / (nu + tt * tt))
        out[beta] = np.where(tt >= 0, 0.5 * two_tail, 1.0 - 0.5 * two_tail)
    return out


def t_cdf(t, df) -> np.ndarray:
    """P(T <= t) for Student's t (see `t_sf`)."""
    return t_sf(-np.asarray(t, np.float64), df)


def _t_logpdf(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    normal = df > _NORMAL_DF
    nu = np.where(normal, 1.0, df)
    student = (
        (_lgamma((nu + 1) / 2) - _lgamma(nu / 2)).astype(np.float64)
        - 0.5 * np.log(nu * math.pi)
        - (nu + 1) / 2 * np.log1p(t * t / nu)
    )
    return np.where(normal, -0.5 * math.log(2 * math.pi) - 0.5 * t * t, student)


def t_ppf(q, df) -> np.ndarray:
    """Quantile of Student's t: the t with P(T <= t) = q.

    Newton's method on log t from a Cornish-Fisher start, safeguarded by bisection inside a
    bracket; converges to ~1e-12 relative in a handful of iterations.
    """
    q, df = np.broadcast_arrays(np.asarray(q, np.float64), np.asarray(df, np.float64))
    out = np.full(q.shape, np.nan)
    ok = (q > 0) & (q < 1) & (df > 0)
    out[(q == 0) & (df > 0)] = -np.inf
    out[(q == 1) & (df > 0)] = np.inf
    out[ok & (q == 0.5)] = 0.0
    work = ok & (q != 0.5)
    if work.any():
        tail = np.minimum(q[work], 1.0 - q[work])  # find t > 0 with P(T > t) = tail
        nu = df[work]
        # start: normal quantile (Abramowitz & Stegun 26.2.23) + Cornish-Fisher terms for t
        w = np.sqrt(-2.0 * np.log(tail))
        z = w - (2.515517 + 0.802853 * w + 0.010328 * w * w) / (
            1 + 1.432788 * w + 0.189269 * w * w + 0.001308 * w**3
        )
        z = np.maximum(z, 1e-3)
        t0 = z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu * nu)
        s = np.log(np.maximum(t0, 1e-6))
        lo = np.full(tail.shape, -50.0)  # bracket on log t
        hi = np.full(tail.shape, 50.0)
        todo = np.ones(tail.shape, dtype=bool)
        for _ in range(200):
            i = np.flatnonzero(todo)
            if i.size == 0:
                break
            si, ni, ti = s[i], nu[i], tail[i]
            t = np.exp(si)
            f = t_sf(t, ni) - ti  # decreasing in s
            lo[i] = np.where(f > 0, si, lo[i])
            hi[i] = np.where(f > 0, hi[i], si)
            slope = np.exp(_t_logpdf(t, ni)) * t  # -d sf / d log t
            with np.errstate(divide="ignore", invalid="ignore"):
                step = f / slope
            new = si + step
            bad = ~np.isfinite(new) | (new <= lo[i]) | (new >= hi[i])
            new = np.where(bad, 0.5 * (lo[i] + hi[i]), new)
            done = (np.abs(new - si) < 1e-13) | (hi[i] - lo[i] < 1e-13)
            s[i] = new
            todo[i[done]] = False
        t = np.exp(s)
        out[work] = np.where(q[work] > 0.5, t, -t)
    return out


# -- comparisons whose unit is the training seed ------------------------------------------------


def nest_seeds(rows, groups) -> np.ndarray:
    """Average the rows of a (runs x items) matrix within each group (e.g. training seed).

    Yes/no: every training seed is fine-tuned with several seeds; the fine-tuning runs of one
    training seed are not independent replicates of the *training* procedure, so they are
    averaged into one row per training seed before the seeds are compared. `groups` gives,
    for every row, its group label; groups come out in order of first appearance.
    """
    m = _as_matrix(rows)
    groups = list(groups)
    if len(groups) != m.shape[0]:
        raise ValueError(f"{len(groups)} group labels for {m.shape[0]} rows")
    order = list(dict.fromkeys(groups))
    index = {g: i for i, g in enumerate(order)}
    gi = np.array([index[g] for g in groups])
    sums = np.zeros((len(order), m.shape[1]))
    np.add.at(sums, gi, m)
    return sums / np.bincount(gi, minlength=len(order))[:, None]


def _arm_parts(num: np.ndarray, den: np.ndarray) -> dict:
    """Per-seed values, pooled value and the item linearisation of one arm.

    Shapes: num, den (..., S, U). Returns (leading dims ...):
      v      (..., S)  per-seed value sum_u num / sum_u den
      pooled (...)     sum num / sum den
      infl   (..., U)  linearised influence of item u on the seed-averaged value
                       (the arm value moves by ~ mean_u infl when items are resampled)
      inter  (...)     seed x item interaction variance of the linearised values (the part
                       of the item influences that is seed noise, already in the seed variance)
      seed_var (...)   sample variance of v over seeds (nan with one seed)
    """
    s, u = num.shape[-2:]
    ds = den.sum(-1)
    v = num.sum(-1) / ds
    z = (num - v[..., None] * den) / (ds / u)[..., None]
    infl = z.mean(-2)
    if s > 1:
        seed_var = v.var(-1, ddof=1)
        inter = ((z - infl[..., None, :]) ** 2).sum((-2, -1)) / ((s - 1) * max(u - 1, 1))
    else:
        seed_var = np.full(v.shape[:-1], np.nan)
        inter = np.zeros(v.shape[:-1])
    return {
        "v": v,
        "pooled": num.sum((-2, -1)) / den.sum((-2, -1)),
        "infl": infl,
        "inter": inter,
        "seed_var": seed_var,
        "seeds": s,
        "items": u,
    }


def _t_result(diff, seed_parts, item_var, item_df, alpha: float, power: float) -> dict:
    """Batched t inference from variance components.

    seed_parts: list of (variance of the mean, df) per arm; item_var: variance added by the test
    items (or 0) with item_df degrees of freedom. df by Welch-Satterthwaite over all components.
    """
    comps = [np.asarray(c, np.float64) for c, _ in seed_parts] + [np.asarray(item_var, np.float64)]
    dfs = [d for _, d in seed_parts] + [item_df]
    var = sum(comps)
    den = sum(np.where(c > 0, c * c / d, 0.0) for c, d in zip(comps, dfs))
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(den > 0, var * var / np.where(den > 0, den, 1.0), np.nan)
        se = np.sqrt(var)
        t = diff / se
    p = np.where(
        var > 0,
        2.0 * t_sf(np.abs(np.where(var > 0, t, 0.0)), np.where(var > 0, df, 1.0)),
        np.where(diff == 0, 1.0, 0.0),
    )
    p = np.where(np.isnan(var), np.nan, np.minimum(p, 1.0))
    df_ok = np.where(np.isfinite(df), df, 1.0)
    tcrit = np.where(var > 0, t_ppf(1.0 - alpha / 2.0, df_ok), 0.0)
    tpow = np.where(var > 0, t_ppf(power, df_ok), 0.0)
    half = tcrit * se
    mde = (tcrit + tpow) * se
    return {
        "diff": diff,
        "lo": diff - half,
        "hi": diff + half,
        "p": p,
        "se": se,
        "df": df,
        "mde": mde,
        "underpowered": ~(mde <= np.abs(diff)),
    }


def _stack(m) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim < 2 or m.size == 0:
        raise ValueError("expected a non-empty (seeds x items) matrix")
    return m


def _compare_batched(a_num, b_num, a_den, b_den, alpha: float, power: float, items: bool) -> dict:
    """compare_seeds on (..., S, U) arrays: every leading index is one comparison (simulations)."""
    pa, pb = _arm_parts(a_num, a_den), _arm_parts(b_num, b_den)
    u = pa["items"]
    diff = pa["pooled"] - pb["pooled"]
    if items and u > 1:
        d = pa["infl"] - pb["infl"]
        raw = d.var(-1, ddof=1) / u
        item_var = np.maximum(
            raw - pa["inter"] / (pa["seeds"] * u) - pb["inter"] / (pb["seeds"] * u), 0.0
        )
    else:
        item_var = np.zeros_like(diff)
    seed_parts = [
        (pa["seed_var"] / pa["seeds"], pa["seeds"] - 1),
        (pb["seed_var"] / pb["seeds"], pb["seeds"] - 1),
    ]
    r = _t_result(diff, seed_parts, item_var, max(u - 1, 1), alpha, power)
    r["se_seeds"] = np.sqrt(seed_parts[0][0] + seed_parts[1][0])
    r["se_items"] = np.sqrt(item_var)
    return r


def _result_dict(r: dict, alpha: float, power: float, method: str, **extra) -> dict:
    out = {
        "diff": float(r["diff"]),
        "ci": [float(r["lo"]), float(r["hi"])],
        "p": float(r["p"]),
        "se": float(r["se"]),
        "df": float(r["df"]),
        "mde": float(r["mde"]),
        "underpowered": bool(r["underpowered"]),
        "level": 1.0 - alpha,
        "alpha": alpha,
        "power": power,
        "se_seeds": float(r["se_seeds"]),
        "se_items": float(r["se_items"]),
        "method": method,
    }
    out.update(extra)
    return out


def _single_seed_result(diff: float, alpha: float, power: float, method: str, **extra) -> dict:
    nan = float("nan")
    out = {
        "diff": float(diff),
        "ci": [nan, nan],
        "p": nan,
        "se": nan,
        "df": nan,
        "mde": nan,
        "underpowered": True,
        "level": 1.0 - alpha,
        "alpha": alpha,
        "power": power,
        "se_seeds": nan,
        "se_items": nan,
        "method": method,
        "note": "an arm has a single seed: the between-seed variance is unknown, so no p-value or "
        "interval is given (run >= 2 seeds per arm, better >= 3)",
    }
    out.update(extra)
    return out


def compare_seeds(
    a_num,
    b_num,
    a_den=None,
    b_den=None,
    alpha: float = 0.05,
    power: float = 0.8,
    items: bool = True,
) -> dict:
    """A - B with the training seed as the experimental unit (Welch t) plus paired test-item sampling.

    a_num, b_num: (seeds x items) matrices (a 1-D array is one seed); a_den, b_den: the matching
    denominators (None: ones, i.e. the value is a mean, e.g. accuracy). Every arm must be
    evaluated on the same items (columns), so items are paired; seeds are independent between
    arms (arm A's seed 1 has nothing to do with arm B's seed 1) and may differ in number.
    Yes/no: pass `nest_seeds(correct_rows, training_seed_of_row)` so that the fine-tuning seeds
    of one training seed count once.

    Value of seed s: sum_u num[s, u] / sum_u den[s, u]. diff: pooled A - B (sum num / sum den
    per arm, as in `compare_ratio`). Variance of diff:
      var(v_A) / S_A + var(v_B) / S_B       (Welch: between-seed variance, S - 1 df per arm)
      + item component (items=True)         (variance over items of the paired, linearised item
                                             influence difference, / n_items, minus the seed x item
                                             noise it shares with the seed term; >= 0, n_items - 1 df)
    df: Welch-Satterthwaite over these components; CI diff ± t(df, 1 - alpha/2)·se; p two-sided;
    mde = (t(df, 1 - alpha/2) + t(df, power))·se is the difference this design would detect with
    probability `power` (at the observed variances); underpowered = mde > |diff|, i.e. a
    non-significant result here is not evidence of "no difference".

    Returns diff, ci, p, se, df, mde, underpowered, method, seeds_a, seeds_b, items, se_seeds,
    se_items, level, alpha, power (and a note when an arm has a single seed: p = nan).
    """
    a_num, b_num = _stack(a_num), _stack(b_num)
    a_den = np.ones_like(a_num) if a_den is None else _stack(a_den)
    b_den = np.ones_like(b_num) if b_den is None else _stack(b_den)
    if a_den.shape != a_num.shape or b_den.shape != b_num.shape:
        raise ValueError("num and den differ in shape")
    if a_num.shape[1] != b_num.shape[1]:
        raise ValueError("paired comparison needs the same items (columns) in both arms")
    sa, sb, u = a_num.shape[0], b_num.shape[0], a_num.shape[1]
    use_items = items and u > 1
    method = (
        f"Welch t on per-seed values ({sa} vs {sb} seeds)"
        + (f" + paired item sampling ({u} items, linearised)" if use_items else "")
        + "; Welch-Satterthwaite df"
    )
    extra = {"seeds_a": sa, "seeds_b": sb, "items": u}
    if sa < 2 or sb < 2:
        diff = a_num.sum() / a_den.sum() - b_num.sum() / b_den.sum()
        return _single_seed_result(diff, alpha, power, method, **extra)
    r = _compare_batched(a_num, b_num, a_den, b_den, alpha, power, use_items)
    return _result_dict(r, alpha, power, method, **extra)


def compare_to_constant(
    num,
    den=None,
    value=0.0,
    value_den=None,
    alpha: float = 0.05,
    power: float = 0.8,
    items: bool = True,
) -> dict:
    """One arm's pooled value minus a reference, with the training seed as the unit.

    `value` is either a number (a fixed reference: its own uncertainty is ignored) or a 1-D
    array over the same items as `num`'s columns: the per-item numerators of a deterministic
    reference evaluated on the same items (e.g. 1.0 where the majority label is right; with
    `value_den`, default ones), whose value is sum(value) / sum(value_den); the item sampling
    is then paired with it. The teacher-vs-majority-baseline question (is 69% above 67.1%?)
    is the second form: a fixed 67.1% would ignore that the baseline also moves with the
    test questions.

    Variance: var(v) / S (S - 1 df) + with items=True the item sampling of the (paired)
    difference, as in `compare_seeds`. Same returned fields as `compare_seeds` (seeds_a = S,
    seeds_b = 0, plus `reference`).
    """
    num = _stack(num)
    den = np.ones_like(num) if den is None else _stack(den)
    if den.shape != num.shape:
        raise ValueError("num and den differ in shape")
    s, u = num.shape
    vals = np.asarray(value, dtype=np.float64)
    if vals.ndim == 0:
        ref, ref_infl = float(vals), np.zeros(u)
    else:
        if vals.shape != (u,):
            raise ValueError(f"per-item reference has shape {vals.shape}, expected ({u},)")
        vden = np.ones(u) if value_den is None else np.asarray(value_den, dtype=np.float64)
        ref = float(vals.sum() / vden.sum())
        ref_infl = (vals - ref * vden) / vden.mean()
    use_items = items and u > 1
    paired = " (paired with the per-item reference)" if vals.ndim else ""
    method = (
        f"one-sample t on per-seed values ({s} seeds)"
        + (f" + item sampling ({u} items, linearised){paired}" if use_items else "")
        + "; Satterthwaite df"
    )
    extra = {"seeds_a": s, "seeds_b": 0, "items": u, "reference": ref}
    pa = _arm_parts(num, den)
    diff = float(pa["pooled"]) - ref
    if s < 2:
        return _single_seed_result(diff, alpha, power, method, **extra)
    if use_items:
        raw = (pa["infl"] - ref_infl).var(ddof=1) / u
        item_var = max(float(raw - pa["inter"] / (s * u)), 0.0)
    else:
        item_var = 0.0
    r = _t_result(
        np.float64(diff), [(pa["seed_var"] / s, s - 1)], item_var, max(u - 1, 1), alpha, power
    )
    r["se_seeds"] = np.sqrt(pa["seed_var"] / s)
    r["se_items"] = np.sqrt(item_var)
    return _result_dict(r, alpha, power, method, **extra)
