"""Distributed scoring pass: each sample's masked-LM loss under the scoring model (DESIGN §2, §4.2).

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
Model computation (`Scorer`): embeddings and all encoder layers but the last on every
position; the last layer after its key/value projections, and the LM head, on the masked
positions only (`kd.models.encode_masked`; exact, tested against the HF forward).
"""

from __future__ import annotations

import ast
import dataclasses
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
from kdcl_dist.data.masking import MaskSpec, mask_sample
from kdcl_dist.data.reader import ShardSet
from kdcl_dist.errors import UserError
from kdcl_dist.utils import atomic_path, fingerprint, read_json, sha256_file, write_json_atomic

log = logging.getLogger("kdcl_dist.score")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE = ("last", "exclude")
DEFINITION = ("mean masked-token cross-entropy (nats) over all masked tokens of K fixed masks "
              "mask_sample(ids, id, draw=k, purpose='score', seed), k=0..K-1")


@dataclass
class ScoreConfig:
    masks: int = option(2, help="K fixed masks per sample (the paper used 1)", min=1, max=64)
    seed: int = option(1234, help="seed of the fixed scoring masks")
    mask_prob: float = option(0.15, help="share of non-special tokens masked per draw", min=0.01, max=0.9)
    token_budget: int = option(0, help="max rows x padded length per batch; 0 = auto: "
                               f"{4096} on CPU (cache-sized, measured), {65536} on GPU", min=0)
    window: int = option(8192, help="rows sorted by length together before packing (bounds memory)", min=1)
    dtype: str = option("fp32", help="model dtype; bf16/fp16 only on GPU", choices=tuple(DTYPES))
    nonfinite: str = option("last", help="policy for non-finite scores in the curriculum", choices=NONFINITE)
    threads: int = option(0, help="torch CPU threads per rank (0: leave torch's default)", min=0)
    progress: bool = option(True, help="tqdm progress bar on rank 0")
    log_every: float = option(10.0, help="seconds between throughput log lines", min=0.1)
    verify: bool = option(True, help="check each source shard's sha256 (dataset.json) before scoring it")
    prefetch: bool = option(True, help="prepare the next shard's batches in a helper thread while scoring")


AUTO_BUDGET = {"cpu": 4096, "cuda": 65536}


def effective_budget(cfg: ScoreConfig, device: torch.device) -> int:
    """The token budget to use: the configured one, or the device's default when 0 (auto).

    CPU: 4096 tokens keeps a batch's activations (rows x length x hidden/FFN) near the
    cache; larger batches gain nothing in matmul efficiency on a CPU and lose in memory
    traffic (bench: 16384 tokens was ~15% slower for the tiny student). GPU: large batches.
    """
    return int(cfg.token_budget) or AUTO_BUDGET.get(device.type, AUTO_BUDGET["cuda"])


# ---- reading a source shard ------------------------------------------------------------

_NPY_DTYPES: dict[bytes, np.dtype] = {}


def _ids_from_npy(blob: bytes) -> np.ndarray:
    """Decode `.npy` bytes of a 1-D array without np.load's per-call overhead."""
    if blob[6] == 1:
        hlen, start = int.from_bytes(blob[8:10], "little"), 10
    else:
        hlen, start = int.from_bytes(blob[8:12], "little"), 12
    header = blob[start:start + hlen]
    dt = _NPY_DTYPES.get(header)
    if dt is None:
        d = ast.literal_eval(header.decode("latin1"))
        if d.get("fortran_order") or len(d.get("shape", ())) != 1:
            from kdcl_dist.data.shards import decode_ids

            return decode_ids(blob)
        dt = _NPY_DTYPES.setdefault(header, np.dtype(d["descr"]))
    return np.frombuffer(blob, dtype=dt, offset=start + hlen)


def read_shard(ss: ShardSet, shard: int, verify: bool = False) -> tuple[list[str], list[np.ndarray]]:
    """(sample ids, token id arrays) of one shard: one sequential read, sliced by the offset index.

    verify: check the bytes against the size and sha256 in the manifest first (one hash
    pass over bytes already in memory), so a corrupt shard is a one-line error, not scores.
    """
    idx = ss.index(shard)
    path = ss.dir / ss.shards[shard]["name"]
    if not path.exists():
        raise UserError(f"{path}: shard listed in {ss.manifest_path.name} is missing")
    blob = path.read_bytes()
    if verify and hasattr(ss, "verify_shard"):
        ss.verify_shard(shard, blob)
    ids, toks = [], []
    for j in range(len(idx["keys"])):
        mo, ms = int(idx["meta_offset"][j]), int(idx["meta_size"][j])
        io_, is_ = int(idx["ids_offset"][j]), int(idx["ids_size"][j])
        if mo < 0 or io_ < 0 or mo + ms > len(blob) or io_ + is_ > len(blob):
            raise UserError(f"{path}: sample {idx['keys'][j]} is missing a member or the shard is truncated; re-create it")
        ids.append(str(json.loads(blob[mo:mo + ms])["id"]))
        toks.append(_ids_from_npy(blob[io_:io_ + is_]))
    return ids, toks


