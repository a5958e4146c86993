"""Shards in object storage (issue 15, item 3): every stage against an S3 server on 127.0.0.1.

One moto server (a real process, `moto[server]` from the test extra) per module, behind a
fault-injecting proxy (tests/_s3_server.py). The CLI runs in real processes that find the
server the way s3fs users configure it: AWS_ENDPOINT_URL and dummy AWS_* credentials.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _s3_server import S3Server  # noqa: E402
from conftest import corpus_docs, run_cli  # noqa: E402

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "kdcl"


@pytest.fixture(scope="module")
def s3():
    srv = S3Server()
    srv.fs().mkdir(BUCKET)
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _no_faults(s3):
    s3.proxy.clear()
    yield
    s3.proxy.clear()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3):
    """A 240-document jsonl corpus, locally and at s3://kdcl/in/corpus.jsonl."""
    d = tmp_path_factory.mktemp("corpus")
    path = d / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in corpus_docs(240):
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    s3.fs().put_file(str(path), f"{BUCKET}/in/corpus.jsonl")
    return path


def _env(tmp_path, **extra) -> dict:
    stage = tmp_path / "staging"
    stage.mkdir(exist_ok=True)
    return {"KDCL_STAGING_DIR": str(stage), **extra}


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = [ln for ln in p.stderr.strip().splitlines() if "error:" in ln]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _shard(inp, out, tok, env, check=True):
    return run_cli(
        "shard",
        "--input",
        inp,
        "--tokenizer",
        tok,
        "--out",
        out,
        "--shard-size",
        80,
        "--max-length",
        64,
        "--no-progress",
        env=env,
        check=check,
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_s3_round_trip_equals_local(s3, corpus, tiny_assets, tmp_path):
    """shard -> score -> curriculum -> train (2 steps) and eval mlm, once on local paths and once
    on s3:// URLs: shard bytes, scores, curriculum order and trained weights are identical."""
    from _curriculum_fixture import train_cmd, train_env

    tok, student = tiny_assets["tokenizer"], tiny_assets["student"]
    env = _env(tmp_path)
    loc, url = tmp_path / "local", f"s3://{BUCKET}/run"
    # shard
    _shard(corpus, loc / "shards", tok, env)
    _shard(f"s3://{BUCKET}/in/corpus.jsonl", f"{url}/shards", tok, env)
    fs = s3.fs()
    local_man = json.loads((loc / "shards" / "dataset.json").read_text())
    remote_man = json.loads(fs.cat_file(f"{BUCKET}/run/shards/dataset.json"))
    assert remote_man["shards"] == local_man["shards"] and len(local_man["shards"]) == 3
    for e in local_man["shards"]:
        for name in (e["name"], e["index"]):
            assert (
                fs.cat_file(f"{BUCKET}/run/shards/{name}") == (loc / "shards" / name).read_bytes()
            )
    # the manifest names the URL (no staging path, no credentials)
    assert remote_man["inputs"][0]["path"] == f"s3://{BUCKET}/in/corpus.jsonl"
    assert "testing-secret" not in json.dumps(remote_man)
    assert not any(Path(env["KDCL_STAGING_DIR"]).iterdir())  # staging removed
    # score
    sflags = ["--model", student, "--masks", 2]
    run_cli("score", "--shards", loc / "shards", "--out", loc / "scores", *sflags, env=env)
    run_cli("score", "--shards", f"{url}/shards", "--out", f"{url}/scores", *sflags, env=env)
    ls = json.loads((loc / "scores" / "scores.json").read_text())
    rs = json.loads(fs.cat_file(f"{BUCKET}/run/scores/scores.json"))
    assert [s["file"] for s in rs["shards"]] == [s["file"] for s in ls["shards"]]
    assert rs["fingerprint"] == ls["fingerprint"] and len(ls["shards"]) == 3
    for s in ls["shards"]:
        a = np.load(loc / "scores" / s["file"], allow_pickle=False)
        b = np.load(io.BytesIO(fs.cat_file(f"{BUCKET}/run/scores/{s['file']}")), allow_pickle=False)
        for k in ("ids", "score", "masked", "tokens"):  # the scores themselves, bit for bit
            assert np.array_equal(a[k], b[k]), k
    # curriculum (reads the shards and the scores from the bucket, writes to it)
    cflags = ["--shard-size", 64]
    run_cli(
        "curriculum",
        "--shards",
        loc / "shards",
        "--scores",
        loc / "scores",
        "--out",
        loc / "cur",
        *cflags,
        env=env,
    )
    run_cli(
        "curriculum",
        "--shards",
        f"{url}/shards",
        "--scores",
        f"{url}/scores",
        "--out",
        f"{url}/cur",
        *cflags,
        env=env,
    )
    lc = json.loads((loc / "cur" / "curriculum.json").read_text())
    rc = json.loads(fs.cat_file(f"{BUCKET}/run/cur/curriculum.json"))
    assert [(e["name"], e["sha256"]) for e in lc["shards"]] == [
        (e["name"], e["sha256"]) for e in rc["shards"]
    ]
    assert (
        fs.cat_file(f"{BUCKET}/run/cur/order_scores.npy")
        == (loc / "cur" / "order_scores.npy").read_bytes()
    )
    # train two steps, one reading the local curriculum, one the bucket's (ranged reads)
    import subprocess

    flags = ["--steps", 2, "--global-batch", 8, "--micro-batch", 4]
    flags += ["--ds-config", "ds_configs/cpu_fp32.json", "--teacher", tiny_assets["teacher"]]
    weights = {}
    for name, cur in (("local", loc / "cur"), ("s3", f"{url}/cur")):
        out = tmp_path / f"train-{name}"
        p = subprocess.run(
            train_cmd(1, cur, tiny_assets, out, *flags, overrides=["warmup_steps=1"]),
            cwd=Path(__file__).resolve().parents[1],
            env={**train_env(), **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-4000:]
        import torch

        (state,) = (out / "checkpoints").glob("global_step2/mp_rank_00_model_states.pt")
        weights[name] = torch.load(state, map_location="cpu", weights_only=False)["module"]
    assert weights["local"].keys() == weights["s3"].keys()
    for k, v in weights["local"].items():
        assert torch.equal(v, weights["s3"][k]), k
    # eval mlm reads the bucket's shards the same way
    ev = []
    for shards in (loc / "shards", f"{url}/shards"):
        p = run_cli(
            "eval",
            "mlm",
            "--model",
            student,
            "--shards",
            shards,
            "--split",
            "all",
            "--max-samples",
            40,
            "--out",
            tmp_path / f"mlm-{len(ev)}.json",
            env=env,
        )
        ev.append(json.loads((tmp_path / f"mlm-{len(ev)}.json").read_text()))
    assert ev[0]["loss"] == ev[1]["loss"] and ev[1]["shards"] == f"{url}/shards"


def test_transient_500_is_retried(s3, corpus, tiny_assets, tmp_path, caplog):
    """HTTP 500 then 200: uploads (shard --out) and ranged reads (ShardSet) succeed, same bytes."""
    from kdcl_dist.data.reader import ShardSet

    env = _env(tmp_path)
    _shard(corpus, tmp_path / "ref", tiny_assets["tokenizer"], env)
    # every upload of a shard tar fails twice first (s3fs/botocore retries, then ours)
    s3.proxy.fail("PUT", f"/{BUCKET}/flaky/shard-000001.tar", 500, times=2)
    _shard(corpus, f"s3://{BUCKET}/flaky", tiny_assets["tokenizer"], env)
    assert [h[2] for h in s3.proxy.hits] == [500, 500]
    fs = s3.fs()
    for name in ("shard-000000.tar", "shard-000001.tar", "dataset.json"):
        assert fs.cat_file(f"{BUCKET}/flaky/{name}") == (tmp_path / "ref" / name).read_bytes()
    # a re-run to the same URL starts from the small files there and uploads the same shards
    first = json.loads(fs.cat_file(f"{BUCKET}/flaky/dataset.json"))
    _shard(corpus, f"s3://{BUCKET}/flaky", tiny_assets["tokenizer"], env)
    assert json.loads(fs.cat_file(f"{BUCKET}/flaky/dataset.json"))["shards"] == first["shards"]
    # reads: botocore's own retries off (AWS_MAX_ATTEMPTS=1), so kdcl's backoff does the work
    import os

    import s3fs

    os.environ["AWS_MAX_ATTEMPTS"] = "1"
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance keeps botocore's old config
    try:
        ss = ShardSet(f"s3://{BUCKET}/flaky", verify=True)
        ref = ShardSet(tmp_path / "ref")
        s3.proxy.clear()
        s3.proxy.fail("GET", f"/{BUCKET}/flaky/shard-000002.tar", 500, times=2)
        with caplog.at_level(logging.WARNING, logger="kdcl_dist"):
            got = ss.get(170)
        want = ref.get(170)
        assert got.key == want.key and np.array_equal(got.ids, want.ids) and got.meta == want.meta
        assert len(s3.proxy.hits) == 2
        assert "transient" in caplog.text and "retry 2/4" in caplog.text
    finally:
        os.environ.pop("AWS_MAX_ATTEMPTS")
        s3fs.S3FileSystem.clear_instance_cache()


def test_403_is_one_line_and_writes_nothing(s3, corpus, tiny_assets, tmp_path):
    env = _env(tmp_path)
    fs = s3.fs()
    # writing: every request under the prefix is denied
    s3.proxy.fail("*", f"/{BUCKET}/denied", 403, times=None)
    p = _shard(corpus, f"s3://{BUCKET}/denied/shards", tiny_assets["tokenizer"], env, check=False)
    _one_line_error(p, f"s3://{BUCKET}/denied/shards", "access denied")
    s3.proxy.clear()
    assert not fs.exists(f"{BUCKET}/denied")
    # reading the input: denied before any output exists
    s3.proxy.fail("*", f"/{BUCKET}/in/corpus.jsonl", 403, times=None)
    out = tmp_path / "out"
    p = _shard(f"s3://{BUCKET}/in/corpus.jsonl", out, tiny_assets["tokenizer"], env, check=False)
    _one_line_error(p, f"s3://{BUCKET}/in/corpus.jsonl", "access denied")
    assert not out.exists() or not any(out.iterdir())
    assert not any(Path(env["KDCL_STAGING_DIR"]).iterdir())


def test_missing_bucket_is_one_line(s3, corpus, tiny_assets, tmp_path):
    env = _env(tmp_path)
    p = _shard(corpus, "s3://no-such-bucket/shards", tiny_assets["tokenizer"], env, check=False)
    _one_line_error(p, "s3://no-such-bucket/shards", "not found", "bucket")
    p = run_cli(
        "score",
        "--shards",
        "s3://no-such-bucket/shards",
        "--model",
        tiny_assets["student"],
        "--out",
        tmp_path / "scores",
        env=env,
        check=False,
    )
    _one_line_error(p, "s3://no-such-bucket/shards", "not found")
    assert not (tmp_path / "scores").exists() or not any((tmp_path / "scores").iterdir())


def test_scheme_without_backend_names_the_package(tiny_assets, tmp_path):
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    p = run_cli(
        "shard",
        "--input",
        "gs://bucket/corpus.jsonl",
        "--tokenizer",
        tiny_assets["tokenizer"],
        "--out",
        tmp_path / "out",
        check=False,
    )
    _one_line_error(
        p, "gs://bucket/corpus.jsonl", "gs:// needs gcsfs: pip install 'kdcl-dist[gcs]'"
    )
    assert not (tmp_path / "out").exists()


def test_https_reader_retries_and_redacts(tmp_path, tiny_assets, caplog):
    """ShardSet over plain https-style HTTP (fsspec's HTTP filesystem, no retries of its own):
    a 503 is retried by kdcl; URLs in messages lose user info and query strings."""
    import functools
    import http.server
    import threading

    from _s3_server import free_port  # noqa: F401

    from kdcl_dist import storage
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.errors import UserError

    src = tiny_assets["shards"]
    fails = {"n": 2}

    class H(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if "shard-000001.tar" in self.path and fails["n"] > 0:
                fails["n"] -= 1
                self.send_error(503)
                return
            rng = self.headers.get("Range")
            if not rng:
                return super().do_GET()
            # ranged reads as object stores serve them (http.server ignores Range)
            data = (src / self.path.lstrip("/")).read_bytes()
            lo, _, hi = rng.removeprefix("bytes=").partition("-")
            part = data[int(lo) : int(hi) + 1 if hi else len(data)]
            self.send_response(206)
            self.send_header("Content-Length", str(len(part)))
            self.send_header("Content-Range", f"bytes {lo}-{int(lo) + len(part) - 1}/{len(data)}")
            self.end_headers()
            self.wfile.write(part)

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(H, directory=str(src))
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        ss, ref = ShardSet(base, "dataset.json"), ShardSet(src)
        with caplog.at_level(logging.WARNING, logger="kdcl_dist"):
            got = ss.get(150)
        want = ref.get(150)
        assert got.key == want.key and np.array_equal(got.ids, want.ids)
        assert fails["n"] == 0 and "retry 2/4" in caplog.text
    finally:
        srv.shutdown()
    assert storage.redact("https://user:pw@host/a/b?X-Amz-Signature=s") == "https://host/a/b"
    with pytest.raises(UserError, match=r"^https://host/a: the URL holds user info"):
        ShardSet("https://user:pw@host/a")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_shard_to_s3(s3, corpus, tiny_assets, tmp_path):
    """Two torchrun ranks, input and output in the bucket, a shared KDCL_STAGING_DIR: the same
    bytes as one local rank; without a shared staging directory, one line naming the fix."""
    import os
    import subprocess

    from _curriculum_fixture import free_port

    tok = tiny_assets["tokenizer"]
    env = {**os.environ, **_env(tmp_path)}
    _shard(corpus, tmp_path / "ref", tok, env)

    def torchrun(out, env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(free_port()), "-m", "kdcl_dist", "shard"]
        cmd += ["--input", f"s3://{BUCKET}/in/corpus.jsonl", "--tokenizer", str(tok)]
        cmd += ["--out", out, "--shard-size", "80", "--max-length", "64", "--no-progress"]
        return subprocess.run(
            cmd,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    p = torchrun(f"s3://{BUCKET}/two", env)
    assert p.returncode == 0, p.stderr[-3000:]
    fs = s3.fs()
    ref = json.loads((tmp_path / "ref" / "dataset.json").read_text())
    assert json.loads(fs.cat_file(f"{BUCKET}/two/dataset.json"))["shards"] == ref["shards"]
    for e in ref["shards"]:
        assert (
            fs.cat_file(f"{BUCKET}/two/{e['name']}") == (tmp_path / "ref" / e["name"]).read_bytes()
        )
    assert not any(Path(env["KDCL_STAGING_DIR"]).iterdir())
    env.pop("KDCL_STAGING_DIR")
    p = torchrun(f"s3://{BUCKET}/two-unshared", env)
    assert (
        p.returncode != 0
        and "set KDCL_STAGING_DIR to a directory on a shared file system" in p.stderr
    )
    assert not fs.exists(f"{BUCKET}/two-unshared/dataset.json")


def test_url_inputs_with_one_name_refused():
    """Staged copies are known by their names: two URL inputs ending in one name are refused
    (before any download) rather than recording a temporary path as the samples' source."""
    from kdcl_dist import storage
    from kdcl_dist.errors import UserError

    with pytest.raises(UserError, match=r"several URLs end in the same name \(c.jsonl\)"):
        storage.fetch_inputs(["s3://kdcl/a/c.jsonl", "s3://kdcl/b/c.jsonl?x=1"])
