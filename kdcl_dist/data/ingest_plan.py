"""Ingestion divided across ranks: each rank parses only its share; one global plan decides.

1. **Units.** The inputs, in input order, are cut into units: whole files, or byte ranges
   of one large uncompressed JSON Lines / line-per-document text file (a line belongs to
   the range it starts in). Units are dealt to ranks by size, largest first to the least
   loaded rank (deterministic: it depends only on the inputs and the world size).
2. **Scan.** Each rank parses its units (in unit order) and records, per unit, every
   record's id, kind and content hash: a document, a MEDLINE citation without abstract, or
   a `<DeleteCitation>` PMID. The documents' ids and texts are spilled to
   `<out>/.tmp-ingest/unit-N.bin` (`--out` is shared by all ranks already). NLM `.md5`
   files are checked here, so that work is divided too.
3. **Exchange once.** The scans (ids + 16-byte hashes, tens of bytes per document) are
   exchanged with one `all_gather_object`.
4. **Plan.** Every rank computes the same plan from all scans, in unit order: NLM's update
   semantics (a later version of a PMID replaces the earlier one, a DeleteCitation removes
   it), then content dedup and repeated ids exactly as `ingest.clean` does in one stream.
   Each surviving document gets its global index g, so g, the blocks (g // shard_size) and
   every count are the same for any world size.
5. **Read back.** Rank r reads from the spills the documents of its blocks (j % W == r),
   in g order, and tokenizes and writes them as before.

Without a process group (world > 1 given explicitly, ranks run one after another in one
process, as some tests do) a rank scans every unit itself into a private spill directory
and computes the same plan: same output, no division of the parsing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from kdcl_dist.data import ingest
from kdcl_dist.data.ingest import Document, IngestStats, InputSpec, ReadOptions
from kdcl_dist.errors import UserError

log = logging.getLogger("kdcl_dist.ingest")

SPILL_DIR = ".tmp-ingest"  # under --out; `.tmp-*` is the stage's own temporary space
RANGE_MIN_BYTES = 64 << 10  # smaller files are never cut into byte ranges
RANGE_MIN_PIECE = 32 << 10
_HEAD = struct.Struct("<II")  # spill record: id bytes, text bytes

DOC, NO_ABSTRACT, DELETE = ord("d"), ord("n"), ord("x")


def make_units(specs: list[InputSpec], world: int, opts: ReadOptions) -> list[InputSpec]:
    """Whole files, or 2 byte ranges per rank of a large uncompressed jsonl / txt-line file."""
    units: list[InputSpec] = []
    for spec in specs:
        splittable = (
            world > 1
            and spec.bytes >= RANGE_MIN_BYTES
            and not spec.path.lower().endswith(".gz")
            and (spec.format == "jsonl" or (spec.format == "txt" and opts.text_unit == "line"))
        )
        n = min(2 * world, spec.bytes // RANGE_MIN_PIECE) if splittable else 1
        if n <= 1:
            units.append(spec)
            continue
        cuts = [spec.bytes * k // n for k in range(n + 1)]
        units.extend(
            dataclasses.replace(spec, start=a, end=b, bytes=b - a) for a, b in zip(cuts, cuts[1:])
        )
    return units


def owners(units: list[InputSpec], world: int) -> list[int]:
    """The rank that scans each unit: largest first to the least loaded rank."""
    loads = [0] * world
    owner = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: (-units[i].bytes, i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += max(units[i].bytes, 1)
    return owner


@dataclass
class UnitScan:
    """What a rank learned from one unit (small: no texts; those are in the spill)."""

    unit: int
    kinds: bytearray = field(default_factory=bytearray)  # per record: DOC / NO_ABSTRACT / DELETE
    ids: list = field(default_factory=list)  # per record
    hashes: bytearray = field(default_factory=bytearray)  # 16 bytes per DOC record (dedup)
    documents: int = 0
    dropped: dict = field(default_factory=dict)
    per_input: dict = field(default_factory=dict)
    range_checks: list = field(default_factory=list)
    skipped: dict | None = None  # {"path", "reason": "md5_mismatch"}
    error: str | None = None


def spill_path(spill_dir: Path, unit: int) -> Path:
    return spill_dir / f"unit-{unit:06d}.bin"


def scan_unit(
    u: int,
    spec: InputSpec,
    opts: ReadOptions,
    spill_dir: Path,
    md5_mismatch: str,
    on_record: Callable[[], None] | None = None,
) -> UnitScan:
    """Parse one unit: record ids/kinds/hashes, spill ids and texts. Errors are returned
    (`error`), never raised, so that every rank reaches the exchange."""
    from kdcl_dist.data import nlm

    sc = UnitScan(u)
    stats = IngestStats()
    stats.per_input[spec.source] = 0

    def hook(kind: str, doc_id: str) -> None:
        sc.kinds.append(NO_ABSTRACT if kind == "n" else DELETE)
        sc.ids.append(doc_id)

    stats.hook = hook
    try:
        if spec.md5 and spec.start == 0:
            bad = nlm.md5_mismatch(Path(spec.path), Path(spec.md5))
            if bad is not None:
                if md5_mismatch != "skip":
                    raise UserError(
                        f"{bad}; the file is corrupt or incomplete: re-download it from NLM, or "
                        "pass --md5-mismatch skip to count and skip such files"
                    )
                log.warning("%s; skipped (--md5-mismatch skip)", bad)
                sc.skipped = {"path": spec.path, "reason": "md5_mismatch"}
                return sc
        with open(spill_path(spill_dir, u), "wb", buffering=1 << 20) as f:
            for doc in ingest.read_documents([spec], opts, stats):
                sc.kinds.append(DOC)
                sc.ids.append(doc.id)
                if opts.dedup:
                    sc.hashes += ingest.content_hash(doc.text)
                idb, tb = doc.id.encode("utf-8"), doc.text.encode("utf-8")
                f.write(_HEAD.pack(len(idb), len(tb)))
                f.write(idb)
                f.write(tb)
                if on_record is not None:
                    on_record()
    except UserError as e:
        sc.error = str(e)
    except Exception as e:  # a bug: reported like an input error so no rank waits forever
        log.exception("%s: scanning failed", spec.path)
        sc.error = f"{spec.path}: {type(e).__name__}: {e}"
    sc.documents = stats.documents
    sc.dropped = dict(stats.dropped)
    sc.per_input = dict(stats.per_input)
    sc.range_checks = list(stats.range_checks)
    return sc


@dataclass
class Plan:
    g: list  # per unit: np.int64 array, the global index of each DOC record (-1: dropped)
    n_docs: int
    stats: IngestStats  # every count, as one stream over the whole input would give
    updates: dict  # replaced / deleted citations, unknown deletions
    skipped: list  # files skipped by the md5 check


def make_plan(
    units: list[InputSpec], scans: list[UnitScan], opts: ReadOptions, skipped: list
) -> Plan:
    """The global decisions, from every unit's scan in unit order (world-size independent)."""
    errors = [s for s in scans if s.error]
    if errors:
        raise UserError(min(errors, key=lambda s: s.unit).error)
    stats = IngestStats()
    checks: dict[str, list[int]] = {}
    for s in scans:
        stats.documents += s.documents
        stats.dropped.update(s.dropped)
        for k, v in s.per_input.items():
            stats.per_input[k] = stats.per_input.get(k, 0) + v
        for path, ok, bad in s.range_checks:
            c = checks.setdefault(path, [0, 0])
            c[0] += ok
            c[1] += bad
    for path, (ok, bad) in checks.items():  # one file cut into ranges: the whole-file check
        ingest._check_not_binary(InputSpec(path, "", ""), ok, bad)

    # NLM update semantics, in file order: the latest version of a PMID is the live one
    dead: list[dict] = [dict() for _ in scans]  # unit -> {doc index: reason}
    live: dict[str, tuple[int, int]] = {}  # id -> (unit, doc index or -1: no abstract)
    replaced = deleted = unknown = 0
    for u, s in enumerate(scans):
        if units[u].format != "xml":
            continue
        d = 0
        for kind, doc_id in zip(s.kinds, s.ids):
            if kind == DELETE:
                prev = live.pop(doc_id, None)
                if prev is None:
                    unknown += 1
                    continue
                deleted += 1
                if prev[1] >= 0:
                    dead[prev[0]][prev[1]] = "deleted"
                continue
            prev = live.get(doc_id)
            if prev is not None:
                replaced += 1
                if prev[1] >= 0:
                    dead[prev[0]][prev[1]] = "replaced"
            live[doc_id] = (u, d if kind == DOC else -1)
            if kind == DOC:
                d += 1
    del live

    # content dedup and repeated ids over the survivors, exactly as ingest.clean
    seen_text: set[bytes] = set()
    seen_id: set[str] = set()
    g = 0
    out: list = []
    for u, s in enumerate(scans):
        doc_ids = [i for k, i in zip(s.kinds, s.ids) if k == DOC]
        arr = np.full(len(doc_ids), -1, dtype=np.int64)
        gone = dead[u]
        for i, doc_id in enumerate(doc_ids):
            if i in gone:
                stats.dropped[gone[i]] += 1
                continue
            if opts.dedup:
                h = bytes(s.hashes[16 * i : 16 * i + 16])
                if h in seen_text:
                    stats.dropped["duplicate"] += 1
                    continue
                seen_text.add(h)
            if doc_id in seen_id:
                stats.dropped["duplicate_id"] += 1
                continue
            seen_id.add(doc_id)
            arr[i] = g
            g += 1
        out.append(arr)
    updates = {
        "replaced_citations": replaced,
        "deleted_citations": deleted,
        "unknown_deletions": unknown,
    }
    if unknown:
        log.info("%d DeleteCitation PMID(s) named no earlier citation (counted)", unknown)
    md5_skips = [s.skipped for s in scans if s.skipped]
    return Plan(out, g, stats, updates, list(skipped) + md5_skips)


def my_documents(
    units: list[InputSpec], plan: Plan, spill_dir: Path, shard_size: int, rank: int, world: int
) -> Iterator[tuple[int, Document]]:
    """(g, document) of the blocks this rank writes (g // shard_size % world == rank), g order."""
    for u, spec in enumerate(units):
        gs = plan.g[u]
        want = np.nonzero((gs >= 0) & ((gs // shard_size) % world == rank))[0]
        if not len(want):
            continue
        with open(spill_path(spill_dir, u), "rb", buffering=1 << 20) as f:
            at = 0
            for i in want.tolist():
                while at < i:  # skip the records other ranks write
                    a, b = _HEAD.unpack(f.read(_HEAD.size))
                    f.seek(a + b, 1)
                    at += 1
                a, b = _HEAD.unpack(f.read(_HEAD.size))
                doc_id = f.read(a).decode("utf-8")
                text = f.read(b).decode("utf-8")
                at += 1
                yield int(gs[i]), Document(doc_id, text, spec.source)


def remove_spill(spill_dir: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(spill_dir)


__all__ = [
    "make_units",
    "owners",
    "scan_unit",
    "make_plan",
    "my_documents",
    "Plan",
    "UnitScan",
    "SPILL_DIR",
]
