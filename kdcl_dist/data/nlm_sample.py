"""A small NLM-style download, built from MEDLINE citations: for tests and `bench ingest`.

`write_nlm_download(citations, out)` writes the layout a user gets from NLM's FTP site:

    out/README.txt
    out/pubmed26n0001.xml.gz  out/pubmed26n0001.xml.gz.md5   (baseline, MedlineCitationSet)
    ...
    out/pubmed26nNNNN.xml.gz  out/pubmed26nNNNN.xml.gz.md5   (one update file, PubmedArticleSet)

The update file holds new versions of some PMIDs (their title changed, or unchanged) and a
`<DeleteCitation>` naming other PMIDs plus one that no file holds. The md5 files use NLM's
`MD5(name)= hex` form. Citations come from a real baseline file (`citations_from`) or are
synthetic (`synthetic_citations`).
"""

from __future__ import annotations

import gzip
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

UNKNOWN_PMID = "99999999"


def citations_from(path: str | Path, limit: int | None = None) -> list[bytes]:
    """The `<MedlineCitation>` elements of a MEDLINE XML(.gz) file, serialised."""
    out: list[bytes] = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for _, el in ET.iterparse(f):
            if el.tag == "MedlineCitation":
                out.append(ET.tostring(el))
                el.clear()
                if limit is not None and len(out) >= limit:
                    break
    return out


def synthetic_citations(n: int, seed: int = 0, first_pmid: int = 1000) -> list[bytes]:
    """`n` citations with synthetic abstracts (every 7th without one, as MEDLINE has many)."""
    from xml.sax.saxutils import escape

    from kdcl_dist.data.synthetic import synthetic_documents

    out = []
    for i, (_, text) in enumerate(synthetic_documents(n, seed=seed)):
        pmid = first_pmid + i
        abstract = (
            ""
            if i % 7 == 6
            else f"<Abstract><AbstractText>{escape(text)}</AbstractText></Abstract>"
        )
        out.append(
            (
                f'<MedlineCitation Owner="NLM" Status="MEDLINE"><PMID Version="1">{pmid}</PMID>'
                f"<Article><ArticleTitle>Synthetic study {pmid}.</ArticleTitle>{abstract}"
                "</Article></MedlineCitation>"
            ).encode()
        )
    return out


def _pmid(c: bytes) -> str:
    return ET.fromstring(c).findtext("PMID").strip()


def _has_abstract(c: bytes) -> bool:
    el = ET.fromstring(c)
    return any("".join(a.itertext()).strip() for a in el.findall("Article/Abstract/AbstractText"))


def _retitled(c: bytes, suffix: str) -> bytes:
    el = ET.fromstring(c)
    t = el.find("Article/ArticleTitle")
    t.text = (t.text or "") + suffix
    for child in t:  # keep it one text node
        t.remove(child)
    return ET.tostring(el)


def _write_gz(path: Path, body: bytes) -> None:
    # mtime=0: the same bytes every time, so md5 and shards are reproducible
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(body)
    digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    path.with_name(path.name + ".md5").write_text(f"MD5({path.name})= {digest}\n")


@dataclass
class Download:
    dir: Path
    baseline: list[Path]
    update: Path | None
    replaced: list[str] = field(default_factory=list)  # PMIDs with a new title in the update
    same: list[str] = field(default_factory=list)  # PMIDs repeated unchanged in the update
    deleted: list[str] = field(default_factory=list)  # PMIDs the update deletes
    citations: int = 0  # every <MedlineCitation> written (baseline + update)


def write_nlm_download(
    citations: list[bytes],
    out: str | Path,
    files: int = 4,
    replace: int = 3,
    same: int = 1,
    delete: int = 2,
    year: int = 26,
) -> Download:
    """Split `citations` into `files` baseline files and write one update file (see module doc)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.txt").write_text(
        "PubMed baseline (test copy). Each pubmedYYnNNNN.xml.gz has an .md5 beside it.\n"
    )
    n = len(citations)
    cuts = [n * k // files for k in range(files + 1)]
    dl = Download(out, [], None)
    for k in range(files):
        name = out / f"pubmed{year}n{k + 1:04d}.xml.gz"
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<MedlineCitationSet>\n'
            + b"\n".join(citations[cuts[k] : cuts[k + 1]])
            + b"\n</MedlineCitationSet>\n"
        )
        _write_gz(name, body)
        dl.baseline.append(name)
    dl.citations = n
    with_abstract = [c for c in citations if _has_abstract(c)]
    # spread the picks over the files: from the first file, the middle and the end
    picks = with_abstract[:: max(1, len(with_abstract) // (replace + same + delete + 1))][1:]
    rep, rest = picks[:replace], picks[replace:]
    unchanged, rest = rest[:same], rest[same:]
    gone = rest[:delete]
    dl.replaced = [_pmid(c) for c in rep]
    dl.same = [_pmid(c) for c in unchanged]
    dl.deleted = [_pmid(c) for c in gone]
    articles = [b"<PubmedArticle>" + _retitled(c, " (revised)") + b"</PubmedArticle>" for c in rep]
    articles += [b"<PubmedArticle>" + c + b"</PubmedArticle>" for c in unchanged]
    deletes = "".join(f'<PMID Version="1">{p}</PMID>' for p in [*dl.deleted, UNKNOWN_PMID])
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<PubmedArticleSet>\n'
        + b"\n".join(articles)
        + f"\n<DeleteCitation>{deletes}</DeleteCitation>\n</PubmedArticleSet>\n".encode()
    )
    dl.update = out / f"pubmed{year}n{files + 1:04d}.xml.gz"
    _write_gz(dl.update, body)
    dl.citations += len(articles)
    return dl
