"""Rank and world size from the launcher's environment, process-group set-up, helpers.

Supported launchers (all set the environment we read; nothing home-made):
- torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
- mpirun (Open MPI / MPICH): OMPI_COMM_WORLD_* or PMI_*; DeepSpeed's MPI discovery (mpi4py)
  then fills MASTER_ADDR/PORT and RANK/WORLD_SIZE.
- a single process: rank 0 of 1, no process group.

Data code takes rank/world as parameters (the environment is only a default) so that
multi-rank behaviour can be tested in a loop as well as with real processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mpi_env() -> tuple[int, int, int] | None:
    for r, w, lr in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w]), int(os.environ.get(lr, os.environ[r]))
    return None


def env_info() -> DistInfo:
    """Rank/world from the environment without initializing anything."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
        )
    mpi = _mpi_env()
    if mpi is not None:
        return DistInfo(*mpi)
    return DistInfo(0, 1, 0)


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "deepspeed_allreduce_buffer_{uid}_"


def remove_stale_shm(min_age_s: float = 60.0, shm_dir: Path | None = None) -> tuple[int, int]:
    """Remove the shared-memory segments of killed DeepSpeed CPU jobs; (count, bytes) freed.

    DeepSpeed's CPU accelerator backs its all-reduce with one ~66 MiB segment per rank,
    `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`, and unlinks it only on
    a clean exit: every SIGKILLed or OOM-killed CPU job leaves its segments in RAM. Only this
    user's segments are considered; one is stale when no process maps it (/proc/*/maps) and
    it is older than `min_age_s` (a peer rank may be between creating and mapping its own).
    A job in another PID namespace sharing this /dev/shm looks unmapped; removing its names is
    harmless once it has started (DeepSpeed maps the peers' segments only at start-up, and an
    unlinked segment stays mapped). KDCL_KEEP_SHM=1 turns the clean-up off.
    """
    d = SHM_DIR if shm_dir is None else Path(shm_dir)
    prefix = _SHM_PREFIX.format(uid=os.getuid())
    now = time.time()
    candidates = []
    for p in d.glob(prefix + "*") if d.is_dir() else ():
        with contextlib.suppress(OSError):
            st = p.stat()
            if now - st.st_mtime >= min_age_s:
                candidates.append((p, st.st_size))
    if not candidates:
        return 0, 0
    mapped = ""
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):  # processes come and go; others' maps are unreadable
            text = maps.read_text()
            if prefix in text:
                mapped += text
    n = size = 0
    for p, nbytes in candidates:
        if str(p) in mapped:
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n, size = n + 1, size + nbytes
    return n, size


def release_stale_shm(local_rank: int) -> None:
    """Before a CPU process group starts: local rank 0 frees segments of killed jobs (logged)."""
    if local_rank != 0 or torch.cuda.is_available() or os.environ.get("KDCL_KEEP_SHM") == "1":
        return
    n, size = remove_stale_shm()
    if n:
        import logging

        logging.getLogger("kdcl_dist").info(
            "removed %d stale DeepSpeed shared-memory segment(s) (%.0f MiB) left in %s by killed runs",
            n,
            size / 2**20,
            SHM_DIR,
        )


def init(timeout_min: float = 30.0) -> DistInfo:
    """Initialize torch.distributed when launched with >1 process; return rank info.

    Uses DeepSpeed's `init_distributed`, which also performs MPI discovery (mpi4py) when
    launched by mpirun without MASTER_ADDR. Idempotent.
    """
    info = env_info()
    if info.world_size <= 1:
        return info
    if not tdist.is_initialized():
        import deepspeed

        release_stale_shm(info.local_rank)

        if "RANK" not in os.environ and "MASTER_ADDR" in os.environ and _mpi_env() is not None:
            # Under mpirun DeepSpeed's discovery (mpi4py) takes the rendezvous address from
            # rank 0's `hostname -I`; run that discovery here and keep the address the user
            # exported (multi-homed nodes, loopback-only tests). init_distributed then finds
            # every variable set and does not discover again.
            from deepspeed.comm.comm import mpi_discovery

            addr = os.environ["MASTER_ADDR"]
            mpi_discovery(
                distributed_port=int(os.environ.get("MASTER_PORT", "29500")), verbose=False
            )
            os.environ["MASTER_ADDR"] = addr
        deepspeed.init_distributed(
            dist_backend=backend(),
            auto_mpi_discovery=True,
            # MPI discovery overwrites MASTER_PORT with this value: keep the port the user
            # (or launcher/mpirun.sh) exported, else concurrent mpirun jobs collide on 29500.
            distributed_port=int(os.environ.get("MASTER_PORT", "29500")),
            timeout=datetime.timedelta(minutes=timeout_min),
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % max(1, torch.cuda.device_count()))
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), info.local_rank)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_gather_object(obj):
    if not is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def shutdown() -> None:
    if is_initialized():
        try:
            tdist.barrier()
        finally:
            tdist.destroy_process_group()


@contextlib.contextmanager
def stage(timeout_min: float = 30.0):
    """One distributed stage of a command: process group and per-rank logging up, the
    DistInfo yielded, and the group torn down whatever happens (an error included)."""
    from kdcl_dist.utils import setup_logging

    info = init(timeout_min)
    setup_logging(info.rank)
    try:
        yield info
    finally:
        shutdown()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
