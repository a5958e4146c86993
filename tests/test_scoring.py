"""Scoring pass: definition, batch/world-size invariance, resume after SIGKILL, skip on re-run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "KDCL_LOG_LEVEL": "WARNING"})
    e.update(extra)
    return e


def torchrun_score(nproc: int, assets, out, *flags, env=None, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_port()), "-m", "kdcl_dist", "score", "--shards", str(assets["shards"]),
           "--model", str(assets["student"]), "--out", str(out), "--no-progress", *map(str, flags)]
    p = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"score failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def load_all(scores_dir) -> dict[str, float]:
    """{sample id: score}; asserts each id appears exactly once across all score files."""
    from kdcl_dist.curriculum.scoring import load_scores

    _, arrays = load_scores(scores_dir)
    ids = np.concatenate([a["ids"] for a in arrays])
    sc = np.concatenate([a["score"] for a in arrays])
    assert len(set(ids.tolist())) == len(ids), "an id was scored more than once"
    return dict(zip(ids.tolist(), sc.tolist()))


def _cfg(**kw):
    from kdcl_dist.curriculum.scoring import ScoreConfig

    kw.setdefault("progress", False)
    return ScoreConfig(**kw)


def test_score_is_mean_masked_ce_over_k_masks(tiny_assets):
    """The batched, masked-positions-only computation equals HF's `labels=` loss per draw."""
    from kdcl_dist.curriculum.scoring import Scorer, score_arrays
    from kdcl_dist.data.masking import MaskSpec, mask_sample
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.kd.models import load_mlm

    tok = load_tokenizer(str(tiny_assets["student"]))
    model = load_mlm(str(tiny_assets["student"])).eval()
    spec = MaskSpec.from_tokenizer(tok)
    ss = ShardSet(tiny_assets["shards"])
    samples = [ss.get(p) for p in range(0, 40, 3)]
    sids = [s.meta["id"] for s in samples]
    toks = [s.ids for s in samples]
    cfg = _cfg(masks=3, seed=7, token_budget=300)
    score, masked, ntok = score_arrays(Scorer(model, torch.device("cpu")), sids, toks, cfg, spec, tok.pad_token_id)
    for i, (sid, t) in enumerate(zip(sids, toks)):
        tot, cnt = 0.0, 0
        for k in range(3):
            inp, lab = mask_sample(t, sid, k, "score", 7, spec)
            with torch.inference_mode():
                loss = model(input_ids=torch.from_numpy(inp)[None], labels=torch.from_numpy(lab)[None]).loss
            n = int((lab >= 0).sum())
            tot += float(loss) * n
            cnt += n
        assert masked[i] == cnt
        assert ntok[i] == len(t)
        assert abs(score[i] - tot / cnt) < 1e-5, (sid, score[i], tot / cnt)


def test_plan_batches_respects_budget_and_covers_rows():
    from kdcl_dist.curriculum.scoring import plan_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 130, size=1000)
    batches = plan_batches(lengths, token_budget=512, window=256)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 512
    # length sorting keeps padding small: padded tokens are < 10% of real tokens here
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.10 * lengths.sum()


def test_token_budgets_give_same_scores(tiny_assets, tmp_path):
    """Padding never enters a loss: three budgets (incl. one row per batch) agree within 1e-4."""
    from kdcl_dist.curriculum.scoring import score_shards

    results = []
    for budget, window in ((128, 1), (1000, 64), (20000, 8192)):
        out = tmp_path / f"b{budget}"
        score_shards(tiny_assets["shards"], tiny_assets["student"], out, _cfg(token_budget=budget, window=window),
                     device=torch.device("cpu"))
        results.append(load_all(out))
    assert len(results[0]) == tiny_assets["n_docs"]
    for r in results[1:]:
        assert r.keys() == results[0].keys()
        diff = max(abs(r[k] - results[0][k]) for k in r)
        assert diff < 1e-4, diff
    # scores actually differ between samples (a constant would pass the comparison trivially)
    assert np.std(list(results[0].values())) > 1e-3


