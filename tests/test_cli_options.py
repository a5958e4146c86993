"""The command-line options generated from the config dataclasses (kdcl_dist.config.add_options).

In-process (parser objects, no subprocesses): every option of every command has help text, config
options show their default and choices, a bad choice is one error line (exit 2), --print-config
round-trips through --config, and the precedence preset < --config < flag < override holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest
import yaml

from kdcl_dist import cli
from kdcl_dist.config import resolve, resolve_args, split_overrides


def _parser(name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(cli.COMMANDS[name][0])
    p = cli._Parser(prog=f"kdcl-dist {name}", formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return p


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
