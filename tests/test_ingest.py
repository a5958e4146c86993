"""Ingestion and the shard stage: readers, cleaning counters, layout independent of the
world size, re-runs that skip finished shards, and the acceptance checks on real data."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcl_dist.data import ingest
from kdcl_dist.data.build import ShardConfig, build_dataset
from kdcl_dist.data.reader import ShardSet
from tests.conftest import REPO, corpus_docs, run_cli


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from kdcl_dist.data.tokenizer import train_wordpiece

    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_wordpiece((t for _, t in corpus_docs(400)), d, vocab_size=1000)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from kdcl_dist.data.tokenizer import load_tokenizer

    return load_tokenizer(str(tok_dir))


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def corpus_jsonl(path: Path, n: int) -> Path:
    return write_jsonl(path, ({"id": i, "title": "", "text": t} for i, t in corpus_docs(n)))


def read_all(out) -> list[tuple[str, list[int]]]:
    s = ShardSet(out)
    return [(x.key, x.ids.tolist()) for x in s]


# ----------------------------------------------------------------------------- readers

MEDLINE = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE MedlineCitationSet PUBLIC "-//NLM//DTD Medline Citation, 1st January, 2016//EN"
 "https://www.nlm.nih.gov/databases/dtd/nlmmedlinecitationset_160101.dtd">
<MedlineCitationSet>
<MedlineCitation Owner="NLM" Status="MEDLINE"><PMID Version="1">111</PMID>
<Article PubModel="Print"><ArticleTitle>Structured <i>abstract</i> title.</ArticleTitle>
<Abstract><AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">First part.</AbstractText>
<AbstractText Label="RESULTS" NlmCategory="RESULTS">Second part.</AbstractText></Abstract></Article>
</MedlineCitation>
<MedlineCitation Owner="NLM" Status="MEDLINE"><PMID Version="1">222</PMID>
<Article PubModel="Print"><ArticleTitle>No abstract here.</ArticleTitle></Article></MedlineCitation>
<MedlineCitation Owner="NLM" Status="MEDLINE"><PMID Version="1">333</PMID>
<Article PubModel="Print"><ArticleTitle>Plain.</ArticleTitle>
<Abstract><AbstractText>Unlabelled abstract text.</AbstractText></Abstract></Article></MedlineCitation>
</MedlineCitationSet>
"""

PUBMED_SET = """<?xml version="1.0"?>
<PubmedArticleSet><PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="1">444</PMID>
<Article><ArticleTitle>New format.</ArticleTitle><Abstract><AbstractText>Body.</AbstractText></Abstract>
</Article></MedlineCitation><PubmedData/></PubmedArticle></PubmedArticleSet>
"""


def _read(paths, **kw):
    stats = ingest.IngestStats()
    opts = ingest.ReadOptions(**kw)
    docs = list(ingest.iter_clean_documents([str(p) for p in paths], opts, stats))
    return docs, stats


def test_xml_reader_titles_labels_and_no_abstract(tmp_path):
    p = tmp_path / "m.xml.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(MEDLINE)
    (tmp_path / "p.xml").write_text(PUBMED_SET)
    docs, stats = _read([p, tmp_path / "p.xml"])
    assert [d.id for d in docs] == ["pmid-111", "pmid-333", "pmid-444"]
    assert (
        docs[0].text == "Structured abstract title. BACKGROUND: First part. RESULTS: Second part."
    )
    assert docs[1].text == "Plain. Unlabelled abstract text."
    assert stats.documents == 4 and stats.dropped == {"no_abstract": 1}
    assert docs[0].source == "m.xml.gz"


