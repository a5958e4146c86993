"""Benchmark of one KD training step (plain torch on the models; optionally the real KDEngine).

    kdcl-dist bench train                                  # tiny preset on CPU
    kdcl-dist bench train --preset paper-size --device cuda --dtype bf16 --seq-len 128

Printed side by side, measured in one run (medians of interleaved repeats):

1. KD step time ÷ student-only step time, next to the FLOP prediction
   1 + F(teacher forward) / F(student forward + backward)   (target: measured <= 1.10 × predicted).
   A KD step = teacher forward under inference_mode + student forward/backward + AdamW step;
   the student-only step drops the teacher. Both run the LM heads on masked positions only.
2. Masked-only LM head (hidden states gathered at the masked positions, head on those rows:
   [M, V] logits) against full-vocabulary logits ([B, T, V], then gathered), for the KD step:
   step time (speed-up) and peak memory of both (GPU: torch.cuda.max_memory_allocated; CPU:
   peak RSS increase of one step in a fresh process, read from /proc/self/status VmHWM after
   resetting it through /proc/self/clear_refs).
3. samples/s and tokens/s of each step.

FLOP model (multiply-accumulate = 2 FLOPs), per token and layer with hidden h, FFN f,
sequence L: 2·(4h² + 2hf + 2Lh); the LM head per row it runs on: 2·(h² + hV); backward = 2 ×
forward. Embedding lookups, layer norms, softmax and the optimizer step are not counted, so
the prediction is a lower bound that the measurement approaches as models grow.

Presets: `tiny` (BERT 4×256 teacher, DistilBERT 2×256 student, vocab 8000, batch 16 × 128:
CPU-sized) and `paper-size` (BERT-base 12×768 teacher, DistilBERT 6×768 student, vocab 28996,
batch 32 × 128; the paper's pair with random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

PRESETS = {
    "tiny": {
        "teacher": {"layers": 4, "hidden": 256, "heads": 4, "ffn": 1024},
        "student": {"layers": 2, "hidden": 256, "heads": 4, "ffn": 1024},
        "vocab": 8000,
        "batch": 16,
        "seq_len": 128,
    },
    "paper-size": {
        "teacher": {"layers": 12, "hidden": 768, "heads": 12, "ffn": 3072},
        "student": {"layers": 6, "hidden": 768, "heads": 12, "ffn": 3072},
        "vocab": 28996,
        "batch": 32,
        "seq_len": 128,
    },
}
VARIANTS = ("student", "kd", "kd_full")  # student-only, KD masked-only heads, KD full-vocab logits


def add_arguments(p):
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="model sizes to time (default tiny)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default auto: cuda when available",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="GPU: autocast dtype of the student and dtype of the teacher (default bf16); CPU: fp32",
    )
    p.add_argument("--batch", type=int, help="samples per step (default: preset)")
    p.add_argument(
        "--seq-len",
        dest="seq_len",
        type=int,
        help="tokens per sample (default: preset; 128 or 256)",
    )
    p.add_argument(
        "--repeats", type=int, default=7, help="timed steps per variant (median reported)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)"
    )
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature (default 2.0)")
    p.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement"
    )
    p.add_argument(
        "--engine",
        action="store_true",
        help="also time the real KDEngine step (DeepSpeed, ZeRO config --ds-config) KD vs student-only",
    )
    p.add_argument(
        "--ds-config",
        dest="ds_config",
        default=None,
        help="DeepSpeed config for --engine, a packaged name or a file (default cpu_fp32 on CPU, zero2_bf16 on GPU)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="--engine: activation checkpointing in the student",
    )
    p.add_argument(
        "--teacher-dtype",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="--engine: the teacher's dtype (auto: bf16 on GPU)",
    )
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    from kdcl_dist.bench.train_batching import add_arguments as batching_arguments

    batching_arguments(p)


# ---- models and batch ---------------------------------------------------------------------


def build_models(preset: dict, seed: int = 0):
    import torch
    from transformers import AutoModelForMaskedLM, BertConfig, DistilBertConfig

    t, s, V = preset["teacher"], preset["student"], preset["vocab"]
    torch.manual_seed(seed)
    teacher = AutoModelForMaskedLM.from_config(
        BertConfig(
            vocab_size=V,
            hidden_size=t["hidden"],
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            intermediate_size=t["ffn"],
            max_position_embeddings=512,
            pad_token_id=0,
        )
    )
    student = AutoModelForMaskedLM.from_config(
        DistilBertConfig(
            vocab_size=V,
            dim=s["hidden"],
            n_layers=s["layers"],
            n_heads=s["heads"],
            hidden_dim=s["ffn"],
            max_position_embeddings=512,
            pad_token_id=0,
        )
    )
    return teacher, student


def make_batch(V: int, batch: int, seq_len: int, seed: int = 0, mask_prob: float = 0.15):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (batch, seq_len), generator=g)
    attn = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(batch, seq_len, generator=g) < mask_prob
    pick[:, 0] = True  # at least one masked token per sample
    labels[pick] = ids[pick]
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "labels": labels,
        "positions": torch.arange(batch),
    }


def forward_flops(spec: dict, V: int, tokens: int, seq_len: int, head_rows: int) -> float:
    h, f = spec["hidden"], spec["ffn"]
    enc = 2.0 * tokens * spec["layers"] * (4 * h * h + 2 * h * f + 2 * seq_len * h)
    head = 2.0 * head_rows * (h * h + h * V)
    return enc + head


# ---- one step of each variant -------------------------------------------------------------


class Stepper:
    """Runs one optimizer step of a variant on a fixed batch (models already on the device)."""

    def __init__(self, teacher, student, batch, device, dtype, temperature):
        import torch

        from kdcl_dist.kd.models import mlm_parts

        self.torch = torch
        self.device, self.dtype, self.tau = device, dtype, temperature
        self.teacher, self.student = teacher, student
        self.t_enc, self.t_head = mlm_parts(teacher)
        self.s_enc, self.s_head = mlm_parts(student)
        self.opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        self.ids = batch["input_ids"].to(device)
        self.attn = batch["attention_mask"].to(device)
        labels = batch["labels"].reshape(-1)
        self.flat = torch.nonzero(labels != -100).squeeze(1).to(device)
        self.labels = labels[labels != -100].to(device)
        self.autocast = (
            torch.autocast("cuda", dtype=dtype)
            if device.type == "cuda" and dtype != torch.float32
            else _nullcontext()
        )

    def init_optimizer_state(self):
        """Allocate AdamW's moments now (zero grads) so memory deltas measure activations only."""
        for p in self.student.parameters():
            p.grad = self.torch.zeros_like(p)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _masked(self, enc, head, ids, attn):
        h = enc(input_ids=ids, attention_mask=attn)[0]
        return head(h.reshape(-1, h.shape[-1]).index_select(0, self.flat))

    def _full(self, model, ids, attn):
        logits = model(input_ids=ids, attention_mask=attn).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, self.flat)

    def step(self, variant: str) -> None:
        torch = self.torch
        from kdcl_dist.kd import losses

        full = variant == "kd_full"
        if variant != "student":
            with torch.inference_mode():
                t_logits = (
                    self._full(self.teacher, self.ids, self.attn)
                    if full
                    else self._masked(self.t_enc, self.t_head, self.ids, self.attn)
                )
            t_logits = t_logits.float().clone()  # inference tensors cannot enter the graph
        with self.autocast:
            s_logits = (
                self._full(self.student, self.ids, self.attn)
                if full
                else self._masked(self.s_enc, self.s_head, self.ids, self.attn)
            )
        n = float(len(self.labels))
        if variant == "student":
            loss = (
                torch.nn.functional.cross_entropy(s_logits.float(), self.labels, reduction="sum")
                / n
            )
        else:
            loss = losses.masked_kd_losses(s_logits, t_logits, self.labels, 0.5, self.tau, n)[
                "loss"
            ]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _setup(args, preset):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        from kdcl_dist.errors import UserError

        raise UserError("bench train --device cuda: no CUDA device is visible; use --device cpu")
    device = torch.device(dev)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if dev == "cuda" else "fp32")
    if dev == "cpu" and dtype_name != "fp32":
        from kdcl_dist.errors import UserError

        raise UserError(
            f"bench train --dtype {dtype_name}: reduced precision is for GPUs; use --dtype fp32 on CPU"
        )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    teacher, student = build_models(preset)
    teacher = teacher.to(device=device, dtype=dtype if dev == "cuda" else torch.float32).eval()
    teacher.requires_grad_(False)
    student = student.to(device).train()
    batch = make_batch(preset["vocab"], preset["batch"], preset["seq_len"])
    return device, dtype, dtype_name, teacher, student, batch


