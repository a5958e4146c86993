"""The cached sparse teacher (kd/teacher_cache.py): estimator, cache contents, train from it, faults."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from _curriculum_fixture import curriculum_fixture, read_jsonl
from conftest import run_cli

cur = curriculum_fixture()
TAU = 2.0


def _masked_logits(assets, cur_dir, n_samples=6):
    """Live teacher and student logits at the training masks of the first samples (seed 42)."""
    from transformers import AutoModelForMaskedLM

    from kdcl_dist.curriculum.sampler import CurriculumDataset, collate
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(assets["student"]))
    ds = CurriculumDataset(ShardSet(cur_dir, "curriculum.json"), tok, seed=42)
    items = [ds[i] for i in range(n_samples)]
    mb = collate(items, tok.pad_token_id)
    sel = mb["labels"] != -100
    out = {}
    for who in ("teacher", "student"):
        m = AutoModelForMaskedLM.from_pretrained(str(assets[who])).eval()
        with torch.no_grad():
            out[who] = m(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[sel]
    return out["teacher"], out["student"], mb["labels"][sel], items


def test_sampled_and_hybrid_estimators_are_unbiased_and_topk_is_not(tiny_assets, cur):
    """Known answer: over R independent samplings, the mean of the cached KD term (value and a
    gradient projection) equals the full τ²·KL within 4 standard errors of the mean (the
    estimator's own sample variance / R); top-k's estimate misses it by far more."""
    from kdcl_dist.kd.losses import masked_kd_losses
    from kdcl_dist.kd.teacher_cache import sparse_kd_losses, sparse_targets

    t, s, labels, _ = _masked_logits(tiny_assets, cur)
    t = t * 8.0  # a confident teacher (the random-init one is near uniform): a tail worth dropping
    M, V = t.shape
    x = s.clone().requires_grad_(True)
    (direction,) = torch.autograd.grad(masked_kd_losses(x, t, labels, 1.0, TAU, 1.0)["loss"], x)

    def kd_and_grad(fn):  # the KD term and its gradient projected on the full gradient
        x = s.clone().requires_grad_(True)
        kd = fn(x)
        (g,) = torch.autograd.grad(kd, x)
        return float(kd.detach()), float((g * direction).sum())

    K, R = 8, 300

    def cached(x, n, ids, w, ent):
        u = int(n.max())
        col = torch.arange(len(ids)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        row = torch.repeat_interleave(torch.arange(M), n)
        ids_m = torch.zeros(M, u, dtype=torch.long).index_put_((row, col), ids)
        W = torch.zeros(M, u).index_put_((row, col), w.float())
        return sparse_kd_losses(x, ids_m, W, ent, labels, 1.0, TAU, 1.0)["loss"]

    def estimates(teacher, method):
        """R estimates (KD term, gradient projection) of `method`, and the full values."""
        full = kd_and_grad(lambda x: masked_kd_losses(x, teacher, labels, 1.0, TAU, 1.0)["loss"])
        est = []
        for r in range(R):
            u = np.random.default_rng(r).random((M, K))
            n, ids, w, ent = sparse_targets(teacher, TAU, method, K, u, head=4)
            if method == "sample":
                w = w / K  # counts of K
            # hybrid: the baseline entry (id V) stands for b on each of the V ids
            mass = torch.where(ids >= V, w.double() * V, w.double())
            sums = torch.zeros(M, dtype=torch.float64).index_add_(
                0, torch.repeat_interleave(torch.arange(M), n), mass
            )
            assert torch.allclose(sums, torch.ones(M, dtype=torch.float64), atol=1e-5), sums
            est.append(kd_and_grad(lambda x, a=(n, ids, w, ent): cached(x, *a)))
        return np.asarray(est), full

    # a teacher that puts ~3/4 of its mass on 4 ids per position, as trained teachers do
    bump = torch.zeros_like(t).scatter_(
        1, torch.randint(0, V, (M, 4), generator=torch.Generator().manual_seed(0)), 14.0
    )
    sd = {}
    for name, teacher in (("flat", t), ("peaked", t + bump)):
        for method in ("sample", "hybrid"):
            est, full = estimates(teacher, method)
            mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(R)
            sd[name, method] = est.std(0, ddof=1)
            for j, what in enumerate(("τ²·KL", "gradient projection")):
                assert abs(mean[j] - full[j]) <= 4 * se[j], (name, method, what, mean[j], full[j])
    head = torch.softmax((t + bump) / TAU, -1).topk(4, -1).values.sum(-1).mean()
    assert head > 0.6, head
    # the exact head takes the noise of a confident teacher's head away, the baseline that of a
    # near-uniform one (same K, same uniforms)
    print(sd)
    for name in ("flat", "peaked"):
        assert (sd[name, "hybrid"] < 0.5 * sd[name, "sample"]).all(), (name, sd)
    full = kd_and_grad(lambda x: masked_kd_losses(x, t, labels, 1.0, TAU, 1.0)["loss"])
    se = sd["flat", "sample"] / np.sqrt(R)
    n, ids, w, ent = sparse_targets(t, TAU, "topk", K)
    top = kd_and_grad(lambda x: cached(x, n, ids, w, ent))
    assert abs(top[0] - full[0]) > 20 * se[0], (top, full, se)  # biased: far outside


def _build(assets, cur_dir, out, *extra, env=None, check=True):
    return run_cli(
        "teacher-cache",
        "--curriculum",
        cur_dir,
        "--teacher",
        assets["teacher"],
        "--out",
        out,
        "--allow-new-head",
        *extra,
        env=env,
        check=check,
    )


@pytest.fixture(scope="module")
def cache(tiny_assets, cur, tmp_path_factory):
    out = tmp_path_factory.mktemp("tcache") / "c"
    p = _build(tiny_assets, cur, out, "--draws", "2")
    assert "GB per 1M samples" in p.stdout
    return out


def test_cache_holds_the_live_teacher_at_the_training_masks(tiny_assets, cur, tmp_path):
    """What the cache holds for a sample equals the live teacher's at the same training mask:
    H(softmax(t/τ)) and (topk) its k most likely ids with their renormalised probabilities."""
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.kd.teacher_cache import CacheReader, open_cache, sparse_kd_losses

    t, s, labels, items = _masked_logits(tiny_assets, cur, n_samples=3)
    out = tmp_path / "top"
    k = 20
    _build(tiny_assets, cur, out, "--method", "topk", "--samples", str(k))
    ss = ShardSet(cur, "curriculum.json")
    man = open_cache(out, ss.manifest, temperature=TAU, draws_needed=1)
    reader = CacheReader(out, man, ss)
    got = [reader.targets(it["position"], 0, int((it["labels"] != -100).sum())) for it in items]
    ids, w, ent = (torch.from_numpy(np.concatenate(x)) for x in zip(*got))
    q = torch.softmax(t / TAU, -1)
    assert torch.allclose(ent, -(q * q.log()).sum(-1), atol=1e-4)
    vals, top = q.topk(k, -1)
    assert torch.equal(ids, top)
    assert torch.allclose(w, vals / vals.sum(-1, keepdim=True), atol=2e-3)  # fp16 weights
    live = sparse_kd_losses(s, top, vals / vals.sum(-1, keepdim=True), ent, labels, 1.0, TAU, 1.0)
    cached = sparse_kd_losses(s, ids, w, ent, labels, 1.0, TAU, 1.0)
    assert abs(float(live["kd"]) - float(cached["kd"])) < 1e-2


def test_train_from_cache_pairs_masks_and_skips_the_teacher(tiny_assets, cur, cache, tmp_path):
    """`train --teacher-cache` on the tiny pair: trains, never loads the teacher, and masks with
    the cache's mask seed whatever --seed says (its MLM term equals a live run's with --seed 42)."""
    common = ["--student", tiny_assets["student"], "--steps", "3", "--global-batch", "16"]
    common += ["--micro-batch", "8", "--num-workers", "0", "--no-progress", "--curriculum", cur]
    run_cli("train", *common, "--teacher-cache", cache, "--seed", "7", "--out", tmp_path / "c")
    run_cli(
        "train", *common, "--teacher", tiny_assets["teacher"], "--allow-new-head",
        "--seed", "7", "--mask-seed", "42", "--out", tmp_path / "l",
    )  # fmt: skip
    c, live = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("c", "l"))
    assert (
        c[0]["loss_mlm"] == live[0]["loss_mlm"]
        and c[0]["masked_tokens"] == live[0]["masked_tokens"]
    )
    assert np.isfinite([r["loss_kd"] for r in c]).all()
    summary = json.loads((tmp_path / "c" / "train_summary.json").read_text())
    assert summary["teacher_sha_start"] == "" and summary["steps_done"] == 3


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    err = [x for x in p.stderr.splitlines() if "error:" in x]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert str(n) in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("fault", ["truncated", "foreign", "draws", "temperature"])
def test_bad_cache_is_a_one_line_error(tiny_assets, cur, cache, tmp_path, fault):
    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    shard0 = sorted(bad.glob("*.tcache"))[0]
    flags = ["--steps", "2"]
    if fault == "truncated":
        f = shard0 / "ids.npy"
        os.truncate(f, f.stat().st_size - 7)
        needle = f
    elif fault == "foreign":  # same size, other content: another shard's file
        other = sorted(bad.glob("*.tcache"))[1] / "entropy.npy"
        f = shard0 / "entropy.npy"
        data = bytearray(f.read_bytes())
        src = other.read_bytes()
        data[128:] = (src[128:] * 2)[: len(data) - 128]
        f.write_bytes(bytes(data))
        needle = f
    elif fault == "draws":  # 2 draws cached, 3 epochs asked
        flags = ["--epochs", "3"]
        needle = "rebuild with --draws 3"
    else:
        flags += ["--temperature", "3.0"]
        needle = "temperature"
    p = run_cli(
        "train", "--curriculum", cur, "--student", tiny_assets["student"], "--teacher-cache", bad,
        "--out", tmp_path / "run", "--global-batch", "16", "--micro-batch", "8", "--num-workers",
        "0", "--no-progress", *flags, check=False,
    )  # fmt: skip
    _one_line_error(p, needle)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_killed_teacher_cache_run_resumes(tiny_assets, cur, cache, tmp_path):
    """A real process SIGKILLed part-way: the re-run keeps the finished shards and the result is
    the uninterrupted run's, file for file."""
    out = tmp_path / "c"
    p = _build(tiny_assets, cur, out, "--draws", "2", env={"KDCL_TEST_KILL_AT": "0:6"}, check=False)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    done = sorted(d.name for d in out.glob("*.tcache"))
    assert 0 < len(done) < len(list(cache.glob("*.tcache")))
    assert not (out / "teacher_cache.json").exists()
    p = _build(tiny_assets, cur, out, "--draws", "2")
    assert f"{len(done)} of the" in p.stderr and "skipping them" in p.stderr
    a, b = (json.loads((d / "teacher_cache.json").read_text()) for d in (cache, out))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["fingerprint"] == b["fingerprint"]


