"""Writing webdataset shards with a per-shard offset index (DESIGN §5).

A shard `shard-000000.tar` is written with webdataset's own `TarWriter`. Each sample has
members `<key>.ids.npy` (token ids, uint16 when the vocabulary fits else int32),
`<key>.json` (metadata: id, source, n_tokens, truncated, plus stage fields such as
score/position) and optionally `<key>.txt`. After the tar is complete, it is scanned once
with `tarfile` and the byte offset and size of every member's data are written to
`shard-000000.idx.json`, so any sample can be read with one seek per member.

Both files are written under temporary names and renamed when complete: a killed writer
never leaves a partial shard under its final name.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from kdcl_dist.utils import atomic_path, sha256_file, write_json_atomic

INDEX_FORMAT = 1
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


class Sample(NamedTuple):
    key: str            # tar key (sanitized id, unique within a dataset)
    ids: np.ndarray     # token ids
    meta: dict          # at least {"id", "n_tokens"}
    text: str | None = None


def sanitize_key(sample_id: str) -> str:
    """webdataset splits keys at the first '.', so keys use [A-Za-z0-9_-] only."""
    key = _KEY_BAD.sub("_", str(sample_id))
    return key or "_"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx.json"


def ids_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def write_shard(path: str | os.PathLike, samples: Iterable[Sample], dtype=np.int32) -> dict:
    """Write one shard and its index atomically; return its manifest entry."""
    import webdataset as wds

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f)
            for s in samples:
                rec = {"__key__": s.key, "ids.npy": np.asarray(s.ids, dtype=dtype), "json": s.meta}
                if s.text is not None:
                    rec["txt"] = s.text
                writer.write(rec)
            writer.close()
        index = build_index(tmp)
    write_json_atomic(Path(path.parent) / index_name(path.name), index)
    return {
        "name": path.name,
        "index": index_name(path.name),
        "count": index["count"],
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def build_index(tar_path: str | os.PathLike) -> dict:
    """Scan a finished tar: per sample key, (offset, size) of its ids and json members."""
    keys: list[str] = []
    cols: dict[str, list[int]] = {"ids_offset": [], "ids_size": [], "meta_offset": [], "meta_size": []}
    pos: dict[str, int] = {}
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if key not in pos:
                pos[key] = len(keys)
                keys.append(key)
                for c in cols.values():
                    c.append(-1)
            i = pos[key]
            if ext == "ids.npy":
                cols["ids_offset"][i], cols["ids_size"][i] = m.offset_data, m.size
            elif ext == "json":
                cols["meta_offset"][i], cols["meta_size"][i] = m.offset_data, m.size
    return {"format": INDEX_FORMAT, "count": len(keys), "keys": keys, **cols}


def decode_ids(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def decode_meta(blob: bytes) -> dict:
    return json.loads(blob.decode("utf-8"))


def manifest_fingerprint(shards: list[dict], tokenizer: dict | None) -> str:
    from kdcl_dist.utils import fingerprint

    return fingerprint({
        "shards": [(s["name"], s["count"], s["sha256"]) for s in shards],
        "tokenizer": (tokenizer or {}).get("fingerprint"),
    })


def write_documents(docs, tok, out_dir: str | os.PathLike, *, max_length: int = 256,
                    shard_size: int = 2000, batch_size: int = 256, keep_text: bool = False,
                    extra_manifest: dict | None = None) -> dict:
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
        chunk = docs[start: start + batch_size]
        enc = tok([t for _, t in chunk], truncation=True, max_length=max_length)["input_ids"]
        for (doc_id, text), ids in zip(chunk, enc):
            key = sanitize_key(doc_id)
            buf.append(Sample(key, np.asarray(ids), {"id": str(doc_id), "n_tokens": len(ids)},
                              text if keep_text else None))
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
        "totals": {"kept": sum(e["count"] for e in entries),
                   "tokens": None},
        **(extra_manifest or {}),
    }
    manifest["fingerprint"] = manifest_fingerprint(entries, tinfo)
    from kdcl_dist.utils import write_json_atomic as _w

    _w(out / "dataset.json", manifest)
    return manifest
