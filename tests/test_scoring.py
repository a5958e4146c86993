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
    e.update(
        {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "KDCL_LOG_LEVEL": "WARNING"}
    )
    e.update(extra)
    return e


def torchrun_score(nproc: int, assets, out, *flags, env=None, check=True):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_port()),
        "-m",
        "kdcl_dist",
        "score",
        "--shards",
        str(assets["shards"]),
        "--model",
        str(assets["student"]),
        "--out",
        str(out),
        "--no-progress",
        *map(str, flags),
    ]
    p = subprocess.run(
        cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=600
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"score failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        )
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


@pytest.mark.parametrize("which", ["student", "teacher"])  # DistilBERT and BERT
def test_score_is_mean_masked_ce_over_k_masks(tiny_assets, which):
    """The batched, masked-positions-only computation equals HF's `labels=` loss per draw."""
    from kdcl_dist.curriculum.scoring import Scorer, score_arrays
    from kdcl_dist.data.masking import MaskSpec, mask_sample
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.kd.models import load_mlm

    tok = load_tokenizer(str(tiny_assets[which]))
    model = load_mlm(str(tiny_assets[which])).eval()
    spec = MaskSpec.from_tokenizer(tok)
    ss = ShardSet(tiny_assets["shards"])
    samples = [ss.get(p) for p in range(0, 40, 3)]
    sids = [s.meta["id"] for s in samples]
    toks = [s.ids for s in samples]
    cfg = _cfg(masks=3, seed=7, token_budget=300)
    score, masked, ntok = score_arrays(
        Scorer(model, torch.device("cpu")), sids, toks, cfg, spec, tok.pad_token_id
    )
    for i, (sid, t) in enumerate(zip(sids, toks)):
        tot, cnt = 0.0, 0
        for k in range(3):
            inp, lab = mask_sample(t, sid, k, "score", 7, spec)
            with torch.inference_mode():
                loss = model(
                    input_ids=torch.from_numpy(inp)[None], labels=torch.from_numpy(lab)[None]
                ).loss
            n = int((lab >= 0).sum())
            tot += float(loss) * n
            cnt += n
        assert masked[i] == cnt
        assert ntok[i] == len(t)
        assert abs(score[i] - tot / cnt) < 1e-5, (sid, score[i], tot / cnt)


def _random_mlm(kind: str, layers: int, vocab: int = 300):
    from transformers import AutoModelForMaskedLM, BertConfig, DistilBertConfig

    torch.manual_seed(layers)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=48,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    else:
        cfg = DistilBertConfig(
            vocab_size=vocab,
            dim=48,
            n_layers=layers,
            n_heads=4,
            hidden_dim=96,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    return AutoModelForMaskedLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("layers", [1, 3])
def test_encode_masked_equals_full_forward(kind, layers):
    """The last layer run at masked positions only gives the HF forward's hidden states and logits
    there, with padded rows, rows without masked positions and positions in any order."""
    from kdcl_dist.kd.models import encode_masked, mlm_parts, supports_encode_masked

    model = _random_mlm(kind, layers)
    assert supports_encode_masked(model)
    g = torch.Generator().manual_seed(3)
    lens = [40, 37, 21, 9, 1, 30]
    B, L = len(lens), max(lens)
    ids = torch.randint(5, 300, (B, L), generator=g)
    att = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lens):
        att[b, :n] = 1
        ids[b, n:] = 0
    rows, cols = [], []
    for b, n in enumerate(lens):
        if b == 5:
            continue  # a row with no masked position
        c = torch.randperm(n, generator=g)[: max(1, n // 6)]
        rows += [b] * len(c)
        cols += c.tolist()
    perm = torch.randperm(len(rows), generator=g)  # positions in no particular order
    rows, cols = torch.tensor(rows)[perm], torch.tensor(cols)[perm]
    enc, head = mlm_parts(model)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=att)
        want_h = enc(input_ids=ids, attention_mask=att).last_hidden_state[rows, cols]
        got_h = encode_masked(model, ids, att, rows, cols)
        got_logits = head(got_h)
    assert got_h.shape == want_h.shape
    assert torch.allclose(got_h, want_h, atol=1e-5, rtol=1e-5), (got_h - want_h).abs().max()
    assert torch.allclose(got_logits, out.logits[rows, cols], atol=1e-4, rtol=1e-5)
    # the comparison can fail: hidden states differ between positions
    assert (want_h[0] - want_h[1]).abs().max() > 1e-3
    # and padding content never matters
    ids2 = ids.clone()
    ids2[att == 0] = 7
    with torch.inference_mode():
        assert torch.allclose(encode_masked(model, ids2, att, rows, cols), got_h, atol=1e-6)
    # the sync-free path (q_max and padding known on the host, mask built without asking the
    # device), for both attention implementations HF may pick; and a batch without padding
    q_max = int(torch.bincount(rows).max())
    full = torch.ones(B, L, dtype=torch.long)
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        with torch.inference_mode():
            ref_h = encode_masked(model, ids, att, rows, cols)
            fast_h = encode_masked(model, ids, att, rows, cols, q_max=q_max, padded=True)
            ref_full = enc(input_ids=ids, attention_mask=full).last_hidden_state[rows, cols]
            fast_full = encode_masked(model, ids, full, rows, cols, q_max=q_max, padded=False)
        assert torch.allclose(fast_h, want_h, atol=1e-5, rtol=1e-5), (
            impl,
            (fast_h - want_h).abs().max(),
        )
        assert torch.allclose(fast_h, ref_h, atol=1e-6), impl
        assert torch.allclose(fast_full, ref_full, atol=1e-5, rtol=1e-5), impl
        assert (fast_full - fast_h).abs().max() > 1e-3  # padding matters when it is there


def test_assign_shards_balances_tokens():
    from kdcl_dist.curriculum.scoring import assign_shards

    costs = [100, 100, 100, 100, 100, 100, 100, 40]  # equal shards + a short last one
    plan = assign_shards(costs, 2)
    assert sorted(j for r in plan for j in r) == list(range(8))
    loads = [sum(costs[j] for j in r) for r in plan]
    assert max(loads) - min(loads) <= 60
    assert plan == assign_shards(costs, 2)  # deterministic
    rng = np.random.default_rng(0)
    costs = rng.integers(50, 150, size=37).tolist()
    for world in (1, 2, 3, 8):
        plan = assign_shards(costs, world)
        assert sorted(j for r in plan for j in r) == list(range(37))
        loads = [sum(costs[j] for j in r) for r in plan]
        assert max(loads) - min(loads) <= max(costs)  # LPT bound
    assert assign_shards([5, 5], 4)[2:] == [[], []]  # more ranks than shards: idle ranks


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
        score_shards(
            tiny_assets["shards"],
            tiny_assets["student"],
            out,
            _cfg(token_budget=budget, window=window),
            device=torch.device("cpu"),
        )
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
    score_shards(
        tiny_assets["shards"], tiny_assets["student"], out, _cfg(), device=torch.device("cpu")
    )
    f = out / score_file_name("shard-000001.tar")
    before = f.stat().st_mtime_ns
    first = load_all(out)
    score_shards(
        tiny_assets["shards"], tiny_assets["student"], out, _cfg(), device=torch.device("cpu")
    )
    assert f.stat().st_mtime_ns == before, "an already-scored shard was scored again"
    man = score_shards(
        tiny_assets["shards"],
        tiny_assets["student"],
        out,
        _cfg(seed=99),
        device=torch.device("cpu"),
    )
    assert f.stat().st_mtime_ns != before, "a new seed must re-score"
    assert man["seed"] == 99
    second = load_all(out)
    assert max(abs(second[k] - first[k]) for k in first) > 1e-4  # other masks, other scores


def test_half_precision_refused_on_cpu(tiny_assets, tmp_path):
    p = run_cli(
        "score",
        "--shards",
        tiny_assets["shards"],
        "--model",
        tiny_assets["student"],
        "--out",
        tmp_path / "s",
        "--dtype",
        "bf16",
        check=False,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
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

    run_cli(
        "score",
        "--shards",
        tiny_assets["shards"],
        "--model",
        tiny_assets["student"],
        "--out",
        tmp_path / "w1",
        "--no-progress",
        "--token-budget",
        "5000",
        env=_env(),
    )
    one, two = load_all(tmp_path / "w1"), load_all(world2_scores)
    assert len(one) == tiny_assets["n_docs"] and one.keys() == two.keys()
    assert max(abs(one[k] - two[k]) for k in one) < 1e-4
    man = json.loads((world2_scores / "scores.json").read_text())
    assert man["run"]["world_size"] == 2
    # shards are balanced over the ranks by tokens: both ranks did work
    assert all(r["samples"] > 0 for r in man["run"]["ranks"])
    assert (world2_scores / "config.yaml").exists()


@pytest.mark.distributed
@pytest.mark.faults
def test_sigkill_one_rank_then_rerun(tiny_assets, tmp_path, world2_scores):
    """Rank 1 SIGKILLs itself in its second shard; the re-run completes and equals an uninterrupted run."""
    from kdcl_dist.curriculum.scoring import assign_shards, score_file_name, shard_tokens
    from kdcl_dist.data.reader import ShardSet

    ss = ShardSet(tiny_assets["shards"])
    first, second = assign_shards([shard_tokens(ss, i) for i in range(ss.num_shards)], 2)[
        1
    ]  # rank 1's shards
    f1, f2 = (score_file_name(ss.shards[i]["name"]) for i in (first, second))
    out = tmp_path / "s"
    # kill rank 1 half-way through its second shard, counted in batches of this corpus (real
    # abstracts or the synthetic fallback have different lengths, hence batch counts)
    from kdcl_dist.curriculum.scoring import ScoreConfig, read_shard, shard_batch_arrays
    from kdcl_dist.data.masking import MaskSpec
    from kdcl_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_assets["tokenizer"]))
    spec, cfg = MaskSpec.from_tokenizer(tok), ScoreConfig(token_budget=700)

    def n_batches(i: int) -> int:
        return len(shard_batch_arrays(*read_shard(ss, i), cfg, spec, tok.pad_token_id))

    kill_at = n_batches(first) + max(1, n_batches(second) // 2)
    p = torchrun_score(
        2,
        tiny_assets,
        out,
        "--token-budget",
        "700",
        env=_env(KDCL_TEST_KILL_AT=f"1:{kill_at}"),
        check=False,
    )
    assert p.returncode != 0
    assert not (out / "scores.json").exists()
    assert (out / f1).exists(), "rank 1 should have finished its first shard"
    assert not (out / f2).exists(), "rank 1 died before its second shard"
    done_before = (out / f1).stat().st_mtime_ns
    torchrun_score(2, tiny_assets, out, "--token-budget", "700")
    assert (out / f1).stat().st_mtime_ns == done_before  # skipped, not redone
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
    p = run_cli(
        "score",
        "--shards",
        tiny_assets["shards"],
        "--model",
        tmp_path / "m",
        "--out",
        tmp_path / "s",
        check=False,
    )
    assert p.returncode == 2 and "tokenizer differs" in p.stderr
    assert not Path(tmp_path / "s" / "scores.json").exists()


def test_corrupt_source_shard_is_refused(tiny_assets, tmp_path):
    """A source shard changed in place (same size) is a one-line error naming it, not garbage scores."""
    import shutil

    from kdcl_dist.curriculum.scoring import score_shards
    from kdcl_dist.errors import UserError

    shards = shutil.copytree(tiny_assets["shards"], tmp_path / "shards")
    f = shards / "shard-000002.tar"
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    f.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=r"shard-000002\.tar.*sha256"):
        score_shards(
            shards, tiny_assets["student"], tmp_path / "s", _cfg(), device=torch.device("cpu")
        )
    # verification can be switched off (score.verify=false): then the shard is read as is
    man = score_shards(
        shards,
        tiny_assets["student"],
        tmp_path / "s2",
        _cfg(verify=False),
        device=torch.device("cpu"),
    )
    assert man["totals"]["samples"] == tiny_assets["n_docs"]


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_masked_path_keeps_half_precision_dtypes(kind):
    """The GPU configuration (bf16 weights) runs through the same code: hidden states stay bf16,
    the CE is fp32, sums float64; an empty batch (nothing masked) gives zeros. Checked on CPU
    (CPU kernels exist for bf16); on a GPU only the device differs."""
    from kdcl_dist.curriculum.scoring import Batch, Scorer
    from kdcl_dist.kd.models import encode_masked, mlm_parts

    model = _random_mlm(kind, 2).to(torch.bfloat16)
    ids = torch.randint(5, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    att = torch.ones(3, 20, dtype=torch.long)
    att[2, 12:] = 0
    rows, cols = torch.tensor([0, 0, 1, 2]), torch.tensor([3, 7, 1, 11])
    with torch.inference_mode():
        got = encode_masked(model, ids, att, rows, cols)
        want = mlm_parts(model)[0](input_ids=ids, attention_mask=att).last_hidden_state[rows, cols]
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=0.05)
    sc = Scorer(model, torch.device("cpu"))
    sums, counts = sc.losses(
        Batch(ids, att, rows, cols, torch.tensor([5, 6, 7, 8]), np.arange(3), 52)
    )
    assert (
        sums.dtype == torch.float64 and counts.tolist() == [2, 1, 1] and torch.isfinite(sums).all()
    )
    sums, counts = sc.losses(
        Batch(ids, att, rows[:0], cols[:0], torch.zeros(0, dtype=torch.long), np.arange(3), 52)
    )
    assert sums.tolist() == [0.0, 0.0, 0.0] and counts.tolist() == [0, 0, 0]


def test_masked_only_scores_equal_previous_computation(tiny_assets):
    """The last-layer-at-masked-positions path gives the scores of the whole-encoder path (< 1e-5)."""
    from kdcl_dist.curriculum.scoring import Scorer, read_shard, score_arrays
    from kdcl_dist.data.masking import MaskSpec
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.kd.models import load_mlm

    for which in ("student", "teacher"):
        tok = load_tokenizer(str(tiny_assets[which]))
        model = load_mlm(str(tiny_assets[which])).eval()
        spec = MaskSpec.from_tokenizer(tok)
        sids, toks = read_shard(ShardSet(tiny_assets["shards"]), 1, verify=True)
        cfg = _cfg(token_budget=2000)
        new = Scorer(model, torch.device("cpu"))
        old = Scorer(model, torch.device("cpu"), masked_only=False)
        assert new.masked_only and not old.masked_only
        a = score_arrays(new, sids, toks, cfg, spec, tok.pad_token_id)
        b = score_arrays(old, sids, toks, cfg, spec, tok.pad_token_id)
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
        assert np.max(np.abs(a[0] - b[0])) < 1e-5, np.max(np.abs(a[0] - b[0]))
        assert np.std(a[0]) > 1e-3


# ---- host side: vectorised masking and collation, worker processes ------------------------------


def _shard0(tiny_assets):
    from kdcl_dist.curriculum.scoring import read_shard
    from kdcl_dist.data.masking import MaskSpec
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_assets["student"]))
    sids, toks = read_shard(ShardSet(tiny_assets["shards"]), 0, verify=True)
    return tok, MaskSpec.from_tokenizer(tok), list(sids), list(toks)


