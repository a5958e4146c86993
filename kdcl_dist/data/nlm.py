"""PubMed/MEDLINE as NLM publishes it: file order, `.md5` checks, which files are citations.

NLM's baseline is a directory of `pubmedYYnNNNN.xml.gz` files (older years `medlineYYnNNNN`),
each with `pubmedYYnNNNN.xml.gz.md5` beside it (`MD5(pubmedYYnNNNN.xml.gz)= <hex>`), plus a
README; the yearly update files continue the numbering (`pubmed26n1275.xml.gz`, ...). NLM's
order is (YY, NNNN): a later file's version of a citation replaces an earlier one, and an
update file's `<DeleteCitation>` removes one (applied in `ingest_plan.make_plan`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from kdcl_dist.errors import UserError

# pubmed26n0001.xml.gz, medline16n0902.xml, pubmed26n1275.xml.gz (updates continue the numbers)
NLM_NAME = re.compile(r"^(?:pubmed|medline)(\d{2})n(\d{4,})\.xml(?:\.gz)?$", re.IGNORECASE)
_HEX32 = re.compile(rb"\b([0-9a-fA-F]{32})\b")


def nlm_key(name: str) -> tuple[int, int] | None:
    """(YY, NNNN) of an NLM citation file name, None for any other name."""
    m = NLM_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_xml_name(name: str) -> bool:
    n = name.lower()
    return n.endswith(".xml") or n.endswith(".xml.gz")


def nlm_order(paths: list[Path]) -> list[Path]:
    """`paths` with the NLM-named files put in NLM's order among the slots they occupy;
    every other file keeps its place (so mixed inputs keep the order they were given in)."""
    slots = [i for i, p in enumerate(paths) if nlm_key(p.name) is not None]
    ordered = sorted((paths[i] for i in slots), key=lambda p: (nlm_key(p.name), str(p)))
    out = list(paths)
    for i, p in zip(slots, ordered):
        out[i] = p
    return out


def md5_file_of(path: Path) -> Path | None:
    """The `.md5` file NLM publishes beside `path`, when present."""
    m = path.with_name(path.name + ".md5")
    return m if m.is_file() else None


def expected_md5(md5_path: Path) -> str:
    """The digest in an `.md5` file: NLM's `MD5(name)= hex` or md5sum's `hex  name`."""
    m = _HEX32.search(md5_path.read_bytes()[:4096])
    if m is None:
        raise UserError(
            f"{md5_path}: no MD5 digest found (expected `MD5(name)= <32 hex digits>`); "
            "re-download it or remove it"
        )
    return m.group(1).decode().lower()


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def md5_mismatch(path: Path, md5_path: Path) -> str | None:
    """None when `path` matches its `.md5`, else the one-line reason."""
    want = expected_md5(md5_path)
    got = file_md5(path)
    if got == want:
        return None
    return f"{path}: MD5 {got} differs from {want} in {md5_path.name}"
