"""Evaluation: statistics against known values, the yes/no harness, held-out MLM evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_cli

from kdcl_dist.evaluate import stats

# -- stats ---------------------------------------------------------------------------------


def test_mean_std_known_values():
    m, s = stats.mean_std([1, 2, 3, 4])
    assert m == 2.5
    assert s == pytest.approx(1.2909944487, abs=1e-9)
    assert stats.mean_std([7.0]) == (7.0, 0.0)


def test_bootstrap_ci_constant_and_binomial():
    assert stats.bootstrap_ci([3.0] * 20) == (3.0, 3.0)
    lo, hi = stats.bootstrap_ci([0, 1] * 100, n_boot=20000, seed=1)
    # normal approximation: 0.5 ± 1.96·sqrt(0.25/200) = 0.5 ± 0.0693
    assert lo == pytest.approx(0.5 - 0.0693, abs=0.01)
    assert hi == pytest.approx(0.5 + 0.0693, abs=0.01)


def test_ratio_bootstrap_weighted_and_pooled():
    num = np.array([[2.0, 6.0], [4.0, 8.0]])
    den = np.array([[1.0, 3.0], [1.0, 3.0]])
    r = stats.ratio_bootstrap(num, den, n_boot=2000)
    assert r["value"] == pytest.approx(20.0 / 8.0)
    assert r["ci"][0] <= r["value"] <= r["ci"][1]
    # all-correct matrix: the CI collapses on 1
    r = stats.ratio_bootstrap(np.ones((3, 50)), n_boot=500)
    assert r["value"] == 1.0 and r["ci"] == [1.0, 1.0]


def test_compare_ratio_detects_a_clear_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.random((3, 400)) < 0.6
    better = base | (rng.random((3, 400)) < 0.5)  # strictly more correct answers
    c = stats.compare_ratio(better.astype(float), base.astype(float), n_boot=4000)
    assert c["diff"] > 0.1 and c["ci"][0] > 0 and c["p"] < 0.01
    same = stats.compare_ratio(base.astype(float), base[::-1].astype(float), n_boot=4000)
    assert same["ci"][0] < 0 < same["ci"][1] and same["p"] > 0.05


def test_permutation_test_exact_values():
    # 3 vs 3, fully separated: 2 of C(6,3)=20 arrangements are as extreme -> p = 0.1
    assert stats.permutation_test([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    # paired, all differences +1: 2 of 2^3 sign patterns -> 0.25
    assert stats.permutation_test([2, 3, 4], [1, 2, 3], paired=True) == pytest.approx(0.25)
    assert stats.permutation_test([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)


def test_holm_known_values():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_macro_f1_and_majority_baseline():
    # label a: tp=2 fp=1 fn=0 -> 0.8 ; label b: tp=0 fp=0 fn=1 -> 0
    assert stats.macro_f1(["a", "a", "b"], ["a", "a", "a"]) == pytest.approx(0.4)
    b = stats.majority_baseline(["x", "y", "y"], ["y", "x", "y", "y"])
    assert b["label"] == "y" and b["accuracy"] == 0.75
    assert stats.majority_label(["b", "a"]) == "a"  # ties: first in sort order


# -- yes/no harness ------------------------------------------------------------------------


@pytest.mark.data
def test_bioasq_majority_baseline_is_67_1(data_dir):
    from kdcl_dist.evaluate.yesno import evaluate_yesno

    r = evaluate_yesno(None, data_dir / "bioasq")
    assert r["labels"] == ["no", "yes"]
    assert r["sizes"] == {"train": 670, "dev": 75, "test": 140}
    assert r["majority_baseline"]["label"] == "yes"
    assert round(100 * r["majority_baseline"]["accuracy"], 1) == 67.1
    assert r["test_label_counts"] == {"no": 46, "yes": 94}


def _write_task(root, n_train=96, n_test=40, seed=0):
    """A learnable A/B pair task: the label is which of two words the context contains."""
    rng = np.random.default_rng(seed)
    words = {"A": "patients", "B": "cells"}

    def rows(n, p_a):
        out = []
        for i in range(n):
            lab = "A" if rng.random() < p_a else "B"
            out.append(
                {
                    "id": f"q{i}",
                    "sentence1": "which word is in the context",
                    "sentence2": f"the {words[lab]} were observed",
                    "label": lab,
                }
            )
        return out

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", 16), ("test", n_test)):
        with open(root / f"{split}.jsonl", "w") as f:
            for r in rows(n, 0.7):
                f.write(json.dumps(r) + "\n")
    return root


def test_yesno_synthetic_labels_from_data(tiny_assets, tmp_path):
    from kdcl_dist.evaluate.yesno import YesNoConfig, evaluate_yesno

    task = _write_task(tmp_path / "task")
    test_labels = [json.loads(line)["label"] for line in open(task / "test.jsonl")]
    train_labels = [json.loads(line)["label"] for line in open(task / "train.jsonl")]
    maj = max("AB", key=train_labels.count)
    cfg = YesNoConfig(seeds=2, epochs=8, batch_size=8, lr=5e-3, max_length=32, n_boot=500)
    r = evaluate_yesno(str(tiny_assets["student"]), str(task), cfg)
    assert r["labels"] == ["A", "B"]
    assert r["majority_baseline"]["label"] == maj
    assert r["majority_baseline"]["accuracy"] == pytest.approx(
        test_labels.count(maj) / len(test_labels)
    )
    assert len(r["per_seed"]) == 2 and [s["seed"] for s in r["per_seed"]] == [0, 1]
    accs = [s["test_accuracy"] for s in r["per_seed"]]
    assert r["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    lo, hi = r["accuracy"]["ci95"]
    assert lo <= r["accuracy"]["mean"] <= hi
    # the task is trivially learnable: the fine-tuned tiny model must beat the majority class
    assert r["accuracy"]["mean"] > r["majority_baseline"]["accuracy"] + 0.1


def test_yesno_class_weights_balanced_rule():
    from kdcl_dist.evaluate.yesno import class_weights

    assert class_weights([0, 0, 0, 1], 2, "none") is None
    w = class_weights([0, 0, 0, 1], 2, "balanced")
    assert w == pytest.approx([4 / 6, 2.0])
    # weighted counts are equal per label: the weighted loss has no prior towards the majority
    assert 3 * w[0] == pytest.approx(1 * w[1])


def test_yesno_select_on_dev_tests_the_best_dev_epoch(tiny_assets, tmp_path):
    from kdcl_dist.evaluate.yesno import YesNoConfig, evaluate_yesno

    task = _write_task(tmp_path / "task", n_train=48, n_test=24)
    cfg = YesNoConfig(
        seeds=1, epochs=3, batch_size=8, lr=5e-3, max_length=32, n_boot=200,
        select="dev", class_weight="balanced",
    )  # fmt: skip
    r = evaluate_yesno(str(tiny_assets["student"]), str(task), cfg)
    s = r["per_seed"][0]
    by_epoch = s["dev_by_epoch"]
    assert [e["epoch"] for e in by_epoch] == [1, 2, 3]
    best = max(e["dev_macro_f1"] for e in by_epoch)
    chosen = max(e["epoch"] for e in by_epoch if e["dev_macro_f1"] == best)
    assert s["epoch_tested"] == chosen and s["dev_macro_f1"] == pytest.approx(best)
    assert r["config"]["select"] == "dev" and r["config"]["class_weight"] == "balanced"


def test_yesno_rejects_unseen_test_label(tmp_path):
    from kdcl_dist.errors import UserError
    from kdcl_dist.evaluate.yesno import load_task

    task = _write_task(tmp_path / "task")
    with open(task / "test.jsonl", "a") as f:
        f.write(json.dumps({"sentence1": "q", "sentence2": "c", "label": "maybe"}) + "\n")
    with pytest.raises(UserError, match="maybe"):
        load_task(task)


# -- held-out MLM --------------------------------------------------------------------------


def test_heldout_rule_is_fixed_and_about_the_requested_share():
    from kdcl_dist.evaluate.mlm import document_id, is_heldout
    from kdcl_dist.utils import id_hash64

    ids = [f"doc-{i}" for i in range(20000)]
    share = np.mean([is_heldout(i, 5) for i in ids])
    assert 0.045 < share < 0.055
    assert all(is_heldout(i, 5) == (id_hash64(i) % 100 < 5) for i in ids[:200])
    assert document_id("123_part4") == "123" and is_heldout("123_part4", 50) == is_heldout(
        "123", 50
    )


def _train_briefly(model_dir, shards_dir, out_dir, steps=60):
    """Plain torch MLM training on the shard set (purpose 'train' masks), saved as an HF dir."""
    import torch

    from kdcl_dist.data.masking import MaskSpec, mask_sample
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.kd.models import load_mlm

    torch.manual_seed(0)
    tok = load_tokenizer(str(model_dir))
    spec = MaskSpec.from_tokenizer(tok)
    model = load_mlm(str(model_dir))
    model.train()
    ss = ShardSet(shards_dir)
    samples = list(ss)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = [samples[(step * 16 + j) % len(samples)] for j in range(16)]
        L = max(len(s.ids) for s in batch)
        inp = torch.full((16, L), tok.pad_token_id, dtype=torch.long)
        lab = torch.full((16, L), -100, dtype=torch.long)
        att = torch.zeros((16, L), dtype=torch.long)
        for r, s in enumerate(batch):
            x, y = mask_sample(s.ids, s.meta["id"], step, "train", 0, spec)
            inp[r, : len(x)], lab[r, : len(y)], att[r, : len(x)] = (
                torch.from_numpy(x),
                torch.from_numpy(y),
                1,
            )
        loss = model(input_ids=inp, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_eval_mlm_deterministic_and_lower_after_training(tiny_assets, tmp_path):
    from kdcl_dist.evaluate.mlm import EvalMLMConfig, evaluate_mlm

    cfg = EvalMLMConfig(split="all", masks=2, max_samples=120, batch_size=16)
    s1, p1 = evaluate_mlm(str(tiny_assets["student"]), str(tiny_assets["shards"]), cfg)
    s2, p2 = evaluate_mlm(str(tiny_assets["student"]), str(tiny_assets["shards"]), cfg)
    assert s1["loss"] == s2["loss"] and np.array_equal(p1["loss_sum"], p2["loss_sum"])
    assert s1["samples"] == 120 and s1["masked_tokens"] == int(p1["n_masked"].sum()) > 0
    assert s1["perplexity"] == pytest.approx(math.exp(s1["loss"]))
    # a random model of vocabulary V scores about ln V
    assert abs(s1["loss"] - math.log(1000)) < 1.0
    # batch size does not change the result (padding never enters the loss)
    s3, _ = evaluate_mlm(
        str(tiny_assets["student"]),
        str(tiny_assets["shards"]),
        EvalMLMConfig(split="all", masks=2, max_samples=120, batch_size=5),
    )
    assert s3["loss"] == pytest.approx(s1["loss"], rel=1e-5)
    trained = _train_briefly(tiny_assets["student"], tiny_assets["shards"], tmp_path / "trained")
    s4, _ = evaluate_mlm(str(trained), str(tiny_assets["shards"]), cfg)
    assert s4["masked_tokens"] == s1["masked_tokens"]  # same masks for every model
    assert s4["loss"] < s1["loss"] - 0.5


def test_eval_mlm_cli_heldout_split(tiny_assets, tmp_path):
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.evaluate.mlm import is_heldout

    out = tmp_path / "mlm.json"
    run_cli(
        "eval",
        "mlm",
        "--model",
        tiny_assets["teacher"],
        "--shards",
        tiny_assets["shards"],
        "--heldout-percent",
        "10",
        "--masks",
        "1",
        "--out",
        out,
        "--per-sample",
        tmp_path / "ps.npz",
        "--no-progress",
    )
    r = json.loads(out.read_text())
    expect = [s.meta["id"] for s in ShardSet(tiny_assets["shards"]) if is_heldout(s.meta["id"], 10)]
    assert r["split"] == "heldout" and r["samples"] == len(expect) > 0
    ps = np.load(tmp_path / "ps.npz")
    assert list(ps["ids"]) == expect
    assert r["loss"] == pytest.approx(ps["loss_sum"].sum() / ps["n_masked"].sum())


def test_eval_mlm_refuses_other_tokenizer(tiny_assets, tmp_path):
    from kdcl_dist.data.tokenizer import train_wordpiece

    other = tmp_path / "other_tok"
    train_wordpiece(["completely different words here"] * 50, other, vocab_size=200)
    p = run_cli(
        "eval",
        "mlm",
        "--model",
        tiny_assets["student"],
        "--tokenizer",
        other,
        "--shards",
        tiny_assets["shards"],
        "--split",
        "all",
        check=False,
    )
    assert p.returncode == 2 and "tokenized with tokenizer" in p.stderr