@pytest.mark.parametrize("fast", [True, False])
def test_mask_many_equals_mask_sample(tiny_assets, monkeypatch, fast):
    """The batched masks are mask_sample's, row by row (the per-sample contract), for both the
    replicated RNG seeding and numpy's own objects; incl. empty and all-special samples."""
    from kdcl_dist.data import masking
    from kdcl_dist.data.masking import mask_many, mask_sample

    tok, spec, sids, toks = _shard0(tiny_assets)
    assert masking._fast_seeding_ok()  # the replicated seeding matches this numpy
    monkeypatch.setattr(masking, "_FAST_SEEDING", fast)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    sids += ["empty", "specials", "one"]
    toks += [
        np.zeros(0, np.uint16),
        np.array([cls, sep], np.uint16),
        np.array([cls, 50, sep], np.int32),
    ]
    for K, purpose, seed in ((2, "score", 1234), (3, "train", 2**40 + 7)):
        m = mask_many(toks, sids, K, purpose, seed, spec)
        n_masked = 0
        for i, (sid, t) in enumerate(zip(sids, toks)):
            for k in range(K):
                want = mask_sample(t, sid, k, purpose, seed, spec)
                got = m.row(i * K + k)
                for w, g in zip(want, got):
                    assert w.dtype == g.dtype and np.array_equal(w, g), (sid, k)
                n_masked += int((want[1] >= 0).sum())
        assert n_masked > 100  # the comparison covers real masks


