"""Small helpers shared by every stage: atomic writes, fingerprints, JSON, logging."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("kdcl_dist")


def setup_logging(rank: int = 0, level: str | None = None) -> None:
    level = level or os.environ.get("KDCL_LOG_LEVEL", "INFO")
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else "WARNING", format=fmt, datefmt="%H:%M:%S")


# transformers 5 builds models on the meta device and ties weights through process-wide
# state, so two threads inside from_pretrained at once can leave a tied weight (BERT's
# cls.predictions.decoder) on the meta device: 8 of 10 loads in two threads did on the
# dev machine. Every HF load in kdcl_dist (models through `kd.models.load_pretrained`, and
# tokenizers) holds this lock; the experiment runner evaluates models in threads.
HF_LOAD_LOCK = threading.RLock()


# ---- file modes ------------------------------------------------------------------------
#
# Outputs are created with the modes a plain `open()` / `mkdir()` would give them: 0666 / 0777
# less the umask (0644 / 0755 under umask 022, 0664 / 0775 under 002), so that on a shared file
# system the team reads what one user wrote. `tempfile.mkstemp` / `mkdtemp` create 0600 / 0700
# whatever the umask, and safetensors (0.8) writes its files 0600 too; the helpers below create
# temporary files and directories with the umask applied by the kernel (and a directory's
# default ACL, where one is set), and `apply_umask_modes` repairs what a library wrote.

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it (/proc/self/status on Linux; elsewhere a
    set-and-restore under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new output file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new output directory: 0777 less the umask."""
    return 0o777 & ~current_umask()


def make_temp_file(directory: str | os.PathLike, prefix: str) -> Path:
    """Create an empty, uniquely named file in `directory` (O_EXCL), mode 0666 less the umask."""
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(4)}"
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666
            )
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"{directory}: no free temporary name with prefix {prefix!r}")


def make_temp_dir(directory: str | os.PathLike, prefix: str) -> Path:
    """Create a uniquely named directory in `directory`, mode 0777 less the umask."""
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{directory}: no free temporary name with prefix {prefix!r}")


def apply_umask_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes a plain create would: files 0666 and
    directories 0777 less the umask (an executable file keeps its x bits, less the umask).
    For a tree this process has just written under a temporary name (libraries such as
    safetensors write 0600 files), before it is renamed into place."""
    fmode, dmode = file_mode(), dir_mode()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        st = p.stat()
        if p.is_dir():
            want = dmode
        else:
            want = fmode | (st.st_mode & 0o111 and (0o111 & dmode))
        if st.st_mode & 0o7777 != want:
            os.chmod(p, want)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it over `final` only on success.

    A kill or an exception leaves no partial file under the final name (a stale
    `.tmp-*` may remain and is ignored/overwritten by the next run). The file gets the
    mode a plain `open()` would give it (0666 less the umask), not mkstemp's 0600.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = make_temp_file(final.parent, f".tmp-{final.name}.")
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


# ---- output paths ------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(d: Path) -> bool:
    """Whether this process may create and remove entries in directory `d` (os.access: the
    kernel's answer for the real user, a read-only mount included; root passes mode bits)."""
    return os.access(d, os.W_OK | os.X_OK)


def check_output_path(
    path: str | os.PathLike,
    kind: str = "dir",
    key: str = "--out",
    replace: bool = False,
    allow_url: bool = False,
) -> Path:
    """Refuse an output path that cannot be written, before any work: one-line UserError.

    kind="dir": `path` is a directory the command writes into (created if missing): it must not
    be an existing file, and it (or, when missing, its nearest existing parent) must be
    writable. kind="file": `path` is a file written through a temporary file in its directory
    and renamed into place: it must not be a directory, and its directory (or the nearest
    existing parent) must be writable. replace=True (a directory written under a temporary
    name beside it and renamed over `path`): the parent must be writable as well.
    allow_url: a URL (s3://...) is checked by `storage.check_output_url` instead (the command
    stages its output locally and uploads it, `storage.staged_output`); refused otherwise.
    Writability is `os.access(W_OK | X_OK)`: read-only mounts and permissions as the kernel
    sees them for the real user (root passes permission bits, not a read-only mount).
    """
    from kdcl_dist.errors import UserError

    if isinstance(path, str) and "://" in path:
        from kdcl_dist import storage

        if storage.is_url(path):
            if not allow_url:
                raise UserError(
                    f"{storage.redact(path)}: this command writes {key} to a local directory; "
                    "URLs are accepted by `shard`, `score` and `curriculum` (docs/data.md)"
                )
            # object storage: the backend, the bucket and a test write, before any work
            storage.check_output_url(path, key)
            return path
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', not {kind!r}")
    p = Path(path)
    anc = _nearest_existing(p)
    if anc != p and not anc.is_dir():
        raise UserError(
            f"{p}: cannot create {key} here, {anc} is a file, not a directory; choose another {key}"
        )
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise UserError(
                f"{p}: exists and is a file; {key} must name a directory: remove the file or "
                f"choose another {key}"
            )
        if kind == "file" and p.is_dir():
            raise UserError(
                f"{p}: is a directory; {key} must name a file (e.g. {p / 'result.json'})"
            )
    # the directories this command must create entries in: the output directory itself, or the
    # nearest existing parent when it does not exist yet, or (a file) the file's directory
    d = p if (kind == "dir" and p.exists()) else p.parent if p.exists() else anc
    dirs = [d, p.parent] if (replace and p.exists()) else [d]
    for d in dirs:
        if _writable(d):
            continue
        subject = f"{key} is" if d == p else f"{key} cannot be written there: {d} is"
        if _read_only_fs(d):
            raise UserError(f"{p}: {subject} on a read-only file system; choose a writable {key}")
        raise UserError(
            f"{p}: {subject} not writable by this user ({_mode_owner(d)}); choose a writable {key} "
            "or get write permission there"
        )
    return p


def _read_only_fs(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _mode_owner(d: Path) -> str:
    try:
        st = d.stat()
    except OSError:
        return "permissions unknown"
    return f"mode {st.st_mode & 0o7777:04o}, owner uid {st.st_uid}"


def remove_stale_tmp(directory: str | os.PathLike) -> int:
    """Delete `.tmp-*` files that a killed run's `atomic_path` left in `directory`.

    Call it only while no other process of the job can be writing there (rank 0, before the
    ranks are released); returns how many were removed.
    """
    d = Path(directory)
    n = 0
    if d.is_dir():
        for p in d.glob(".tmp-*"):
            if p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
    return n


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    from kdcl_dist.errors import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: {what} is corrupt ({e}); delete it and re-run the stage that writes it"
        ) from e


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-serializable object (manifests, configs)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def id_hash64(sample_id: str) -> int:
    """Stable 64-bit hash of a sample id (independent of Python's hash seed)."""
    return int.from_bytes(
        hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little"
    )


def data_dir() -> Path | None:
    """The real-data folder: $KDCL_DATA_DIR, default ../shared/data beside the repo."""
    env = os.environ.get("KDCL_DATA_DIR")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.is_dir() else None
