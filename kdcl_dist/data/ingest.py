"""Corpus readers -> a stream of `Document(id, text, source)`, with cleaning and drop counters.

Input formats (chosen by `--format`, or by file suffix with `auto`):

- `jsonl` (`.jsonl`, `.ndjson`, optionally `.gz`): one JSON object per line;
  the body is `text_field`, prefixed by `title_field` when present; the id is `id_field`
  (falls back to `<file>:<line>`).
- `json` (`.json`, optionally `.gz`): the content decides. A file whose first line starts
  with `[`, or whose first object spans several lines (pretty-printed), is one JSON
  document: a list of records, or an object holding one such list (`{"data": [...]}`);
  it is read whole into memory. Otherwise it is JSON Lines, read as `jsonl`. Ids fall
  back to `<file>#<n>` (n-th record); messages name `file:line` of the record.
- `txt` (`.txt`, optionally `.gz`): one document per line (`text_unit=line`),
  documents separated by blank lines (`text_unit=paragraph`) or one document per file
  (`text_unit=file`, id = the file's path as in `source`, e.g. `abstracts/0001.txt`).
- NLM downloads: `pubmedYYnNNNN.xml.gz` files are read in NLM's order; README, `.md5` and
  other files beside them are skipped and counted (`resolve_inputs_skipped`, kdcl_dist/data/nlm.py);
  `<DeleteCitation>` PMIDs and PMIDs of citations without abstract reach `IngestStats.hook`
  so that the update semantics can be applied over all files (kdcl_dist/data/ingest_plan.py).
- `xml` (`.xml`, `.xml.gz`): PubMed/MEDLINE XML as NLM publishes its baseline files
  (`MedlineCitationSet` or `PubmedArticleSet`). A document is the article title followed
  by every `AbstractText` part (its `Label` kept as `LABEL: text`). Parsed with
  `xml.etree.ElementTree.iterparse`, one citation in memory at a time.
- `parquet`: streamed by record batches with pyarrow.
- `hf`: a `datasets` directory written by `save_to_disk` (read with `load_from_disk`) or a
  hub dataset name (read with `load_dataset(..., streaming=True)`).

Ids (`id_field`): a string is kept exactly (any Unicode string except one holding U+0000,
which numpy's fixed-width strings in score files would cut off); an integer becomes its
decimal string; a missing, null or empty id falls back as above; anything else (a float,
boolean, list, object) is refused naming `file:line` (`bad_id` with `--skip-bad-lines`).
Duplicates by id are exact: two documents are the same id only if their ids are equal
strings. The tar key of each sample is derived from its id by `shards.sample_key`
(injective), so distinct ids never collide.

A UTF-8 byte order mark at the start of a file (and, in JSON Lines, at the start of a
line, as concatenating such files leaves) is removed.

Every record the readers see is one *input document*, and it ends up either kept or
counted under exactly one drop reason (docs/design.md §4.6):

    invalid_json   a jsonl line / json record that is not a JSON object (error unless skip_bad_lines)
    missing_field  a record without a string text field     (error unless skip_bad_lines)
    bad_id         an id that is not a string or an integer, or holds U+0000
                                                            (error unless skip_bad_lines)
    undecodable    bytes that are not UTF-8 (or lone surrogates from JSON escapes)
    no_abstract    a MEDLINE citation without an abstract
    replaced       a MEDLINE citation whose PMID a later file holds again (its newer version)
    deleted        a MEDLINE citation a later file's <DeleteCitation> removes
    empty          nothing but whitespace in the body
    duplicate      same text as an earlier document (hash of whitespace-normalised text)
    duplicate_id   same id (exactly equal strings) as an earlier, different document
    too_short      fewer than min_tokens tokens (counted later, by the shard stage)

Documents that are too long are not dropped: the shard stage truncates or splits them.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import logging
import numbers
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from kdcl_dist.errors import UserError

log = logging.getLogger("kdcl_dist.ingest")

FORMATS = ("auto", "jsonl", "json", "txt", "xml", "parquet", "hf")
TEXT_UNITS = ("line", "paragraph", "file")
DROP_REASONS = (
    "invalid_json",
    "missing_field",
    "bad_id",
    "undecodable",
    "no_abstract",
    "replaced",
    "deleted",
    "empty",
    "duplicate",
    "duplicate_id",
    "too_short",
)
_BOM = b"\xef\xbb\xbf"
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".ndjson": "jsonl",
    ".txt": "txt",
    ".text": "txt",
    ".xml": "xml",
    ".parquet": "parquet",
}
_WARN_PER_REASON = 5


class Document(NamedTuple):
    id: str
    text: str
    source: str


@dataclass
class ReadOptions:
    format: str = "auto"
    text_field: str = "text"
    title_field: str = "title"  # "" disables the title prefix
    id_field: str = "id"  # "" always uses <file>:<line>
    text_unit: str = "line"  # txt: "line", "paragraph" or "file"
    skip_bad_lines: bool = False
    hf_split: str = "train"
    dedup: bool = True
    verbose: bool = True  # log the first few drops per reason (rank 0 only)


@dataclass
class InputSpec:
    path: str  # file, directory (hf) or hub name
    format: str
    source: str  # short name recorded in each sample's metadata
    bytes: int = 0
    md5: str | None = None  # NLM's `.md5` file beside it, checked before the file is read
    start: int = 0  # a byte range of a jsonl/txt file (ingest_plan): lines starting in
    end: int | None = None  # [start, end); None = the whole file


@dataclass
class IngestStats:
    """Counts shared by the readers and the cleaner; `documents` = every record seen."""

    documents: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_input: dict = field(default_factory=dict)  # source -> records seen
    _warned: Counter = field(default_factory=Counter)
    # called as hook(kind, id) for MEDLINE records that are not documents: "n" a citation
    # without abstract (a newer version of its PMID still replaces the older), "x" a
    # <DeleteCitation> PMID; set by ingest_plan, which applies NLM's update semantics
    hook: object = None
    # byte-range readers leave the file-level "not UTF-8 at all" check to the caller:
    # (path, readable records, undecodable records) per range
    range_checks: list = field(default_factory=list)

    def drop(self, reason: str, where: str, verbose: bool, detail: str = "") -> None:
        self.dropped[reason] += 1
        if verbose and self._warned[reason] < _WARN_PER_REASON:
            self._warned[reason] += 1
            more = (
                " (further ones are only counted)"
                if self._warned[reason] == _WARN_PER_REASON
                else ""
            )
            log.warning(
                "%s: dropped (%s)%s%s", where, reason, f": {detail}" if detail else "", more
            )


# --------------------------------------------------------------------------- inputs


def _suffix_format(p: Path) -> str | None:
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists())


def resolve_inputs(paths: Iterable[str], fmt: str = "auto") -> list[InputSpec]:
    """Expand `--input` paths into files with a format each, in a deterministic order
    (files that are not input, such as NLM's `.md5` files and README, are left out: see
    `resolve_inputs_skipped`)."""
    return resolve_inputs_skipped(paths, fmt)[0]


def resolve_inputs_skipped(
    paths: Iterable[str], fmt: str = "auto"
) -> tuple[list[InputSpec], list[dict]]:
    """`--input` paths (files, directories, glob patterns) -> (inputs, skipped files).

    Directories are walked sorted. NLM citation files (`pubmedYYnNNNN.xml[.gz]`) are put in
    NLM's order (`nlm.nlm_order`); when any input is one, the collection is an NLM download
    and every file that is not `.xml`/`.xml.gz` (README, `.md5`, stray files) is skipped and
    counted, never parsed. `.md5` files are always skipped (they are checked against the file
    they name when it is read). Skipped: `[{"path", "reason"}]`.

    Raises a UserError naming the path for a missing file, an empty file, a directory with
    no readable input, or a file whose format cannot be told from its name.
    """
    from kdcl_dist.data import nlm

    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    paths = list(paths)
    if not paths:
        raise UserError("--input: no input given; pass one or more files or directories")
    # entries: an hf InputSpec, or (file, source, found in a directory)
    entries: list = []
    for raw in paths:
        p = Path(raw)
        if fmt == "hf" or (fmt == "auto" and _is_hf_dir(p)):
            if p.exists() and not _is_hf_dir(p):
                raise UserError(
                    f"{p}: not a `datasets` directory (no dataset_dict.json or state.json); "
                    "write it with Dataset.save_to_disk or pass a hub dataset name"
                )
            entries.append(
                InputSpec(str(p) if p.exists() else raw, "hf", p.name if p.exists() else raw)
            )
            continue
        if not p.exists() and any(c in raw for c in "*?["):
            matched = sorted(Path(m) for m in glob.glob(raw, recursive=True))
            if not matched:
                raise UserError(f"{raw}: no file matches this pattern; check --input")
            entries.extend((m, m.name, False) for m in matched if m.is_file())
            continue
        if not p.exists():
            raise UserError(f"{p}: input not found; check the path given to --input")
        if p.is_dir():
            before = len(entries)
            all_files = sorted(p.rglob("*"))
            hf_dirs = [d for d in all_files if fmt == "auto" and _is_hf_dir(d)]
            for d in hf_dirs:  # a saved HF dataset inside the directory is one input
                entries.append(InputSpec(str(d), "hf", str(d.relative_to(p.parent))))
            for f in all_files:
                if any(h in f.parents for h in hf_dirs):
                    continue
                if f.is_file() and not f.name.startswith("."):
                    entries.append((f, str(f.relative_to(p.parent)), True))
            if len(entries) == before:
                raise UserError(_no_input(p))
        else:
            entries.append((p, p.name, False))
    files = [e for e in entries if isinstance(e, tuple)]
    is_nlm = any(nlm.nlm_key(f.name) is not None for f, _, _ in files)
    skipped: list[dict] = []
    kept: list = []
    for e in entries:
        if not isinstance(e, tuple):
            kept.append(e)
            continue
        f, source, in_dir = e
        reason = None
        if f.name.lower().endswith(".md5"):
            reason = "md5_file"
        elif (is_nlm or (fmt == "xml" and in_dir)) and not nlm.is_xml_name(f.name):
            reason = "not_citation_xml"
        elif in_dir and fmt == "auto" and not _suffix_format(f):
            reason = "unknown_format"
        if reason:
            skipped.append({"path": str(f), "reason": reason})
        else:
            kept.append(e)
    if is_nlm:  # NLM-named files in NLM's order, in the slots they occupy
        slots = [i for i, e in enumerate(kept) if isinstance(e, tuple)]
        by_path = {e[0]: e for i, e in enumerate(kept) if isinstance(e, tuple)}
        order = nlm.nlm_order([kept[i][0] for i in slots])
        for i, f in zip(slots, order):
            kept[i] = by_path[f]
    out: list[InputSpec] = []
    for e in kept:
        if isinstance(e, tuple):
            f, source, _ = e
            spec = _file_spec(f, fmt, source)
            spec.md5 = str(m) if (m := nlm.md5_file_of(f)) is not None else None
            out.append(spec)
        else:
            out.append(e)
    if not out:
        raise UserError(_no_input(Path(paths[0]) if len(paths) == 1 else Path(", ".join(paths))))
    sources = Counter(s.source for s in out)
    for s in out:  # two inputs with the same name: use the full path so ids stay unique
        if sources[s.source] > 1:
            s.source = s.path
    if skipped:
        reasons = Counter(x["reason"] for x in skipped)
        log.info(
            "skipped %d file(s) that are not input (%s)",
            len(skipped),
            ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())),
        )
    return out, skipped


def _no_input(p: Path) -> str:
    return (
        f"{p}: directory has no readable input (looked for "
        f"{', '.join(sorted(set(_SUFFIXES)))} files, optionally .gz); pass files or --format"
    )


def _file_spec(f: Path, fmt: str, source: str) -> InputSpec:
    kind = fmt if fmt != "auto" else _suffix_format(f)
    if kind is None:
        raise UserError(
            f"{f}: cannot tell the input format from the file name; pass --format "
            f"({', '.join(FORMATS[1:])})"
        )
    size = f.stat().st_size
    if size == 0:
        raise UserError(f"{f}: empty file (0 bytes); nothing to ingest, remove it from --input")
    return InputSpec(str(f), kind, source, size)


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


# --------------------------------------------------------------------------- readers


def _text_ok(text: str) -> bool:
    """False for strings that cannot be written as UTF-8 (lone surrogates from JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _join_title(title, body: str) -> str:
    if isinstance(title, str) and title.strip():
        return f"{title.strip()} {body}"
    return body


def _record_to_doc(
    rec, opts: ReadOptions, fallback_id: str, where: str, spec: InputSpec, stats: IngestStats
) -> Document | None:
    """Shared by jsonl, parquet and hf rows: pick fields, build the document or count a drop."""
    body = rec.get(opts.text_field) if isinstance(rec, dict) else None
    if not isinstance(body, str):
        if not opts.skip_bad_lines:
            have = (
                ", ".join(sorted(map(str, rec))[:8])
                if isinstance(rec, dict)
                else type(rec).__name__
            )
            raise UserError(
                f"{where}: record has no string field '{opts.text_field}' (fields: {have}); "
                "set --text-field, or pass --skip-bad-lines to count and skip such records"
            )
        stats.drop("missing_field", where, opts.verbose)
        return None
    if not body.strip():
        stats.drop("empty", where, opts.verbose)
        return None
    text = _join_title(rec.get(opts.title_field) if opts.title_field else None, body.strip())
    if not _text_ok(text):
        stats.drop("undecodable", where, opts.verbose, "invalid unicode (lone surrogate)")
        return None
    raw_id = rec.get(opts.id_field) if opts.id_field else None
    doc_id = document_id(raw_id, fallback_id, where, opts, stats)
    return None if doc_id is None else Document(doc_id, text, spec.source)


_JSON_TYPES = {
    bool: "boolean",
    int: "number",
    float: "number",
    list: "list",
    dict: "object",
    str: "string",
    type(None): "null",
}


def document_id(
    raw_id, fallback_id: str, where: str, opts: ReadOptions, stats: IngestStats
) -> str | None:
    """The id rule: a string as is, an integer as its decimal string, missing/null/"" ->
    `fallback_id`; anything else is refused (UserError naming `where`) or, with
    skip_bad_lines, counted as `bad_id` (None). Lone surrogates: `undecodable` (None)."""
    if raw_id is None or raw_id == "":
        return fallback_id
    if isinstance(raw_id, str):
        doc_id = raw_id
    elif isinstance(raw_id, numbers.Integral) and not isinstance(raw_id, bool):
        return str(int(raw_id))
    else:
        kind = _JSON_TYPES.get(type(raw_id), type(raw_id).__name__)
        try:
            shown = json.dumps(raw_id, ensure_ascii=False)
        except (TypeError, ValueError):
            shown = repr(raw_id)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        article = "an" if kind[:1] in "aeiou" else "a"
        return _bad_id(
            f"id field '{opts.id_field}' holds {article} {kind} ({shown}), not a string or an integer",
            where,
            opts,
            stats,
        )
    if "\0" in doc_id:
        return _bad_id(f"id {doc_id!r} contains the character U+0000", where, opts, stats)
    if not _text_ok(doc_id):
        stats.drop("undecodable", where, opts.verbose, "invalid unicode in the id (lone surrogate)")
        return None
    return doc_id


def _bad_id(what: str, where: str, opts: ReadOptions, stats: IngestStats) -> None:
    if not opts.skip_bad_lines:
        raise UserError(
            f"{where}: {what}; give every record a string id, set --id-field '' to number "
            "documents by file:line, or pass --skip-bad-lines to count and skip such records"
        )
    stats.drop("bad_id", where, opts.verbose, what)
    return None


def _read_jsonl(spec: InputSpec, opts: ReadOptions, stats: IngestStats) -> Iterator[Document]:
    seen_ok = 0
    undecodable = 0
    try:
        with _open_range(spec) as (f, line0):
            for lineno, raw in _lines(f, every_line=True, first=line0 + 1):
                if not raw.strip():
                    continue
                stats.documents += 1
                stats.per_input[spec.source] = stats.per_input.get(spec.source, 0) + 1
                where = f"{spec.path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    undecodable += 1
                    stats.drop(
                        "undecodable",
                        where,
                        opts.verbose,
                        f"not UTF-8 ({e.reason} at byte {e.start})",
                    )
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    if not opts.skip_bad_lines:
                        raise UserError(
                            f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                            f"{_pretty_hint(line, lineno)}fix the line or pass --skip-bad-lines "
                            "to count and skip it"
                        ) from None
                    stats.drop("invalid_json", where, opts.verbose, e.msg)
                    continue
                if not isinstance(rec, dict):
                    if not opts.skip_bad_lines:
                        raise UserError(
                            f"{where}: a JSON {type(rec).__name__}, not an object; "
                            f"{_pretty_hint(line, lineno)}each line must be a JSON object, or pass "
                            "--skip-bad-lines to count and skip it"
                        )
                    stats.drop("invalid_json", where, opts.verbose, "not an object")
                    continue
                doc = _record_to_doc(rec, opts, f"{spec.source}:{lineno}", where, spec, stats)
                if doc is not None:
                    seen_ok += 1
                    yield doc
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(
            f"{spec.path}: truncated or corrupt gzip file ({e}); re-download or re-compress it"
        ) from None
    _check_not_binary(spec, seen_ok, undecodable, stats)


def _lines(f, every_line: bool = False, first: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a binary file, without a UTF-8 BOM at the start of the file
    (or, with every_line, at the start of any line); `first` = the first line's number."""
    for lineno, raw in enumerate(f, first):
        if (lineno == 1 or every_line) and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        yield lineno, raw


class _RangeReader:
    """The lines of a file that start in [start, end) (`spec.start`/`spec.end`), so that
    ranks can read disjoint byte ranges of one file; each line belongs to exactly one range."""

    def __init__(self, f, end: int):
        self.f, self.end = f, end

    def __iter__(self):
        while self.f.tell() < self.end:
            line = self.f.readline()
            if not line:
                return
            yield line


@contextlib.contextmanager
def _open_range(spec: InputSpec):
    """(line iterable, number of lines before it) for a whole file or `spec`'s byte range."""
    if spec.end is None:
        with _open_binary(spec.path) as f:
            yield f, 0
        return
    with open(spec.path, "rb") as f:
        start = spec.start
        if start > 0:  # the range starts with the first line that starts at or after `start`
            f.seek(start - 1)
            f.readline()
            start = f.tell()
        line0 = _count_newlines(spec.path, start)
        yield _RangeReader(f, spec.end), line0


def _count_newlines(path: str, end: int) -> int:
    """Lines before byte `end` (for `file:line` messages and ids of a byte range).

    Read in 8 MiB pieces into one buffer: an mmap of the prefix would count every page it
    touched in the process's resident memory (ru_maxrss), up to the size of the file.
    """
    n, left = 0, end
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while left > 0:
            got = f.readinto(memoryview(buf)[: min(left, len(buf))])
            if not got:
                break
            n += buf.count(b"\n", 0, got)
            left -= got
    return n


def _pretty_hint(line: str, lineno: int) -> str:
    """A hint for a JSON Lines error on a line that starts a pretty-printed JSON document."""
    s = line.strip()
    if lineno <= 2 and (s.startswith("[") or s == "{"):
        return (
            "the file looks like one JSON document, not JSON Lines: name it .json "
            "or pass --format json; otherwise "
        )
    return ""


def _check_not_binary(
    spec: InputSpec, ok: int, undecodable: int, stats: IngestStats | None = None
) -> None:
    if spec.end is not None and stats is not None:  # one range: the caller checks the file
        stats.range_checks.append((spec.path, ok, undecodable))
        return
    if undecodable and not ok:
        raise UserError(
            f"{spec.path}: not UTF-8 text ({undecodable} undecodable records, none readable); "
            "convert it (e.g. iconv -f latin1 -t utf-8) or check that it is the right file"
        )


def _read_txt(spec: InputSpec, opts: ReadOptions, stats: IngestStats) -> Iterator[Document]:
    seen_ok = 0
    undecodable = 0

    def emit(chunks: list[bytes], first_line: int):
        nonlocal seen_ok, undecodable
        stats.documents += 1
        stats.per_input[spec.source] = stats.per_input.get(spec.source, 0) + 1
        where = f"{spec.path}:{first_line}"
        try:
            text = b" ".join(c.strip() for c in chunks).decode("utf-8").strip()
        except UnicodeDecodeError as e:
            undecodable += 1
            stats.drop("undecodable", where, opts.verbose, f"not UTF-8 ({e.reason})")
            return None
        if not text:
            stats.drop("empty", where, opts.verbose)
            return None
        seen_ok += 1
        return Document(f"{spec.source}:{first_line}", text, spec.source)

    try:
        with _open_range(spec) as (f, line0):  # a byte range only for text_unit=line
            if opts.text_unit == "file":
                data = f.read()
                if data.startswith(_BOM):
                    data = data[len(_BOM) :]
                stats.documents += 1
                stats.per_input[spec.source] = stats.per_input.get(spec.source, 0) + 1
                try:
                    text = data.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    undecodable += 1
                    stats.drop(
                        "undecodable",
                        spec.path,
                        opts.verbose,
                        f"not UTF-8 ({e.reason} at byte {e.start})",
                    )
                else:
                    if not text:
                        stats.drop("empty", spec.path, opts.verbose)
                    else:
                        seen_ok += 1
                        yield Document(spec.source, text, spec.source)
            elif opts.text_unit == "line":
                for lineno, raw in _lines(f, first=line0 + 1):
                    if raw.strip():
                        doc = emit([raw], lineno)
                        if doc is not None:
                            yield doc
            else:
                buf: list[bytes] = []
                start = 0
                for lineno, raw in _lines(f):
                    if raw.strip():
                        if not buf:
                            start = lineno
                        buf.append(raw)
                    elif buf:
                        doc = emit(buf, start)
                        buf = []
                        if doc is not None:
                            yield doc
                if buf:
                    doc = emit(buf, start)
                    if doc is not None:
                        yield doc
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(
            f"{spec.path}: truncated or corrupt gzip file ({e}); re-download or re-compress it"
        ) from None
    _check_not_binary(spec, seen_ok, undecodable, stats)


def _read_json(spec: InputSpec, opts: ReadOptions, stats: IngestStats) -> Iterator[Document]:
    """`.json`: JSON Lines or one JSON document (a list of records, or an object holding one),
    told apart by the content (see the module doc)."""
    try:
        lines_format = _sniff_json_lines(spec, opts)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(
            f"{spec.path}: truncated or corrupt gzip file ({e}); re-download or re-compress it"
        ) from None
    if lines_format:
        spec.format = "jsonl"
        yield from _read_jsonl(spec, opts, stats)
    else:
        spec.format = "json"
        yield from _read_json_document(spec, opts, stats)


def _sniff_json_lines(spec: InputSpec, opts: ReadOptions) -> bool:
    """True when the file holds JSON Lines, False when it is one JSON document."""
    first: list[bytes] = []
    with _open_binary(spec.path) as f:
        for _, raw in _lines(f):
            if raw.strip():
                first.append(raw.strip())
                if len(first) == 2:
                    break
    if not first:
        return True
    if first[0].startswith(b"["):
        return False
    try:
        rec = json.loads(first[0])
    except ValueError:  # JSONDecodeError or not UTF-8
        if first[0].startswith(b"{") and len(first) == 2:
            try:  # a broken first line of JSON Lines: the next line is a whole object
                return isinstance(json.loads(first[1]), dict)
            except ValueError:
                return False
        return not first[0].startswith(b"{")
    if (
        isinstance(rec, dict)
        and len(first) == 1
        and not isinstance(rec.get(opts.text_field), str)
        and _record_lists(rec)
    ):
        return False  # one line holding {"data": [...]}: a (minified) JSON document
    return True


def _record_lists(obj: dict) -> list[str]:
    """Keys of `obj` whose value is a non-empty list starting with a JSON object."""
    return [k for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], dict)]


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _member_value_pos(text: str, pos: int, key: str) -> int:
    """Where the value of `key` starts in the (valid) JSON object at text[pos]; the last one wins."""
    dec = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    found = -1
    while text[pos] != "}":
        k, pos = dec.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past the ':'
        if k == key:
            found = pos
        _, pos = dec.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return found