def _reference_batches(sids, toks, cfg, spec, pad_id):
    """The row-by-row construction (mask_sample per row, one row at a time into the batch)."""
    from kdcl_dist.curriculum.scoring import mask_rows, plan_batches

    rows = mask_rows(sids, toks, cfg.masks, cfg.seed, spec)
    lengths = np.array([len(r[1]) for r in rows])
    for members in plan_batches(lengths, cfg.token_budget, cfg.window):
        L = max(len(rows[r][1]) for r in members)
        inp = np.full((len(members), L), pad_id, dtype=np.int64)
        att = np.zeros_like(inp)
        rr, cc, tt = [], [], []
        for b, r in enumerate(members):
            i, x, pos = rows[r]
            inp[b, : len(x)], att[b, : len(x)] = x, 1
            rr += [b] * len(pos)
            cc += pos.tolist()
            tt += np.asarray(toks[i], dtype=np.int64)[pos].tolist()
        yield inp, att, rr, cc, tt, [rows[r][0] for r in members]


@pytest.mark.parametrize("budget,window", [(300, 7), (4096, 8192)])
def test_vectorised_batches_equal_row_by_row(tiny_assets, budget, window):
    from kdcl_dist.curriculum.scoring import batches_for_shard

    tok, spec, sids, toks = _shard0(tiny_assets)
    cfg = _cfg(masks=3, seed=5, token_budget=budget, window=window)
    got = list(batches_for_shard(sids, toks, cfg, spec, tok.pad_token_id))
    want = list(_reference_batches(sids, toks, cfg, spec, tok.pad_token_id))
    assert len(got) == len(want) > 1
    for b, (inp, att, rr, cc, tt, sample) in zip(got, want):
        assert b.input_ids.dtype == torch.int64 and b.rows.dtype == torch.int64
        assert np.array_equal(b.input_ids.numpy(), inp) and np.array_equal(
            b.attention_mask.numpy(), att
        )
        assert b.rows.tolist() == rr and b.cols.tolist() == cc and b.targets.tolist() == tt
        assert b.sample.tolist() == sample and b.n_tokens == int(att.sum())


