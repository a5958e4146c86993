"""Comparisons with the training seed as the unit: t distribution, nesting, calibration by simulation.

The simulations use the experiment's design (kdcl_dist.evaluate.calibration): 3 seeds per arm,
631 held-out documents, between-seed std 0.002 nats; yes/no with 166 questions and 3 training x
3 fine-tuning seeds. Fixed random seeds: every number here is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdcl_dist.evaluate import calibration as cal
from kdcl_dist.evaluate import stats

# -- Student t (own implementation: scipy is not installed) ------------------------------------


@pytest.mark.parametrize(
    "q,df,expected",
    [
        (0.975, 1, 12.706205),
        (0.975, 2, 4.302653),
        (0.975, 3, 3.182446),
        (0.975, 4, 2.776445),
        (0.975, 5, 2.570582),
        (0.975, 10, 2.228139),
        (0.975, 30, 2.042272),
        (0.975, math.inf, 1.959964),
        (0.8, 1, 1.376382),
        (0.8, 2, 1.060660),
        (0.8, 4, 0.940965),
        (0.8, 10, 0.879058),
        (0.995, 5, 4.032143),
        (0.95, 3, 2.353363),
        (0.9, 20, 1.325341),
        (0.025, 4, -2.776445),
    ],
)
def test_t_ppf_table_values(q, df, expected):
    assert float(stats.t_ppf(q, df)) == pytest.approx(expected, abs=2e-6)


def test_t_cdf_closed_forms_and_known_values():
    t = np.array([-3.0, -0.4, 0.0, 0.7, 2.5, 40.0])
    # df = 1 (Cauchy) and df = 2 have closed forms
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + np.arctan(t) / np.pi, abs=1e-12)
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * np.sqrt(t * t + 2)), abs=1e-12)
    assert float(stats.t_cdf(2.0, 5)) == pytest.approx(0.9490303, abs=1e-7)
    assert float(stats.t_sf(2.0, 5)) == pytest.approx(0.0509697, abs=1e-7)
    assert float(stats.t_cdf(1.96, math.inf)) == pytest.approx(0.9750021, abs=1e-7)
    # fractional df (Welch) lies between its integer neighbours
    assert float(stats.t_sf(2.5, 3)) > float(stats.t_sf(2.5, 3.4)) > float(stats.t_sf(2.5, 4))
    # the inverse of the cdf, far into the tails and for fractional df
    q = np.array([1e-8, 0.01, 0.3, 0.7, 0.99, 1 - 1e-8])
    for df in (0.7, 2.3, 4.1, 631.0):
        assert stats.t_cdf(stats.t_ppf(q, df), df) == pytest.approx(q, rel=1e-8)


def test_betainc_identities():
    x = np.linspace(0.0, 1.0, 11)
    assert stats.betainc(1.0, 1.0, x) == pytest.approx(x, abs=1e-14)
    assert stats.betainc(3.0, 1.0, x) == pytest.approx(x**3, abs=1e-13)
    assert float(stats.betainc(7.5, 7.5, 0.5)) == pytest.approx(0.5, abs=1e-13)


# -- nesting ---------------------------------------------------------------------------------


def test_nest_seeds_averages_within_training_seed():
    rows = np.array(
        [
            [1, 0, 1],
            [1, 1, 1],
            [0, 0, 1],  # training seed 0
            [0, 0, 0],
            [1, 0, 0],
            [1, 1, 0],
        ],
        dtype=float,
    )  # training seed 1
    out = stats.nest_seeds(rows, [0, 0, 0, 1, 1, 1])
    assert out.shape == (2, 3)
    assert out == pytest.approx(np.array([[2 / 3, 1 / 3, 1.0], [2 / 3, 1 / 3, 0.0]]))
    # groups come out in order of first appearance, rows need not be contiguous
    out = stats.nest_seeds(rows[[0, 3, 1, 4]], ["b", "a", "b", "a"])
    assert out == pytest.approx(np.array([[1, 0.5, 1], [0.5, 0, 0]]))
    with pytest.raises(ValueError):
        stats.nest_seeds(rows, [0, 1])


# -- the comparison itself -----------------------------------------------------------------------


def test_compare_seeds_fields_and_batched_core_agree():
    a, b, den = cal.simulate_mlm(cal.MLMDesign(), 3, delta=0.004, rng=7)
    r = stats.compare_seeds(a[1], b[1], den[1], den[1])
    for key in (
        "diff",
        "ci",
        "p",
        "se",
        "df",
        "mde",
        "underpowered",
        "method",
        "seeds_a",
        "seeds_b",
    ):
        assert key in r
    assert r["seeds_a"] == r["seeds_b"] == 3 and r["items"] == 631
    # diff: the pooled difference, as compare_ratio defines it
    assert r["diff"] == pytest.approx(
        stats.compare_ratio(a[1], b[1], den[1], den[1], n_boot=10)["diff"], abs=1e-12
    )
    assert r["ci"][0] < r["diff"] < r["ci"][1]
    assert 2 < r["df"] < 5  # Welch df of 3 vs 3 seeds (the item part is ~0 here)
    # p and CI agree: p < 0.05 exactly when 0 is outside the 95% interval
    assert (r["p"] < 0.05) == (r["ci"][0] > 0 or r["ci"][1] < 0)
    batched = stats._compare_batched(a, b, den, den, 0.05, 0.8, True)
    assert float(batched["p"][1]) == pytest.approx(r["p"], rel=1e-12)
    assert float(batched["mde"][1]) == pytest.approx(r["mde"], rel=1e-12)


def test_compare_seeds_known_welch_value():
    # items=False, den=None: plain Welch t-test on per-seed means
    a = np.array([[1.0, 3.0], [2.0, 4.0], [4.0, 4.0]])  # per-seed means 2, 3, 4
    b = np.array([[0.0, 2.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # 1, 1, 1, 0
    r = stats.compare_seeds(a, b, items=False)
    assert r["diff"] == pytest.approx(3.0 - 0.75)
    se = math.sqrt(1.0 / 3 + 0.25 / 4)
    assert r["se"] == pytest.approx(se)
    df = (1 / 3 + 0.25 / 4) ** 2 / ((1 / 3) ** 2 / 2 + (0.25 / 4) ** 2 / 3)
    assert r["df"] == pytest.approx(df)
    assert r["p"] == pytest.approx(2 * float(stats.t_sf(2.25 / se, df)))
    # independent check for a fractional df: integrate the t density numerically over [0, t]
    t, nu = 2.25 / se, df
    x = np.linspace(0.0, t, 20001)
    dens = (
        math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2))
        / math.sqrt(nu * math.pi)
        * (1 + x * x / nu) ** (-(nu + 1) / 2)
    )
    inner = float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(x)))
    assert r["p"] == pytest.approx(1.0 - 2.0 * inner, abs=1e-7)
    assert r["p"] == pytest.approx(0.0428, abs=1e-4)  # t = 3.576, df = 2.755


def test_underpowered_flag_and_single_seed():
    rng = np.random.default_rng(3)
    base = rng.normal(0.0, 1.0, size=200)
    seeds_a = base + rng.normal(0.0, 0.05, size=(3, 1))
    seeds_b = base + 0.001 + rng.normal(0.0, 0.05, size=(3, 1))
    r = stats.compare_seeds(seeds_a, seeds_b)
    assert r["mde"] > abs(r["diff"]) and r["underpowered"]
    r = stats.compare_seeds(seeds_a + 1.0, seeds_b)
    assert r["mde"] < abs(r["diff"]) and not r["underpowered"] and r["p"] < 0.001
    r = stats.compare_seeds(seeds_a[:1], seeds_b)
    assert math.isnan(r["p"]) and r["underpowered"] and "single seed" in r["note"]
    # every run identical and equal: no variance, no difference
    same = np.ones((3, 50))
    r = stats.compare_seeds(same, same)
    assert r["p"] == 1.0 and r["diff"] == 0.0


def test_compare_to_constant_and_per_item_reference():
    gold_yes = np.array([1.0] * 67 + [0.0] * 33)  # majority baseline: 67%
    rows = np.tile(gold_yes, (3, 1))
    rows[:, 67:70] = 1.0  # every seed also gets three 'no' questions right: 70%
    r = stats.compare_to_constant(rows, value=gold_yes)
    assert r["reference"] == pytest.approx(0.67) and r["diff"] == pytest.approx(0.03)
    assert r["seeds_a"] == 3 and r["seeds_b"] == 0
    # against a fixed 67% the test-question sampling of the arm's accuracy counts in full
    fixed = stats.compare_to_constant(rows, value=0.67)
    assert fixed["se_items"] > 2 * r["se_items"]
    assert math.isnan(stats.compare_to_constant(rows[:1], value=0.67)["p"])


def test_compare_to_constant_calibration_small():
    design = cal.MLMDesign()
    a, _, den = cal.simulate_mlm(design, 300, rng=11)
    rej = [
        stats.compare_to_constant(a[i], den[i], value=design.value)["p"] < 0.05 for i in range(300)
    ]
    assert np.mean(rej) <= 0.08  # nominal 0.05; binomial sd with 300 sims ~0.013


# -- calibration by simulation --------------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_new_procedure_null_rate_mlm(share):
    r = cal.new_mlm(cal.MLMDesign(item_seed_share=share), sims=2000, seed=1)
    assert r["sims"] == 2000
    assert r["rate"] <= 0.06


def test_item_component_needed_when_arms_differ_per_document():
    # arm x document interaction with zero mean: the test set's documents decide the sign
    design = cal.MLMDesign(arm_item_std=0.05)
    assert cal.new_mlm(design, sims=1000, seed=2)["rate"] <= 0.06
    assert cal.new_mlm(design, sims=1000, seed=2, items=False)["rate"] >= 0.12


def test_new_procedure_null_rate_yesno_nested():
    r = cal.new_yesno(cal.YesNoDesign(), sims=2000, seed=3)
    assert r["rate"] <= 0.06
    # the 9 fine-tuning runs as if independent seeds: clearly too many false positives
    assert cal.new_yesno(cal.YesNoDesign(), sims=1000, seed=4, nested=False)["rate"] >= 0.08


def test_yesno_design_matches_the_brief():
    s = cal.yesno_spread(cal.YesNoDesign(), n=500)
    assert s["accuracy"] == pytest.approx(70.0, abs=0.5)
    assert 1.0 < s["train_seed_std"] < 3.0 and 1.5 < s["run_std"] < 4.0


def test_power_and_mde():
    big = cal.new_mlm(cal.MLMDesign(), sims=1000, delta=0.026, seed=5)
    assert big["rate"] >= 0.9
    small3 = cal.new_mlm(cal.MLMDesign(), sims=1000, delta=0.003, seed=6)
    small5 = cal.new_mlm(cal.MLMDesign(seeds=5), sims=1000, delta=0.003, seed=6)
    assert 0.0 < small3["rate"] < 1.0 and 0.0 < small5["rate"] < 1.0
    assert small5["rate"] > small3["rate"]
    assert small5["mde_median"] < small3["mde_median"]
    # mde ~ (t_{df,0.975} + t_{df,0.8}) * se, se ~ 0.002 * sqrt(2/3)
    assert 0.004 < small3["mde_median"] < 0.008


def test_old_bootstrap_is_anticonservative():
    # the review's case: seeds differ by a global shift of the held-out loss; the percentile
    # bootstrap over 3 seeds per arm is too narrow (this is why it was replaced)
    r = cal.old_mlm(cal.MLMDesign(item_seed_share=0.0), sims=200, n_boot=1000, seed=8)
    assert r["rate"] >= 0.10
    assert r["ci"][0] > 0.05
