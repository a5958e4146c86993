"""Training checkpoints: DeepSpeed sharded save/load, client_state, completeness, rotation, universal.

Layout (`<out>/checkpoints/`):

    global_step12/                       one DeepSpeed checkpoint (tag = global_step{N})
        mp_rank_00_model_states.pt       student module + client_state (ZeRO 0-2)
        zero_pp_rank_R_mp_rank_00_*.pt   per-rank ZeRO partitions (optimizer; ZeRO-3: params too)
        kdcl_complete.json               written by rank 0 only after *every* rank's save returned;
                                         records size + sha256 of every file of the checkpoint
    global_step12_universal/             DeepSpeed universal checkpoint (resume at another world size)
    latest                               DeepSpeed's tag file (informational; not trusted on resume)

A checkpoint is complete only when its marker exists: a kill during `save_checkpoint` leaves a
directory without a marker, which `--resume auto` ignores (even when `latest` names it) and the
next rotation deletes. Rotation keeps the last K complete checkpoints.

A complete checkpoint is *intact* when every file still has the size and sha256 its marker
recorded: a file cut or corrupted after the save (disk fault, partial copy) is caught before
DeepSpeed unpickles it. `--resume auto` then falls back to the newest intact earlier checkpoint
with a warning; an explicit `--resume <tag dir>` on a damaged one is a one-line error.
A save that fails (full disk) discards its partial directory, so nothing partial stays behind.

client_state (docs/design.md §5) = {format_version, step, consumed_samples, sampler, reliance,
curriculum_fingerprint, global_batch, world_size, config, rng (one entry per rank: torch, numpy,
python, cuda), universal_checkpoint_info}. The teacher is a separate module and never saved.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from kdcl_dist import FORMAT_VERSION, dist
from kdcl_dist.errors import UserError, exception_chain
from kdcl_dist.utils import read_json, sha256_file, write_json_atomic

log = logging.getLogger("kdcl_dist.checkpoint")

SUBDIR = "checkpoints"
MARKER = "kdcl_complete.json"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def universal_info() -> dict:
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


# ---- RNG ------------------------------------------------------------------------------


def rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def restore_rank_rng(client: dict, rank: int, seed: int, step: int) -> bool:
    """Restore this rank's own RNG state; at a new world size, ranks beyond the saved ones reseed."""
    states = client.get("rng") or []
    if rank < len(states):
        set_rng_state(states[rank])
        return True
    seed_rng(seed * 1000003 + rank * 7919 + step)
    return False


# ---- finding checkpoints ------------------------------------------------------------


def ckpt_root(out_dir) -> Path:
    return Path(out_dir) / SUBDIR


def list_checkpoints(root) -> list[tuple[int, Path, bool]]:
    """(step, dir, complete) for every global_stepN directory, ascending by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d, (d / MARKER).exists()))
    return sorted(out)


def latest_complete(root) -> Path | None:
    done = [d for _, d, ok in list_checkpoints(root) if ok]
    return done[-1] if done else None


def read_marker(tag_dir) -> dict:
    tag_dir = Path(tag_dir)
    if not (tag_dir / MARKER).exists():
        raise UserError(
            f"{tag_dir}: incomplete checkpoint (no {MARKER}: the save was interrupted); "
            "resume from an earlier one or use --resume auto"
        )
    return read_json(tag_dir / MARKER, "checkpoint marker")


# ---- integrity ------------------------------------------------------------------------


def file_table(tag_dir) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file of a checkpoint directory (marker aside)."""
    tag_dir = Path(tag_dir)
    out = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != MARKER and not p.name.startswith(".tmp-"):
            out[p.relative_to(tag_dir).as_posix()] = {
                "bytes": p.stat().st_size,
                "sha256": sha256_file(p),
            }
    return out


def damage(tag_dir, marker: dict | None = None) -> str | None:
    """None when the checkpoint is intact, else what is wrong, naming the file.

    Sizes are checked first (cheap: catches the common cut file), then sha256 (a corrupted
    byte). Markers written before kdcl-dist recorded files have no table and pass.
    """
    tag_dir = Path(tag_dir)
    if marker is None:
        try:
            marker = read_marker(tag_dir)
        except UserError as e:
            return str(e)
    files = marker.get("files")
    if not files:
        return None
    for rel, rec in files.items():
        p = tag_dir / rel
        if not p.is_file():
            return f"{p}: missing (the checkpoint recorded it)"
        size = p.stat().st_size
        if size != int(rec["bytes"]):
            return f"{p}: {size} bytes, but {int(rec['bytes'])} were saved (the file was cut)"
    for rel, rec in files.items():
        if sha256_file(tag_dir / rel) != rec["sha256"]:
            return f"{tag_dir / rel}: sha256 differs from the one recorded at save time (the file is corrupt)"
    return None


