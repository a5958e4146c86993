"""Global sort (pure) and curriculum shards: order, counts, id multisets, fingerprints, ranks."""

from __future__ import annotations

import collections
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the pure sort -----------------------------------------------------------------------


def test_sort_by_score_then_id_independent_of_input_order():
    from kdcl_dist.curriculum.sort import sort_order

    rng = np.random.default_rng(0)
    ids = np.array([f"doc-{i:05d}" for i in range(5000)])
    scores = rng.integers(0, 50, size=5000).astype(np.float64) / 7  # many ties
    perm = sort_order(scores, ids)
    keyed = list(zip(scores[perm].tolist(), ids[perm].tolist()))
    assert keyed == sorted(zip(scores.tolist(), ids.tolist()))
    for seed in range(3):  # any split/ordering of the inputs (any world size) -> same order
        sh = np.random.default_rng(seed).permutation(5000)
        p2 = sort_order(scores[sh], ids[sh])
        assert ids[sh][p2].tolist() == ids[perm].tolist()


def test_nonfinite_policies():
    from kdcl_dist.curriculum.build import compute_order

    flat = {
        "ids": np.array(["e", "d", "c", "b", "a"]),
        "score": np.array([2.0, np.nan, 1.0, np.inf, 1.0]),
        "shard": np.zeros(5, np.int64),
        "local": np.arange(5),
    }
    last = compute_order(flat, "last")
    assert flat["ids"][last["perm"]].tolist() == ["a", "c", "e", "b", "d"]  # non-finite last, by id
    assert np.isinf(last["scores"][-2:]).all() and last["nonfinite"] == 2 and last["excluded"] == {}
    exc = compute_order(flat, "exclude")
    assert flat["ids"][exc["perm"]].tolist() == ["a", "c", "e"]
    assert exc["excluded"] == {"nonfinite_score": 2}


def test_external_merge_equals_in_memory_sort(tmp_path):
    from kdcl_dist.curriculum.sort import merge_runs, merged_arrays, sort_order, write_run

    rng = np.random.default_rng(1)
    runs, all_s, all_i = [], [], []
    for r in range(7):
        n = int(rng.integers(1, 900))
        s = np.round(rng.random(n) * 20, 1)  # ties across runs
        ids = np.array([f"r{r}-{k:04d}" for k in range(n)])
        runs.append(write_run(tmp_path / f"run{r}", s, ids, np.arange(n) + 10_000 * r))
        all_s.append(s)
        all_i.append(ids)
    s, ids = np.concatenate(all_s), np.concatenate(all_i)
    want = ids[sort_order(s, ids)].tolist()
    got = [
        i for _, ic, _ in merged_arrays(merge_runs(runs, chunk=100), chunk=333) for i in ic.tolist()
    ]
    assert got == want


# ---- curriculum shards from synthetic score files ------------------------------------------


def fake_scores(shards_dir, out, *, nan_ids=(), seed=0, dataset_fp=None):
    """Score files + scores.json as `kdcl-dist score` writes them, with pseudo-random scores and ties."""
    from kdcl_dist.curriculum.scoring import (
        ScoreConfig,
        identity,
        score_file_name,
        write_score_file,
        write_scores_manifest,
    )
    from kdcl_dist.data.reader import ShardSet

    ss = ShardSet(shards_dir)
    cfg = ScoreConfig(progress=False)
    ident = identity("fake-model", cfg, dataset_fp or ss.fingerprint)
    rng = np.random.default_rng(seed)
    expect = {}
    for i, e in enumerate(ss.shards):
        ids = [s.meta["id"] for s in ss.iter_shard(i)]
        sc = np.round(rng.random(len(ids)) * 5, 2)  # rounded: many equal scores
        for k, sid in enumerate(ids):
            if sid in nan_ids:
                sc[k] = np.nan
        expect.update(zip(ids, sc.tolist()))
        info = {**ident, "shard": e["name"], "shard_sha256": e["sha256"], "count": len(ids)}
        write_score_file(
            Path(out) / score_file_name(e["name"]),
            ids,
            sc,
            np.ones(len(ids)),
            np.ones(len(ids)),
            info,
        )
    write_scores_manifest(
        ss, Path(out), ident, cfg, "fake-model", [{"elapsed_s": 1.0, "tokens": 1, "samples": 1}]
    )
    return expect


