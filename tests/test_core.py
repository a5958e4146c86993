"""Foundation pieces: shard writer/reader round trip, masking purity, config validation."""

import numpy as np
import pytest

from kdcl_dist.config import build, option, parse_overrides
from kdcl_dist.data.masking import IGNORE_INDEX, MaskSpec, mask_sample
from kdcl_dist.data.reader import ShardSet
from kdcl_dist.errors import UserError


def test_shards_round_trip_sequential_and_random(tiny_assets):
    from kdcl_dist.data.tokenizer import load_tokenizer
    from tests.conftest import corpus_docs

    tok = load_tokenizer(str(tiny_assets["tokenizer"]))
    docs = corpus_docs(400)
    s = ShardSet(tiny_assets["shards"])
    assert len(s) == len(docs) and s.num_shards == 4
    seq = list(s)
    assert [x.meta["id"] for x in seq] == [d for d, _ in docs]
    for p in range(0, len(s), 37):
        r = s.get(p)
        expect = tok(docs[p][1], truncation=True, max_length=128)["input_ids"]
        assert r.ids.tolist() == expect == seq[p].ids.tolist()


def test_masks_are_pure_and_follow_bert_rule():
    spec = MaskSpec(mask_token_id=4, vocab_size=1000, special_ids=frozenset({0, 1, 2, 3, 4}))
    ids = np.array([2] + list(range(10, 210)) + [3])
    a = mask_sample(ids, "doc-1", 0, "score", 7, spec)
    b = mask_sample(ids, "doc-1", 0, "score", 7, spec)
    assert all((x == y).all() for x, y in zip(a, b))
    c = mask_sample(ids, "doc-1", 1, "score", 7, spec)
    assert not (a[1] == c[1]).all()
    inputs, labels = a
    masked = labels != IGNORE_INDEX
    assert masked.sum() == 30  # 15% of 200 candidates
    assert not masked[0] and not masked[-1]  # specials never masked
    assert (labels[masked] == ids[masked]).all()
    assert (inputs[~masked] == ids[~masked]).all()
    # across many draws, ~80% of masked positions become [MASK]
    share = np.mean(
        [(mask_sample(ids, "d", k, "train", 0, spec)[0] == 4).sum() / 30 for k in range(200)]
    )
    assert 0.75 < share < 0.85


def test_config_validation_names_key_value_and_allowed():
    from dataclasses import dataclass

    @dataclass
    class C:
        order: str = option("sequential", choices=["sequential", "random"])
        lr: float = option(1e-4, min=0)
        steps: int = option(10, min=1)

    assert build(C, {"order": "random", "lr": "3e-4", "steps": "5"}).lr == 3e-4
    with pytest.raises(UserError, match=r"train.order: 'sorted' is not one of sequential, random"):
        build(C, {"order": "sorted"}, prefix="train")
    with pytest.raises(UserError, match=r"train.steps: 0 is below the minimum 1"):
        build(C, {"steps": 0}, prefix="train")
    with pytest.raises(UserError, match=r"train.bogus: unknown key"):
        build(C, {"bogus": 1}, prefix="train")
    assert parse_overrides(["train.lr=1e-3", "steps=3", "score.masks=2"], "train") == {
        "lr": "1e-3",
        "steps": 3,
    }
