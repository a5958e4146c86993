"""A curriculum directory for training tests, built without the scoring stage.

Each source sample gets a deterministic pseudo-score (from its id hash and length), samples
are sorted by (score, id) and written as curriculum shards with `write_shard`, plus
`curriculum.json` and `order_scores.npy` following the shared contract (docs/design.md §5).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def pseudo_score(sample_id: str, n_tokens: int) -> float:
    from kdcl_dist.utils import id_hash64

    return 1.0 + (id_hash64(sample_id) % 100_000) / 25_000.0 + n_tokens / 256.0


def build_curriculum(source_dir, out_dir, shard_size: int = 64) -> dict:
    from kdcl_dist import FORMAT_VERSION
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.shards import Sample, manifest_fingerprint, shard_name, write_shard
    from kdcl_dist.utils import fingerprint, write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = ShardSet(source_dir)
    rows = []
    for si in range(src.num_shards):
        for s in src.iter_shard(si):
            rows.append((pseudo_score(s.meta["id"], len(s.ids)), s.meta["id"], si, s))
    rows.sort(key=lambda r: (r[0], r[1]))
    dtype = np.uint16 if src.manifest["tokenizer"]["vocab_size"] <= 65536 else np.int32
    entries, per_shard, scores = [], [], []
    for start in range(0, len(rows), shard_size):
        chunk = rows[start : start + shard_size]
        samples = []
        for j, (score, sid, si, s) in enumerate(chunk):
            meta = {
                "id": sid,
                "n_tokens": len(s.ids),
                "score": score,
                "position": start + j,
                "source_shard": src.shards[si]["name"],
            }
            samples.append(Sample(s.key, s.ids, meta))
            scores.append(score)
        entry = write_shard(out / shard_name(len(entries)), samples, dtype=dtype)
        entries.append(entry)
        cs = [r[0] for r in chunk]
        per_shard.append(
            {
                "name": entry["name"],
                "count": len(chunk),
                "min": min(cs),
                "max": max(cs),
                "mean": float(np.mean(cs)),
            }
        )
    arr = np.asarray(scores, dtype=np.float32)
    np.save(out / "order_scores.npy", arr)
    qs = {f"{q:.2f}": float(np.quantile(arr, q)) for q in np.round(np.arange(0, 1.0001, 0.05), 2)}
    tok = src.manifest["tokenizer"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "curriculum",
        "shards": entries,
        "num_samples": len(rows),
        "tokenizer": tok,
        "score_stats": {
            "min": float(arr.min()),
            "max": float(arr.max()),
            "mean": float(arr.mean()),
            "quantiles": qs,
        },
        "max_confidence": math.exp(-float(arr.min())),
        "excluded": {},
        "inputs": {
            "dataset_fingerprint": src.fingerprint,
            "scores_fingerprint": "pseudo",
            "model_fingerprint": "pseudo",
            "masks": 1,
            "seed": 0,
        },
        "per_shard": per_shard,
    }
    manifest["fingerprint"] = fingerprint(
        {"m": manifest_fingerprint(entries, tok), "kind": "curriculum"}
    )
    write_json_atomic(out / "curriculum.json", manifest)
    return manifest


def curriculum_fixture(shard_size: int = 64):
    """A module-scoped pytest fixture named `cur`: a curriculum built from `tiny_assets`' source shards.

    Use it as `cur = curriculum_fixture()` at module level of a test file (pytest finds fixtures
    by module attribute); an imported fixture function would read as an unused import to ruff.
    """
    import pytest

    @pytest.fixture(scope="module", name="cur")
    def _cur(tiny_assets, tmp_path_factory):
        out = tmp_path_factory.mktemp("cur")
        build_curriculum(tiny_assets["shards"], out, shard_size=shard_size)
        return out

    return _cur


# ---- launching training runs in real processes -----------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(nproc: int, cur, assets, out, *flags, overrides=()) -> list[str]:
    """torchrun command line for `kdcl-dist train` on the tiny pair (gloo, CPU)."""
    import sys

    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        "kdcl_dist",
        "train",
        "--curriculum",
        str(cur),
        "--student",
        str(assets["student"]),
        "--out",
        str(out),
        "--num-workers",
        "1",
    ]
    return base + [str(f) for f in flags] + [str(o) for o in overrides]


def train_env() -> dict:
    import os

    env = dict(os.environ)
    env.update(
        {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "KDCL_LOG_LEVEL": "WARNING"}
    )
    return env


def run_train(
    nproc: int, cur, assets, out, *flags, overrides=(), timeout: int = 600, check: bool = True
):
    import subprocess

    from conftest import REPO

    p = subprocess.run(
        train_cmd(nproc, cur, assets, out, *flags, overrides=overrides),
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        )
    return p


def read_jsonl(path) -> list[dict]:
    import json

    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def checkpoint_tensors(tag_dir) -> dict:
    """{file: {dotted key path: shape}} of every tensor in every .pt file of a checkpoint."""
    import torch

    def walk(obj, prefix, acc):
        if torch.is_tensor(obj):
            acc[prefix] = tuple(obj.shape)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k), acc)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}[{i}]", acc)

    out = {}
    for f in sorted(Path(tag_dir).rglob("*.pt")):
        acc: dict = {}
        walk(torch.load(f, map_location="cpu", weights_only=False), "", acc)
        out[str(f.relative_to(tag_dir))] = acc
    return out


def student_weights(tag_dir) -> dict:
    """Full fp32 student weights of a checkpoint (any ZeRO stage) via DeepSpeed's own reader."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(tag_dir)
    if not list(tag_dir.glob("*optim_states.pt")):  # ZeRO-0: the module file holds everything
        sd = torch.load(
            tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )["module"]
        return {k: v.float() for k, v in sd.items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
