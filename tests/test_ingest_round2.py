"""Bad input to ingestion, round two (issue #17): ids kept exactly (keys that never collide),
`.json` corpora, `--text-unit file`, byte order marks, shard_size as a cap on samples, and
tokenizers refused up front. Each test checks the exact outcome: the one-line error and exit
status 2, nothing partial under a final name, or the right documents read back."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from kdcl_dist.cli import main
from kdcl_dist.data import ingest
from kdcl_dist.data.build import ShardConfig, build_dataset
from kdcl_dist.data.reader import ShardSet
from kdcl_dist.data.shards import sample_key
from kdcl_dist.errors import UserError
from tests.conftest import corpus_docs, run_cli
from tests.test_ingest_bad_input import assert_nothing_partial, error_line, shard

# 15 distinct ids that the old key sanitising mapped onto 9 keys (a/b, a_b, a b, a:b, a\b -> a_b;
# a.b.c, a.b_c -> a_b_c; CJK and Greek -> __ or ___), plus ids that look like other things
AWKWARD_IDS = [
    "a/b",
    "a_b",
    "a.b.c",
    "a.b_c",
    "a b",
    "a:b",
    "a\\b",
    "文献",
    "論文",
    "한국",
    "κείμενο",
    "λόγος",
    "%41",
    "../../etc/passwd",
    "x" * 150 + "é",
]


@pytest.fixture(scope="module")
def texts():
    return [t for _, t in corpus_docs(60)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def manifest(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text())


def read_ids(out: Path) -> list[str]:
    return [s.meta["id"] for s in ShardSet(out)]


def _read(paths, **kw):
    stats = ingest.IngestStats()
    docs = list(
        ingest.iter_clean_documents([str(p) for p in paths], ingest.ReadOptions(**kw), stats)
    )
    return docs, stats


# ----------------------------------------------------------------------------- ids and keys


def test_awkward_ids_survive_exactly(tmp_path, tok_dir, texts, capsys):
    assert len(set(AWKWARD_IDS)) == 15
    src = write_jsonl(
        tmp_path / "c.jsonl", ({"id": i, "text": t} for i, t in zip(AWKWARD_IDS, texts))
    )
    out = tmp_path / "out"
    rc, err = shard(
        capsys,
        "--input",
        src,
        "--tokenizer",
        tok_dir,
        "--out",
        out,
        "--min-tokens",
        "0",
        "--shard-size",
        "4",
    )
    assert rc == 0, err
    m = manifest(out)
    assert m["totals"]["input_documents"] == m["totals"]["kept_documents"] == 15
    assert m["dropped"]["duplicate_id"] == 0
    assert read_ids(out) == AWKWARD_IDS  # sequential read, exact ids, input order
    ss = ShardSet(out)
    assert [ss.get(p).meta["id"] for p in range(15)] == AWKWARD_IDS  # random access
    keys = [k for s in range(ss.num_shards) for k in ss.keys(s)]
    assert keys == [sample_key(i) for i in AWKWARD_IDS] and len(set(keys)) == 15
    # keys are safe tar member names: one path component, no '.', nothing that climbs out
    assert all(re.fullmatch(r"[A-Za-z0-9_%-]+", k) and len(k) <= 120 for k in keys)
    # plain ids keep the key earlier versions gave them; others are escaped
    assert sample_key("pmid-123") == "pmid-123" and sample_key("a_b") == "a_b"
    assert sample_key("a/b") == "a%2Fb" and sample_key("κ") == "%CE%BA"


def test_cjk_and_greek_ids_are_not_duplicates(tmp_path, texts):
    ids = ["文献一", "文献二", "κείμενο", "λόγος", "α"]
    src = write_jsonl(tmp_path / "c.jsonl", ({"id": i, "text": t} for i, t in zip(ids, texts)))
    docs, stats = _read([src])
    assert [d.id for d in docs] == ids and not stats.dropped


def test_same_id_twice_is_one_duplicate(tmp_path, tok, texts):
    recs = [
        {"id": "a/b", "text": texts[0]},
        {"id": "a_b", "text": texts[1]},
        {"id": "a/b", "text": texts[2]},
        {"id": 7, "text": texts[3]},
        {"id": "7", "text": texts[4]},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    m = build_dataset([str(src)], tok, tmp_path / "out", ShardConfig(min_tokens=0), progress=False)
    assert m["totals"]["kept_documents"] == 3 and m["dropped"]["duplicate_id"] == 2
    got = list(ShardSet(tmp_path / "out"))
    assert [s.meta["id"] for s in got] == ["a/b", "a_b", "7"]  # the first of each id is kept
    assert got[0].meta["doc_index"] == 0 and got[2].meta["doc_index"] == 2


@pytest.mark.parametrize(
    "raw,shown",
    [
        ([1], "a list ([1])"),
        ({"a": 1}, 'an object ({"a": 1})'),
        (True, "a boolean (true)"),
        (1.5, "a number (1.5)"),
    ],
)
def test_non_string_id_refused_with_file_and_line(tmp_path, tok_dir, texts, capsys, raw, shown):
    recs = [
        {"id": "ok", "text": texts[0]},
        {"id": raw, "text": texts[1]},
        {"id": "ok2", "text": texts[2]},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    out = tmp_path / "out"
    rc, err = shard(capsys, "--input", src, "--tokenizer", tok_dir, "--out", out)
    assert rc == 2
    assert error_line(err) == (
        f"kdcl-dist shard: error: {src}:2: id field 'id' holds {shown}, not a string "
        "or an integer; give every record a string id, set --id-field '' to number documents by file:line, "
        "or pass --skip-bad-lines to count and skip such records"
    )
    assert_nothing_partial(out)
    rc, err = shard(
        capsys,
        "--input",
        src,
        "--tokenizer",
        tok_dir,
        "--out",
        out,
        "--skip-bad-lines",
        "--min-tokens",
        "0",
    )
    assert rc == 0, err
    m = manifest(out)
    assert m["dropped"]["bad_id"] == 1 and m["totals"]["kept_documents"] == 2
    assert read_ids(out) == ["ok", "ok2"]


def test_integer_ids_and_nul(tmp_path, texts):
    src = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": 12, "text": texts[0]},
            {"id": -3, "text": texts[1]},
            {"id": None, "text": texts[2]},
            {"id": "", "text": texts[3]},
        ],
    )
    docs, _ = _read([src])
    assert [d.id for d in docs] == ["12", "-3", "c.jsonl:3", "c.jsonl:4"]
    bad = write_jsonl(tmp_path / "nul.jsonl", [{"id": "a\0", "text": texts[0]}])
    with pytest.raises(
        UserError, match=r"nul\.jsonl:1: id 'a\\x00' contains the character U\+0000; "
    ):
        _read([bad])


def test_split_part_id_clash_is_an_error(tmp_path, tok_dir, texts, capsys):
    """`x` split into parts gets sample ids x_part0, x_part1, ...: a document named x_part1 clashes."""
    long = " ".join(texts[:3])
    recs = [
        {"id": "x", "text": long},
        {"id": "x_part1", "text": "Aspirin reduced the risk of stroke."},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    for size in ("100", "1"):  # the clash inside one shard, and across shards
        out = tmp_path / f"out{size}"
        rc, err = shard(
            capsys,
            "--input",
            src,
            "--tokenizer",
            tok_dir,
            "--out",
            out,
            "--max-length",
            "32",
            "--too-long",
            "split",
            "--min-tokens",
            "0",
            "--shard-size",
            size,
        )
        where = (
            "shard-000000.tar: sample key 'x_part1' (id 'x_part1') twice in this shard"
            if size == "100"
            else "shard-000001.tar: sample key 'x_part1' (id 'x_part1') also in shard-000000.1.tar"
        )
        assert rc == 2 and error_line(err) == (
            f"kdcl-dist shard: error: {out / where}; sample ids must be unique: a document id equals the "
            "`<id>_part<k>` id of a part of a split document, rename that document or use --too-long truncate"
        )
        assert_nothing_partial(out)
    rc, err = shard(
        capsys,
        "--input",
        src,
        "--tokenizer",
        tok_dir,
        "--out",
        tmp_path / "t",
        "--max-length",
        "32",
        "--min-tokens",
        "0",
    )
    assert rc == 0 and read_ids(tmp_path / "t") == ["x", "x_part1"]


def test_heldout_rule_unchanged_for_ids(tmp_path, tok, texts):
    """eval's held-out split reads meta['id'] (the exact id; parts end in _partK): unchanged rule."""
    from kdcl_dist.evaluate.mlm import is_heldout, select_samples

    recs = [{"id": i, "text": t} for i, t in zip(AWKWARD_IDS, texts)]
    recs.append({"id": "κ/long", "text": " ".join(texts[20:23])})
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    cfg = ShardConfig(min_tokens=0, max_length=32, too_long="split")
    build_dataset([str(src)], tok, tmp_path / "out", cfg, progress=False)
    _, chosen = select_samples(tmp_path / "out", "heldout", 50)
    ids = read_ids(tmp_path / "out")
    parts = [i for i in ids if i.startswith("κ/long_part")]
    assert len(parts) > 1
    assert [i for i, _ in chosen] == [i for i in ids if is_heldout(i, 50)]
    assert len({is_heldout(p, 50) for p in parts}) == 1 and is_heldout(parts[0], 50) == is_heldout(
        "κ/long", 50
    )