def test_jsonl_txt_parquet_hf_readers(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(
        tmp_path / "a.jsonl",
        [{"pmid": "x1", "t": "Title", "body": "Body one."}, {"pmid": "x2", "body": "Body two."}],
    )
    docs, _ = _read([tmp_path / "a.jsonl"], text_field="body", title_field="t", id_field="pmid")
    assert [(d.id, d.text) for d in docs] == [("x1", "Title Body one."), ("x2", "Body two.")]

    (tmp_path / "b.txt").write_text("line one\n\nline two\nline three\n")
    docs, _ = _read([tmp_path / "b.txt"])
    assert [d.text for d in docs] == ["line one", "line two", "line three"]
    assert [d.id for d in docs] == ["b.txt:1", "b.txt:3", "b.txt:4"]
    docs, _ = _read([tmp_path / "b.txt"], text_unit="paragraph")
    assert [d.text for d in docs] == ["line one", "line two line three"]

    pq.write_table(
        pa.table({"id": ["p1", "p2"], "text": ["Parquet one.", "Parquet two."]}),
        tmp_path / "c.parquet",
    )
    docs, _ = _read([tmp_path / "c.parquet"])
    assert [(d.id, d.text) for d in docs] == [("p1", "Parquet one."), ("p2", "Parquet two.")]

    datasets.Dataset.from_dict({"id": ["h1"], "text": ["From a datasets dir."]}).save_to_disk(
        str(tmp_path / "hf")
    )
    docs, _ = _read([tmp_path / "hf"])
    assert [(d.id, d.text) for d in docs] == [("h1", "From a datasets dir.")]

    # a directory input walks its readable files in sorted order (a saved HF dataset inside is one input)
    sub = tmp_path / "dir"
    sub.mkdir()
    datasets.Dataset.from_dict({"id": ["h2"], "text": ["Nested datasets dir."]}).save_to_disk(
        str(sub / "0hf")
    )
    (sub / "2.txt").write_text("second file\n")
    (sub / "1.txt").write_text("first file\n")
    (sub / "notes.md").write_text("ignored")
    docs, _ = _read([sub])
    assert [d.text for d in docs] == ["Nested datasets dir.", "first file", "second file"]


def test_cleaning_counters_add_up(tmp_path, tok):
    recs = [
        {
            "id": "a",
            "text": "Aspirin reduced the risk of stroke in the treated patients significantly.",
        },
        {"id": "b", "text": "   "},  # empty
        {
            "id": "c",
            "text": "Aspirin reduced  the risk of stroke in the treated patients significantly.",
        },  # duplicate
        {
            "id": "a",
            "text": "A different text that reuses an id already taken by document a.",
        },  # duplicate id
        {"id": "d", "text": "Ok."},  # too short
        {
            "id": "e",
            "text": "Cells were cultured for three weeks and protein expression was measured.",
        },
    ]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    m = build_dataset([str(src)], tok, tmp_path / "out", ShardConfig(min_tokens=6), progress=False)
    t = m["totals"]
    assert t["input_documents"] == 6 and t["kept_documents"] == 2
    d = {k: v for k, v in m["dropped"].items() if v}
    assert d == {"empty": 1, "duplicate": 1, "duplicate_id": 1, "too_short": 1}
    assert t["kept_documents"] + t["dropped_documents"] == t["input_documents"]
    assert [k for k, _ in read_all(tmp_path / "out")] == ["a", "e"]


def test_content_hash_fast_path_equals_whitespace_normalisation():
    import hashlib
    import random
    import sys

    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    assert len(spaces) == 29
    alphabet = spaces + list("ab .,é") + ["\u00ad", "\u200b", "\ufeff", "\x00"]
    rng = random.Random(0)
    for _ in range(30000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7)))
        slow = hashlib.blake2b(" ".join(t.split()).encode("utf-8"), digest_size=16).digest()
        assert ingest.content_hash(t) == slow, repr(t)
    assert (
        ingest.content_hash("a  b")
        == ingest.content_hash("a\u3000b\n")
        == ingest.content_hash(" a b")
    )


# ----------------------------------------------------------------------------- the stage