def _same_arrays(got, want):
    assert len(got) == len(want) > 1
    for g, w in zip(got, want):
        assert len(g) == len(w) == 7 and g[6] == w[6]
        for x, y in zip(g[:6], w[:6]):
            assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize(
    "K,window,budget", [(2, 7, 300), (3, 7, 300), (2, 1000, 700), (3, 1000, 700), (2, 10**6, 900)]
)
def test_chunked_batches_equal_the_shards(tiny_assets, K, window, budget):
    """Preparing a shard a chunk at a time (masks only of each chunk's samples), and in parts of
    whole windows (the worker items, here tiny), gives exactly the whole-shard batches, in order
    (window 7 with K 2 and 3: parts are lcm(7, K)/K-sample multiples; a window larger than the shard)."""
    import dataclasses

    from kdcl_dist.curriculum import scoring
    from kdcl_dist.data.reader import ShardSet

    tok, spec, sids, toks = _shard0(tiny_assets)
    cfg = _cfg(masks=K, seed=5, token_budget=budget, window=window, verify=True)
    want = scoring.shard_batch_arrays(sids, toks, cfg, spec, tok.pad_token_id)
    for chunk_tokens in (1, 2000, scoring.CHUNK_TOKENS):
        chunks = list(
            scoring.chunked_batch_arrays(
                sids, toks, cfg, spec, tok.pad_token_id, chunk_tokens=chunk_tokens
            )
        )
        assert chunk_tokens > 1000 or len(chunks) == len(want)  # one batch per chunk
        _same_arrays([a for c in chunks for a in c], want)
    ss = ShardSet(tiny_assets["shards"])
    unit = scoring.part_samples(window, K, 1)
    assert unit == (
        7 if window == 7 else 500 if K == 2 and window == 1000 else 1000 if K == 3 else 500000
    )
    size = scoring.part_samples(window, K, 20)  # several parts per shard where windows allow
    for workers, prefetch in ((0, True), (0, False), (2, False)):
        prep = scoring.ShardPrep(ss, [0, 1], cfg, spec, tok.pad_token_id, part_size=size)
        shards = list(scoring.prepared_shards(prep, workers, prefetch))  # shard 0 not consumed
        assert len(shards) == 2
        prep = scoring.ShardPrep(ss, [1, 0], cfg, spec, tok.pad_token_id, part_size=size)
        for i, got in zip([1, 0], scoring.prepared_shards(prep, workers, prefetch)):
            ids, tk = scoring.read_shard(ss, i)
            arrs = list(got.batches)
            assert got.sample_ids == ids and got.n == len(ids)
            assert got.ntok.tolist() == [len(t) for t in tk]
            _same_arrays(arrs, scoring.shard_batch_arrays(ids, tk, cfg, spec, tok.pad_token_id))
    if window == 7:
        assert len(prep.parts) > 2  # the worker path took several parts of a shard
    with pytest.raises(ValueError):
        scoring.ShardPrep(ss, [0], dataclasses.replace(cfg, window=7), spec, 0, part_size=5)


