"""The shard stage: cleaned documents -> tokenized webdataset shards + `dataset.json`.

Layout is a pure function of the input, never of the world size: after cleaning, the
documents are numbered in input order (global document index g) and document g belongs to
block j = g // shard_size. A block's samples fill output shards of at most shard_size
samples: `shard-j.tar` (always), then `shard-j.1.tar`, `shard-j.2.tar`, ... only when the
block yields more than shard_size samples (documents split by `too_long=split`). With W
ranks, rank r tokenizes and writes the blocks j with j % W == r. The parsing is divided too
(kdcl_dist/data/ingest_plan.py): each rank parses its share of the input (whole files, or
byte ranges of one large jsonl/txt), the ranks exchange document ids and content hashes
once, and every rank computes the same global plan (NLM updates, dedup), so all ranks agree
on g; each rank then reads its blocks' documents back from a spill under --out. Rank 0
merges the per-block statistics into `dataset.json` in shard order. One rank
and N ranks therefore write byte-identical shards.

Per block j the stage writes, each atomically (temporary name, then rename):
    shard-j[.p].tar     webdataset TarWriter output: <key>.ids.npy, <key>.json[, <key>.txt]
                        (key = shards.sample_key(sample id), injective)
    shard-j[.p].idx.json byte offset and size of every member (one seek per sample)
    shard-j.stats.json  the block's manifest entries (one per shard), counters and a key
                        over (tokenizer, settings, ids and texts of its documents); written
                        last, so it marks the block as finished. A re-run skips a block whose
                        stats key matches and whose tars and indexes hash as recorded.

Counting: input documents = kept documents + dropped documents (all reasons). A document
longer than max_length is truncated (one sample) or split into several samples of at
most max_length tokens each (`too_long=split`); it still counts as one kept document.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from kdcl_dist.config import option, to_dict
from kdcl_dist.data import ingest, ingest_plan
from kdcl_dist.data.shards import (
    Sample,
    ids_dtype,
    index_name,
    sample_key,
    shard_name,
    write_shard,
)
from kdcl_dist.errors import UserError
from kdcl_dist.utils import read_json, sha256_file, write_json_atomic

log = logging.getLogger("kdcl_dist.shard")

STATS_FORMAT = 2  # 2: a block's stats list its shards ("entries"); 1 had one "entry"
# Sample keys: 2 = shards.sample_key (injective escape); 1 = the lossy sanitising of earlier
# versions. Part of the settings key, so a re-run over shards of the old scheme rewrites them
# rather than mixing the two in one dataset (old shard sets stay readable as they are).
KEY_SCHEME = 2


@dataclass
class ShardConfig:
    max_length: int = option(256, help="tokens per sample including special tokens", min=8)
    shard_size: int = option(
        2000,
        help="most samples per output shard; also the documents per block (the unit "
        "of distribution and re-use): a block yielding more samples (split documents) "
        "fills several shards",
        min=1,
    )
    min_tokens: int = option(
        16, help="drop documents with fewer tokens (special tokens not counted)", min=0
    )
    format: str = option("auto", help="input format; auto = by file suffix", choices=ingest.FORMATS)
    text_field: str = option("text", help="jsonl/parquet/hf: field holding the document body")
    title_field: str = option("title", help="field prefixed to the body when present; '' disables")
    id_field: str = option("id", help="field holding the document id; '' uses <file>:<line>")
    text_unit: str = option(
        "line",
        help="txt inputs: one document per line, per blank-line separated paragraph, "
        "or per file (id = the file's path)",
        choices=ingest.TEXT_UNITS,
    )
    too_long: str = option(
        "truncate",
        help="documents over max_length: keep the first max_length tokens, "
        "or split into several samples",
        choices=("truncate", "split"),
    )
    skip_bad_lines: bool = option(
        False,
        help="count and skip invalid JSON lines / records without the text field "
        "or with an unusable id",
    )
    dedup: bool = option(
        True, help="drop documents whose whitespace-normalised text was seen before"
    )
    keep_text: bool = option(False, help="store the raw text beside the token ids (<key>.txt)")
    overwrite: bool = option(
        False, help="replace shards in --out made with another tokenizer or of unknown origin"
    )
    batch_size: int = option(1000, help="documents per tokenizer call", min=1)
    hf_split: str = option("train", help="hf inputs: split to read")
    md5_mismatch: str = option(
        "error",
        help="an .xml.gz whose NLM .md5 file gives another digest: stop with an error "
        "naming it, or skip the file and count it in dataset.json",
        choices=("error", "skip"),
    )

    def validate(self) -> None:
        if self.min_tokens > self.max_length:
            raise UserError(
                f"shard.min_tokens: {self.min_tokens} is above shard.max_length {self.max_length}; "
                "lower min_tokens or raise max_length"
            )

    def read_options(self, verbose: bool) -> ingest.ReadOptions:
        return ingest.ReadOptions(
            format=self.format,
            text_field=self.text_field,
            title_field=self.title_field,
            id_field=self.id_field,
            text_unit=self.text_unit,
            skip_bad_lines=self.skip_bad_lines,
            hf_split=self.hf_split,
            dedup=self.dedup,
            verbose=verbose,
        )


_PART_SUFFIX = re.compile(r"\.\d+$")
_SHARD_FILE = re.compile(r"shard-(\d+)(?:\.(\d+))?\.(?:tar|idx\.json|stats\.json)$")


def stats_name(tar_name: str) -> str:
    """The stats file of the block a shard belongs to (`shard-000003.1.tar` -> `shard-000003.stats.json`)."""
    return _PART_SUFFIX.sub("", tar_name[: -len(".tar")]) + ".stats.json"


def part_name(block: int, part: int) -> str:
    """Shard file of part `part` of block `block`: `shard-000003.tar`, `shard-000003.1.tar`, ..."""
    return shard_name(block) if part == 0 else f"shard-{block:06d}.{part}.tar"


def _block_of(name: str) -> int | None:
    m = _SHARD_FILE.match(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- tokenization


def _special_template(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence (e.g. [CLS], [SEP])."""
    probe = "the"
    full = tok(probe, add_special_tokens=True)["input_ids"]
    body = tok(probe, add_special_tokens=False)["input_ids"]
    for at in range(len(full) - len(body) + 1):
        if full[at : at + len(body)] == body:
            return list(full[:at]), list(full[at + len(body) :])
    raise UserError(
        f"{getattr(tok, 'name_or_path', 'tokenizer')}: cannot find the special-token template "
        "of a single sequence; use a BERT-style fast tokenizer"
    )


