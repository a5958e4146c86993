"""`kdcl-dist bench ingest`: the shard stage's throughput against the tokenizer alone.

All sides work on the same documents in one run, repeats interleaved (tokenizer, stage,
tokenizer, stage, ...) so that they see the same machine load; medians are reported.

- tokenizer alone, HF call: the documents already in memory, tokenized in batches the way
  a user calls an HF fast tokenizer for a model: `tok(batch, truncation=True, max_length=L)`.
- tokenizer alone, the stage's call: the exact tokenization the stage does
  (`_Encoder.encode`: the Rust tokenizer's `encode_batch_fast`, no offsets, no truncation).
- shard stage: `build_dataset` end to end into a fresh directory: read the file, parse,
  clean and deduplicate, tokenize, write webdataset shards, offset indices, checksums,
  per-shard stats and dataset.json.

ratio = stage throughput / tokenizer throughput, against both baselines. The target is
>= 0.8 against the tokenizer alone; the ratio against the stage's own (leaner) call is the
strict measure of what reading, cleaning, writing and indexing add. Uses the real corpus
($KDCL_DATA_DIR/pubmed/abstracts.jsonl) when present, else a synthetic one (labelled).

Fairness: all sides run in one process on the same CPU cores (`--threads N` pins the
process to N cores and sizes the tokenizer's thread pool to N; default: every core), so
the tokenizer has the same threads on every side; the stage's own extra threads (reading
and writing) share those cores. Beside the wall-clock ratio, the process CPU-time ratio
shows the extra work independently of how well it overlaps. `--breakdown` (on by default)
times the stage's parts one after another, single pass, CPU seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

TARGET = 0.8


def add_arguments(p):
    p.add_argument(
        "--input", default=None, help="jsonl corpus (default: the real abstracts, else synthetic)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir (default: train an 8k WordPiece on the corpus)",
    )
    p.add_argument("--docs", type=int, default=0, help="use the first N documents (0 = all)")
    p.add_argument(
        "--repeats", type=int, default=3, help="repeats per side (median reported; >= 3)"
    )
    p.add_argument("--max-length", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--shard-size", type=int, default=2000, help="samples per shard (default 2000)")
    p.add_argument(
        "--batch-size", type=int, default=1000, help="documents per tokenizer call (default 1000)"
    )
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="pin to this many CPU cores and size the tokenizer pool to match (0 = every core)",
    )
    p.add_argument(
        "--xml-ranks",
        action="store_true",
        help="instead: a multi-file MEDLINE download (NLM layout) sharded on 1 vs 2 ranks "
        "(torchrun, one core and one thread per rank); prints the ratio (target >= 1.7)",
    )
    p.add_argument("--xml-files", type=int, default=8, help="--xml-ranks: baseline files")
    p.add_argument("--xml-per-file", type=int, default=4000, help="--xml-ranks: citations per file")
    p.add_argument(
        "--scale",
        type=int,
        default=0,
        metavar="N",
        help="instead: N synthetic abstracts in one jsonl through `shard` on 1 and 2 ranks: "
        "time and peak RSS per rank (target <= 2 GiB)",
    )
    p.add_argument(
        "--scale-ranks",
        default="1,2",
        help="--scale: world sizes to run, comma-separated (default 1,2)",
    )
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the per-part CPU breakdown of the stage",
    )


def _corpus(args, work: Path) -> tuple[Path, str]:
    from kdcl_dist.utils import data_dir

    src, label = None, ""
    if args.input:
        src, label = Path(args.input), f"{args.input}"
    else:
        d = data_dir()
        if d is not None and (d / "pubmed" / "abstracts.jsonl").exists():
            src, label = d / "pubmed" / "abstracts.jsonl", "real PubMed abstracts (abstracts.jsonl)"
    if src is None:
        from kdcl_dist.data.synthetic import synthetic_documents

        path = work / "synthetic.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for doc_id, text in synthetic_documents(args.docs or 12000):
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        return path, "SYNTHETIC corpus (no real data found)"
    if args.docs:
        path = work / "subset.jsonl"
        with open(src, "rb") as fin, open(path, "wb") as fout:
            for i, line in enumerate(fin):
                if i >= args.docs:
                    break
                fout.write(line)
        return path, f"{label}, first {args.docs} lines"
    return src, label


def _pin_threads(n: int) -> tuple[int, str]:
    """Pin the process to n cores and size the Rust tokenizer's pool (rayon) to n.

    Must run before the tokenizer's first parallel call in this process (the pool is made
    once); returns (cores used, how the tokenizer pool was sized)."""
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if n <= 0:
        env = os.environ.get("RAYON_NUM_THREADS")
        return len(
            cores
        ), f"RAYON_NUM_THREADS={env}" if env else "rayon's default (one thread per core)"
    n = min(n, len(cores))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores[:n])
    os.environ["RAYON_NUM_THREADS"] = str(n)
    return n, f"RAYON_NUM_THREADS={n}"


def _breakdown(corpus: Path, tok, cfg, work: Path) -> list[tuple[str, float]]:
    """CPU seconds of the stage's parts, run one after another on one thread (tokenizer: its pool)."""
    from kdcl_dist.data import ingest
    from kdcl_dist.data.build import _batch_samples, _Encoder, _new_counts
    from kdcl_dist.data.shards import write_shard

    enc = _Encoder(tok, cfg)
    parts = []

    def timed(name, fn):
        c = time.process_time()
        out = fn()
        parts.append((name, time.process_time() - c))
        return out

    docs = timed(
        "read + parse + clean (dedup hash)",
        lambda: list(
            enumerate(ingest.iter_clean_documents([str(corpus)], cfg.read_options(verbose=False)))
        ),
    )
    bs = cfg.batch_size
    raw = timed(
        "tokenize (Rust, encode_batch_fast)",
        lambda: [
            enc.encode_raw([d.text for _, d in docs[i : i + bs]]) for i in range(0, len(docs), bs)
        ],
    )
    ids = timed("token ids to Python lists", lambda: [enc.ids(r) for r in raw])
    counts = _new_counts()
    samples = timed(
        "samples (special tokens, truncation, meta)",
        lambda: [
            s
            for k, i in enumerate(range(0, len(docs), bs))
            for s in _batch_samples(docs[i : i + bs], ids[k], enc, cfg, counts)
        ],
    )
    out = work / "breakdown"
    out.mkdir(parents=True, exist_ok=True)
    n = cfg.shard_size
    timed(
        "write shards (tar, index, sha256, fsync)",
        lambda: [
            write_shard(out / f"shard-{j:06d}.tar", samples[j * n : (j + 1) * n], dtype=enc.dtype)
            for j in range((len(samples) + n - 1) // n)
        ],
    )
    return parts


def run(args) -> int:
    from kdcl_dist.data import ingest
    from kdcl_dist.data.build import ShardConfig, _Encoder, build_dataset
    from kdcl_dist.data.tokenizer import load_tokenizer, train_wordpiece

    if args.xml_ranks or args.scale:
        from kdcl_dist.bench import ingest_ranks

        return ingest_ranks.run_xml_ranks(args) if args.xml_ranks else ingest_ranks.run_scale(args)
    n_cores, pool = _pin_threads(args.threads)
    repeats = max(3, args.repeats)
    work = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kdcl-bench-ingest-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus, label = _corpus(args, work)
        cfg = ShardConfig(
            max_length=args.max_length,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            overwrite=True,
        )
        opts = cfg.read_options(verbose=False)
        texts = [d.text for d in ingest.iter_clean_documents([str(corpus)], opts)]
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
        else:
            train_wordpiece(iter(texts), work / "tokenizer", vocab_size=8000)
            tok = load_tokenizer(str(work / "tokenizer"))
        enc = _Encoder(tok, cfg)
        n_docs = len(texts)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        bs = cfg.batch_size

        def hf_call() -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            for i in range(0, n_docs, bs):
                tok(texts[i : i + bs], truncation=True, max_length=cfg.max_length)
            return time.perf_counter() - t, time.process_time() - c

        def stage_call() -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            for i in range(0, n_docs, bs):
                enc.encode(texts[i : i + bs])
            return time.perf_counter() - t, time.process_time() - c

        def stage() -> tuple[float, float]:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            t, c = time.perf_counter(), time.process_time()
            build_dataset(
                [str(corpus)],
                tok,
                out,
                cfg,
                tokenizer_name="bench",
                rank=0,
                world=1,
                progress=False,
            )
            return time.perf_counter() - t, time.process_time() - c

        hf_call()  # warm-up: page cache, tokenizer thread pool
        runs: dict[str, list] = {"hf": [], "lean": [], "stage": []}
        sides = (("hf", hf_call), ("lean", stage_call), ("stage", stage))
        for r in range(repeats):
            # the order alternates (hf, lean, stage / stage, lean, hf) so that a load that
            # rises or falls during a repeat favours neither side
            for k, fn in sides if r % 2 == 0 else sides[::-1]:
                runs[k].append(fn())
        manifest = json.loads((work / "out" / "dataset.json").read_text())
        parts = _breakdown(corpus, tok, cfg, work) if args.breakdown else []
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in runs.items()
    }
    print(
        f"corpus: {label}: {n_docs} documents, {mb:.1f} MB of text; tokenizer {tok.__class__.__name__} "
        f"vocab {len(tok)}; max_length {cfg.max_length}, shard_size {cfg.shard_size}, batch {bs}"
    )
    print(
        f"stage output: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
        f"{sum(s['bytes'] for s in manifest['shards']) / 1e6:.1f} MB"
    )
    print(
        f"threads: every side on the same {n_cores} CPU core(s); tokenizer pool sized by {pool}; the stage "
        "adds a reading thread (main) and a writer thread on those cores"
    )
    print(
        "tokenizer settings: HF call tok(batch, truncation=True, max_length=L) (offsets and masks as a user gets "
        "them); the stage's call and the stage: encode_batch_fast, no truncation (the stage truncates after)"
    )
    print(f"medians of {repeats} interleaved repeats (wall seconds; process CPU seconds beside)")
    print(f"{'':36}{'MB/s':>8}{'docs/s':>9}{'wall s':>8}{'cpu s':>8}")
    names = {
        "hf": "tokenizer alone (HF call)",
        "lean": "tokenizer alone (the stage's call)",
        "stage": "shard stage (end to end)",
    }
    for k, name in names.items():
        w, c = med[k]
        print(f"{name:36}{mb / w:8.2f}{n_docs / w:9.0f}{w:8.2f}{c:8.2f}")
    sw, sc = med["stage"]
    r_hf, r_lean = med["hf"][0] / sw, med["lean"][0] / sw
    print(
        f"ratio stage / tokenizer alone (HF call):      {r_hf:.2f}  "
        f"({'meets' if r_hf >= TARGET else 'BELOW'} the target >= {TARGET}); CPU {med['hf'][1] / sc:.2f}"
    )
    print(
        f"ratio stage / tokenizer alone (stage's call): {r_lean:.2f}  "
        f"({'meets' if r_lean >= TARGET else 'BELOW'} the target >= {TARGET}); CPU {med['lean'][1] / sc:.2f}"
    )
    # each repeat's sides ran next to each other under about the same load: the median of
    # the per-repeat ratios is the figure least moved by other jobs on a shared machine
    per = {k: [b[0] / a[0] for a, b in zip(runs["stage"], runs[k])] for k in ("hf", "lean")}
    print(
        f"median of per-repeat ratios: vs HF call {statistics.median(per['hf']):.2f}, vs the stage's call "
        f"{statistics.median(per['lean']):.2f} (each repeat: "
        + ", ".join(f"{x:.2f}" for x in per["lean"])
        + ")"
    )
    if parts:
        total = sum(c for _, c in parts)
        print("stage parts, one after another (CPU s, share of the sum):")
        for name, c in parts:
            print(f"  {name:44}{c:7.2f}  {100 * c / total:5.1f}%")
    print(
        "all repeats (HF call, stage's call, stage) wall s: "
        + ", ".join(
            f"({a:.2f}, {b:.2f}, {c:.2f})"
            for (a, _), (b, _), (c, _) in zip(runs["hf"], runs["lean"], runs["stage"])
        )
    )
    return 0
