"""`kdcl-dist bench ingest --xml-ranks` and `--scale N`: the shard stage on 1 vs 2 ranks.

--xml-ranks  A multi-file MEDLINE download (NLM layout: pubmedYYnNNNN.xml.gz + .md5 + README
             + an update file; synthetic abstracts with the real length distribution) sharded
             by `torchrun --nproc_per_node W kdcl-dist shard` for W = 1 and 2, repeats
             interleaved, W ranks pinned to W cores (taskset), one thread each (tokenizer pool
             RAYON_NUM_THREADS=1, OMP_NUM_THREADS=1). Time = the stage's own seconds as rank 0
             logs them (imports and process start excluded, the same for both); ratio =
             median 1-rank time / median 2-rank time. Target >= 1.7.
--scale N    N synthetic abstracts in one JSON Lines file (so 2 ranks read byte ranges of
             it) through `shard` on 1 and on 2 ranks: stage seconds, wall seconds of the
             command, peak RSS per rank (each rank's ru_maxrss, gathered by the stage).
             Target: <= 2 GiB per rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

XML_TARGET = 1.7
RSS_TARGET_MIB = 2048
_DONE = re.compile(r"; ([0-9.]+)s on (\d+) rank\(s\); peak RSS per rank \[([0-9, ]*)\] MiB")


def _corpus_xml(work: Path, files: int, per_file: int) -> Path:
    from xml.sax.saxutils import escape

    from kdcl_dist.data.nlm_sample import write_nlm_download
    from kdcl_dist.data.synthetic import abstract_corpus

    cits = [
        (
            f'<MedlineCitation Owner="NLM" Status="MEDLINE"><PMID Version="1">{10_000_000 + i}'
            f"</PMID><Article><ArticleTitle>Study {i}.</ArticleTitle><Abstract><AbstractText>"
            f"{escape(text)}</AbstractText></Abstract></Article></MedlineCitation>"
        ).encode()
        for i, (_, text) in enumerate(abstract_corpus(files * per_file, seed=1))
    ]
    return write_nlm_download(cits, work / "pubmed", files=files).dir


def _tokenizer(work: Path, texts) -> Path:
    from kdcl_dist.data.tokenizer import train_wordpiece

    d = work / "tokenizer"
    if not d.exists():
        train_wordpiece(texts, d, vocab_size=8000)
    return d


def _shard(
    inp: Path, tok: Path, out: Path, world: int, threads: int, port: int, pin: bool = True
) -> dict:
    """One `kdcl-dist shard` on `world` ranks (torchrun), pinned to `world` cores."""
    cores = sorted(os.sched_getaffinity(0))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        RAYON_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="true",
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
        "--master_port", str(port), "-m", "kdcl_dist", "shard", "--input", str(inp),
        "--tokenizer", str(tok), "--out", str(out), "--no-progress", "--overwrite",
    ]  # fmt: skip
    if pin and world <= len(cores) and shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, cores[:world])), *cmd]
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"shard on {world} rank(s) failed:\n{p.stderr[-3000:]}")
    m = _DONE.search(p.stderr)
    if m is None:
        raise RuntimeError(f"no stage summary in the output:\n{p.stderr[-2000:]}")
    manifest = json.loads((out / "dataset.json").read_text())
    return {
        "stage_s": float(m.group(1)),
        "wall_s": wall,
        "rss_mib": [int(x) for x in m.group(3).split(",") if x.strip()],
        "samples": manifest["num_samples"],
        "shards": [(s["name"], s["sha256"]) for s in manifest["shards"]],
    }


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_xml_ranks(args) -> int:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcl-bench-xml-"))
    work.mkdir(parents=True, exist_ok=True)
    repeats = max(3, args.repeats)
    try:
        src = _corpus_xml(work, args.xml_files, args.xml_per_file)
        from kdcl_dist.data import ingest

        docs = ingest.read_documents(
            ingest.resolve_inputs([str(p) for p in sorted(src.glob("*.xml.gz"))[:1]]),
            ingest.ReadOptions(verbose=False),
            ingest.IngestStats(),
        )
        tok = Path(args.tokenizer) if args.tokenizer else _tokenizer(work, (d.text for d in docs))
        xml_mb = sum(p.stat().st_size for p in src.glob("*.xml.gz")) / 1e6
        print(
            f"corpus: SYNTHETIC MEDLINE download in NLM's layout: {args.xml_files} baseline files x "
            f"{args.xml_per_file} citations + 1 update file, .md5 files and a README "
            f"({xml_mb:.1f} MB .xml.gz); abstracts with the real length distribution"
        )
        print(f"before: {_load()}")
        runs: dict[int, list] = {1: [], 2: []}
        for r in range(repeats):
            for w in (1, 2) if r % 2 == 0 else (2, 1):
                runs[w].append(_shard(src, tok, work / f"out{w}", w, 1, 29600 + 10 * r + w))
        print(f"after: {_load()}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    same = all(a["shards"] == runs[1][0]["shards"] for a in runs[1] + runs[2])
    n = runs[1][0]["samples"]
    print(
        f"shard stage (torchrun; W ranks pinned to W cores, one thread each), {n} samples, "
        f"medians of {repeats} interleaved repeats:"
    )
    med = {w: statistics.median(x["stage_s"] for x in v) for w, v in runs.items()}
    for w, v in runs.items():
        print(
            f"  {w} rank(s): stage {med[w]:.2f} s ({n / med[w]:.0f} docs/s); wall of the command "
            f"{statistics.median(x['wall_s'] for x in v):.2f} s; peak RSS per rank "
            f"{max(x['rss_mib'] for x in v)} MiB; each repeat "
            + ", ".join(f"{x['stage_s']:.2f}" for x in v)
        )
    ratio = med[1] / med[2]
    per = [a["stage_s"] / b["stage_s"] for a, b in zip(runs[1], runs[2])]
    print(
        f"ratio 1 rank / 2 ranks: {ratio:.2f} ({'meets' if ratio >= XML_TARGET else 'BELOW'} the "
        f"target >= {XML_TARGET}); median of per-repeat ratios {statistics.median(per):.2f}; "
        f"shards identical across runs and world sizes: {same}"
    )
    return 0 if same else 1


def run_scale(args) -> int:
    from kdcl_dist.data.synthetic import abstract_corpus

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcl-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "abstracts.jsonl"
        made = work / f"abstracts.{args.scale}.done"  # a --workdir re-run reuses the corpus
        t = time.perf_counter()
        if not made.exists():
            with open(src, "w", encoding="utf-8") as f:
                for doc_id, text in abstract_corpus(args.scale, seed=2):
                    f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
            made.touch()
        n_bytes = src.stat().st_size
        gen = time.perf_counter() - t
        tok = (
            Path(args.tokenizer)
            if args.tokenizer
            else _tokenizer(work, (t for _, t in abstract_corpus(20000, seed=3)))
        )
        cores = len(os.sched_getaffinity(0))
        print(
            f"corpus: {args.scale} SYNTHETIC abstracts (real length distribution) in one jsonl, "
            f"{n_bytes / 1e9:.2f} GB (written in {gen:.0f} s); {cores} cores"
        )
        res = {}
        for w in [int(x) for x in args.scale_ranks.split(",")]:
            print(f"{w} rank(s), before: {_load()}", flush=True)
            res[w] = _shard(src, tok, work / f"out{w}", w, max(1, cores // w), 29700 + w, pin=False)
            r = res[w]
            print(
                f"  {w} rank(s): stage {r['stage_s']:.1f} s ({args.scale / r['stage_s']:.0f} docs/s), "
                f"command wall {r['wall_s']:.1f} s, peak RSS per rank {r['rss_mib']} MiB "
                f"({'meets' if max(r['rss_mib']) <= RSS_TARGET_MIB else 'ABOVE'} the target "
                f"<= {RSS_TARGET_MIB} MiB); after: {_load()}",
                flush=True,
            )
        if 1 in res and 2 in res:
            print(f"shards identical for 1 and 2 ranks: {res[1]['shards'] == res[2]['shards']}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0