def check_intact(tag_dir) -> dict:
    """The marker of a complete, undamaged checkpoint; else a one-line UserError naming the file."""
    tag_dir = Path(tag_dir)
    marker = read_marker(tag_dir)
    problem = damage(tag_dir, marker)
    if problem:
        raise UserError(
            f"{problem}; checkpoint {tag_dir.name} is damaged: resume from an earlier checkpoint "
            "(--resume auto picks the newest intact one) or start over with --resume none"
        )
    return marker


def newest_intact(
    root, fix: str = "restore the files or start over with --resume none (or a new --out)"
) -> Path | None:
    """Newest complete and undamaged checkpoint under `root`; damaged ones are skipped with a warning.

    Raises a UserError when complete checkpoints exist but every one is damaged: starting from
    scratch silently would throw their training away.
    """
    damaged = []
    for _, d, ok in reversed(list_checkpoints(root)):
        if not ok:
            continue
        problem = damage(d)
        if problem is None:
            if damaged:
                log.warning("using %s instead (the newest intact checkpoint)", d.name)
            return d
        damaged.append(d.name)
        log.warning("%s; skipping the damaged checkpoint %s", problem, d.name)
    if damaged:
        raise UserError(
            f"{root}: every complete checkpoint is damaged ({', '.join(damaged)}); {fix}"
        )
    return None


def find_resume(out_dir, resume: str) -> Path | None:
    """`none` -> None; `auto` -> newest intact under <out>/checkpoints (or None); else a path.

    `auto` and a checkpoints/run directory skip interrupted and damaged checkpoints (with a
    warning for damaged ones); a global_stepN directory must be complete and intact.
    DeepSpeed's `latest` file is never consulted.
    """
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        found = newest_intact(ckpt_root(out_dir))
        if found is None and ckpt_root(out_dir).is_dir() and list_checkpoints(ckpt_root(out_dir)):
            log.warning(
                "no complete checkpoint under %s (only interrupted saves): starting from scratch",
                ckpt_root(out_dir),
            )
        return found
    p = Path(resume)
    if not p.exists():
        raise UserError(
            f"{resume}: checkpoint not found; pass a global_stepN directory, a checkpoints "
            "directory, or --resume auto"
        )
    if TAG_RE.match(p.name):
        check_intact(p)
        return p
    for cand in (p, p / SUBDIR):
        found = newest_intact(cand)
        if found is not None:
            return found
    raise UserError(f"{resume}: no complete global_stepN checkpoint in this directory")


def find_resume_all_ranks(out_dir, resume: str, rank: int) -> Path | None:
    """find_resume decided once by rank 0 (it reads and hashes the files) and shared with all ranks,
    so every rank loads the same checkpoint and a refusal stops every rank with the same line."""
    result = None
    if rank == 0:
        try:
            found = find_resume(out_dir, resume)
            result = ("ok", None if found is None else str(found))
        except UserError as e:
            result = ("error", str(e))
    result = dist.broadcast_object(result)
    if result[0] == "error":
        raise UserError(result[1])
    return None if result[1] is None else Path(result[1])


def check_compatible(
    marker: dict, *, fingerprint: str, global_batch: int, order: dict, path
) -> None:
    """Refuse a checkpoint whose data state cannot mean the same thing in this run."""
    if marker.get("curriculum_fingerprint") != fingerprint:
        raise UserError(
            f"{path}: checkpoint was made for curriculum {marker.get('curriculum_fingerprint')} but --curriculum "
            f"has fingerprint {fingerprint}; resume with the same curriculum or start a new --out (or --resume none)"
        )
    if int(marker.get("global_batch", -1)) != int(global_batch):
        raise UserError(
            f"{path}: checkpoint was trained with global batch {marker.get('global_batch')}, this run uses "
            f"{global_batch}; consumed samples would no longer fall on batch boundaries: keep --global-batch "
            f"{marker.get('global_batch')} (the micro batch and world size may change)"
        )
    saved_order = marker.get("order") or {}
    if saved_order and saved_order != order:
        raise UserError(
            f"{path}: checkpoint was trained with order {saved_order}, this run asks for {order}; the consumed "
            "prefix would differ: keep the order settings or start a new --out"
        )


# ---- save -----------------------------------------------------------------------------


def save(
    engine, out_dir, step: int, client_state: dict, keep: int, rank: int, extra_marker: dict
) -> Path:
    """Collective: every rank saves its shard; rank 0 marks the checkpoint complete and rotates."""
    root = ckpt_root(out_dir)
    tag = tag_for(step)
    client = dict(client_state)
    client["rng"] = dist.all_gather_object(rng_state())
    client.setdefault("format_version", FORMAT_VERSION)
    client["universal_checkpoint_info"] = universal_info()
    if rank == 0 and (root / tag).exists():
        # a tag left by a run line that was resumed from an earlier step: its files are stale and
        # its marker must not vouch for files that are being rewritten (nor keep other ranks' files)
        with contextlib.suppress(FileNotFoundError):
            (
                root / tag / MARKER
            ).unlink()  # first, so that a kill during the removal leaves no "complete" tag
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(universal_dir(root / tag), ignore_errors=True)
    dist.barrier()
    try:
        engine.save(root, tag, client)
    except Exception as e:
        _save_failed(root, tag, e)
        raise
    dist.barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        write_json_atomic(
            root / tag / MARKER,
            {
                "format_version": FORMAT_VERSION,
                "step": step,
                **extra_marker,
                "files": file_table(root / tag),
            },
        )
        rotate(root, keep)
    dist.barrier()
    return root / tag


