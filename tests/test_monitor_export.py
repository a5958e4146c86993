"""Monitor (metrics.jsonl + TensorBoard, resume without duplicates) and export from DeepSpeed checkpoints."""

from __future__ import annotations

import json
import math

import pytest

from kdcl_dist.monitor import Monitor, NullMonitor, read_metrics, read_tensorboard


def test_monitor_writes_and_resumes_without_duplicates(tmp_path):
    m = Monitor(tmp_path, 0, 6)
    for step in range(1, 6):
        m.log(
            step, {"loss": 10.0 - step, "lambda": 0.1 * step, "agreement": float("nan"), "epoch": 0}
        )
    m.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["loss"] == 7.0 and rows[0]["agreement"] is None
    # a run that resumed from the checkpoint at step 3 logs steps 4.. again
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # torn line from a kill
    m2 = Monitor(tmp_path, 0, 6)
    for step in range(4, 7):
        m2.log(step, {"loss": 100.0 + step, "lambda": 0.5})
    m2.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [9.0, 8.0, 7.0, 104.0, 105.0, 106.0]
    tb = read_tensorboard(tmp_path / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([9.0, 8.0, 7.0, 104.0, 105.0, 106.0])
    assert "train/agreement" not in tb or all(math.isfinite(v) for _, v in tb["train/agreement"])


def test_monitor_other_ranks_are_noops(tmp_path):
    m = Monitor(tmp_path / "r1", 1, 10)
    assert isinstance(m, NullMonitor)
    m.log(1, {"loss": 1.0})
    m.close()
    assert not (tmp_path / "r1").exists()
    assert isinstance(Monitor(tmp_path / "off", 0, 10, enabled=False), NullMonitor)


def test_monitor_explicit_start_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s}) + "\n" for s in range(1, 9))
    )
    Monitor(tmp_path, 0, 10, start_step=5, tensorboard=False, progress=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


# ---- export ------------------------------------------------------------------------------

_TRAIN_SCRIPT = r"""
import json, os, socket, sys
from pathlib import Path
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                   "LOCAL_RANK": "0"})
import deepspeed, torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

student_dir, out, stage = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
torch.manual_seed(0)
model = AutoModelForMaskedLM.from_pretrained(student_dir)
AutoConfig.from_pretrained(student_dir).save_pretrained(out / "student_config")
AutoTokenizer.from_pretrained(student_dir).save_pretrained(out / "student_config")
cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
       "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
g = torch.Generator().manual_seed(1)
V = model.config.vocab_size
for _ in range(3):
    ids = torch.randint(5, V, (4, 24), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
engine.save_checkpoint(str(out / "checkpoints"), tag="global_step3")
(out / "checkpoints" / "global_step3" / "kdcl_complete.json").write_text(json.dumps({"step": 3, "zero_stage": stage}))
engine.module.eval()
ids = torch.randint(5, V, (3, 20), generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    logits = engine(input_ids=ids).logits
torch.save({"ids": ids, "logits": logits.float()}, out / "ref.pt")
"""


@pytest.mark.parametrize(
    "stage", [pytest.param(0, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)]
)
def test_export_matches_trained_student(stage, tiny_assets, tmp_path):
    import os
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForMaskedLM

    from tests.conftest import run_cli

    train_out = tmp_path / "train"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            _TRAIN_SCRIPT,
            str(tiny_assets["student"]),
            str(train_out),
            str(stage),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ref = torch.load(train_out / "ref.pt")
    run_cli("export", "--checkpoint", train_out, "--out", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists() and (
        tmp_path / "hf" / "tokenizer.json"
    ).exists()
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = model(input_ids=ref["ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)
    # the weights did change during training (the comparison is not against the init)
    init = AutoModelForMaskedLM.from_pretrained(tiny_assets["student"]).eval()
    with torch.no_grad():
        assert (init(input_ids=ref["ids"]).logits - ref["logits"]).abs().max() > 1e-3
    info = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert info["tag"] == "global_step3" and info["step"] == 3


def test_export_errors(tmp_path, tiny_assets):
    from kdcl_dist.errors import UserError
    from kdcl_dist.export import export_checkpoint

    with pytest.raises(UserError, match="not found"):
        export_checkpoint(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "run" / "checkpoints" / "global_step4").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        export_checkpoint(tmp_path / "run", tmp_path / "o")
    with pytest.raises(UserError, match="student config not found"):
        export_checkpoint(tmp_path / "run", tmp_path / "o", tag="global_step4")
    with pytest.raises(UserError, match="mp_rank_00_model_states"):
        export_checkpoint(
            tmp_path / "run",
            tmp_path / "o",
            tag="global_step4",
            student=str(tiny_assets["student"]),
        )


def test_bench_flop_model_matches_torch_counter():
    """The bench's FLOP model equals torch's FlopCounterMode for the student's forward+backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kdcl_dist.bench.train import Stepper, build_models, forward_flops, make_batch

    preset = {
        "teacher": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64},
        "student": {"layers": 2, "hidden": 32, "heads": 2, "ffn": 48},
        "vocab": 300,
    }
    teacher, student = build_models(preset)
    batch = make_batch(300, 3, 40)
    st = Stepper(teacher.eval(), student.train(), batch, torch.device("cpu"), torch.float32, 2.0)
    with FlopCounterMode(display=False) as fc:
        st._masked(st.s_enc, st.s_head, st.ids, st.attn).sum().backward()
    assert fc.get_total_flops() == 3 * forward_flops(
        preset["student"], 300, 120, 40, len(st.labels)
    )
    st.step("kd")  # every variant runs
    st.step("kd_full")
