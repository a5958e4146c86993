"""Score stage faults: SIGKILL of one rank mid-scoring, ENOSPC, corrupt score files, scores that
belong to shards re-made with another tokenizer, a model of another tokenizer, a missing model."""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import (
    curriculum_argv,
    fork_run,
    kill_point,
    must,
    one_line_error,
    score_argv,
    scores_table,
    shard_argv,
    small_fs,
)

pytestmark = pytest.mark.faults


def _same_as_ref(out, ref) -> None:
    got, want = scores_table(out), scores_table(ref["scores"])
    assert got.keys() == want.keys()
    diff = [k for k in want if got[k] != want[k]]
    assert not diff, f"{len(diff)} scores differ from the undisturbed run"
    a, b = (json.loads((d / "scores.json").read_text()) for d in (out, ref["scores"]))
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
    victim = seed % 2
    n = kill_point(seed, ref["score_run"].events[victim])
    out = tmp_path / "scores"
    killed = fork_run(score_argv(base, ref["shards"], out), world=2, kill=(victim, n), logdir=tmp_path / "k")
    assert killed.rcs[victim] == -9, killed.text()
    assert not (out / "scores.json").exists()
    # score files that exist are complete and equal to the reference's
    for f in out.glob("*.scores.npz"):
        assert f.read_bytes() == (ref["scores"] / f.name).read_bytes(), f.name
    must(fork_run(score_argv(base, ref["shards"], out), world=2, logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)


def test_score_enospc_then_rerun(base, ref, tmp_path):
    out = tmp_path / "fs"
    total = sum(p.stat().st_size for p in ref["scores"].glob("*.npz"))
    with small_fs(out, str(max(4096, total // 2))) as remount:
        run = fork_run(score_argv(base, ref["shards"], out), enospc_at=None if remount else 2,
                       logdir=tmp_path / "k")
        assert run.rc != 0 and "No space left on device" in run.text(), run.text()
        assert not (out / "scores.json").exists()
        for f in out.glob("*.scores.npz"):
            assert f.read_bytes() == (ref["scores"] / f.name).read_bytes(), f.name
        if remount is not None:
            remount("64m")
        must(fork_run(score_argv(base, ref["shards"], out), logdir=tmp_path / "r"), "re-run")
        _same_as_ref(out, ref)


def test_score_truncated_file_refused_then_rescored(base, ref, tmp_path):
    out = shutil.copytree(ref["scores"], tmp_path / "scores")
    f = out / "shard-000004.scores.npz"
    f.write_bytes(f.read_bytes()[:300])
    run = fork_run(curriculum_argv(ref["shards"], out, tmp_path / "cur"), logdir=tmp_path / "c")
    one_line_error(run, "shard-000004.scores.npz")
    # a re-run of the score stage re-scores exactly that shard and restores the reference
    rerun = must(fork_run(score_argv(base, ref["shards"], out), logdir=tmp_path / "r"), "re-run")
    assert "5 of the 6 shards already scored" in rerun.text()
    _same_as_ref(out, ref)


def test_score_corrupt_manifest_refused(base, ref, tmp_path):
    out = shutil.copytree(ref["scores"], tmp_path / "scores")
    (out / "scores.json").write_text("{not json")
    run = fork_run(curriculum_argv(ref["shards"], out, tmp_path / "cur"), logdir=tmp_path / "c")
    one_line_error(run, "scores.json", "corrupt")


def test_scores_stale_after_reshard_with_other_tokenizer(base, ref, tmp_path):
    shards = shutil.copytree(ref["shards"], tmp_path / "shards")
    argv = shard_argv(base, shards)
    argv[argv.index("--tokenizer") + 1] = base["tokenizer2"]
    must(fork_run([*argv, "--overwrite"], logdir=tmp_path / "s"), "re-shard")
    run = fork_run(curriculum_argv(shards, ref["scores"], tmp_path / "cur"), logdir=tmp_path / "c")
    one_line_error(run, "scores.json", "dataset fingerprint")
    assert not (tmp_path / "cur" / "curriculum.json").exists()


def test_score_model_of_other_tokenizer_refused(base, ref, tmp_path):
    argv = score_argv(base, ref["shards"], tmp_path / "scores")
    argv[argv.index("--model") + 1] = base["teacher2"]
    one_line_error(fork_run(argv, logdir=tmp_path / "s"), "tokenizer differs")
    assert not list((tmp_path / "scores").glob("*.npz"))


def test_score_missing_model_path(base, ref, tmp_path):
    argv = score_argv(base, ref["shards"], tmp_path / "scores")
    argv[argv.index("--model") + 1] = tmp_path / "no-such-model"
    one_line_error(fork_run(argv, logdir=tmp_path / "s"), "no-such-model", "not found")
