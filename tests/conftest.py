"""Shared fixtures: locally trained tokenizer, tiny teacher/student, small shard sets.

Nothing is downloaded. Real data is read from $KDCL_DATA_DIR (default ../shared/data);
tests that need it are skipped cleanly when it is absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import kdcl_dist  # noqa: F401  (sets this environment's TORCH_EXTENSIONS_DIR before anything imports deepspeed)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_TEACHER = {
    "type": "bert",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 128,
}
TINY_STUDENT = {
    "type": "distilbert",
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 64,
}


def real_data_dir() -> Path | None:
    from kdcl_dist.utils import data_dir

    return data_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = real_data_dir()
    if d is None or not (d / "pubmed" / "abstracts.jsonl").exists():
        pytest.skip("real data not found: set KDCL_DATA_DIR (default ../shared/data)")
    return d


def corpus_docs(n: int = 400):
    """The first n real abstracts when available, else the synthetic corpus."""
    d = real_data_dir()
    if d is not None and (d / "pubmed" / "abstracts.jsonl").exists():
        docs = []
        with open(d / "pubmed" / "abstracts.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                docs.append((r["id"], (r.get("title", "") + " " + r["text"]).strip()))
                if len(docs) >= n:
                    break
        return docs
    from kdcl_dist.data.synthetic import synthetic_documents

    return list(synthetic_documents(n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A WordPiece tokenizer (vocabulary 800) trained on 300 documents, for the ingestion tests.

    Module scope: each test module trains its own, as when every module defined it.
    tests/test_ingest.py overrides it with a larger one (400 documents, vocabulary 1000).
    """
    from kdcl_dist.data.tokenizer import train_wordpiece

    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_wordpiece((t for _, t in corpus_docs(300)), d, vocab_size=800)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    """The `tok_dir` tokenizer, loaded."""
    from kdcl_dist.data.tokenizer import load_tokenizer

    return load_tokenizer(str(tok_dir))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """{'tokenizer', 'teacher', 'student', 'shards'} paths: a tokenizer, a tiny pair, 400 docs in 4 shards."""
    from kdcl_dist.data.shards import write_documents
    from kdcl_dist.data.tokenizer import train_wordpiece
    from kdcl_dist.kd.models import init_model_dir

    root = tmp_path_factory.mktemp("tiny")
    docs = corpus_docs(400)
    tok = train_wordpiece((t for _, t in docs), root / "tokenizer", vocab_size=1000)
    init_model_dir(TINY_TEACHER, tok, root / "teacher", seed=1, max_positions=256)
    init_model_dir(TINY_STUDENT, tok, root / "student", seed=2, max_positions=256)
    write_documents(docs, tok, root / "shards", max_length=128, shard_size=100)
    return {
        "root": root,
        "tokenizer": root / "tokenizer",
        "teacher": root / "teacher",
        "student": root / "student",
        "shards": root / "shards",
        "n_docs": len(docs),
    }


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, check: bool = True):
    """Run `python -m kdcl_dist ...` in a subprocess; return CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run(
        [sys.executable, "-m", "kdcl_dist", *map(str, args)],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"kdcl-dist {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
        )
    return p


# Launcher variables a test must not leave behind: `train.init_distributed` fills them for a
# single process, and a later `kdcl-dist` subprocess inheriting MASTER_PORT would rendezvous on
# a port this pytest process still holds (EADDRINUSE in every later test).
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_leaked_process_group(request):
    before = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    yield
    import torch.distributed as tdist

    leaked = [k for k in _LAUNCH_ENV if os.environ.get(k) != before[k]]
    group = tdist.is_available() and tdist.is_initialized()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if group:
        tdist.destroy_process_group()
    if leaked or group:
        pytest.fail(
            f"{request.node.nodeid} left {'a process group and ' if group else ''}"
            f"launcher variables {leaked} in the pytest process (undone now)",
            pytrace=False,
        )