def test_compact_batches_give_identical_scores(tiny_assets):
    """The GPU path's compact batches (int32, lengths, mask built by the Scorer) score the same
    as the int64 batches, bitwise (checked on CPU)."""
    from kdcl_dist.curriculum.scoring import Scorer, score_arrays, shard_batch_arrays, to_batch
    from kdcl_dist.kd.models import load_mlm

    tok, spec, sids, toks = _shard0(tiny_assets)
    cfg = _cfg(token_budget=1000)
    sc = Scorer(load_mlm(str(tiny_assets["student"])), torch.device("cpu"))
    arrs = shard_batch_arrays(sids, toks, cfg, spec, tok.pad_token_id)
    assert to_batch(arrs[0], compact=True).attention_mask is None
    a = score_arrays(
        sc, sids, toks, cfg, spec, tok.pad_token_id, batches=[to_batch(x) for x in arrs]
    )
    b = score_arrays(
        sc,
        sids,
        toks,
        cfg,
        spec,
        tok.pad_token_id,
        batches=[to_batch(x, compact=True) for x in arrs],
    )
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert np.std(a[0]) > 1e-3


def test_workers_give_identical_scores(tiny_assets, tmp_path, monkeypatch):
    """workers=0 (helper thread), workers=0 without prefetch, workers=2 (processes) and workers=2
    with the GPU path's deferred score-file writes: the same score arrays, bitwise on CPU."""
    from kdcl_dist.curriculum import scoring
    from kdcl_dist.curriculum.scoring import load_scores, score_shards

    got = []
    for name, kw in (
        ("w0", {"workers": 0}),
        ("inline", {"workers": 0, "prefetch": False}),
        ("w2", {"workers": 2}),
        ("w2-defer", {"workers": 2}),
    ):
        monkeypatch.setattr(scoring, "_defer_writes", lambda _dev, _d=name.endswith("defer"): _d)
        out = tmp_path / name
        score_shards(
            tiny_assets["shards"],
            tiny_assets["student"],
            out,
            _cfg(token_budget=1000, **kw),
            device=torch.device("cpu"),
        )
        got.append(load_scores(out)[1])
    assert len(got[0]) == 4  # every shard of the fixture
    for other in got[1:]:
        for a, b in zip(got[0], other):
            for k in ("ids", "score", "masked", "tokens"):
                assert np.array_equal(a[k], b[k]), k


