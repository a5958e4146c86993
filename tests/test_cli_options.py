"""The command-line options generated from the config dataclasses (kdcl_dist.config.add_options).

In-process (parser objects, no subprocesses): every option of every command has help text, every
option shows its default and choices, every long command takes --progress/--no-progress, a bad choice is one error line (exit 2), --print-config
round-trips through --config, and the precedence preset < --config < flag < override holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re

import pytest
import yaml

from kdcl_dist import cli
from kdcl_dist.config import resolve, resolve_args, split_overrides


def _parser(name: str) -> argparse.ArgumentParser:
    return cli.command_parser(name)[1]  # the parser main() builds


def _all_parsers():
    """(prog, parser) for every command and nested command (eval mlm, bench score, checkpoint list, ...)."""
    out = []

    def walk(prog, p):
        out.append((prog, p))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    walk(f"{prog} {sub_name}", sub)

    for name in cli.COMMANDS:
        walk(f"kdcl-dist {name}", _parser(name))
    return out


def _sub(parser, name):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices[name]
    raise KeyError(name)


def test_every_option_of_every_command_has_help():
    parsers = _all_parsers()
    progs = {prog for prog, _ in parsers}
    assert {
        "kdcl-dist eval mlm",
        "kdcl-dist eval yesno",
        "kdcl-dist bench score",
        "kdcl-dist train",
    } <= progs
    missing = []
    for prog, p in parsers:
        p.format_help()  # every help string formats (a stray % would raise here)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
                continue
            if not (a.help or "").strip():
                missing.append(f"{prog} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, "options without help text: " + ", ".join(missing)


def _shown_default(action):
    """The default the help must show, or None (unset, a bool flag, an empty list)."""
    d = action.default
    if d is None or d is argparse.SUPPRESS or isinstance(d, bool) or d in ([], ()):
        return None
    return cli._shown(d)


def test_every_option_shows_its_default_and_choices():
    hidden = []
    for prog, p in _all_parsers():
        assert p.formatter_class is cli.HelpFormatter, prog  # sub-parsers too
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
                continue
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            # the option's help exactly as --help prints it (through p's formatter), unwrapped
            text = " ".join(p._get_formatter()._expand_help(a).split()) if a.help else ""
            name = f"{prog} {'/'.join(a.option_strings) or a.dest}"
            for c in a.choices or ():
                if str(c) not in text:
                    hidden.append(f"{name}: choice {c!r}")
            shown = _shown_default(a)
            if shown is not None and not re.search(
                rf"default:? {re.escape(shown)}(?![\w.-])", text
            ):
                hidden.append(f"{name}: default {shown!r}")
    assert not hidden, "not in --help: " + "; ".join(hidden)


def test_help_adds_default_and_choices_once():
    text = " ".join(_sub(_parser("bench"), "train").format_help().split())
    assert (
        "--device {auto,cpu,cuda} default auto: cuda when available (one of: auto, cpu, cuda)"
        in text
    )
    assert "(default tiny)" in text and "default: tiny" not in text  # not said twice
    text = " ".join(_sub(_parser("checkpoint"), "universal").format_help().split())
    assert "--workers WORKERS extraction processes (default: 1)" in text
    text = " ".join(_parser("init-models").format_help().split())
    assert "(one of: distilbert, teacher; default: distilbert)" in text
    train = " ".join(_parser("train").format_help().split())  # config options: unchanged
    assert "one of: masked, all; default: masked)" in train and "default: None" not in train
    assert "(default: True)" not in train and "default: []" not in train


LONG_COMMANDS = [
    "tokenizer",
    "init-models",
    "shard",
    "score",
    "curriculum",
    "teacher-cache",
    "train",
    "export",
    "eval mlm",
    "eval yesno",
    "experiment",
    "demo",
    *(f"bench {b}" for b in importlib.import_module("kdcl_dist.commands.bench").BENCHES),
]


@pytest.mark.parametrize("cmd", LONG_COMMANDS)
def test_no_progress_on_every_long_command(cmd):
    words = cmd.split()
    p = _parser(words[0])
    cli._relax_required(p)  # only the flag matters here
    assert p.parse_args([*words[1:], "--no-progress"]).progress is False
    assert p.parse_args([*words[1:], "--progress"]).progress is True
    assert p.parse_args(words[1:]).progress in (True, None)  # None: the config default (on)


def test_experiment_passes_no_progress_to_its_steps():
    from kdcl_dist.experiment import PROGRESS_STAGES, stage_argv

    # every stage named takes the flag (eval: both eval mlm and eval yesno)
    for name in PROGRESS_STAGES:
        p = _parser(name)
        cli._relax_required(p)
        subs = [[]] if name != "eval" else [["mlm"], ["yesno"]]
        for sub in subs:
            assert p.parse_args([*sub, "--no-progress"]).progress is False, (name, sub)
    argv = ["score", "--shards", "s", "--out", "o", "seed=1"]
    assert stage_argv(argv) == argv  # default: the steps decide (no terminal: no bar)
    assert stage_argv(argv, progress=False) == [*argv, "--no-progress"]
    once = ["eval", "mlm", "--model", "m", "--no-progress"]
    assert stage_argv(once, progress=False) == once
    assert stage_argv(["experiment", "--step", "x"], progress=False) == [
        "experiment",
        "--step",
        "x",
    ]
    a = _parser("experiment").parse_args(["--corpus", "c", "--out", "o", "--no-progress"])
    assert a.progress is False and _parser("demo").parse_args(["--no-progress"]).progress is False


def test_help_shows_defaults_choices_and_presets():
    text = " ".join(_parser("train").format_help().split())
    assert "--lr LR peak learning rate (at least 0.0; default: 0.0005)" in text
    assert (
        "one of: sequential, reverse, random, pacing-linear, pacing-root, pacing-exp; default: sequential"
        in text
    )
    assert "--progress, --no-progress" in text and "--lambda LAMBDA" in text
    assert "tiny (sets train:" in text
    score = " ".join(_parser("score").format_help().split())
    assert "one of: fp32, bf16, fp16; default: fp32" in score
    yesno = " ".join(_sub(_parser("eval"), "yesno").format_help().split())
    assert "default: 5.537e-05" in yesno
    demo = " ".join(_parser("demo").format_help().split())
    assert "paper (sets nothing for demo)" in demo  # no promise a preset does not keep


def test_bad_choice_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--order", "sorted"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("kdcl-dist train: error: argument --order: invalid choice: 'sorted'")
    assert "'sequential'" in err[0] and "'pacing-exp'" in err[0]


def test_existing_flag_names_still_parse():
    p = _parser("train")
    a = p.parse_args(
        [
            "--lambda",
            "0.3",
            "--global-batch",
            "16",
            "--no-progress",
            "--wandb",
            "--extend-steps",
            "--allow-new-head",
            "--allow-sr-any-order",
            "--kd-positions",
            "all",
            "--ds-config",
            "zero2",
        ]
    )
    assert (a.lambda_, a.global_batch, a.progress, a.wandb, a.extend_steps) == (
        0.3,
        16,
        False,
        True,
        True,
    )
    assert a.allow_new_head and a.allow_sr_any_order and a.kd_positions == "all"
    unset = p.parse_args([])
    assert (
        unset.lr is None and unset.progress is None and unset.wandb is None
    )  # unset: overrides nothing
    a = _parser("curriculum").parse_args(
        [
            "--shards",
            "s",
            "--scores",
            "c",
            "--out",
            "o",
            "--no-plots",
            "--exclude-heldout-percent",
            "0",
            "--in-memory-max",
            "0",
        ]
    )
    assert a.plots is False and a.exclude_heldout_percent == 0 and a.in_memory_max == 0
    a = _parser("shard").parse_args(
        [
            "--input",
            "x.jsonl",
            "--tokenizer",
            "t",
            "--out",
            "o",
            "--no-dedup",
            "--keep-text",
            "--too-long",
            "split",
            "--no-progress",
        ]
    )
    assert a.dedup is False and a.keep_text and a.too_long == "split" and a.progress is False
    a = _parser("experiment").parse_args(
        ["--corpus", "c", "--out", "o", "--arms", "kd,kd-cl", "--yesno"]
    )
    assert a.arms == ["kd,kd-cl"] and a.yesno and a.preset == "tiny"


def test_repeated_list_flag_accumulates():
    # `--arms a --arms b` once kept only b (argparse's default), silently dropping arms
    from kdcl_dist.config import resolve_args

    a = _parser("experiment").parse_args(
        ["--corpus", "c", "--out", "o", "--arms", "student-only", "--arms", "kd,kd-cl"]
    )
    assert resolve_args(a).arms == ["student-only", "kd", "kd-cl"]


ROUND_TRIP = [
    (
        "train",
        [
            "--lr",
            "0.001",
            "--order",
            "random",
            "--curriculum",
            "c",
            "--student",
            "s",
            "--out",
            "o",
            "--no-progress",
            "steps=7",
        ],
    ),
    ("score", ["--masks", "3", "--dtype", "bf16", "--preset", "paper"]),
    ("curriculum", ["--shard-size", "50", "--nonfinite", "exclude", "--no-plots"]),
    ("shard", ["--input", "x.jsonl", "max_length=64", "--format", "jsonl", "--no-dedup"]),
    ("eval yesno", ["--seeds", "2", "--lr", "0.0001", "weight_decay=0.1"]),
    ("tokenizer", ["--vocab-size", "3000", "--lowercase"]),
    ("init-models", ["--preset", "minilm"]),
    ("teacher-cache", ["--method", "hybrid", "--head", "8", "--draws", "2"]),
    ("eval mlm", ["--masks", "3", "--split", "all"]),
    ("experiment", ["--seeds", "4", "--arms", "kd", "--arms", "kd-cl", "--yesno"]),
    ("demo", ["--steps", "20", "--max-docs", "300"]),
]


@pytest.mark.parametrize("cmd, argv", ROUND_TRIP, ids=[c for c, _ in ROUND_TRIP])
def test_print_config_round_trips(cmd, argv, tmp_path, capsys):
    words = cmd.split()
    assert cli.main([*words, *argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    (section,) = data
    cfg_file = tmp_path / "printed.yaml"
    cfg_file.write_text(printed)
    assert cli.main([*words, "--config", str(cfg_file), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    # the same dataclass: resolved from the file alone vs from the original command line
    p = _parser(words[0]) if len(words) == 1 else _sub(_parser(words[0]), words[1])
    cli._relax_required(p)  # as main() does with --print-config
    args = p.parse_args(argv)
    overrides = (
        split_overrides(args.input, args.overrides)[1]
        if isinstance(getattr(args, "input", None), list)
        else args.overrides
    )
    want = resolve_args(args, overrides, check=False)
    got = resolve(type(want), section, config_file=str(cfg_file), check=False)
    assert got == want
    assert dataclasses.asdict(got) == data[section]


def test_print_config_needs_no_paths_and_does_no_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # score requires --shards/--model/--out, but not for printing; nothing is created
    assert cli.main(["score", "--print-config", "--out", "not-made"]) == 0
    assert "score:\n  masks: 2\n" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    # range errors still apply, one line
    assert cli.main(["score", "--print-config", "--masks", "0"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "kdcl-dist score: error: score.masks: 0 is below the minimum 1"
    )


def test_precedence_preset_config_flag_override(tmp_path, capsys):
    def printed(*argv):
        assert cli.main(["train", *argv, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)["train"]

    assert printed()["lr"] == 5e-4  # dataclass default
    assert printed("--preset", "paper")["lr"] == 5e-5  # preset
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.002\n  warmup_steps: 3\n")
    got = printed("--preset", "paper", "--config", str(f))
    assert (
        got["lr"] == 0.002 and got["warmup_steps"] == 3 and got["global_batch"] == 256
    )  # file > preset
    got = printed("--preset", "paper", "--config", str(f), "--lr", "0.003")
    assert got["lr"] == 0.003 and got["warmup_steps"] == 3  # flag > file
    got = printed(
        "--preset",
        "paper",
        "--config",
        str(f),
        "--lr",
        "0.003",
        "train.lr=0.004",
        "--warmup-steps",
        "9",
    )
    assert got["lr"] == 0.004 and got["warmup_steps"] == 9  # override > flag


def test_experiment_plan_with_no_progress_passes_it_to_every_stage(tmp_path):
    """`experiment --no-progress --plan`: in-process, no step runs; each stage line carries it once."""
    import json

    from kdcl_dist.data.synthetic import synthetic_documents
    from kdcl_dist.experiment import PROGRESS_STAGES, Experiment, ExperimentConfig

    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w") as f:
        for doc_id, text in synthetic_documents(50, seed=3):
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    cfg = ExperimentConfig(arms=["kd", "kd-cl"], seeds=1, steps=7)
    exp = Experiment(corpus, tmp_path / "exp", cfg, progress=False)
    plan, _ = exp.write_plan(tmp_path / "plan.sh")
    lines = [x.split() for x in plan.read_text().splitlines() if x.strip().startswith("run_step ")]
    stages = {}
    for words in lines:
        cmd = words[words.index("kdcl_dist") + 1] if "kdcl_dist" in words else None
        stages.setdefault(cmd, []).append(words)
        assert words.count("--no-progress") == 1, words  # experiment --step too: passed on
    assert {"score", "curriculum", "train", "export", "shard", "experiment"} <= set(stages)
    assert set(stages) - {"experiment"} <= PROGRESS_STAGES
