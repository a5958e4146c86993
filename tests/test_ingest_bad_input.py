"""Bad input to `kdcl-dist shard`: a one-line error naming the file (and line), or a counter
when the user asked to skip; never a partial file under a final name."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from kdcl_dist.cli import main
from kdcl_dist.data.build import stats_name
from tests.conftest import corpus_docs


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """Two tokenizers with different vocabularies."""
    from kdcl_dist.data.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("toks")
    texts = [t for _, t in corpus_docs(300)]
    train_wordpiece(iter(texts), root / "a", vocab_size=800)
    train_wordpiece(
        iter(texts), root / "b", vocab_size=300
    )  # < what even the synthetic corpus yields
    return root / "a", root / "b"


def shard(capsys, *args) -> tuple[int, str]:
    rc = main(["shard", *map(str, args), "--no-progress"])
    err = capsys.readouterr().err
    return rc, err


def error_line(err: str, command: str = "shard") -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"kdcl-dist {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_nothing_partial(out: Path) -> None:
    """No manifest, no temporary files; any shard present is complete (tar + index + stats)."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    assert "dataset.json" not in names and "config.yaml" not in names
    assert not [n for n in names if n.startswith(".tmp-")]
    for n in names:
        if n.endswith(".tar"):
            assert n.replace(".tar", ".idx.json") in names and stats_name(n) in names


def good_lines(n: int) -> list[str]:
    return [json.dumps({"id": i, "text": t}) for i, t in corpus_docs(n)]


def test_missing_file(tmp_path, toks, capsys):
    rc, err = shard(
        capsys,
        "--input",
        tmp_path / "nope.jsonl",
        "--tokenizer",
        toks[0],
        "--out",
        tmp_path / "out",
    )
    assert rc == 2 and "nope.jsonl: input not found" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_empty_file(tmp_path, toks, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    rc, err = shard(
        capsys,
        "--input",
        tmp_path / "empty.jsonl",
        "--tokenizer",
        toks[0],
        "--out",
        tmp_path / "out",
    )
    assert rc == 2 and "empty.jsonl: empty file" in error_line(err)
    assert not (tmp_path / "out").exists()
    # a file of blank lines has no documents at all
    (tmp_path / "blank.jsonl").write_text("\n\n   \n")
    rc, err = shard(
        capsys,
        "--input",
        tmp_path / "blank.jsonl",
        "--tokenizer",
        toks[0],
        "--out",
        tmp_path / "out",
    )
    assert rc == 2 and "blank.jsonl: no documents to write (0 read" in error_line(err)
    assert_nothing_partial(tmp_path / "out")


def test_directory_without_readable_input(tmp_path, toks, capsys):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "README.md").write_text("not a corpus")
    (d / "table.csv").write_text("a,b\n")
    rc, err = shard(capsys, "--input", d, "--tokenizer", toks[0], "--out", tmp_path / "out")
    assert rc == 2 and f"{d}: directory has no readable input" in error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "bad,reason,message",
    [
        ("{not json", "invalid_json", "bad.jsonl:3: not valid JSON"),
        (
            json.dumps({"id": "x", "abstract": "no text field"}),
            "missing_field",
            "bad.jsonl:3: record has no string field 'text'",
        ),
    ],
)
def test_bad_jsonl_line_names_file_and_line_or_is_counted(
    tmp_path, toks, capsys, caplog, bad, reason, message
):
    lines = good_lines(6)
    lines.insert(2, bad)
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc, err = shard(
        capsys, "--input", src, "--tokenizer", toks[0], "--out", out, "--shard-size", "2"
    )
    assert rc == 2 and message in error_line(err) and "--skip-bad-lines" in error_line(err)
    assert_nothing_partial(out)
    # the whole input is parsed (and checked) before any shard is tokenized or written
    assert sorted(p.name for p in out.glob("*.tar")) == []

    rc, err = shard(
        capsys,
        "--input",
        src,
        "--tokenizer",
        toks[0],
        "--out",
        out,
        "--shard-size",
        "2",
        "--skip-bad-lines",
        "min_tokens=0",
    )
    assert rc == 0, err
    m = json.loads((out / "dataset.json").read_text())
    assert m["dropped"][reason] == 1 and m["totals"]["input_documents"] == 7
    assert m["totals"]["kept_documents"] == 6
    assert f"bad.jsonl:3: dropped ({reason})" in caplog.text


def test_non_utf8_bytes(tmp_path, toks, capsys, caplog):
    lines = [ln.encode() for ln in good_lines(4)]
    lines.insert(1, b'{"id": "latin", "text": "caf\xe9 au lait \xff"}')
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    rc, err = shard(capsys, "--input", src, "--tokenizer", toks[0], "--out", out, "min_tokens=0")
    assert rc == 0, err
    m = json.loads((out / "dataset.json").read_text())
    assert m["dropped"]["undecodable"] == 1 and m["totals"]["kept_documents"] == 4
    assert "mixed.jsonl:2: dropped (undecodable): not UTF-8" in caplog.text
    # a file that is not UTF-8 at all is an error, not 100% drops
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café\nnaïve résumé\n".encode("latin-1"))
    rc, err = shard(capsys, "--input", latin, "--tokenizer", toks[0], "--out", tmp_path / "out2")
    assert rc == 2 and "latin1.txt: not UTF-8 text (2 undecodable records" in error_line(err)
    assert_nothing_partial(tmp_path / "out2")