def _array_items(text: str, pos: int) -> Iterator[tuple[int, object]]:
    """(start, value) of each element of the (valid) JSON array at text[pos]."""
    dec = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    while text[pos] != "]":
        value, end = dec.raw_decode(text, pos)
        yield pos, value
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)


def _read_json_document(
    spec: InputSpec, opts: ReadOptions, stats: IngestStats
) -> Iterator[Document]:
    try:
        with _open_binary(spec.path) as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(
            f"{spec.path}: truncated or corrupt gzip file ({e}); re-download or re-compress it"
        ) from None
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{spec.path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); convert the file "
            "(e.g. iconv -f latin1 -t utf-8) or check that it is the right file"
        ) from None
    del data
    what = (
        "a .json corpus is one JSON document: a list of records, or an object holding one; "
        "or JSON Lines, one object per line"
    )
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{spec.path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file "
            f"({what})"
        ) from None
    start = _skip_ws(text, 0)
    if isinstance(doc, dict) and isinstance(doc.get(opts.text_field), str):
        items: Iterable[tuple[int, object]] = [(start, doc)]  # a single record
    elif isinstance(doc, dict):
        keys = _record_lists(doc)
        if len(keys) > 1:  # prefer the one list whose records have the text field
            with_text = [k for k in keys if isinstance(doc[k][0].get(opts.text_field), str)]
            keys = with_text if len(with_text) == 1 else keys
        if len(keys) != 1:
            have = ", ".join(map(repr, list(doc)[:8]))
            why = (
                f"holds several lists of records ({', '.join(map(repr, keys))})"
                if keys
                else f"has no list of records (keys: {have or 'none'})"
            )
            raise UserError(
                f"{spec.path}: the JSON object {why}; expected a list of "
                f'{{"{opts.id_field or "id"}": ..., "{opts.text_field}": ...}} objects or an object '
                "holding exactly one such list (or write JSON Lines, one object per line)"
            )
        pos = _member_value_pos(text, start, keys[0])
        del doc
        items = _array_items(text, pos)
    elif isinstance(doc, list):
        del doc
        items = _array_items(text, start)
    else:
        raise UserError(
            f"{spec.path}: a JSON {_JSON_TYPES.get(type(doc), type(doc).__name__)}, not a list of "
            f"records; {what}"
        )
    line, last = 1, 0
    for n, (pos, rec) in enumerate(items, 1):
        line += text.count("\n", last, pos)
        last = pos
        stats.documents += 1
        stats.per_input[spec.source] = stats.per_input.get(spec.source, 0) + 1
        where = f"{spec.path}:{line} (record {n})"
        if not isinstance(rec, dict):
            kind = _JSON_TYPES.get(type(rec), type(rec).__name__)
            if not opts.skip_bad_lines:
                raise UserError(
                    f"{where}: a JSON {kind}, not an object; each record must be a JSON object, "
                    "or pass --skip-bad-lines to count and skip it"
                )
            stats.drop("invalid_json", where, opts.verbose, "not an object")
            continue
        d = _record_to_doc(rec, opts, f"{spec.source}#{n}", where, spec, stats)
        if d is not None:
            yield d


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _citation_to_doc(el, spec: InputSpec, index: int, opts: ReadOptions, stats: IngestStats):
    pmid_el = el.find("PMID")
    pmid = (pmid_el.text or "").strip() if pmid_el is not None else ""
    where = f"{spec.path}: citation {index}" + (f" (PMID {pmid})" if pmid else "")
    article = el.find("Article")
    parts = []
    if article is not None:
        for a in article.findall("Abstract/AbstractText"):
            body = " ".join("".join(a.itertext()).split())
            if not body:
                continue
            label = a.get("Label")
            parts.append(f"{label}: {body}" if label else body)
    if not parts:
        stats.drop("no_abstract", where, False)  # common in MEDLINE: only counted
        if pmid and stats.hook is not None:  # still a newer version of its PMID
            stats.hook("n", f"pmid-{pmid}")
        return None
    title = ""
    if article is not None:
        t = article.find("ArticleTitle")
        if t is not None:
            title = " ".join("".join(t.itertext()).split())
    text = _join_title(title, " ".join(parts))
    return Document(f"pmid-{pmid}" if pmid else f"{spec.source}:{index}", text, spec.source)


