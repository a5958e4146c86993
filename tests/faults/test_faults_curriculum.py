"""Curriculum stage faults: SIGKILL of one rank while writing curriculum shards, ENOSPC, and a
corrupt curriculum.json / order_scores.npy / curriculum shard seen by training."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from .conftest import (
    assert_finished_equal,
    curriculum_argv,
    cut_file,
    dir_digest,
    fork_out_of_space,
    fork_refused,
    fork_run,
    json_pair,
    must,
    rerun_with_space,
    sigkill_one_rank,
    small_fs,
    train_argv,
)

pytestmark = pytest.mark.faults


def _order_ids(d) -> list[str]:
    from kdcl_dist.data.reader import ShardSet

    ss = ShardSet(d, "curriculum.json")
    return [ss.get(p).meta["id"] for p in range(len(ss))]


def _same_as_ref(out, ref) -> None:
    a, b = json_pair("curriculum.json", out, ref["cur"])
    assert a["fingerprint"] == b["fingerprint"]
    assert [(s["name"], s["sha256"]) for s in a["shards"]] == [
        (s["name"], s["sha256"]) for s in b["shards"]
    ]
    assert dir_digest(out, "*.npy") == dir_digest(ref["cur"], "*.npy")
    assert dir_digest(out, "shard-*") == dir_digest(ref["cur"], "shard-*")
    # a killed run's `.tmp-*` files are removed by the re-run (rank 0, before the ranks start)
    assert not [p.name for d in (out, out / ".parts") for p in d.glob(".tmp-*")]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_curriculum_sigkill_one_rank_then_rerun(base, ref, tmp_path, seed):
    out = tmp_path / "cur"
    argv = curriculum_argv(ref["shards"], ref["scores"], out)
    sigkill_one_rank(argv, ref["cur_run"], seed, tmp_path / "k")
    assert not (out / "curriculum.json").exists()
    assert_finished_equal(out, ref["cur"], "shard-*.tar")
    must(fork_run(argv, world=2, logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)
    assert _order_ids(out) == _order_ids(ref["cur"])


def test_curriculum_enospc_then_rerun(base, ref, tmp_path):
    out = tmp_path / "fs"
    total = sum(p.stat().st_size for p in ref["cur"].iterdir() if p.is_file())
    argv = curriculum_argv(ref["shards"], ref["scores"], out)
    with small_fs(out, str(max(8192, total // 2))) as remount:
        fork_out_of_space(argv, remount, tmp_path / "k", enospc_at=4)
        assert not (out / "curriculum.json").exists()
        rerun_with_space(argv, remount, tmp_path / "r")
        _same_as_ref(out, ref)


def test_train_refuses_corrupt_curriculum_manifest(base, ref, tmp_path):
    cur = shutil.copytree(ref["cur"], tmp_path / "cur")
    cut_file(cur / "curriculum.json", -40)
    fork_refused(
        train_argv(base, cur, tmp_path / "train"), tmp_path / "t", "curriculum.json", "corrupt"
    )
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_train_refuses_truncated_order_scores(base, ref, tmp_path):
    cur = shutil.copytree(ref["cur"], tmp_path / "cur")
    arr = np.load(cur / "order_scores.npy")
    np.save(cur / "order_scores.npy", arr[:-5])
    fork_refused(
        train_argv(base, cur, tmp_path / "train"),
        tmp_path / "t",
        "order_scores.npy",
        "re-run `kdcl-dist curriculum`",
    )


def test_train_refuses_cut_order_scores_file(base, ref, tmp_path):
    cur = shutil.copytree(ref["cur"], tmp_path / "cur")
    cut_file(cur / "order_scores.npy", 100)
    fork_refused(train_argv(base, cur, tmp_path / "train"), tmp_path / "t", "order_scores.npy")


def test_train_refuses_truncated_curriculum_shard(base, ref, tmp_path):
    cur = shutil.copytree(ref["cur"], tmp_path / "cur")
    cut_file(cur / "shard-000001.tar", 2000)
    fork_refused(train_argv(base, cur, tmp_path / "train"), tmp_path / "t", "shard-000001.tar")