# ----------------------------------------------------------------------------- .json corpora


def test_json_list_and_object_inputs(tmp_path, texts):
    recs = [{"id": f"d{i}", "title": "", "text": t} for i, t in enumerate(texts[:4])]
    want = [(r["id"], r["text"]) for r in recs]
    (tmp_path / "pretty.json").write_text(json.dumps(recs, indent=2))
    (tmp_path / "minified.json").write_text(json.dumps(recs))
    (tmp_path / "holder.json").write_text(json.dumps({"version": 1, "data": recs}, indent=4))
    (tmp_path / "holder1.json").write_text(json.dumps({"version": 1, "data": recs}))
    (tmp_path / "lines.json").write_text(
        "".join(json.dumps(r) + "\n" for r in recs)
    )  # JSON Lines named .json
    with gzip.open(tmp_path / "pretty.json.gz", "wt") as f:
        f.write(json.dumps(recs, indent=1))
    for name in (
        "pretty.json",
        "minified.json",
        "holder.json",
        "holder1.json",
        "lines.json",
        "pretty.json.gz",
    ):
        docs, stats = _read([tmp_path / name], dedup=False)
        assert [(d.id, d.text) for d in docs] == want, name
        assert stats.documents == 4 and not stats.dropped, name
    # ids fall back to <file>#<n>; a single record object is one document
    (tmp_path / "noid.json").write_text(json.dumps([{"text": t} for t in texts[:3]], indent=2))
    docs, _ = _read([tmp_path / "noid.json"])
    assert [d.id for d in docs] == ["noid.json#1", "noid.json#2", "noid.json#3"]
    (tmp_path / "one.json").write_text(json.dumps({"id": "solo", "text": texts[0]}, indent=2))
    assert [d.id for d in _read([tmp_path / "one.json"])[0]] == ["solo"]


