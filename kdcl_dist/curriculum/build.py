"""Curriculum shards in global easy -> hard order, `curriculum.json` and plots (DESIGN §5).

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

import numpy as np

from kdcl_dist import FORMAT_VERSION
from kdcl_dist.config import option
from kdcl_dist.curriculum.sort import NONFINITE, apply_nonfinite, check_unique, sort_order
from kdcl_dist.data.reader import ShardSet
from kdcl_dist.data.shards import Sample, ids_dtype, manifest_fingerprint, shard_name, write_shard
from kdcl_dist.errors import UserError
from kdcl_dist.utils import fingerprint, read_json, write_json_atomic

log = logging.getLogger("kdcl_dist.curriculum")

QUANTILES = [round(q, 2) for q in np.arange(0.0, 1.0001, 0.05)]


@dataclass
class CurriculumConfig:
    shard_size: int = option(2000, help="samples per curriculum shard", min=1)
    nonfinite: str | None = option(None, help="non-finite score policy (default: the one in scores.json)",
                                   choices=NONFINITE)
    plots: bool = option(True, help="write curriculum.png and score_histogram.png")
    progress: bool = option(True, help="tqdm progress bar on rank 0")


# ---- step 1: the global order ------------------------------------------------------------

def gather_scores(src: ShardSet, scores_dir) -> tuple[dict, dict]:
    """All scores of the dataset as flat arrays + the scores manifest (checked against `src`)."""
    from kdcl_dist.curriculum.scoring import load_scores

    man, arrays = load_scores(scores_dir, src.manifest)
    for entry, s, a in zip(src.shards, man["shards"], arrays):
        if a["info"].get("shard_sha256") != entry.get("sha256"):
            raise UserError(f"{Path(scores_dir) / s['file']}: scored a different version of {entry['name']} "
                            "(checksum differs); re-run `kdcl-dist score`")
        if len(a["ids"]) != entry["count"]:
            raise UserError(f"{Path(scores_dir) / s['file']}: {len(a['ids'])} scores for {entry['count']} samples")
    n = [len(a["ids"]) for a in arrays]
    flat = {
        "ids": np.concatenate([a["ids"] for a in arrays]) if arrays else np.zeros(0, dtype=str),
        "score": np.concatenate([a["score"] for a in arrays]) if arrays else np.zeros(0),
        "shard": np.concatenate([np.full(k, i, dtype=np.int64) for i, k in enumerate(n)]) if arrays else np.zeros(0, np.int64),
        "local": np.concatenate([np.arange(k, dtype=np.int64) for k in n]) if arrays else np.zeros(0, np.int64),
    }
    return man, flat


def compute_order(flat: dict, policy: str) -> dict:
    """Apply the non-finite policy and sort by (score, id); pure."""
    scores, keep = apply_nonfinite(flat["score"], policy)
    excluded = {}
    n_bad = int((~np.isfinite(flat["score"])).sum())
    if policy == "exclude" and n_bad:
        excluded["nonfinite_score"] = n_bad
    idx = np.flatnonzero(keep)
    perm = idx[sort_order(scores[idx], flat["ids"][idx])]
    return {"perm": perm, "scores": scores[perm], "excluded": excluded, "nonfinite": n_bad}


def write_order(out: Path, flat: dict, order: dict) -> None:
    from kdcl_dist.utils import atomic_path

    perm = order["perm"]
    arrays = {
        "order_scores.npy": order["scores"].astype(np.float32),
        "order_scores_f64.npy": order["scores"].astype(np.float64),
        "order_source.npy": np.stack([flat["shard"][perm], flat["local"][perm]], axis=1).astype(np.int64),
    }
    for name, arr in arrays.items():
        with atomic_path(out / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)


# ---- step 2: output shards -------------------------------------------------------------------

class _Fetcher:
    """Random access to source samples with one positioned read per sample (ids + meta members)."""

    def __init__(self, src: ShardSet):
        self.src = src
        self.fds: dict[int, int] = {}

    def fetch(self, shard: int, local: int) -> tuple[str, bytes, dict]:
        from kdcl_dist.curriculum.scoring import _ids_from_npy

        idx = self.src.index(shard)
        io_, is_ = int(idx["ids_offset"][local]), int(idx["ids_size"][local])
        mo, ms = int(idx["meta_offset"][local]), int(idx["meta_size"][local])
        if io_ < 0 or mo < 0:
            raise UserError(f"{self.src.dir / self.src.shards[shard]['name']}: sample {idx['keys'][local]} lacks ids or json")
        fd = self.fds.get(shard)
        if fd is None:
            fd = self.fds[shard] = os.open(self.src.dir / self.src.shards[shard]["name"], os.O_RDONLY)
        lo, hi = min(io_, mo), max(io_ + is_, mo + ms)
        blob = os.pread(fd, hi - lo, lo)   # the members are adjacent in the tar: one read for both
        if len(blob) != hi - lo:
            raise UserError(f"{self.src.dir / self.src.shards[shard]['name']}: truncated shard; re-create it")
        ids = _ids_from_npy(blob[io_ - lo: io_ - lo + is_])
        meta = json.loads(blob[mo - lo: mo - lo + ms])
        return idx["keys"][local], ids, meta

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def write_output_shard(out: Path, j: int, src: ShardSet, fetcher: _Fetcher, source: np.ndarray,
                       scores64: np.ndarray, start: int, stop: int, dtype) -> dict:
    loc = np.asarray(source[start:stop])
    read_order = np.lexsort((loc[:, 1], loc[:, 0]))   # file order within each source shard
    got: list = [None] * (stop - start)
    for r in read_order:
        got[r] = fetcher.fetch(int(loc[r, 0]), int(loc[r, 1]))
    samples = []
    for k, (key, ids, meta) in enumerate(got):
        p = start + k
        meta = dict(meta)
        meta.update({"score": float(scores64[p]), "position": p,
                     "source_shard": src.shards[int(loc[k, 0])]["name"]})
        meta.setdefault("n_tokens", int(len(ids)))
        samples.append(Sample(key, ids, meta))
    entry = write_shard(out / shard_name(j), samples, dtype=dtype)
    sc = scores64[start:stop]
    fin = sc[np.isfinite(sc)]
    stats = {"name": entry["name"], "count": int(stop - start),
             "min": float(sc.min()), "max": float(sc.max()),
             "mean": float(fin.mean()) if len(fin) else math.nan}
    return {"entry": entry, "stats": stats}


# ---- step 3: manifest and plots ----------------------------------------------------------------

def score_stats(scores: np.ndarray) -> dict:
    fin = np.asarray(scores, dtype=np.float64)
    fin = fin[np.isfinite(fin)]
    if len(fin) == 0:
        return {"min": None, "max": None, "mean": None, "quantiles": {}}
    qs = np.quantile(fin, QUANTILES)
    return {"min": float(fin.min()), "max": float(fin.max()), "mean": float(fin.mean()),
            "std": float(fin.std()), "finite": int(len(fin)),
            "quantiles": {f"{q:.2f}": float(v) for q, v in zip(QUANTILES, qs)}}


def write_plots(out: Path, scores: np.ndarray) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(scores, dtype=np.float64)
    fin = np.isfinite(s)
    n = len(s)
    step = max(1, n // 20000)   # a plot never needs more than ~20k points
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


# ---- the stage ------------------------------------------------------------------------------

def build_curriculum(shards_dir, scores_dir, out_dir, cfg: CurriculumConfig, rank: int = 0,
                     world: int = 1) -> dict | None:
    """Write the curriculum directory; returns curriculum.json on rank 0 (None elsewhere)."""
    from kdcl_dist import dist

    out = Path(out_dir)
    src_path = Path(shards_dir)
    if not (src_path / "dataset.json").exists():
        raise UserError(f"{src_path}: no dataset.json; --shards must be the source shards from `kdcl-dist shard`")
    src = ShardSet(src_path, "dataset.json")
    t0 = time.perf_counter()
    state = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            man, flat = gather_scores(src, scores_dir)
            check_unique(flat["ids"], f"{Path(scores_dir) / 'scores.json'}")
            policy = cfg.nonfinite or man.get("nonfinite_policy", "last")
            order = compute_order(flat, policy)
            inputs = {"dataset_fingerprint": src.fingerprint, "scores_fingerprint": man.get("fingerprint"),
                      "model_fingerprint": man.get("model_fingerprint"), "masks": man.get("masks"),
                      "seed": man.get("seed")}
            order_fp = fingerprint({"inputs": inputs, "policy": policy, "shard_size": cfg.shard_size,
                                    "n": len(order["perm"])})
            write_order(out, flat, order)
            state = {"ok": True, "n": int(len(order["perm"])), "order_fp": order_fp, "policy": policy,
                     "inputs": inputs, "excluded": order["excluded"], "nonfinite": order["nonfinite"],
                     "n_source": int(len(flat["ids"])), "sort_s": time.perf_counter() - t0}
            del flat, order
        except UserError as e:
            state = {"ok": False, "error": str(e)}
    state = dist.broadcast_object(state)
    if not state["ok"]:
        if rank == 0:
            raise UserError(state["error"])
        return None   # rank 0 reports the error
    n, S = state["n"], cfg.shard_size
    source = np.load(out / "order_source.npy", mmap_mode="r")
    scores64 = np.load(out / "order_scores_f64.npy", mmap_mode="r")
    dtype = ids_dtype(int(src.manifest["tokenizer"]["vocab_size"]))
    n_out = (n + S - 1) // S
    mine = [j for j in range(n_out) if j % world == rank]
    parts = out / ".parts"
    parts.mkdir(exist_ok=True)
    bar = None
    if cfg.progress and rank == 0 and mine:
        from tqdm import tqdm

        bar = tqdm(total=len(mine) * world, unit="shard", desc="curriculum", dynamic_ncols=True)
    fetcher = _Fetcher(src)
    results, skipped = [], 0
    for j in mine:
        part = parts / f"{shard_name(j)}.json"
        prev = _read_part(part)
        if prev is not None and prev.get("order_fp") == state["order_fp"] and (out / shard_name(j)).exists():
            results.append(prev["result"])
            skipped += 1
        else:
            res = write_output_shard(out, j, src, fetcher, source, scores64, j * S, min(n, (j + 1) * S), dtype)
            write_json_atomic(part, {"order_fp": state["order_fp"], "result": res})
            results.append(res)
        if bar is not None:
            bar.update(world)
    fetcher.close()
    if bar is not None:
        bar.close()
    if skipped:
        log.warning("rank %d: %d curriculum shards already written for these inputs; kept them", rank, skipped)
    gathered = dist.all_gather_object(results)
    if rank != 0:
        return None
    res_all = sorted((r for rs in gathered for r in rs), key=lambda r: r["entry"]["name"])
    entries = [r["entry"] for r in res_all]
    if sum(e["count"] for e in entries) != n:
        raise UserError(f"{out}: curriculum shards hold {sum(e['count'] for e in entries)} samples, expected {n}")
    _remove_stale_shards(out, n_out)
    order_scores = np.load(out / "order_scores.npy")
    stats = score_stats(order_scores)
    tok = src.manifest.get("tokenizer")
    manifest = {
        "format_version": FORMAT_VERSION, "kind": "curriculum",
        "shards": entries, "num_samples": n, "tokenizer": tok,
        "score_stats": stats,
        "max_confidence": math.exp(-stats["min"]) if stats["min"] is not None else None,
        "excluded": state["excluded"],
        "nonfinite": {"count": state["nonfinite"], "policy": state["policy"]},
        "source_samples": state["n_source"],
        "inputs": state["inputs"],
        "per_shard": [r["stats"] for r in res_all],
        "order_files": {"scores": "order_scores.npy", "scores_f64": "order_scores_f64.npy",
                        "source": "order_source.npy"},
        "build": {"world_size": world, "shard_size": S, "sort_s": state["sort_s"],
                  "elapsed_s": time.perf_counter() - t0},
    }
    manifest["fingerprint"] = fingerprint({"m": manifest_fingerprint(entries, tok), "kind": "curriculum",
                                           "inputs": state["inputs"]})
    if cfg.plots:
        manifest["plots"] = write_plots(out, order_scores)
    write_json_atomic(out / "curriculum.json", manifest)
    log.info("curriculum: %d samples in %d shards (%s excluded) written to %s in %.1f s",
             n, len(entries), sum(state["excluded"].values()), out, manifest["build"]["elapsed_s"])
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
