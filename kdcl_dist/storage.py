"""Object storage: fsspec URLs (s3://, gs://, https://, ...) for shard inputs, outputs and readers.

Local paths keep their exact code paths; only a string with a URL scheme (`s3://b/k`) goes
through here (docs/data.md, "Object storage"):

- `Store(url)`: a directory at a URL, read with ranged reads (`cat_file(path, start, end)`);
  ShardSet reads a sample's members through the offset index with one ranged GET.
- `retry(...)`: every remote call; transient errors (HTTP 5xx/429, connection reset, timeouts)
  are retried with exponential backoff (`KDCL_IO_RETRIES` attempts, default 5, first wait
  `KDCL_IO_BACKOFF` s, default 0.5, doubling); a permanent one (403, missing bucket or key)
  is a one-line UserError naming the URL.
- `staged_output(url)`: a command's `--out` URL is written to a local staging directory and
  uploaded when the stage has finished, every file first and the manifest last, so a reader
  never sees a manifest naming an object that is not there, and a failed run uploads nothing.
- `fetch_inputs(urls)`: `shard --input` URLs are downloaded to a staging directory (same
  file names, so sample `source`s and ids are those of a local run) and read as local files.

Credentials come only from each backend's own environment/config (s3fs: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws; gcsfs: GOOGLE_APPLICATION_CREDENTIALS;
any backend: fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables). `redact(url)` drops user
info and query strings (presigned signatures) from every URL that is logged or recorded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from kdcl_dist.errors import UserError

log = logging.getLogger("kdcl_dist")
T = TypeVar("T")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# scheme -> (package that implements it, kdcl-dist extra that installs it)
BACKENDS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "http": ("aiohttp", "s3"),  # fsspec's HTTP filesystem needs aiohttp (installed by the s3 extra)
    "https": ("aiohttp", "s3"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
}
# files a stage writes last, in this order: their presence vouches for everything else
MANIFESTS = ("scores.json", "dataset.json", "curriculum.json")


def is_url(path) -> bool:
    """A string with a scheme other than file://, or a RemotePath (local paths, Path objects: False)."""
    if isinstance(path, RemotePath):
        return True
    if not isinstance(path, str):
        return False
    m = _URL.match(path)
    return bool(m) and m.group(1).lower() != "file"


def scheme(url: str) -> str:
    return _URL.match(url).group(1).lower()