def test_experiment_trains_kd_arms_from_one_cache_on_its_masks(tmp_path):
    """`--teacher-cache auto`: KD arms get --teacher-cache (no --teacher), every arm the cache's
    mask seed; `off`: the live teacher and the seed's masks."""
    from kdcl_dist.experiment import Experiment, ExperimentConfig

    exp = Experiment(tmp_path / "c.jsonl", tmp_path / "exp", ExperimentConfig())
    args = ("cur", "student", "teacher", "out", "sequential", "constant", 3, 1)
    kd = [str(a) for a in exp.train_args(*args, teacher_cache=tmp_path / "tc")]
    assert "--teacher" not in kd and kd[kd.index("--teacher-cache") + 1] == str(tmp_path / "tc")
    assert kd[kd.index("--mask-seed") + 1] == "42"
    only = [str(a) for a in exp.train_args("cur", "student", None, "out", "random", "none", 3, 1, teacher_cache=tmp_path / "tc")]  # fmt: skip
    assert "--teacher-cache" not in only and only[only.index("--mask-seed") + 1] == "42"
    live = [str(a) for a in exp.train_args(*args)]
    assert live[live.index("--teacher") + 1] == "teacher" and "--mask-seed" not in live


def test_two_ranks_write_the_one_rank_cache(tiny_assets, cur, cache, tmp_path):
    """Distributed like `score` (shards assigned by tokens): 2 gloo ranks, byte-identical files."""
    import subprocess
    import sys

    from _curriculum_fixture import free_port, train_env
    from conftest import REPO

    out = tmp_path / "c2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), "-m", "kdcl_dist", "teacher-cache"]
    cmd += ["--curriculum", str(cur), "--teacher", str(tiny_assets["teacher"]), "--out", str(out)]
    cmd += ["--allow-new-head", "--draws", "2"]
    p = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((d / "teacher_cache.json").read_text()) for d in (cache, out))
    assert b["run"]["world_size"] == 2 and a["fingerprint"] == b["fingerprint"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_resume_from_cache_replays_the_uninterrupted_run(tiny_assets, cur, cache, tmp_path):
    """Stopped after 2 of 4 steps (a checkpoint) and resumed: steps 3-4 log the losses of the
    uninterrupted run exactly (the cache's targets and masks are pure in (sample, epoch))."""
    common = ["--curriculum", cur, "--student", tiny_assets["student"], "--teacher-cache", cache]
    common += ["--steps", "4", "--global-batch", "16", "--micro-batch", "8", "--num-workers", "1"]
    common += ["--no-progress"]
    run_cli("train", *common, "--out", tmp_path / "a")
    run_cli("train", *common, "--out", tmp_path / "b", "--max-steps-per-run", "2")
    run_cli("train", *common, "--out", tmp_path / "b")
    a, b = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("a", "b"))
    keys = ("loss", "loss_mlm", "loss_kd", "agreement")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
