"""Small helpers shared by every stage: atomic writes, fingerprints, JSON, logging."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it over `final` only on success.

    A kill or an exception leaves no partial file under the final name (a stale
    `.tmp-*` may remain and is ignored/overwritten by the next run).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


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
        raise UserError(f"{path}: {what} is corrupt ({e}); delete it and re-run the stage that writes it") from e


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
    return int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little")


def data_dir() -> Path | None:
    """The real-data folder: $KDCL_DATA_DIR, default ../shared/data beside the repo."""
    env = os.environ.get("KDCL_DATA_DIR")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.is_dir() else None
