"""Reading shards: sequentially (scoring) and by global sample position (training).

A `ShardSet` is a directory with a manifest (`dataset.json` for source shards,
`curriculum.json` for curriculum shards; both have the same `shards` list) plus the tars
and their `.idx.json` offset indices. Global position p numbers the samples of all shards
in manifest order: shard i holds positions [cum[i], cum[i+1]).

Random access reads exactly the bytes of a member (one seek + one read per member);
tar members are never extracted to disk. File handles are opened lazily per process,
so a ShardSet can be handed to DataLoader workers (each worker opens its own).

A directory may also be an fsspec URL (`s3://bucket/shards`, `gs://...`, `https://...`;
kdcl_dist/storage.py): the manifest and indexes are fetched whole, a sample is one ranged
read through the offset index (its ids and meta members are adjacent in the tar), a whole
shard one GET; transient errors are retried, permanent ones are one-line errors.

Integrity: the manifest records each shard's size and sha256. `ShardSet(dir, verify=True)`
checks a shard against them before its first read in a process (random access,
`iter_shard`, `shard_bytes`); `verify()` / `verify_shard()` check on demand. A mismatch is a
`UserError` naming the shard file and the fix (re-run the stage that wrote it).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from kdcl_dist import storage
from kdcl_dist.data.shards import Sample, decode_ids, decode_meta
from kdcl_dist.errors import UserError
from kdcl_dist.utils import read_json, sha256_file

MANIFEST_NAMES = ("curriculum.json", "dataset.json")


def has_file(directory, name: str) -> bool:
    """Whether `directory` (a path or a URL) holds `name`."""
    if storage.is_url(directory):
        return storage.Store(directory).exists(name)
    return (Path(directory) / name).exists()


def find_manifest(directory: str | os.PathLike) -> Path:
    if storage.is_url(directory):
        st = storage.Store(directory)
        st.check_dir()
        for name in MANIFEST_NAMES:
            if st.exists(name):
                return st.path / name
        raise UserError(
            f"{st.path}: no dataset.json or curriculum.json; run `kdcl-dist shard` (or `curriculum`) to create it"
        )
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d}: shard directory not found")
    for name in MANIFEST_NAMES:
        if (d / name).exists():
            return d / name
    raise UserError(
        f"{d}: no dataset.json or curriculum.json; run `kdcl-dist shard` (or `curriculum`) to create it"
    )


class ShardSet:
    def __init__(
        self, directory: str | os.PathLike, manifest_name: str | None = None, verify: bool = False
    ):
        # a URL: self.dir is a storage.RemotePath (joins and messages), reads go through self.store
        self.store = storage.Store(directory) if storage.is_url(directory) else None
        self.dir = self.store.path if self.store else Path(directory)
        self.verify_reads = bool(verify)  # check size + sha256 before a shard's first read
        self._verified: set[int] = set()
        path = self.dir / manifest_name if manifest_name else find_manifest(self.dir)
        self.manifest_path = path
        self.manifest = self._json(path.name, "manifest")
        if "shards" not in self.manifest:
            raise UserError(f"{path}: manifest has no 'shards' list; re-create it")
        self.shards = self.manifest["shards"]
        counts = np.array([s["count"] for s in self.shards], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(counts)])
        self._index: dict[int, dict] = {}
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def _json(self, name: str, what: str):
        if self.store:
            return self.store.read_json(name, what)
        return read_json(self.dir / name, what)

    def _exists(self, name: str) -> bool:
        return self.store.exists(name) if self.store else (self.dir / name).exists()

    # -- metadata -------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.manifest.get("fingerprint", "")

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def __len__(self) -> int:
        return int(self.cum[-1])

    def shard_range(self, shard: int) -> tuple[int, int]:
        return int(self.cum[shard]), int(self.cum[shard + 1])

    def locate(self, position: int) -> tuple[int, int]:
        if not 0 <= position < len(self):
            raise IndexError(f"sample position {position} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self.cum, position, side="right") - 1)
        return shard, int(position - self.cum[shard])

    def index(self, shard: int) -> dict:
        if shard not in self._index:
            entry = self.shards[shard]
            idx = self._json(entry["index"], "shard offset index")
            if idx.get("count") != entry["count"]:
                raise UserError(
                    f"{self.dir / entry['index']}: offset index holds {idx.get('count')} samples, "
                    f"manifest says {entry['count']}; the shard set is inconsistent, re-run the stage"
                )
            for k in ("ids_offset", "ids_size", "meta_offset", "meta_size"):
                idx[k] = np.asarray(idx[k], dtype=np.int64)
            self._index[shard] = idx
        return self._index[shard]

    def _ids_header(self, shard: int, local: int) -> tuple[int, int, int]:
        """(header bytes, item size, token count) of one sample's `.npy` member: a short read."""
        idx = self.index(shard)
        size = int(idx["ids_size"][local])
        import io

        f = io.BytesIO(self._read(shard, int(idx["ids_offset"][local]), min(size, 4096)))
        try:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
        except ValueError as e:
            raise UserError(
                f"{self.dir / self.shards[shard]['name']}: sample {local} is not a valid .npy "
                f"member ({e}); {self._rerun_hint()}"
            ) from e
        return f.tell(), int(dtype.itemsize), int(shape[0]) if shape else 1

    def token_lengths(self) -> np.ndarray:
        """Token count of every sample (global position order), from the offset indices.

        One header read per shard for its shortest and longest member (same header size: all
        members between have it too, since an `.npy` header only grows with the shape's digits);
        otherwise each member's header is read. Used to group training micro-batches by length.
        The first read of a shard in a process checks it against the manifest, as every read
        does: a damaged shard stops training at start-up instead of in a DataLoader worker.
        """
        out = np.empty(len(self), dtype=np.int64)
        for shard in range(self.num_shards):
            a, b = self.shard_range(shard)
            if a == b:
                continue
            sizes = self.index(shard)["ids_size"]
            lo, hi = int(np.argmin(sizes)), int(np.argmax(sizes))
            (h_lo, item, n_lo), (h_hi, item_hi, n_hi) = (
                self._ids_header(shard, lo),
                self._ids_header(shard, hi),
            )
            ok = h_lo == h_hi and item == item_hi
            n = (sizes - h_lo) // max(1, item)
            if ok and n[lo] == n_lo and n[hi] == n_hi:
                out[a:b] = n
            else:
                out[a:b] = [self._ids_header(shard, i)[2] for i in range(b - a)]
        return out

    # -- integrity ------------------------------------------------------------------
    def _rerun_hint(self) -> str:
        if (
            self.manifest.get("kind") == "curriculum"
            or self.manifest_path.name == "curriculum.json"
        ):
            return "re-run `kdcl-dist curriculum` with the same arguments to rewrite it"
        return (
            "re-run `kdcl-dist shard` with the same arguments to rewrite it (the re-run checks every "
            "shard's sha256 and rewrites only the corrupt ones)"
        )

    def verify_shard(self, shard: int, blob: bytes | None = None) -> None:
        """Check shard `shard` against the size and sha256 recorded in the manifest.

        `blob`: the shard file's bytes when the caller already holds them (no second read).
        Raises UserError naming the shard file and the fix. A manifest entry without a
        sha256 cannot be checked and passes (only hand-made manifests lack it).
        """
        entry = self.shards[shard]
        path = self.dir / entry["name"]
        want = entry.get("sha256")
        if blob is None:
            if not self._exists(entry["name"]):
                raise UserError(
                    f"{path}: shard listed in {self.manifest_path.name} is missing; {self._rerun_hint()}"
                )
            size = self.store.size(entry["name"]) if self.store else path.stat().st_size
        else:
            size = len(blob)
        if entry.get("bytes") and size != entry["bytes"]:
            raise UserError(
                f"{path}: {size} bytes, {self.manifest_path.name} records {entry['bytes']}; "
                f"the shard is truncated or corrupt, {self._rerun_hint()}"
            )
        if want:
            if blob is not None:
                got = hashlib.sha256(blob).hexdigest()
            else:
                got = self.store.sha256(entry["name"]) if self.store else sha256_file(path)
            if got != want:
                raise UserError(
                    f"{path}: sha256 {got[:16]}... differs from {want[:16]}... recorded in "
                    f"{self.manifest_path.name}; the shard is corrupt, {self._rerun_hint()}"
                )
        self._verified.add(shard)

    def verify(self, shards=None) -> None:
        """Check every shard (or the given shard numbers) against the manifest; see `verify_shard`."""
        for s in range(self.num_shards) if shards is None else shards:
            self.verify_shard(int(s))

    def _check(self, shard: int) -> None:
        if self.verify_reads and shard not in self._verified:
            self.verify_shard(shard)

    def shard_bytes(self, shard: int, verify: bool | None = None) -> bytes:
        """The whole shard file in memory (one sequential read), checked against the manifest
        when `verify` (default: the `verify` given to the ShardSet)."""
        name = self.shards[shard]["name"]
        path = self.dir / name
        if not self._exists(name):
            raise UserError(f"{path}: shard listed in {self.manifest_path.name} is missing")
        blob = self.store.read(name) if self.store else path.read_bytes()
        if self.verify_reads if verify is None else verify:
            self.verify_shard(shard, blob)  # the bytes handed out are the ones checked
        return blob

    # -- random access --------------------------------------------------------------
    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked into a DataLoader worker: reopen handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            path = self.dir / self.shards[shard]["name"]
            if not path.exists():
                raise UserError(f"{path}: shard listed in {self.manifest_path.name} is missing")
            self._check(shard)
            f = open(path, "rb")
            self._files[shard] = f
        return f

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self.store:  # one ranged GET
            name = self.shards[shard]["name"]
            self._check(shard)  # a missing object: a one-line error from the read itself
            blob = self.store.read(name, offset, offset + size)
        else:
            f = self._file(shard)
            f.seek(offset)
            blob = f.read(size)
        if len(blob) != size:
            raise UserError(
                f"{self.dir / self.shards[shard]['name']}: truncated shard (short read); re-create it"
            )
        return blob

    def get(self, position: int, with_meta: bool = True) -> Sample:
        shard, local = self.locate(position)
        return self.get_local(shard, local, with_meta)

    read_range = _read  # (shard, offset, size) -> bytes: positioned read, local or ranged GET

    def get_local(self, shard: int, local: int, with_meta: bool = True) -> Sample:
        idx = self.index(shard)
        if self.store and with_meta:  # ids and meta members are adjacent: one ranged read
            io_, is_ = int(idx["ids_offset"][local]), int(idx["ids_size"][local])
            mo, ms = int(idx["meta_offset"][local]), int(idx["meta_size"][local])
            lo, hi = min(io_, mo), max(io_ + is_, mo + ms)
            blob = self._read(shard, lo, hi - lo)
            ids = decode_ids(blob[io_ - lo : io_ - lo + is_])
            return Sample(idx["keys"][local], ids, decode_meta(blob[mo - lo : mo - lo + ms]))
        ids = decode_ids(
            self._read(shard, int(idx["ids_offset"][local]), int(idx["ids_size"][local]))
        )
        meta = (
            decode_meta(
                self._read(shard, int(idx["meta_offset"][local]), int(idx["meta_size"][local]))
            )
            if with_meta
            else {"id": idx["keys"][local]}
        )
        return Sample(idx["keys"][local], ids, meta)

    def keys(self, shard: int) -> list[str]:
        return list(self.index(shard)["keys"])

    # -- sequential -----------------------------------------------------------------
    def iter_shard(self, shard: int) -> Iterator[Sample]:
        """Stream one shard front to back (one pass over the file, no seeks)."""
        path = self.dir / self.shards[shard]["name"]
        if self.store:  # one GET of the whole shard (retried), then the same scan in memory
            import io

            source = {"fileobj": io.BytesIO(self.shard_bytes(shard))}
        else:
            if not path.exists():
                raise UserError(f"{path}: shard listed in {self.manifest_path.name} is missing")
            self._check(shard)
            source = {"name": path}
        current: dict = {}
        key = None
        try:
            with tarfile.open(mode="r:", **source) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    k, _, ext = m.name.partition(".")
                    if key is not None and k != key:
                        yield _to_sample(key, current)
                        current = {}
                    key = k
                    current[ext] = tf.extractfile(m).read()  # in memory only; never to disk
        except (tarfile.ReadError, EOFError) as e:
            raise UserError(f"{path}: corrupt or truncated shard ({e}); re-create it") from e
        if key is not None:
            yield _to_sample(key, current)

    def __iter__(self) -> Iterator[Sample]:
        for s in range(self.num_shards):
            yield from self.iter_shard(s)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def _to_sample(key: str, members: dict) -> Sample:
    if "ids.npy" not in members or "json" not in members:
        raise UserError(f"sample {key}: missing ids.npy or json member; the shard is corrupt")
    text = members["txt"].decode("utf-8") if "txt" in members else None
    return Sample(key, decode_ids(members["ids.npy"]), decode_meta(members["json"]), text)
