"""Shard stage faults: SIGKILL of one rank, ENOSPC, truncated/corrupt tar, index and manifest,
and the security checks on reading tars (members never extracted to disk by name)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from .conftest import (
    assert_finished_equal,
    cut_file,
    fork_out_of_space,
    fork_refused,
    fork_run,
    ids_multiset,
    json_pair,
    must,
    rerun_with_space,
    score_argv,
    shard_argv,
    shard_entries,
    sigkill_one_rank,
    small_fs,
)

pytestmark = pytest.mark.faults


def _same_as_ref(out: Path, ref) -> None:
    assert shard_entries(out / "dataset.json") == shard_entries(ref["shards"] / "dataset.json")
    a, b = json_pair("dataset.json", out, ref["shards"])
    assert a["fingerprint"] == b["fingerprint"] and a["totals"] == b["totals"]
    assert ids_multiset(out) == ids_multiset(ref["shards"])
    assert not list(out.glob(".tmp-*")), "temporary files left behind"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_shard_sigkill_one_rank_then_rerun(base, ref, tmp_path, seed):
    out = tmp_path / "shards"
    _, n = sigkill_one_rank(shard_argv(base, out), ref["shard_run"], seed, tmp_path / "k")
    # what survived the kill is either absent or complete: every finished shard equals the reference
    assert_finished_equal(
        out,
        ref["shards"],
        "shard-*.stats.json",
        rename=(".stats.json", ".tar"),
        what=f" after a kill at event {n}",
    )
    # a kill between a tar's rename and its stats file leaves an orphan tar: the re-run rewrites it
    must(fork_run(shard_argv(base, out), world=2, logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)
    assert not (out / ".shard-run.json").exists()


@pytest.mark.parametrize("evidence", ["stats", "marker"])
def test_shard_orphan_tar_rerun(base, ref, tmp_path, evidence):
    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    # the state a kill leaves right after shard 3's tar (and index) were renamed into place
    (out / "dataset.json").unlink()
    for j in (3, 4, 5):
        (out / f"shard-00000{j}.stats.json").unlink()
    for j in (4, 5):
        (out / f"shard-00000{j}.tar").unlink()
        (out / f"shard-00000{j}.idx.json").unlink()
    if evidence == "marker":  # killed at the first shard: no stats at all, only the run's marker
        for j in (0, 1, 2):
            (out / f"shard-00000{j}.stats.json").unlink()
        tinfo = json.loads((ref["shards"] / "dataset.json").read_text())["tokenizer"]
        (out / ".shard-run.json").write_text(
            json.dumps({"tokenizer_fingerprint": tinfo["fingerprint"]})
        )
    # the orphan is a half-finished tar in the worst case: same name, wrong bytes
    (out / "shard-000003.tar").write_bytes(
        (out / "shard-000003.tar").read_bytes()[:-1024] + bytes(1024)
    )
    must(fork_run(shard_argv(base, out), logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)
    for j in range(6):
        name = f"shard-00000{j}.tar"
        assert (out / name).read_bytes() == (ref["shards"] / name).read_bytes(), name


def test_shard_orphan_tar_of_another_tokenizer_refused(base, ref, tmp_path):
    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    (out / "dataset.json").unlink()
    for st in out.glob("shard-*.stats.json"):
        st.unlink()
    (out / ".shard-run.json").write_text(json.dumps({"tokenizer_fingerprint": "0123456789abcdef"}))
    fork_refused(
        shard_argv(base, out), tmp_path / "r", "shard-000000.tar", "0123456789abcdef", "--overwrite"
    )
    assert (out / "shard-000000.tar").read_bytes() == (
        ref["shards"] / "shard-000000.tar"
    ).read_bytes()


def test_shard_enospc_then_rerun(base, ref, tmp_path):
    out = tmp_path / "fs"
    total = sum(p.stat().st_size for p in ref["shards"].iterdir())
    with small_fs(out, str(max(8192, total // 3))) as remount:
        # not root: the 3rd atomic rename fails instead
        fork_out_of_space(shard_argv(base, out), remount, tmp_path / "k", enospc_at=3)
        assert not (out / "dataset.json").exists()
        # finished shards are whole
        assert_finished_equal(
            out, ref["shards"], "shard-*.stats.json", rename=(".stats.json", ".tar")
        )
        rerun_with_space(shard_argv(base, out), remount, tmp_path / "r")
        _same_as_ref(out, ref)


def test_shard_enospc_one_line_error(base, tmp_path):
    fork_refused(
        shard_argv(base, tmp_path / "s"), tmp_path / "k", "No space left on device", enospc_at=3
    )


def test_shard_truncated_tar_is_rebuilt(base, ref, tmp_path):
    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    tar = out / "shard-000002.tar"
    cut_file(tar, tar.stat().st_size // 2)
    # reading it is refused with one line naming the file ...
    fork_refused(score_argv(base, out, tmp_path / "scores"), tmp_path / "s", "shard-000002.tar")
    # ... and a re-run of the shard stage rebuilds exactly that shard
    must(fork_run(shard_argv(base, out), logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)


def _flip_bit(out: Path) -> None:
    """Corrupt shard 1 in place (same size): one bit of the last token id of sample 3."""
    tar = out / "shard-000001.tar"
    idx = json.loads((out / "shard-000001.idx.json").read_text())
    blob = bytearray(tar.read_bytes())
    off = int(idx["ids_offset"][3]) + int(idx["ids_size"][3]) - 2
    blob[off] ^= 0x01
    tar.write_bytes(bytes(blob))


def test_shard_bitflip_detected_by_readers_and_rewritten(base, ref, tmp_path):
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.errors import UserError

    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    _flip_bit(out)
    msg = r"shard-000001\.tar: sha256 \w+\.\.\. differs from .* dataset\.json; the shard is corrupt, re-run `kdcl-dist shard`"
    ss = ShardSet(out, verify=True)
    first = ss.shard_range(1)[0]
    ss.get(0)  # intact shards read fine
    with pytest.raises(UserError, match=msg):
        ss.get(first + 5)  # random access into the corrupt shard
    with pytest.raises(UserError, match=msg):
        next(iter(ShardSet(out, verify=True).iter_shard(1)))
    with pytest.raises(UserError, match=msg):
        ShardSet(out).shard_bytes(1, verify=True)
    with pytest.raises(UserError, match=msg):
        ShardSet(out).verify()
    ShardSet(out).verify([0, 2, 3, 4, 5])
    assert (
        ShardSet(out).get(first + 3).ids.tolist()
        != ShardSet(ref["shards"]).get(first + 3).ids.tolist()
    )
    # the message's fix works: a re-run rewrites exactly the corrupt shard
    keep = {
        p.name: p.stat().st_mtime_ns
        for p in out.glob("shard-*.tar")
        if p.name != "shard-000001.tar"
    }
    must(fork_run(shard_argv(base, out), logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)
    ShardSet(out, verify=True).verify()
    assert {
        p.name: p.stat().st_mtime_ns
        for p in out.glob("shard-*.tar")
        if p.name != "shard-000001.tar"
    } == keep


def test_shard_corrupt_index_same_size_rewritten(base, ref, tmp_path):
    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    p = out / "shard-000002.idx.json"
    idx = json.loads(p.read_text())
    o = idx["ids_offset"]
    o[1], o[2] = o[2], o[1]  # still valid JSON with the right count: only a checksum sees it
    p.write_text(json.dumps(idx, indent=2) + "\n")
    assert p.read_bytes() != (ref["shards"] / p.name).read_bytes()
    must(fork_run(shard_argv(base, out), logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)
    assert p.read_bytes() == (ref["shards"] / p.name).read_bytes()


def test_shard_bitflip_detected(base, ref, tmp_path):
    """Scoring checks each shard's sha256 (ShardSet.verify_shard) before using it."""
    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    _flip_bit(out)
    fork_refused(score_argv(base, out, tmp_path / "scores"), tmp_path / "s", "shard-000001.tar")


