"""Writing webdataset shards with a per-shard offset index (docs/design.md §5).

A shard `shard-000000.tar` is written with webdataset's own `TarWriter`. Each sample has
members `<key>.ids.npy` (token ids, uint16 when the vocabulary fits else int32),
`<key>.json` (metadata: id, source, n_tokens, truncated, plus stage fields such as
score/position) and optionally `<key>.txt`. The key is `sample_key(meta["id"])`, an
injective escape of the sample id (see there); the id itself is in the metadata. The byte offset and size of every member's
data, as written, go to `shard-000000.idx.json` (the same as a scan of the finished tar's
headers, `index_tar_bytes` / `build_index`), so any sample can be read with one seek per
member.

Both files are written under temporary names and renamed when complete: a killed writer
never leaves a partial shard under its final name.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from kdcl_dist.errors import UserError
from kdcl_dist.utils import atomic_path, write_json_atomic

INDEX_FORMAT = 1
# A fixed member mtime makes shards byte-reproducible (same input -> same sha256 on any
# number of ranks) and keeps tar headers plain ustar (a float time.time() forces an extra
# PAX header per member, doubling the header bytes and the time to write and index them).
SHARD_MTIME = 0
_KEY_PLAIN = re.compile(r"[A-Za-z0-9_\-]+")
_KEY_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
KEY_MAX = 120  # escaped keys longer than this end in a hash instead (see sample_key)
_KEY_HASH_PREFIX = 64


class Sample(NamedTuple):
    key: str  # tar key: sample_key(meta["id"]), unique within a dataset
    ids: np.ndarray  # token ids
    meta: dict  # at least {"id", "n_tokens"}
    text: str | None = None


def sample_key(sample_id: str) -> str:
    """The tar member key of a sample id: distinct ids always get distinct keys.

    webdataset splits a member name into key and extension at the first '.', and a member
    name must not climb out of a directory, so keys use only ``[A-Za-z0-9_-%]``:

    - an id made of ``[A-Za-z0-9_-]`` only (``pmid-123``, ``42``, ``x_part3``) is its own key
      (the keys of earlier versions, which replaced other characters by ``_``, are the same
      for such ids);
    - any other id is escaped: every character outside ``[A-Za-z0-9_-]`` becomes ``%XX`` per
      UTF-8 byte, upper-case hex (``a/b`` -> ``a%2Fb``, ``a_b`` stays ``a_b``, ``κ`` -> ``%CE%BA``).
      Escaping is injective and an escaped key always holds a ``%``, so it never equals a
      plain id;
    - an escaped key longer than ``KEY_MAX`` characters is cut to its first 64 characters
      (never inside a ``%XX``) followed by ``%h`` and the blake2b-128 hex digest of the
      whole id. ``%h`` never occurs in an escaped key (``%`` is always followed by an
      upper-case hex digit there), so such a key can only equal another hashed key, which
      needs a 128-bit hash collision (and the shard stage checks keys for uniqueness anyway).
    """
    s = str(sample_id)
    if _KEY_PLAIN.fullmatch(s):
        return s
    key = "".join(
        c if c in _KEY_SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in s
    )
    if len(key) > KEY_MAX or not key:
        import hashlib

        cut = key[:_KEY_HASH_PREFIX]
        pct = cut.rfind("%", len(cut) - 2)
        if pct >= 0:  # do not cut an escape in half
            cut = cut[:pct]
        key = (
            cut
            + "%h"
            + hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        )
    return key


def key_to_id(key: str) -> str | None:
    """The sample id a key was made from (None for a hashed key): for messages only."""
    if "%h" in key:
        return None
    if "%" not in key:
        return key
    from urllib.parse import unquote

    return unquote(key, errors="surrogatepass")


sanitize_key = sample_key  # the name earlier versions used


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx.json"


def ids_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def write_shard(path: str | os.PathLike, samples: Iterable[Sample], dtype=np.int32) -> dict:
    """Write one shard and its index atomically; return its manifest entry."""
    import hashlib

    import webdataset as wds

    path = Path(path)
    # The tar is built in memory and written with one call: the index and the checksum need
    # all of its bytes anyway, and one large write costs far less than thousands of small ones.
    buf = io.BytesIO()
    # members are encoded here exactly as webdataset's default encoder would
    # (np.save bytes, json.dumps(...).encode()), minus its per-sample dispatch
    writer = wds.TarWriter(buf, mtime=SHARD_MTIME, format="GNU_FORMAT", encoder=False)
    # webdataset 1.0 does not hand `format` on to tarfile; GNU headers are cheaper to build
    # than the default PAX ones and still allow long keys (GNU long-name records). The
    # TarWriter drives a TarFile that builds the uniform member headers from a template
    # (same bytes as tarfile's; see _ShardTarFile) and writes straight into the buffer, not
    # through tarfile's stream layer (same bytes too). Nothing was written yet, so the stream
    # that TarWriter opened is dropped unclosed (closing it would end the archive).
    writer.tarstream = _ShardTarFile(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT)
    seen: set[str] = set()
    for s in samples:
        if s.key in seen:  # the index would merge the two samples' members: refuse instead
            raise UserError(
                f"{path}: sample key '{s.key}' (id {s.meta.get('id')!r}) twice in this shard; sample ids must "
                "be unique: a document id equals the `<id>_part<k>` id of a part of a split document, "
                "rename that document or use --too-long truncate"
            )
        seen.add(s.key)
        rec = {
            "__key__": s.key,
            "ids.npy": npy_bytes(np.asarray(s.ids, dtype=dtype)),
            "json": json.dumps(s.meta).encode("utf-8"),
        }
        if s.text is not None:
            rec["txt"] = s.text.encode("utf-8")
        writer.write(rec)
    writer.close()
    blob = buf.getvalue()
    del buf
    # member offsets as written (a scan of the headers, `index_tar_bytes`, gives the same)
    index = writer.tarstream.offset_index()
    digest = hashlib.sha256(blob).hexdigest()
    size = len(blob)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)
    del blob
    write_json_atomic(Path(path.parent) / index_name(path.name), index)
    return {
        "name": path.name,
        "index": index_name(path.name),
        "count": index["count"],
        "bytes": size,
        "sha256": digest,
    }


class _ShardTarFile(tarfile.TarFile):
    """A TarFile whose `addfile` writes plain regular-file headers from a cached template.

    webdataset's TarWriter adds every member with `addfile`; tarfile's generic header code
    (a copy of the TarInfo, a dict of 13 fields, 15 formatted parts, a struct checksum)
    costs about 20 us a member, more than everything else that writing a sample needs
    (two members per sample: ~0.45 s of CPU for the 12k PubMed abstracts). Shard members are
    uniform (regular files, one mode/owner/mtime), so their header is a fixed 512-byte
    template with the name, the size and the checksum patched in. The template comes from
    tarfile's own `tobuf` and is checked against it for probe members before first use;
    any member it does not cover (long or non-ASCII names, links, huge sizes, other
    formats) goes through tarfile's `addfile`. The bytes written are identical.
    """

    _templates: dict = {}  # header fields -> (template bytes, checksum of its fixed part) or None

    def __init__(self, *args, **kwargs):
        self.placed: list[
            tuple[str, int, int]
        ] = []  # (name, data offset, size) of each regular member
        super().__init__(*args, **kwargs)

    def addfile(self, tarinfo, fileobj=None):
        name = tarinfo.name
        size = tarinfo.size
        tpl = self._template(tarinfo) if fileobj is not None else None
        if (
            tpl is None
            or not name.isascii()
            or len(name) >= tarfile.LENGTH_NAME
            or not 0 <= size < 8**11
        ):
            super().addfile(tarinfo, fileobj)
        else:
            self._check("awx")
            data = fileobj.read(size)
            if len(data) != size:
                raise OSError("unexpected end of data")
            self.fileobj.write(
                _fast_header(tpl, name.encode("ascii"), size) + data + tarfile.NUL * (-size % 512)
            )
            self.offset += 512 + size + (-size % 512)
        if tarinfo.isreg():  # where its data landed: the last blocks written
            self.placed.append((name, self.offset - (size + 511) // 512 * 512, size))

    def offset_index(self) -> dict:
        """The offset index of what was written: equal to `index_tar_bytes` of the finished tar."""
        keys, cols = _new_index()
        pos: dict[str, int] = {}
        for name, offset, size in self.placed:
            _add_member(keys, cols, pos, name, offset, size)
        return {"format": INDEX_FORMAT, "count": len(keys), "keys": keys, **cols}

    def _template(self, ti):
        if (
            ti.type != tarfile.REGTYPE
            or ti.linkname
            or type(ti.mtime) is not int
            or self.format not in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT)
        ):
            return None
        key = (
            ti.mode,
            ti.uid,
            ti.gid,
            ti.mtime,
            ti.uname,
            ti.gname,
            ti.devmajor,
            ti.devminor,
            self.format,
            self.encoding,
            self.errors,
        )
        if key not in self._templates:
            self._templates[key] = _make_template(ti, self.format, self.encoding, self.errors)
        return self._templates[key]


def _fast_header(tpl: tuple[bytes, int], name: bytes, size: int) -> bytes:
    base, fixed_sum = tpl
    size_field = b"%011o\0" % size
    chk = fixed_sum + sum(name) + sum(size_field)
    return b"".join(
        (
            name,
            bytes(100 - len(name)),
            base[100:124],
            size_field,
            base[136:148],
            b"%06o\0" % chk,
            base[155:],
        )
    )


def member_header(name: bytes, size: int) -> bytes | None:
    """The 512-byte header `write_shard` gives a regular member `name` (ASCII, under 100 bytes)
    of `size` bytes, for writers that build shard tars themselves (`curriculum.build`); None
    when the template failed its check against tarfile (then use `write_shard`)."""
    tpl = _writer_template()
    return None if tpl is None else _fast_header(tpl, name, size)


@functools.lru_cache(maxsize=1)
def _writer_template():
    """The template of webdataset TarWriter's members (mode 0o444, owner bigdata, SHARD_MTIME), GNU."""
    ti = tarfile.TarInfo("x")
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = 0, SHARD_MTIME, 0o0444, "bigdata", "bigdata"
    return _make_template(ti, tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _make_template(ti: tarfile.TarInfo, fmt: int, encoding: str, errors: str):
    """The header of `ti` with an empty name and size 0, plus the checksum of its fixed part;
    None unless the fast header equals tarfile's for a few probe members."""
    import copy

    probe = copy.copy(ti)
    probe.name, probe.size = "", 0
    base = probe.tobuf(fmt, encoding, errors)
    if len(base) != 512:
        return None
    blank = base[:148] + b" " * 8 + base[156:]
    fixed_sum = sum(blank) - sum(blank[0:100]) - sum(blank[124:136])
    tpl = (blank, fixed_sum)
    for name, size in (
        ("a", 0),
        ("pmid-1.ids.npy", 1234),
        ("k" * 99, 8**11 - 1),
        ("x_9.json", 511),
    ):
        probe.name, probe.size = name, size
        if probe.tobuf(fmt, encoding, errors) != _fast_header(tpl, name.encode("ascii"), size):
            return None
    return tpl


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype_str: str, n: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(n, dtype=np.dtype(dtype_str)), allow_pickle=False)
    return buf.getvalue()[: buf.tell() - n * np.dtype(dtype_str).itemsize]