# ---- batch plan --------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L] int64, padded with pad_id
    attention_mask: torch.Tensor  # [B, L]
    rows: torch.Tensor            # [M] row of each masked position
    cols: torch.Tensor            # [M] column of each masked position
    targets: torch.Tensor         # [M] original token ids
    sample: np.ndarray            # [B] sample index (within the shard) of each row
    n_tokens: int                 # real (non-pad) tokens in the batch


def mask_rows(sample_ids: list[str], toks: list[np.ndarray], masks: int, seed: int,
              spec: MaskSpec) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(sample index, masked input ids, masked positions) for every sample and draw (pure)."""
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
    for w0 in range(0, n, window):
        order = w0 + np.argsort(lengths[w0:w0 + window], kind="stable")
        cur: list[int] = []
        longest = 0
        for r in order:
            L = int(lengths[r])
            if cur and (len(cur) + 1) * max(longest, L) > token_budget:
                batches.append(np.asarray(cur))
                cur, longest = [], 0
            cur.append(int(r))
            longest = max(longest, L)
        if cur:
            batches.append(np.asarray(cur))
    return batches


def collate(rows, members: np.ndarray, pad_id: int) -> Batch:
    L = max(len(rows[r][1]) for r in members)
    B = len(members)
    inp = np.full((B, L), pad_id, dtype=np.int64)
    att = np.zeros((B, L), dtype=np.int64)
    rr, cc, sample = [], [], np.empty(B, dtype=np.int64)
    n_tok = 0
    for b, r in enumerate(members):
        si, x, pos = rows[r]
        inp[b, :len(x)] = x
        att[b, :len(x)] = 1
        rr.append(np.full(len(pos), b, dtype=np.int64))
        cc.append(pos)
        sample[b] = si
        n_tok += len(x)
    rows_t = torch.from_numpy(np.concatenate(rr)) if rr else torch.zeros(0, dtype=torch.long)
    cols_t = torch.from_numpy(np.concatenate(cc).astype(np.int64)) if cc else torch.zeros(0, dtype=torch.long)
    inp_t = torch.from_numpy(inp)
    return Batch(inp_t, torch.from_numpy(att), rows_t, cols_t, inp_t.new_empty(0), sample, n_tok)


def batches_for_shard(sample_ids, toks, cfg: ScoreConfig, spec: MaskSpec, pad_id: int):
    """Yield the collated batches of one shard (targets filled from the unmasked ids)."""
    rows = mask_rows(sample_ids, toks, cfg.masks, cfg.seed, spec)
    lengths = np.fromiter((len(r[1]) for r in rows), dtype=np.int64, count=len(rows))
    for members in plan_batches(lengths, cfg.token_budget, cfg.window):
        b = collate(rows, members, pad_id)
        tgt = [np.asarray(toks[rows[r][0]], dtype=np.int64)[rows[r][2]] for r in members]
        b.targets = torch.from_numpy(np.concatenate(tgt)) if tgt else torch.zeros(0, dtype=torch.long)
        yield b


def shard_tokens(ss: ShardSet, shard: int) -> int:
    """Approximate token count of a shard from its offset index (token-array bytes / item size)."""
    idx = ss.index(shard)
    n = len(idx["ids_size"])
    payload = int(np.sum(idx["ids_size"])) - 128 * n   # minus the .npy headers (128 bytes each)
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
            raise UserError(f"{type(model).__name__}: no known MLM head to split off; supported: BERT, DistilBERT")
        self.masked_only = bool(masked_only) and supports_encode_masked(self.model)
        self.device = device

    @torch.inference_mode()
    def losses(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row CE sum as float64, per-row masked count) for one batch."""
        from kdcl_dist.kd.models import encode_masked

        dev = self.device
        ids = b.input_ids.to(dev, non_blocking=True)
        att = b.attention_mask.to(dev, non_blocking=True)
        rows, cols = b.rows.to(dev, non_blocking=True), b.cols.to(dev, non_blocking=True)
        if self.masked_only:
            hm = encode_masked(self.model, ids, att, rows, cols)
        else:
            hm = self.encoder(input_ids=ids, attention_mask=att).last_hidden_state[rows, cols]
        ce = self.token_ce(hm, b.targets.to(dev, non_blocking=True))
        B = ids.shape[0]
        sums = torch.zeros(B, dtype=torch.float64, device=dev).index_add_(0, rows, ce.double())
        counts = torch.bincount(rows, minlength=B)
        return sums.cpu(), counts.cpu()

    def token_ce(self, hm: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """fp32 cross-entropy of each masked position's full-vocabulary prediction.

        (Producing the logits in cache-sized row chunks was measured: no gain at the CPU
        token budget, so one block.)"""
        return torch.nn.functional.cross_entropy(self.head(hm).float(), targets, reduction="none")


def score_arrays(scorer: Scorer, sample_ids, toks, cfg: ScoreConfig, spec: MaskSpec, pad_id: int,
                 on_batch=None, batches=None):
    """Score one shard's samples: (score float64, masked count int64, token count int64).

    batches: the shard's collated batches when prepared ahead (else built here, lazily)."""
    n = len(sample_ids)
    loss = np.zeros(n, dtype=np.float64)
    masked = np.zeros(n, dtype=np.int64)
    for b in (batches if batches is not None else batches_for_shard(sample_ids, toks, cfg, spec, pad_id)):
        sums, counts = scorer.losses(b)
        np.add.at(loss, b.sample, sums.numpy())
        np.add.at(masked, b.sample, counts.numpy())
        if on_batch is not None:
            on_batch(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(masked > 0, loss / np.maximum(masked, 1), np.nan)
    ntok = np.fromiter((len(t) for t in toks), dtype=np.int64, count=n)
    return score, masked, ntok


# ---- score files ---------------------------------------------------------------------------

def score_file_name(shard_name: str) -> str:
    return shard_name[: -len(".tar")] + ".scores.npz"


def identity(model_fp: str, cfg: ScoreConfig, dataset_fp: str) -> dict:
    """What a score file must match to be reused (token budget and world size do not matter)."""
    return {"model_fingerprint": model_fp, "masks": cfg.masks, "seed": cfg.seed,
            "dataset_fingerprint": dataset_fp, "dtype": cfg.dtype, "mask_prob": cfg.mask_prob}


def write_score_file(path: Path, ids, score, masked, ntok, info: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(ids, dtype=str), score=score.astype(np.float64),
             masked=masked.astype(np.int32), tokens=ntok.astype(np.int32),
             info=np.asarray(json.dumps(info, sort_keys=True)))
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
    except (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile, zlib.error,
            json.JSONDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: unreadable score file ({type(e).__name__}: {reason}); "
                        "re-run `kdcl-dist score` with the same arguments (it re-scores that shard)") from e
    n = len(out["ids"])
    if any(len(out[k]) != n for k in ("score", "masked", "tokens")):
        raise UserError(f"{path}: score file arrays differ in length; re-run `kdcl-dist score` with the same "
                        "arguments (it re-scores that shard)")
    return out


def existing_matches(path: Path, ident: dict, shard_entry: dict) -> bool:
    if not path.exists():
        return False
    try:
        info = read_score_file(path)["info"]
    except UserError:
        return False
    return all(info.get(k) == v for k, v in ident.items()) and info.get("shard_sha256") == shard_entry.get("sha256")


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
        if show and rank == 0 and total > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="sample", desc="score", dynamic_ncols=True, mininterval=1.0)
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
                    log.info("scored %d/%d samples, %.0f tokens/s (all ranks), %.0f tokens/s (rank 0)",
                             g_samples, self.total, g_tokens / dt, self.tokens / dt)
                    self._last_log = now

    def _write(self) -> None:
        # A plain write, not temp+rename: the file is advisory (the reader skips a torn one),
        # and a time-driven rename would make the number of file renames of a run depend on
        # its speed (the fault suite kills ranks at seeded rename/batch counts).
        (self.dir / f"rank-{self.rank}.json").write_text(json.dumps({"samples": self.samples, "tokens": self.tokens}))

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


# ---- the stage ---------------------------------------------------------------------------

def load_scoring_model(model_name: str, cfg: ScoreConfig, device: torch.device):
    from kdcl_dist.kd.models import load_mlm

    if cfg.dtype != "fp32" and device.type != "cuda":
        raise UserError(f"score.dtype: {cfg.dtype} needs a GPU; use dtype=fp32 on CPU")
    return load_mlm(str(model_name), dtype=DTYPES[cfg.dtype])


def score_shards(shards_dir, model_name, out_dir, cfg: ScoreConfig, rank: int = 0, world: int = 1,
                 device: torch.device | None = None) -> dict | None:
    """Score this rank's source shards; rank 0 writes `scores.json` after all ranks finish.

    Returns the scores.json content on rank 0 (None on other ranks). Requires a process
    group when world > 1 (for the final barrier and the gather of per-shard summaries).
    """
    from kdcl_dist import dist
    from kdcl_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from kdcl_dist.kd.models import model_fingerprint

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ss = ShardSet(shards_dir, "dataset.json") if (Path(shards_dir) / "dataset.json").exists() else ShardSet(shards_dir)
    dataset_fp = ss.fingerprint
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = device or dist.device()
    model = load_scoring_model(model_name, cfg, device)
    tok = load_tokenizer(str(model_name))
    want_tok = (ss.manifest.get("tokenizer") or {}).get("fingerprint")
    if want_tok and tokenizer_fingerprint(tok) != want_tok:
        raise UserError(f"{model_name}: its tokenizer differs from the one that built {ss.manifest_path} "
                        "(fingerprints differ); score with a model trained on the shards' tokenizer")
    if model.config.vocab_size < len(tok):
        raise UserError(f"{model_name}: model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({len(tok)})")
    spec = MaskSpec.from_tokenizer(tok, mask_prob=cfg.mask_prob)
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
        todo_all = [i for i in range(ss.num_shards)
                    if not existing_matches(out / score_file_name(ss.shards[i]["name"]), ident, ss.shards[i])]
        costs = [shard_tokens(ss, i) for i in todo_all]
        plan = {"todo": todo_all, "assign": assign_shards(costs, world), "total": sum(ss.shards[i]["count"] for i in todo_all)}
    plan = dist.broadcast_object(plan) if world > 1 else plan
    todo = [plan["todo"][j] for j in plan["assign"][rank]]
    total = plan["total"]
    skipped = ss.num_shards - len(plan["todo"])
    if skipped and rank == 0:
        log.warning("%d of the %d shards already scored with this model/K/seed; skipping them", skipped, ss.num_shards)
    if rank == 0:
        log.info("scoring %d samples in %d shards on %d rank(s); model %s (%s), K=%d, seed=%d, budget=%d tokens",
                 total, len(plan["todo"]), world, model_name, model_fp, cfg.masks, cfg.seed, cfg.token_budget)
    prog = Progress(out, rank, world, total, cfg.progress)
    hook = _fault_hook(rank)
    t0, c0 = time.perf_counter(), time.process_time()

    def prepare(i):
        sample_ids, toks = read_shard(ss, i, verify=cfg.verify)
        return sample_ids, toks, list(batches_for_shard(sample_ids, toks, cfg, spec, pad_id))

    # With prefetch, a helper thread reads, verifies, masks and collates shard k+1 while the
    # model scores shard k (the model's kernels release the GIL); an error in a shard still
    # surfaces when that shard's turn comes, after the earlier shards are written.
    pool = ThreadPoolExecutor(1, thread_name_prefix="kdcl-score-prep") if cfg.prefetch and len(todo) > 1 else None
    try:
        nxt = None
        for k, i in enumerate(todo):
            entry = ss.shards[i]
            if pool is None:
                sample_ids, toks = read_shard(ss, i, verify=cfg.verify)
                batches = None
            else:
                sample_ids, toks, batches = (nxt or pool.submit(prepare, i)).result()
                nxt = pool.submit(prepare, todo[k + 1]) if k + 1 < len(todo) else None

            def on_batch(b, _hook=hook):
                prog.add(0, b.n_tokens, cfg.log_every)
                if _hook is not None:
                    _hook(b)

            score, masked, ntok = score_arrays(scorer, sample_ids, toks, cfg, spec, pad_id, on_batch, batches)
            info = {**ident, "shard": entry["name"], "shard_sha256": entry.get("sha256"), "count": len(sample_ids),
                    "definition": DEFINITION, "format_version": FORMAT_VERSION}
            write_score_file(out / score_file_name(entry["name"]), sample_ids, score, masked, ntok, info)
            prog.add(len(sample_ids), 0, cfg.log_every)
    finally:
        if pool is not None:   # no thread outlives the call (an error included)
            pool.shutdown(wait=True, cancel_futures=True)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    prog.add(0, 0, cfg.log_every, force=True)
    # elapsed_s: this rank's scoring loop (read, mask, batch, model, write), wall clock; the
    # run's figure is the max over ranks. cpu_s: CPU time of this process in that loop (on a
    # shared machine it shows what the work cost without the time other jobs took the core).
    rank_stats = {"rank": rank, "elapsed_s": elapsed, "cpu_s": cpu, "tokens": prog.tokens,
                  "samples": prog.samples, "shards": len(todo), "setup_s": t0 - t_start}
    stats = dist.all_gather_object(rank_stats)
    prog.close()
    if rank != 0:
        return None
    return write_scores_manifest(ss, out, ident, cfg, str(model_name), stats)


def write_scores_manifest(ss: ShardSet, out: Path, ident: dict, cfg: ScoreConfig, model_name: str,
                          rank_stats: list[dict]) -> dict:
    shards, nonfinite = [], 0
    tot = {"samples": 0, "tokens": 0, "masked_tokens": 0}
    for i, entry in enumerate(ss.shards):
        path = out / score_file_name(entry["name"])
        if not existing_matches(path, ident, entry):
            raise UserError(f"{path}: missing or stale after scoring (shard {i}); re-run `kdcl-dist score`")
        d = read_score_file(path)
        if len(d["ids"]) != entry["count"]:
            raise UserError(f"{path}: {len(d['ids'])} scores for a shard of {entry['count']} samples; delete it and re-run")
        nf = int((~np.isfinite(d["score"])).sum())
        nonfinite += nf
        shards.append({"name": entry["name"], "file": path.name, "count": int(entry["count"]),
                       "nonfinite": nf, "tokens": int(d["tokens"].sum()), "masked_tokens": int(d["masked"].sum()),
                       "sha256": sha256_file(path)})
        tot["samples"] += int(entry["count"])
        tot["tokens"] += int(d["tokens"].sum())
        tot["masked_tokens"] += int(d["masked"].sum())
    elapsed = max((s["elapsed_s"] for s in rank_stats), default=0.0)
    scored_tokens = sum(s["tokens"] for s in rank_stats)
    manifest = {
        "format_version": FORMAT_VERSION, "kind": "scores", **ident, "model": model_name,
        "definition": DEFINITION, "nonfinite_policy": cfg.nonfinite,
        "shards": shards, "totals": {**tot, "nonfinite": nonfinite},
        "run": {"world_size": len(rank_stats), "token_budget": cfg.token_budget, "elapsed_s": elapsed,
                "scored_tokens": scored_tokens,
                "tokens_per_s": scored_tokens / elapsed if elapsed > 0 else None, "ranks": rank_stats},
    }
    manifest["fingerprint"] = fingerprint({"ident": ident, "files": [s["sha256"] for s in shards]})
    write_json_atomic(out / "scores.json", manifest)
    if nonfinite:
        log.warning("%d samples have a non-finite score; policy '%s' applies in `kdcl-dist curriculum`",
                    nonfinite, cfg.nonfinite)
    log.info("scores written to %s (%d samples, %d scored tokens in %.1f s: %.0f tokens/s)",
             out, tot["samples"], scored_tokens, elapsed, scored_tokens / elapsed if elapsed > 0 else math.nan)
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
                f"but the shards have {want}; re-run `kdcl-dist score` on these shards (or pass the matching --shards)")
        names = [s["name"] for s in dataset_manifest["shards"]]
        if [s["name"] for s in man["shards"]] != names:
            raise UserError(f"{d / 'scores.json'}: its shard list differs from the dataset's; re-run `kdcl-dist score`")
    return man


def read_listed_score_file(scores_dir, entry: dict) -> dict:
    """The score file of one `scores.json` shard entry, its count checked."""
    d = Path(scores_dir)
    a = read_score_file(d / entry["file"])
    if len(a["ids"]) != entry["count"]:
        raise UserError(f"{d / entry['file']}: holds {len(a['ids'])} scores, scores.json says {entry['count']}; "
                        "re-run scoring")
    return a


def load_scores(scores_dir, dataset_manifest: dict | None = None) -> tuple[dict, list[dict]]:
    """(scores.json, per-shard arrays in source-shard order), checked against the dataset."""
    man = load_scores_manifest(scores_dir, dataset_manifest)
    return man, [read_listed_score_file(scores_dir, s) for s in man["shards"]]