def test_json_input_through_the_cli(tmp_path, tok_dir, texts, capsys):
    recs = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts[:6])]
    (tmp_path / "c.json").write_text(json.dumps(recs, indent=2))
    out = tmp_path / "out"
    rc, err = shard(
        capsys,
        "--input",
        tmp_path / "c.json",
        "--tokenizer",
        tok_dir,
        "--out",
        out,
        "--min-tokens",
        "0",
    )
    assert rc == 0, err
    m = manifest(out)
    assert read_ids(out) == [r["id"] for r in recs] and m["inputs"][0]["format"] == "json"


def test_bad_json_documents(tmp_path, tok_dir, texts, capsys):
    recs = [{"id": "a", "text": texts[0]}, "not a record", {"id": "c", "text": texts[2]}]
    (tmp_path / "r.json").write_text(json.dumps(recs, indent=2))
    out = tmp_path / "out"
    rc, err = shard(capsys, "--input", tmp_path / "r.json", "--tokenizer", tok_dir, "--out", out)
    assert rc == 2 and error_line(err) == (
        f"kdcl-dist shard: error: {tmp_path / 'r.json'}:6 (record 2): a JSON string, not an object; each record "
        "must be a JSON object, or pass --skip-bad-lines to count and skip it"
    )
    assert_nothing_partial(out)
    rc, err = shard(
        capsys,
        "--input",
        tmp_path / "r.json",
        "--tokenizer",
        tok_dir,
        "--out",
        out,
        "--skip-bad-lines",
        "--min-tokens",
        "0",
    )
    assert rc == 0 and manifest(out)["dropped"]["invalid_json"] == 1 and read_ids(out) == ["a", "c"]

    text = json.dumps(recs[:1], indent=2).replace('"a",', '"a"')  # a missing comma: line 4 is wrong
    (tmp_path / "broken.json").write_text(text)
    rc, err = shard(
        capsys,
        "--input",
        tmp_path / "broken.json",
        "--tokenizer",
        tok_dir,
        "--out",
        tmp_path / "o2",
    )
    assert rc == 2 and error_line(err) == (
        f"kdcl-dist shard: error: {tmp_path / 'broken.json'}:4: not valid JSON (Expecting ',' delimiter at column 5); "
        "fix the file (a .json corpus is one JSON document: a list of records, or an object holding one; or JSON "
        "Lines, one object per line)"
    )
    assert_nothing_partial(tmp_path / "o2")
    (tmp_path / "two.json").write_text(json.dumps({"train": recs[:1], "test": recs[2:]}, indent=2))
    rc, err = shard(
        capsys, "--input", tmp_path / "two.json", "--tokenizer", tok_dir, "--out", tmp_path / "o3"
    )
    assert (
        rc == 2
        and "two.json: the JSON object holds several lists of records ('train', 'test')"
        in error_line(err)
    )
    # a pretty-printed document named .jsonl: the JSON Lines error says what it looks like
    (tmp_path / "p.jsonl").write_text(json.dumps(recs[:1], indent=2))
    rc, err = shard(
        capsys, "--input", tmp_path / "p.jsonl", "--tokenizer", tok_dir, "--out", tmp_path / "o4"
    )
    assert rc == 2 and error_line(err) == (
        f"kdcl-dist shard: error: {tmp_path / 'p.jsonl'}:1: not valid JSON (Expecting value at column 1); the file "
        "looks like one JSON document, not JSON Lines: name it .json or pass --format json; otherwise fix the line "
        "or pass --skip-bad-lines to count and skip it"
    )
    (tmp_path / "m.jsonl").write_text(json.dumps(recs[:1]) + "\n")  # minified, one line
    rc, err = shard(
        capsys, "--input", tmp_path / "m.jsonl", "--tokenizer", tok_dir, "--out", tmp_path / "o5"
    )
    assert rc == 2 and error_line(err) == (
        f"kdcl-dist shard: error: {tmp_path / 'm.jsonl'}:1: a JSON list, not an object; the file looks like one "
        "JSON document, not JSON Lines: name it .json or pass --format json; otherwise each line must be a JSON "
        "object, or pass --skip-bad-lines to count and skip it"
    )