def test_shard_corrupt_offset_index(base, ref, tmp_path):
    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    (out / "shard-000001.idx.json").write_text('{"keys": ["a", ')
    line = fork_refused(
        score_argv(base, out, tmp_path / "scores"),
        tmp_path / "s",
        "shard-000001.idx.json",
        "corrupt",
    )
    assert "re-run" in line
    # following the message (delete it, re-run the shard stage) restores the reference
    (out / "shard-000001.idx.json").unlink()
    must(fork_run(shard_argv(base, out), logdir=tmp_path / "r"), "re-run")
    _same_as_ref(out, ref)


def test_shard_index_count_mismatch(base, ref, tmp_path):
    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    p = out / "shard-000003.idx.json"
    idx = json.loads(p.read_text())
    idx["count"] -= 1
    p.write_text(json.dumps(idx))
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.errors import UserError

    with pytest.raises(UserError, match="shard-000003.idx.json: offset index holds"):
        ShardSet(out).get(3 * 40)


def test_shard_corrupt_manifest(base, ref, tmp_path):
    out = shutil.copytree(ref["shards"], tmp_path / "shards")
    cut_file(out / "dataset.json", 200)
    fork_refused(
        score_argv(base, out, tmp_path / "scores"), tmp_path / "s", "dataset.json", "corrupt"
    )
    # the shard stage refuses to guess where the shards came from ...
    fork_refused(shard_argv(base, out), tmp_path / "r", "--overwrite")
    # ... and with --overwrite rebuilds the reference exactly
    must(fork_run([*shard_argv(base, out), "--overwrite"], logdir=tmp_path / "o"), "overwrite")
    _same_as_ref(out, ref)