class _Encoder:
    """Batch tokenization with the HF fast tokenizer; special tokens added around each piece.

    Tokenizing without truncation tells us a document's true length (needed to count and
    split too-long documents); the special-token template (e.g. [CLS] ... [SEP]) is read
    from the tokenizer once so that truncation and splitting keep it.
    """

    def __init__(self, tok, cfg: ShardConfig):
        self.tok = tok
        self.cfg = cfg
        self.prefix, self.suffix = _special_template(tok)
        self.room = cfg.max_length - len(self.prefix) - len(self.suffix)
        if self.room < 1:
            raise UserError(
                f"shard.max_length: {cfg.max_length} leaves no room for tokens after "
                f"{len(self.prefix) + len(self.suffix)} special tokens"
            )
        self.dtype = ids_dtype(len(tok))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens, no truncation (ids equal to `tok(texts)`'s).

        Calls the Rust tokenizer behind the HF fast tokenizer directly: `encode_batch_fast`
        skips the character offsets that the stage never uses (about 25% of the
        tokenizer's time) and the Python BatchEncoding wrapping.
        """
        return self.ids(self.encode_raw(texts))

    @staticmethod
    def ids(raw: list) -> list[list[int]]:
        """Token id lists from `encode_raw`'s result."""
        return [e.ids for e in raw] if raw and not isinstance(raw[0], list) else raw

    def encode_raw(self, texts: list[str]) -> list:
        """`encode` without building the Python id lists: the Rust tokenizer's Encodings.

        The stage's tokenizer thread runs only this (the GIL is released throughout), so it
        can start the next batch at once; the id lists are built on the main thread.
        """
        bk = getattr(self.tok, "backend_tokenizer", None)
        if bk is None:
            return self.tok(
                texts,
                add_special_tokens=False,
                truncation=False,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,
            )["input_ids"]
        if bk.truncation is not None:  # an earlier tok(..., truncation=True) call leaves it set
            bk.no_truncation()
        if bk.padding is not None:
            bk.no_padding()
        fn = getattr(bk, "encode_batch_fast", bk.encode_batch)
        return fn(texts, add_special_tokens=False)

    def pieces(self, ids: list[int]) -> tuple[list[np.ndarray], bool]:
        """Samples for one document and whether it was too long."""
        room = self.room
        if len(ids) <= room:
            return [np.asarray(self.prefix + ids + self.suffix, dtype=self.dtype)], False
        if self.cfg.too_long == "truncate":
            return [np.asarray(self.prefix + ids[:room] + self.suffix, dtype=self.dtype)], True
        return [
            np.asarray(self.prefix + ids[i : i + room] + self.suffix, dtype=self.dtype)
            for i in range(0, len(ids), room)
        ], True


def _new_counts() -> dict:
    return {
        "too_short": 0,
        "truncated": 0,
        "split": 0,
        "split_parts": 0,
        "tokens": 0,
        "text_bytes": 0,
        "kept_documents": 0,
    }


def _batch_samples(
    chunk: list[tuple[int, ingest.Document]],
    all_ids: list[list[int]],
    enc: _Encoder,
    cfg: ShardConfig,
    c: dict,
) -> list[Sample]:
    """The samples of one tokenized batch of a shard's documents, updating the counters `c`."""
    samples: list[Sample] = []
    for (g, doc), ids in zip(chunk, all_ids):
        if len(ids) < cfg.min_tokens:
            c["too_short"] += 1
            continue
        parts, too_long = enc.pieces(ids)
        c["kept_documents"] += 1
        c["text_bytes"] += len(doc.text.encode("utf-8"))
        if len(parts) == 1:
            meta = {
                "id": doc.id,
                "source": doc.source,
                "n_tokens": int(parts[0].size),
                "truncated": too_long,
                "doc_index": g,
            }
            c["truncated"] += int(too_long)
            samples.append(
                Sample(sample_key(doc.id), parts[0], meta, doc.text if cfg.keep_text else None)
            )
            c["tokens"] += int(parts[0].size)
            continue
        c["split"] += 1
        c["split_parts"] += len(parts)
        for k, arr in enumerate(parts):
            sid = f"{doc.id}_part{k}"
            meta = {
                "id": sid,
                "source": doc.source,
                "n_tokens": int(arr.size),
                "truncated": False,
                "doc_index": g,
                "doc_id": doc.id,
                "part": k,
                "parts": len(parts),
            }
            samples.append(Sample(sample_key(sid), arr, meta, None))
            c["tokens"] += int(arr.size)
    return samples


class _Aborted(Exception):
    pass


class _BackgroundWriter:
    """Writes shards on a thread so that tar encoding overlaps tokenization.

    The fast tokenizer releases the GIL while it encodes a batch, so the Python work of
    webdataset's TarWriter (headers, npy/json members) and of indexing runs meanwhile.
    Shards are still written one after another, each atomically by `write_shard`:
    `start(path, ...)`, then `add(samples)` per batch, then `end()`.
    """

    _END = object()
    _ABORT = object()

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.feed: queue.Queue | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            path, dtype, feed, done = job
            if self.error is not None:
                continue
            try:
                done(write_shard(path, self._drain(feed), dtype=dtype))
            except _Aborted:
                pass
            except BaseException as e:  # handed to the main thread at its next put
                self.error = e

    def _drain(self, feed: queue.Queue):
        while True:
            item = feed.get()
            if item is self._END:
                return
            if item is self._ABORT:
                raise _Aborted
            yield from item

    def _put(self, q: queue.Queue, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise RuntimeError("shard writer thread stopped unexpectedly") from None

    def start(self, path: Path, dtype, done) -> None:
        """Begin shard `path`; `done(entry)` runs on the writer thread once tar and index exist."""
        self.feed = queue.Queue(maxsize=4)
        self._put(self.jobs, (path, dtype, self.feed, done))

    def add(self, samples: list[Sample]) -> None:
        self._put(self.feed, samples)

    def end(self) -> None:
        self._put(self.feed, self._END)
        self.feed = None

    def close(self, abort: bool = False) -> None:
        if abort and self.feed is not None:  # a shard half fed: its temporary file is dropped
            with contextlib.suppress(BaseException):
                self.feed.put(self._ABORT, timeout=5)
        with contextlib.suppress(BaseException):
            self.jobs.put(None, timeout=30 if not abort else 5)
        self.thread.join(timeout=None if not abort else 30)
        if self.error is not None and not abort:
            raise self.error


@dataclass
class _Batch:
    """One tokenizer batch of a block on its way through the pipeline."""

    chunk: list  # [(global document index, Document)]
    ids: Future  # the tokenizer's Encodings, computed on the tokenizer thread
    counts: dict  # the block's counters (shared by its batches)
    first: bool
    last: bool
    block: _BlockFeed  # where its samples go


class _BlockFeed:
    """Feeds one block's samples to the writer as shards of at most `cap` samples.

    Part 0 (`shard-j.tar`) is always written, even empty; `shard-j.1.tar`, ... are started
    only when a sample does not fit. `on_done(entries)` runs on the writer thread once the
    block's last shard and its index exist (it writes the block's stats file).
    """

    def __init__(self, out: Path, j: int, cap: int, dtype, writer: _BackgroundWriter, on_done):
        self.out, self.j, self.cap, self.dtype, self.writer, self.on_done = (
            out,
            j,
            cap,
            dtype,
            writer,
            on_done,
        )
        self.entries: list[dict] = []
        self.parts: int | None = None  # number of shards, set at the block's end
        self.part = -1
        self.filled = 0
        self.tokens = [0]

    def _open(self) -> None:
        self.part += 1
        self.filled = 0
        self.tokens = tokens = [0]
        self.writer.start(
            self.out / part_name(self.j, self.part),
            self.dtype,
            lambda entry: self._done(entry, tokens),
        )

    def _done(self, entry: dict, tokens: list) -> None:  # writer thread, shards in order
        entry["tokens"] = tokens[0]
        self.entries.append(entry)
        if self.parts is not None and len(self.entries) == self.parts:
            self.on_done(self.entries)

    def add(self, samples: list[Sample], first: bool, last: bool) -> None:
        if first:
            self._open()
        at = 0
        while at < len(samples):
            if self.filled == self.cap:
                self.writer.end()
                self._open()
            take = samples[at : at + self.cap - self.filled]
            at += len(take)
            self.filled += len(take)
            self.tokens[0] += sum(int(x.ids.size) for x in take)
            self.writer.add(take)
        if last:
            self.parts = self.part + 1  # before the end: the writer reads it after the shard
            self.writer.end()


# --------------------------------------------------------------------------- output dir

# Written by rank 0 before any shard: names the tokenizer of the run in progress, so that a
# tar left without its stats file by a kill (between the tar's rename and the stats file's)
# is known to be this stage's own unfinished work, not a stranger's file.
RUN_MARKER = ".shard-run.json"
_OUR_PATTERNS = (
    "shard-*.tar",
    "shard-*.idx.json",
    "shard-*.stats.json",
    "dataset.json",
    "config.yaml",
    ".tmp-*",
    RUN_MARKER,
)


def _marker_fingerprint(out: Path) -> str | None:
    try:
        return read_json(out / RUN_MARKER, "shard run marker").get("tokenizer_fingerprint")
    except UserError:
        return None


def _prepare_out(out: Path, tinfo: dict, overwrite: bool) -> None:
    """Rank 0: refuse a directory holding another tokenizer's shards unless overwrite; tidy temps.

    A tar without a stats file is an unfinished shard of an interrupted run (rewritten by
    this one) when that run's marker, or the stats of the shards it did finish, name this
    tokenizer; with no such evidence its origin is unknown and it is refused.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    foreign = None
    manifest = out / "dataset.json"
    if manifest.exists():
        try:
            fp = read_json(manifest, "dataset manifest").get("tokenizer", {}).get("fingerprint")
        except UserError:
            fp = None
        if fp != tinfo["fingerprint"]:
            foreign = f"dataset.json was made with tokenizer fingerprint {fp}"
    if foreign is None:
        for st in sorted(out.glob("shard-*.stats.json")):
            try:
                fp = read_json(st, "shard stats").get("tokenizer_fingerprint")
            except UserError:
                fp = None
            if fp != tinfo["fingerprint"]:
                foreign = f"{st.name} was made with tokenizer fingerprint {fp}"
                break
    if foreign is None:
        orphans = [
            t.name
            for t in sorted(out.glob("shard-*.tar"))
            if not (out / stats_name(t.name)).exists()
        ]
        if orphans and not manifest.exists():
            marker = _marker_fingerprint(out)
            if marker is not None and marker != tinfo["fingerprint"]:
                foreign = f"{orphans[0]} was left by an interrupted run with tokenizer fingerprint {marker}"
            elif marker is None and not any(out.glob("shard-*.stats.json")):
                foreign = f"{orphans[0]} has no stats file (unknown origin)"
            else:
                log.info(
                    "%s: %d shard(s) without a stats file (%s) are unfinished work of an interrupted "
                    "run; they will be rewritten",
                    out,
                    len(orphans),
                    ", ".join(orphans[:4]),
                )
    if foreign is not None and not overwrite:
        raise UserError(
            f"{out}: holds shards made with another tokenizer ({foreign}; this run uses "
            f"{tinfo['name']} {tinfo['fingerprint']}); pass --overwrite to replace them or choose another --out"
        )
    # The old manifest goes first: a run that fails half-way must not leave a dataset.json
    # that describes shards this run has since replaced. Finished shards stay for reuse.
    # The marker is written first, so at no moment can a kill leave shards without evidence
    # of their origin.
    write_json_atomic(
        out / RUN_MARKER,
        {"tokenizer_fingerprint": tinfo["fingerprint"], "tokenizer": tinfo["name"]},
    )
    patterns = (
        [pat for pat in _OUR_PATTERNS if pat != RUN_MARKER]
        if (foreign is not None and overwrite)
        else (".tmp-*", "dataset.json")
    )
    for pat in patterns:
        for p in out.glob(pat):
            if p.is_file():
                p.unlink()
    for p in out.glob(ingest_plan.SPILL_DIR + "*"):  # documents spilled by a killed run
        if p.is_dir():
            ingest_plan.remove_spill(p)


def _remove_stale(out: Path, n_blocks: int, keep: set[str]) -> None:
    """Shards from an earlier run with other settings are not part of this dataset: blocks
    past the last one, and extra shards (`shard-j.p.tar`) of a block that has fewer now."""
    for p in out.glob("shard-*"):
        j = _block_of(p.name)
        if j is None or not p.is_file():
            continue
        if j >= n_blocks or (not p.name.endswith(".stats.json") and p.name not in keep):
            p.unlink()


# --------------------------------------------------------------------------- the stage


def _settings_key(cfg: ShardConfig, tinfo: dict, dtype) -> dict:
    from kdcl_dist import FORMAT_VERSION

    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tinfo["fingerprint"],
        "max_length": cfg.max_length,
        "min_tokens": cfg.min_tokens,
        "too_long": cfg.too_long,
        "keep_text": cfg.keep_text,
        "dtype": np.dtype(dtype).name,
        "key_scheme": KEY_SCHEME,
        "shard_samples": cfg.shard_size,
    }


def _finished(out: Path, j: int, key: str) -> dict | None:
    """The stats of block j when it is complete and intact, else None (the block is rewritten).

    Complete and intact: its stats file (written last) matches this run's key, and each of
    its tars and offset indexes hashes to the sha256 recorded there, so a shard corrupted in
    place (same size) or a tar/index pair from different runs is never reused.
    """
    st_path = out / stats_name(shard_name(j))
    if not st_path.exists():
        return None
    try:
        st = read_json(st_path, "shard stats")
    except UserError:
        return None
    entries, idx_sums = st.get("entries"), st.get("index_sha256")
    if (
        st.get("format") != STATS_FORMAT
        or st.get("key") != key
        or not isinstance(entries, list)
        or not entries
        or not isinstance(idx_sums, list)
        or len(idx_sums) != len(entries)
    ):
        return None
    for entry, idx_sum in zip(entries, idx_sums):
        tar = out / entry.get("name", "")
        idx = out / index_name(tar.name)
        if not tar.is_file() or not idx.is_file() or tar.stat().st_size != entry.get("bytes"):
            return None
        if sha256_file(tar) != entry.get("sha256"):
            log.warning(
                "%s: sha256 differs from %s (corrupt); rewriting the shard", tar, st_path.name
            )
            return None
        if sha256_file(idx) != idx_sum:
            log.warning(
                "%s: sha256 differs from %s (corrupt); rewriting the shard", idx, st_path.name
            )
            return None
    return st


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    from kdcl_dist import dist

    if dist.is_initialized():
        import torch.distributed as tdist

        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _gc_frozen():
    """Keep the objects that exist before the stage out of the cyclic GC while it runs.

    The stage allocates millions of short-lived objects (token id lists, sample dicts), which
    triggers collections that each traverse the whole heap of the process (torch,
    transformers, ...: ~200k objects in the CLI): ~5% of the stage's CPU time. None of those
    objects becomes garbage during the stage, so they are frozen (`gc.freeze`) until it ends.
    """
    if gc.get_freeze_count():  # the caller froze the heap itself: leave its choice alone
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def build_dataset(
    inputs: Iterable[str],
    tok,
    out_dir: str | os.PathLike,
    cfg: ShardConfig,
    *,
    tokenizer_name: str = "",
    rank: int | None = None,
    world: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the shard stage (on every rank when distributed); returns the merged manifest."""
    from kdcl_dist import dist

    rank, world = _rank_world(rank, world)
    out = Path(out_dir)
    t0 = time.perf_counter()
    result, err = None, None
    try:
        with _gc_frozen():
            result = _local_pass(list(inputs), tok, out, cfg, tokenizer_name, rank, world, progress)
    except UserError as e:
        err = f"UserError:{e}"
    except Exception as e:  # reported to the other ranks so that none of them waits forever
        err = f"{type(e).__name__}:{e}"
        if world == 1:
            raise
    counts = (result["written"], result["skipped"], _peak_rss_mib()) if result else (0, 0, 0)
    gathered = dist.all_gather_object((err, counts)) if world > 1 else [(err, counts)]
    if rank == 0:  # every rank has read back its documents: the shared spill can go
        ingest_plan.remove_spill(out / ingest_plan.SPILL_DIR)
    bad = [(r, e) for r, (e, _) in enumerate(gathered) if e]
    if bad:
        r, e = bad[0]
        kind, _, msg = e.partition(":")
        raise UserError(
            msg if kind == "UserError" or world == 1 else f"rank {r} failed: {kind}: {msg}"
        )
    manifest: dict | None = None
    if rank == 0:
        result["written"] = sum(c[0] for _, c in gathered)
        result["skipped"] = sum(c[1] for _, c in gathered)
        result["rss"] = [c[2] for _, c in gathered]
        try:
            manifest = _merge(out, cfg, result, time.perf_counter() - t0, world)
        except UserError as e:
            if world == 1:
                raise
            manifest = {"__error__": str(e)}  # every rank raises it, none waits
    if world > 1:
        manifest = dist.broadcast_object(manifest)
        if manifest is not None and "__error__" in manifest:
            raise UserError(manifest["__error__"])
    return manifest


def _local_pass(inputs, tok, out, cfg, tokenizer_name, rank, world, progress):
    from kdcl_dist import dist
    from kdcl_dist.data.tokenizer import check_mlm_tokenizer, tokenizer_info

    specs, skipped = ingest.resolve_inputs_skipped(inputs, cfg.format)  # same error on every rank
    check_mlm_tokenizer(tok, tokenizer_name or getattr(tok, "name_or_path", "") or "the tokenizer")
    tinfo = tokenizer_info(tok, tokenizer_name or getattr(tok, "name_or_path", ""))
    enc = _Encoder(tok, cfg)
    if rank == 0:
        err = None
        try:
            _prepare_out(out, tinfo, cfg.overwrite)
        except UserError as e:
            err = str(e)
    else:
        err = None
    if world > 1:
        err = dist.broadcast_object(err)
        dist.barrier()
    if err:
        raise UserError(err)

    settings = _settings_key(cfg, tinfo, enc.dtype)
    settings_blob = repr(sorted(settings.items())).encode()
    opts = cfg.read_options(verbose=rank == 0)

    bar = None
    if (
        rank == 0
    ):  # a bar on a terminal, else a progress line every $KDCL_PROGRESS_EVERY s (kdcl_dist/progress.py)
        from kdcl_dist.progress import progress_bar

        bar = progress_bar(
            None, "shard", "doc", progress=progress, mininterval=1.0, dynamic_ncols=True
        )
    # Parsing divided across ranks (kdcl_dist/data/ingest_plan.py): each rank scans its
    # units, the scans are exchanged once, every rank computes the same global plan.
    divided = world > 1 and dist.is_initialized()
    units = ingest_plan.make_units(specs, world if divided else 1, opts)
    spill = out / (
        ingest_plan.SPILL_DIR if divided else f"{ingest_plan.SPILL_DIR}-{rank}-{os.getpid()}"
    )
    spill.mkdir(parents=True, exist_ok=True)
    try:
        owner = ingest_plan.owners(units, world) if divided else [rank] * len(units)
        scans = []
        tick = (lambda: bar.update(1)) if bar is not None else None
        for u, unit in enumerate(units):
            if owner[u] == rank:
                scans.append(ingest_plan.scan_unit(u, unit, opts, spill, cfg.md5_mismatch, tick))
                if scans[-1].error:
                    break  # the first error in unit order is reported; see make_plan
        if divided:
            parts = dist.all_gather_object(scans)
            log.info(
                "parsing divided: input units parsed per rank %s, records %s",
                [len(p) for p in parts],
                [sum(sc.documents for sc in p) for p in parts],
            )
            scans = sorted((sc for part in parts for sc in part), key=lambda sc: sc.unit)
            del parts
        plan = ingest_plan.make_plan(units, scans, opts, skipped)
        del scans
        return _write_blocks(
            out, cfg, tinfo, enc, settings_blob, units, plan, spill, specs, bar, rank, world
        )
    finally:
        if bar is not None:
            bar.close()
        if not divided:
            ingest_plan.remove_spill(spill)


def _write_blocks(out, cfg, tinfo, enc, settings_blob, units, plan, spill, specs, bar, rank, world):
    """Tokenize and write the blocks j with j % world == rank, from the plan's documents."""
    stats = plan.stats
    written = skipped = 0
    cur: list[tuple[int, ingest.Document]] = []
    digest = None
    g = -1

    # Three threads overlap: the main thread reads the planned documents back and turns token ids
    # into samples; one thread runs the Rust tokenizer a batch ahead (it releases the GIL,
    # and its own pool uses every core); the writer thread encodes tars and indexes them.
    writer = _BackgroundWriter()
    tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-tokenize")
    pending: collections.deque[_Batch] = collections.deque()

    def drain(keep: int) -> None:
        """Turn the oldest batches into samples for the writer, leaving `keep` still tokenizing."""
        while len(pending) > keep:
            b = pending.popleft()
            samples = _batch_samples(b.chunk, enc.ids(b.ids.result()), enc, cfg, b.counts)
            b.block.add(samples, b.first, b.last)

    def finish(j: int):
        nonlocal written, skipped
        key = hashlib.sha256(settings_blob + digest.digest()).hexdigest()[:32]
        if _finished(out, j, key) is not None:
            skipped += 1
            return
        counts = _new_counts()
        docs_j = list(cur)

        def done(
            entries: list[dict],
        ) -> None:  # on the writer thread, after the block's tars and indexes exist
            write_json_atomic(
                out / stats_name(shard_name(j)),
                {
                    "format": STATS_FORMAT,
                    "key": key,
                    "tokenizer_fingerprint": tinfo["fingerprint"],
                    "entries": entries,
                    "index_sha256": [sha256_file(out / e["index"]) for e in entries],
                    "first_doc": docs_j[0][0],
                    "documents": len(docs_j),
                    **counts,
                },
            )

        block = _BlockFeed(out, j, cfg.shard_size, enc.dtype, writer, done)
        bs = cfg.batch_size
        starts = range(0, len(docs_j), bs)
        for start in starts:
            chunk = docs_j[start : start + bs]
            fut = tokenizer.submit(enc.encode_raw, [d.text for _, d in chunk])
            pending.append(_Batch(chunk, fut, counts, start == 0, start == starts[-1], block))
        # the newest batch keeps tokenizing while the next shard's documents are read
        drain(keep=1)
        written += 1

    docs = ingest_plan.my_documents(units, plan, spill, cfg.shard_size, rank, world)
    cur_j = -1
    try:
        for g, doc in docs:  # this rank's blocks, in g order (blocks are contiguous in g)
            j = g // cfg.shard_size
            if cur and j != cur_j:
                finish(cur_j)
                cur, digest = [], None
            cur_j = j
            if digest is None:
                digest = hashlib.sha256()
            digest.update(f"{doc.id}\0{doc.source}\0".encode())
            digest.update(doc.text.encode("utf-8", "surrogatepass"))
            cur.append((g, doc))
        if cur:
            finish(cur_j)
        drain(keep=0)
    except BaseException:
        tokenizer.shutdown(wait=True, cancel_futures=True)
        writer.close(abort=True)
        raise
    tokenizer.shutdown(wait=True)
    writer.close()
    n_docs = plan.n_docs
    if n_docs == 0:
        raise UserError(
            f"{', '.join(s.path for s in specs)}: no documents to write ({stats.documents} read; "
            f"dropped: {ingest.describe_drops(stats)})"
        )
    n_shards = (n_docs + cfg.shard_size - 1) // cfg.shard_size
    return {
        "stats": stats,
        "specs": specs,
        "tinfo": tinfo,
        "n_docs": n_docs,
        "n_shards": n_shards,
        "written": written,
        "skipped": skipped,
        "dtype": np.dtype(enc.dtype).name,
        "plan": plan,
    }


def _merge(out: Path, cfg: ShardConfig, res: dict, seconds: float, world: int) -> dict:
    """Rank 0: combine per-shard stats in shard order into dataset.json (world-size independent)."""
    from kdcl_dist import FORMAT_VERSION
    from kdcl_dist.config import write_resolved
    from kdcl_dist.data.shards import key_to_id, manifest_fingerprint

    stats: ingest.IngestStats = res["stats"]
    plan: ingest_plan.Plan = res["plan"]
    entries, keys_seen = [], {}
    sums = {
        "too_short": 0,
        "truncated": 0,
        "split": 0,
        "split_parts": 0,
        "tokens": 0,
        "text_bytes": 0,
        "kept_documents": 0,
    }
    for j in range(res["n_shards"]):
        st_path = out / stats_name(shard_name(j))
        if not st_path.exists():
            raise UserError(f"{st_path}: missing after all ranks finished; re-run the shard stage")
        st = read_json(st_path, "shard stats")
        for k in sums:
            sums[k] += st[k]
        for entry in st["entries"]:
            entries.append(entry)
            for key in read_json(out / entry["index"], "shard offset index")["keys"]:
                if key in keys_seen:  # keys are injective in the sample id: the id itself repeats
                    shown = key_to_id(key)
                    raise UserError(
                        f"{out / entry['name']}: sample key '{key}'"
                        + (f" (id {shown!r})" if shown is not None else "")
                        + f" also in {keys_seen[key]}; sample ids must be unique: a document id "
                        "equals the `<id>_part<k>` id of a part of a split document, rename that "
                        "document or use --too-long truncate"
                    )
                keys_seen[key] = entry["name"]
    _remove_stale(out, res["n_shards"], {n for e in entries for n in (e["name"], e["index"])})
    dropped = {r: 0 for r in ingest.DROP_REASONS}
    dropped.update(stats.dropped)
    dropped["too_short"] += sums["too_short"]
    n_dropped = sum(dropped.values())
    kept = sums["kept_documents"]
    if kept + n_dropped != stats.documents:  # the accounting contract itself; a bug if violated
        raise RuntimeError(
            f"count mismatch: kept {kept} + dropped {n_dropped} != read {stats.documents}"
        )
    tinfo = res["tinfo"]
    num_samples = sum(e["count"] for e in entries)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "dataset",
        "fingerprint": manifest_fingerprint(entries, tinfo),
        "tokenizer": tinfo,
        "max_length": cfg.max_length,
        "dtype": res["dtype"],
        "num_samples": num_samples,
        "shards": entries,
        "totals": {
            "input_documents": stats.documents,
            "kept_documents": kept,
            "dropped_documents": n_dropped,
            "samples": num_samples,
            "tokens": sums["tokens"],
            "text_bytes": sums["text_bytes"],
            "truncated_documents": sums["truncated"],
            "split_documents": sums["split"],
            "split_samples": sums["split_parts"],
        },
        "dropped": dropped,
        "inputs": [
            {
                "path": s.path,
                "format": s.format,
                "source": s.source,
                "bytes": s.bytes,
                "documents": stats.per_input.get(s.source, 0),
            }
            for s in res["specs"]
        ],
        "skipped_files": {
            "count": len(plan.skipped),
            "by_reason": dict(sorted(Counter(x["reason"] for x in plan.skipped).items())),
            "files": plan.skipped,
        },
        "updates": plan.updates,
        "config": to_dict(cfg),
    }
    write_resolved(cfg, out, "shard")
    write_json_atomic(out / "dataset.json", manifest)
    with contextlib.suppress(FileNotFoundError):  # dataset.json now vouches for the shards
        (out / RUN_MARKER).unlink()
    log.info(
        "%s: %d documents read, %d kept -> %d samples in %d shards (%d written now, %d reused); "
        "dropped: %s; %.1fs on %d rank(s); peak RSS per rank %s MiB",
        out,
        stats.documents,
        kept,
        num_samples,
        len(entries),
        res["written"],
        res["skipped"],
        ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "none",
        seconds,
        world,
        res.get("rss", []),
    )
    return manifest


def _peak_rss_mib() -> int:
    """This process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
