"""`dist.remove_stale_shm`: DeepSpeed CPU all-reduce segments of killed jobs are freed, live ones kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from kdcl_dist import dist


def _segment(d, port: int, rank: int, age_s: float, uid: int | None = None):
    p = (
        d
        / f"deepspeed_allreduce_buffer_{os.getuid() if uid is None else uid}_127.0.0.1_{port}_{rank}"
    )
    p.write_bytes(b"\0" * 4096)
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_only_unmapped_old_segments_of_this_user_are_removed(tmp_path):
    stale = [_segment(tmp_path, 30001, r, age_s=600) for r in range(2)]
    young = _segment(tmp_path, 30002, 0, age_s=1)  # a peer may be about to map it
    other_user = _segment(tmp_path, 30003, 0, age_s=600, uid=os.getuid() + 1)
    unrelated = tmp_path / "some_other_segment"
    unrelated.write_bytes(b"x")
    live = _segment(tmp_path, 30004, 0, age_s=600)  # an old segment a running job maps
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import mmap, sys, time\n"
            f"f = open({str(live)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 0); f.close()\n"
            "print('mapped', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "mapped"
        n, size = dist.remove_stale_shm(min_age_s=30, shm_dir=tmp_path)
        assert (n, size) == (2, 2 * 4096)
        assert not any(p.exists() for p in stale)
        assert young.exists() and other_user.exists() and unrelated.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait()
    # once its process is gone the segment is stale too
    assert dist.remove_stale_shm(min_age_s=30, shm_dir=tmp_path) == (1, 4096)
    assert not live.exists() and young.exists()
    assert dist.remove_stale_shm(min_age_s=30, shm_dir=tmp_path / "missing") == (0, 0)


def test_release_runs_on_local_rank_0_only_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "SHM_DIR", tmp_path)
    seg = _segment(tmp_path, 30005, 0, age_s=600)
    monkeypatch.setenv("KDCL_KEEP_SHM", "1")
    dist.release_stale_shm(0)
    assert seg.exists()
    monkeypatch.delenv("KDCL_KEEP_SHM")
    dist.release_stale_shm(1)
    assert seg.exists()
    dist.release_stale_shm(0)
    assert not seg.exists()