def _time_variants(stepper, variants, repeats: int, warmup: int) -> dict:
    for v in variants:
        for _ in range(warmup):
            stepper.step(v)
    stepper.sync()
    times = {v: [] for v in variants}
    for _ in range(repeats):  # interleaved, so machine noise hits every variant alike
        for v in variants:
            t0 = time.perf_counter()
            stepper.step(v)
            stepper.sync()
            times[v].append(time.perf_counter() - t0)
    return times


# ---- memory ---------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _memory_probe(args_dict: dict, preset: dict, variant: str) -> dict:
    """In a fresh process: peak RSS increase of one step of `variant` (CPU)."""
    import gc

    args = argparse.Namespace(**args_dict)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    device, dtype, _, teacher, student, batch = _setup(args, preset)
    st = Stepper(teacher, student, batch, device, dtype, args.temperature)
    st.init_optimizer_state()
    gc.collect()
    before = _proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (includes model build)"
    st.step(variant)
    peak = _proc_status_kb("VmHWM")
    if method.startswith("ru_maxrss"):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_delta_mb": (peak - before) / 1024.0, "method": method}


def measure_memory(args, preset, device, stepper) -> dict:
    """Peak memory of one KD step, masked-only vs full-vocabulary heads."""
    out = {}
    if device.type == "cuda":
        import torch

        for v in ("kd", "kd_full"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            stepper.step(v)
            torch.cuda.synchronize()
            out[v] = {
                "peak_delta_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
                "method": "torch.cuda.max_memory_allocated",
            }
        return out
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for v in ("kd", "kd_full"):
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
            out[v] = ex.submit(_memory_probe, {**vars(args), "engine": False}, preset, v).result()
    return out


# ---- the real engine (optional) -----------------------------------------------------------------


def count_syncs(fn) -> int:
    """Device->host synchronisations torch reports during `fn()` (CUDA sync debug mode: one
    warning per synchronising call, DeepSpeed's own included)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def time_engine(args, preset, device, batch) -> dict:
    """KDEngine.step (DeepSpeed) with and without a teacher, single process."""
    import copy

    from kdcl_dist.kd import engine as kde
    from kdcl_dist.train import init_distributed

    init_distributed()
    on_gpu = device.type == "cuda"
    ds_path = args.ds_config or ("zero2_bf16" if on_gpu else "cpu_fp32")
    B = preset["batch"]
    res = {}
    teacher0, student0 = build_models(preset)
    for name, with_teacher in (("student", False), ("kd", True)):
        cfg = kde.prepare_student_config(
            ds_path,
            global_batch=B,
            micro_batch=B,
            world_size=1,
            lr=1e-4,
            warmup_steps=0,
            total_steps=10**6,
            on_gpu=on_gpu,
        )
        eng = kde.KDEngine(
            copy.deepcopy(student0),
            copy.deepcopy(teacher0) if with_teacher else None,
            cfg,
            world_size=1,
            options=kde.EngineOptions(
                temperature=args.temperature,
                gradient_checkpointing=args.gradient_checkpointing,
                teacher_dtype=args.teacher_dtype,
            ),
        )
        times = []
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            eng.step([batch], lambda p: 0.5)
            if on_gpu:
                import torch

                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        res[name] = times
        if on_gpu:
            import functools

            res[f"{name}_syncs"] = count_syncs(functools.partial(eng.step, [batch], lambda p: 0.5))
        del eng
    res["ds_config"] = ds_path
    return res


# ---- the command ---------------------------------------------------------------------------------


def run(args) -> int:
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    if args.batch:
        preset["batch"] = args.batch
    if args.seq_len:
        preset["seq_len"] = args.seq_len
    device, dtype, dtype_name, teacher, student, batch = _setup(args, preset)
    B, L, V = preset["batch"], preset["seq_len"], preset["vocab"]
    M = int((batch["labels"] != -100).sum())
    T = B * L
    f_t = forward_flops(preset["teacher"], V, T, L, M)
    f_s = 3.0 * forward_flops(preset["student"], V, T, L, M)
    predicted = 1.0 + f_t / f_s

    stepper = Stepper(teacher, student, batch, device, dtype, args.temperature)
    times = _time_variants(stepper, VARIANTS, args.repeats, args.warmup)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    measured = med["kd"] / med["student"]
    mem = measure_memory(args, preset, device, stepper) if args.memory else {}
    eng = time_engine(args, preset, device, batch) if args.engine else None

    import torch

    threads = torch.get_num_threads()
    print(
        f"bench train: preset {args.preset}, device {device.type}"
        f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else f' ({threads} threads)'}, "
        f"dtype {dtype_name}, batch {B} x {L} tokens, {M} masked, vocab {V}; "
        f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up"
    )
    print(
        f"  teacher {preset['teacher']['layers']}x{preset['teacher']['hidden']} fwd {f_t / 1e9:.2f} GFLOP   "
        f"student {preset['student']['layers']}x{preset['student']['hidden']} fwd+bwd {f_s / 1e9:.2f} GFLOP"
    )
    print()
    print(f"  {'':34s}{'measured':>12s}{'predicted':>12s}")
    ok = measured <= 1.10 * predicted
    print(
        f"  {'KD step / student-only step':34s}{measured:12.3f}{predicted:12.3f}   measured/predicted "
        f"{measured / predicted:.3f} (target <= 1.10: {'met' if ok else 'NOT met'})"
    )
    print()
    from kdcl_dist.bench import flops as fl

    peak, peak_src = fl.peak_flops(device)
    model_flops = {"student": f_s, "kd": f_s + f_t, "kd_full": f_s + f_t}
    print(
        f"  {'step':34s}{'time s':>12s}{'samples/s':>12s}{'tokens/s':>12s}   model FLOP rate [{peak_src}]"
    )
    label = {
        "student": "student-only (masked-only head)",
        "kd": "KD (masked-only heads)",
        "kd_full": "KD (full-vocabulary logits)",
    }
    for v in VARIANTS:
        print(
            f"  {label[v]:34s}{med[v]:12.4f}{B / med[v]:12.1f}{T / med[v]:12.0f}   "
            f"{fl.rate_text(model_flops[v], med[v], peak)}"
        )
    speedup = med["kd_full"] / med["kd"]
    print(f"  masked-only head speed-up over full-vocabulary logits (KD step): {speedup:.2f}x")
    if mem:
        mk, mf = mem["kd"]["peak_delta_mb"], mem["kd_full"]["peak_delta_mb"]
        print(
            f"  peak memory of one KD step ({mem['kd']['method']}): masked-only {mk:.1f} MB   "
            f"full-vocabulary {mf:.1f} MB   ratio {mf / max(mk, 1e-9):.2f}x   "
            f"(one fp32 logits tensor: [M, V] {M * V * 4 / 2**20:.1f} MB vs [B*T, V] {T * V * 4 / 2**20:.1f} MB)"
        )
    result = {
        "preset": args.preset,
        "device": device.type,
        "dtype": dtype_name,
        "batch": B,
        "seq_len": L,
        "masked": M,
        "vocab": V,
        "threads": threads,
        "repeats": args.repeats,
        "median_s": med,
        "times_s": times,
        "kd_over_student": measured,
        "predicted": predicted,
        "ratio_to_prediction": measured / predicted,
        "target_met": ok,
        "masked_head_speedup": speedup,
        "memory": mem,
        "flops": {"teacher_fwd": f_t, "student_fwd_bwd": f_s},
        "peak": peak_src,
        "mfu": None if peak is None else {v: model_flops[v] / med[v] / peak for v in VARIANTS},
        "flops_per_s": {v: model_flops[v] / med[v] for v in VARIANTS},
    }
    if eng is not None:
        me = {k: statistics.median(eng[k]) for k in ("student", "kd")}
        r = me["kd"] / me["student"]
        print(
            f"  KDEngine ({eng['ds_config']}): KD {me['kd']:.4f} s   student-only {me['student']:.4f} s   "
            f"ratio {r:.3f} (predicted {predicted:.3f}; measured/predicted {r / predicted:.3f})   "
            f"{B / me['kd']:.1f} samples/s"
        )
        print(
            f"  KDEngine model FLOP rate: KD {fl.rate_text(model_flops['kd'], me['kd'], peak)}   "
            f"student-only {fl.rate_text(model_flops['student'], me['student'], peak)}   "
            f"({T / me['kd']:.0f} / {T / me['student']:.0f} tokens/s)"
        )
        if "kd_syncs" in eng:
            print(
                f"  KDEngine device->host syncs in one steady-state step (torch sync debug mode): "
                f"KD {eng['kd_syncs']}   student-only {eng['student_syncs']}"
            )
        result["engine"] = {
            "median_s": me,
            "ratio": r,
            "ds_config": eng["ds_config"],
            "syncs": {k: eng.get(f"{k}_syncs") for k in ("student", "kd")},
            "flops_per_s": {v: model_flops[v] / me[v] for v in ("student", "kd")},
            "mfu": None
            if peak is None
            else {v: model_flops[v] / me[v] / peak for v in ("student", "kd")},
        }
    if args.batching:
        from kdcl_dist.bench.train_batching import run_batching

        result["batching"] = run_batching(args, preset, device, dtype, build_models)
    if args.json_out:
        from kdcl_dist.utils import write_json_atomic

        write_json_atomic(args.json_out, result)
    return 0
