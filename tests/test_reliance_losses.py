"""Reliance schedules against their formulas; KD losses against direct reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcl_dist.errors import UserError
from kdcl_dist.kd import losses
from kdcl_dist.kd.reliance import SCHEDULES, Reliance, RelianceSpec, quantile_from_stats

SCORES = np.sort(np.random.default_rng(0).gamma(4.0, 0.7, size=2000))
STATS = {
    "min": float(SCORES.min()),
    "max": float(SCORES.max()),
    "mean": float(SCORES.mean()),
    "quantiles": {
        f"{q:.2f}": float(np.quantile(SCORES, q)) for q in np.round(np.arange(0, 1.0001, 0.05), 2)
    },
}


def test_none_and_constant():
    assert Reliance(RelianceSpec("none"), STATS).batch_lambda(SCORES[:8]) == 0.0
    assert Reliance(RelianceSpec("constant", lambda_=0.3), STATS).batch_lambda(SCORES[-8:]) == 0.3
    assert set(SCHEDULES) == {"none", "constant", "sr-paper", "sr-minmax", "sr-sample", "sr-rank"}


def test_sr_paper_formula():
    first = SCORES[:16]
    r = Reliance(RelianceSpec("sr-paper"), STATS, first)
    cmax = math.exp(-STATS["min"])
    s = (1 - np.mean(np.exp(-first))) / cmax
    assert r.batch_lambda(first) == 0.0  # the first batch of the run has λ = 0
    lams = []
    for t in range(0, 2000, 16):
        b = SCORES[t : t + 16]
        want = float(np.clip((1 - np.mean(np.exp(-b))) / cmax - s, 0, 1))
        got = r.batch_lambda(b)
        assert isinstance(got, float) and got == pytest.approx(want, abs=1e-12)
        lams.append(got)
    assert lams[-1] > lams[1] > 0  # harder batches rely more on the teacher
    with pytest.raises(ValueError):
        Reliance(RelianceSpec("sr-paper"), STATS, None).batch_lambda(first)
    # the state restores the shift without the first batch
    r2 = Reliance(RelianceSpec("sr-paper"), STATS, None)
    r2.load_state_dict(r.state_dict())
    assert r2.batch_lambda(SCORES[500:516]) == r.batch_lambda(SCORES[500:516])


def test_sr_minmax_and_sample():
    lo, hi = STATS["quantiles"]["0.05"], STATS["quantiles"]["0.95"]
    rm = Reliance(RelianceSpec("sr-minmax", lambda_max=0.8), STATS)
    rs = Reliance(RelianceSpec("sr-sample", lambda_max=0.8), STATS)
    for t in (0, 640, 1984):
        b = SCORES[t : t + 16]
        assert rm.batch_lambda(b) == pytest.approx(0.8 * np.clip((b.mean() - lo) / (hi - lo), 0, 1))
        per = rs.batch_lambda(b)
        assert per.shape == (16,)
        np.testing.assert_allclose(per, 0.8 * np.clip((b - lo) / (hi - lo), 0, 1))
    assert rm.batch_lambda(SCORES[:16]) == 0.0 and rm.batch_lambda(SCORES[-16:]) == pytest.approx(
        0.8
    )
    # a quantile between table entries is interpolated
    assert quantile_from_stats(STATS, 0.075) == pytest.approx(
        (STATS["quantiles"]["0.05"] + STATS["quantiles"]["0.10"]) / 2
    )


def test_bad_specs():
    with pytest.raises(UserError, match="train.reliance"):
        RelianceSpec("sometimes")
    with pytest.raises(UserError, match="q_low"):
        RelianceSpec("sr-minmax", q_low=0.9, q_high=0.1)
    with pytest.raises(UserError, match="quantiles"):
        Reliance(RelianceSpec("sr-minmax"), {"min": 1.0, "max": 2.0})


def _rand(M=37, V=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(M, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(M, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (M,), generator=g)
    return s, t, y


@pytest.mark.parametrize("per_token", [False, True])
def test_masked_kd_losses_reference(per_token):
    s, t, y = _rand()
    tau, N = 2.0, 100.0
    lam = torch.rand(len(y), generator=torch.Generator().manual_seed(1)) if per_token else 0.3
    s32 = s.float().requires_grad_(True)
    out = losses.masked_kd_losses(s32, t.float(), y, lam, tau, N)
    # reference in float64, written out element by element
    ps = torch.softmax(s / tau, -1)
    pt = torch.softmax(t / tau, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1)
    ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).squeeze(1)
    lam_t = torch.as_tensor(lam, dtype=torch.float64).expand_as(ce)
    ref_loss = ((1 - lam_t) * ce + lam_t * tau**2 * kl).sum() / N
    assert float(out["loss"].detach()) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(out["mlm"]) == pytest.approx(float(ce.sum() / N), rel=1e-5)
    assert float(out["kd"]) == pytest.approx(float(tau**2 * kl.sum() / N), rel=1e-5)
    out["loss"].backward()
    # gradient w.r.t. the student logits, vs autograd of the float64 reference
    s64 = s.clone().requires_grad_(True)
    ce64 = F.cross_entropy(s64, y, reduction="none")
    kl64 = (pt * (pt.log() - torch.log_softmax(s64 / tau, -1))).sum(-1)
    (((1 - lam_t) * ce64 + lam_t * tau**2 * kl64).sum() / N).backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_ignored_rows_and_split_over_ranks():
    s, t, y = _rand(M=40)
    y2 = y.clone()
    y2[::5] = -100
    whole = losses.masked_kd_losses(s, t, y2, 0.4, 1.5, 32)
    # rows with -100 contribute nothing
    keep = y2 != -100
    ref = losses.masked_kd_losses(s[keep], t[keep], y2[keep], 0.4, 1.5, 32)
    assert float(whole["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-6)
    # summing 3 "ranks'" losses normalised by the global count equals the whole batch's loss
    parts = [
        losses.masked_kd_losses(s[i::3], t[i::3], y2[i::3], 0.4, 1.5, 32)["loss"] for i in range(3)
    ]
    assert float(sum(parts)) == pytest.approx(float(whole["loss"]), rel=1e-6)


def test_loss_equals_hf_ce_plus_kl_full_batch():
    """On a full batch (N = local count), fp32: loss = (1-λ)·HF MLM loss + λ·τ²·KL(batchmean)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    student, teacher = BertForMaskedLM(cfg).eval(), BertForMaskedLM(cfg).eval()
    ids = torch.randint(5, 97, (3, 20))
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    with torch.no_grad():
        so = student(input_ids=ids, labels=labels)
        to = teacher(input_ids=ids)
    sel = labels != -100
    s_l, t_l, y = so.logits[sel], to.logits[sel], labels[sel]
    lam, tau = 0.35, 3.0
    out = losses.masked_kd_losses(s_l, t_l, y, lam, tau, int(sel.sum()))
    kl = F.kl_div(F.log_softmax(s_l / tau, -1), F.softmax(t_l / tau, -1), reduction="batchmean")
    assert float(out["mlm"]) == pytest.approx(float(so.loss), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(
        float((1 - lam) * so.loss + lam * tau**2 * kl), rel=1e-5
    )


def test_kd_all_positions_and_cosine_and_agreement():
    s, t, y = _rand(M=30)
    y2 = y.clone()
    y2[y2 % 3 != 0] = -100  # only some rows are masked tokens
    nm, nt, tau = 12.0, 50.0, 2.0
    lam = torch.linspace(0, 1, 30)
    out = losses.kd_all_positions(s, t, y2, lam, tau, nm, nt)
    pt, ps = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1)
    m = y2 != -100
    ce = torch.zeros(30, dtype=torch.float64)
    ce[m] = F.cross_entropy(s[m], y2[m], reduction="none")
    ref = ((1 - lam.double()) * ce).sum() / nm + (lam.double() * tau**2 * kl).sum() / nt
    assert float(out["loss"]) == pytest.approx(float(ref), rel=1e-5)
    assert float(out["kd"]) == pytest.approx(float(tau**2 * kl.sum() / nt), rel=1e-5)
    assert float(out["mlm"]) == pytest.approx(float(ce.sum() / nm), rel=1e-5)

    h1, h2 = torch.randn(10, 8), torch.randn(10, 8)
    mask = torch.arange(10) < 6
    want = (1 - F.cosine_similarity(h1[:6], h2[:6], dim=-1)).sum() / 6
    assert float(losses.hidden_cosine_loss(h1, h2, mask)) == pytest.approx(float(want), rel=1e-6)
    assert float(losses.hidden_cosine_loss(h1[:6], h2[:6], 12.0)) == pytest.approx(
        float(want) / 2, rel=1e-6
    )
    assert float(losses.hidden_cosine_loss(h1, h1)) == pytest.approx(0.0, abs=1e-6)

    a = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    b = torch.tensor([[2.0, 0, 0], [1, 0, 0], [0, 0, 3], [0, 5, 0]])
    assert losses.top1_agreement(a, b) == 0.5


