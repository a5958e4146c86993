"""PubMed as NLM publishes it (a directory of pubmedYYnNNNN.xml.gz with .md5 files, a README
and an update file) and ingestion divided across ranks (issue 15, items 1-2).

The download is built at test time from the real baseline file
($KDCL_DATA_DIR/pubmed/medline16n0902.xml.gz) split into several files, or from synthetic
citations when the data directory is absent."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kdcl_dist.cli import main
from kdcl_dist.data import ingest, ingest_plan
from kdcl_dist.data.build import ShardConfig, build_dataset
from kdcl_dist.data.nlm_sample import (
    UNKNOWN_PMID,
    citations_from,
    synthetic_citations,
    write_nlm_download,
)
from kdcl_dist.data.reader import ShardSet
from tests.conftest import REPO, corpus_docs, real_data_dir, run_cli
from tests.test_ingest_bad_input import assert_nothing_partial, error_line


def _source(kind: str) -> list[bytes]:
    if kind == "real":
        d = real_data_dir()
        src = d / "pubmed" / "medline16n0902.xml.gz" if d else None
        if src is None or not src.exists():
            pytest.skip("real data not found: set KDCL_DATA_DIR (default ../shared/data)")
        return citations_from(src)
    return synthetic_citations(120)


CFG = dict(shard_size=50, max_length=64, min_tokens=1, keep_text=True)


def _build(inputs, tok, out, world=1, **kw):
    cfg = ShardConfig(**{**CFG, **kw})
    m = None
    for rank in reversed(range(world)):  # ranks one after another (no process group), 0 last
        m = build_dataset(
            [str(i) for i in inputs], tok, out, cfg, rank=rank, world=world, progress=False
        )
    return m


def _samples(out) -> list[tuple[str, str]]:
    return [(x.meta["id"], x.text) for x in ShardSet(out)]


def _shard_bytes(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("shard-*"))}


@pytest.mark.parametrize("kind", ["real", "synthetic"])
def test_nlm_download_documents_and_counts(tmp_path, tok, kind):
    cits = _source(kind)
    dl = write_nlm_download(cits, tmp_path / "pubmed", files=4, replace=3, same=1, delete=2)
    out = tmp_path / "out"
    m = _build([dl.dir], tok, out)

    # expected: the baseline's documents read file by file, minus the deleted PMIDs; the
    # updated PMIDs leave their place and come (newer version) at the update file's position
    base_stats = ingest.IngestStats()
    base = list(
        ingest.read_documents(
            ingest.resolve_inputs([str(p) for p in dl.baseline]),
            ShardConfig().read_options(False),
            base_stats,
        )
    )
    moved = {f"pmid-{p}" for p in dl.replaced + dl.same}
    gone = {f"pmid-{p}" for p in dl.deleted}
    by_id = {d.id: d.text for d in base}
    expect = [(d.id, d.text) for d in base if d.id not in moved | gone]
    expect += [(f"pmid-{p}", None) for p in dl.replaced]  # new title, checked below
    expect += [(f"pmid-{p}", by_id[f"pmid-{p}"]) for p in dl.same]
    got = _samples(out)
    assert [i for i, _ in got] == [i for i, _ in expect]
    for (i, t), (_, want) in zip(got, expect):
        if want is not None:
            assert t == want, i
        else:
            assert "(revised)" in t and t != by_id[i]

    n_base = len(base)
    assert n_base == len({d.id for d in base}) > 20  # the fixture has no repeated PMIDs
    t, dropped = m["totals"], m["dropped"]
    assert t["input_documents"] == dl.citations == len(cits) + 4
    assert dropped["replaced"] == 4 and dropped["deleted"] == 2
    assert dropped["no_abstract"] == base_stats.dropped["no_abstract"]
    assert t["kept_documents"] == n_base - 2 == len(got)
    assert t["kept_documents"] + t["dropped_documents"] == t["input_documents"]
    assert m["updates"] == {"replaced_citations": 4, "deleted_citations": 2, "unknown_deletions": 1}
    sk = m["skipped_files"]
    assert sk["count"] == 6 and sk["by_reason"] == {"md5_file": 5, "not_citation_xml": 1}
    assert any(x["path"].endswith("README.txt") for x in sk["files"])
    assert [Path(i["path"]).name for i in m["inputs"]] == [
        p.name for p in [*dl.baseline, dl.update]
    ]
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())

    # any world size (ranks one after another here; real processes below): same bytes
    out2 = tmp_path / "out2"
    m2 = _build([dl.dir], tok, out2, world=2)
    assert _shard_bytes(out2) == _shard_bytes(out) and m2["shards"] == m["shards"]


def test_nlm_files_as_a_list_or_glob_are_read_in_nlm_order(tmp_path, tok):
    dl = write_nlm_download(synthetic_citations(60), tmp_path / "pubmed", files=3)
    ref = _build([dl.dir], tok, tmp_path / "ref")
    files = sorted(dl.dir.iterdir())  # README, .md5 files and citations, as `pubmed/*` gives
    random.Random(1).shuffle(files)  # the update file may come first: NLM order still applies
    as_list = _build(files, tok, tmp_path / "list")
    as_glob = _build([str(dl.dir / "pubmed26n*.xml.gz")], tok, tmp_path / "glob")
    # same documents in the same order (the `source` recorded differs: pubmed/x vs x)
    assert as_list["shards"] == as_glob["shards"]
    assert _samples(tmp_path / "list") == _samples(tmp_path / "ref") == _samples(tmp_path / "glob")
    assert as_list["dropped"] == ref["dropped"] and as_list["updates"] == ref["updates"]
    assert as_glob["skipped_files"]["count"] == 0 and as_list["skipped_files"]["count"] == 5


def _shard_cli(capsys, tok_dir, *args):
    rc = main(
        [
            "shard",
            "--tokenizer",
            str(tok_dir),
            "--shard-size",
            "20",
            "--no-progress",
            *map(str, args),
        ]
    )
    return rc, capsys.readouterr().err


def test_md5_mismatch_is_an_error_or_skipped_and_counted(tmp_path, tok_dir, capsys):
    dl = write_nlm_download(synthetic_citations(60), tmp_path / "pubmed", files=3)
    bad = dl.baseline[1]
    md5 = bad.with_name(bad.name + ".md5")
    md5.write_text(f"MD5({bad.name})= {'0' * 32}\n")
    out = tmp_path / "out"
    rc, err = _shard_cli(capsys, tok_dir, "--input", dl.dir, "--out", out)
    line = error_line(err)
    assert rc == 2 and f"{bad}: MD5 " in line and "differs from 000" in line
    assert "--md5-mismatch skip" in line
    assert_nothing_partial(out)
    assert not list(out.glob("*.tar"))

    rc, err = _shard_cli(capsys, tok_dir, "--input", dl.dir, "--out", out, "--md5-mismatch", "skip")
    assert rc == 0, err
    m = json.loads((out / "dataset.json").read_text())
    assert m["skipped_files"]["by_reason"]["md5_mismatch"] == 1
    assert {"path": str(bad), "reason": "md5_mismatch"} in m["skipped_files"]["files"]
    ids = {x.meta["id"] for x in ShardSet(out)}
    with gzip.open(bad) as f:
        bad_pmids = {
            f"pmid-{c.split(b'</PMID>')[0].split(b'>')[-1].decode()}"
            for c in f.read().split(b"<PMID")[1:]
        }
    in_update = {f"pmid-{p}" for p in dl.replaced + dl.same}  # newer versions, still read
    assert ids and not (ids & bad_pmids) - in_update and len(bad_pmids - in_update) > 10


def test_truncated_xml_gz_in_the_middle_of_a_directory(tmp_path, tok_dir, capsys):
    dl = write_nlm_download(synthetic_citations(90), tmp_path / "pubmed", files=3)
    mid = dl.baseline[1]
    data = mid.read_bytes()
    mid.write_bytes(data[: len(data) // 2])  # a download cut short
    mid.with_name(mid.name + ".md5").unlink()  # (with its .md5 the mismatch is found first)
    out = tmp_path / "out"
    rc, err = _shard_cli(capsys, tok_dir, "--input", dl.dir, "--out", out)
    line = error_line(err)
    assert rc == 2 and f"{mid}: truncated or corrupt XML/gzip after" in line
    assert_nothing_partial(out)
    assert not list(out.glob("shard-*")) and not list(out.glob(".tmp-*"))


def test_unknown_delete_citation_is_counted_not_an_error(tmp_path, tok):
    """An update file alone: its DeleteCitation names PMIDs no file holds."""
    dl = write_nlm_download(synthetic_citations(30), tmp_path / "pubmed", files=1, delete=2)
    m = _build([dl.update], tok, tmp_path / "out")
    assert m["updates"] == {"replaced_citations": 0, "deleted_citations": 0, "unknown_deletions": 3}
    assert UNKNOWN_PMID not in {x.meta["id"] for x in ShardSet(tmp_path / "out")}


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_byte_ranges_of_one_file_read_the_same_documents(tmp_path, suffix):
    src = tmp_path / f"c{suffix}"
    texts = [t for _, t in corpus_docs(300)]
    lines = [json.dumps({"text": t}) for t in texts] if suffix == ".jsonl" else texts
    lines.insert(5, "")  # blank lines and a BOM at the start are handled in the right range
    src.write_text("\ufeff" + "\n".join(lines * 2) + "\n", encoding="utf-8")
    opts = ShardConfig(id_field="").read_options(False)
    whole = list(
        ingest.read_documents(ingest.resolve_inputs([str(src)]), opts, ingest.IngestStats())
    )
    units = ingest_plan.make_units(ingest.resolve_inputs([str(src)]), 3, opts)
    assert len(units) == 6 and units[0].start == 0 and units[-1].end == src.stat().st_size
    pieces = []
    for u in units:
        st = ingest.IngestStats()
        pieces += list(ingest.read_documents([u], opts, st))
    assert pieces == whole  # same ids (file:line), texts and order
    assert whole[0].id == f"{src.name}:1" and whole[-1].id == f"{src.name}:{2 * len(lines)}"
    assert not whole[0].text.startswith("\ufeff")


def _torchrun(args, out, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "kdcl_dist",
            "shard",
            *map(str, args),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "on 2 rank(s)" in p.stderr
    per_rank = p.stderr.split("input units parsed per rank [")[1].split("]")[0]
    assert all(int(n) > 0 for n in per_rank.split(",")), per_rank  # both ranks parsed a share
    return p.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_vs_two_ranks_nlm_and_one_jsonl(tmp_path, tok_dir):
    """Real processes (torchrun, gloo): each rank parses only its share (whole XML files; byte
    ranges of the jsonl); shards and dataset.json are byte-identical to one rank's."""
    dl = write_nlm_download(synthetic_citations(200), tmp_path / "pubmed", files=5)
    src = tmp_path / "c.jsonl"
    src.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in corpus_docs(300)) * 2
    )
    assert src.stat().st_size > ingest_plan.RANGE_MIN_BYTES
    common = ["--tokenizer", tok_dir, "--shard-size", "20", "--max-length", "64", "--no-progress"]
    for name, inp, port in (("nlm", dl.dir, 29531), ("jsonl", src, 29532)):
        args = ["--input", inp, *common]
        run_cli("shard", *args, "--out", tmp_path / f"{name}1", env={"OMP_NUM_THREADS": "1"})
        _torchrun(args, tmp_path / f"{name}2", port)
        a, b = tmp_path / f"{name}1", tmp_path / f"{name}2"
        ma = json.loads((a / "dataset.json").read_text())
        mb = json.loads((b / "dataset.json").read_text())
        for m in (ma, mb):
            m.pop("config", None)
        assert ma == mb
        assert _shard_bytes(a) == _shard_bytes(b) and len(_shard_bytes(a)) > 6
        assert not list(b.glob(".tmp-*"))
    assert mb["dropped"]["duplicate"] == 300  # the jsonl holds every record twice
