"""`kd-cl-matched` trains with a constant λ equal to the mean λ of `kd-cl-sr-paper` over the same
steps (kdcl_dist.experiment.ARMS, Experiment.planned_lambdas).

No training: a synthetic curriculum (order_scores.npy + curriculum.json) is written and the
sr-paper run is replayed the way `kdcl-dist train` sees it — the sampler's per-rank micro-batches
(length-grouped, 2 ranks) put back together into each global batch, and λ of every step computed
from the paper's formula written out here (confidence exp(−s), shift so that the first batch
has λ = 0, clipped to [0, 1]) and from the Reliance object train builds. The matched λ the
experiment derives must be their mean, and the matched arm's train command must carry it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kdcl_dist import cli
from kdcl_dist.config import resolve_args
from kdcl_dist.curriculum.order import OrderSpec
from kdcl_dist.curriculum.sampler import CurriculumSampler
from kdcl_dist.experiment import ARMS, Experiment, ExperimentConfig
from kdcl_dist.kd.reliance import Reliance, RelianceSpec

N, GLOBAL_BATCH, MICRO_BATCH, WORLD = 203, 16, 4, 2  # N % GLOBAL_BATCH != 0: epochs wrap mid-batch
STEPS = 31  # more than two epochs of 12 batches


def _curriculum(cur):
    rng = np.random.default_rng(7)
    scores = np.sort(rng.gamma(2.0, 0.6, N) + 0.4)  # easy -> hard, as `curriculum` writes them
    cur.mkdir(parents=True)
    np.save(cur / "order_scores.npy", scores)
    stats = {"min": float(scores.min()), "max": float(scores.max()), "mean": float(scores.mean())}
    (cur / "curriculum.json").write_text(json.dumps({"num_samples": N, "score_stats": stats}))
    return scores, stats


def _replayed_sr_paper_mean(scores, stats, steps):
    """Mean over the run's steps of the sr-paper batch λ, from what each rank actually trains on."""
    lengths = np.random.default_rng(1).integers(8, 128, N)
    spec = OrderSpec("sequential", seed=0)
    samplers = [
        CurriculumSampler(
            N,
            GLOBAL_BATCH,
            MICRO_BATCH,
            WORLD,
            r,
            spec,
            batching="length-grouped",
            lengths=lengths,
        )
        for r in range(WORLD)
    ]

    def batch(t):  # global batch t = every rank's micro-batches together
        pos = np.concatenate([s.rank_block(t) for s in samplers])
        assert len(pos) == GLOBAL_BATCH
        return pos

    max_conf = math.exp(-stats["min"])

    def raw(pos):  # (1 − C_b) / max(C_g), C_b = mean exp(−s_i) over the batch
        return (1.0 - float(np.mean(np.exp(-scores[pos])))) / max_conf

    shift = raw(batch(0))
    by_formula = [min(1.0, max(0.0, raw(batch(t)) - shift)) for t in range(steps)]
    # the Reliance object `train` builds (train.py: first batch from sampler.global_positions(0))
    rel = Reliance(
        RelianceSpec("sr-paper", lambda_=0.5),
        stats,
        scores[samplers[0].global_positions(0)],
        n_samples=N,
    )
    by_train = [
        rel.batch_lambda(scores[samplers[0].global_positions(t)], samplers[0].global_positions(t))
        for t in range(steps)
    ]
    np.testing.assert_allclose(by_train, by_formula, rtol=0, atol=1e-12)
    assert by_formula[0] == 0.0 and max(by_formula) > 0.3  # a schedule that actually moves
    return float(np.mean(by_formula))


def _experiment(tmp_path, arms):
    cfg = ExperimentConfig(
        arms=arms, seeds=1, steps=STEPS, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH
    )
    return Experiment(tmp_path / "corpus.jsonl", tmp_path / "exp", cfg, preset="tiny")


def test_matched_arm_is_the_constant_twin_of_sr_paper():
    assert ARMS["kd-cl-matched"]["lambda_from"] == "kd-cl-sr-paper"
    assert ARMS["kd-cl-matched"]["reliance"] == "constant"
    assert ARMS["kd-cl-matched"]["order"] == ARMS["kd-cl-sr-paper"]["order"] == "sequential"
    assert ARMS["kd-cl-sr-paper"]["reliance"] == "sr-paper"


@pytest.mark.parametrize(
    "arms", [["kd-cl-sr-paper", "kd-cl-matched"], ["kd-cl-matched"]], ids=["both", "matched-only"]
)
def test_matched_lambda_is_the_mean_of_the_sr_paper_schedule(tmp_path, arms):
    exp = _experiment(tmp_path, arms)
    scores, stats = _curriculum(exp.p["cur"])
    want = _replayed_sr_paper_mean(scores, stats, STEPS)
    planned = exp.planned_lambdas(STEPS)
    assert planned["kd-cl-matched"] == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert 0.05 < want < 0.95
    if "kd-cl-sr-paper" in arms:
        assert planned["kd-cl-sr-paper"] == planned["kd-cl-matched"]
    # over fewer steps (an earlier, easier part of the curriculum) the mean is smaller
    assert exp.planned_lambdas(6)["kd-cl-matched"] < planned["kd-cl-matched"]


def test_matched_arm_trains_with_that_lambda(tmp_path, monkeypatch):
    exp = _experiment(tmp_path, ["kd-cl-sr-paper", "kd-cl-matched"])
    scores, stats = _curriculum(exp.p["cur"])
    planned = exp.planned_lambdas(STEPS)
    calls = []
    monkeypatch.setattr(exp, "train_then_export", lambda names, argv, *a, **k: calls.append(argv))
    monkeypatch.setattr(exp, "eval_mlm", lambda *a, **k: None)
    monkeypatch.setattr(exp, "eval_yesno", lambda *a, **k: None)
    prep = {
        "planned_lambda": planned,
        "student": tmp_path / "student",
        "teacher": tmp_path / "teacher",
        "steps": STEPS,
    }
    for arm in ("kd-cl-matched", "kd-cl-sr-paper"):
        exp.run_one(arm, 0, prep)
    _module, parser = cli.command_parser("train")
    matched, sr = (
        resolve_args(parser.parse_args([str(a) for a in argv[1:]]), check=False) for argv in calls
    )
    assert calls[0][0] == "train"
    assert (matched.reliance, matched.order, matched.steps) == ("constant", "sequential", STEPS)
    assert matched.lambda_ == planned["kd-cl-matched"]  # repr round-trips the float exactly
    assert matched.lambda_ == pytest.approx(_replayed_sr_paper_mean(scores, stats, STEPS))
    assert (sr.reliance, sr.order, sr.steps, sr.global_batch) == (
        "sr-paper",
        "sequential",
        STEPS,
        matched.global_batch,
    )
