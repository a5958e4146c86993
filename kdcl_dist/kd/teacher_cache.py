"""A cached sparse teacher: the teacher's distribution at every masked position, computed once.

Why. The teacher's forward is about a third of a KD step, and the study repeats it for every
arm and seed over the same documents with the same frozen weights and (docs/design.md §7) the
same masks. `kdcl-dist teacher-cache` runs it once; `train --teacher-cache DIR` reads it back
instead of loading the teacher at all.

What is stored (per curriculum sample i and mask draw k < D, at each masked position of
`mask_sample(ids, id, draw=k, purpose='train', seed=mask_seed)`), with q = softmax(t/τ):

- method `sample` (default, unbiased; Anshumann et al., "Sparse Logit Sampling", ACL 2025):
  K token ids drawn from q with replacement, stored as the distinct ids and their counts c_v;
  the training target is w_v = c_v / K. For any student p, E[Σ_v w_v·(−log p_v)] =
  Σ_v q_v·(−log p_v) = CE(q, p): the KD cross-entropy, and so its gradient, are unbiased.
- method `hybrid` (unbiased, far less noise): q = b·1 + (head − b) + r. The k = `head` most
  likely ids are stored with their exact q_v − b; b = (1 − Σ_head q)/(V − k), the tail's mean, is
  a baseline over the whole vocabulary whose term b·Σ_v log p_v the loss computes exactly (a
  control variate: stored as one entry with the sentinel id V); only the residual r_v = q_v − b
  of the tail is sampled — K/2 systematic draws ∝ r_v⁺ and K/2 ∝ r_v⁻ (one uniform per position,
  evenly spaced points on each CDF), weights ±Σr^±·c_v/(K/2), so E[w_v] = r_v and, since
  Σr⁺ = Σr⁻, the target's total mass is exactly 1. A near-uniform teacher has
  r ≈ 0 (almost exact), a confident one puts its mass in the exact head. The plain `sample`
  targets were measured worse than the live teacher (docs/benchmarks.md).
- method `topk` (biased, for comparison): the k largest q_v renormalised over those k. It
  drops the tail of q, which the paper shows biases the student (over-confident on the head).
- H(q) per position (fp32), so that the logged `loss_kd` estimates τ²·KL = τ²·(CE − H) on the
  same scale as the live teacher's (the constant H does not change any gradient).

Draws are inverse-CDF samples of uniforms from a generator keyed by (sample id, draw, seed):
pure like the masks, so a cache does not depend on the ranks, batching or a resume (up to the
float round-off of q near a CDF step).

On disk (`<out>/`): `teacher_cache.json` (identity, shard list with sizes and sha256, totals,
bytes per 1M samples) and one directory per curriculum shard `<shard>.tcache/` holding
`meta.json` and the arrays, rows r = local sample·D + draw:

    row_pos  int64 [rows+1]   masked positions of row r: [row_pos[r], row_pos[r+1])
    row_ent  int64 [rows+1]   entries of row r:          [row_ent[r], row_ent[r+1])
    n_unique uint8 [P]        entries per position (consecutive within the row)
    entropy  fp32  [P]        H(q) in nats (fp32: an fp16 H would bias the logged KL)
    ids      uint16|int32 [E] token ids (uint16 when the vocabulary fits)
    weights  uint8 [E] (sample: counts of K) | fp16 [E] (topk: renormalised probabilities)
             | fp32 [E] (hybrid: signed weights, last entry of a position = b at id V)

Each shard directory is written under a temporary name and renamed when complete; a re-run
skips shards whose meta.json matches (teacher, curriculum, masks, τ, method, K, seeds), so a
killed run resumes shard-wise (the structure of curriculum/scoring.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcl_dist import FORMAT_VERSION
from kdcl_dist.config import option
from kdcl_dist.curriculum.sampler import CurriculumDataset
from kdcl_dist.errors import UserError
from kdcl_dist.utils import fingerprint, id_hash64, read_json, sha256_file, write_json_atomic

log = logging.getLogger("kdcl_dist.teacher_cache")

METHODS = ("sample", "hybrid", "topk")
MANIFEST = "teacher_cache.json"
ARRAYS = ("row_pos", "row_ent", "n_unique", "entropy", "ids", "weights")
TRAIN_MASK_PROB = (
    0.15  # what train's CurriculumDataset masks with (MaskSpec.from_tokenizer default)
)
_SAMPLE_PURPOSE = 4  # SeedSequence word of the teacher draws (masking.PURPOSES uses 1..3)


@dataclass
class TeacherCacheConfig:
    draws: int = option(
        1,
        help="mask draws per sample (train epoch e uses draw e: give at least the epochs you train)",
        min=1,
        max=64,
    )
    method: str = option(
        "sample",
        help="sample: K ids drawn from the teacher with replacement (unbiased); hybrid: the "
        "--head most likely ids exact plus K systematic draws from the rest (unbiased, less noise); "
        "topk: the k most likely ids renormalised (biased)",
        choices=METHODS,
    )
    head: int = option(
        16,
        help="hybrid: ids kept with their exact probabilities (head + K at most 254)",
        min=1,
        max=254,
    )
    samples: int = option(
        32, help="K: draws per position (sample) or ids kept (topk)", min=1, max=255
    )
    temperature: float = option(
        2.0, help="KD temperature τ of the stored distribution (train must use the same)", min=1e-6
    )
    mask_seed: int = option(
        42,
        help="seed of the training masks the cache covers (train then masks with it, whatever "
        "its --seed; the default equals train's default --seed)",
    )
    seed: int = option(0, help="seed of the teacher draws (method sample)")
    token_budget: int = option(
        0, help="max rows x padded length per teacher batch (0: auto, as `score`)", min=0
    )
    window: int = option(8192, help="rows sorted by length together before packing", min=1)
    dtype: str = option(
        "fp32", help="teacher dtype; bf16/fp16 only on GPU", choices=("fp32", "bf16", "fp16")
    )
    allow_new_head: bool = option(
        False, help="accept a teacher without MLM head (noise targets); refused by default"
    )
    verify: bool = option(True, help="check each curriculum shard's sha256 before reading it")
    progress: bool = option(True, help="log progress on rank 0")


# ---- the sparse targets of a block of teacher logits ----------------------------------------


def draw_uniforms(sample_ids, draws_of_rows, counts, K: int, seed: int) -> np.ndarray:
    """[Σ counts, K] uniforms: row j's block from a generator keyed by (sample id, draw, seed)."""
    out = []
    for sid, k, m in zip(sample_ids, draws_of_rows, counts):
        if not m:
            continue
        h = id_hash64(sid)
        ss = np.random.SeedSequence(
            [seed & 0xFFFFFFFF, _SAMPLE_PURPOSE, int(k), h & 0xFFFFFFFF, h >> 32]
        )
        out.append(np.random.Generator(np.random.PCG64(ss)).random((int(m), K)))
    return np.concatenate(out) if out else np.zeros((0, K))


