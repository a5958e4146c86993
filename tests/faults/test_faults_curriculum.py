"""Curriculum stage faults: SIGKILL of one rank while writing curriculum shards, ENOSPC, and a
corrupt curriculum.json / order_scores.npy / curriculum shard seen by training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from .conftest import (
    curriculum_argv,
    dir_digest,
    fork_run,
    kill_point,
    must,
    one_line_error,
    small_fs,
    train_argv,
)

pytestmark = pytest.mark.faults


def _order_ids(d) -> list[str]:
    from kdcl_dist.data.reader import ShardSet

    ss = ShardSet(d, "curriculum.json")
    return [ss.get(p).meta["id"] for p in range(len(ss))]


def _same_as_ref(out, ref) -> None:
    a, b = (json.loads((d / "curriculum.json").read_text()) for d in (out, ref["cur"]))
    assert a["fingerprint"] == b["fingerprint"]
    assert [(s["name"], s["sha256"]) for s in a["shards"]] == [(s["name"], s["sha256"]) for s in b["shards"]]
    assert dir_digest(out, "*.npy") == dir_digest(ref["cur"], "*.npy")
    assert dir_digest(out, "shard-*") == dir_digest(ref["cur"], "shard-*")
    # a killed run's `.tmp-*` files are removed by the re-run (rank 0, before the ranks start)
    assert not [p.name for d in (out, out / ".parts") for p in d.glob(".tmp-*")]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_curriculum_sigkill_one_rank_then_rerun(base, ref, tmp_path, seed):
    victim = seed % 2
    n = kill_point(seed, ref["cur_run"].events[victim])
    out = tmp_path / "cur"
    argv = curriculum_argv(ref["shards"], ref["scores"], out)
    killed = fork_run(argv, world=2, kill=(victim, n), logdir=tmp_path / "k")
    assert killed.rcs[victim] == -9, killed.text()
    assert not (out / "curriculum.json").exists()
    for t in out.glob("shard-*.tar"):  # whatever exists under a final name is whole
        assert t.read_bytes() == (ref["cur"] / t.name).read_bytes(), t.name
    must(fork_run(argv, world=2, logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)
    assert _order_ids(out) == _order_ids(ref["cur"])


def test_curriculum_enospc_then_rerun(base, ref, tmp_path):
    out = tmp_path / "fs"
    total = sum(p.stat().st_size for p in ref["cur"].iterdir() if p.is_file())
    argv = curriculum_argv(ref["shards"], ref["scores"], out)
    with small_fs(out, str(max(8192, total // 2))) as remount:
        run = fork_run(argv, enospc_at=None if remount else 4, logdir=tmp_path / "k")
        assert run.rc != 0 and "No space left on device" in run.text(), run.text()
        assert not (out / "curriculum.json").exists()
        if remount is not None:
            remount("64m")
        must(fork_run(argv, logdir=tmp_path / "r"), "re-run")
        _same_as_ref(out, ref)


def test_train_refuses_corrupt_curriculum_manifest(base, ref, tmp_path):
    cur = shutil.copytree(ref["cur"], tmp_path / "cur")
    m = cur / "curriculum.json"
    m.write_text(m.read_text()[:-40])
    run = fork_run(train_argv(base, cur, tmp_path / "train"), logdir=tmp_path / "t")
    one_line_error(run, "curriculum.json", "corrupt")
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_train_refuses_truncated_order_scores(base, ref, tmp_path):
    cur = shutil.copytree(ref["cur"], tmp_path / "cur")
    arr = np.load(cur / "order_scores.npy")
    np.save(cur / "order_scores.npy", arr[:-5])
    run = fork_run(train_argv(base, cur, tmp_path / "train"), logdir=tmp_path / "t")
    one_line_error(run, "order_scores.npy", "re-run `kdcl-dist curriculum`")


def test_train_refuses_cut_order_scores_file(base, ref, tmp_path):
    cur = shutil.copytree(ref["cur"], tmp_path / "cur")
    f = cur / "order_scores.npy"
    f.write_bytes(f.read_bytes()[:100])
    run = fork_run(train_argv(base, cur, tmp_path / "train"), logdir=tmp_path / "t")
    one_line_error(run, "order_scores.npy")


def test_train_refuses_truncated_curriculum_shard(base, ref, tmp_path):
    cur = shutil.copytree(ref["cur"], tmp_path / "cur")
    t = cur / "shard-000001.tar"
    t.write_bytes(t.read_bytes()[:2000])
    run = fork_run(train_argv(base, cur, tmp_path / "train"), logdir=tmp_path / "t")
    one_line_error(run, "shard-000001.tar")