def test_shards_hold_exact_token_ids_and_metadata(tmp_path, tok):
    src = corpus_jsonl(tmp_path / "c.jsonl", 120)
    cfg = ShardConfig(max_length=64, shard_size=25, min_tokens=0, keep_text=True)
    m = build_dataset([str(src)], tok, tmp_path / "out", cfg, progress=False)
    assert [s["count"] for s in m["shards"]] == [25, 25, 25, 25, 20]
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == len(tok)
    expect = tok([t for _, t in corpus_docs(120)], truncation=True, max_length=64)["input_ids"]
    s = ShardSet(tmp_path / "out")
    seq = list(s)
    assert len(seq) == 120
    for pos, (doc_id, text) in enumerate(corpus_docs(120)):
        assert seq[pos].ids.tolist() == expect[pos]
        assert seq[pos].meta["id"] == str(doc_id) and seq[pos].text == text
        assert seq[pos].meta["n_tokens"] == len(expect[pos])
        assert seq[pos].meta["truncated"] == (len(tok(text)["input_ids"]) > 64)
        got = s.get(pos)
        assert got.key == seq[pos].key and np.array_equal(got.ids, seq[pos].ids)
    assert m["totals"]["tokens"] == sum(len(e) for e in expect)
    # an earlier tok(..., truncation=True) call must not leak truncation into the stage
    from kdcl_dist.data.build import _Encoder

    long_text = corpus_docs(1)[0][1]
    tok([long_text], truncation=True, max_length=8)
    assert (
        _Encoder(tok, cfg).encode([long_text])[0]
        == tok(long_text, add_special_tokens=False)["input_ids"]
    )
    cfg_file = (tmp_path / "out" / "config.yaml").read_text()
    assert "shard:" in cfg_file and "max_length: 64" in cfg_file


def test_layout_independent_of_world_size_in_a_loop(tmp_path, tok):
    """Ranks run one after another in one process (rank 0 last: it merges)."""
    src = corpus_jsonl(tmp_path / "c.jsonl", 130)
    cfg = ShardConfig(max_length=48, shard_size=20, min_tokens=4)
    ref = build_dataset([str(src)], tok, tmp_path / "w1", cfg, progress=False)
    for world in (2, 3):
        out = tmp_path / f"w{world}"
        for rank in reversed(range(world)):
            m = build_dataset([str(src)], tok, out, cfg, rank=rank, world=world, progress=False)
        assert m["shards"] == ref["shards"] and m["fingerprint"] == ref["fingerprint"]
        assert read_all(out) == read_all(tmp_path / "w1")


