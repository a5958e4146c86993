"""Distributed scoring pass: each sample's masked-LM loss under the scoring model (docs/design.md §2, §4.2).

Definition (the curriculum's difficulty). For a sample x with token ids and K fixed masks
m_1..m_K (``mask_sample(ids, id, draw=k, purpose="score", seed)``, k = 0..K-1; each mask
selects round(0.15·n_candidates) non-special positions, 80/10/10 BERT corruption)::

    score(x) = sum_k sum_{i in m_k} CE(p_model(x_i | x~m_k), x_i)  /  sum_k |m_k|

i.e. the mean cross-entropy (nats) over *all* masked tokens of *all* K draws. Because
every draw of a sample masks the same number of tokens, this equals the mean of the K
per-draw mean losses. K = 1 is the paper's single random mask (noisy); the default is 2.

Work split: rank 0 lists the shards still to score and assigns them to ranks balanced
by tokens (`assign_shards`, LPT), then broadcasts the plan; one score file per source
shard (``<shard>.scores.npz``: ids, score, masked-token count, token count, info),
written atomically. A re-run skips every shard whose file matches (model fingerprint,
K, seed, dataset fingerprint, dtype, mask rate), so a killed job resumes shard-wise;
an unreadable (cut, corrupt) score file counts as unscored.

Batching: the K masked rows of every sample of a shard are sorted by length within
windows of ``window`` rows and packed greedily so that rows × padded length stays within
``token_budget``; padding is excluded by the attention mask and never enters a loss, so a
score does not depend on the batch it landed in (equal to float round-off across token
budgets, bit-identical across world sizes, since batches are formed per source shard).
Host side: a shard's batch plan is made from its lengths, then its batches are prepared a
chunk (~64k tokens) at a time: the masks of the chunk's samples for all K draws come from
`mask_many` (mask_sample's output, row by row, at a fraction of the cost), batches are
collated with whole-array numpy ops; a helper thread prepares the next chunk, or
`score.workers` processes prepare parts of shards ahead of the model (auto: on GPU only).
Model computation (`Scorer`): embeddings and all encoder layers but the last on every
position; the last layer after its key/value projections, and the LM head, on the masked
positions only (`kd.models.encode_masked`; exact, tested against the HF forward).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcl_dist import FORMAT_VERSION
from kdcl_dist.config import option
from kdcl_dist.data.masking import MaskedRows, MaskSpec, mask_many, mask_sample
from kdcl_dist.data.reader import ShardSet, has_file
from kdcl_dist.errors import UserError
from kdcl_dist.utils import atomic_path, fingerprint, read_json, sha256_file, write_json_atomic

log = logging.getLogger("kdcl_dist.score")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE = ("last", "exclude")
DEFINITION = (
    "mean masked-token cross-entropy (nats) over all masked tokens of K fixed masks "
    "mask_sample(ids, id, draw=k, purpose='score', seed), k=0..K-1"
)


@dataclass
class ScoreConfig:
    masks: int = option(2, help="K fixed masks per sample (the paper used 1)", min=1, max=64)
    seed: int = option(1234, help="seed of the fixed scoring masks")
    mask_prob: float = option(
        0.15, help="share of non-special tokens masked per draw", min=0.01, max=0.9
    )
    token_budget: int = option(
        0,
        help="max rows x padded length per batch; 0 = auto: "
        f"{4096} on CPU (cache-sized, measured), {65536} on GPU",
        min=0,
    )
    window: int = option(
        8192, help="rows sorted by length together before packing (bounds memory)", min=1
    )
    dtype: str = option("fp32", help="model dtype; bf16/fp16 only on GPU", choices=tuple(DTYPES))
    nonfinite: str = option(
        "last", help="policy for non-finite scores in the curriculum", choices=NONFINITE
    )
    threads: int = option(0, help="torch CPU threads per rank (0: leave torch's default)", min=0)
    progress: bool = option(True, help="tqdm progress bar on rank 0")
    allow_new_head: bool = option(
        False,
        help="score with a checkpoint whose MLM head is missing (freshly "
        "initialised from seed 0: noise scores); refused by default",
    )
    log_every: float = option(10.0, help="seconds between throughput log lines", min=0.1)
    verify: bool = option(
        True, help="check each source shard's sha256 (dataset.json) before scoring it"
    )
    prefetch: bool = option(
        True,
        help="prepare the next chunk of batches in a helper thread while scoring (when workers=0)",
    )
    workers: int = option(
        -1,
        help="processes preparing batches (read, verify, mask, collate) ahead of the model; "
        "-1 = auto: min(8, this rank's CPUs - 1) on GPU, 0 on CPU (the model needs the cores)",
        min=-1,
        max=256,
    )


AUTO_BUDGET = {"cpu": 4096, "cuda": 65536}


def effective_workers(cfg: ScoreConfig, device: torch.device, n_shards: int) -> int:
    """Preparation processes to use: the configured count, or auto (-1): on a GPU
    min(8, CPUs of this rank - 1), where a node's CPUs are shared by its local ranks; 0 on
    CPU. Never more than the shards to prepare."""
    w = int(cfg.workers)
    if w < 0:
        if device.type == "cpu":
            w = 0
        else:
            try:
                cpus = len(os.sched_getaffinity(0))
            except AttributeError:
                cpus = os.cpu_count() or 1
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            w = min(8, max(0, cpus // local - 1))
    return max(0, min(w, n_shards))


def effective_budget(cfg: ScoreConfig, device: torch.device) -> int:
    """The token budget to use: the configured one, or the device's default when 0 (auto).

    CPU: 4096 tokens keeps a batch's activations (rows x length x hidden/FFN) near the
    cache; larger batches gain nothing in matmul efficiency on a CPU and lose in memory
    traffic (bench: 16384 tokens was ~15% slower for the tiny student). GPU: large batches.
    """
    return int(cfg.token_budget) or AUTO_BUDGET.get(device.type, AUTO_BUDGET["cuda"])


# ---- reading a source shard ------------------------------------------------------------

_NPY_DTYPES: dict[bytes, np.dtype] = {}


def _ids_from_npy(blob, offset: int = 0, size: int | None = None) -> np.ndarray:
    """Decode `.npy` bytes of a 1-D array without np.load's per-call overhead: the array in
    blob[offset:offset+size] (all of blob by default), a view of it."""
    size = len(blob) - offset if size is None else int(size)
    head = bytes(blob[offset : offset + min(size, 12)])
    if head[6] == 1:
        hlen, start = int.from_bytes(head[8:10], "little"), 10
    else:
        hlen, start = int.from_bytes(head[8:12], "little"), 12
    header = bytes(blob[offset + start : offset + start + hlen])
    dt = _NPY_DTYPES.get(header)
    if dt is None:
        d = ast.literal_eval(header.decode("latin1"))
        if d.get("fortran_order") or len(d.get("shape", ())) != 1:
            from kdcl_dist.data.shards import decode_ids

            return decode_ids(bytes(blob[offset : offset + size]))
        dt = _NPY_DTYPES.setdefault(header, np.dtype(d["descr"]))
    body = start + hlen
    if (size - body) % dt.itemsize:
        raise ValueError(f"npy member of {size} bytes is not whole {dt} items")
    return np.frombuffer(blob, dtype=dt, count=(size - body) // dt.itemsize, offset=offset + body)


_READ_BLOCK = 1 << 20  # bytes read (and hashed) at a time from a local shard file


class TokenRows:
    """Token ids of consecutive samples in one array: sample i is flat[start[i]:start[i+1]]
    (what a prepared shard keeps: no Python object per sample but its id)."""

    def __init__(self, flat: np.ndarray, start: np.ndarray):
        self.flat, self.start = flat, start

    def __len__(self) -> int:
        return len(self.start) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.start[i] : self.start[i + 1]]

    @property
    def ntok(self) -> np.ndarray:
        return np.diff(self.start)

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> TokenRows:
        ntok = np.fromiter((len(t) for t in arrays), dtype=np.int64, count=len(arrays))
        start = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(ntok, out=start[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)
        return cls(flat, start)


def read_shard(
    ss: ShardSet,
    shard: int,
    verify: bool = False,
    lo: int = 0,
    hi: int | None = None,
    rows: bool = False,
) -> tuple[list[str], list[np.ndarray]]:
    """(sample ids, token id arrays) of one shard: one sequential read, sliced by the offset index.

    verify: check the bytes against the size and sha256 in the manifest (hashed as they are
    read), so a corrupt shard is a one-line error, not scores. lo, hi: only samples lo..hi-1
    are decoded (every sample's members are checked to lie in the file, so a truncated shard
    fails on any range). A local file is read in blocks of `_READ_BLOCK` bytes, holding only
    the block a sample lies in (the file is several times its tokens: tar headers, metadata,
    padding); a remote one in one read. rows: the token ids as one `TokenRows` (decoded
    straight from the blocks; no object per sample) instead of an array per sample.
    """
    idx = ss.index(shard)
    entry = ss.shards[shard]
    path = ss.dir / entry["name"]
    mo_a, ms_a = idx["meta_offset"], idx["meta_size"]
    io_a, is_a = idx["ids_offset"], idx["ids_size"]
    n = len(idx["keys"])
    hi = n if hi is None else min(int(hi), n)
    lo = min(int(lo), hi)
    starts, ends = np.minimum(mo_a, io_a), np.maximum(mo_a + ms_a, io_a + is_a)
    ordered = bool(np.all(starts[1:] >= ends[:-1])) if n else True
    if ss.store is not None or not ordered:
        blob = ss.shard_bytes(shard, verify=verify)
        _check_members(idx, path, len(blob))
        ids, toks = _decode_samples(blob, 0, idx, lo, hi)
        return (ids, TokenRows.of(toks)) if rows else (ids, toks)
    if not path.exists():
        raise UserError(f"{path}: shard listed in {ss.manifest_path.name} is missing")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        want = entry.get("sha256") if verify else None
        if verify and entry.get("bytes") and size != entry["bytes"]:
            raise UserError(
                f"{path}: {size} bytes, {ss.manifest_path.name} records {entry['bytes']}; "
                f"the shard is truncated or corrupt, {ss._rerun_hint()}"
            )
        _check_members(idx, path, size)
        h = hashlib.sha256() if want else None
        base = 0  # file offset of buf[0]
        if h is None and lo < hi:  # nothing to hash: start at the first sample wanted
            base = int(starts[lo])
            f.seek(base)
        buf = bytearray()
        ids, toks, err = [], [], None
        blocks: list[np.ndarray] = []  # rows: each pass's token ids, concatenated
        lens: list[int] = []
        j = lo
        while True:
            while j < hi and ends[j] <= base + len(buf):  # samples wholly in the buffer
                try:
                    a, b = _decode_samples(buf, base, idx, j, j + 1, view=rows)
                except Exception as e:  # corrupt bytes: reported after the hash check
                    if h is None:
                        raise
                    err, j = e, hi
                    break
                ids += a
                toks += b
                j += 1
            a = b = None
            if rows and toks:  # copy the views out: the buffer can be resized again
                lens += [len(t) for t in toks]
                blocks.append(np.concatenate(toks))
                toks = []
            keep = int(starts[j]) if j < hi else base + len(buf)
            if keep > base:  # drop what no remaining sample needs
                cut = min(keep - base, len(buf))
                del buf[:cut]
                base += cut
            if j >= hi and h is None:
                break
            block = f.read(_READ_BLOCK)
            if not block:
                break
            if h is not None:
                h.update(block)
            if j < hi:
                buf += block
            else:
                base += len(block)
        if h is not None and h.hexdigest() != want:
            got = h.hexdigest()
            raise UserError(
                f"{path}: sha256 {got[:16]}... differs from {want[:16]}... recorded in "
                f"{ss.manifest_path.name}; the shard is corrupt, {ss._rerun_hint()}"
            )
        if err is not None:
            raise err
        if j < hi:
            raise UserError(f"{path}: truncated shard (short read); re-create it")
    if rows:
        ntok = np.array(lens, dtype=np.int64)
        start = np.zeros(len(ntok) + 1, dtype=np.int64)
        np.cumsum(ntok, out=start[1:])
        flat = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.uint16)
        return ids, TokenRows(flat, start)
    return ids, toks


def _check_members(idx: dict, path, size: int) -> None:
    mo_a, ms_a = idx["meta_offset"], idx["meta_size"]
    io_a, is_a = idx["ids_offset"], idx["ids_size"]
    bad = (mo_a < 0) | (io_a < 0) | (mo_a + ms_a > size) | (io_a + is_a > size)
    if bad.any():
        raise UserError(
            f"{path}: sample {idx['keys'][int(np.flatnonzero(bad)[0])]} is missing a member or "
            "the shard is truncated; re-create it"
        )


def _decode_samples(blob, base: int, idx: dict, lo: int, hi: int, view: bool = False):
    """(ids, token arrays) of samples lo..hi-1 from `blob`, the file's bytes from offset `base`.
    view: the arrays are views of `blob` (no copy; drop them before `blob` is resized)."""
    ids, toks = [], []
    for j in range(lo, hi):
        mo, ms = int(idx["meta_offset"][j]) - base, int(idx["meta_size"][j])
        io_, is_ = int(idx["ids_offset"][j]) - base, int(idx["ids_size"][j])
        ids.append(str(json.loads(blob[mo : mo + ms])["id"]))
        if view:
            toks.append(_ids_from_npy(blob, io_, is_))
        else:
            toks.append(_ids_from_npy(bytes(blob[io_ : io_ + is_])))
    return ids, toks


# ---- batch plan --------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] int64 (int32 when compact), padded with pad_id
    attention_mask: (
        torch.Tensor | None
    )  # [B, L]; None when compact (built from lengths on the device)
    rows: torch.Tensor  # [M] row of each masked position
    cols: torch.Tensor  # [M] column of each masked position
    targets: torch.Tensor  # [M] original token ids
    sample: np.ndarray  # [B] sample index (within the shard) of each row
    n_tokens: int  # real (non-pad) tokens in the batch
    lengths: torch.Tensor | None = None  # [B] real tokens of each row (compact batches)
    q_max: int | None = None  # most masked positions in one row (known here: no GPU sync)
    padded: bool | None = None  # any row shorter than the batch (decides the attention mask)


def mask_rows(
    sample_ids: list[str], toks: list[np.ndarray], masks: int, seed: int, spec: MaskSpec
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(sample index, masked input ids, masked positions) for every sample and draw (pure).

    Row r = i*masks + k. (Reference form, row by row; the pass uses `mask_many`, same rows.)"""
    rows = []
    for i, (sid, t) in enumerate(zip(sample_ids, toks)):
        for k in range(masks):
            inp, lab = mask_sample(t, sid, k, "score", seed, spec)
            rows.append((i, inp, np.flatnonzero(lab >= 0)))
    return rows


