"""Export and eval faults: SIGKILL at seeded times then a re-run, ENOSPC, incomplete or missing
checkpoints, missing models, shards of another tokenizer; exported models are safetensors only."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from .conftest import (
    STEPS,
    cut_file,
    eval_argv,
    export_argv,
    fork_refused,
    fork_run,
    json_pair,
    must,
    rerun_with_space,
    same_weights,
    shard_argv,
    small_fs,
    student_weights,
    with_flag,
)

pytestmark = pytest.mark.faults


def _tensors(d) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _same_export(out, ref) -> None:
    a, b = _tensors(out), _tensors(ref["export"])
    assert not same_weights(a, b)
    ea, eb = json_pair("export.json", out, ref["export"])
    assert (ea["tag"], ea["step"], ea["model_sha256"]) == (
        eb["tag"],
        eb["step"],
        eb["model_sha256"],
    )


def _exported_from(hf, train, step: int) -> None:
    """The export in `hf` was made from checkpoint global_step<step> of `train`, weight for weight."""
    assert json.loads((hf / "export.json").read_text())["tag"] == f"global_step{step}"
    w = student_weights(train / "checkpoints" / f"global_step{step}")
    t = _tensors(hf)
    assert all(bool((w[k] == t[k]).all()) for k in set(w) & set(t))


def _delay(seed: int, wall: float) -> float:
    return random.Random(2000 + seed).uniform(0.05, 0.95) * wall


@pytest.mark.parametrize("seed", range(5))
def test_export_sigkill_then_rerun(ref, tmp_path, seed):
    out = tmp_path / "hf"
    killed = fork_run(
        export_argv(ref["train"], out),
        kill_after=(0, _delay(seed, ref["export_run"].wall)),
        logdir=tmp_path / "k",
    )
    assert killed.rcs[0] in (-9, 0), killed.text()
    if out.exists():  # the directory appears only complete (renamed from a temporary one)
        _same_export(out, ref)
    must(fork_run(export_argv(ref["train"], out), logdir=tmp_path / "r"), "re-run")
    _same_export(out, ref)
    assert not list(tmp_path.glob(".tmp-export-*")), "the killed export's temp dir was not cleaned"


def test_export_is_safetensors_only(ref):
    files = sorted(p.name for p in ref["export"].iterdir())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    # and it equals the consolidated checkpoint it came from
    w = student_weights(ref["train"] / "checkpoints" / f"global_step{STEPS}")
    t = _tensors(ref["export"])
    common = set(w) & set(t)
    assert len(common) >= len(t) - 1 and all(bool((w[k] == t[k]).all()) for k in common)


def test_export_skips_incomplete_latest_checkpoint(ref, tmp_path):
    train = shutil.copytree(ref["train"], tmp_path / "train")
    (train / "checkpoints" / f"global_step{STEPS}" / "kdcl_complete.json").unlink()
    must(fork_run(export_argv(train, tmp_path / "hf"), logdir=tmp_path / "e"), "export")
    _exported_from(tmp_path / "hf", train, STEPS - 2)


def test_export_refuses_incomplete_tag(ref, tmp_path):
    train = shutil.copytree(ref["train"], tmp_path / "train")
    tag = train / "checkpoints" / f"global_step{STEPS}"
    (tag / "kdcl_complete.json").unlink()
    cut_file(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 1000)
    fork_refused(
        export_argv(train, tmp_path / "hf", "--tag", tag.name),
        tmp_path / "e",
        "global_step",
        "incomplete",
    )
    # the same checkpoint named by its directory
    fork_refused(
        export_argv(tag, tmp_path / "hf"), tmp_path / "e2", f"global_step{STEPS}", "incomplete"
    )
    assert not (tmp_path / "hf").exists()


def _cut_after_marker(tag_dir, name="mp_rank_00_model_states.pt"):
    return cut_file(tag_dir / name, 5000)


def test_export_refuses_damaged_tag(ref, tmp_path):
    """Complete (marker written) but a file was cut afterwards: --tag is refused, naming the file."""
    train = shutil.copytree(ref["train"], tmp_path / "train")
    tag = train / "checkpoints" / f"global_step{STEPS}"
    _cut_after_marker(tag)
    fork_refused(
        export_argv(train, tmp_path / "hf", "--tag", tag.name),
        tmp_path / "e",
        "mp_rank_00_model_states.pt",
        "damaged",
        f"global_step{STEPS - 2}",
    )
    assert not (tmp_path / "hf").exists()


def test_export_skips_damaged_newest_checkpoint(ref, tmp_path):
    """Without --tag the newest *intact* checkpoint is exported, with a warning naming the damage."""
    train = shutil.copytree(ref["train"], tmp_path / "train")
    _cut_after_marker(train / "checkpoints" / f"global_step{STEPS}")
    run = must(fork_run(export_argv(train, tmp_path / "hf"), logdir=tmp_path / "e"), "export")
    assert (
        "skipping the damaged checkpoint" in run.text()
        and "mp_rank_00_model_states.pt" in run.text()
    )
    _exported_from(tmp_path / "hf", train, STEPS - 2)


def test_export_plain_deepspeed_latest_stays_inside_the_checkpoint_dir(ref, tmp_path):
    """Security: a plain DeepSpeed directory (no kdcl markers) falls back to its `latest` tag, but
    only to a directory inside it: a `latest` naming another path is refused, nothing is read there."""
    plain = tmp_path / "plain"
    src = ref["train"] / "checkpoints" / f"global_step{STEPS}"
    shutil.copytree(
        src, plain / "global_step5", ignore=shutil.ignore_patterns("kdcl_complete.json")
    )
    elsewhere = shutil.copytree(src, tmp_path / "elsewhere" / f"global_step{STEPS}")
    student = ref["train"] / "student_config"
    (plain / "latest").write_text(f"../elsewhere/global_step{STEPS}")
    fork_refused(
        export_argv(plain, tmp_path / "hf", "--student", student),
        tmp_path / "e",
        "latest",
        "not a checkpoint directory inside",
    )
    assert not (tmp_path / "hf").exists()
    fork_refused(
        export_argv(plain, tmp_path / "hf", "--student", student, "--tag", "../elsewhere"),
        tmp_path / "e2",
        "no checkpoint with tag",
    )
    assert (elsewhere / "kdcl_complete.json").exists()
    # a `latest` that names a tag inside is used (with a warning: nothing to verify it against)
    (plain / "latest").write_text("global_step5")
    run = must(
        fork_run(
            export_argv(plain, tmp_path / "hf", "--student", student, "--no-verify"),
            logdir=tmp_path / "e3",
        ),
        "export of a plain DeepSpeed dir",
    )
    assert "unverified" in run.text()
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["tag"] == "global_step5"
    assert not same_weights(_tensors(tmp_path / "hf"), _tensors(ref["export"]))


def test_trust_remote_code_never_runs_model_code(ref, tmp_path):
    """Security: a model directory that asks for custom code (auto_map) is refused by the loaders;
    its Python file is never imported."""
    from kdcl_dist.errors import UserError
    from kdcl_dist.export import build_student
    from kdcl_dist.kd.models import load_mlm

    evil = tmp_path / "evil"
    shutil.copytree(ref["export"], evil)
    sentinel = tmp_path / "code-ran"
    (evil / "modeling_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    (evil / "configuration_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(
        {
            "model_type": "evil",
            "auto_map": {
                "AutoConfig": "configuration_evil.EvilConfig",
                "AutoModelForMaskedLM": "modeling_evil.EvilModel",
            },
        }
    )
    (evil / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="evil"):
        load_mlm(str(evil))
    with pytest.raises(UserError, match="evil"):
        build_student(str(evil), {})
    assert not sentinel.exists()


def test_export_enospc_then_rerun(ref, tmp_path):
    out = tmp_path / "fs"
    with small_fs(out, "128k") as remount:
        target = out / "hf"
        fork_refused(
            export_argv(ref["train"], target),
            tmp_path / "k",
            "No space left on device",
            "point --out elsewhere",
            enospc_at=None if remount else 1,
        )
        assert not (target / "model.safetensors").exists()
        assert not list(out.glob(".tmp-*")), (
            "the failed export's temp dir holds the space a re-run needs"
        )
        rerun_with_space(export_argv(ref["train"], target), remount, tmp_path / "r")
        _same_export(target, ref)


def test_export_missing_checkpoint_path(tmp_path):
    fork_refused(
        export_argv(tmp_path / "nowhere", tmp_path / "hf"), tmp_path / "e", "nowhere", "not found"
    )


# ---- eval ---------------------------------------------------------------------------------


def _eval_result(p) -> dict:
    d = json.loads(p.read_text())
    d.pop("seconds", None)
    return d


@pytest.mark.parametrize("seed", range(5))
def test_eval_sigkill_then_rerun(ref, tmp_path, seed):
    out = tmp_path / "eval.json"
    killed = fork_run(
        eval_argv(ref["export"], ref["shards"], out),
        kill_after=(0, _delay(seed, ref["eval_run"].wall)),
        logdir=tmp_path / "k",
    )
    assert killed.rcs[0] in (-9, 0), killed.text()
    if out.exists():
        assert _eval_result(out) == _eval_result(ref["eval"])
    must(fork_run(eval_argv(ref["export"], ref["shards"], out), logdir=tmp_path / "r"), "re-run")
    assert _eval_result(out) == _eval_result(ref["eval"])


def test_eval_missing_model_path(ref, tmp_path):
    fork_refused(
        eval_argv(tmp_path / "no-model", ref["shards"], tmp_path / "e.json"),
        tmp_path / "e",
        "no-model",
    )


def test_eval_shards_of_other_tokenizer_refused(base, ref, tmp_path):
    argv = with_flag(shard_argv(base, tmp_path / "shards2"), "--tokenizer", base["tokenizer2"])
    must(fork_run(argv, logdir=tmp_path / "s"), "shards with tokenizer2")
    fork_refused(
        eval_argv(ref["export"], tmp_path / "shards2", tmp_path / "e.json"),
        tmp_path / "e",
        "tokenizer",
    )
    assert not (tmp_path / "e.json").exists()


def test_eval_corrupt_manifest(ref, tmp_path):
    shards = shutil.copytree(ref["shards"], tmp_path / "shards")
    (shards / "dataset.json").write_text("[")
    fork_refused(
        eval_argv(ref["export"], shards, tmp_path / "e.json"), tmp_path / "e", "dataset.json"
    )
