"""Global sort of scores, pure: ascending score, ties broken by sample id (docs/design.md §4.3).

The order depends only on the (score, id) pairs, never on which rank scored what or on
the order the score files are listed in: it is the same for any world size.

Non-finite scores are never sorted silently (`apply_nonfinite`): with policy ``last``
they become +inf and sort after every finite score (by id among themselves); with
``exclude`` they are dropped and counted.

Memory. In-memory path (`sort_order`): a stable argsort by id, then a stable argsort by
score (= lexsort on (score, id)): for the paper's 1.8M samples that is ~1.8M x (8-byte
score + id bytes + 8-byte index), well under 1 GiB. Out-of-core path for ~100M samples
(`merge_runs`): each score file is already a bounded "run"; sort each run in memory by
(score, id), save it as .npy (memory-mapped back), then k-way merge the runs with
`heapq.merge` on (score, id) keys, streaming the merged order out in chunks. Memory is
then O(number of runs x chunk), independent of the total; the merged order is identical
to `sort_order` (tested).
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from kdcl_dist.errors import UserError

NONFINITE = ("last", "exclude")


def apply_nonfinite(scores: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores with the policy applied, boolean keep mask). NaN/±inf -> +inf for 'last'."""
    if policy not in NONFINITE:
        raise UserError(f"curriculum.nonfinite: {policy!r} is not one of {', '.join(NONFINITE)}")
    scores = np.asarray(scores, dtype=np.float64)
    bad = ~np.isfinite(scores)
    if policy == "exclude":
        return scores, ~bad
    out = scores.copy()
    out[bad] = np.inf
    return out, np.ones(len(scores), dtype=bool)


def sort_order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Permutation that sorts by (score, id): argsort by id, then stable argsort by score."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("NaN scores must go through apply_nonfinite before sorting")
    ids = np.asarray(ids)
    if len(scores) != len(ids):
        raise ValueError(f"{len(scores)} scores for {len(ids)} ids")
    by_id = np.argsort(ids, kind="stable")
    return by_id[np.argsort(scores[by_id], kind="stable")]


def check_unique(ids: np.ndarray, where: str = "scores") -> None:
    u, c = np.unique(np.asarray(ids), return_counts=True)
    if (c > 1).any():
        raise UserError(
            f"{where}: sample id {u[c > 1][0]!r} appears {int(c[c > 1][0])} times; "
            "ids must be unique (re-run `kdcl-dist shard`, which drops duplicates)"
        )


# ---- out-of-core path: sorted runs + k-way merge ----------------------------------------


def write_run(path: str | Path, scores: np.ndarray, ids: np.ndarray, payload: np.ndarray) -> Path:
    """Sort one run by (score, id) and save it as `<path>.{score,id,payload}.npy`."""
    p = Path(path)
    perm = sort_order(scores, ids)
    np.save(f"{p}.score.npy", np.asarray(scores, dtype=np.float64)[perm])
    np.save(f"{p}.id.npy", np.asarray(ids)[perm])
    np.save(f"{p}.payload.npy", np.asarray(payload)[perm])
    return p


def _iter_run(p: Path, chunk: int) -> Iterator[tuple[float, str, object]]:
    s = np.load(f"{p}.score.npy", mmap_mode="r")
    i = np.load(f"{p}.id.npy", mmap_mode="r")
    pay = np.load(f"{p}.payload.npy", mmap_mode="r")
    for a in range(0, len(s), chunk):  # only `chunk` rows of each run are paged in at a time
        ss, ii, pp = (
            s[a : a + chunk].tolist(),
            i[a : a + chunk].tolist(),
            pay[a : a + chunk].tolist(),
        )
        yield from zip(ss, ii, pp)


def merge_runs(
    runs: Sequence[str | Path], chunk: int = 65536
) -> Iterator[tuple[float, str, object]]:
    """k-way merge of sorted runs: yields (score, id, payload) in global (score, id) order."""
    return heapq.merge(*(_iter_run(Path(r), chunk) for r in runs), key=lambda t: (t[0], t[1]))


def merged_arrays(merged: Iterable[tuple[float, str, object]], chunk: int = 65536):
    """Group a merged stream into (scores, ids, payloads) array chunks for writing."""
    buf: list = []
    for t in merged:
        buf.append(t)
        if len(buf) >= chunk:
            yield _to_arrays(buf)
            buf = []
    if buf:
        yield _to_arrays(buf)


def _to_arrays(buf):
    s, i, p = zip(*buf)
    return np.asarray(s, dtype=np.float64), np.asarray(i), np.asarray(p)
