"""`kdcl-dist bench sort`: global sort + curriculum re-shard of N synthetic scored samples.

Builds (untimed, reusable with --workdir) N samples with small token payloads in source
shards written by `write_shard`, plus score files and `scores.json` as `kdcl-dist score`
writes them (pseudo-random scores with ties). Then times the real command,
`kdcl-dist curriculum`, on 1 and on 2 ranks (torchrun, gloo, one thread each): wall time
of the whole command (start-up included) and peak RSS per rank (getrusage, reported by
each rank into curriculum.json). Targets on a 2-core machine for N = 1.8M: <= 60 s, <= 2 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def add_arguments(p):
    p.add_argument(
        "--samples", type=int, default=1_800_000, help="synthetic scored samples (the paper: 1.8M)"
    )
    p.add_argument(
        "--source-shard-size",
        dest="source_shard_size",
        type=int,
        default=10_000,
        help="samples per synthetic source shard (default 10000)",
    )
    p.add_argument(
        "--shard-size", dest="shard_size", type=int, default=10_000, help="curriculum shard size"
    )
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts to time")
    p.add_argument(
        "--workdir", default=None, help="keep the synthetic source here (reused when present)"
    )
    p.add_argument(
        "--external",
        action="store_true",
        help="also time 1 rank with the external merge sort (--in-memory-max 0) and check that its "
        "order and curriculum.json equal the in-memory run's",
    )


def _write_source_shard(args):
    # fast_write_shard is byte-identical to write_shard (tested) and ~3x faster
    from kdcl_dist.curriculum.build import fast_write_shard
    from kdcl_dist.curriculum.scoring import score_file_name, write_score_file
    from kdcl_dist.data.shards import Sample, shard_name

    root, i, start, stop, ident = args
    rng = np.random.default_rng(1000 + i)
    samples, ids = [], []
    for k in range(start, stop):
        sid = f"pmid-{k:09d}"
        n = int(rng.integers(8, 33))
        ids.append(sid)
        samples.append(
            Sample(sid, rng.integers(5, 4000, size=n).astype(np.uint16), {"id": sid, "n_tokens": n})
        )
    entry = fast_write_shard(Path(root) / "shards" / shard_name(i), samples, dtype=np.uint16)
    score = np.round(rng.gamma(8.0, 0.5, size=len(ids)), 3)  # rounded: plenty of ties
    info = {**ident, "shard": entry["name"], "shard_sha256": entry["sha256"], "count": len(ids)}
    write_score_file(
        Path(root) / "scores" / score_file_name(entry["name"]),
        ids,
        score,
        np.full(len(ids), 3),
        np.asarray([s.meta["n_tokens"] for s in samples]),
        info,
    )
    return entry


def build_source(root: Path, n: int, shard_size: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from kdcl_dist import FORMAT_VERSION
    from kdcl_dist.curriculum.scoring import ScoreConfig, identity, write_scores_manifest
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.shards import manifest_fingerprint

    if (root / "scores" / "scores.json").exists():
        return
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "scores").mkdir(parents=True, exist_ok=True)
    tok = {
        "name": "synthetic",
        "vocab_size": 4000,
        "fingerprint": "synthetic-4000",
        "class": "none",
    }
    entries = [
        {"name": f"shard-{i:06d}.tar", "count": min(shard_size, n - i * shard_size)}
        for i in range((n + shard_size - 1) // shard_size)
    ]
    # the dataset fingerprint covers shard checksums, unknown until written: score files
    # carry a placeholder, fixed up below before scores.json is written
    ident = identity("synthetic-model", ScoreConfig(progress=False), "pending")
    jobs = [
        (str(root), i, i * shard_size, i * shard_size + e["count"], ident)
        for i, e in enumerate(entries)
    ]
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2) as ex:
        entries = list(ex.map(_write_source_shard, jobs, chunksize=4))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "dataset",
        "tokenizer": tok,
        "max_length": 32,
        "shards": entries,
        "totals": {"kept": n},
    }
    manifest["fingerprint"] = manifest_fingerprint(entries, tok)
    from kdcl_dist.utils import write_json_atomic

    write_json_atomic(root / "shards" / "dataset.json", manifest)
    ident = identity("synthetic-model", ScoreConfig(progress=False), manifest["fingerprint"])
    _retag_scores(root / "scores", ident)
    write_scores_manifest(
        ShardSet(root / "shards"),
        root / "scores",
        ident,
        ScoreConfig(progress=False),
        "synthetic-model",
        [{"elapsed_s": 1.0, "tokens": 0, "samples": n}],
    )
    print(
        f"  built {n:,} synthetic samples in {len(entries)} source shards in {time.perf_counter() - t:.0f} s "
        "(untimed set-up)",
        flush=True,
    )


def _retag_scores(d: Path, ident: dict) -> None:
    from kdcl_dist.curriculum.scoring import read_score_file, write_score_file

    for f in sorted(d.glob("*.scores.npz")):
        a = read_score_file(f)
        write_score_file(f, a["ids"], a["score"], a["masked"], a["tokens"], {**a["info"], **ident})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> int:
    tmp = None
    if args.workdir:
        root = Path(args.workdir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kdcl-bench-sort-")
        root = Path(tmp.name)
    print(
        f"bench sort: {args.samples:,} synthetic scored samples (8-32 tokens each), "
        f"curriculum shards of {args.shard_size:,}",
        flush=True,
    )
    build_source(root, args.samples, args.source_shard_size)
    rows = []
    runs = [(int(x), False) for x in args.ranks.split(",") if x] + (
        [(1, True)] if args.external else []
    )
    for nproc, external in runs:
        out = root / (f"cur-{nproc}" + ("-external" if external else ""))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "-m",
            "kdcl_dist",
            "curriculum",
            "--shards",
            str(root / "shards"),
            "--scores",
            str(root / "scores"),
            "--out",
            str(out),
            "--shard-size",
            str(args.shard_size),
            "--no-progress",
        ] + (["--in-memory-max", "0"] if external else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", KDCL_LOG_LEVEL="WARNING")
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise SystemExit(
                f"bench sort: curriculum on {nproc} rank(s) failed:\n{p.stderr[-3000:]}"
            )
        man = json.loads((out / "curriculum.json").read_text())
        assert man["num_samples"] == args.samples
        rss = man["build"]["peak_rss_mib"]
        rows.append(
            (
                nproc,
                wall,
                man["build"]["sort_s"],
                man["build"]["elapsed_s"],
                max(rss),
                sum(rss),
                man["build"].get("sort", "in_memory"),
            )
        )
    print()
    print(
        f"{'ranks':>5} {'sort':>10} {'wall (s)':>9} {'sort (s)':>9} {'stage (s)':>9} {'peak RSS/rank':>14} "
        f"{'RSS all ranks':>14}"
    )
    for nproc, wall, srt, stage, mx, tot, kind in rows:
        print(
            f"{nproc:>5} {kind:>10} {wall:>9.1f} {srt:>9.1f} {stage:>9.1f} {mx / 1024:>12.2f} GiB "
            f"{tot / 1024:>12.2f} GiB"
        )
    if args.external and (root / "cur-1").exists():
        from kdcl_dist.curriculum.build import ORDER_FILES

        a, b = root / "cur-1", root / "cur-1-external"
        same = all((a / f).read_bytes() == (b / f).read_bytes() for f in ORDER_FILES)
        ma, mb = (json.loads((d / "curriculum.json").read_text()) for d in (a, b))
        same_man = {k: v for k, v in ma.items() if k != "build"} == {
            k: v for k, v in mb.items() if k != "build"
        }
        print(
            f"  external sort: order files identical to the in-memory run: {same}; curriculum.json "
            f"(build aside) identical: {same_man}"
        )
    rows = [r for r in rows if r[6] == "in_memory"]
    if len(rows) > 1:
        lo, hi = min(rows), max(rows)
        print(
            f"  speedup {hi[0]} vs {lo[0]} rank(s): {lo[1] / hi[1]:.2f}x (wall), {lo[3] / hi[3]:.2f}x (stage)"
        )
    print(
        f"  machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        "  wall = the whole `kdcl-dist curriculum` command incl. interpreter start-up; sort = load scores +"
        " global (score, id) sort + order files; stage = sort + re-shard + manifest + plots."
    )
    print("  targets (2-core machine, 1.8M samples): wall <= 60 s, peak RSS <= 2 GiB")
    if tmp is not None:
        tmp.cleanup()
    return 0
