"""Global order (pure), rank-aware sampler, masked dataset through DataLoader workers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcl_dist.curriculum.order import (
    ORDERS,
    OrderSpec,
    epoch_of,
    global_batch_positions,
    pool_fraction,
    pool_size,
    steps_for_epochs,
)
from kdcl_dist.curriculum.sampler import CurriculumDataset, CurriculumSampler, collate
from kdcl_dist.errors import UserError


def test_sequential_four_ranks_contiguous_and_epochs():
    n, B, W, m = 103, 16, 4, 2
    spec = OrderSpec("sequential")
    samplers = [CurriculumSampler(n, B, m, W, r, spec) for r in range(W)]
    assert samplers[0].grad_accum == 2 and samplers[0].steps_per_epoch == 6
    for step in range(2 * 7):
        parts = [np.concatenate(s.rank_micro_batches(step)) for s in samplers]
        glob = np.concatenate(parts)
        # the stream: epochs laid end to end, batch t = stream items [tB, (t+1)B)
        np.testing.assert_array_equal(glob, np.arange(step * B, (step + 1) * B) % n)
        np.testing.assert_array_equal(glob, samplers[0].global_positions(step))
        assert all(len(mb) == m for s in samplers for mb in s.rank_micro_batches(step))
        # rank r holds the r-th contiguous quarter
        np.testing.assert_array_equal(parts[1], np.arange(step * B + 4, step * B + 8) % n)
    # 103 = 6 x 16 + 7: batch 6 ends epoch 0 (its hardest 7) and starts epoch 1 (its easiest 9)
    keys = np.concatenate([k for s in samplers for k in s.rank_micro_batch_keys(6)])
    np.testing.assert_array_equal(keys, np.r_[96:103, n + np.arange(9)])
    assert (
        epoch_of(spec, n, B, 6) == 0
        and epoch_of(spec, n, B, 7) == 1
        and epoch_of(spec, n, B, 13) == 2
    )


@pytest.mark.parametrize("mode", ["sequential", "reverse", "random"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_trained_once_per_epoch(mode, world):
    """No sample is left out: over the stream, epoch e's items are each position exactly once."""
    n, B = 101, 8
    spec = OrderSpec(mode, seed=5)
    samplers = [
        CurriculumSampler(n, B, B // world // 2 if world < 4 else 2, world, r, spec)
        for r in range(world)
    ]
    epochs = 3
    steps = steps_for_epochs(n, B, epochs)
    seen = {}
    for step in range(steps):
        for s in samplers:
            for mb in s.rank_micro_batch_keys(step):
                for key in mb.tolist():
                    e, pos = divmod(key, n)
                    seen.setdefault(e, []).append(pos)
    for e in range(epochs):
        assert sorted(seen[e]) == list(range(n)), f"epoch {e}"
    # the steps of E epochs reach just into epoch E: ceil(3 * 101 / 8) * 8 - 303 = 1 item
    assert len(seen.get(epochs, [])) == steps * B - epochs * n


@pytest.mark.parametrize("world", [1, 2, 4])
def test_pacing_distinct_samples_rule(world):
    """Pacing draws every batch from the pool (with repeats across steps): the documented rule is
    that the ranks together train exactly the drawn positions, and the distinct count reported
    (distinct_samples) is their union, the same at every world size."""
    from kdcl_dist.curriculum.order import distinct_positions_seen

    n, B = 500, 16
    spec = OrderSpec("pacing-root", seed=3, pacing_f0=0.2)
    steps = n // B
    samplers = [CurriculumSampler(n, B, 2, world, r, spec) for r in range(world)]
    trained = [
        p
        for t in range(steps)
        for s in samplers
        for mb in s.rank_micro_batches(t)
        for p in mb.tolist()
    ]
    drawn = np.concatenate([global_batch_positions(spec, n, B, t) for t in range(steps)])
    assert trained == drawn.tolist()
    seen = distinct_positions_seen(spec, n, B, steps)
    assert seen.sum() == len(set(trained)) < n  # some samples are never drawn in epoch 0
    for k in (0, 1, 7):  # the training loop's incremental count equals the rebuilt one at any step
        assert distinct_positions_seen(spec, n, B, k).sum() == len(set(drawn[: k * B].tolist()))


def test_reverse_and_random():
    n, B = 50, 10
    rev = np.concatenate([global_batch_positions(OrderSpec("reverse"), n, B, t) for t in range(5)])
    np.testing.assert_array_equal(rev, np.arange(49, -1, -1))
    spec = OrderSpec("random", seed=3)
    e0 = np.concatenate([global_batch_positions(spec, n, B, t) for t in range(5)])
    e1 = np.concatenate([global_batch_positions(spec, n, B, t) for t in range(5, 10)])
    assert sorted(e0.tolist()) == list(range(n)) and sorted(e1.tolist()) == list(range(n))
    assert not np.array_equal(e0, e1)
    again = np.concatenate(
        [global_batch_positions(OrderSpec("random", seed=3), n, B, t) for t in range(5)]
    )
    np.testing.assert_array_equal(e0, again)
    other = np.concatenate(
        [global_batch_positions(OrderSpec("random", seed=4), n, B, t) for t in range(5)]
    )
    assert not np.array_equal(e0, other)


@pytest.mark.parametrize("mode", ["pacing-linear", "pacing-root", "pacing-exp"])
def test_pacing_pool(mode):
    f0, T, n, B = 0.2, 10, 1000, 32
    spec = OrderSpec(mode, seed=7, pacing_f0=f0, pacing_steps=T)
    ref = {
        "pacing-linear": lambda x: f0 + (1 - f0) * x,
        "pacing-root": lambda x: f0 + (1 - f0) * math.sqrt(x),
        "pacing-exp": lambda x: f0 * (1 / f0) ** x,
    }[mode]
    prev = 0
    for t in range(15):
        f = pool_fraction(spec, t)
        assert f == pytest.approx(min(1.0, ref(min(t / T, 1.0))))
        k = pool_size(spec, n, B, t)
        assert k == min(n, math.ceil(f * n - 1e-9)) and k >= prev
        prev = k
        pos = global_batch_positions(spec, n, B, t)
        assert pos.dtype == np.int64 and len(pos) == B and len(set(pos.tolist())) == B
        assert pos.min() >= 0 and pos.max() < k
        np.testing.assert_array_equal(
            pos, global_batch_positions(OrderSpec(mode, 7, f0, T), n, B, t)
        )
    assert pool_fraction(spec, T) == 1.0
    # uniform inside the pool: late steps reach the hardest samples
    late = np.concatenate([global_batch_positions(spec, n, B, t) for t in range(10, 40)])
    assert late.max() > 0.9 * n


def test_pacing_default_steps_and_bad_specs():
    spec = OrderSpec("pacing-linear", pacing_f0=0.5)
    # default T = one epoch (n // B steps)
    assert pool_size(spec, 100, 10, 5) == 75
    assert pool_fraction(OrderSpec("sequential"), 3) == 1.0
    with pytest.raises(UserError, match="train.order"):
        OrderSpec("easy-first")
    with pytest.raises(UserError, match="pacing_f0"):
        OrderSpec("pacing-exp", pacing_f0=0.0)
    with pytest.raises(UserError, match="exceeds"):
        global_batch_positions(OrderSpec("sequential"), 5, 8, 0)
    assert set(ORDERS) >= {"sequential", "reverse", "random"}


def test_sampler_divisibility_error_names_numbers():
    with pytest.raises(
        UserError, match=r"train.global_batch: 30 .* micro_batch 4 x world size 2 = 8"
    ):
        CurriculumSampler(100, 30, 4, 2, 0, OrderSpec("sequential"))


def test_state_dict_roundtrip_and_refusals():
    spec = OrderSpec("random", seed=1)
    s = CurriculumSampler(100, 8, 2, 2, 1, spec)
    s.consumed_samples = 24
    sd = s.state_dict()
    assert set(sd) == {
        "consumed_samples",
        "n_samples",
        "global_batch",
        "mode",
        "seed",
        "pacing_f0",
        "pacing_steps",
    }
    t = CurriculumSampler(100, 8, 4, 1, 0, OrderSpec("random", seed=1))  # other world size: fine
    t.load_state_dict(sd)
    assert t.consumed_samples == 24 and t.step == 3
    for kw, bad in [
        ({"n_samples": 101}, "n_samples"),
        ({"seed": 2}, "seed"),
        ({"mode": "sequential"}, "mode"),
        ({"global_batch": 16}, "global_batch"),
    ]:
        with pytest.raises(UserError, match=bad):
            t.load_state_dict({**sd, **kw})
    p = CurriculumSampler(100, 8, 4, 1, 0, OrderSpec("pacing-root", pacing_steps=5))
    with pytest.raises(UserError, match="pacing_steps"):
        p.load_state_dict({**p.state_dict(), "pacing_steps": 6})


def test_world_size_change_keeps_prefix():
    """2 ranks for 3 steps, then 1 rank, then 4 ranks: consumed = exact prefix of the order."""
    n, B = 96, 8
    spec = OrderSpec("random", seed=5)
    seen = []
    consumed = 0
    for world, steps in [(2, 3), (1, 4), (4, 2)]:
        ss = [CurriculumSampler(n, B, 2 if world < 4 else 1, world, r, spec) for r in range(world)]
        for s in ss:
            s.load_state_dict({**s.state_dict(), "consumed_samples": consumed})
        for _ in range(steps):
            step = ss[0].step
            for s in ss:
                for mb in s.rank_micro_batches(step):
                    seen.extend(mb.tolist())
            consumed += B
            for s in ss:
                s.consumed_samples = consumed
    order = np.concatenate([global_batch_positions(spec, n, B, t) for t in range(9)])
    assert seen == order.tolist()
    assert len(set(seen)) == len(seen)


@pytest.fixture(scope="module")
def curriculum(tiny_assets, tmp_path_factory):
    from tests._curriculum_fixture import build_curriculum

    out = tmp_path_factory.mktemp("cur")
    build_curriculum(tiny_assets["shards"], out)
    return out


def test_dataset_through_workers(curriculum, tiny_assets):
    from kdcl_dist.data.masking import MaskSpec, mask_sample
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_assets["tokenizer"]))
    shards = ShardSet(curriculum, "curriculum.json")
    n = len(shards)
    spec = OrderSpec("sequential", seed=0)
    sampler = CurriculumSampler(n, 16, 4, 2, 1, spec)
    ds = CurriculumDataset(shards, tok, seed=11, spec=spec)
    steps = [0, sampler.steps_per_epoch]  # epoch 0 and epoch 1 of the same batch

    batches = [mb.tolist() for st in steps for mb in sampler.rank_micro_batch_keys(st)]
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=batches, num_workers=2, collate_fn=lambda b: collate(b, tok.pad_token_id)
    )
    got = list(loader)
    assert len(got) == 2 * sampler.grad_accum
    mspec = MaskSpec.from_tokenizer(tok)
    expect_pos = [mb for st in steps for mb in sampler.rank_micro_batches(st)]
    for mb, pos in zip(got, expect_pos):
        np.testing.assert_array_equal(mb["positions"].numpy(), pos)
        for i, p in enumerate(pos.tolist()):
            s = shards.get(p)
            epoch = int(mb["epochs"][i])
            ids, labels = mask_sample(
                s.ids, s.meta["id"], draw=epoch, purpose="train", seed=11, spec=mspec
            )
            k = len(ids)
            assert torch.equal(mb["input_ids"][i, :k], torch.as_tensor(ids))
            assert torch.equal(mb["labels"][i, :k], torch.as_tensor(labels))
            assert int(mb["attention_mask"][i].sum()) == k
            assert (mb["labels"][i, k:] == -100).all() and (
                mb["input_ids"][i, k:] == tok.pad_token_id
            ).all()
            assert mb["scores"][i].item() == pytest.approx(s.meta["score"])
    # same samples, another epoch: a fresh mask draw
    assert [int(e) for e in got[0]["epochs"]] == [0] * 4 and [int(e) for e in got[2]["epochs"]] == [
        1
    ] * 4
    np.testing.assert_array_equal(got[0]["positions"], got[2]["positions"])
    assert not torch.equal(got[0]["labels"], got[2]["labels"])
    # scores ascend along the curriculum order
    assert float(got[0]["scores"].max()) <= float(got[1]["scores"].min())