# ----------------------------------------------------------------------------- txt: one document per file


def test_text_unit_file(tmp_path, tok_dir, texts, capsys):
    d = tmp_path / "abstracts"
    (d / "sub").mkdir(parents=True)
    files = {
        "0001.txt": texts[0],
        "0002.txt": texts[1] + "\n\n" + texts[2],
        "sub/0003.txt": texts[3],
    }
    for name, body in files.items():
        # one abstract wrapped over several lines, as one-abstract-per-file corpora are
        words = body.split(" ")
        (d / name).write_text(
            "\n".join(" ".join(words[i : i + 8]) for i in range(0, len(words), 8)) + "\n"
        )
    docs, stats = _read([d], text_unit="file")
    assert [d_.id for d_ in docs] == [
        "abstracts/0001.txt",
        "abstracts/0002.txt",
        "abstracts/sub/0003.txt",
    ]
    assert [" ".join(d_.text.split()) for d_ in docs] == [
        " ".join(b.split()) for b in files.values()
    ]
    assert stats.documents == 3
    assert len(_read([d])[0]) > 10  # the default is still one document per line
    out = tmp_path / "out"
    rc, err = shard(
        capsys,
        "--input",
        d,
        "--tokenizer",
        tok_dir,
        "--out",
        out,
        "--text-unit",
        "file",
        "--min-tokens",
        "0",
    )
    assert rc == 0, err
    assert read_ids(out) == ["abstracts/0001.txt", "abstracts/0002.txt", "abstracts/sub/0003.txt"]
    assert manifest(out)["config"]["text_unit"] == "file"


# ----------------------------------------------------------------------------- byte order marks


