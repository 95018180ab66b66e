"""The `man-names` task from the Linux man-pages (Debian `manpages-dev`): a C function or
system call's name(s) -> the one-line description of its page, validated on held-out pages.

Only pages of sections 2 and 3 whose .TH line says "Linux man-pages" are read, so the task does
not depend on what other packages install under `MAN_DIR`.
"""

from __future__ import annotations

import functools
import gzip
import random
import re
from pathlib import Path

from lorank.bench.tasks.source_text import Rows, _clean, _require, _words

# Where the Debian package puts its data (module-level so tests can point it elsewhere).
MAN_DIR = Path("/usr/share/man")


def read_man_names() -> list[tuple[str, str, str]]:
    """(names, section, description) from the NAME section of the Linux man-pages (2 and 3).

    Only pages whose .TH line says "Linux man-pages" count, so pages other packages drop into
    man3 do not make the task depend on what else is installed; symlinked aliases are skipped.
    """
    return list(_read_man_names(MAN_DIR))


@functools.lru_cache(maxsize=2)
def _read_man_names(man_dir: Path) -> tuple[tuple[str, str, str], ...]:
    _require(man_dir / "man3" / "strlen.3.gz", "manpages-dev")
    out = []
    for section in ("2", "3"):
        for path in sorted((man_dir / f"man{section}").glob(f"*.{section}.gz")):
            if path.is_symlink():
                continue
            text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
            th = re.search(r"^\.TH .*$", text, re.M)
            name = re.search(r"^\.SH NAME\n(.*?)^\.SH", text, re.M | re.S)
            if not th or "Linux man-pages" not in th.group(0) or not name:
                continue
            line = _clean(re.sub(r"^\..*$", "", name.group(1), flags=re.M))
            names, sep, desc = line.partition(" \\- ")
            if not sep:
                continue
            names_list = [n.strip() for n in names.split(",") if n.strip()]
            desc = desc.replace("\\-", "-").replace("\\(aq", "'").replace("\\", "")
            out.append((", ".join(names_list[:4]), section, _clean(desc)))
    return tuple(out)


def build_man_names(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """C function / system call name(s) -> the one-line description of its man page.

    Validation pages are held out, so this measures how far a little naming knowledge
    generalizes to unseen functions: a task where rank is expected to matter little.
    """
    pool = [p for p in read_man_names() if 2 <= _words(p[2]) <= 14 and p[2].isascii()]
    seen: set[str] = set()
    unique = []
    for p in pool:  # one page per description, so no answer is in both splits
        if p[2] not in seen:
            seen.add(p[2])
            unique.append(p)
    random.Random(f"man-names:{seed}").shuffle(unique)
    val, train = unique[:n_val], unique[n_val : n_val + n_train]

    def row(p: tuple[str, str, str]) -> dict[str, str]:
        return {"prompt": f"man {p[1]} {p[0]}\nNAME:", "completion": " " + p[2]}

    meta = {"split": "disjoint by page and description", "pool": len(unique)}
    return [row(p) for p in train], [row(p) for p in val], meta