def check_curriculum(cur_dir, source_dir, expect: dict, excluded=()):
    """Sorted, positions exact, counts add up, ids kept exactly once with their tokens."""
    from kdcl_dist.data.reader import ShardSet

    cur = ShardSet(cur_dir)
    src = ShardSet(source_dir)
    man = json.loads((Path(cur_dir) / "curriculum.json").read_text())
    order_scores = np.load(Path(cur_dir) / "order_scores.npy")
    assert man["kind"] == "curriculum" and man["num_samples"] == len(cur) == len(order_scores)
    assert sum(s["count"] for s in man["shards"]) == man["num_samples"]
    assert man["num_samples"] + sum(man["excluded"].values()) == len(src)
    src_ids = {s.meta["id"]: s.ids for s in src}
    got, keys = [], []
    for p in range(len(cur)):
        s = cur.get(p)
        assert s.meta["position"] == p
        assert np.array_equal(s.ids, src_ids[s.meta["id"]])
        exp = expect[s.meta["id"]]
        if np.isfinite(exp):
            assert s.meta["score"] == pytest.approx(exp, abs=1e-12)
            assert order_scores[p] == np.float32(exp)
        got.append(s.meta["id"])
        keys.append((s.meta["score"], s.meta["id"]))
    assert keys == sorted(keys), "curriculum is not in (score, id) order"
    assert collections.Counter(got) == collections.Counter(k for k in src_ids if k not in excluded)
    assert np.all(order_scores[1:] >= order_scores[:-1])  # (inf - inf is nan: compare, not diff)
    q = man["score_stats"]["quantiles"]
    assert list(q) == [f"{x:.2f}" for x in np.arange(0, 1.0001, 0.05)]
    fin = order_scores[np.isfinite(order_scores)]
    assert q["0.00"] == pytest.approx(fin.min(), abs=1e-6) and q["1.00"] == pytest.approx(
        fin.max(), abs=1e-6
    )
    assert man["max_confidence"] == pytest.approx(np.exp(-man["score_stats"]["min"]))
    for ps, e in zip(man["per_shard"], man["shards"]):
        assert ps["name"] == e["name"] and ps["count"] == e["count"]
    return man


def test_curriculum_sorted_counts_and_id_multiset(tiny_assets, tmp_path):
    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum

    scores = tmp_path / "scores"
    expect = fake_scores(tiny_assets["shards"], scores)
    man = build_curriculum(
        tiny_assets["shards"],
        scores,
        tmp_path / "cur",
        CurriculumConfig(exclude_heldout_percent=0, shard_size=37, progress=False),
    )
    assert len(man["shards"]) == (tiny_assets["n_docs"] + 36) // 37
    check_curriculum(tmp_path / "cur", tiny_assets["shards"], expect)
    assert (tmp_path / "cur" / "curriculum.png").stat().st_size > 1000
    assert (tmp_path / "cur" / "score_histogram.png").stat().st_size > 1000
    assert man["inputs"]["model_fingerprint"] == "fake-model"


