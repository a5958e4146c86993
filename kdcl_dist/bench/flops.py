"""Model FLOPs of BERT/DistilBERT MLM steps, and model-FLOPs utilisation (MFU) against a peak table.

FLOP model (multiply-accumulate = 2 FLOPs) of one encoder forward over a sample of n real tokens,
per layer with hidden h and FFN f: 2·n·(4h² + 2hf + 2nh) (projections, FFN, QKᵀ and AV);
the LM head per row it runs on (the masked rows only): 2·(h² + hV); backward = 2 × forward.
Embeddings, layer norms, softmax and the optimizer are not counted. "Model FLOPs" count real
tokens only: padding is work the hardware does that the model does not need, so it lowers MFU.

MFU = model FLOPs per second ÷ the device's dense bf16 peak (vendor data sheets, no sparsity).
Unknown devices: set $KDCL_PEAK_TFLOPS; on CPU only the achieved GFLOP/s is printed.
"""

from __future__ import annotations

import os

# dense bf16 tensor-core peak, TFLOP/s (SXM parts; NVIDIA data sheets)
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def encoder_flops(spec: dict, lengths) -> float:
    """Forward FLOPs of the encoder over samples of the given real lengths."""
    h, f, layers = spec["hidden"], spec["ffn"], spec["layers"]
    return float(sum(2.0 * n * layers * (4 * h * h + 2 * h * f + 2 * n * h) for n in lengths))


def head_flops(spec: dict, vocab: int, rows: int) -> float:
    h = spec["hidden"]
    return 2.0 * rows * (h * h + h * vocab)


def step_flops(teacher: dict | None, student: dict, vocab: int, lengths, rows: int) -> float:
    """Model FLOPs of one training step: student forward + backward (3×), plus the teacher's
    forward when `teacher` is given (KD)."""
    s = 3.0 * (encoder_flops(student, lengths) + head_flops(student, vocab, rows))
    if teacher is None:
        return s
    return s + encoder_flops(teacher, lengths) + head_flops(teacher, vocab, rows)


def peak_flops(device) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) of a CUDA device; (None, reason) when unknown or CPU."""
    env = os.environ.get("KDCL_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12, "$KDCL_PEAK_TFLOPS"
    if getattr(device, "type", str(device)) != "cuda":
        return None, "CPU: no MFU (achieved GFLOP/s only)"
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12, f"{key} dense bf16 {tf:.0f} TFLOP/s"
    return None, f"{name}: no peak in kdcl_dist/bench/flops.py (set $KDCL_PEAK_TFLOPS)"


def rate_text(flops: float, seconds: float, peak: float | None) -> str:
    """'123.4 GFLOP/s' or '45.6 TFLOP/s  MFU 12.3%'."""
    r = flops / max(seconds, 1e-12)
    if peak is None:
        return f"{r / 1e9:.1f} GFLOP/s"
    return f"{r / 1e12:.1f} TFLOP/s  MFU {100 * r / peak:.1f}%"