def _read_xml(spec: InputSpec, opts: ReadOptions, stats: IngestStats) -> Iterator[Document]:
    import xml.etree.ElementTree as ET

    count = deletions = 0
    depth = 0
    root = None
    try:
        with _open_binary(spec.path) as f:
            for event, el in ET.iterparse(f, events=("start", "end")):
                if event == "start":
                    depth += 1
                    if root is None:
                        root = el
                    continue
                depth -= 1
                if _local(el.tag) == "MedlineCitation":
                    count += 1
                    stats.documents += 1
                    stats.per_input[spec.source] = stats.per_input.get(spec.source, 0) + 1
                    doc = _citation_to_doc(el, spec, count, opts, stats)
                    el.clear()
                    if doc is not None:
                        yield doc
                elif _local(el.tag) == "DeleteCitation":  # update files: PMIDs to remove
                    for pm in el:
                        if _local(pm.tag) == "PMID" and (pm.text or "").strip():
                            deletions += 1
                            if stats.hook is not None:
                                stats.hook("x", f"pmid-{pm.text.strip()}")
                    el.clear()
                if depth == 1 and root is not None:
                    root.clear()  # finished a top-level record: free it (streaming)
    except (EOFError, zlib.error, gzip.BadGzipFile, ET.ParseError) as e:
        raise UserError(
            f"{spec.path}: truncated or corrupt XML/gzip after {count} citations ({e}); "
            "re-download the file (NLM publishes an .md5 beside each baseline file)"
        ) from None
    if count == 0 and deletions == 0:
        raise UserError(
            f"{spec.path}: no <MedlineCitation> records; is this a PubMed/MEDLINE XML file?"
        )


