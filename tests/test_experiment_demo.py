"""Experiment grid and demo: corpus split, step runner, report statistics; end-to-end runs (slow)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import run_cli

from kdcl_dist.errors import UserError


def _write_corpus(path, n=300):
    from kdcl_dist.data.synthetic import synthetic_documents

    with open(path, "w") as f:
        for doc_id, text in synthetic_documents(n, seed=3):
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return path


def test_split_corpus_follows_the_heldout_rule(tmp_path):
    from kdcl_dist.evaluate.mlm import is_heldout
    from kdcl_dist.experiment import split_corpus

    corpus = _write_corpus(tmp_path / "c.jsonl", 400)
    info = split_corpus(corpus, tmp_path / "data", heldout_percent=10)
    train = [json.loads(x)["id"] for x in open(tmp_path / "data" / "train.jsonl")]
    held = [json.loads(x)["id"] for x in open(tmp_path / "data" / "heldout.jsonl")]
    assert (
        info["train"] == len(train)
        and info["heldout"] == len(held)
        and len(train) + len(held) == 400
    )
    assert all(is_heldout(i, 10) for i in held) and not any(is_heldout(i, 10) for i in train)
    assert 20 <= len(held) <= 60
    # a second call with the same settings reuses the files; other settings rewrite them
    mtime = (tmp_path / "data" / "train.jsonl").stat().st_mtime_ns
    split_corpus(corpus, tmp_path / "data", heldout_percent=10)
    assert (tmp_path / "data" / "train.jsonl").stat().st_mtime_ns == mtime
    info2 = split_corpus(corpus, tmp_path / "data", heldout_percent=10, max_docs=100)
    assert info2["train"] + info2["heldout"] == 100


def test_runner_skips_done_steps_and_reports_failures(tmp_path):
    from kdcl_dist.experiment import Runner

    r = Runner(tmp_path, echo=False)
    done = tmp_path / "out.txt"
    script = [sys.executable, "-c"]
    r.step("write", [f"open({str(done)!r}, 'w').write('x')"], done, launcher=script)
    assert done.read_text() == "x" and r.records[-1]["status"] == "done"
    done.write_text("kept")
    r.step("write", ["raise SystemExit(3)"], done, launcher=script)  # would fail, but is skipped
    assert r.records[-1]["status"] == "skipped" and done.read_text() == "kept"
    with pytest.raises(UserError, match="step 'boom' failed.*exit 3"):
        r.step(
            "boom",
            ["print('some output'); raise SystemExit(3)"],
            tmp_path / "never",
            launcher=script,
        )
    assert "some output" in (tmp_path / "logs" / "boom.log").read_text()
    lines = [json.loads(x) for x in open(tmp_path / "steps.jsonl")]
    assert [x["status"] for x in lines] == ["done", "skipped"]


def _fake_run(root, arm, seed, loss_per_token, n_docs=300, rng=None):
    """An evaluated run: per-sample npz and metrics.jsonl as the real stages write them."""
    from kdcl_dist.evaluate.mlm import save_per_sample

    rng = rng or np.random.default_rng(seed)
    counts = rng.integers(10, 40, size=n_docs)
    sums = counts * (loss_per_token + rng.normal(0, 0.3, size=n_docs))
    ev = root / "evals"
    ev.mkdir(parents=True, exist_ok=True)
    save_per_sample(
        ev / f"{arm}-s{seed}.mlm.npz",
        {"ids": np.array([f"d{i}" for i in range(n_docs)]), "loss_sum": sums, "n_masked": counts},
    )
    m = root / "runs" / f"{arm}-s{seed}" / "train"
    m.mkdir(parents=True, exist_ok=True)
    with open(m / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": 8 - step * 0.1,
                        "loss_mlm": 8 - step * 0.08,
                        "lambda": 0.5,
                        "tokens_per_s": 1000.0,
                        "step_time": 0.5,
                    }
                )
                + "\n"
            )


def test_report_tables_and_significance(tmp_path):
    from kdcl_dist.experiment import ExperimentConfig, write_report

    cfg = ExperimentConfig(seeds=3, arms=["kd", "kd-cl", "student-only"], n_boot=2000)
    shared = np.random.default_rng(7)
    base_noise = shared.normal(0, 0.01, size=3)
    for s in range(3):
        _fake_run(tmp_path, "kd", s, 6.0 + base_noise[s], rng=np.random.default_rng(100 + s))
        _fake_run(
            tmp_path, "kd-cl", s, 6.0 + base_noise[s] + 0.001, rng=np.random.default_rng(100 + s)
        )
        _fake_run(
            tmp_path, "student-only", s, 6.5 + base_noise[s], rng=np.random.default_rng(100 + s)
        )
    prep = {"steps": 10, "split": {"corpus": "c.jsonl", "train": 100, "heldout": 10}}
    path = write_report(tmp_path, cfg, prep, 12.0, command="kdcl-dist experiment ...")
    text = path.read_text()
    assert "| KD (random order, constant λ) | 3 |" in text and "student only" in text
    res = json.loads((tmp_path / "report.json").read_text())
    comps = {(c["a"], c["b"]): c for c in res["comparisons"]}
    assert comps[("student-only", "kd")]["significant"] and comps[("student-only", "kd")][
        "diff"
    ] == pytest.approx(0.5, abs=0.05)
    assert not comps[("kd-cl", "kd")]["significant"]
    assert "**student-only** is worse than **kd**" in text
    assert "Not significant: kd-cl vs kd" in text
    # tokens trained = sum of tokens/s x step time over the steps
    assert res["arms"]["kd"]["tokens"] == [5000.0, 5000.0, 5000.0]
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (
        tmp_path / "lambda_schedules.png"
    ).exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_tiny_experiment_end_to_end_and_resume(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus.jsonl", 300)
    out = tmp_path / "exp"
    args = [
        "experiment",
        "--corpus",
        corpus,
        "--out",
        out,
        "--arms",
        "kd,kd-cl-sr-paper",
        "--seeds",
        "2",
        "--steps",
        "3",
        "--parallel",
        "2",
        "--heldout-percent",
        "10",
        "teacher_steps=3",
        "warmup_student_steps=2",
        "max_length=64",
        "global_batch=16",
        "micro_batch=8",
        "n_boot=500",
        "teacher_cache=auto",  # the KD arms train from one cache (docs/design.md §7)
    ]
    p = run_cli(*args, timeout=1200)
    assert "report:" in p.stdout
    res = json.loads((out / "report.json").read_text())
    assert set(res["arms"]) == {"kd", "kd-cl-sr-paper"}
    assert all(len(a["losses"]) == 2 for a in res["arms"].values())
    for arm in ("kd", "kd-cl-sr-paper"):
        for s in (0, 1):
            m = [
                json.loads(x)
                for x in open(out / "runs" / f"{arm}-s{s}" / "train" / "metrics.jsonl")
            ]
            assert [x["step"] for x in m] == [1, 2, 3]
    # different seeds give different students; the same masks score every model
    ev = json.loads((out / "evals" / "kd-s0.mlm.json").read_text())
    ev1 = json.loads((out / "evals" / "kd-s1.mlm.json").read_text())
    assert ev["masked_tokens"] == ev1["masked_tokens"] and ev["loss"] != ev1["loss"]
    assert "Which differences are significant" in (out / "report.md").read_text()
    assert "cached sparse teacher" in (out / "report.md").read_text()
    assert (out / "tcache" / "teacher_cache.json").exists()
    cfg = (out / "runs" / "kd-s1" / "train" / "config.yaml").read_text()
    assert "teacher_cache: " + str(out / "tcache") in cfg and "mask_seed: 42" in cfg
    # re-running skips every step
    n_before = len(open(out / "steps.jsonl").readlines())
    run_cli(*args, timeout=600)
    new = [json.loads(x) for x in open(out / "steps.jsonl").readlines()[n_before:]]
    assert new and all(x["status"] == "skipped" for x in new)


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_on_synthetic_corpus_and_rerun(tmp_path):
    env = {"KDCL_DATA_DIR": str(tmp_path / "no-data-here")}
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        out,
        "--steps",
        "4",
        "synthetic_docs=300",
        "teacher_steps=3",
        "warmup_student_steps=2",
        "max_length=64",
    ]
    p = run_cli(*args, env=env, timeout=1200)
    assert "*** SYNTHETIC DATA ***" in p.stdout
    for where in ("TensorBoard logs", "curriculum plot", "metrics", "report"):
        assert where in p.stdout
    assert (out / "kd-cl-sr" / "tensorboard").is_dir() and (out / "cur" / "curriculum.png").exists()
    m = [json.loads(x) for x in open(out / "kd-cl-sr" / "metrics.jsonl")]
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "student after KD-CL-SR" in report
    after = json.loads((out / "evals" / "student-after.mlm.json").read_text())
    before = json.loads((out / "evals" / "student-before.mlm.json").read_text())
    assert after["masked_tokens"] == before["masked_tokens"] and after["loss"] != before["loss"]
    p2 = run_cli(*args, env=env, timeout=600)
    assert "[run ]" not in p2.stdout and "[skip]" in p2.stdout


def _fake_yesno(path, gold, acc, ft_seeds, rng):
    """A yes/no result file as `eval yesno` writes it: `ft_seeds` fine-tuning runs of one model."""
    runs = []
    for _ in range(ft_seeds):
        right = rng.random(len(gold)) < acc
        pred = [g if ok else ("no" if g == "yes" else "yes") for g, ok in zip(gold, right)]
        runs.append({"test_pred": pred, "test_accuracy": float(np.mean(right))})
    accs = [r["test_accuracy"] for r in runs]
    maj = float(np.mean([g == "yes" for g in gold]))
    path.write_text(
        json.dumps(
            {
                "per_seed": runs,
                "test_gold": list(gold),
                "accuracy": {"mean": float(np.mean(accs))},
                "macro_f1": {"mean": 0.5},
                "majority_baseline": {"label": "yes", "accuracy": maj, "macro_f1": 0.4},
            }
        )
    )


def test_report_yesno_nests_finetuning_seeds_and_compares_with_majority(tmp_path):
    """3 training seeds x 3 fine-tuning seeds are 3 units (not 9); the teacher is compared with the
    majority baseline question by question; verdicts carry the MDE."""
    from kdcl_dist.experiment import ExperimentConfig, write_report

    cfg = ExperimentConfig(seeds=3, arms=["kd", "kd-cl"], yesno=True, yesno_seeds=3)
    rng = np.random.default_rng(0)
    gold = ["yes"] * 110 + ["no"] * 56
    for s in range(3):
        for arm in ("kd", "kd-cl"):
            _fake_run(tmp_path, arm, s, 6.0, rng=np.random.default_rng(10 * s + len(arm)))
            _fake_yesno(tmp_path / "evals" / f"{arm}-s{s}.yesno.json", gold, 0.72, 3, rng)
    _fake_yesno(tmp_path / "evals" / "reference-teacher.yesno.json", gold, 0.9, 3, rng)
    path = write_report(tmp_path, cfg, {"steps": 10, "split": {}}, 1.0)
    text = path.read_text()
    res = json.loads((tmp_path / "report.json").read_text())
    yes = [c for c in res["comparisons"] if c["metric"] == "yesno_accuracy"]
    assert len(yes) == 1 and yes[0]["seeds_a"] == 3 and yes[0]["seeds_b"] == 3  # nested: 3, not 9
    assert np.isfinite(yes[0]["mde"]) and "MDE" in text
    teacher = res["yesno"]["rows"]["*teacher (starting point)*"]["vs_majority"]
    assert teacher["diff"] > 0.15 and teacher["p"] < 0.05
    assert "## Table 2" in text and "majority class ('yes')" in text