_WRITE_FAILED = (
    "unexpected pos",
    "file write failed",
    "No space left on device",
    "Disk quota exceeded",
)


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize
    return None


def _save_failed(root: Path, tag: str, exc: Exception) -> None:
    """A checkpoint write failed: discard the partial save and name the cause when it is a full disk.

    torch.save on a full disk fails inside its C++ zip writer with "unexpected pos ..." and no
    errno; the free space left on the file system tells a full disk from other faults.
    """
    tag_dir = root / tag
    code = None
    chain = list(exception_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            code = e.errno
            break
    if code is None and any(n in str(e) for e in chain for n in _WRITE_FAILED):
        free = _free_bytes(tag_dir)
        if free is not None and free < 64 * 2**20:
            code = errno.ENOSPC
    parent_gone = not tag_dir.exists()
    if not (tag_dir / MARKER).exists():
        # partial files under their final names would hold the space a retry needs
        shutil.rmtree(tag_dir, ignore_errors=True)
    for e in chain:
        name = getattr(e, "filename", None)
        if name and Path(name).parent == root and Path(name).name != MARKER:
            with contextlib.suppress(OSError):
                Path(name).unlink()  # `latest` / zero_to_fp32.py cut by the full disk
    if code is not None:
        raise OSError(
            code,
            f"{os.strerror(code)} (saving checkpoint {tag}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]})",
            str(tag_dir),
        ) from exc
    if parent_gone:
        raise UserError(
            f"{tag_dir}: checkpoint save aborted (another rank failed to write its part and "
            "discarded the directory; see that rank's error)"
        ) from exc


def rotate(root, keep: int) -> list[Path]:
    """Keep the last `keep` complete checkpoints; delete older ones and stale incomplete ones."""
    if keep <= 0:
        return []
    items = list_checkpoints(root)
    complete = [(s, d) for s, d, ok in items if ok]
    if not complete:
        return []
    keep_steps = {s for s, _ in complete[-keep:]}
    newest = complete[-1][0]
    removed = []
    for s, d, ok in items:
        if s in keep_steps or (not ok and s > newest):
            continue  # an incomplete one newer than the newest complete may be in progress elsewhere
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(d.parent / f"{d.name}_universal", ignore_errors=True)
        removed.append(d)
    return removed


# ---- universal conversion -------------------------------------------------------------


def universal_dir(tag_dir) -> Path:
    tag_dir = Path(tag_dir)
    return tag_dir.parent / f"{tag_dir.name}_universal"


def convert_to_universal(tag_dir, workers: int = 1) -> Path:
    """Run DeepSpeed's ds_to_universal on one checkpoint (single process); idempotent."""
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = Path(tag_dir)
    marker = check_intact(tag_dir)  # never let ds_to_universal unpickle a cut file
    if int(marker.get("zero_stage", 1)) == 0:
        raise UserError(
            f"{tag_dir}: a ZeRO-0 checkpoint holds full states and loads at any world size; "
            "no universal conversion is needed"
        )
    out = universal_dir(tag_dir)
    if (out / MARKER).exists() and damage(out) is None:
        return out
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(tmp),
        num_extract_workers=max(1, workers),
        num_merge_workers=max(1, workers),
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    try:
        ds_to_universal.main(args)
        write_json_atomic(tmp / MARKER, {**marker, "universal": True, "files": file_table(tmp)})
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(
            tmp, ignore_errors=True
        )  # a full disk or a kill must not leave a half conversion
        raise
    return out


def needs_universal(marker: dict, world_size: int) -> bool:
    return (
        int(marker.get("world_size", world_size)) != world_size
        and int(marker.get("zero_stage", 0)) > 0
    )


def prepare_load(tag_dir, world_size: int, rank: int) -> tuple[Path, str, bool]:
    """(load_dir, tag, universal) for engine.load_checkpoint; converts on rank 0 when needed."""
    tag_dir = Path(tag_dir)
    marker = read_marker(tag_dir)
    if not needs_universal(marker, world_size):
        return tag_dir.parent, tag_dir.name, False
    if rank == 0:
        log.info(
            "checkpoint %s was saved by %s ranks, resuming on %s: converting to a universal checkpoint",
            tag_dir,
            marker.get("world_size"),
            world_size,
        )
        convert_to_universal(tag_dir)
    dist.barrier()
    out = universal_dir(tag_dir)
    return out.parent, out.name, True