def test_rerun_skips_scored_shards_and_rescores_on_new_seed(tiny_assets, tmp_path):
    from kdcl_dist.curriculum.scoring import score_file_name, score_shards

    out = tmp_path / "s"
    score_shards(tiny_assets["shards"], tiny_assets["student"], out, _cfg(), device=torch.device("cpu"))
    f = out / score_file_name("shard-000001.tar")
    before = f.stat().st_mtime_ns
    first = load_all(out)
    score_shards(tiny_assets["shards"], tiny_assets["student"], out, _cfg(), device=torch.device("cpu"))
    assert f.stat().st_mtime_ns == before, "an already-scored shard was scored again"
    man = score_shards(tiny_assets["shards"], tiny_assets["student"], out, _cfg(seed=99), device=torch.device("cpu"))
    assert f.stat().st_mtime_ns != before, "a new seed must re-score"
    assert man["seed"] == 99
    second = load_all(out)
    assert max(abs(second[k] - first[k]) for k in first) > 1e-4   # other masks, other scores


def test_half_precision_refused_on_cpu(tiny_assets, tmp_path):
    p = run_cli("score", "--shards", tiny_assets["shards"], "--model", tiny_assets["student"], "--out",
                tmp_path / "s", "--dtype", "bf16", check=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 2
    assert "score.dtype: bf16 needs a GPU" in p.stderr


@pytest.fixture(scope="module")
def world2_scores(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("w2") / "scores"
    torchrun_score(2, tiny_assets, out, "--token-budget", "700")
    return out


@pytest.mark.distributed
def test_world_size_1_vs_2(tiny_assets, tmp_path, world2_scores):
    """Same per-sample scores on 1 and 2 ranks (and another budget); each id exactly once."""
    import json

    run_cli("score", "--shards", tiny_assets["shards"], "--model", tiny_assets["student"], "--out",
            tmp_path / "w1", "--no-progress", "--token-budget", "5000", env=_env())
    one, two = load_all(tmp_path / "w1"), load_all(world2_scores)
    assert len(one) == tiny_assets["n_docs"] and one.keys() == two.keys()
    assert max(abs(one[k] - two[k]) for k in one) < 1e-4
    man = json.loads((world2_scores / "scores.json").read_text())
    assert man["run"]["world_size"] == 2
    # shard i went to rank i % 2: both ranks did work
    assert all(r["samples"] > 0 for r in man["run"]["ranks"])
    assert (world2_scores / "config.yaml").exists()


@pytest.mark.distributed
@pytest.mark.faults
def test_sigkill_one_rank_then_rerun(tiny_assets, tmp_path, world2_scores):
    """Rank 1 SIGKILLs itself in its second shard; the re-run completes and equals an uninterrupted run."""
    from kdcl_dist.curriculum.scoring import score_file_name

    out = tmp_path / "s"
    # 100 samples x 2 masks per shard at ~130 tokens/row and budget 700: ~40 batches per shard
    p = torchrun_score(2, tiny_assets, out, "--token-budget", "700", env=_env(KDCL_TEST_KILL_AT="1:60"), check=False)
    assert p.returncode != 0
    assert not (out / "scores.json").exists()
    assert (out / score_file_name("shard-000001.tar")).exists(), "rank 1 should have finished its first shard"
    assert not (out / score_file_name("shard-000003.tar")).exists(), "rank 1 died before its second shard"
    done_before = (out / score_file_name("shard-000001.tar")).stat().st_mtime_ns
    torchrun_score(2, tiny_assets, out, "--token-budget", "700")
    assert (out / score_file_name("shard-000001.tar")).stat().st_mtime_ns == done_before  # skipped, not redone
    a, b = load_all(out), load_all(world2_scores)
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) < 1e-6


def test_stale_tokenizer_refused(tiny_assets, tmp_path):
    """A model whose tokenizer differs from the shards' is refused before scoring."""
    from conftest import TINY_STUDENT

    from kdcl_dist.data.tokenizer import train_wordpiece
    from kdcl_dist.kd.models import init_model_dir

    tok = train_wordpiece(["alpha beta gamma delta"] * 50, tmp_path / "tok", vocab_size=200)
    init_model_dir(TINY_STUDENT, tok, tmp_path / "m", seed=0, max_positions=256)
    p = run_cli("score", "--shards", tiny_assets["shards"], "--model", tmp_path / "m", "--out", tmp_path / "s",
                check=False)
    assert p.returncode == 2 and "tokenizer differs" in p.stderr
    assert not Path(tmp_path / "s" / "scores.json").exists()
