"""The acronym-facts tasks (`facts-N`) from V.E.R.A. (Debian `dict-vera`): acronym ->
expansion, trained with one template and validated on trained facts asked with another.

`read_acronyms` keeps the acronyms with a single expansion, stripped of topic tags and
cross-references; `acronym_facts` orders them by seed, so for one seed the sizes are nested
(the first 100 facts of facts-300 are facts-100's).
"""

from __future__ import annotations

import functools
import gzip
import random
import re
from pathlib import Path

from lorank.bench.tasks.source_text import Rows, _clean, _require, _words

# Where the Debian package puts its data (module-level so tests can point it elsewhere).
VERA_DIR = Path("/usr/share/dictd")


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

FACT_TRAIN_TEMPLATE = "Acronym: {acronym}\nExpansion:"
FACT_VAL_TEMPLATE = "What does {acronym} stand for?\nAnswer:"


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def read_acronyms() -> list[tuple[str, str]]:
    """(acronym, expansion) pairs from V.E.R.A., only acronyms with a single expansion.

    The dictd index gives each entry's byte range; the topic tags in parentheses and the
    alternative spelling in quotes are metadata, not part of the expansion, and are stripped
    (the quoted spelling, e.g. "OS/360", replaces the bare headword "OS360").
    """
    return list(_read_acronyms(VERA_DIR))


@functools.lru_cache(maxsize=2)
def _read_acronyms(vera_dir: Path) -> tuple[tuple[str, str], ...]:
    index, data = vera_dir / "vera.index", vera_dir / "vera.dict.dz"
    _require(index, "dict-vera")
    _require(data, "dict-vera")
    raw = gzip.decompress(data.read_bytes())
    entries: dict[str, list[str]] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")
        if head.startswith("00database"):
            continue
        start = _b64(off)
        entries.setdefault(head, []).append(
            raw[start : start + _b64(length)].decode("utf-8", "replace")
        )
    facts = []
    for head in sorted(entries):
        if len(entries[head]) != 1:
            continue
        lines = entries[head][0].strip().split("\n")
        acronym, body = lines[0].strip(), _clean(" ".join(lines[1:]))
        alt = re.search(r', "([^"]+)"$', body)
        if alt:
            body = body[: alt.start()]
            acronym = alt.group(1)
        body = re.sub(r"\s*\([^()]*\)$", "", body)  # trailing topic tags
        body = re.sub(r"\s*\[=[^\]]*\]", "", body)  # "[= Triple A]" cross-references
        body = _clean(body.replace("[", "").replace("]", ""))
        if not (body.isascii() and acronym.isascii()) or not 2 <= _words(body) <= 10:
            continue
        if len(acronym) > 12 or "(" in body or '"' in body:
            continue
        facts.append((acronym, body))
    return tuple(facts)


def acronym_facts(n: int, seed: int) -> list[tuple[str, str]]:
    """The first n facts of one seeded order, so sizes are nested for the same seed."""
    facts = read_acronyms()
    if n > len(facts):
        raise ValueError(f"asked for {n} acronym facts, only {len(facts)} are available")
    random.Random(f"acronym-facts:{seed}").shuffle(facts)
    return facts[:n]


def _fact_row(template: str, acronym: str, expansion: str) -> dict[str, str]:
    return {"prompt": template.format(acronym=acronym), "completion": " " + expansion}


def build_facts(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """Acronym -> expansion, trained with one template and validated with another.

    Validation asks the first n_val trained facts in the other template: on held-out facts the
    loss would measure only what generalizes, and rank barely moves it (DESIGN.md).
    """
    facts = acronym_facts(n_train, seed)
    train = [_fact_row(FACT_TRAIN_TEMPLATE, a, e) for a, e in facts]
    val = [_fact_row(FACT_VAL_TEMPLATE, a, e) for a, e in facts[:n_val]]
    meta = {
        "split": "validation = trained facts asked with another template",
        "train_template": FACT_TRAIN_TEMPLATE,
        "val_template": FACT_VAL_TEMPLATE,
        "pool": len(read_acronyms()),
    }
    return train, val, meta