def _read_parquet(spec: InputSpec, opts: ReadOptions, stats: IngestStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(spec.path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{spec.path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if opts.text_field not in names:
        raise UserError(
            f"{spec.path}: no column '{opts.text_field}' (columns: {', '.join(names)}); set --text-field"
        )
    cols = [c for c in (opts.text_field, opts.title_field, opts.id_field) if c and c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=cols):
        for rec in batch.to_pylist():
            row += 1
            stats.documents += 1
            stats.per_input[spec.source] = stats.per_input.get(spec.source, 0) + 1
            doc = _record_to_doc(
                rec, opts, f"{spec.source}:{row}", f"{spec.path}: row {row}", spec, stats
            )
            if doc is not None:
                yield doc


def _read_hf(spec: InputSpec, opts: ReadOptions, stats: IngestStats) -> Iterator[Document]:
    import datasets

    if Path(spec.path).exists():
        ds = datasets.load_from_disk(spec.path)
        if isinstance(ds, datasets.DatasetDict):
            if opts.hf_split not in ds:
                raise UserError(
                    f"{spec.path}: no split '{opts.hf_split}' (splits: {', '.join(ds)}); set hf_split="
                )
            ds = ds[opts.hf_split]
    else:
        try:  # a hub name: streamed, never downloaded whole
            ds = datasets.load_dataset(spec.path, split=opts.hf_split, streaming=True)
        except Exception as e:
            raise UserError(
                f"{spec.path}: cannot load the dataset from the hub ({str(e).splitlines()[0]}); "
                "pass a load_from_disk directory or a reachable dataset name"
            ) from None
    names = getattr(ds, "column_names", None)
    if names is not None and opts.text_field not in names:
        raise UserError(
            f"{spec.path}: no column '{opts.text_field}' (columns: {', '.join(names)}); set --text-field"
        )
    for row, rec in enumerate(ds, 1):
        stats.documents += 1
        stats.per_input[spec.source] = stats.per_input.get(spec.source, 0) + 1
        doc = _record_to_doc(
            rec, opts, f"{spec.source}:{row}", f"{spec.path}: row {row}", spec, stats
        )
        if doc is not None:
            yield doc


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "txt": _read_txt,
    "xml": _read_xml,
    "parquet": _read_parquet,
    "hf": _read_hf,
}


def read_documents(
    inputs: list[InputSpec], opts: ReadOptions, stats: IngestStats
) -> Iterator[Document]:
    """Raw documents from every input in order (format-level drops counted in `stats`)."""
    for spec in inputs:
        stats.per_input.setdefault(spec.source, 0)
        yield from _READERS[spec.format](spec, opts, stats)


# --------------------------------------------------------------------------- cleaning


def content_hash(text: str) -> bytes:
    """Duplicate detection key: whitespace-normalised text (tokenizers ignore whitespace runs)."""
    # Most documents are already normalised: no whitespace but single spaces between words.
    # Every character that str.split() splits on, except the ASCII space, is a control or
    # separator character, which isprintable() rejects; so when these checks pass the
    # split/join (the costliest part of cleaning) would give back the text unchanged.
    if text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        norm = text
    else:
        norm = " ".join(text.split())
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


def clean(docs: Iterable[Document], opts: ReadOptions, stats: IngestStats) -> Iterator[Document]:
    """Drop exact duplicates (content hash) and repeated ids; keep the input order.

    Deterministic and order-preserving, so every rank that runs it over the same inputs
    agrees on which documents survive and on their global index. Ids are compared exactly
    (no sanitising): only documents with equal ids are `duplicate_id`.
    """
    seen_text: set[bytes] = set()
    seen_id: set[str] = set()
    for doc in docs:
        if opts.dedup:
            h = content_hash(doc.text)
            if h in seen_text:
                stats.drop("duplicate", f"{doc.source}: {_shown(doc.id)}", opts.verbose)
                continue
            seen_text.add(h)
        if doc.id in seen_id:
            stats.drop(
                "duplicate_id",
                f"{doc.source}: {_shown(doc.id)}",
                opts.verbose,
                "another document already has this id (set --id-field, or id_field='' for file:line ids)",
            )
            continue
        seen_id.add(doc.id)
        yield doc


def _shown(doc_id: str) -> str:
    """An id as messages show it: as is when printable, else its repr (one line)."""
    return doc_id if doc_id.isprintable() else repr(doc_id)


def iter_clean_documents(
    paths: Iterable[str], opts: ReadOptions, stats: IngestStats | None = None
) -> Iterator[Document]:
    """Convenience: resolve inputs, read and clean (used by `kdcl-dist tokenizer`)."""
    stats = stats if stats is not None else IngestStats()
    yield from clean(read_documents(resolve_inputs(paths, opts.format), opts, stats), opts, stats)


def describe_drops(stats: IngestStats) -> str:
    items = [f"{k}={v}" for k, v in sorted(stats.dropped.items()) if v]
    return ", ".join(items) if items else "none"


__all__ = [
    "Document",
    "ReadOptions",
    "InputSpec",
    "IngestStats",
    "resolve_inputs",
    "read_documents",
    "clean",
    "iter_clean_documents",
    "content_hash",
    "document_id",
    "FORMATS",
    "TEXT_UNITS",
    "DROP_REASONS",
]