def test_nonfinite_last_and_exclude(tiny_assets, tmp_path):
    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum
    from kdcl_dist.data.reader import ShardSet

    first = [s.meta["id"] for s in ShardSet(tiny_assets["shards"]).iter_shard(2)][:3]
    scores = tmp_path / "scores"
    expect = fake_scores(tiny_assets["shards"], scores, nan_ids=set(first))
    man = build_curriculum(
        tiny_assets["shards"],
        scores,
        tmp_path / "last",
        CurriculumConfig(exclude_heldout_percent=0, shard_size=64, progress=False, plots=False),
    )
    assert man["nonfinite"] == {"count": 3, "policy": "last"}
    cur = ShardSet(tmp_path / "last")
    assert [cur.get(len(cur) - 3 + k).meta["id"] for k in range(3)] == sorted(first)
    check_curriculum(tmp_path / "last", tiny_assets["shards"], expect)
    man = build_curriculum(
        tiny_assets["shards"],
        scores,
        tmp_path / "exc",
        CurriculumConfig(
            exclude_heldout_percent=0,
            shard_size=64,
            progress=False,
            plots=False,
            nonfinite="exclude",
        ),
    )
    assert man["excluded"] == {"nonfinite_score": 3}
    check_curriculum(tmp_path / "exc", tiny_assets["shards"], expect, excluded=set(first))


@pytest.mark.parametrize("sort", ["in_memory", "external_cli"])
def test_heldout_documents_left_out_of_the_curriculum(tiny_assets, tmp_path, sort):
    """`--exclude-heldout-percent N` drops exactly the documents `eval mlm --split heldout
    --heldout-percent N` evaluates (in-memory and external sort alike); a held-out id with a
    NaN score counts once, as held out; the fingerprint tells the curricula apart."""
    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.evaluate.mlm import is_heldout, select_samples

    pct = 30
    all_ids = [s.meta["id"] for s in ShardSet(tiny_assets["shards"])]
    held = {i for i in all_ids if is_heldout(i, pct)}
    assert 0 < len(held) < len(all_ids)
    kept = [i for i in all_ids if i not in held]
    nan_ids = {sorted(held)[0], kept[0]}
    scores = tmp_path / "scores"
    expect = fake_scores(tiny_assets["shards"], scores, nan_ids=nan_ids)
    if sort == "in_memory":
        man = build_curriculum(
            tiny_assets["shards"],
            scores,
            tmp_path / "cur",
            CurriculumConfig(
                shard_size=64,
                progress=False,
                plots=False,
                nonfinite="exclude",
                exclude_heldout_percent=pct,
            ),
        )
    else:
        run_cli(
            "curriculum",
            "--shards",
            tiny_assets["shards"],
            "--scores",
            scores,
            "--out",
            tmp_path / "cur",
            "--shard-size",
            "64",
            "--nonfinite",
            "exclude",
            "--in-memory-max",
            "0",
            "--no-plots",
            "--no-progress",
            "--exclude-heldout-percent",
            str(pct),
        )
        man = json.loads((tmp_path / "cur" / "curriculum.json").read_text())
        assert man["build"]["sort"] == "external"
    assert man["excluded"] == {"heldout": len(held), "nonfinite_score": 1}
    assert man["heldout"]["excluded_percent"] == pct
    check_curriculum(tmp_path / "cur", tiny_assets["shards"], expect, excluded=held | {kept[0]})
    _, evaluated = select_samples(tiny_assets["shards"], "heldout", pct)
    assert {i for i, _ in evaluated} == held
    assert not held & {s.meta["id"] for s in ShardSet(tmp_path / "cur")}
    every = build_curriculum(
        tiny_assets["shards"],
        scores,
        tmp_path / "all",
        CurriculumConfig(
            exclude_heldout_percent=0,
            shard_size=64,
            progress=False,
            plots=False,
            nonfinite="exclude",
        ),
    )
    assert (
        every["excluded"] == {"nonfinite_score": 2} and every["fingerprint"] != man["fingerprint"]
    )