def plan_batches(lengths: np.ndarray, token_budget: int, window: int) -> list[np.ndarray]:
    """Row indices of each batch: length-sorted within windows, packed to the token budget.

    Rows are sorted (stable) by length inside consecutive windows of `window` rows; a batch
    takes rows while (rows + 1) x the longest row fits the budget. A row longer than the
    budget forms a batch of its own.
    """
    batches: list[np.ndarray] = []
    n = len(lengths)
    budget = int(token_budget)
    for w0 in range(0, n, window):
        order = w0 + np.argsort(lengths[w0 : w0 + window], kind="stable")
        ls = lengths[order].tolist()  # ascending within the window: the newest row is the longest
        j, m = 0, len(ls)
        while j < m:
            # rows j..e-1 fit while (e - j) x ls[e-1] <= budget (ls ascending); always >= 1 row
            e = j + 1
            while e < m and (e + 1 - j) * ls[e] <= budget:
                e += 1
            batches.append(order[j:e])
            j = e
    return batches


# Batch arrays: compact numpy (int32 ids, lengths instead of an attention mask: ~6 bytes per
# token), picklable through a worker pipe without shared-memory handles:
# (input_ids [B, L] int32 padded, lengths [B] int64, rows [M] int32, cols [M] int32,
#  targets [M] int32, sample [B] int64, n_tokens)
BatchArrays = tuple