def test_rerun_skips_finished_shards(tmp_path, tok):
    src = corpus_jsonl(tmp_path / "c.jsonl", 100)
    cfg = ShardConfig(max_length=48, shard_size=30)
    out = tmp_path / "out"
    m1 = build_dataset([str(src)], tok, out, cfg, progress=False)
    tars = sorted(out.glob("shard-*.tar"))
    stamp = {p.name: p.stat().st_mtime_ns for p in tars}
    m2 = build_dataset([str(src)], tok, out, cfg, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tars} == stamp  # nothing rewritten
    assert m2["shards"] == m1["shards"]
    (out / "shard-000002.tar").unlink()  # lose one shard
    m3 = build_dataset([str(src)], tok, out, cfg, progress=False)
    assert m3["shards"] == m1["shards"]
    now = {p.name: p.stat().st_mtime_ns for p in tars}
    assert [n for n in now if now[n] != stamp[n]] == ["shard-000002.tar"]
    # other settings: every shard is rebuilt, stale higher-numbered shards are removed
    m4 = build_dataset(
        [str(src)], tok, out, ShardConfig(max_length=32, shard_size=60), progress=False
    )
    assert [s["name"] for s in m4["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert max(len(x[1]) for x in read_all(out)) == 32


def test_rerun_rewrites_orphan_and_corrupt_shards(tmp_path, tok):
    """A kill's leftovers (tar without stats) and a shard corrupted in place are rewritten."""
    src = corpus_jsonl(tmp_path / "c.jsonl", 100)
    cfg = ShardConfig(max_length=48, shard_size=30)
    out = tmp_path / "out"
    m1 = build_dataset([str(src)], tok, out, cfg, progress=False)
    assert not (out / ".shard-run.json").exists()
    ref = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    (out / "dataset.json").unlink()
    (out / "shard-000001.stats.json").unlink()  # orphan: killed before its stats
    (out / "shard-000001.tar").write_bytes(b"\0" * 1024)
    blob = bytearray((out / "shard-000002.tar").read_bytes())  # bit flip, same size
    blob[-2000] ^= 0x10
    (out / "shard-000002.tar").write_bytes(bytes(blob))
    idx = json.loads(
        (out / "shard-000003.idx.json").read_text()
    )  # index still valid JSON, wrong offset
    idx["ids_offset"][0] += 512
    (out / "shard-000003.idx.json").write_text(json.dumps(idx, indent=2) + "\n")
    stamp = (out / "shard-000000.tar").stat().st_mtime_ns
    m2 = build_dataset([str(src)], tok, out, cfg, progress=False)
    assert m2["shards"] == m1["shards"] and m2["fingerprint"] == m1["fingerprint"]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == ref
    assert (out / "shard-000000.tar").stat().st_mtime_ns == stamp  # the intact shard was reused
    ShardSet(out, verify=True).verify()


def test_orphan_tar_needs_evidence_of_origin(tmp_path, tok):
    from kdcl_dist.errors import UserError

    src = corpus_jsonl(tmp_path / "c.jsonl", 40)
    cfg = ShardConfig(max_length=48, shard_size=30)
    out = tmp_path / "out"
    build_dataset([str(src)], tok, out, cfg, progress=False)
    (out / "dataset.json").unlink()
    for st in out.glob("shard-*.stats.json"):
        st.unlink()
    with pytest.raises(
        UserError, match="shard-000000.tar has no stats file .unknown origin.*--overwrite"
    ):
        build_dataset([str(src)], tok, out, cfg, progress=False)
    (out / ".shard-run.json").write_text(json.dumps({"tokenizer_fingerprint": "feedfacefeedface"}))
    with pytest.raises(
        UserError, match="interrupted run with tokenizer fingerprint feedfacefeedface"
    ):
        build_dataset([str(src)], tok, out, cfg, progress=False)
    from kdcl_dist.data.tokenizer import tokenizer_info

    (out / ".shard-run.json").write_text(
        json.dumps({"tokenizer_fingerprint": tokenizer_info(tok, "")["fingerprint"]})
    )
    m = build_dataset(
        [str(src)], tok, out, cfg, progress=False
    )  # this tokenizer's interrupted run: resumed
    assert m["num_samples"] == 40 and not (out / ".shard-run.json").exists()


def test_shardset_verify(tmp_path, tok):
    from kdcl_dist.errors import UserError

    src = corpus_jsonl(tmp_path / "c.jsonl", 60)
    out = tmp_path / "out"
    build_dataset([str(src)], tok, out, ShardConfig(max_length=48, shard_size=30), progress=False)
    ShardSet(out).verify()
    ss = ShardSet(out, verify=True)
    assert ss.shard_bytes(1) == (out / "shard-000001.tar").read_bytes()
    before = ss.get(35).ids.tolist()
    tar = out / "shard-000001.tar"
    blob = bytearray(tar.read_bytes())
    idx = json.loads((out / "shard-000001.idx.json").read_text())
    blob[idx["ids_offset"][5] + idx["ids_size"][5] - 1] ^= 0x01  # a token id of position 35
    tar.write_bytes(bytes(blob))
    fix = "re-run `kdcl-dist shard` with the same arguments to rewrite it"
    with pytest.raises(
        UserError, match=rf"shard-000001\.tar: sha256 .* the shard is corrupt, {fix}"
    ):
        ShardSet(out).verify()
    with pytest.raises(UserError, match=r"shard-000001\.tar: sha256"):
        ShardSet(out, verify=True).get(35)
    with pytest.raises(UserError, match=r"shard-000001\.tar: sha256"):
        list(ShardSet(out, verify=True).iter_shard(1))
    with pytest.raises(UserError, match=r"shard-000001\.tar: sha256"):
        ShardSet(out).shard_bytes(1, verify=True)
    assert ShardSet(out).get(35).ids.tolist() != before  # without verify: read as is
    ShardSet(out, verify=True).get(3)  # other shards are fine
    ShardSet(out).verify([0])
    tar.write_bytes(bytes(blob[:-512]))
    with pytest.raises(
        UserError,
        match=r"shard-000001\.tar: \d+ bytes, dataset\.json records \d+; the shard is truncated",
    ):
        ShardSet(out).verify_shard(1)


def test_tar_writer_fast_headers_are_tarfiles_bytes(tmp_path):
    """write_shard's template headers and in-flight index equal webdataset + tarfile's own output."""
    import io
    import tarfile

    import webdataset as wds

    from kdcl_dist.data.shards import (
        SHARD_MTIME,
        Sample,
        build_index,
        index_tar_bytes,
        npy_bytes,
        write_shard,
    )

    rng = np.random.default_rng(0)
    samples = []
    for i in range(60):
        n = int(rng.integers(0, 300)) if i else 0
        key = (
            ("k" * int(rng.integers(90, 130)) + str(i)) if i % 7 == 3 else f"doc-{i}_x"
        )  # some GNU long names
        text = None if i % 3 else "é" * int(rng.integers(0, 700))
        samples.append(
            Sample(
                key, rng.integers(0, 60000, n).astype(np.uint16), {"id": key, "n_tokens": n}, text
            )
        )
    entry = write_shard(tmp_path / "shard-000000.tar", samples, dtype=np.uint16)
    buf = io.BytesIO()
    w = wds.TarWriter(buf, mtime=SHARD_MTIME, format="GNU_FORMAT", encoder=False)
    w.tarstream.format = tarfile.GNU_FORMAT
    for s in samples:
        rec = {"__key__": s.key, "ids.npy": npy_bytes(s.ids), "json": json.dumps(s.meta).encode()}
        if s.text is not None:
            rec["txt"] = s.text.encode()
        w.write(rec)
    w.close()
    blob = (tmp_path / "shard-000000.tar").read_bytes()
    assert blob == buf.getvalue()
    idx = json.loads((tmp_path / "shard-000000.idx.json").read_text())
    assert idx == index_tar_bytes(blob) == build_index(tmp_path / "shard-000000.tar")
    assert entry["count"] == 60 and entry["bytes"] == len(blob)


def test_shard_cli_flags_and_overrides(tmp_path, tok_dir):
    src = corpus_jsonl(tmp_path / "c.jsonl", 40)
    p = run_cli(
        "shard",
        "--input",
        src,
        "--tokenizer",
        tok_dir,
        "--out",
        tmp_path / "out",
        "--shard-size",
        "15",
        "--no-progress",
        "max_length=40",
        env={"OMP_NUM_THREADS": "1"},
    )
    m = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert m["max_length"] == 40 and [s["count"] for s in m["shards"]] == [15, 15, 10]
    assert "40 documents read, 40 kept" in p.stdout


# ----------------------------------------------------------------------------- real data


@pytest.mark.data
def test_medline_xml_gz_yields_526_documents(data_dir, tok, tmp_path):
    path = data_dir / "pubmed" / "medline16n0902.xml.gz"
    docs, stats = _read([path])
    assert len(docs) == 526 and stats.documents == 604 and stats.dropped["no_abstract"] == 78
    assert all(d.id.startswith("pmid-") for d in docs)
    m = build_dataset([str(path)], tok, tmp_path / "out", ShardConfig(min_tokens=0), progress=False)
    t = m["totals"]
    assert t["input_documents"] == 604 and t["kept_documents"] == 526
    assert t["kept_documents"] + t["dropped_documents"] == 604


@pytest.mark.data
@pytest.mark.slow
def test_acceptance_real_abstracts(data_dir, tok_dir, tok, tmp_path):
    """kept + dropped == 12,073; every sample reads back identically, sequentially and by random access."""
    src = data_dir / "pubmed" / "abstracts.jsonl"
    out = tmp_path / "out"
    run_cli(
        "shard",
        "--input",
        src,
        "--tokenizer",
        tok_dir,
        "--out",
        out,
        "--no-progress",
        env={"OMP_NUM_THREADS": "1"},
    )
    m = json.loads((out / "dataset.json").read_text())
    t = m["totals"]
    assert t["input_documents"] == 12073
    assert t["kept_documents"] + sum(m["dropped"].values()) == 12073
    assert t["dropped_documents"] == sum(m["dropped"].values())
    records = [json.loads(line) for line in open(src, encoding="utf-8")]
    by_id = {r["id"]: r for r in records}
    s = ShardSet(out)
    assert len(s) == t["samples"] == m["num_samples"]
    seq = list(s)
    texts = [
        (by_id[x.meta["id"]]["title"] + " " + by_id[x.meta["id"]]["text"]).strip() for x in seq
    ]
    expect = tok(texts, truncation=True, max_length=m["max_length"])["input_ids"]
    for pos, x in enumerate(seq):
        assert x.ids.tolist() == expect[pos], x.key
    order = np.random.default_rng(0).permutation(len(s))
    for pos in order:
        got = s.get(int(pos))
        assert got.key == seq[pos].key and np.array_equal(got.ids, seq[pos].ids)
    # global order = input order
    assert [x.meta["doc_index"] for x in seq] == sorted(x.meta["doc_index"] for x in seq)


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_vs_two_ranks_torchrun(tmp_path, tok_dir):
    src = corpus_jsonl(tmp_path / "c.jsonl", 150)
    common = [
        "--input",
        str(src),
        "--tokenizer",
        str(tok_dir),
        "--shard-size",
        "20",
        "--max-length",
        "64",
        "--no-progress",
    ]
    run_cli("shard", *common, "--out", tmp_path / "w1", env={"OMP_NUM_THREADS": "1"})
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "kdcl_dist",
            "shard",
            *common,
            "--out",
            str(tmp_path / "w2"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "on 2 rank(s)" in p.stderr  # really two ranks, not two independent single runs
    a = json.loads((tmp_path / "w1" / "dataset.json").read_text())
    b = json.loads((tmp_path / "w2" / "dataset.json").read_text())
    assert len(a["shards"]) == 8 and a["shards"] == b["shards"]
    ra, rb = read_all(tmp_path / "w1"), read_all(tmp_path / "w2")
    assert len(ra) == 150 and ra == rb


# ----------------------------------------------------------------------------- tokenizer, init-models


def test_tokenizer_and_init_models_commands(tmp_path, tok_dir, capsys):
    from transformers import AutoConfig, AutoTokenizer

    from kdcl_dist.cli import main

    src = corpus_jsonl(tmp_path / "c.jsonl", 200)
    assert (
        main(
            [
                "tokenizer",
                "--input",
                str(src),
                "--out",
                str(tmp_path / "tok"),
                "--vocab-size",
                "600",
            ]
        )
        == 0
    )
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) <= 600 and tok.mask_token == "[MASK]"
    assert "vocab_size: 600" in (tmp_path / "tok" / "config.yaml").read_text()
    # refuses to overwrite silently
    assert (
        main(
            [
                "tokenizer",
                "--input",
                str(src),
                "--out",
                str(tmp_path / "tok"),
                "--vocab-size",
                "600",
            ]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err

    models = tmp_path / "models"
    assert (
        main(
            [
                "init-models",
                "--preset",
                "tiny",
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(models),
            ]
        )
        == 0
    )
    t, s = (
        AutoConfig.from_pretrained(models / "teacher"),
        AutoConfig.from_pretrained(models / "student"),
    )
    assert (t.model_type, s.model_type) == ("bert", "distilbert")
    assert t.vocab_size == s.vocab_size == len(tok)
    assert (t.hidden_size, t.num_hidden_layers, s.n_layers) == (128, 4, 2)  # the tiny preset
    capsys.readouterr()
    assert (
        main(
            [
                "init-models",
                "--teacher",
                str(models / "teacher"),
                "--student",
                str(models / "student"),
            ]
        )
        == 0
    )
    assert "share one vocabulary" in capsys.readouterr().out

    # a student built on another vocabulary is refused, with an error that says so
    assert (
        main(
            [
                "init-models",
                "--preset",
                "tiny",
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(tmp_path / "m2"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "init-models",
                "--teacher",
                str(models / "teacher"),
                "--student",
                str(tmp_path / "m2" / "student"),
            ]
        )
        == 2
    )
    assert "different vocabularies" in capsys.readouterr().err
    # the paper preset names pretrained models: init-models explains what to do instead
    assert (
        main(
            [
                "init-models",
                "--preset",
                "paper",
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(tmp_path / "m3"),
            ]
        )
        == 2
    )
    assert "names a pretrained model" in capsys.readouterr().err


@pytest.mark.mpi
@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_under_mpirun(tmp_path, tok_dir):
    import shutil

    mpirun = shutil.which("mpirun") or (
        str(Path(sys.executable).parent / "mpirun")
        if (Path(sys.executable).parent / "mpirun").exists()
        else None
    )
    if mpirun is None:
        pytest.skip("mpirun not installed (pip install -e .[mpi])")
    src = corpus_jsonl(tmp_path / "c.jsonl", 60)
    common = [
        "--input",
        str(src),
        "--tokenizer",
        str(tok_dir),
        "--shard-size",
        "10",
        "--no-progress",
    ]
    run_cli("shard", *common, "--out", tmp_path / "w1", env={"OMP_NUM_THREADS": "1"})
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(
        [
            mpirun,
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            sys.executable,
            "-m",
            "kdcl_dist",
            "shard",
            *common,
            "--out",
            str(tmp_path / "w2"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "on 2 rank(s)" in p.stderr
    assert read_all(tmp_path / "w1") == read_all(tmp_path / "w2")


def test_bench_ingest_runs_and_prints_ratios(tmp_path, tok_dir, capsys):
    """`kdcl-dist bench ingest` on a small corpus: all sides, both ratios, the breakdown."""
    import argparse
    import re

    from kdcl_dist.bench import ingest as bench

    src = corpus_jsonl(tmp_path / "c.jsonl", 150)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(
        [
            "--input",
            str(src),
            "--tokenizer",
            str(tok_dir),
            "--repeats",
            "3",
            "--shard-size",
            "50",
            "--batch-size",
            "40",
            "--max-length",
            "64",
        ]
    )
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "150 documents" in out and "stage output: 150 samples in 3 shards" in out
    ratios = re.findall(
        r"ratio stage / tokenizer alone \((HF call|stage's call)\):\s+([0-9.]+)", out
    )
    assert [k for k, _ in ratios] == ["HF call", "stage's call"] and all(
        float(v) > 0 for _, v in ratios
    )
    assert "median of per-repeat ratios" in out
    parts = re.findall(
        r"^  (read|tokenize|token ids|samples|write).*?\s([0-9.]+)\s+([0-9.]+)%$", out, re.M
    )
    assert len(parts) == 5 and abs(sum(float(pc) for *_, pc in parts) - 100) < 0.5