@pytest.mark.parametrize("policy", ["last", "exclude"])
def test_external_sort_in_the_stage_gives_identical_output(tiny_assets, tmp_path, policy):
    """`curriculum.in_memory_max` below the sample count switches to the external merge sort:
    order files, shards and curriculum.json are identical to the in-memory path's."""
    from kdcl_dist.curriculum.build import ORDER_FILES, CurriculumConfig, build_curriculum
    from kdcl_dist.data.reader import ShardSet

    nan_ids = set([s.meta["id"] for s in ShardSet(tiny_assets["shards"]).iter_shard(1)][:4])
    scores = tmp_path / "scores"
    expect = fake_scores(tiny_assets["shards"], scores, nan_ids=nan_ids, seed=3)
    mans = {}
    for name, limit in (("mem", 10**9), ("ext", 10)):
        cfg = CurriculumConfig(
            exclude_heldout_percent=0,
            shard_size=64,
            progress=False,
            plots=False,
            nonfinite=policy,
            in_memory_max=limit,
            merge_chunk=7,
        )  # small chunks: the merge pages runs in and out
        mans[name] = build_curriculum(tiny_assets["shards"], scores, tmp_path / name, cfg)
    assert (
        mans["mem"]["build"]["sort"] == "in_memory" and mans["ext"]["build"]["sort"] == "external"
    )
    for f in ORDER_FILES:
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "ext" / f).read_bytes(), f
    for e in mans["mem"]["shards"]:
        assert (tmp_path / "mem" / e["name"]).read_bytes() == (
            tmp_path / "ext" / e["name"]
        ).read_bytes()
    drop = ("build",)
    assert {k: v for k, v in mans["mem"].items() if k not in drop} == {
        k: v for k, v in mans["ext"].items() if k not in drop
    }
    assert not (tmp_path / "ext" / ".sort-runs").exists()
    check_curriculum(
        tmp_path / "ext",
        tiny_assets["shards"],
        expect,
        excluded=nan_ids if policy == "exclude" else (),
    )


def test_external_sort_refuses_duplicate_ids(tiny_assets, tmp_path):
    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum
    from kdcl_dist.curriculum.scoring import read_score_file, score_file_name, write_score_file
    from kdcl_dist.errors import UserError

    scores = tmp_path / "scores"
    fake_scores(tiny_assets["shards"], scores)
    f0, f3 = (scores / score_file_name(f"shard-00000{i}.tar") for i in (0, 3))
    a, b = read_score_file(f0), read_score_file(f3)
    ids = b["ids"].copy()
    ids[5] = a["ids"][17]  # an id of shard 0 also in shard 3
    write_score_file(f3, ids, b["score"], b["masked"], b["tokens"], b["info"])
    with pytest.raises(UserError, match="appears more than once"):
        build_curriculum(
            tiny_assets["shards"],
            scores,
            tmp_path / "cur",
            CurriculumConfig(
                exclude_heldout_percent=0, progress=False, plots=False, in_memory_max=0
            ),
        )


def test_scores_of_another_dataset_refused(tiny_assets, tmp_path):
    scores = tmp_path / "scores"
    fake_scores(tiny_assets["shards"], scores, dataset_fp="0123456789abcdef")
    p = run_cli(
        "curriculum",
        "--shards",
        tiny_assets["shards"],
        "--scores",
        scores,
        "--out",
        tmp_path / "cur",
        check=False,
    )
    assert p.returncode == 2
    assert "scores were made for dataset fingerprint 0123456789abcdef" in p.stderr
    assert not (tmp_path / "cur" / "curriculum.json").exists()


def test_rerun_keeps_finished_shards(tiny_assets, tmp_path):
    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum

    scores = tmp_path / "scores"
    expect = fake_scores(tiny_assets["shards"], scores)
    cfg = CurriculumConfig(exclude_heldout_percent=0, shard_size=50, progress=False, plots=False)
    build_curriculum(tiny_assets["shards"], scores, tmp_path / "cur", cfg)
    t = (tmp_path / "cur" / "shard-000002.tar").stat().st_mtime_ns
    (tmp_path / "cur" / "shard-000005.tar").unlink()  # as if killed before finishing it
    (tmp_path / "cur" / ".parts" / "shard-000005.tar.json").unlink()
    build_curriculum(tiny_assets["shards"], scores, tmp_path / "cur", cfg)
    assert (tmp_path / "cur" / "shard-000002.tar").stat().st_mtime_ns == t
    check_curriculum(tmp_path / "cur", tiny_assets["shards"], expect)
    # a smaller shard size rewrites everything and leaves no stale shard behind
    build_curriculum(
        tiny_assets["shards"],
        scores,
        tmp_path / "cur",
        CurriculumConfig(exclude_heldout_percent=0, shard_size=300, progress=False, plots=False),
    )
    assert not (tmp_path / "cur" / "shard-000002.tar").exists()
    check_curriculum(tmp_path / "cur", tiny_assets["shards"], expect)