def sparse_targets(
    logits: torch.Tensor, temperature: float, method: str, K: int, u=None, head: int = 16
):
    """(n_unique [M] int64, ids [E] int64, weights [E] (counts int64 | probs float32), entropy [M])
    of logits [M, V]; entries are grouped by position, ids ascending (sample), by rank (topk),
    or head by rank then tail ids ascending (hybrid)."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    q = log_q.exp()
    ent = -(q * log_q).sum(-1)
    M = q.shape[0]
    if M == 0:  # a batch whose rows have no maskable token
        z = torch.zeros(0, dtype=torch.int64)
        return z, z, (z if method == "sample" else torch.zeros(0)), torch.zeros(0)
    if method == "topk":
        k = min(K, q.shape[1])
        vals, ids = q.topk(k, dim=-1)
        w = vals / vals.sum(-1, keepdim=True)
        n = torch.full((M,), k, dtype=torch.int64)
        return n, ids.reshape(-1).cpu(), w.reshape(-1).cpu(), ent.cpu()
    if method == "hybrid":
        return _hybrid_targets(q, ent, K, u, head)
    cdf = q.double().cumsum(-1)
    uu = torch.as_tensor(u, dtype=torch.float64, device=q.device) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, uu, right=True).clamp_(max=q.shape[1] - 1)
    s, _ = ids.sort(dim=1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    n = first.sum(1).cpu()
    starts = first.reshape(-1).nonzero().squeeze(1).cpu()
    counts = torch.diff(starts, append=torch.tensor([M * s.shape[1]]))
    return n, s.reshape(-1)[first.reshape(-1)].cpu(), counts, ent.cpu()


def _systematic(mag: torch.Tensor, k: int, u0: torch.Tensor):
    """k systematic draws per row ∝ mag [M, V]: (row, id, count) of the distinct ids drawn, and
    each row's total Σ mag; expected count k·mag_v/Σ mag, realised ⌊·⌋ or ⌈·⌉."""
    M, V = mag.shape
    cdf = mag.cumsum(-1)
    tot = cdf[:, -1:]
    points = (u0 + torch.arange(k, dtype=torch.float64, device=mag.device)) / k * tot
    ids = torch.searchsorted(cdf, points, right=True).clamp_(max=V - 1)  # ascending already
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = first.reshape(-1).nonzero().squeeze(1)
    counts = torch.diff(starts, append=torch.tensor([M * k], device=mag.device))
    return starts // k, ids.reshape(-1)[starts], counts, tot.squeeze(1)


