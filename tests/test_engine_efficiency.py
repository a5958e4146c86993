"""GPU-efficiency options of the KD engine, checked on CPU in a real DeepSpeed engine (one process):
activation checkpointing gives the same update, the teacher's dtype and fp32 LM head, the GPU
configs' fused AdamW reaching torch, and length-grouped micro-batches giving the same step as
padded ones (the loss is normalised by the global masked count, whatever the split)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import copy, json, sys
import numpy as np, torch
from kdcl_dist.train import init_distributed
from kdcl_dist.kd import engine as kde
from kdcl_dist.kd.models import load_mlm
from kdcl_dist.curriculum.sampler import collate

init_distributed()
teacher_dir, student_dir = sys.argv[1], sys.argv[2]
out = {}
t0 = load_mlm(teacher_dir, role="teacher")
s0 = load_mlm(student_dir, role="student")
V = s0.config.vocab_size
rng = np.random.default_rng(0)

def items(lengths):
    res = []
    for i, n in enumerate(lengths):
        ids = rng.integers(5, V, size=n)
        lab = np.full(n, -100)
        pick = rng.random(n) < 0.2
        pick[1] = True
        lab[pick] = ids[pick]
        x = ids.copy()
        x[pick] = 4
        res.append({"position": i, "input_ids": x, "labels": lab, "score": 0.0})
    return res

lengths = [9, 40, 12, 33, 17, 38, 10, 29]
its = items(lengths)
padded = [collate(its[:4], 0), collate(its[4:], 0)]
order = np.argsort(lengths, kind="stable")
grouped = [collate([its[i] for i in order[:4]], 0), collate([its[i] for i in order[4:]], 0)]

def engine(ckpt=False, teacher=True, **opts):
    cfg = kde.prepare_student_config("cpu_fp32", global_batch=8, micro_batch=4, world_size=1,
        lr=1e-3, warmup_steps=0, total_steps=10, on_gpu=False)
    return kde.KDEngine(copy.deepcopy(s0), copy.deepcopy(t0) if teacher else None, cfg,
        world_size=1, options=kde.EngineOptions(gradient_checkpointing=ckpt, **opts))

def run(eng, mbs, steps=2):
    res = []
    for _ in range(steps):
        torch.manual_seed(7)  # the same dropout draws in both engines
        r = eng.step(mbs, lambda p: 0.5)
        res.append(r["acc"].tolist())
    w = eng.student_state_dict()
    return w, res

wa, ra = run(engine(False), padded)
eb = engine(True)
out["ckpt_on"] = bool(eb.engine.module.is_gradient_checkpointing)
wb, rb = run(eb, padded)
out["ckpt_max_diff"] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
out["ckpt_loss"] = [ra, rb]
# padded vs length-grouped split of the same batch, without dropout (whose draws follow the split)
from transformers import AutoModelForMaskedLM
c = copy.deepcopy(s0.config)
for k, v in list(vars(c).items()):
    if "dropout" in k and isinstance(v, float):
        setattr(c, k, 0.0)
s_nd = AutoModelForMaskedLM.from_config(c)
s_nd.load_state_dict(s0.state_dict())
s_keep, s0 = s0, s_nd
wp, rp = run(engine(False), padded)
wg, rg = run(engine(False), grouped)
s0 = s_keep
out["grouped_max_diff"] = max(float((wp[k] - wg[k]).abs().max()) for k in wp)
out["grouped_loss"] = [rp, rg]

# teacher dtype and fp32 head
e32 = engine(teacher=True)
ebf = engine(teacher=True, teacher_dtype="bf16", teacher_head_fp32=True)
ebf_plain = engine(teacher=True, teacher_dtype="bf16")
mb = padded[0]
fi = torch.nonzero(mb["labels"].reshape(-1) != -100).squeeze(1)
_, l32 = e32._teacher_forward(mb["input_ids"], mb["attention_mask"], fi)
_, lbf = ebf._teacher_forward(mb["input_ids"], mb["attention_mask"], fi)
_, lpl = ebf_plain._teacher_forward(mb["input_ids"], mb["attention_mask"], fi)
with torch.inference_mode():
    _, raw_bf = ebf_plain.teacher(mb["input_ids"], mb["attention_mask"], fi)
out["teacher_dtype"] = str(next(ebf.teacher.parameters()).dtype)
out["raw_plain_dtype"] = str(raw_bf.dtype)
out["err_head_fp32"] = float((lbf - l32).abs().max())
out["err_plain_bf16"] = float((lpl - l32).abs().max())
try:
    engine(teacher=True, teacher_dtype="fp16", teacher_hosting="zero3")
    out["zero3_dtype"] = "accepted"
except Exception as e:
    out["zero3_dtype"] = str(e)

# the GPU configs' optimizer: torch's fused AdamW through DeepSpeed (CPU fused kernel here)
cfg = kde.prepare_student_config("zero2_bf16", global_batch=8, micro_batch=4, world_size=1,
    lr=1e-3, warmup_steps=0, total_steps=10, on_gpu=True)
cfg.pop("bf16"); cfg["zero_optimization"] = {"stage": 0}
import deepspeed
lin = torch.nn.Linear(4, 4)
eng, opt, *_ = deepspeed.initialize(model=lin, model_parameters=lin.parameters(), config=cfg)
out["optimizer"] = [type(opt).__name__, bool(opt.defaults.get("fused"))]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result(tiny_assets, tmp_path_factory):
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_assets["teacher"]), str(tiny_assets["student"])],
        cwd=tmp_path_factory.mktemp("eng"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[-1][7:])


def test_activation_checkpointing_same_update(result):
    assert result["ckpt_on"]
    assert result["ckpt_max_diff"] < 1e-6, result["ckpt_max_diff"]
    a, b = result["ckpt_loss"]
    assert sum(a, []) == pytest.approx(sum(b, []), rel=1e-6)


def test_length_grouped_micro_batches_same_update(result):
    # same samples, another split: the same global-batch loss and update up to float round-off
    a, g = result["grouped_loss"]
    assert a[0][:3] == pytest.approx(g[0][:3], rel=1e-5)
    assert a[1][:3] == pytest.approx(g[1][:3], rel=1e-4)
    assert result["grouped_max_diff"] < 1e-5, result["grouped_max_diff"]


def test_teacher_dtype_and_fp32_head(result):
    assert result["teacher_dtype"] == "torch.bfloat16"
    assert result["raw_plain_dtype"] == "torch.bfloat16"
    # the fp32 head removes the head's share of the bf16 error
    assert result["err_head_fp32"] < result["err_plain_bf16"]
    assert "teacher hosting zero3 runs in its DeepSpeed config's precision" in result["zero3_dtype"]


def test_gpu_configs_use_torch_fused_adamw(result):
    assert result["optimizer"] == ["AdamW", True]