@pytest.mark.distributed
def test_two_ranks_write_identical_curriculum(tiny_assets, tmp_path):
    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum

    scores = tmp_path / "scores"
    expect = fake_scores(tiny_assets["shards"], scores, seed=3)
    one = build_curriculum(
        tiny_assets["shards"],
        scores,
        tmp_path / "w1",
        CurriculumConfig(exclude_heldout_percent=0, shard_size=45, progress=False, plots=False),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_port()),
        "-m",
        "kdcl_dist",
        "curriculum",
        "--shards",
        str(tiny_assets["shards"]),
        "--scores",
        str(scores),
        "--out",
        str(tmp_path / "w2"),
        "--shard-size",
        "45",
        "--no-progress",
        "--exclude-heldout-percent",
        "0",
    ]
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    two = check_curriculum(tmp_path / "w2", tiny_assets["shards"], expect)
    assert two["build"]["world_size"] == 2
    assert [e["sha256"] for e in two["shards"]] == [e["sha256"] for e in one["shards"]]
    assert two["fingerprint"] == one["fingerprint"]


# ---- the real corpus: score -> curriculum on 2 CPU ranks ------------------------------------


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.distributed
def test_real_corpus_score_and_curriculum_two_ranks(data_dir, tmp_path):
    """All 12,073 abstracts: tokenizer trained here, tiny student, score + curriculum with torchrun x2."""
    import os

    from kdcl_dist.data.shards import write_documents
    from kdcl_dist.data.tokenizer import train_wordpiece
    from kdcl_dist.kd.models import init_model_dir

    docs = []
    with open(data_dir / "pubmed" / "abstracts.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            docs.append((r["id"], (r.get("title", "") + " " + r["text"]).strip()))
    assert len(docs) == 12073
    tok = train_wordpiece((t for _, t in docs), tmp_path / "tok", vocab_size=4000)
    spec = {
        "type": "distilbert",
        "hidden_size": 64,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 128,
    }
    init_model_dir(spec, tok, tmp_path / "student", seed=0, max_positions=256)
    write_documents(docs, tok, tmp_path / "shards", max_length=256, shard_size=1500)
    env = dict(os.environ, OMP_NUM_THREADS="1", KDCL_LOG_LEVEL="INFO")
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    p = subprocess.run(
        base
        + [
            "--master_port",
            str(_port()),
            "-m",
            "kdcl_dist",
            "score",
            "--shards",
            str(tmp_path / "shards"),
            "--model",
            str(tmp_path / "student"),
            "--out",
            str(tmp_path / "scores"),
            "--no-progress",
            "--masks",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    p = subprocess.run(
        base
        + [
            "--master_port",
            str(_port()),
            "-m",
            "kdcl_dist",
            "curriculum",
            "--shards",
            str(tmp_path / "shards"),
            "--scores",
            str(tmp_path / "scores"),
            "--out",
            str(tmp_path / "cur"),
            "--shard-size",
            "2000",
            "--no-progress",
            "--exclude-heldout-percent",
            "0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    from kdcl_dist.curriculum.scoring import load_scores

    _, arrays = load_scores(tmp_path / "scores")
    expect = {i: s for a in arrays for i, s in zip(a["ids"].tolist(), a["score"].tolist())}
    assert len(expect) == 12073
    man = check_curriculum(tmp_path / "cur", tmp_path / "shards", expect)
    assert man["num_samples"] == 12073 and len(man["shards"]) == 7
    scores_man = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert scores_man["run"]["world_size"] == 2 and scores_man["totals"]["samples"] == 12073


def test_fast_writer_is_byte_identical_to_write_shard(tmp_path):
    """The re-shard writer produces exactly write_shard's bytes (tar and offset index)."""
    from kdcl_dist.curriculum.build import _Encoded, _meta_json, fast_write_shard
    from kdcl_dist.data.shards import Sample, npy_bytes, write_shard

    rng = np.random.default_rng(0)
    samples = [
        Sample(
            f"pmid-{i:06d}" + "x" * (i % 80),
            rng.integers(0, 4000, size=i % 300 + 1).astype(np.uint16),
            {
                "id": f"pmid {i}",
                "n_tokens": i % 300 + 1,
                "note": 'é"q',
                "score": float(rng.random()) * 10,
                "position": i,
                "source_shard": "shard-000001.tar",
            },
        )
        for i in range(700)
    ]
    a = write_shard(tmp_path / "a.tar", samples, dtype=np.uint16)
    b = fast_write_shard(tmp_path / "b.tar", samples, dtype=np.uint16)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert (a["sha256"], a["bytes"], a["count"]) == (b["sha256"], b["bytes"], b["count"])
    assert json.loads((tmp_path / "a.idx.json").read_text()) == json.loads(
        (tmp_path / "b.idx.json").read_text()
    )
    # pre-encoded members (the re-shard path) give the same bytes too
    enc = []
    for s in samples:
        src = {k: s.meta[k] for k in ("id", "n_tokens", "note")}
        extra = {k: s.meta[k] for k in ("score", "position", "source_shard")}
        enc.append(_Encoded(s.key, npy_bytes(s.ids), _meta_json(json.dumps(src).encode(), extra)))
    c = fast_write_shard(tmp_path / "c.tar", enc, dtype=np.uint16)
    assert c["sha256"] == a["sha256"]
    # keys too long for the fast path fall back to write_shard itself
    long = [Sample("k" * 120, np.arange(5), {"id": "k", "n_tokens": 5})]
    assert (
        fast_write_shard(tmp_path / "d.tar", long, np.uint16)["sha256"]
        == write_shard(tmp_path / "e.tar", long, np.uint16)["sha256"]
    )


def test_default_excludes_eval_heldout_and_plots_lambda_per_schedule(tiny_assets, tmp_path):
    """By default the curriculum leaves out `eval mlm`'s held-out split (5%), and it writes λ over
    one epoch for every reliance schedule before any training (lambda_schedules.json/png)."""
    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.evaluate.mlm import DEFAULT_HELDOUT_PERCENT, is_heldout

    scores = tmp_path / "scores"
    fake_scores(tiny_assets["shards"], scores, seed=5)
    man = build_curriculum(
        tiny_assets["shards"], scores, tmp_path / "cur", CurriculumConfig(progress=False)
    )
    assert man["heldout"]["excluded_percent"] == DEFAULT_HELDOUT_PERCENT == 5
    ids = [s.meta["id"] for s in ShardSet(tmp_path / "cur")]
    assert man["excluded"]["heldout"] > 0 and not any(is_heldout(i, 5) for i in ids)
    lam = json.loads((tmp_path / "cur" / "lambda_schedules.json").read_text())
    assert (tmp_path / "cur" / "lambda_schedules.png").exists() and "lambda_schedules.png" in man[
        "plots"
    ]
    sch = lam["schedules"]
    assert set(sch) >= {"constant", "sr-paper", "sr-minmax", "sr-sample", "sr-rank"}
    assert sch["constant"]["mean"] == pytest.approx(0.5)
    assert sch["sr-paper"]["at_fraction_of_epoch"]["0.00"] == pytest.approx(
        0.0
    )  # shifted: first batch λ = 0
    rank = sch["sr-rank"]["at_fraction_of_epoch"]  # the variant rises over the epoch
    assert (
        rank["0.00"] < 0.05 and rank["1.00"] > 0.85 and rank["0.25"] < rank["0.50"] < rank["0.75"]
    )
    assert sch["sr-rank"]["mean"] == pytest.approx(0.5, abs=0.05)