def collate_rows(m: MaskedRows, members: np.ndarray, pad_id: int) -> BatchArrays:
    """The batch of rows `members` of `mask_many`'s output, built with whole-array numpy ops.

    Same content as the row-by-row form: rows padded on the right with pad_id, the masked
    positions of row b (ascending) in order of b, their original ids."""
    K = m.draws
    members = np.asarray(members, dtype=np.int64)
    si, k = np.divmod(members, K)
    a = m.start[si]
    lens = m.start[si + 1] - a
    B = len(members)
    L = int(lens.max()) if B else 0
    ar = np.arange(L, dtype=np.int64)
    valid = ar[None, :] < lens[:, None]
    T = m.inputs.shape[1]
    if T:
        idx = np.minimum(a[:, None] + ar[None, :], T - 1)
        inp = np.where(valid, m.inputs[k[:, None], idx], np.int64(pad_id)).astype(np.int32)
    else:
        inp = np.full((B, L), pad_id, dtype=np.int32)
    p0 = m.pos_start[members]
    cnt = m.pos_start[members + 1] - p0
    M = int(cnt.sum())
    rows = np.repeat(np.arange(B, dtype=np.int32), cnt)
    first = np.zeros(B, dtype=np.int64)
    np.cumsum(cnt[:-1], out=first[1:])
    cols = m.pos[np.repeat(p0 - first, cnt) + np.arange(M, dtype=np.int64)]
    targets = m.flat[np.repeat(a, cnt) + cols].astype(np.int32)
    return inp, lens, rows, cols.astype(np.int32), targets, si, int(lens.sum())


def to_batch(arr: BatchArrays, compact: bool = False) -> Batch:
    """Tensors of a batch. compact=False: int64 tensors and the attention mask, built here (the
    CPU path); compact=True: the int32 arrays as they are and the lengths, widened and the
    mask built on the device by `Scorer` (less to copy to a GPU, no host work)."""
    inp, lens, rows, cols, targets, sample, n_tok = arr
    t = torch.from_numpy
    # facts the device would otherwise be asked for at every batch (a sync each time on a GPU)
    q_max = int(np.bincount(rows).max()) if len(rows) else 0
    padded = bool(len(lens) and int(lens.min()) < inp.shape[1])
    if compact:
        return Batch(
            t(inp), None, t(rows), t(cols), t(targets), sample, n_tok, t(lens), q_max, padded
        )
    att = (np.arange(inp.shape[1], dtype=np.int64)[None, :] < lens[:, None]).astype(np.int64)
    return Batch(
        t(inp.astype(np.int64)),
        t(att),
        t(rows.astype(np.int64)),
        t(cols.astype(np.int64)),
        t(targets.astype(np.int64)),
        sample,
        n_tok,
        None,
        q_max,
        padded,
    )


def check_token_ids(sample_ids, toks) -> None:
    """UserError unless every token id lies in [0, 2**31) (the compact batches are int32)."""
    if not len(toks):
        return
    flat = toks.flat if isinstance(toks, TokenRows) else np.concatenate(toks)
    if len(flat) and (int(flat.max()) >= 2**31 or int(flat.min()) < 0):
        raise UserError(
            f"token ids outside [0, 2**31) in a shard of {sample_ids[0]!r}...; re-create the shards "
            "with the model's tokenizer"
        )


def shard_batch_arrays(
    sample_ids, toks, cfg: ScoreConfig, spec: MaskSpec, pad_id: int
) -> list[BatchArrays]:
    """All batches of one shard as numpy arrays: mask (all rows at once), plan, collate.

    (Reference form, the whole shard at once; the pass uses `chunked_batch_arrays`, same batches.)"""
    m = mask_many(toks, sample_ids, cfg.masks, "score", cfg.seed, spec)
    if len(m.flat) and (int(m.flat.max()) >= 2**31 or int(m.flat.min()) < 0):
        raise UserError(
            f"token ids outside [0, 2**31) in a shard of {sample_ids[0]!r}...; re-create the shards "
            "with the model's tokenizer"
        )
    lengths = np.repeat(np.diff(m.start), cfg.masks)
    return [
        collate_rows(m, members, pad_id)
        for members in plan_batches(lengths, cfg.token_budget, cfg.window)
    ]


# Padded tokens (rows x longest row) of the batches prepared together: the masks and collated
# arrays of one chunk are what preparation holds at a time (~50 bytes per token at K = 2).
CHUNK_TOKENS = 1 << 16