def test_utf8_bom_is_removed(tmp_path, tok_dir, texts, capsys):
    bom = b"\xef\xbb\xbf"
    lines = [json.dumps({"id": f"j{i}", "text": t}).encode() for i, t in enumerate(texts[:3])]
    (tmp_path / "a.jsonl").write_bytes(bom + b"\n".join(lines) + b"\n")
    # two BOM files concatenated: a BOM at the start of a later line too
    (tmp_path / "cat.jsonl").write_bytes(bom + lines[0] + b"\n" + bom + lines[1] + b"\n")
    (tmp_path / "b.txt").write_bytes(bom + texts[3].encode() + b"\n" + texts[4].encode() + b"\n")
    (tmp_path / "c.json").write_bytes(
        bom + json.dumps([{"id": "k", "text": texts[5]}], indent=2).encode()
    )
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(bom + lines[2] + b"\n"))
    docs, stats = _read([tmp_path / "a.jsonl"])
    assert [d.id for d in docs] == ["j0", "j1", "j2"] and not stats.dropped
    assert [d.id for d in _read([tmp_path / "cat.jsonl"])[0]] == ["j0", "j1"]
    txt = _read([tmp_path / "b.txt"])[0]
    assert [d.text for d in txt] == [texts[3], texts[4]] and not txt[0].text.startswith("\ufeff")
    assert [d.id for d in _read([tmp_path / "c.json"])[0]] == ["k"]
    assert [d.id for d in _read([tmp_path / "d.jsonl.gz"])[0]] == ["j2"]
    out = tmp_path / "out"
    rc, err = shard(
        capsys,
        "--input",
        tmp_path / "a.jsonl",
        "--tokenizer",
        tok_dir,
        "--out",
        out,
        "--min-tokens",
        "0",
    )
    assert rc == 0, err
    assert manifest(out)["totals"]["kept_documents"] == 3 and read_ids(out) == ["j0", "j1", "j2"]


# ----------------------------------------------------------------------------- shard_size counts samples