def npy_bytes(arr: np.ndarray) -> bytes:
    """`np.save` bytes of a 1-D array (header cached per dtype and length)."""
    arr = np.ascontiguousarray(arr)
    if arr.ndim != 1:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    return _npy_header(arr.dtype.str, arr.shape[0]) + arr.tobytes()


def _new_index() -> tuple[list[str], dict[str, list[int]]]:
    return [], {"ids_offset": [], "ids_size": [], "meta_offset": [], "meta_size": []}


def _add_member(keys, cols, pos, name: str, offset: int, size: int) -> None:
    key, _, ext = name.partition(".")
    if key not in pos:
        pos[key] = len(keys)
        keys.append(key)
        for c in cols.values():
            c.append(-1)
    i = pos[key]
    if ext == "ids.npy":
        cols["ids_offset"][i], cols["ids_size"][i] = offset, size
    elif ext == "json":
        cols["meta_offset"][i], cols["meta_size"][i] = offset, size


def index_tar_bytes(blob: bytes) -> dict:
    """The offset index of a tar held in memory: a direct scan of its 512-byte headers.

    Handles ustar/GNU headers, GNU long names and PAX extended headers; anything else
    (sparse files, base-256 sizes) falls back to the `tarfile` scan of `build_index`.
    """
    keys, cols = _new_index()
    pos: dict[str, int] = {}
    at, n = 0, len(blob)
    pax: dict[str, str] = {}
    while at + 512 <= n:
        hdr = blob[at : at + 512]
        if hdr.count(0) == 512:
            break
        size_field = hdr[124:136].strip(b"\0 ")
        if not size_field or size_field[0] & 0x80:  # base-256 size: let tarfile handle it
            return build_index(io.BytesIO(blob))
        size = int(size_field, 8)
        kind = hdr[156:157]
        data_at = at + 512
        at = data_at + (size + 511) // 512 * 512
        if kind == b"x":
            pax = _parse_pax(blob[data_at : data_at + size])
            continue
        if kind == b"g":
            continue
        if kind == b"L":  # GNU long name: the data is the next member's name
            pax = {"path": blob[data_at : data_at + size].split(b"\0", 1)[0].decode("utf-8")}
            continue
        if kind not in (b"0", b"\0"):
            if kind in (b"5", b"1", b"2"):  # directories and links hold no sample data
                pax = {}
                continue
            return build_index(io.BytesIO(blob))
        name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8")
            if prefix:
                name = f"{prefix}/{name}"
        name = pax.get("path", name)
        size = int(pax.get("size", size))
        pax = {}
        _add_member(keys, cols, pos, name, data_at, size)
    return {"format": INDEX_FORMAT, "count": len(keys), "keys": keys, **cols}