def chunked_batch_arrays(
    sample_ids,
    toks,
    cfg: ScoreConfig,
    spec: MaskSpec,
    pad_id: int,
    first: int = 0,
    chunk_tokens: int | None = None,
):
    """Yield the batches of `shard_batch_arrays` (same arrays, same order) in lists ("chunks")
    of consecutive batches of about `chunk_tokens` padded tokens, so that preparing a shard
    holds one chunk's masks and batches at a time, not the shard's.

    The whole plan is made first (from the lengths alone); each chunk then masks only the
    samples its batches take rows of (all K draws; a mask depends only on the sample's id, the
    draw and the seed) and collates from those. `first`: added to each batch's sample index
    (when `sample_ids` are samples first.. of a shard whose rows start on a window boundary).
    Token ids are not range-checked here (`check_token_ids`)."""
    K = int(cfg.masks)
    chunk_tokens = CHUNK_TOKENS if chunk_tokens is None else int(chunk_tokens)
    if isinstance(toks, TokenRows):
        ntok = toks.ntok
    else:
        ntok = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
    lengths = np.repeat(ntok, K)
    plan = plan_batches(lengths, cfg.token_budget, cfg.window)
    j = 0
    while j < len(plan):
        e, total = j, 0
        while e < len(plan):
            t = len(plan[e]) * int(lengths[plan[e]].max())
            if e > j and total + t > chunk_tokens:
                break
            total += t
            e += 1
        members = plan[j:e]
        samples = np.unique(np.concatenate(members) // K)
        m = mask_many(
            [toks[i] for i in samples.tolist()],
            [sample_ids[i] for i in samples.tolist()],
            K,
            "score",
            cfg.seed,
            spec,
        )
        out = []
        for rows in members:
            i, k = np.divmod(rows, K)
            inp, lens, r, c, tg, si, nt = collate_rows(
                m, np.searchsorted(samples, i) * K + k, pad_id
            )
            out.append((inp, lens, r, c, tg, samples[si] + first, nt))
        del m, members
        yield out
        j = e


def batches_for_shard(sample_ids, toks, cfg: ScoreConfig, spec: MaskSpec, pad_id: int):
    """Yield the collated batches of one shard (targets filled from the unmasked ids), prepared
    a chunk at a time."""
    check_token_ids(sample_ids, toks)
    for chunk in chunked_batch_arrays(sample_ids, toks, cfg, spec, pad_id):
        for j in range(len(chunk)):
            a, chunk[j] = chunk[j], None
            yield to_batch(a)
            del a


def shard_tokens(ss: ShardSet, shard: int) -> int:
    """Approximate token count of a shard from its offset index (token-array bytes / item size)."""
    idx = ss.index(shard)
    n = len(idx["ids_size"])
    payload = int(np.sum(idx["ids_size"])) - 128 * n  # minus the .npy headers (128 bytes each)
    return max(n, payload // 2)


def assign_shards(costs: list[int], world: int) -> list[list[int]]:
    """Indices into `costs` for each rank: largest first to the least-loaded rank (LPT).

    Pure and deterministic (ties broken by index and rank), so every rank can check it;
    balancing by tokens instead of shard count keeps ranks finishing together when shard
    sizes differ (the last shard of a set, filtered documents, a re-run's leftovers).
    Each rank's list is in ascending shard order.
    """
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(j)
        load[r] += costs[j]
    return [sorted(x) for x in out]


# ---- the model computation ------------------------------------------------------------


class Scorer:
    """Masked-positions-only model computation: CE per masked token, summed per row.

    All encoder layers but the last run on every position; the last layer (after its
    key/value projections) and the LM head run on the masked positions only
    (`kd.models.encode_masked`, exact). `masked_only=False` runs the whole encoder and
    slices the masked positions before the head (the previous computation; kept for
    models `encode_masked` does not know and for comparison).
    """

    def __init__(self, model, device: torch.device, masked_only: bool = True):
        from kdcl_dist.kd.models import mlm_parts, supports_encode_masked

        self.model = model.eval().to(device)
        self.encoder, self.head = mlm_parts(self.model)
        if self.head is None:
            raise UserError(
                f"{type(model).__name__}: no known MLM head to split off; supported: BERT, DistilBERT"
            )
        self.masked_only = bool(masked_only) and supports_encode_masked(self.model)
        self.device = device

    @torch.inference_mode()
    def losses(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row CE sum as float64, per-row masked count) for one batch, on the model's device.

        No host sync here: on a GPU the caller copies a whole shard's sums back at once.
        Host tensors are pinned first on CUDA so the copies run asynchronously."""
        from kdcl_dist.kd.models import encode_masked, row_counts

        dev = self.device
        ids, rows, cols, tgt = (
            self._to_dev(t).long() for t in (b.input_ids, b.rows, b.cols, b.targets)
        )
        if b.attention_mask is None:  # compact batch: the mask from the row lengths, on the device
            lens = self._to_dev(b.lengths)
            att = (torch.arange(ids.shape[1], device=dev)[None, :] < lens[:, None]).long()
        else:
            att = self._to_dev(b.attention_mask)
        if self.masked_only:
            hm = encode_masked(self.model, ids, att, rows, cols, q_max=b.q_max, padded=b.padded)
        else:
            hm = self.encoder(input_ids=ids, attention_mask=att).last_hidden_state[rows, cols]
        ce = self.token_ce(hm, tgt)
        B = ids.shape[0]
        sums = torch.zeros(B, dtype=torch.float64, device=dev).index_add_(0, rows, ce.double())
        counts = row_counts(rows, B)  # not torch.bincount: on CUDA it syncs to size its output
        return sums, counts

    def _to_dev(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda" or t.device.type == "cuda":
            return t.to(self.device)
        return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)

    def token_ce(self, hm: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """fp32 cross-entropy of each masked position's full-vocabulary prediction.

        (Producing the logits in cache-sized row chunks was measured: no gain at the CPU
        token budget, so one block.)"""
        return torch.nn.functional.cross_entropy(self.head(hm).float(), targets, reduction="none")


class ShardResult:
    """A shard's per-sample sums, filled batch by batch into buffers allocated once per shard.

    Nothing of a batch outlives its turn: each batch's per-row results are copied out and its
    tensors released. (Keeping every batch's small result tensors and sample arrays until the
    shard ended made the host memory grow with every batch: those small live allocations sat
    between the batches' freed activation buffers, which could then neither be merged nor
    returned to the system, up to ~0.6 GB for one 5,000-sample shard with the tiny model.)

    On the CPU the sums are added to the per-sample arrays at once (`np.add.at`, batch order).
    On a GPU each batch's per-row sums are copied, on the device and without waiting for it,
    into one row buffer allocated per shard; `finish` brings it back in one copy and adds it in
    the same batch order. Both orders equal the earlier concatenate-then-add, bitwise.
    """

    def __init__(
        self, n_samples: int, n_rows: int, device: torch.device, buffered: bool | None = None
    ):
        self.n = int(n_samples)
        self.loss = np.zeros(self.n, dtype=np.float64)
        self.masked = np.zeros(self.n, dtype=np.int64)
        # buffered: the GPU form (row buffer on `device`, one copy back); default on any device but the CPU
        self.on_device = device.type != "cpu" if buffered is None else bool(buffered)
        self.rows = 0
        if self.on_device:
            self.sample = np.empty(int(n_rows), dtype=np.int64)
            self.dev_sums = torch.empty(int(n_rows), dtype=torch.float64, device=device)
            self.dev_counts = torch.empty(int(n_rows), dtype=torch.int64, device=device)

    def add(self, sample: np.ndarray, sums: torch.Tensor, counts: torch.Tensor) -> None:
        B = len(sample)
        if self.on_device:
            if self.rows + B > len(self.sample):
                raise RuntimeError(
                    f"shard result: {self.rows + B} rows scored, {len(self.sample)} expected"
                )
            self.sample[self.rows : self.rows + B] = sample
            self.dev_sums[self.rows : self.rows + B].copy_(sums, non_blocking=True)
            self.dev_counts[self.rows : self.rows + B].copy_(counts, non_blocking=True)
        else:
            np.add.at(self.loss, sample, sums.numpy())
            np.add.at(self.masked, sample, counts.numpy())
        self.rows += B

    def finish(self, ntok) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score float64, masked count int64, token count int64)."""
        if self.on_device and self.rows:
            r = self.rows
            np.add.at(self.loss, self.sample[:r], self.dev_sums[:r].cpu().numpy())
            np.add.at(self.masked, self.sample[:r], self.dev_counts[:r].cpu().numpy())
            self.dev_sums = self.dev_counts = None
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(self.masked > 0, self.loss / np.maximum(self.masked, 1), np.nan)
        return score, self.masked, np.asarray(ntok, dtype=np.int64)


def launch_shard(
    scorer: Scorer, batches, n_samples: int, n_rows: int, on_batch=None
) -> ShardResult:
    """Run the model over a shard's batches (`n_rows` rows of `n_samples` samples in all); each
    batch's results are copied into the shard's `ShardResult` and the batch released. On a GPU
    nothing waits for the device here. `ShardResult.finish` gives the arrays."""
    res = ShardResult(n_samples, n_rows, scorer.device)
    for b in batches:
        sums, counts = scorer.losses(b)
        res.add(b.sample, sums, counts)
        del sums, counts
        if on_batch is not None:
            on_batch(b)
        del b
    return res


def finish_shard(launched: ShardResult, n: int, ntok) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score float64, masked count int64, token count int64) of a launched shard."""
    assert launched.n == n, (launched.n, n)
    return launched.finish(ntok)


def score_arrays(
    scorer: Scorer,
    sample_ids,
    toks,
    cfg: ScoreConfig,
    spec: MaskSpec,
    pad_id: int,
    on_batch=None,
    batches=None,
):
    """Score one shard's samples: (score float64, masked count int64, token count int64).

    batches: the shard's collated batches when prepared ahead (else built here, lazily)."""
    n = len(sample_ids)
    ntok = np.fromiter((len(t) for t in toks), dtype=np.int64, count=n)
    launched = launch_shard(
        scorer,
        batches if batches is not None else batches_for_shard(sample_ids, toks, cfg, spec, pad_id),
        n,
        n * cfg.masks,
        on_batch,
    )
    return finish_shard(launched, n, ntok)


def _batches_released(arrays: list, compact: bool):
    """The tensors of each prepared batch in turn; each batch's arrays are dropped from the
    shard's list once handed out, so the shard's prepared input shrinks as it is scored."""
    for j in range(len(arrays)):
        a, arrays[j] = arrays[j], None
        yield to_batch(a, compact)
        del a


def _as_batches(arrays, compact: bool):
    """The tensors of each batch of an iterable of batch arrays, one at a time."""
    for a in arrays:
        yield to_batch(a, compact)
        del a


def _defer_writes(device: torch.device) -> bool:
    """Write shard k's score file after shard k+1's batches are queued on the device, so the
    GPU does not idle while the host copies back, writes and fetches the next shard. Not on
    CPU: there the model runs inside the launch (nothing to overlap), and a kill would lose
    more finished work."""
    return device.type == "cuda"


# ---- score files ---------------------------------------------------------------------------


def score_file_name(shard_name: str) -> str:
    return shard_name[: -len(".tar")] + ".scores.npz"


def identity(model_fp: str, cfg: ScoreConfig, dataset_fp: str) -> dict:
    """What a score file must match to be reused (token budget and world size do not matter)."""
    return {
        "model_fingerprint": model_fp,
        "masks": cfg.masks,
        "seed": cfg.seed,
        "dataset_fingerprint": dataset_fp,
        "dtype": cfg.dtype,
        "mask_prob": cfg.mask_prob,
    }


def write_score_file(path: Path, ids, score, masked, ntok, info: dict) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.asarray(ids, dtype=str),
        score=score.astype(np.float64),
        masked=masked.astype(np.int32),
        tokens=ntok.astype(np.int32),
        info=np.asarray(json.dumps(info, sort_keys=True)),
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_score_file(path: Path) -> dict:
    """The arrays and info of a score file; UserError (naming the file and the fix) if it is
    missing, cut short or corrupt (a cut .npz is a broken zip: BadZipFile/EOFError/ValueError)."""
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("ids", "score", "masked", "tokens")}
            out["info"] = json.loads(str(z["info"]))
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        RuntimeError,
        NotImplementedError,
        zipfile.BadZipFile,
        zlib.error,
        json.JSONDecodeError,
    ) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: unreadable score file ({type(e).__name__}: {reason}); "
            "re-run `kdcl-dist score` with the same arguments (it re-scores that shard)"
        ) from e
    n = len(out["ids"])
    if any(len(out[k]) != n for k in ("score", "masked", "tokens")):
        raise UserError(
            f"{path}: score file arrays differ in length; re-run `kdcl-dist score` with the same "
            "arguments (it re-scores that shard)"
        )
    return out


