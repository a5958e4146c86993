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
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

TARGET = 0.8


def add_arguments(p):
    p.add_argument("--input", default=None, help="jsonl corpus (default: the real abstracts, else synthetic)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train an 8k WordPiece on the corpus)")
    p.add_argument("--docs", type=int, default=0, help="use the first N documents (0 = all)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per side (median reported; >= 3)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")


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


def run(args) -> int:
    from kdcl_dist.data import ingest
    from kdcl_dist.data.build import ShardConfig, _Encoder, build_dataset
    from kdcl_dist.data.tokenizer import load_tokenizer, train_wordpiece

    repeats = max(3, args.repeats)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kdcl-bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus, label = _corpus(args, work)
        cfg = ShardConfig(max_length=args.max_length, shard_size=args.shard_size, batch_size=args.batch_size,
                          overwrite=True)
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
                tok(texts[i:i + bs], truncation=True, max_length=cfg.max_length)
            return time.perf_counter() - t, time.process_time() - c

        def stage_call() -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            for i in range(0, n_docs, bs):
                enc.encode(texts[i:i + bs])
            return time.perf_counter() - t, time.process_time() - c

        def stage() -> tuple[float, float]:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            t, c = time.perf_counter(), time.process_time()
            build_dataset([str(corpus)], tok, out, cfg, tokenizer_name="bench", rank=0, world=1, progress=False)
            return time.perf_counter() - t, time.process_time() - c

        hf_call()   # warm-up: page cache, tokenizer thread pool
        runs: dict[str, list] = {"hf": [], "lean": [], "stage": []}
        for _ in range(repeats):
            runs["hf"].append(hf_call())
            runs["lean"].append(stage_call())
            runs["stage"].append(stage())
        manifest = json.loads((work / "out" / "dataset.json").read_text())
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    print(f"corpus: {label}: {n_docs} documents, {mb:.1f} MB of text; tokenizer {tok.__class__.__name__} "
          f"vocab {len(tok)}; max_length {cfg.max_length}, shard_size {cfg.shard_size}, batch {bs}")
    print(f"stage output: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
          f"{sum(s['bytes'] for s in manifest['shards']) / 1e6:.1f} MB")
    print(f"medians of {repeats} interleaved repeats (wall seconds; process CPU seconds beside)")
    print(f"{'':36}{'MB/s':>8}{'docs/s':>9}{'wall s':>8}{'cpu s':>8}")
    names = {"hf": "tokenizer alone (HF call)", "lean": "tokenizer alone (the stage's call)",
             "stage": "shard stage (end to end)"}
    for k, name in names.items():
        w, c = med[k]
        print(f"{name:36}{mb / w:8.2f}{n_docs / w:9.0f}{w:8.2f}{c:8.2f}")
    sw, sc = med["stage"]
    r_hf, r_lean = med["hf"][0] / sw, med["lean"][0] / sw
    print(f"ratio stage / tokenizer alone (HF call):      {r_hf:.2f}  "
          f"({'meets' if r_hf >= TARGET else 'BELOW'} the target >= {TARGET}); CPU {med['hf'][1] / sc:.2f}")
    print(f"ratio stage / tokenizer alone (stage's call): {r_lean:.2f}  "
          f"({'meets' if r_lean >= TARGET else 'BELOW'} the target >= {TARGET}); CPU {med['lean'][1] / sc:.2f}")
    print("all repeats (HF call, stage's call, stage) wall s: " + ", ".join(
        f"({a:.2f}, {b:.2f}, {c:.2f})" for (a, _), (b, _), (c, _) in zip(runs["hf"], runs["lean"], runs["stage"])))
    return 0