def _medline(n: int) -> str:
    rng = random.Random(0)
    words = "cells protein patients treated study results increased expression receptor".split()
    cits = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(60))
        cits.append(
            f'<MedlineCitation Owner="NLM" Status="MEDLINE"><PMID Version="1">{1000 + i}</PMID>'
            f"<Article><ArticleTitle>Title {i}.</ArticleTitle><Abstract>"
            f'<AbstractText Label="RESULTS">{body}</AbstractText></Abstract></Article></MedlineCitation>'
        )
    return (
        '<?xml version="1.0"?>\n<MedlineCitationSet>\n'
        + "\n".join(cits)
        + "\n</MedlineCitationSet>\n"
    )


def test_truncated_xml_gz(tmp_path, toks, capsys):
    whole = gzip.compress(_medline(300).encode())
    src = tmp_path / "pubmed26n0001.xml.gz"
    src.write_bytes(whole[: len(whole) * 2 // 3])
    out = tmp_path / "out"
    rc, err = shard(
        capsys, "--input", src, "--tokenizer", toks[0], "--out", out, "--shard-size", "50"
    )
    line = error_line(err)
    assert rc == 2 and "pubmed26n0001.xml.gz: truncated or corrupt XML/gzip after" in line
    assert_nothing_partial(out)
    # the intact file works
    src.write_bytes(whole)
    rc, err = shard(
        capsys, "--input", src, "--tokenizer", toks[0], "--out", out, "--shard-size", "50"
    )
    assert rc == 0, err
    assert json.loads((out / "dataset.json").read_text())["totals"]["kept_documents"] == 300


@pytest.mark.parametrize("policy", ["truncate", "split"])
def test_one_megabyte_abstract(tmp_path, toks, capsys, policy):
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer

    rng = random.Random(1)
    words = [w for _, t in corpus_docs(50) for w in t.split()]
    big = ""
    while len(big) < 1_000_000:
        big += " ".join(rng.choice(words) for _ in range(1000)) + " "
    big = big.strip()
    recs = [
        {"id": "before", "text": "The patients were treated with aspirin for two weeks."},
        {"id": "huge", "text": big},
        {
            "id": "after",
            "text": "Protein expression increased in the treated cells compared to controls.",
        },
    ]
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "out"
    # --min-tokens 4: the short neighbours must be kept whatever corpus trained the tokenizer
    # (with the synthetic fallback corpus, real words split into fewer, unknown pieces)
    rc, err = shard(
        capsys,
        "--input",
        src,
        "--tokenizer",
        toks[0],
        "--out",
        out,
        "--max-length",
        "128",
        "--too-long",
        policy,
        "--min-tokens",
        "4",
    )
    assert rc == 0, err
    m = json.loads((out / "dataset.json").read_text())
    s = list(ShardSet(out))
    tok = load_tokenizer(str(toks[0]))
    full = tok(big, add_special_tokens=False, verbose=False)["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    huge = [x for x in s if x.meta["id"].startswith("huge")]
    assert m["totals"]["kept_documents"] == 3 and m["totals"]["input_documents"] == 3
    assert len(full) > 100_000
    if policy == "truncate":
        assert (
            len(huge) == 1 and huge[0].meta["truncated"] and m["totals"]["truncated_documents"] == 1
        )
        assert huge[0].ids.tolist() == [cls] + full[:126] + [sep]
    else:
        assert len(huge) == -(-len(full) // 126) == m["totals"]["split_samples"]
        assert all(len(x.ids) <= 128 and x.ids[0] == cls and x.ids[-1] == sep for x in huge)
        assert sum((x.ids[1:-1].tolist() for x in huge), []) == full
        assert [x.meta["part"] for x in huge] == list(range(len(huge)))
    assert [x.meta["id"] for x in s][0] == "before" and s[-1].meta["id"] == "after"


def test_output_dir_from_another_tokenizer_refused_unless_overwrite(tmp_path, toks, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(good_lines(30)) + "\n")
    out = tmp_path / "out"
    rc, err = shard(
        capsys, "--input", src, "--tokenizer", toks[0], "--out", out, "--shard-size", "10"
    )
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, err = shard(
        capsys, "--input", src, "--tokenizer", toks[1], "--out", out, "--shard-size", "10"
    )
    line = error_line(err)
    assert (
        rc == 2
        and f"{out}: holds shards made with another tokenizer" in line
        and "--overwrite" in line
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    rc, err = shard(
        capsys,
        "--input",
        src,
        "--tokenizer",
        toks[1],
        "--out",
        out,
        "--shard-size",
        "10",
        "--overwrite",
    )
    assert rc == 0, err
    from kdcl_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    m = json.loads((out / "dataset.json").read_text())
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(load_tokenizer(str(toks[1])))
    # the trained size (a small synthetic corpus can yield fewer pieces than requested)
    assert (
        m["tokenizer"]["vocab_size"]
        == len(load_tokenizer(str(toks[1])))
        != len(load_tokenizer(str(toks[0])))
    )
