"""Peak host-memory growth of scoring one source shard, measured in a fresh process.

  PYTHONPATH=. OMP_NUM_THREADS=1 python tests/_score_memory.py --samples 5000 --root /tmp/kdcl-mem

Builds (once, under --root) a WordPiece tokenizer and the tests' tiny student, writes one
source shard of --samples documents (real abstracts when $KDCL_DATA_DIR has them, else the
synthetic corpus), scores a 100-sample shard as a warm-up (imports, model load, allocator
state), returns freed heap memory to the system (malloc_trim), then resets the peak-RSS counter (/proc/self/clear_refs, VmHWM) and runs
`score_shards` on the big shard with the stage's default settings on the CPU (token budget
4096, window 8192 rows, K=2, prefetch thread). Prints one JSON line: the peak RSS above the
RSS before that call (`peak_delta_mib`), the RSS left after it, the batches and the time.

tests/test_outputs_round2.py runs it for 500 and 5,000 samples; docs/curriculum.md quotes it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--max-length", dest="max_length", type=int, default=128)
    ap.add_argument("--root", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("KDCL_LOG_LEVEL", "WARNING")

    import torch
    from conftest import TINY_STUDENT, corpus_docs

    from kdcl_dist.curriculum import scoring
    from kdcl_dist.data.shards import write_documents
    from kdcl_dist.data.synthetic import synthetic_documents
    from kdcl_dist.data.tokenizer import load_tokenizer, train_wordpiece
    from kdcl_dist.kd.models import init_model_dir

    torch.set_num_threads(1)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    docs = corpus_docs(args.samples)
    if len(docs) < args.samples:  # fewer real abstracts than asked: top up with synthetic ones
        docs += [
            (f"syn-{i}", t)
            for i, (_, t) in enumerate(synthetic_documents(args.samples - len(docs)))
        ]
    student = root / "student"
    if not (student / "config.json").exists():
        tok = train_wordpiece((t for _, t in docs[:2000]), root / "tok", vocab_size=1000)
        init_model_dir(TINY_STUDENT, tok, student, seed=2, max_positions=512)
    tok = load_tokenizer(str(student))
    warm, big = root / f"warm-{args.max_length}", root / f"shard-{args.samples}-{args.max_length}"
    if not (warm / "dataset.json").exists():
        write_documents(docs[:100], tok, warm, max_length=args.max_length, shard_size=100)
    if not (big / "dataset.json").exists():
        write_documents(docs, tok, big, max_length=args.max_length, shard_size=len(docs))
    del docs
    cfg = scoring.ScoreConfig(progress=False)
    cpu = torch.device("cpu")
    shutil.rmtree(root / "scores-warm", ignore_errors=True)
    scoring.score_shards(warm, student, root / "scores-warm", cfg, device=cpu)
    out = root / f"scores-{args.samples}"
    shutil.rmtree(out, ignore_errors=True)
    batches = [0]
    real = scoring.Scorer.losses

    def losses(self, b):
        batches[0] += 1
        return real(self, b)

    scoring.Scorer.losses = losses
    gc.collect()
    _trim()  # hand back what the warm-up freed, so that the delta is what this call needs
    before = _kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    t0 = time.perf_counter()
    man = scoring.score_shards(big, student, out, cfg, device=cpu)
    res = {
        "samples": man["totals"]["samples"],
        "tokens": man["totals"]["tokens"],
        "batches": batches[0],
        "max_length": args.max_length,
        "rss_before_mib": round(before / 1024, 1),
        "peak_delta_mib": round((_kb("VmHWM") - before) / 1024, 1),
        "after_delta_mib": round((_kb("VmRSS") - before) / 1024, 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
