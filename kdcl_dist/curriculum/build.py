"""Curriculum shards in global easy -> hard order, `curriculum.json` and plots (docs/design.md §5).

Steps (``kdcl-dist curriculum``):

1. rank 0 loads `scores.json` and every score file, checks them against the source
   `dataset.json` (dataset fingerprint, shard list, counts, shard checksums), applies the
   non-finite policy, sorts all samples by (score, id) (`curriculum.sort`), and writes the
   order once: `order_scores.npy` (float32, the contract), `order_source.npy` (int64
   [N, 2]: source shard, index within it) and `order_scores_f64.npy` (full precision).
2. every rank memory-maps the order and writes output shards j with j % world == rank;
   output shard j holds positions [j·S, (j+1)·S). Samples are fetched by random access
   (one positioned read per sample through the source offset index), sorted by source
   location within an output shard for locality. A rank holds one output shard in
   memory at a time: memory is O(N) small integers for the order + O(S) samples.
   A finished output shard leaves `.parts/<shard>.json`; a re-run with the same inputs
   skips it (resume after a kill).
3. rank 0 gathers the shard entries and writes `curriculum.json`, `curriculum.png`
   (score against position, as in the paper's Figure 3) and `score_histogram.png`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kdcl_dist import FORMAT_VERSION
from kdcl_dist.config import option
from kdcl_dist.curriculum.sort import NONFINITE, apply_nonfinite, check_unique, sort_order
from kdcl_dist.data.reader import ShardSet
from kdcl_dist.data.shards import (
    Sample,
    ids_dtype,
    manifest_fingerprint,
    npy_bytes,
    shard_name,
    write_shard,
)
from kdcl_dist.errors import UserError
from kdcl_dist.utils import fingerprint, read_json, remove_stale_tmp, write_json_atomic

log = logging.getLogger("kdcl_dist.curriculum")

QUANTILES = [round(q, 2) for q in np.arange(0.0, 1.0001, 0.05)]


@dataclass
class CurriculumConfig:
    shard_size: int = option(2000, help="samples per curriculum shard", min=1)
    nonfinite: str | None = option(
        None, help="non-finite score policy (default: the one in scores.json)", choices=NONFINITE
    )
    plots: bool = option(True, help="write curriculum.png and score_histogram.png")
    progress: bool = option(True, help="tqdm progress bar on rank 0")
    in_memory_max: int = option(
        20_000_000,
        help="samples up to which the global sort runs in memory; above "
        "it, the external merge sort (bounded memory, the same order)",
        min=0,
    )
    merge_chunk: int = option(
        65536, help="rows per run paged in at a time by the external merge", min=1
    )
    exclude_heldout_percent: int = option(
        5,
        help="leave out the documents that `eval mlm --split heldout --heldout-percent N` evaluates "
        "(id hash % 100 < N; eval mlm's default is 5), so training never sees them; 0 keeps every document",
        min=0,
        max=99,
        hint="100 would leave every document out (0 keeps them all)",
    )
    lambda_plot_batch: int = option(
        32, help="global batch of the λ-over-one-epoch plot (lambda_schedules.png)", min=1
    )


# ---- step 1: the global order ------------------------------------------------------------


def _check_score_file(scores_dir, entry: dict, s: dict, a: dict) -> None:
    if a["info"].get("shard_sha256") != entry.get("sha256"):
        raise UserError(
            f"{Path(scores_dir) / s['file']}: scored a different version of {entry['name']} "
            "(checksum differs); re-run `kdcl-dist score`"
        )
    if len(a["ids"]) != entry["count"]:
        raise UserError(
            f"{Path(scores_dir) / s['file']}: {len(a['ids'])} scores for {entry['count']} samples"
        )


def gather_scores(src: ShardSet, scores_dir) -> tuple[dict, dict]:
    """All scores of the dataset as flat arrays + the scores manifest (checked against `src`)."""
    from kdcl_dist.curriculum.scoring import load_scores

    man, arrays = load_scores(scores_dir, src.manifest)
    for entry, s, a in zip(src.shards, man["shards"], arrays):
        _check_score_file(scores_dir, entry, s, a)
    n = [len(a["ids"]) for a in arrays]
    flat = {
        "ids": np.concatenate([a["ids"] for a in arrays]) if arrays else np.zeros(0, dtype=str),
        "score": np.concatenate([a["score"] for a in arrays]) if arrays else np.zeros(0),
        "shard": np.concatenate([np.full(k, i, dtype=np.int64) for i, k in enumerate(n)])
        if arrays
        else np.zeros(0, np.int64),
        "local": np.concatenate([np.arange(k, dtype=np.int64) for k in n])
        if arrays
        else np.zeros(0, np.int64),
    }
    return man, flat


def select(score: np.ndarray, ids: np.ndarray, policy: str, heldout_percent: int = 0):
    """(scores with the non-finite policy applied, keep mask, non-finite count, held-out count).

    Held-out documents (`evaluate.mlm.is_heldout`) are dropped first; the non-finite count and
    policy apply to the rest, so the excluded counts never overlap."""
    from kdcl_dist.evaluate.mlm import heldout_mask

    held = heldout_mask(ids, heldout_percent)
    scores, keep = apply_nonfinite(score, policy)
    keep &= ~held
    n_bad = int((~np.isfinite(np.asarray(score, dtype=np.float64)) & ~held).sum())
    return scores, keep, n_bad, int(held.sum())


def excluded_counts(policy: str, n_bad: int, n_held: int, heldout_percent: int) -> dict:
    out = {"heldout": n_held} if heldout_percent else {}
    if policy == "exclude" and n_bad:
        out["nonfinite_score"] = n_bad
    return out


def check_not_empty(
    n: int, n_source: int, n_held: int, n_bad: int, policy: str, heldout_percent: int
) -> None:
    """Refuse a curriculum without samples, naming the option that left them all out (training would
    otherwise fail later with a misleading "use a smaller global batch")."""
    if n:
        return
    if not n_source:
        raise UserError(
            "curriculum: the source shards hold no samples; re-run `kdcl-dist shard` on a non-empty corpus"
        )
    why, fix = [], []
    if n_held:
        why.append(f"{n_held} held out by curriculum.exclude_heldout_percent={heldout_percent}")
        fix.append("lower --exclude-heldout-percent (0 keeps every document)")
    if n_bad and policy == "exclude":
        why.append(f"{n_bad} with a non-finite score dropped by curriculum.nonfinite=exclude")
        fix.append("use --nonfinite last (or re-score)")
    raise UserError(
        f"curriculum.{'exclude_heldout_percent' if n_held else 'nonfinite'}: the curriculum would be "
        f"empty: all {n_source} samples are left out ({', '.join(why)}); {' or '.join(fix)}"
    )


def _heldout_key(cfg: CurriculumConfig) -> dict:
    """Fingerprint entry of the held-out exclusion (none at 0: earlier fingerprints stay valid)."""
    return {"heldout": cfg.exclude_heldout_percent} if cfg.exclude_heldout_percent else {}


def compute_order(flat: dict, policy: str, heldout_percent: int = 0) -> dict:
    """Drop held-out ids, apply the non-finite policy and sort by (score, id); pure."""
    scores, keep, n_bad, n_held = select(flat["score"], flat["ids"], policy, heldout_percent)
    idx = np.flatnonzero(keep)
    perm = idx[sort_order(scores[idx], flat["ids"][idx])]
    return {
        "perm": perm,
        "scores": scores[perm],
        "excluded": excluded_counts(policy, n_bad, n_held, heldout_percent),
        "nonfinite": n_bad,
    }


def write_order(out: Path, flat: dict, order: dict) -> None:
    from kdcl_dist.utils import atomic_path

    perm = order["perm"]
    arrays = {
        "order_scores.npy": order["scores"].astype(np.float32),
        "order_scores_f64.npy": order["scores"].astype(np.float64),
        "order_source.npy": np.stack([flat["shard"][perm], flat["local"][perm]], axis=1).astype(
            np.int64
        ),
    }
    for name, arr in arrays.items():
        with atomic_path(out / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)


ORDER_FILES = ("order_scores.npy", "order_scores_f64.npy", "order_source.npy")


def external_order(
    src: ShardSet,
    scores_dir,
    man: dict,
    policy: str,
    out: Path,
    chunk: int = 65536,
    heldout_percent: int = 0,
) -> dict:
    """The global order by an external merge sort, written straight to the order files.

    Each score file is one run: the policy is applied, the run is sorted by (score, id)
    in memory and saved as .npy (`sort.write_run`; payload = source shard << 32 | index);
    `sort.merge_runs` k-way merges the memory-mapped runs and the merged stream is written
    chunk by chunk into memory-mapped order files. A second streaming merge over the runs'
    sorted ids refuses duplicate ids (what `check_unique` does in memory). Memory:
    O(one score file + runs x chunk); the order is identical to `compute_order`'s (tested).
    """
    import shutil

    from kdcl_dist.curriculum.scoring import read_listed_score_file
    from kdcl_dist.curriculum.sort import merge_runs, merged_arrays, write_run

    runs_dir = out / ".sort-runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    runs, n_source, n_bad, n_held, n = [], 0, 0, 0, 0
    for i, (entry, s) in enumerate(zip(src.shards, man["shards"])):
        a = read_listed_score_file(scores_dir, s)
        _check_score_file(scores_dir, entry, s, a)
        scores, keep, bad, held = select(a["score"], a["ids"], policy, heldout_percent)
        n_bad += bad
        n_held += held
        idx = np.flatnonzero(keep)
        if len(idx):
            p = write_run(
                runs_dir / f"run-{i:06d}",
                scores[idx],
                a["ids"][idx],
                (np.int64(i) << 32) | idx.astype(np.int64),
            )
            np.save(f"{p}.idsorted.npy", np.sort(a["ids"][idx]))
            runs.append(p)
        n_source += len(a["ids"])
        n += len(idx)
        del a, scores, keep, idx
    if not n:
        shutil.rmtree(runs_dir, ignore_errors=True)
        check_not_empty(n, n_source, n_held, n_bad, policy, heldout_percent)
    _check_unique_runs(runs, chunk, Path(scores_dir) / "scores.json")
    tmp = {name: out / f".tmp-{name}" for name in ORDER_FILES}
    f32 = np.lib.format.open_memmap(
        tmp["order_scores.npy"], mode="w+", dtype=np.float32, shape=(n,)
    )
    f64 = np.lib.format.open_memmap(
        tmp["order_scores_f64.npy"], mode="w+", dtype=np.float64, shape=(n,)
    )
    srcs = np.lib.format.open_memmap(
        tmp["order_source.npy"], mode="w+", dtype=np.int64, shape=(n, 2)
    )
    pos = 0
    for sc, _ids, pay in merged_arrays(merge_runs(runs, chunk), chunk):
        k = len(sc)
        f32[pos : pos + k] = sc
        f64[pos : pos + k] = sc
        pay = pay.astype(np.int64)
        srcs[pos : pos + k, 0] = pay >> 32
        srcs[pos : pos + k, 1] = pay & 0xFFFFFFFF
        pos += k
    assert pos == n, (pos, n)
    for arr in (f32, f64, srcs):
        arr.flush()
    del f32, f64, srcs
    for name in ORDER_FILES:  # durable, then renamed into place (as atomic_path does)
        with open(tmp[name], "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp[name], out / name)
    shutil.rmtree(runs_dir, ignore_errors=True)
    return {
        "n": n,
        "excluded": excluded_counts(policy, n_bad, n_held, heldout_percent),
        "nonfinite": n_bad,
        "n_source": n_source,
    }


def _check_unique_runs(runs, chunk: int, where: Path) -> None:
    import heapq

    def stream(p):
        ids = np.load(f"{p}.idsorted.npy", mmap_mode="r")
        for a in range(0, len(ids), chunk):
            yield from ids[a : a + chunk].tolist()

    prev = None
    for sid in heapq.merge(*(stream(p) for p in runs)):
        if sid == prev:
            raise UserError(
                f"{where}: sample id {sid!r} appears more than once; ids must be unique "
                "(re-run `kdcl-dist shard`, which drops duplicates)"
            )
        prev = sid


# ---- step 2: output shards -------------------------------------------------------------------


class _Fetcher:
    """Random access to source samples with one positioned read per sample (ids + meta members)."""

    def __init__(self, src: ShardSet):
        self.src = src
        self.fds: dict[int, int] = {}
        self.cols: dict[int, tuple] = {}

    def fetch(self, shard: int, local: int) -> tuple[str, bytes, bytes]:
        """(key, `.npy` bytes of the token ids, `.json` bytes of the metadata), undecoded."""
        cols = self.cols.get(shard)
        if cols is None:  # plain lists: indexing numpy arrays per sample costs more than the read
            idx = self.src.index(shard)
            cols = self.cols[shard] = (
                idx["keys"],
                *(
                    np.asarray(idx[k]).tolist()
                    for k in ("ids_offset", "ids_size", "meta_offset", "meta_size")
                ),
            )
        keys, i_off, i_size, m_off, m_size = cols
        io_, is_, mo, ms = i_off[local], i_size[local], m_off[local], m_size[local]
        if io_ < 0 or mo < 0:
            raise UserError(
                f"{self.src.dir / self.src.shards[shard]['name']}: sample {keys[local]} lacks ids or json"
            )
        lo, hi = min(io_, mo), max(io_ + is_, mo + ms)
        if self.src.store is not None:  # a URL: one ranged GET for both members
            blob = self.src.read_range(shard, lo, hi - lo)
            return keys[local], blob[io_ - lo : io_ - lo + is_], blob[mo - lo : mo - lo + ms]
        fd = self.fds.get(shard)
        if fd is None:
            fd = self.fds[shard] = os.open(
                self.src.dir / self.src.shards[shard]["name"], os.O_RDONLY
            )
        blob = os.pread(fd, hi - lo, lo)  # the members are adjacent in the tar: one read for both
        if len(blob) != hi - lo:
            raise UserError(
                f"{self.src.dir / self.src.shards[shard]['name']}: truncated shard; re-create it"
            )
        return keys[local], blob[io_ - lo : io_ - lo + is_], blob[mo - lo : mo - lo + ms]

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def write_output_shard(
    out: Path,
    j: int,
    src: ShardSet,
    fetcher: _Fetcher,
    source: np.ndarray,
    scores64: np.ndarray,
    start: int,
    stop: int,
    dtype,
) -> dict:
    loc = np.asarray(source[start:stop])
    read_order = np.lexsort((loc[:, 1], loc[:, 0])).tolist()  # file order within each source shard
    got: list = [None] * (stop - start)
    sh, lo = loc[:, 0].tolist(), loc[:, 1].tolist()
    for r in read_order:
        got[r] = fetcher.fetch(sh[r], lo[r])
    samples = []
    sc_list = np.asarray(scores64[start:stop]).tolist()  # one memmap read, not one per sample
    src_names = [e["name"] for e in src.shards]
    src_of = loc[:, 0].tolist()
    for k, (key, npy, meta) in enumerate(got):
        extra = {"score": sc_list[k], "position": start + k, "source_shard": src_names[src_of[k]]}
        samples.append(_Encoded(key, npy, _meta_json(meta, extra)))
    entry = fast_write_shard(out / shard_name(j), samples, dtype=dtype)
    sc = np.asarray(scores64[start:stop])
    fin = sc[np.isfinite(sc)]
    stats = {
        "name": entry["name"],
        "count": int(stop - start),
        "min": float(sc.min()),
        "max": float(sc.max()),
        "mean": float(fin.mean()) if len(fin) else math.nan,
    }
    return {"entry": entry, "stats": stats}


class _Encoded(NamedTuple):
    """A curriculum sample whose members are already encoded (`.npy` and `.json` bytes)."""

    key: str
    npy: bytes
    meta_json: bytes
    text: None = None


_STAGE_KEYS = (b'"score"', b'"position"', b'"source_shard"')


def _meta_json(src_json: bytes, extra: dict) -> bytes:
    """The source metadata plus `extra`, as `json.dumps(merged)` would encode it.

    Appending the new keys to the source object's bytes skips a decode/encode per sample;
    when the source already has one of them (or is not a plain object) it falls back to
    decode + merge + encode.
    """
    s = src_json.rstrip()
    if (
        s.endswith(b"}")
        and len(s) > 2
        and b'"n_tokens"' in s
        and not any(k in s for k in _STAGE_KEYS)
    ):
        sc, name = extra["score"], extra["source_shard"]
        if math.isfinite(sc) and name.isascii() and '"' not in name and "\\" not in name:
            # what json.dumps writes for these three keys (float repr == JSON repr when finite)
            return b'%s, "score": %s, "position": %d, "source_shard": "%s"}' % (
                s[:-1],
                repr(sc).encode(),
                extra["position"],
                name.encode(),
            )
        return s[:-1] + b", " + json.dumps(extra).encode("utf-8")[1:]
    meta = json.loads(src_json)
    meta.update(extra)
    return json.dumps(meta).encode("utf-8")


def _descr_token(dtype) -> bytes:
    return b"'descr': '%s'" % np.dtype(dtype).str.encode()


def _npy_of(s, dtype) -> bytes:
    if isinstance(s, _Encoded):
        from kdcl_dist.curriculum.scoring import _ids_from_npy

        if s.npy[6] == 1 and _descr_token(dtype) in s.npy[10:64]:
            return s.npy  # the source's bytes already are np.save(ids.astype(dtype))
        return npy_bytes(np.asarray(_ids_from_npy(s.npy), dtype=dtype))
    return npy_bytes(np.asarray(s.ids, dtype=dtype))


# ---- a faster, byte-identical write_shard ----------------------------------------------------
# Re-sharding 1.8M samples through tarfile objects spends ~80% of its time building member
# headers; `data.shards.member_header` patches name, size and checksum into one header made
# (and checked) by tarfile itself, the same template `write_shard`'s TarFile uses.


def fast_write_shard(path: Path, samples: list, dtype) -> dict:
    """`write_shard` for samples without text and with keys of <= 90 bytes; else it calls write_shard."""
    import hashlib

    from kdcl_dist.curriculum.scoring import _ids_from_npy
    from kdcl_dist.data.shards import INDEX_FORMAT, index_name, member_header
    from kdcl_dist.utils import atomic_path

    if member_header(b"x", 0) is None or any(
        s.text is not None or len(s.key.encode()) > 90 for s in samples
    ):
        samples = [
            s
            if not isinstance(s, _Encoded)
            else Sample(s.key, _ids_from_npy(s.npy), json.loads(s.meta_json))
            for s in samples
        ]
        return write_shard(path, samples, dtype=dtype)
    parts = []
    keys, ids_off, ids_size, meta_off, meta_size = [], [], [], [], []
    at = 0
    for s in samples:
        key = s.key.encode()
        keys.append(s.key)
        meta = s.meta_json if isinstance(s, _Encoded) else json.dumps(s.meta).encode("utf-8")
        for ext, data, offs, sizes in (
            (b".ids.npy", _npy_of(s, dtype), ids_off, ids_size),
            (b".json", meta, meta_off, meta_size),
        ):
            # members in the order TarWriter writes them (sorted extensions); the offset index
            # is known while writing, no second scan of the tar
            parts.append(member_header(key + ext, len(data)))
            parts.append(data)
            offs.append(at + 512)
            sizes.append(len(data))
            pad = -len(data) % 512
            if pad:
                parts.append(b"\0" * pad)
            at += 512 + len(data) + pad
    parts.append(b"\0" * 1024)  # end-of-archive blocks, then pad to tarfile's 10240-byte record
    at += 1024
    if at % 10240:
        parts.append(b"\0" * (10240 - at % 10240))
    blob = b"".join(parts)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    index = {
        "format": INDEX_FORMAT,
        "count": len(keys),
        "keys": keys,
        "ids_offset": ids_off,
        "ids_size": ids_size,
        "meta_offset": meta_off,
        "meta_size": meta_size,
    }
    with atomic_path(Path(path.parent) / index_name(path.name)) as tmp:
        tmp.write_text(json.dumps(index))  # compact: the C encoder, ~10x faster than indent=2
    return {
        "name": path.name,
        "index": index_name(path.name),
        "count": len(keys),
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }


# ---- step 3: manifest and plots ----------------------------------------------------------------


def score_stats(scores: np.ndarray) -> dict:
    fin = np.asarray(scores, dtype=np.float64)
    fin = fin[np.isfinite(fin)]
    if len(fin) == 0:
        return {"min": None, "max": None, "mean": None, "quantiles": {}}
    qs = np.quantile(fin, QUANTILES)
    return {
        "min": float(fin.min()),
        "max": float(fin.max()),
        "mean": float(fin.mean()),
        "std": float(fin.std()),
        "finite": int(len(fin)),
        "quantiles": {f"{q:.2f}": float(v) for q, v in zip(QUANTILES, qs)},
    }


def write_plots(out: Path, scores: np.ndarray) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(scores, dtype=np.float64)
    fin = np.isfinite(s)
    n = len(s)
    step = max(1, n // 20000)  # a plot never needs more than ~20k points
    pos = np.arange(0, n, step)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(pos[fin[pos]], s[pos][fin[pos]], lw=1.2)
    ax.set_xlabel("position in the curriculum (easy → hard)")
    ax.set_ylabel("score: mean masked-token loss (nats)")
    ax.set_title(f"Curriculum order ({n:,} samples)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / ".tmp-curriculum.png")
    plt.close(fig)
    os.replace(out / ".tmp-curriculum.png", out / "curriculum.png")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.hist(s[fin], bins=60)
    ax.set_xlabel("score (nats)")
    ax.set_ylabel("samples")
    ax.set_title("Score histogram")
    fig.tight_layout()
    fig.savefig(out / ".tmp-score_histogram.png")
    plt.close(fig)
    os.replace(out / ".tmp-score_histogram.png", out / "score_histogram.png")
    return ["curriculum.png", "score_histogram.png"]


LAMBDA_PLOT_SCHEDULES = ("constant", "sr-paper", "sr-minmax", "sr-sample", "sr-rank")


def write_lambda_plot(out: Path, order_scores: np.ndarray, stats: dict, global_batch: int) -> dict:
    """λ over one epoch of the sequential order for every reliance schedule, from the manifest
    alone (kd.reliance.lambda_trace: the same arithmetic as training, default parameters).

    Written before any training so a user sees what each schedule will do with these scores:
    lambda_schedules.png and lambda_schedules.json (mean λ over the epoch, λ at fractions of it).
    """
    from kdcl_dist.curriculum.order import OrderSpec
    from kdcl_dist.kd.reliance import RelianceSpec, lambda_trace

    n = len(order_scores)
    B = min(int(global_batch), n)
    spe = max(1, n // B)
    at = np.unique(np.linspace(0, spe - 1, min(spe, 2000)).astype(np.int64))
    scores = np.asarray(order_scores, dtype=np.float64)
    if not np.isfinite(
        scores
    ).all():  # kept non-finite scores (policy 'last'): λ of those batches is not plotted
        scores = np.where(np.isfinite(scores), scores, np.nan)
    res = {"global_batch": B, "steps_per_epoch": spe, "order": "sequential", "schedules": {}}
    traces = {}
    for sch in LAMBDA_PLOT_SCHEDULES:
        try:
            tr = lambda_trace(RelianceSpec(sch), scores, stats, OrderSpec("sequential"), B, at)
        except (UserError, ValueError) as e:  # e.g. no quantile table
            log.warning("lambda plot: %s skipped (%s)", sch, e)
            continue
        traces[sch] = tr
        frac = {
            f"{f:.2f}": float(np.interp(f * (spe - 1), at, tr))
            for f in (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 1.0)
        }
        res["schedules"][sch] = {"mean": float(np.nanmean(tr)), "at_fraction_of_epoch": frac}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for sch, tr in traces.items():
        label = f"{sch} (mean {res['schedules'][sch]['mean']:.2f})" + (
            " [variant]" if sch == "sr-rank" else ""
        )
        ax.plot(at / max(1, spe - 1), tr, lw=1.2, label=label)
    ax.set_xlabel("fraction of one epoch (sequential order, easy → hard)")
    ax.set_ylabel("λ (batch mean)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"λ per schedule before training (global batch {B})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / ".tmp-lambda_schedules.png")
    plt.close(fig)
    os.replace(out / ".tmp-lambda_schedules.png", out / "lambda_schedules.png")
    write_json_atomic(out / "lambda_schedules.json", res)
    return res


# ---- the stage ------------------------------------------------------------------------------


def build_curriculum(
    shards_dir, scores_dir, out_dir, cfg: CurriculumConfig, rank: int = 0, world: int = 1
) -> dict | None:
    """Write the curriculum directory; returns curriculum.json on rank 0 (None elsewhere)."""
    from kdcl_dist import dist, storage
    from kdcl_dist.data.reader import has_file

    out = Path(out_dir)
    src_path = shards_dir if storage.is_url(shards_dir) else Path(shards_dir)
    if not has_file(src_path, "dataset.json"):
        raise UserError(
            f"{storage.redact(str(src_path))}: no dataset.json; --shards must be the source shards from `kdcl-dist shard`"
        )
    src = ShardSet(src_path, "dataset.json")
    t0 = time.perf_counter()
    state = None
    if rank == 0:
        created = not out.exists()  # a refused run leaves no directory behind
        try:
            out.mkdir(parents=True, exist_ok=True)
            # temp files of a killed earlier run: the other ranks wait on the broadcast below
            stale = remove_stale_tmp(out) + remove_stale_tmp(out / ".parts")
            if stale:
                log.info("%s: removed %d temporary file(s) left by an interrupted run", out, stale)
            external = len(src) > cfg.in_memory_max
            if external:
                from kdcl_dist.curriculum.scoring import load_scores_manifest

                man = load_scores_manifest(scores_dir, src.manifest)
                policy = cfg.nonfinite or man.get("nonfinite_policy", "last")
                log.info(
                    "external merge sort: %d samples > curriculum.in_memory_max=%d",
                    len(src),
                    cfg.in_memory_max,
                )
                res = external_order(
                    src, scores_dir, man, policy, out, cfg.merge_chunk, cfg.exclude_heldout_percent
                )
            else:
                man, flat = gather_scores(src, scores_dir)
                check_unique(flat["ids"], f"{Path(scores_dir) / 'scores.json'}")
                policy = cfg.nonfinite or man.get("nonfinite_policy", "last")
                order = compute_order(flat, policy, cfg.exclude_heldout_percent)
                check_not_empty(
                    len(order["perm"]),
                    len(flat["ids"]),
                    order["excluded"].get("heldout", 0),
                    order["nonfinite"],
                    policy,
                    cfg.exclude_heldout_percent,
                )
                write_order(out, flat, order)
                res = {
                    "n": int(len(order["perm"])),
                    "excluded": order["excluded"],
                    "nonfinite": order["nonfinite"],
                    "n_source": int(len(flat["ids"])),
                }
                del flat, order
            inputs = {
                "dataset_fingerprint": src.fingerprint,
                "scores_fingerprint": man.get("fingerprint"),
                "model_fingerprint": man.get("model_fingerprint"),
                "masks": man.get("masks"),
                "seed": man.get("seed"),
            }
            order_fp = fingerprint(
                {
                    "inputs": inputs,
                    "policy": policy,
                    "shard_size": cfg.shard_size,
                    "n": res["n"],
                    **_heldout_key(cfg),
                }
            )
            state = {
                "ok": True,
                "order_fp": order_fp,
                "policy": policy,
                "inputs": inputs,
                **res,
                "sort": "external" if external else "in_memory",
                "sort_s": time.perf_counter() - t0,
            }
        except UserError as e:
            state = {"ok": False, "error": str(e)}
            if created:  # nothing of this run is kept: it wrote nothing else yet
                import shutil

                shutil.rmtree(out, ignore_errors=True)
    state = dist.broadcast_object(state)
    if not state["ok"]:
        if rank == 0:
            raise UserError(state["error"])
        return None  # rank 0 reports the error
    n, S = state["n"], cfg.shard_size
    source = np.load(out / "order_source.npy", mmap_mode="r")
    scores64 = np.load(out / "order_scores_f64.npy", mmap_mode="r")
    dtype = ids_dtype(int(src.manifest["tokenizer"]["vocab_size"]))
    n_out = (n + S - 1) // S
    mine = [j for j in range(n_out) if j % world == rank]
    parts = out / ".parts"
    parts.mkdir(exist_ok=True)
    bar = None
    if rank == 0 and mine:  # a bar on a terminal, else a progress line every $KDCL_PROGRESS_EVERY s
        from kdcl_dist.progress import progress_bar

        bar = progress_bar(
            len(mine) * world, "curriculum", "shard", progress=cfg.progress, dynamic_ncols=True
        )
    fetcher = _Fetcher(src)
    results, skipped = [], 0
    for j in mine:
        part = parts / f"{shard_name(j)}.json"
        prev = _read_part(part)
        if (
            prev is not None
            and prev.get("order_fp") == state["order_fp"]
            and (out / shard_name(j)).exists()
        ):
            results.append(prev["result"])
            skipped += 1
        else:
            res = write_output_shard(
                out, j, src, fetcher, source, scores64, j * S, min(n, (j + 1) * S), dtype
            )
            write_json_atomic(part, {"order_fp": state["order_fp"], "result": res})
            results.append(res)
        if bar is not None:
            bar.update(world)
    fetcher.close()
    if bar is not None:
        bar.close()
    if skipped:
        log.warning(
            "rank %d: %d curriculum shards already written for these inputs; kept them",
            rank,
            skipped,
        )
    import resource

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    gathered = dist.all_gather_object({"results": results, "peak_rss_mib": rss_mib})
    peak_rss = [g["peak_rss_mib"] for g in gathered]
    gathered = [g["results"] for g in gathered]
    if rank != 0:
        return None
    res_all = sorted((r for rs in gathered for r in rs), key=lambda r: r["entry"]["name"])
    entries = [r["entry"] for r in res_all]
    if sum(e["count"] for e in entries) != n:
        raise UserError(
            f"{out}: curriculum shards hold {sum(e['count'] for e in entries)} samples, expected {n}"
        )
    _remove_stale_shards(out, n_out)
    order_scores = np.load(out / "order_scores.npy")
    stats = score_stats(np.load(out / "order_scores_f64.npy"))
    tok = src.manifest.get("tokenizer")
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "curriculum",
        "shards": entries,
        "num_samples": n,
        "tokenizer": tok,
        "score_stats": stats,
        "max_confidence": math.exp(-stats["min"]) if stats["min"] is not None else None,
        "excluded": state["excluded"],
        "nonfinite": {"count": state["nonfinite"], "policy": state["policy"]},
        "heldout": {
            "excluded_percent": cfg.exclude_heldout_percent,
            "rule": "evaluate.mlm.is_heldout: id_hash64(doc id without _partK) % 100 < excluded_percent",
        },
        "source_samples": state["n_source"],
        "inputs": state["inputs"],
        "per_shard": [r["stats"] for r in res_all],
        "order_files": {
            "scores": "order_scores.npy",
            "scores_f64": "order_scores_f64.npy",
            "source": "order_source.npy",
        },
        "build": {
            "world_size": world,
            "shard_size": S,
            "sort": state["sort"],
            "sort_s": state["sort_s"],
            "peak_rss_mib": peak_rss,
            "elapsed_s": time.perf_counter() - t0,
        },
    }
    manifest["fingerprint"] = fingerprint(
        {
            "m": manifest_fingerprint(entries, tok),
            "kind": "curriculum",
            "inputs": state["inputs"],
            **_heldout_key(cfg),
        }
    )
    if cfg.plots:
        manifest["plots"] = write_plots(out, order_scores)
        if n:
            write_lambda_plot(out, order_scores, stats, cfg.lambda_plot_batch)
            manifest["plots"] += ["lambda_schedules.png"]
    write_json_atomic(out / "curriculum.json", manifest)
    log.info(
        "curriculum: %d samples in %d shards (%s excluded) written to %s in %.1f s",
        n,
        len(entries),
        sum(state["excluded"].values()),
        out,
        manifest["build"]["elapsed_s"],
    )
    return manifest


def _read_part(path: Path):
    if not path.exists():
        return None
    try:
        return read_json(path)
    except UserError:
        return None


def _remove_stale_shards(out: Path, n_out: int) -> None:
    """Output shards beyond the new count (an earlier run with a smaller shard size) are removed."""
    j = n_out
    while (out / shard_name(j)).exists():
        (out / shard_name(j)).unlink()
        idx = out / (shard_name(j)[:-4] + ".idx.json")
        if idx.exists():
            idx.unlink()
        part = out / ".parts" / f"{shard_name(j)}.json"
        if part.exists():
            part.unlink()
        j += 1