def existing_matches(path: Path, ident: dict, shard_entry: dict) -> bool:
    if not path.exists():
        return False
    try:
        info = read_score_file(path)["info"]
    except UserError:
        return False
    return all(info.get(k) == v for k, v in ident.items()) and info.get(
        "shard_sha256"
    ) == shard_entry.get("sha256")


# ---- global progress (no collectives: ranks score different amounts) -----------------------


class Progress:
    """Each rank writes its done counts to `<out>/.progress/rank-N.json`; rank 0 sums them.

    Files rather than all_reduce because ranks hold different numbers of batches: a
    collective in the loop would have to be matched by every rank.
    """

    def __init__(self, out: Path, rank: int, world: int, total: int, show: bool):
        self.dir = out / ".progress"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.total = rank, world, total
        self.samples = self.tokens = 0
        self.t0 = time.perf_counter()
        self._last_write = self._last_log = self.t0
        self.bar = None
        if (
            show and rank == 0 and total > 0
        ):  # a bar on a terminal only: the periodic log lines cover the rest
            from kdcl_dist.progress import progress_bar

            self.bar = progress_bar(
                total, "score", "sample", lines=False, dynamic_ncols=True, mininterval=1.0
            )
        self._shown = 0
        # zero this rank's counts now: a file left by an earlier (killed) run must not count
        self._write()

    def add(self, samples: int, tokens: int, log_every: float, force: bool = False) -> None:
        self.samples += samples
        self.tokens += tokens
        now = time.perf_counter()
        if force or now - self._last_write >= 1.0:
            self._write()
            self._last_write = now
            if self.rank == 0:
                g_samples, g_tokens = self._global()
                if self.bar is not None:
                    self.bar.update(max(0, min(g_samples, self.total) - self._shown))
                    self._shown = min(g_samples, self.total)
                if now - self._last_log >= log_every or force:
                    dt = max(now - self.t0, 1e-9)
                    log.info(
                        "scored %d/%d samples, %.0f tokens/s (all ranks), %.0f tokens/s (rank 0)",
                        g_samples,
                        self.total,
                        g_tokens / dt,
                        self.tokens / dt,
                    )
                    self._last_log = now

    def _write(self) -> None:
        # A plain write, not temp+rename: the file is advisory (the reader skips a torn one),
        # and a time-driven rename would make the number of file renames of a run depend on
        # its speed (the fault suite kills ranks at seeded rename/batch counts).
        (self.dir / f"rank-{self.rank}.json").write_text(
            json.dumps({"samples": self.samples, "tokens": self.tokens})
        )

    def _global(self) -> tuple[int, int]:
        s = t = 0
        for r in range(self.world):
            p = self.dir / f"rank-{r}.json"
            try:
                d = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            s += int(d.get("samples", 0))
            t += int(d.get("tokens", 0))
        return s, t

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fault_hook(rank: int):
    """Test hook: KDCL_TEST_KILL_AT="rank:batches" makes that rank SIGKILL itself part-way."""
    spec = os.environ.get("KDCL_TEST_KILL_AT")
    if not spec:
        return None
    r, n = (int(x) for x in spec.split(":"))
    if r != rank:
        return None
    state = {"n": 0}

    def hook(_b):
        state["n"] += 1
        if state["n"] >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


