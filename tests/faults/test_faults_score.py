"""Score stage faults: SIGKILL of one rank mid-scoring, ENOSPC, corrupt score files, scores that
belong to shards re-made with another tokenizer, a model of another tokenizer, a missing model."""

from __future__ import annotations

import shutil

import pytest

from .conftest import (
    assert_finished_equal,
    curriculum_argv,
    cut_file,
    fork_out_of_space,
    fork_refused,
    fork_run,
    json_pair,
    must,
    rerun_with_space,
    score_argv,
    scores_table,
    shard_argv,
    sigkill_one_rank,
    small_fs,
    with_flag,
)

pytestmark = pytest.mark.faults


def _same_as_ref(out, ref) -> None:
    got, want = scores_table(out), scores_table(ref["scores"])
    assert got.keys() == want.keys()
    diff = [k for k in want if got[k] != want[k]]
    assert not diff, f"{len(diff)} scores differ from the undisturbed run"
    a, b = json_pair("scores.json", out, ref["scores"])
    assert a["fingerprint"] == b["fingerprint"]
    # a kill may leave `.tmp-*` files (documented in utils.atomic_path); they are never read


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_score_sigkill_one_rank_then_rerun(base, ref, tmp_path, seed):
    # Events of a score run are deterministic: one per batch (Scorer.losses) and one per
    # atomic rename (config.yaml first, each score file, scores.json last); the progress
    # files are plain writes. (They used to be renamed about once a second, so the event
    # count depended on the machine's load: seed 2 picks the last event of rank 0, which
    # then was the config.yaml rename after scores.json, or lay beyond the run's end.)
    out = tmp_path / "scores"
    sigkill_one_rank(score_argv(base, ref["shards"], out), ref["score_run"], seed, tmp_path / "k")
    assert not (out / "scores.json").exists()
    # score files that exist are complete and equal to the reference's
    assert_finished_equal(out, ref["scores"], "*.scores.npz")
    must(fork_run(score_argv(base, ref["shards"], out), world=2, logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)


def test_score_enospc_then_rerun(base, ref, tmp_path):
    out = tmp_path / "fs"
    total = sum(p.stat().st_size for p in ref["scores"].glob("*.npz"))
    with small_fs(out, str(max(4096, total // 2))) as remount:
        fork_out_of_space(
            score_argv(base, ref["shards"], out), remount, tmp_path / "k", enospc_at=2
        )
        assert not (out / "scores.json").exists()
        assert_finished_equal(out, ref["scores"], "*.scores.npz")
        rerun_with_space(score_argv(base, ref["shards"], out), remount, tmp_path / "r")
        _same_as_ref(out, ref)


def test_score_truncated_file_refused_then_rescored(base, ref, tmp_path):
    out = shutil.copytree(ref["scores"], tmp_path / "scores")
    cut_file(out / "shard-000004.scores.npz", 300)
    fork_refused(
        curriculum_argv(ref["shards"], out, tmp_path / "cur"),
        tmp_path / "c",
        "shard-000004.scores.npz",
    )
    # a re-run of the score stage re-scores exactly that shard and restores the reference
    rerun = must(fork_run(score_argv(base, ref["shards"], out), logdir=tmp_path / "r"), "re-run")
    assert "5 of the 6 shards already scored" in rerun.text()
    _same_as_ref(out, ref)


def test_score_corrupt_manifest_refused(base, ref, tmp_path):
    out = shutil.copytree(ref["scores"], tmp_path / "scores")
    (out / "scores.json").write_text("{not json")
    fork_refused(
        curriculum_argv(ref["shards"], out, tmp_path / "cur"),
        tmp_path / "c",
        "scores.json",
        "corrupt",
    )


def test_scores_stale_after_reshard_with_other_tokenizer(base, ref, tmp_path):
    shards = shutil.copytree(ref["shards"], tmp_path / "shards")
    argv = with_flag(shard_argv(base, shards), "--tokenizer", base["tokenizer2"])
    must(fork_run([*argv, "--overwrite"], logdir=tmp_path / "s"), "re-shard")
    fork_refused(
        curriculum_argv(shards, ref["scores"], tmp_path / "cur"),
        tmp_path / "c",
        "scores.json",
        "dataset fingerprint",
    )
    assert not (tmp_path / "cur" / "curriculum.json").exists()


def test_score_model_of_other_tokenizer_refused(base, ref, tmp_path):
    argv = with_flag(
        score_argv(base, ref["shards"], tmp_path / "scores"), "--model", base["teacher2"]
    )
    fork_refused(argv, tmp_path / "s", "tokenizer differs")
    assert not list((tmp_path / "scores").glob("*.npz"))


def test_score_missing_model_path(base, ref, tmp_path):
    argv = with_flag(
        score_argv(base, ref["shards"], tmp_path / "scores"), "--model", tmp_path / "no-such-model"
    )
    fork_refused(argv, tmp_path / "s", "no-such-model", "not found")