def test_effective_workers(monkeypatch):
    from kdcl_dist.curriculum.scoring import ScoreConfig, effective_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert effective_workers(ScoreConfig(), cpu, 100) == 0  # auto on CPU: the model needs the cores
    assert effective_workers(ScoreConfig(workers=3), cpu, 100) == 3
    assert effective_workers(ScoreConfig(workers=3), cpu, 2) == 2  # never more than the shards
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert effective_workers(ScoreConfig(), gpu, 100) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks share the node's 16 CPUs
    assert effective_workers(ScoreConfig(), gpu, 100) == 3


def test_bench_score_prints_the_three_ratios(tmp_path, capsys):
    """`kdcl-dist bench score`, small: (a) and (b) side by side, the FLOP ceilings, the GFLOP/s line."""
    import argparse
    import re

    from kdcl_dist.bench import score as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(
        [
            "--docs",
            "40",
            "--naive-docs",
            "4",
            "--no-distilbert",
            "--no-ranks",
            "--repeats",
            "1",
            "--host-workers",
            "0",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    row = re.search(
        r"^tiny preset student\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)x", out, re.M
    )
    assert row, out
    pipe, tight, a, naive, b = (float(x.replace(",", "")) for x in row.groups())
    assert pipe > 0 and tight > 0 and naive > 0
    assert a == pytest.approx(pipe / tight, rel=0.01) and b == pytest.approx(pipe / naive, rel=0.01)
    ceil = bench.flops_per_token(bench._tiny_spec(), 4000, 229, 0.15)
    assert (
        2.4 < ceil["ceiling_last_layer"] < 2.8
    )  # the 2.59x quoted in the README (mean length 229)
    assert "pipeline" in out and "GFLOP/s" in out and "load average" in out