# ---- preparing shards ahead of the model -----------------------------------------------------


# Samples a worker prepares as one item at least (rounded up to whole windows): its batches
# travel to the scoring process as one message, so this bounds what the workers hand over.
PART_SAMPLES = 2048


def part_samples(window: int, masks: int, target: int | None = None) -> int:
    """Samples per part of a shard: the smallest multiple of lcm(window, K)/K that is >= target,
    so that a part's rows (r = i*K + k) are whole windows of the shard's batch plan and its
    batches are exactly the shard's batches over those rows."""
    unit = math.lcm(int(window), int(masks)) // int(masks)
    target = PART_SAMPLES if target is None else int(target)
    return unit * max(1, -(-target // unit))


@dataclass
class _Head:  # a shard's first event: its sample count and its first (or only) ids/lengths
    n: int
    sample_ids: list
    ntok: np.ndarray


@dataclass
class _Piece:  # the ids/lengths of a later part of the shard (worker items)
    sample_ids: list
    ntok: np.ndarray


_END = object()  # a shard's last event


class PreparedShard:
    """One shard as the scoring loop takes it: `n` samples; `batches` yields its batch arrays
    as they are prepared (a chunk at a time), each dropped from its chunk once handed out;
    `sample_ids` and `ntok` are complete once `batches` is exhausted."""

    def __init__(self, head: _Head, next_event):
        self.n = int(head.n)
        self._ids, self._ntok = [head.sample_ids], [head.ntok]
        self.done = False
        self.batches = self._batches(next_event)

    def _batches(self, next_event):
        while True:
            ev = next_event()
            if ev is _END:
                self.done = True
                return
            if isinstance(ev, UserError):
                self.done = True
                raise ev
            if isinstance(ev, _Piece):
                self._ids.append(ev.sample_ids)
                self._ntok.append(ev.ntok)
                continue
            for j in range(len(ev)):  # a chunk: list of batch arrays
                a, ev[j] = ev[j], None
                yield a
                del a
            del ev

    @property
    def sample_ids(self) -> list:
        return [s for part in self._ids for s in part]

    @property
    def ntok(self) -> np.ndarray:
        return np.concatenate(self._ntok) if self._ntok else np.zeros(0, np.int64)


class ShardPrep(torch.utils.data.Dataset):
    """Preparation of the shards `shards` (read, verify, mask, plan, collate), a chunk of batches
    at a time (`chunked_batch_arrays`).

    `shard_events(pos)`: the events of shard `shards[pos]` (a `_Head`, its chunks, `_END`; or
    the UserError that reading it raised, returned, not raised, so it reaches the caller as one
    line), lazily: one read of the shard, then one chunk at a time (helper thread / inline).
    As a Dataset (DataLoader workers), item k is part `parts[k]`: samples lo..hi-1 of a shard,
    whole windows of its plan (`part_samples`), as (pos, lo, sample ids, token counts, batch
    arrays) or a UserError. The first part of a shard verifies the file (the later parts read
    the same file, after that part reached the caller, and decode only their samples)."""

    def __init__(
        self,
        ss: ShardSet,
        shards: list[int],
        cfg: ScoreConfig,
        spec: MaskSpec,
        pad_id: int,
        part_size: int | None = None,
    ):
        self.ss, self.shards, self.cfg, self.spec, self.pad_id = ss, list(shards), cfg, spec, pad_id
        size = part_size or part_samples(cfg.window, cfg.masks)
        if (size * cfg.masks) % cfg.window:
            raise ValueError(f"part of {size} samples is not whole windows of {cfg.window} rows")
        self.parts: list[tuple[int, int, int, bool]] = []  # (pos, lo, hi, last part of the shard)
        for pos, i in enumerate(self.shards):
            n = int(ss.shards[i]["count"])
            los = list(range(0, n, size)) or [0]
            for lo in los:
                self.parts.append((pos, lo, lo + size, lo == los[-1]))

    def __len__(self) -> int:
        return len(self.parts)

    def _read(self, pos: int, lo: int = 0, hi: int | None = None):
        sample_ids, toks = read_shard(
            self.ss, self.shards[pos], verify=self.cfg.verify and lo == 0, lo=lo, hi=hi, rows=True
        )
        check_token_ids(sample_ids, toks)
        return sample_ids, toks, toks.ntok

    def _chunks(self, sample_ids, toks, first: int = 0):
        return chunked_batch_arrays(sample_ids, toks, self.cfg, self.spec, self.pad_id, first=first)

    def shard_events(self, pos: int):
        try:
            sample_ids, toks, ntok = self._read(pos)
        except UserError as e:
            yield e
            return
        yield _Head(len(sample_ids), sample_ids, ntok)
        yield from self._chunks(sample_ids, toks)
        yield _END

    def __getitem__(self, k: int):
        pos, lo, hi, _last = self.parts[k]
        try:
            sample_ids, toks, ntok = self._read(pos, lo, hi)
        except UserError as e:
            return e
        batches = [a for chunk in self._chunks(sample_ids, toks, lo) for a in chunk]
        return pos, lo, sample_ids, ntok, batches


def _as_is(x):
    return x


def _worker_events(prep: ShardPrep, it):
    """The event stream of `prep`'s shards from the DataLoader's part items (in order)."""
    parts = prep.parts
    k = 0
    while k < len(parts):
        pos, lo, _hi, last = parts[k]
        got = next(it)
        k += 1
        if isinstance(got, UserError):
            yield got
            while not last:  # the rest of this shard is not used
                last = parts[k][3]
                next(it)
                k += 1
            continue
        _pos, _lo, sample_ids, ntok, batches = got
        del got
        if lo == 0:
            yield _Head(int(prep.ss.shards[prep.shards[pos]]["count"]), sample_ids, ntok)
        else:
            yield _Piece(sample_ids, ntok)
        yield batches
        del batches
        if last:
            yield _END


def _inline_events(prep: ShardPrep):
    for pos in range(len(prep.shards)):
        yield from prep.shard_events(pos)


def prepared_shards(prep: ShardPrep, workers: int, prefetch: bool = True):
    """Generator over `prep`'s shards in order, each a `PreparedShard` (or the UserError that
    reading it raised), whose batches are prepared a chunk at a time: by `workers` DataLoader
    processes (an item is a part of a shard, whole windows of it: `ShardPrep.parts`; numpy
    arrays travel through the worker pipe, no shared-memory handles), else by one helper thread
    one chunk ahead (prefetch, across shards too), else inline. A shard's batches must be
    consumed before the next shard is asked for (what is left of them is skipped then), and
    the generator kept open until they are. Closing it stops the workers/thread."""
    n = len(prep.shards)
    pool = loader_it = None
    if workers > 0:
        loader = torch.utils.data.DataLoader(
            prep,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=_as_is,
            prefetch_factor=2,
        )
        loader_it = iter(loader)
        events = _worker_events(prep, loader_it)
        next_event = events.__next__
    elif prefetch:
        events = _inline_events(prep)
        pool = ThreadPoolExecutor(1, thread_name_prefix="kdcl-score-prep")
        state = {"next": pool.submit(next, events, _END)}

        def next_event():
            ev = state["next"].result()
            state["next"] = pool.submit(next, events, _END)
            return ev
    else:
        events = _inline_events(prep)
        next_event = events.__next__
    try:
        prev = None
        for _ in range(n):
            if prev is not None and not prev.done:
                for _a in prev.batches:  # the caller left part of the previous shard
                    pass
            ev = next_event()
            if isinstance(ev, UserError):
                prev = None
                yield ev
                continue
            prev = PreparedShard(ev, next_event)
            del ev
            yield prev
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if loader_it is not None:
            shutdown = getattr(loader_it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del loader_it
        events.close()


# ---- the stage ---------------------------------------------------------------------------


def load_scoring_model(model_name: str, cfg: ScoreConfig, device: torch.device):
    from kdcl_dist.kd.models import load_mlm

    if cfg.dtype != "fp32" and device.type != "cuda":
        raise UserError(f"score.dtype: {cfg.dtype} needs a GPU; use dtype=fp32 on CPU")
    return load_mlm(
        str(model_name),
        dtype=DTYPES[cfg.dtype],
        role="scoring model",
        purpose="scores",
        new_head="allow" if cfg.allow_new_head else "refuse",
    )


def precheck_head(model_name, allow: bool, purpose: str) -> None:
    """Refuse a local checkpoint without MLM head before anything is written (the load checks again)."""
    from kdcl_dist.kd.models import checkpoint_lacks_head, new_head_error

    head = None if allow else checkpoint_lacks_head(model_name)
    if head:
        raise new_head_error(str(model_name), head, purpose)


def score_shards(
    shards_dir,
    model_name,
    out_dir,
    cfg: ScoreConfig,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
) -> dict | None:
    """Score this rank's source shards; rank 0 writes `scores.json` after all ranks finish.

    Returns the scores.json content on rank 0 (None on other ranks). Requires a process
    group when world > 1 (for the final barrier and the gather of per-shard summaries).
    """
    from kdcl_dist import dist
    from kdcl_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from kdcl_dist.kd.models import check_model_path, model_fingerprint

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ss = (
        ShardSet(shards_dir, "dataset.json")
        if has_file(shards_dir, "dataset.json")
        else ShardSet(shards_dir)
    )
    dataset_fp = ss.fingerprint
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = device or dist.device()
    check_model_path(model_name)  # a missing model is named as such, not as a tokenizer
    tok = load_tokenizer(str(model_name))
    # a tokenizer without a mask token is refused here, before the model is loaded
    spec = MaskSpec.from_tokenizer(tok, mask_prob=cfg.mask_prob)
    model = load_scoring_model(model_name, cfg, device)
    want_tok = (ss.manifest.get("tokenizer") or {}).get("fingerprint")
    if want_tok and tokenizer_fingerprint(tok) != want_tok:
        raise UserError(
            f"{model_name}: its tokenizer differs from the one that built {ss.manifest_path} "
            "(fingerprints differ); score with a model trained on the shards' tokenizer"
        )
    if model.config.vocab_size < len(tok):
        raise UserError(
            f"{model_name}: model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({len(tok)})"
        )
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    model_fp = model_fingerprint(model)
    ident = identity(model_fp, cfg, dataset_fp)
    scorer = Scorer(model, device)
    cfg = dataclasses.replace(cfg, token_budget=effective_budget(cfg, device))

    # Rank 0 decides the work: which shards still need scoring (a matching score file is
    # kept) and which rank scores each, balanced by tokens; all ranks receive the same plan.
    # (Also the synchronisation point: rank 0 has read every existing file before any rank
    # writes one.)
    plan = None
    if rank == 0:
        todo_all = [
            i
            for i in range(ss.num_shards)
            if not existing_matches(
                out / score_file_name(ss.shards[i]["name"]), ident, ss.shards[i]
            )
        ]
        costs = [shard_tokens(ss, i) for i in todo_all]
        plan = {
            "todo": todo_all,
            "assign": assign_shards(costs, world),
            "total": sum(ss.shards[i]["count"] for i in todo_all),
        }
    plan = dist.broadcast_object(plan) if world > 1 else plan
    todo = [plan["todo"][j] for j in plan["assign"][rank]]
    total = plan["total"]
    skipped = ss.num_shards - len(plan["todo"])
    if skipped and rank == 0:
        log.warning(
            "%d of the %d shards already scored with this model/K/seed; skipping them",
            skipped,
            ss.num_shards,
        )
    if rank == 0:
        log.info(
            "scoring %d samples in %d shards on %d rank(s); model %s (%s), K=%d, seed=%d, budget=%d tokens",
            total,
            len(plan["todo"]),
            world,
            model_name,
            model_fp,
            cfg.masks,
            cfg.seed,
            cfg.token_budget,
        )
    prog = Progress(out, rank, world, total, cfg.progress)
    hook = _fault_hook(rank)
    t0, c0 = time.perf_counter(), time.process_time()

    prep = ShardPrep(ss, todo, cfg, spec, pad_id)
    compact = device.type == "cuda"
    workers = effective_workers(cfg, device, len(todo))
    # Preparation (read, verify, mask, plan, collate) runs ahead of the model: in `workers`
    # processes (a DataLoader over this rank's shards, results in shard order, so scores do
    # not depend on the worker count), else in one helper thread (prefetch). An error in a
    # shard surfaces when that shard's turn comes, after the earlier shards are written.
    source = prepared_shards(prep, workers, cfg.prefetch)
    defer = _defer_writes(device)

    def write(pending):
        entry, sample_ids, ntok_i, launched = pending
        score, masked, ntok = finish_shard(launched, len(sample_ids), ntok_i)
        info = {
            **ident,
            "shard": entry["name"],
            "shard_sha256": entry.get("sha256"),
            "count": len(sample_ids),
            "definition": DEFINITION,
            "format_version": FORMAT_VERSION,
        }
        write_score_file(
            out / score_file_name(entry["name"]), sample_ids, score, masked, ntok, info
        )
        prog.add(len(sample_ids), 0, cfg.log_every)

    def on_batch(b, _hook=hook):
        prog.add(0, b.n_tokens, cfg.log_every)
        if _hook is not None:
            _hook(b)

    pending = None
    try:
        for i in todo:
            got = next(source)
            if isinstance(got, UserError):
                if pending is not None:  # the earlier shards are written first
                    write(pending)
                    pending = None
                raise got
            launched = launch_shard(
                scorer,
                _as_batches(got.batches, compact),
                got.n,
                got.n * cfg.masks,
                on_batch,
            )
            sample_ids, ntok_i = got.sample_ids, got.ntok
            del got
            if pending is not None:
                write(pending)
            pending = (ss.shards[i], sample_ids, ntok_i, launched)
            if not defer:
                write(pending)
                pending = None
        if pending is not None:
            write(pending)
    finally:
        source.close()  # no worker process or thread outlives the call (an error included)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    prog.add(0, 0, cfg.log_every, force=True)
    # elapsed_s: this rank's scoring loop (read, mask, batch, model, write), wall clock; the
    # run's figure is the max over ranks. cpu_s: CPU time of this process in that loop (on a
    # shared machine it shows what the work cost without the time other jobs took the core).
    rank_stats = {
        "rank": rank,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "tokens": prog.tokens,
        "samples": prog.samples,
        "shards": len(todo),
        "setup_s": t0 - t_start,
    }
    stats = dist.all_gather_object(rank_stats)
    prog.close()
    if rank != 0:
        return None
    return write_scores_manifest(ss, out, ident, cfg, str(model_name), stats)


def write_scores_manifest(
    ss: ShardSet, out: Path, ident: dict, cfg: ScoreConfig, model_name: str, rank_stats: list[dict]
) -> dict:
    shards, nonfinite = [], 0
    tot = {"samples": 0, "tokens": 0, "masked_tokens": 0}
    for i, entry in enumerate(ss.shards):
        path = out / score_file_name(entry["name"])
        if not existing_matches(path, ident, entry):
            raise UserError(
                f"{path}: missing or stale after scoring (shard {i}); re-run `kdcl-dist score`"
            )
        d = read_score_file(path)
        if len(d["ids"]) != entry["count"]:
            raise UserError(
                f"{path}: {len(d['ids'])} scores for a shard of {entry['count']} samples; delete it and re-run"
            )
        nf = int((~np.isfinite(d["score"])).sum())
        nonfinite += nf
        shards.append(
            {
                "name": entry["name"],
                "file": path.name,
                "count": int(entry["count"]),
                "nonfinite": nf,
                "tokens": int(d["tokens"].sum()),
                "masked_tokens": int(d["masked"].sum()),
                "sha256": sha256_file(path),
            }
        )
        tot["samples"] += int(entry["count"])
        tot["tokens"] += int(d["tokens"].sum())
        tot["masked_tokens"] += int(d["masked"].sum())
    elapsed = max((s["elapsed_s"] for s in rank_stats), default=0.0)
    scored_tokens = sum(s["tokens"] for s in rank_stats)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "scores",
        **ident,
        "model": model_name,
        "definition": DEFINITION,
        "nonfinite_policy": cfg.nonfinite,
        "shards": shards,
        "totals": {**tot, "nonfinite": nonfinite},
        "run": {
            "world_size": len(rank_stats),
            "token_budget": cfg.token_budget,
            "elapsed_s": elapsed,
            "scored_tokens": scored_tokens,
            "tokens_per_s": scored_tokens / elapsed if elapsed > 0 else None,
            "ranks": rank_stats,
        },
    }
    manifest["fingerprint"] = fingerprint({"ident": ident, "files": [s["sha256"] for s in shards]})
    write_json_atomic(out / "scores.json", manifest)
    if nonfinite:
        log.warning(
            "%d samples have a non-finite score; policy '%s' applies in `kdcl-dist curriculum`",
            nonfinite,
            cfg.nonfinite,
        )
    log.info(
        "scores written to %s (%d samples, %d scored tokens in %.1f s: %.0f tokens/s)",
        out,
        tot["samples"],
        scored_tokens,
        elapsed,
        scored_tokens / elapsed if elapsed > 0 else math.nan,
    )
    return manifest


def load_scores_manifest(scores_dir, dataset_manifest: dict | None = None) -> dict:
    """scores.json, checked against the dataset manifest (fingerprint, shard list)."""
    d = Path(scores_dir)
    man = read_json(d / "scores.json", "scores manifest (run `kdcl-dist score` first)")
    if man.get("kind") != "scores":
        raise UserError(f"{d / 'scores.json'}: not a scores manifest (kind={man.get('kind')!r})")
    if dataset_manifest is not None:
        want = dataset_manifest.get("fingerprint")
        if man.get("dataset_fingerprint") != want:
            raise UserError(
                f"{d / 'scores.json'}: scores were made for dataset fingerprint {man.get('dataset_fingerprint')}, "
                f"but the shards have {want}; re-run `kdcl-dist score` on these shards (or pass the matching --shards)"
            )
        names = [s["name"] for s in dataset_manifest["shards"]]
        if [s["name"] for s in man["shards"]] != names:
            raise UserError(
                f"{d / 'scores.json'}: its shard list differs from the dataset's; re-run `kdcl-dist score`"
            )
    return man


def read_listed_score_file(scores_dir, entry: dict) -> dict:
    """The score file of one `scores.json` shard entry, its count checked."""
    d = Path(scores_dir)
    a = read_score_file(d / entry["file"])
    if len(a["ids"]) != entry["count"]:
        raise UserError(
            f"{d / entry['file']}: holds {len(a['ids'])} scores, scores.json says {entry['count']}; "
            "re-run scoring"
        )
    return a


def load_scores(scores_dir, dataset_manifest: dict | None = None) -> tuple[dict, list[dict]]:
    """(scores.json, per-shard arrays in source-shard order), checked against the dataset."""
    man = load_scores_manifest(scores_dir, dataset_manifest)
    return man, [read_listed_score_file(scores_dir, s) for s in man["shards"]]
