"""Bad flags and configs: each refused before any work with one line naming the key or file."""

from __future__ import annotations

import pytest

from .conftest import fork_run, one_line_error, train_argv

pytestmark = pytest.mark.faults


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["no_such_key=3"], ["no_such_key"]),  # unknown override key
        (["global_batch=abc"], ["global_batch"]),  # wrong type
        (["lr=-1"], ["lr"]),  # out of range
        (["order=backwards"], ["order", "backwards"]),  # not a choice
        (["--config", "/nonexistent/run.yaml"], ["/nonexistent/run.yaml"]),  # missing config file
        (["--preset", "no-such-preset"], ["no-such-preset"]),  # unknown preset
        (
            ["--resume", "/nonexistent/ckpt"],
            ["/nonexistent/ckpt", "not found"],
        ),  # resume path must exist
    ],
)
def test_train_bad_config_one_line(base, ref, tmp_path, extra, needles):
    out = tmp_path / "train"
    run = fork_run(train_argv(base, ref["cur"], out, *extra), logdir=tmp_path / "t")
    one_line_error(run, *needles)
    assert not (out / "checkpoints").exists()


def test_bad_yaml_config_file(base, ref, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    run = fork_run(
        train_argv(base, ref["cur"], tmp_path / "train", "--config", p), logdir=tmp_path / "t"
    )
    one_line_error(run, "bad.yaml")