def redact(url: str) -> str:
    """`url` without user info (`user:secret@`) and query string (presigned signatures, tokens):
    the only form of a URL that is logged, shown in messages or written into manifests."""
    if not is_url(url):
        return str(url)
    m = _URL.match(url)
    rest = url[m.end() :].split("?", 1)[0].split("#", 1)[0]
    host, sep, path = rest.partition("/")
    return f"{m.group(1)}://{host.rpartition('@')[2]}{sep}{path}"


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`; a one-line UserError when the scheme's
    backend is not installed."""
    import fsspec

    s = scheme(url)
    if "@" in url[len(s) + 3 :].split("/", 1)[0]:  # user info: it would end up in logs/manifests
        raise UserError(
            f"{redact(url)}: the URL holds user info (user:password@); put credentials in the "
            "backend's environment or config instead (AWS_PROFILE, ~/.aws/credentials, "
            "GOOGLE_APPLICATION_CREDENTIALS, FSSPEC_<PROTOCOL>_<OPTION>)"
        )
    try:
        fsspec.get_filesystem_class(s)
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        pkg, extra = BACKENDS.get(s, (None, None))
        hint = (
            f"{s}:// needs {pkg}: pip install 'kdcl-dist[{extra}]'"
            if pkg
            else f"{s}:// needs an fsspec backend for '{s}' ({str(e).splitlines()[0][:160]})"
        )
        raise UserError(f"{redact(url)}: {hint}") from e
    except ValueError as e:  # a protocol fsspec does not know at all
        raise UserError(
            f"{redact(url)}: no fsspec backend for {s}:// ({e}); use s3://, gs://, https:// or a local path"
        ) from e


# ---- errors and retries -----------------------------------------------------------------


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):  # botocore ClientError
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


# s3fs's translations of server-side trouble: EIO (anything unmapped), EREMOTEIO (InternalError),
# EBUSY (SlowDown, ServiceUnavailable, 503), plus the usual network ones
_TRANSIENT_ERRNO = {None, errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO), errno.EBUSY}
_TRANSIENT_ERRNO |= {errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED}
_TRANSIENT_ERRNO |= {errno.EPIPE, errno.ECONNREFUSED}


def classify(e: BaseException) -> str:
    """'missing', 'denied', 'transient' or 'other' (a bug or an error no retry can fix)."""
    if isinstance(e, UserError):
        return "other"
    # the HTTP status decides, also where a backend re-raised it as another type: s3fs raises
    # OSError/PermissionError from botocore's ClientError, fsspec's HTTP filesystem turns a
    # failed HEAD+GET (a 503 included) into FileNotFoundError from aiohttp's error
    status = _status(e)
    if status is None and e.__cause__ is not None:
        status = _status(e.__cause__)
    if status is not None:
        if status == 404:
            return "missing"
        if status in (401, 403):
            return "denied"
        if status >= 500 or status in (408, 429):
            return "transient"
        return "other"
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, PermissionError):
        return "denied"
    names = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, (ConnectionError, TimeoutError)) or names & {
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "IncompleteReadError",
        "ResponseStreamingError",
    }:
        return "transient"
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
        return "transient"
    return "other"


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def permanent_error(url: str, e: BaseException, what: str = "") -> UserError:
    kind = classify(e)
    u = redact(url)
    subject = f"{u}{f' ({what})' if what else ''}"
    if kind == "missing":
        return UserError(
            f"{subject}: not found in the object store ({_first_line(e)}); check the bucket "
            "and key (the bucket must exist)"
        )
    if kind == "denied":
        return UserError(
            f"{subject}: access denied ({_first_line(e)}); check the credentials the backend "
            "reads from its environment/config (AWS_ACCESS_KEY_ID/AWS_PROFILE for s3://, "
            "GOOGLE_APPLICATION_CREDENTIALS for gs://) and the bucket's permissions"
        )
    return UserError(f"{subject}: {type(e).__name__}: {_first_line(e)}")


def retry(op: Callable[[], T], url: str, what: str = "") -> T:
    """Run `op` (a remote call on `url`), retrying transient errors with exponential backoff."""
    attempts = max(1, int(os.environ.get("KDCL_IO_RETRIES", "5")))
    base = float(os.environ.get("KDCL_IO_BACKOFF", "0.5"))
    for i in range(attempts):
        try:
            return op()
        except Exception as e:
            kind = classify(e)
            if kind == "transient" and i + 1 < attempts:
                wait = base * 2**i * (1 + 0.25 * random.random())
                log.warning(
                    "%s: %s (transient); retry %d/%d in %.1fs",
                    redact(url),
                    _first_line(e),
                    i + 1,
                    attempts - 1,
                    wait,
                )
                time.sleep(wait)
                continue
            if kind == "transient":
                raise UserError(
                    f"{redact(url)}: still failing after {attempts} attempts ({_first_line(e)}); "
                    "the object store is unavailable, re-run later (KDCL_IO_RETRIES sets the attempts)"
                ) from e
            if kind in ("missing", "denied"):
                raise permanent_error(url, e, what) from e
            raise
    raise AssertionError("unreachable")


# ---- a directory at a URL ---------------------------------------------------------------


class RemotePath:
    """`dir / name` for a URL, for messages and joins (str() is the redacted URL)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def __truediv__(self, name) -> RemotePath:
        return RemotePath(join(self.url, str(name)))

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return redact(self.url)

    __repr__ = __str__

    def __fspath__(self) -> str:  # refuse silent local use of a URL
        raise TypeError(f"{self}: a URL, not a local path")


class Store:
    """Read access to the files of one directory at a URL (through fsspec, with retries)."""

    def __init__(self, url):
        self.url = str(getattr(url, "url", url)).rstrip("/")  # a str or a RemotePath
        self._fs, self.root = filesystem(self.url)
        self._pid = os.getpid()
        self.path = RemotePath(self.url)

    @property
    def fs(self):
        # async backends (s3fs, gcsfs, http) are not fork-safe: a DataLoader worker forked
        # from this process gets its own filesystem instance (fsspec clears its cache per pid)
        if self._pid != os.getpid():
            self._fs, self.root = filesystem(self.url)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self):  # spawned workers build their own filesystem instance
        state = dict(self.__dict__)
        state["_fs"], state["_pid"] = None, -1
        return state

    def _p(self, name: str) -> str:
        return join(self.root, name)

    def url_of(self, name: str) -> str:
        return join(self.url, name)

    def exists(self, name: str) -> bool:
        # info, not fs.exists: exists() answers False for any error (a 503 or a 403 too)
        try:
            retry(lambda: self.fs.info(self._p(name)), self.url_of(name))
            return True
        except UserError as e:
            if e.__cause__ is not None and classify(e.__cause__) == "missing":
                return False
            raise

    def check_dir(self) -> None:
        """A missing bucket or a denied listing is a one-line error here, before any work
        (bucket stores only: an https:// "directory" need not answer a request itself)."""
        if scheme(self.url) not in ("http", "https"):
            retry(lambda: self.fs.ls(self.root, detail=False), self.url, "directory")

    def size(self, name: str) -> int:
        return int(retry(lambda: self.fs.size(self._p(name)), self.url_of(name)))

    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """The bytes [start, end) of a file: one ranged GET (the whole file without a range)."""
        return retry(
            lambda: self.fs.cat_file(self._p(name), start=start, end=end), self.url_of(name)
        )

    def open(self, name: str):
        """A sequential binary stream (read-ahead cache), for tar streaming and hashing."""
        return retry(
            lambda: self.fs.open(self._p(name), "rb", cache_type="readahead", block_size=8 << 20),
            self.url_of(name),
        )

    def read_json(self, name: str, what: str = "file"):
        import json

        if not self.exists(name):
            raise UserError(f"{redact(self.url_of(name))}: {what} not found")
        blob = self.read(name)
        try:
            return json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(
                f"{redact(self.url_of(name))}: {what} is corrupt ({e}); re-run the stage that writes it"
            ) from e

    def sha256(self, name: str) -> str:
        def run() -> str:  # a retry hashes from the start again
            h = hashlib.sha256()
            with self.fs.open(self._p(name), "rb", block_size=8 << 20) as f:
                while b := f.read(8 << 20):
                    h.update(b)
            return h.hexdigest()

        return retry(run, self.url_of(name))


# ---- staging: outputs and inputs -----------------------------------------------------------


def staging_root() -> Path:
    """Where URL outputs and inputs are staged: $KDCL_STAGING_DIR, else the system temp dir."""
    root = os.environ.get("KDCL_STAGING_DIR") or tempfile.gettempdir()
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)


def check_output_url(url: str, key: str = "--out") -> None:
    """Before any work: the backend is installed and a probe object can be written and removed
    under `url` (a missing bucket or denied write is a one-line UserError naming the URL)."""
    import secrets

    fs, root = filesystem(url)
    probe = join(root, f".tmp-kdcl-probe-{secrets.token_hex(4)}")
    try:
        retry(lambda: fs.pipe_file(probe, b""), url, f"{key}: test write")
    except NotImplementedError as e:
        raise UserError(
            f"{redact(url)}: {scheme(url)}:// cannot be written; choose an s3://, gs:// or local {key}"
        ) from e
    retry(lambda: fs.rm_file(probe), url, f"{key}: test write")


def _upload_order(files: list[Path], local: Path) -> list[Path]:
    rank = {n: i for i, n in enumerate(MANIFESTS)}
    return sorted(
        files, key=lambda f: (f.name in rank, rank.get(f.name, -1), str(f.relative_to(local)))
    )


def upload_dir(local: Path, url: str) -> int:
    """Upload every file under `local` to `url`, manifests last; returns the file count.
    Each object appears whole or not at all (S3 PUT/multipart complete are atomic); files
    whose name starts with `.tmp-` (an interrupted write) are not uploaded."""
    fs, root = filesystem(url)
    files = [
        f
        for f in local.rglob("*")
        if f.is_file() and not any(p.startswith(".tmp-") for p in f.relative_to(local).parts)
    ]
    for f in _upload_order(files, local):
        rel = f.relative_to(local).as_posix()
        retry(lambda f=f, rel=rel: fs.put_file(str(f), join(root, rel)), join(url, rel))
    return len(files)


def _seed(local: Path, url: str) -> None:
    """Copy the small files of an earlier run at `url` into the staging directory, so that the
    stage's own checks (another tokenizer, --overwrite, finished work) see them; tars are not
    copied: shards are rebuilt locally (same bytes) and uploaded again."""
    fs, root = filesystem(url)
    try:
        found = retry(lambda: fs.find(root, detail=True), url)
    except UserError:
        return  # nothing there yet
    for path, info in found.items():
        rel = path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/") + "/") else None
        if not rel or info.get("type") != "file" or rel.endswith(".tar"):
            continue
        if any(part.startswith(".tmp-") for part in rel.split("/")):
            continue  # another rank's probe object, or a killed upload's: never output
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            retry(lambda path=path, dest=dest: fs.get_file(path, str(dest)), join(url, rel))
        except UserError as e:  # deleted since the listing: nothing to copy
            if e.__cause__ is None or classify(e.__cause__) != "missing":
                raise
            dest.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_output(out, rank: int = 0, world: int = 1) -> Iterator:
    """`out` unchanged for a local path; for a URL a local staging directory, uploaded to `out`
    by rank 0 when the block ends without an error (nothing is uploaded after an error).

    Several ranks need one staging directory they all see: $KDCL_STAGING_DIR on a shared
    file system (the directory is `<KDCL_STAGING_DIR>/kdcl-out-<hash of the URL>`)."""
    if not is_url(out):
        yield out
        return
    from kdcl_dist import dist

    # the command checked `out` before the process group (check_output_path(allow_url=True))
    if world > 1 and not os.environ.get("KDCL_STAGING_DIR"):
        raise UserError(
            f"{redact(out)}: an --out URL with {world} ranks needs a staging directory every rank "
            "sees: set KDCL_STAGING_DIR to a directory on a shared file system"
        )
    tag = hashlib.sha256(redact(out).encode()).hexdigest()[:16]
    if world > 1:
        local = staging_root() / f"kdcl-out-{tag}"
        err = None
        if rank == 0:
            try:
                shutil.rmtree(local, ignore_errors=True)
                local.mkdir(parents=True)
                _seed(local, out)
            except (UserError, OSError) as e:
                err = str(e)
        err = dist.broadcast_object(err)  # every rank fails alike, none waits at a barrier
        if err:
            raise UserError(err)
    else:
        local = Path(tempfile.mkdtemp(prefix=f"kdcl-out-{tag}-", dir=staging_root()))
        _seed(local, out)
    ok = False
    try:
        yield str(local)
        ok = True
    finally:
        if ok and world > 1:  # every rank's files are in the shared staging directory
            dist.barrier()
        if ok and rank == 0:
            n = upload_dir(local, out)
            log.info("%s: uploaded %d files (manifest last)", redact(out), n)
        if rank == 0 or world == 1:
            shutil.rmtree(local, ignore_errors=True)


def fetch_inputs(
    inputs: list[str], rank: int = 0
) -> tuple[list[str], Callable[[str], str], Path | None]:
    """Download URL inputs to a staging directory; returns (local inputs, a function mapping
    a local staged path in text back to its redacted URL, the staging directory or None).

    A file keeps its name and a directory its name and layout, so the `source` of every
    sample (and ids like `<file>:<line>`) equal those of a local run on the same files."""
    if not any(is_url(i) for i in inputs):
        return list(inputs), (lambda s: s), None
    names = [redact(u).rstrip("/").rsplit("/", 1)[-1] for u in inputs if is_url(u)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if (
        twice
    ):  # samples would record the staging path as their source (ids too, without an id field)
        raise UserError(
            f"--input: several URLs end in the same name ({', '.join(twice)}); a staged copy is "
            "known by its name, so give each input a distinct file or directory name"
        )
    local_root = Path(tempfile.mkdtemp(prefix=f"kdcl-in-{rank}-", dir=staging_root()))
    mapping: list[tuple[str, str]] = []
    out = []
    try:
        for n, url in enumerate(inputs):
            if not is_url(url):
                out.append(url)
                continue
            fs, path = filesystem(url)
            # the name a local copy gets (and samples record as `source`): no query string
            name = redact(url).rstrip("/").rsplit("/", 1)[-1] or f"input{n}"
            dest = local_root / str(n) / name
            dest.parent.mkdir(parents=True)
            info = retry(lambda fs=fs, path=path: fs.info(path), url, "--input")
            if info.get("type") == "directory":
                found = retry(lambda fs=fs, path=path: fs.find(path), url, "--input")
                base = path.rstrip("/") + "/"
                for p in found:
                    rel = p[len(base) :]
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    retry(lambda fs=fs, p=p, d=dest / rel: fs.get_file(p, str(d)), join(url, rel))
            else:
                retry(lambda fs=fs, path=path, d=dest: fs.get_file(path, str(d)), url, "--input")
            mapping.append((str(dest), redact(url.rstrip("/"))))
            out.append(str(dest))
    except BaseException:
        shutil.rmtree(local_root, ignore_errors=True)
        raise

    def to_url(text: str) -> str:
        for loc, u in mapping:
            text = text.replace(loc, u)
        return text

    return out, to_url, local_root


def relabel_inputs(out, to_url: Callable[[str], str]) -> dict:
    """Rewrite `inputs[].path` of `<out>/dataset.json` from staged copies to their (redacted)
    URLs; returns the manifest. Sample contents do not name paths (`source` is the file name)."""
    from kdcl_dist.utils import read_json, write_json_atomic

    path = Path(out) / "dataset.json"
    manifest = read_json(path, "manifest")
    for inp in manifest.get("inputs", []):
        inp["path"] = to_url(inp["path"])
        if isinstance(inp.get("source"), str):
            inp["source"] = to_url(inp["source"])
    write_json_atomic(path, manifest)
    return manifest


@contextlib.contextmanager
def local_copy(path, what: str = "--scores") -> Iterator[str]:
    """`path` unchanged when local; a URL's directory downloaded whole to a staging directory
    (for small inputs read as a whole: `curriculum --scores`), removed afterwards; errors
    name the URL, not the copy."""
    if not is_url(path):
        yield path
        return
    locals_, to_url, root = fetch_inputs([path])
    try:
        yield locals_[0]
    except UserError as e:
        raise UserError(to_url(str(e))) from e
    finally:
        shutil.rmtree(root, ignore_errors=True)