def test_sr_rank_rises_with_the_curriculum_rank_and_trace_matches_batches():
    """sr-rank (a labelled variant): λ = λ_max · mean rank of the batch, so under the sequential
    order it rises linearly over the epoch; lambda_trace gives exactly the per-batch values."""
    from kdcl_dist.curriculum.order import OrderSpec, global_batch_positions
    from kdcl_dist.kd.reliance import Reliance, RelianceSpec, lambda_trace

    n, B = 1001, 10
    scores = np.sort(np.random.default_rng(0).gamma(2.0, 1.0, n))
    stats = {
        "min": float(scores.min()),
        "max": float(scores.max()),
        "quantiles": {f"{q:.2f}": float(np.quantile(scores, q)) for q in np.linspace(0, 1, 21)},
    }
    rel = Reliance(RelianceSpec("sr-rank", lambda_max=0.8), stats, scores[:B], n_samples=n)
    assert rel.batch_lambda(scores[:B], np.arange(B)) == pytest.approx(0.8 * 4.5 / 1000)
    assert rel.batch_lambda(scores[-B:], np.arange(n - B, n)) == pytest.approx(
        0.8 * (n - 5.5) / 1000
    )
    tr = lambda_trace(
        RelianceSpec("sr-rank", lambda_max=0.8), scores, stats, OrderSpec("sequential"), B, n // B
    )
    assert np.all(np.diff(tr) > 0) and tr.mean() == pytest.approx(0.4, abs=0.01)
    # the trace is what the training loop computes, batch by batch, for every schedule
    for sch in ("sr-paper", "sr-minmax", "sr-sample", "sr-rank", "constant"):
        spec = RelianceSpec(sch)
        for order in (
            OrderSpec("sequential"),
            OrderSpec("random", seed=3),
            OrderSpec("pacing-root", seed=1),
        ):
            tr = lambda_trace(spec, scores, stats, order, B, 30)
            first = scores[global_batch_positions(order, n, B, 0)]
            r = Reliance(spec, stats, first, n_samples=n)
            want = [
                np.mean(r.batch_lambda(scores[p], p))
                for p in (global_batch_positions(order, n, B, t) for t in range(30))
            ]
            np.testing.assert_allclose(tr, want)
    with pytest.raises(ValueError, match="positions"):
        rel.batch_lambda(scores[:B])