def _evil_shard(d: Path) -> None:
    """A shard whose member names climb out of the directory (`../../evil.*`)."""
    from kdcl_dist.data.shards import npy_bytes

    d.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (
            ("../../evil.ids.npy", npy_bytes(np.array([2, 5, 6, 3], dtype=np.uint16))),
            ("../../evil.json", json.dumps({"id": "evil", "n_tokens": 4}).encode()),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (d / "shard-000000.tar").write_bytes(buf.getvalue())


def test_tar_members_never_extracted(tmp_path, monkeypatch):
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.shards import build_index
    from kdcl_dist.errors import UserError

    work = tmp_path / "a" / "b" / "c"
    d = work / "evil"
    _evil_shard(d)
    idx = build_index(d / "shard-000000.tar")
    (d / "shard-000000.idx.json").write_text(json.dumps({**idx, "count": 1}))
    (d / "dataset.json").write_text(
        json.dumps(
            {
                "shards": [
                    {
                        "name": "shard-000000.tar",
                        "index": "shard-000000.idx.json",
                        "count": 1,
                        "bytes": 0,
                        "sha256": "",
                    }
                ]
            }
        )
    )
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(d)
    ss = ShardSet(d)
    try:
        got = [s for s in ss]
        assert [list(s.ids) for s in got] == [[2, 5, 6, 3]]
        assert list(ss.get(0).ids) == [2, 5, 6, 3]
    except UserError:
        pass  # refusing the names is fine too; writing them is not
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "a" / "evil.ids.npy").exists()
    # no code path extracts tar members to disk
    src = Path(__file__).resolve().parents[2] / "kdcl_dist"
    offenders = [
        str(p)
        for p in src.rglob("*.py")
        if ".extractall(" in p.read_text() or "tf.extract(" in p.read_text()
    ]
    assert offenders == []


def test_trust_remote_code_off_by_default():
    import inspect
    import re

    from kdcl_dist import export
    from kdcl_dist.kd import models

    assert inspect.signature(models.load_mlm).parameters["trust_remote_code"].default is False
    assert inspect.signature(export.build_student).parameters["trust_remote_code"].default is False
    src = Path(__file__).resolve().parents[2] / "kdcl_dist"
    bad = []
    for p in src.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"trust_remote_code\s*=\s*True", line):
                bad.append(f"{p}:{i}")
            if "from_pretrained(" in line and "trust_remote_code" not in line and "Auto" in line:
                # an Auto* loader without the flag defaults to False in transformers; record only
                pass
    assert bad == []
    os.environ.pop("KDCL_TRUST_REMOTE_CODE", None)