# ---- length-grouped batching (docs/training.md "Unpadded batches") ---------------------------


def _computed(mbs, lengths):
    return sum(len(mb) * int(lengths[mb].max()) for mb in mbs)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("mode", ["sequential", "random", "pacing-root"])
def test_length_grouped_keeps_each_global_batch(world, mode):
    """Same samples per global batch as `padded` at any world size; only the split changes:
    micro-batches of similar length, fewer computed (padded) tokens, a pure function of t."""
    n, B, m = 203, 32, 2 if world == 4 else 4
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 513, size=n)
    spec = OrderSpec(mode, seed=5, pacing_f0=0.3)
    pad = [CurriculumSampler(n, B, m, world, r, spec) for r in range(world)]
    grp = [
        CurriculumSampler(n, B, m, world, r, spec, batching="length-grouped", lengths=lengths)
        for r in range(world)
    ]
    real = computed_pad = computed_grp = 0
    for t in range(10):
        mbs = [mb for s in grp for mb in s.rank_micro_batches(t)]
        assert all(len(mb) == m for mb in mbs) and len(mbs) == B // m
        flat = np.concatenate(mbs)
        np.testing.assert_array_equal(np.sort(flat), np.sort(grp[0].global_positions(t)))
        np.testing.assert_array_equal(np.sort(flat), np.sort(pad[0].global_positions(t)))
        # keys decode to the same items, and the split is pure (a fresh sampler agrees)
        keys = [k for s in grp for k in s.rank_micro_batch_keys(t)]
        assert [(k % n).tolist() for k in keys] == [mb.tolist() for mb in mbs]
        again = CurriculumSampler(
            n, B, m, world, world - 1, spec, batching="length-grouped", lengths=lengths
        )
        assert [x.tolist() for x in again.rank_micro_batches(t)] == [
            x.tolist() for x in grp[-1].rank_micro_batches(t)
        ]
        # micro-step g of every rank holds the g-th band of lengths (ranks wait on each other)
        for g in range(grp[0].grad_accum - 1):
            here = max(int(lengths[s.rank_micro_batches(t)[g]].max()) for s in grp)
            nxt = min(int(lengths[s.rank_micro_batches(t)[g + 1]].min()) for s in grp)
            assert here <= nxt
        real += int(lengths[flat].sum())
        computed_pad += _computed([mb for s in pad for mb in s.rank_micro_batches(t)], lengths)
        computed_grp += _computed(mbs, lengths)
    assert real / computed_grp > real / computed_pad + 0.15
    assert real / computed_grp > 0.85


def test_length_grouped_needs_lengths_and_a_known_mode():
    spec = OrderSpec("sequential")
    with pytest.raises(ValueError, match="token length"):
        CurriculumSampler(10, 4, 2, 1, 0, spec, batching="length-grouped")
    with pytest.raises(UserError, match="train.batching"):
        CurriculumSampler(10, 4, 2, 1, 0, spec, batching="packed")


def test_token_lengths_from_the_offset_index(curriculum):
    from kdcl_dist.data.reader import ShardSet

    shards = ShardSet(curriculum, "curriculum.json")
    got = shards.token_lengths()
    want = [len(shards.get(p, with_meta=False).ids) for p in range(len(shards))]
    assert got.tolist() == want and len(set(want)) > 2