def test_shard_size_caps_samples_and_layout_is_rank_independent(tmp_path, tok, texts):
    recs = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts[:30])]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    cfg = ShardConfig(max_length=24, shard_size=7, min_tokens=0, too_long="split")
    ref = build_dataset([str(src)], tok, tmp_path / "w1", cfg, progress=False)
    counts = [s["count"] for s in ref["shards"]]
    assert max(counts) == 7 and all(c <= 7 for c in counts)
    assert sum(counts) == ref["num_samples"] == ref["totals"]["samples"] > 30
    names = [s["name"] for s in ref["shards"]]
    assert (
        names[:2] == ["shard-000000.tar", "shard-000000.1.tar"] and len(names) > 5
    )  # block 0 fills 2+ shards
    seq = list(ShardSet(tmp_path / "w1", verify=True))
    assert [s.meta["doc_index"] for s in seq] == sorted(
        s.meta["doc_index"] for s in seq
    )  # input order
    assert sorted({s.meta.get("doc_id", s.meta["id"]) for s in seq}) == sorted(
        r["id"] for r in recs
    )
    for world in (2, 3):  # ranks one after another in one process, rank 0 last (it merges)
        out = tmp_path / f"w{world}"
        for rank in reversed(range(world)):
            m = build_dataset([str(src)], tok, out, cfg, rank=rank, world=world, progress=False)
        assert m["shards"] == ref["shards"] and m["fingerprint"] == ref["fingerprint"]
        assert {
            p.name: p.read_bytes()
            for p in out.glob("shard-*")
            if not p.name.endswith(".stats.json")
        } == {
            p.name: p.read_bytes()
            for p in (tmp_path / "w1").glob("shard-*")
            if not p.name.endswith(".stats.json")
        }
    # a re-run reuses every shard; fewer samples per block now: the extra shards of a block go
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w1").glob("shard-*.tar")}
    build_dataset([str(src)], tok, tmp_path / "w1", cfg, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w1").glob("shard-*.tar")} == stamp
    m = build_dataset(
        [str(src)],
        tok,
        tmp_path / "w1",
        ShardConfig(max_length=24, shard_size=7, min_tokens=0),
        progress=False,
    )
    assert [s["count"] for s in m["shards"]] == [7, 7, 7, 7, 2]
    assert sorted(p.name for p in (tmp_path / "w1").glob("shard-*.tar")) == [
        s["name"] for s in m["shards"]
    ]


def test_part_shard_orphan_and_corruption_rewritten(tmp_path, tok, texts):
    """A block's extra shards are checked like its first: a corrupt or missing one rewrites the block."""
    src = write_jsonl(
        tmp_path / "c.jsonl", ({"id": f"d{i}", "text": t} for i, t in enumerate(texts[:20]))
    )
    cfg = ShardConfig(max_length=24, shard_size=6, min_tokens=0, too_long="split")
    out = tmp_path / "out"
    m1 = build_dataset([str(src)], tok, out, cfg, progress=False)
    ref = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    part = out / "shard-000001.1.tar"
    blob = bytearray(part.read_bytes())
    blob[600] ^= 0x01
    part.write_bytes(bytes(blob))
    (out / "shard-000002.1.idx.json").unlink()
    m2 = build_dataset([str(src)], tok, out, cfg, progress=False)
    assert (
        m2["shards"] == m1["shards"]
        and {p.name: p.read_bytes() for p in out.glob("shard-*")} == ref
    )
    ShardSet(out, verify=True).verify()


def test_shards_of_the_earlier_key_rule_read_and_rewritten(tmp_path, tok, texts):
    """A shard set written by an earlier version (lossy keys, stats format 1) stays readable, and a
    re-run rewrites it under the new rule instead of mixing the two."""
    recs = [{"id": i, "text": t} for i, t in zip(["a/b", "b:c", "plain-1"], texts)]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    out = tmp_path / "out"
    cfg = ShardConfig(min_tokens=0)
    ref = build_dataset([str(src)], tok, out, cfg, progress=False)
    # what the earlier version left: keys a_b, b_c (the old sanitising), stats format 1
    from kdcl_dist.data.shards import write_shard

    old = [s._replace(key=re.sub(r"[^A-Za-z0-9_\-]", "_", s.meta["id"])) for s in ShardSet(out)]
    entry = write_shard(out / "shard-000000.tar", old, dtype=old[0].ids.dtype)
    st = json.loads((out / "shard-000000.stats.json").read_text())
    st = {
        **{k: v for k, v in st.items() if k not in ("entries", "index_sha256")},
        "format": 1,
        "entry": {**entry, "tokens": ref["shards"][0]["tokens"]},
    }
    (out / "shard-000000.stats.json").write_text(json.dumps(st))
    m = manifest(out)
    m["shards"] = [st["entry"]]
    (out / "dataset.json").write_text(json.dumps(m))
    assert ShardSet(out).keys(0) == ["a_b", "b_c", "plain-1"] and read_ids(out) == [
        "a/b",
        "b:c",
        "plain-1",
    ]
    again = build_dataset([str(src)], tok, out, cfg, progress=False)
    assert again["shards"] == ref["shards"] and ShardSet(out).keys(0) == [
        "a%2Fb",
        "b%3Ac",
        "plain-1",
    ]


# ----------------------------------------------------------------------------- tokenizer fitness


@pytest.fixture(scope="module")
def no_mask_tok(tmp_path_factory, tok_dir):
    import shutil

    d = tmp_path_factory.mktemp("nomask") / "tok"
    shutil.copytree(tok_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["mask_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _no_mask_message(path) -> str:
    return (
        f"{path}: tokenizer has no mask token; masked-LM distillation masks tokens with [MASK] and pads "
        "batches with [PAD]: use a BERT-style tokenizer (e.g. one from `kdcl-dist tokenizer`) or add the "
        "token (tok.add_special_tokens({'mask_token': '[MASK]'}); tok.save_pretrained(DIR)) and pass that "
        "directory"
    )


def test_tokenizer_without_mask_token_refused_by_shard(tmp_path, no_mask_tok, texts):
    src = write_jsonl(
        tmp_path / "c.jsonl", ({"id": f"d{i}", "text": t} for i, t in enumerate(texts[:5]))
    )
    out = tmp_path / "out"
    p = run_cli(
        "shard",
        "--input",
        src,
        "--tokenizer",
        no_mask_tok,
        "--out",
        out,
        "--no-progress",
        check=False,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 2
    assert error_line(p.stderr) == f"kdcl-dist shard: error: {_no_mask_message(no_mask_tok)}"
    assert not out.exists()


def test_tokenizer_without_mask_token_refused_by_init_models(tmp_path, no_mask_tok, capsys):
    out = tmp_path / "models"
    assert (
        main(
            ["init-models", "--preset", "tiny", "--tokenizer", str(no_mask_tok), "--out", str(out)]
        )
        == 2
    )
    assert (
        error_line(capsys.readouterr().err, "init-models")
        == f"kdcl-dist init-models: error: {_no_mask_message(no_mask_tok)}"
    )
    assert not out.exists()


def test_tokenizer_vocab_size_shortfall_warns_or_refuses(tmp_path, texts, capsys, caplog):
    src = write_jsonl(
        tmp_path / "c.jsonl", ({"id": f"d{i}", "text": t} for i, t in enumerate(texts[:40]))
    )
    out = tmp_path / "tok"
    assert main(["tokenizer", "--input", str(src), "--out", str(out), "--vocab-size", "50000"]) == 0
    from kdcl_dist.data.tokenizer import load_tokenizer

    n = len(load_tokenizer(str(out)))
    assert n < 50000
    rec = json.loads((out / "kdcl_tokenizer.json").read_text())
    assert (
        rec["vocab_size"] == n and rec["requested_vocab_size"] == 50000 and rec["documents"] == 40
    )
    assert (
        f"{out}: WordPiece tokenizer, {n} tokens (50000 requested), trained on 40 documents"
        in capsys.readouterr().out
    )
    assert (
        f"{src}: the corpus yields only {n} tokens, fewer than --vocab-size 50000 (40 documents; WordPiece "
        f"keeps pieces seen at least twice); train on more text or lower --vocab-size; the tokenizer has {n} "
        "tokens"
    ) in caplog.text
    strict = tmp_path / "strict"
    assert (
        main(
            [
                "tokenizer",
                "--input",
                str(src),
                "--out",
                str(strict),
                "--vocab-size",
                "50000",
                "--strict-vocab-size",
            ]
        )
        == 2
    )
    # a second training may yield a piece more or less: HF's WordPiece trainer breaks ties in
    # hash order (huggingface/tokenizers#1794)
    err = error_line(capsys.readouterr().err, "tokenizer")
    n = int(re.search(r"yields only (\d+) tokens", err).group(1))
    assert err == (
        f"kdcl-dist tokenizer: error: {src}: the corpus yields only {n} tokens, fewer than --vocab-size 50000 "
        "(40 documents; WordPiece keeps pieces seen at least twice); train on more text or lower --vocab-size "
        "(without --strict-vocab-size this is a warning)"
    )
    assert not strict.exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.fixture(scope="module")
def no_mask_model(tmp_path_factory, tiny_assets):
    """The tiny student with its tokenizer's mask token removed (weights unchanged)."""
    import shutil

    d = tmp_path_factory.mktemp("nomask-model") / "student"
    shutil.copytree(tiny_assets["student"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["mask_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _models_must_not_load(monkeypatch):
    """Loading a model fails loudly: the refusal must come first."""
    from kdcl_dist.curriculum import scoring
    from kdcl_dist.kd import models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the tokenizer was checked")

    monkeypatch.setattr(scoring, "load_scoring_model", boom)
    monkeypatch.setattr(models, "load_mlm", boom)


@pytest.mark.parametrize("cmd", ["score", "eval mlm", "train"])
def test_tokenizer_without_mask_token_refused_before_any_model(
    cmd, tmp_path, tiny_assets, no_mask_model, capsys, monkeypatch
):
    from _curriculum_fixture import build_curriculum

    _models_must_not_load(monkeypatch)
    out = tmp_path / "out"
    argv = {
        "score": ["score", "--shards", tiny_assets["shards"], "--model", no_mask_model],
        "eval mlm": ["eval", "mlm", "--shards", tiny_assets["shards"], "--model", no_mask_model],
        "train": [
            "train",
            "--curriculum",
            build_curriculum(tiny_assets["shards"], tmp_path / "cur") and tmp_path / "cur",
            "--student",
            no_mask_model,
            "--steps",
            "1",
            "--global-batch",
            "4",
            "--micro-batch",
            "4",
            "--reliance",
            "none",
        ],
    }[cmd]
    if cmd == "eval mlm":
        out = tmp_path / "mlm.json"
    assert main([str(a) for a in [*argv, "--out", out]]) == 2
    name = cmd.split()[0]
    assert error_line(capsys.readouterr().err, name) == (
        f"kdcl-dist {name}: error: {_no_mask_message(no_mask_model)}"
    )
    # at most the resolved config that every command records first; no scores, no weights
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"config.yaml"}