def _hybrid_targets(q: torch.Tensor, ent: torch.Tensor, K: int, u, head: int):
    """Exact head + uniform baseline + systematic draws of the tail's residual (module
    docstring); u [M, ≥1]: u[:, 0] is used. The baseline is one entry with the sentinel id V."""
    M, V = q.shape
    h = min(int(head), V - 1)
    dev = q.device
    h_val, h_id = q.double().topk(h, dim=-1)
    base = (1.0 - h_val.sum(-1, keepdim=True)).clamp_min(0.0) / (V - h)  # the tail's mean q
    resid = (q.double() - base).scatter(1, h_id, 0.0)  # tail residuals: they sum to 0
    u0 = torch.as_tensor(u, dtype=torch.float64, device=dev)[:, :1]
    # positive and negative residuals drawn apart (K/2 each): their weights cancel exactly, so
    # the target's total mass carries no noise
    k_pos = max(1, K // 2)
    k_neg = max(1, K - k_pos)
    rp, ip, cp, tp = _systematic(resid.clamp_min(0.0), k_pos, u0)
    rn, i_n, cn, tn = _systematic((-resid).clamp_min(0.0), k_neg, u0)
    t_row = torch.cat([rp, rn])
    order = torch.sort(t_row, stable=True).indices
    t_row = t_row[order]
    t_ids = torch.cat([ip, i_n])[order]
    t_w = torch.cat([tp[rp] * cp / k_pos, -tn[rn] * cn / k_neg])[order]
    t_n = torch.bincount(t_row, minlength=M)
    # per position: its h head entries (q_v − b), its tail draws, then the baseline entry
    n = h + t_n + 1
    pos_start = torch.cumsum(n, 0) - n
    tail_rank = torch.arange(len(t_ids), device=dev) - (torch.cumsum(t_n, 0) - t_n)[t_row]
    ids = torch.empty(int(n.sum()), dtype=torch.int64, device=dev)
    w = torch.empty(int(n.sum()), dtype=torch.float64, device=dev)
    head_at = (pos_start[:, None] + torch.arange(h, device=dev)).reshape(-1)
    ids[head_at], w[head_at] = h_id.reshape(-1), (h_val - base).reshape(-1)
    tail_at = pos_start[t_row] + h + tail_rank
    ids[tail_at], w[tail_at] = t_ids, t_w
    base_at = pos_start + n - 1
    ids[base_at], w[base_at] = V, base.squeeze(1)
    return n.cpu(), ids.cpu(), w.float().cpu(), ent.cpu()


# ---- building the cache ---------------------------------------------------------------------


def shard_dir_name(shard_name: str) -> str:
    return shard_name[: -len(".tar")] + ".tcache" if shard_name.endswith(".tar") else shard_name


def identity(
    cfg: TeacherCacheConfig, teacher_fp: str, cur_fp: str, tok_fp: str, vocab: int
) -> dict:
    """What a cache (and each shard directory) must match to be reused or trained from."""
    return {
        "teacher_fingerprint": teacher_fp,
        "curriculum_fingerprint": cur_fp,
        "tokenizer_fingerprint": tok_fp,
        "vocab_size": int(vocab),
        "method": cfg.method,
        "samples": int(cfg.samples),
        **({"head": int(cfg.head)} if cfg.method == "hybrid" else {}),
        "temperature": float(cfg.temperature),
        "draws": int(cfg.draws),
        "mask_seed": int(cfg.mask_seed),
        "mask_prob": TRAIN_MASK_PROB,
        "seed": int(cfg.seed),
        "dtype": cfg.dtype,
    }


def _shard_matches(d: Path, ident: dict, entry: dict) -> bool:
    try:
        meta = json.loads((d / "meta.json").read_text())
        return (
            meta.get("identity") == ident
            and meta.get("shard_sha256") == entry.get("sha256")
            and all((d / f"{a}.npy").stat().st_size == meta["sizes"][a] for a in ARRAYS)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_shard(final: Path, arrays: dict, meta: dict) -> None:
    from kdcl_dist.utils import make_temp_dir

    tmp = make_temp_dir(final.parent, f".tmp-{final.name}.")
    try:
        for a in ARRAYS:
            np.save(tmp / f"{a}.npy", arrays[a], allow_pickle=False)
        meta = {**meta, "sizes": {a: (tmp / f"{a}.npy").stat().st_size for a in ARRAYS}}
        meta["sha256"] = {a: sha256_file(tmp / f"{a}.npy") for a in ARRAYS}
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        if final.exists():  # a stale shard (other teacher / settings): replaced whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_shard(model, device, sample_ids, toks, cfg, spec, pad_id, vocab, on_batch=None) -> dict:
    """The arrays of one curriculum shard (rows in (sample, draw) order)."""
    from kdcl_dist.curriculum.scoring import collate_rows, plan_batches, to_batch
    from kdcl_dist.data.masking import mask_many
    from kdcl_dist.kd.models import encode_masked, mlm_parts

    D = cfg.draws
    m = mask_many(toks, sample_ids, D, "train", cfg.mask_seed, spec)
    rows_n = len(sample_ids) * D
    per_row_pos = np.diff(m.pos_start)  # masked positions of row r
    P = int(per_row_pos.sum())
    n_unique = np.zeros(P, dtype=np.int64)
    entropy = np.zeros(P, dtype=np.float32)
    row_entries: list = [None] * rows_n  # (ids, weights) of row r
    _, head = mlm_parts(model)
    lengths = np.repeat(np.diff(m.start), D)
    for members in plan_batches(lengths, cfg.token_budget, cfg.window):
        arr = collate_rows(m, members, pad_id)
        b = to_batch(arr)
        with torch.inference_mode():
            ids_t = b.input_ids.to(device)
            hm = encode_masked(
                model,
                ids_t,
                b.attention_mask.to(device),
                b.rows.to(device),
                b.cols.to(device),
                q_max=b.q_max,
                padded=b.padded,
            )
            logits = head(hm)
            cnt = per_row_pos[members]
            u = None
            if cfg.method in ("sample", "hybrid"):
                si, k = np.divmod(members, D)
                K_u = cfg.samples if cfg.method == "sample" else 1  # hybrid: one per position
                u = draw_uniforms([sample_ids[i] for i in si], k, cnt, K_u, cfg.seed)
            n, ids, w, ent = sparse_targets(
                logits, cfg.temperature, cfg.method, cfg.samples, u, cfg.head
            )
        n, ids, w, ent = n.numpy(), ids.numpy(), w.numpy(), ent.numpy()
        # scatter back: batch positions are row-major over `members`, each row's positions ascending
        pstart = np.concatenate([[0], np.cumsum(cnt)])
        estart = np.concatenate([[0], np.cumsum(n)])
        for j, r in enumerate(members):
            a, z = pstart[j], pstart[j + 1]
            g0 = m.pos_start[r]
            n_unique[g0 : g0 + (z - a)] = n[a:z]
            entropy[g0 : g0 + (z - a)] = ent[a:z]
            row_entries[r] = (ids[estart[a] : estart[z]], w[estart[a] : estart[z]])
        if on_batch is not None:
            on_batch(b)
    ids_dtype = np.uint16 if vocab < 65536 else np.int32  # hybrid's sentinel id V fits too
    w_dtype = {"sample": np.uint8, "hybrid": np.float32, "topk": np.float16}[cfg.method]
    empty = (np.zeros(0, np.int64), np.zeros(0))
    ids_all = [e[0] if e is not None else empty[0] for e in row_entries]
    w_all = [e[1] if e is not None else empty[1] for e in row_entries]
    row_ent = np.zeros(rows_n + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids_all], out=row_ent[1:])
    return {
        "row_pos": m.pos_start.astype(np.int64),
        "row_ent": row_ent,
        "n_unique": n_unique.astype(np.uint8),
        "entropy": entropy.astype(np.float32),
        "ids": (np.concatenate(ids_all) if ids_all else np.zeros(0)).astype(ids_dtype),
        "weights": (np.concatenate(w_all) if w_all else np.zeros(0)).astype(w_dtype),
    }


def build_cache(
    curriculum, teacher, out_dir, cfg: TeacherCacheConfig, rank=0, world=1
) -> dict | None:
    """Cache this rank's curriculum shards; rank 0 writes teacher_cache.json after all ranks finish."""
    from kdcl_dist import dist
    from kdcl_dist.curriculum.scoring import (
        _fault_hook,
        assign_shards,
        effective_budget,
        load_scoring_model,
        read_shard,
        shard_tokens,
    )
    from kdcl_dist.data.masking import MaskSpec
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from kdcl_dist.kd.models import model_fingerprint

    cur = Path(curriculum)
    if cfg.method == "hybrid" and cfg.head + cfg.samples > 254:
        raise UserError(
            f"teacher_cache.head + teacher_cache.samples = {cfg.head + cfg.samples}: at most 254 "
            "entries per position are stored (uint8 counts); lower --head or --samples"
        )
    if not (cur / "curriculum.json").exists():
        raise UserError(
            f"{cur}: no curriculum.json; pass the directory `kdcl-dist curriculum` wrote"
        )
    ss = ShardSet(cur, "curriculum.json")
    tok = load_tokenizer(str(teacher))
    tok_fp = tokenizer_fingerprint(tok)
    want = (ss.manifest.get("tokenizer") or {}).get("fingerprint")
    if want and want != tok_fp:
        raise UserError(
            f"{teacher}: its tokenizer differs from the one that built {cur / 'curriculum.json'}; "
            "cache with a teacher that shares the student's vocabulary"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = dist.device()
    from kdcl_dist.curriculum.scoring import ScoreConfig

    model = load_scoring_model(
        teacher, ScoreConfig(dtype=cfg.dtype, allow_new_head=cfg.allow_new_head), device
    )
    model = model.eval().to(device)
    vocab = int(model.config.vocab_size)
    spec = MaskSpec.from_tokenizer(tok, TRAIN_MASK_PROB)
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    ident = identity(cfg, model_fingerprint(model), ss.fingerprint, tok_fp, vocab)
    cfg = dataclasses.replace(cfg, token_budget=effective_budget(cfg, device))

    plan = None
    if rank == 0:
        todo = [
            i
            for i in range(ss.num_shards)
            if not _shard_matches(out / shard_dir_name(ss.shards[i]["name"]), ident, ss.shards[i])
        ]
        plan = {"todo": todo, "assign": assign_shards([shard_tokens(ss, i) for i in todo], world)}
        if len(todo) < ss.num_shards:
            log.warning(
                "%d of the %d shards already cached with this teacher and settings; skipping them",
                ss.num_shards - len(todo),
                ss.num_shards,
            )
    plan = dist.broadcast_object(plan) if world > 1 else plan
    mine = [plan["todo"][j] for j in plan["assign"][rank]]
    hook = _fault_hook(rank)
    t0 = time.perf_counter()
    n_tok = 0
    for i in mine:
        entry = ss.shards[i]
        sample_ids, toks = read_shard(ss, i, verify=cfg.verify)
        arrays = cache_shard(model, device, sample_ids, toks, cfg, spec, pad_id, vocab, hook)
        n_tok += int(sum(len(t) for t in toks)) * cfg.draws
        meta = {
            "identity": ident,
            "shard": entry["name"],
            "shard_sha256": entry.get("sha256"),
            "count": len(sample_ids),
            "format_version": FORMAT_VERSION,
        }
        _write_shard(out / shard_dir_name(entry["name"]), arrays, meta)
        if cfg.progress:
            log.info("cached shard %s (%d samples)", entry["name"], len(sample_ids))
    stats = dist.all_gather_object(
        {"rank": rank, "elapsed_s": time.perf_counter() - t0, "tokens": n_tok, "shards": len(mine)}
    )
    if rank != 0:
        return None
    return write_manifest(ss, out, ident, str(teacher), stats)


def write_manifest(ss, out: Path, ident: dict, teacher: str, rank_stats: list) -> dict:
    shards = []
    tot = {"samples": 0, "positions": 0, "entries": 0, "bytes": 0}
    for i, entry in enumerate(ss.shards):
        d = out / shard_dir_name(entry["name"])
        if not _shard_matches(d, ident, entry):
            raise UserError(
                f"{d}: missing or stale after caching (shard {i}); re-run `kdcl-dist teacher-cache`"
            )
        meta = json.loads((d / "meta.json").read_text())
        n_pos = int(np.load(d / "row_pos.npy", mmap_mode="r")[-1])
        n_ent = int(np.load(d / "row_ent.npy", mmap_mode="r")[-1])
        size = sum(meta["sizes"].values())
        shards.append(
            {
                "name": entry["name"],
                "dir": d.name,
                "count": int(entry["count"]),
                "sizes": meta["sizes"],
                "sha256": meta["sha256"],
            }
        )
        tot["samples"] += int(entry["count"])
        tot["positions"] += int(n_pos)
        tot["entries"] += n_ent
        tot["bytes"] += int(size)
    per_m = tot["bytes"] / max(tot["samples"], 1) * 1e6
    elapsed = max((s["elapsed_s"] for s in rank_stats), default=0.0)
    man = {
        "format_version": FORMAT_VERSION,
        "kind": "teacher_cache",
        "identity": ident,
        "teacher": teacher,
        "shards": shards,
        "totals": {
            **tot,
            "entries_per_position": tot["entries"] / max(tot["positions"], 1),
            "bytes_per_position": tot["bytes"] / max(tot["positions"], 1),
            "bytes_per_1M_samples": per_m,
            "bytes_per_1M_samples_per_draw": per_m / ident["draws"],
        },
        "run": {"world_size": len(rank_stats), "elapsed_s": elapsed, "ranks": rank_stats},
    }
    man["fingerprint"] = fingerprint({"identity": ident, "files": [s["sha256"] for s in shards]})
    write_json_atomic(out / MANIFEST, man)
    log.info(
        "teacher cache written to %s: %d samples x %d draw(s), %.1f entries/position, %.1f bytes/position, "
        "%.3g bytes per 1M samples",
        out,
        tot["samples"],
        ident["draws"],
        man["totals"]["entries_per_position"],
        man["totals"]["bytes_per_position"],
        per_m,
    )
    return man


# ---- reading the cache (train --teacher-cache) ------------------------------------------------


def open_cache(
    cache_dir,
    curriculum_manifest: dict,
    *,
    temperature: float,
    draws_needed: int,
    verify: bool = True,
) -> dict:
    """teacher_cache.json checked against the curriculum, τ and the draws the run needs; every
    shard file's size (and sha256 when verify) checked. One-line UserError naming the file."""
    d = Path(cache_dir)
    man = read_json(d / MANIFEST, "teacher cache manifest (run `kdcl-dist teacher-cache` first)")
    fix = "rebuild it with `kdcl-dist teacher-cache` for this curriculum"
    if not isinstance(man, dict) or man.get("kind") != "teacher_cache":
        raise UserError(f"{d / MANIFEST}: not a teacher cache manifest; {fix}")
    ident = man.get("identity") or {}
    if ident.get("curriculum_fingerprint") != curriculum_manifest.get("fingerprint"):
        raise UserError(
            f"{d / MANIFEST}: made for curriculum {ident.get('curriculum_fingerprint')}, this one is "
            f"{curriculum_manifest.get('fingerprint')}; {fix}"
        )
    if abs(float(ident.get("temperature", -1)) - float(temperature)) > 1e-12:
        raise UserError(
            f"{d / MANIFEST}: cached at temperature {ident.get('temperature')}, train.temperature is "
            f"{temperature}; pass --temperature {ident.get('temperature')} or {fix} and --temperature {temperature}"
        )
    if ident.get("mask_prob") != TRAIN_MASK_PROB:
        raise UserError(f"{d / MANIFEST}: cached with mask rate {ident.get('mask_prob')}; {fix}")
    if int(ident.get("draws", 0)) < draws_needed:
        raise UserError(
            f"{d / MANIFEST}: holds {ident.get('draws')} mask draw(s), this run trains {draws_needed} "
            f"epoch(s) (epoch e uses draw e); rebuild with --draws {draws_needed} or train fewer steps"
        )
    names = [s["name"] for s in curriculum_manifest["shards"]]
    if [s.get("name") for s in man.get("shards", [])] != names:
        raise UserError(f"{d / MANIFEST}: its shard list differs from the curriculum's; {fix}")
    for s in man["shards"]:
        sd = d / s["dir"]
        for a in ARRAYS:
            p = sd / f"{a}.npy"
            size = p.stat().st_size if p.exists() else None
            if size != s["sizes"][a]:
                raise UserError(
                    f"{p}: {'missing' if size is None else f'{size} bytes'}, the manifest says "
                    f"{s['sizes'][a]} (cut or foreign file); re-run `kdcl-dist teacher-cache` on {d}"
                )
            if verify and sha256_file(p) != s["sha256"][a]:
                raise UserError(
                    f"{p}: sha256 differs from {d / MANIFEST} (corrupt or foreign file); re-run "
                    f"`kdcl-dist teacher-cache` on {d}"
                )
    return man


class CacheReader:
    """Row (position, epoch) of a checked cache: the sparse targets of its masked positions.

    Arrays are memory-mapped per shard on first use (in each DataLoader worker separately)."""

    def __init__(self, cache_dir, manifest: dict, shards):
        self.dir = Path(cache_dir)
        self.man = manifest
        self.draws = int(manifest["identity"]["draws"])
        self.method = manifest["identity"]["method"]
        self.K = int(manifest["identity"]["samples"])
        self.shards = shards  # the curriculum ShardSet (locate)
        self._open: dict = {}

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_open"] = {}
        return st

    def _arrays(self, shard: int) -> dict:
        a = self._open.get(shard)
        if a is None:
            sd = self.dir / self.man["shards"][shard]["dir"]
            try:
                a = {k: np.load(sd / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in ARRAYS}
            except (OSError, ValueError) as e:
                raise UserError(
                    f"{sd}: unreadable teacher cache shard ({type(e).__name__}: {str(e)[:120]}); "
                    f"re-run `kdcl-dist teacher-cache` on {self.dir}"
                ) from e
            self._open[shard] = a
        return a

    def targets(self, position: int, epoch: int, n_masked: int):
        """(ids [m, u] int64, weights [m, u] float32, entropy [m] float32), padded with weight 0."""
        shard, local = self.shards.locate(int(position))
        a = self._arrays(shard)
        r = local * self.draws + int(epoch)
        p0, p1 = int(a["row_pos"][r]), int(a["row_pos"][r + 1])
        if p1 - p0 != n_masked:
            raise UserError(
                f"{self.dir}: the cache holds {p1 - p0} masked positions for sample {position} draw "
                f"{epoch}, the training mask has {n_masked}; the cache was made with other masks: "
                "rebuild it with `kdcl-dist teacher-cache`"
            )
        nu = np.asarray(a["n_unique"][p0:p1], dtype=np.int64)
        e0, e1 = int(a["row_ent"][r]), int(a["row_ent"][r + 1])
        ids = np.asarray(a["ids"][e0:e1], dtype=np.int64)
        w = np.asarray(a["weights"][e0:e1], dtype=np.float32)
        if self.method == "sample":
            w = w / self.K
        u = int(nu.max()) if len(nu) else 1
        col = np.arange(len(ids)) - np.repeat(np.cumsum(nu) - nu, nu)
        row = np.repeat(np.arange(len(nu)), nu)
        out_ids = np.zeros((len(nu), u), dtype=np.int64)
        out_w = np.zeros((len(nu), u), dtype=np.float32)
        out_ids[row, col] = ids
        out_w[row, col] = w
        return out_ids, out_w, np.asarray(a["entropy"][p0:p1], dtype=np.float32)


def attach_targets(item: dict, reader: CacheReader) -> dict:
    """A CurriculumDataset item with its cached targets (kd_ids, kd_w, kd_ent) added."""
    n_masked = int((np.asarray(item["labels"]) != -100).sum())
    item["kd_ids"], item["kd_w"], item["kd_ent"] = reader.targets(
        item["position"], item["epoch"], n_masked
    )
    return item


def collate_targets(batch: list[dict], out: dict) -> dict:
    """Add the batch's targets to a collated micro-batch: rows in the order of the flattened
    masked labels (sample-major, positions ascending), which is how the engine selects rows."""
    u = max((b["kd_ids"].shape[1] for b in batch), default=1)
    ids = np.concatenate(
        [np.pad(b["kd_ids"], ((0, 0), (0, u - b["kd_ids"].shape[1]))) for b in batch]
    )
    w = np.concatenate([np.pad(b["kd_w"], ((0, 0), (0, u - b["kd_w"].shape[1]))) for b in batch])
    out["kd_ids"] = torch.from_numpy(ids)
    out["kd_w"] = torch.from_numpy(w)
    out["kd_ent"] = torch.from_numpy(np.concatenate([b["kd_ent"] for b in batch]))
    return out


# ---- the loss -------------------------------------------------------------------------------


def sparse_kd_losses(
    student_logits, ids, weights, entropy, labels, lam, temperature: float, n_masked_global: float
) -> dict:
    """`losses.masked_kd_losses` with the cached sparse teacher in place of its logits.

        cross_i = −Σ_j w_ij · log softmax(s_i/τ)[ids_ij]     (E[cross_i] = CE(q_i, p_i) for `sample`)
        kl_i    = cross_i − H(q_i)
        loss    = Σ_i ((1 − λ_i)·ce_i + λ_i·τ²·kl_i) / N

    The student's log-softmax is over the whole vocabulary, so the gradient estimate is
    unbiased too (the paper's point: renormalising over the sampled ids would bias it)."""
    from kdcl_dist.kd.losses import IGNORE_INDEX, _lam

    s = student_logits.float()
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(s, labels.clamp_min(0), reduction="none") * valid
    log_ps = F.log_softmax(s / temperature, dim=-1)
    V = log_ps.shape[-1]
    # id V (hybrid's baseline entry) stands for Σ_v log p_v: b·Σ_v log p_v exactly
    sentinel = ids >= V
    picked = torch.where(
        sentinel, log_ps.sum(-1, keepdim=True), log_ps.gather(1, ids.clamp(max=V - 1))
    )
    cross = -(weights * picked).sum(-1)
    tau2 = float(temperature) ** 2
    kl_t = tau2 * (cross - entropy) * valid
    n = float(max(n_masked_global, 1.0))
    lam_t = _lam(lam, ce)
    loss = ((1.0 - lam_t) * ce + lam_t * kl_t).sum() / n
    return {"loss": loss, "mlm": ce.sum().detach() / n, "kd": kl_t.sum().detach() / n}


def cached_step_terms(s_logits, mb: dict, labels, lam_tok, temperature, n_masked, device):
    """(loss terms, top-1 agreement count as a device tensor) of one micro-batch from its cached targets; the
    agreement is with each position's largest stored weight (the most sampled id)."""
    ids = mb["kd_ids"].to(device)
    w = mb["kd_w"].to(device)
    res = sparse_kd_losses(
        s_logits, ids, w, mb["kd_ent"].to(device), labels, lam_tok, temperature, n_masked
    )
    top_w = w.masked_fill(ids >= s_logits.shape[-1], float("-inf"))  # not hybrid's baseline
    top = ids.gather(1, top_w.argmax(-1, keepdim=True)).squeeze(1)
    sel = labels != -100
    agree = (s_logits.detach()[sel].argmax(-1) == top[sel]).sum()
    return res, agree


# ---- the hook into `train` --------------------------------------------------------------------


def open_for_train(cfg, cur_manifest: dict, shards, student_tok_fp: str, total_steps: int):
    """(CacheReader, mask seed) for `train --teacher-cache`, every check done before any model:
    curriculum, τ, tokenizer, the draws the run needs (its last epoch + 1) and --mask-seed."""
    from kdcl_dist.curriculum.order import OrderSpec, global_batch_items

    spec = OrderSpec(
        mode=cfg.order,
        seed=cfg.seed,
        pacing_f0=cfg.pacing_f0,
        pacing_steps=cfg.pacing_steps or None,
    )
    _, epochs = global_batch_items(spec, len(shards), cfg.global_batch, total_steps - 1)
    man = open_cache(
        cfg.teacher_cache,
        cur_manifest,
        temperature=cfg.temperature,
        draws_needed=int(np.max(epochs)) + 1,
    )
    ident = man["identity"]
    where = Path(cfg.teacher_cache) / MANIFEST
    if ident.get("tokenizer_fingerprint") != student_tok_fp:
        raise UserError(
            f"{where}: cached with tokenizer {ident.get('tokenizer_fingerprint')}, the student's is "
            f"{student_tok_fp}; KD needs one vocabulary: rebuild the cache with a matching teacher"
        )
    seed = int(ident["mask_seed"])
    if cfg.mask_seed is not None and int(cfg.mask_seed) != seed:
        raise UserError(
            f"train.mask_seed: {cfg.mask_seed}, but {where} covers the masks of mask seed {seed}; "
            "omit --mask-seed (the cache's is used) or rebuild the cache with --mask-seed"
        )
    return CacheReader(cfg.teacher_cache, man, shards), seed


class CachedCurriculumDataset(CurriculumDataset):
    """A CurriculumDataset whose items carry their cached targets (kd_ids, kd_w, kd_ent)."""

    def __init__(self, reader: CacheReader, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reader = reader

    def __getitem__(self, key):
        return attach_targets(super().__getitem__(key), self.reader)