def _parse_pax(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        sp = data.index(b" ", i)
        length = int(data[i:sp])
        rec = data[sp + 1 : i + length - 1].decode("utf-8")
        k, _, v = rec.partition("=")
        out[k] = v
        i += length
    return out


def build_index(tar_path) -> dict:
    """Scan a finished tar with `tarfile`: per sample key, (offset, size) of its ids and json members."""
    keys, cols = _new_index()
    pos: dict[str, int] = {}
    opener = (
        tarfile.open(fileobj=tar_path, mode="r:")
        if hasattr(tar_path, "read")
        else tarfile.open(tar_path, "r:")
    )
    with opener as tf:
        for m in tf:
            if m.isfile():
                _add_member(keys, cols, pos, m.name, m.offset_data, m.size)
    return {"format": INDEX_FORMAT, "count": len(keys), "keys": keys, **cols}


def decode_ids(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def decode_meta(blob: bytes) -> dict:
    return json.loads(blob.decode("utf-8"))


def manifest_fingerprint(shards: list[dict], tokenizer: dict | None) -> str:
    from kdcl_dist.utils import fingerprint

    return fingerprint(
        {
            "shards": [(s["name"], s["count"], s["sha256"]) for s in shards],
            "tokenizer": (tokenizer or {}).get("fingerprint"),
        }
    )


def write_documents(
    docs,
    tok,
    out_dir: str | os.PathLike,
    *,
    max_length: int = 256,
    shard_size: int = 2000,
    batch_size: int = 256,
    keep_text: bool = False,
    extra_manifest: dict | None = None,
) -> dict:
    """Minimal single-process path: tokenize `(id, text)` pairs and write shards + dataset.json.

    The full ingestion stage (`kdcl-dist shard`: input formats, cleaning, distribution,
    resume) builds on the same writer; tests and benchmarks use this for fixtures.
    """
    from kdcl_dist import FORMAT_VERSION
    from kdcl_dist.data.tokenizer import tokenizer_info

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = ids_dtype(len(tok))
    entries: list[dict] = []
    buf: list[Sample] = []

    def flush():
        if buf:
            entries.append(write_shard(out / shard_name(len(entries)), list(buf), dtype=dtype))
            buf.clear()

    docs = list(docs)
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        enc = tok([t for _, t in chunk], truncation=True, max_length=max_length)["input_ids"]
        for (doc_id, text), ids in zip(chunk, enc):
            key = sample_key(str(doc_id))
            buf.append(
                Sample(
                    key,
                    np.asarray(ids),
                    {"id": str(doc_id), "n_tokens": len(ids)},
                    text if keep_text else None,
                )
            )
            if len(buf) >= shard_size:
                flush()
    flush()
    tinfo = tokenizer_info(tok, getattr(tok, "name_or_path", ""))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "dataset",
        "tokenizer": tinfo,
        "max_length": max_length,
        "shards": entries,
        "totals": {"kept": sum(e["count"] for e in entries), "tokens": None},
        **(extra_manifest or {}),
    }
    manifest["fingerprint"] = manifest_fingerprint(entries, tinfo)
    from kdcl_dist.utils import write_json_atomic as _w

    _w(out / "dataset.json", manifest)
    return manifest
