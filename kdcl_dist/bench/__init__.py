"""Benchmarks behind `kdcl-dist bench ...`; shared corpus reader below."""

from __future__ import annotations

import json
from pathlib import Path


def pubmed_or_synthetic(limit: int | None, synthetic_n: int) -> tuple[list, Path | None]:
    """(documents as (id, "title text"), the abstracts file read, or None when synthetic).

    Reads $KDCL_DATA_DIR/pubmed/abstracts.jsonl, stopping once `limit` documents are read
    (None: all; the check follows each line, so a limit below 1 still reads one). Without that
    file it returns `synthetic_n` synthetic documents. Callers label the corpus themselves, so
    their printed source lines are unchanged.
    """
    from kdcl_dist.utils import data_dir

    d = data_dir()
    path = d / "pubmed" / "abstracts.jsonl" if d else None
    if path is not None and path.exists():
        out = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                out.append((r["id"], (r.get("title", "") + " " + r["text"]).strip()))
                if limit is not None and len(out) >= limit:
                    break
        return out, path
    from kdcl_dist.data.synthetic import synthetic_documents

    return list(synthetic_documents(synthetic_n)), None
