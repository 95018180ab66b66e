"""The `code-docstring` task from the Python standard library's own source: a short public
function's code without its docstring -> the summary sentence of that docstring.

Functions come from a fixed list of pure-Python modules present on CPython 3.10 to 3.14. Code
is re-rendered by `ast.unparse`, so rows depend on the Python version (recorded in task.json)
but not on formatting. The split is disjoint by function body.
"""

from __future__ import annotations

import ast
import copy
import functools
import random
import re
import sysconfig
from pathlib import Path

from lorank.bench.tasks.source_text import Rows, _clean, _words

# Pure-Python standard-library modules and packages present on CPython 3.10 to 3.14 and not
# split out by distributions (no tkinter, idlelib, lib2to3, distutils, ensurepip).
STDLIB_MODULES = (
    "argparse ast asyncio base64 bdb bisect calendar cmd codecs collections colorsys "
    "concurrent configparser contextlib copy csv dataclasses datetime difflib dis email enum "
    "filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob gzip heapq hmac "
    "html http imaplib importlib inspect ipaddress json locale logging lzma mailbox mimetypes "
    "multiprocessing netrc ntpath numbers operator optparse os pdb pickle pkgutil platform "
    "plistlib poplib posixpath pprint pydoc queue quopri random reprlib rlcompleter sched "
    "secrets selectors shelve shlex shutil smtplib socket socketserver statistics string "
    "subprocess symtable tabnanny tarfile tempfile textwrap threading timeit token tokenize "
    "trace traceback tracemalloc types typing urllib uuid warnings wave weakref webbrowser xml "
    "zipapp zipfile zipimport"
).split()

CODE_MAX_LINES = 6
CODE_MAX_CHARS = 220
CODE_ROW_MAX_CHARS = 260


def _stdlib_files(root: Path, name: str) -> list[Path]:
    if (root / f"{name}.py").is_file():
        return [root / f"{name}.py"]
    pkg = root / name
    if not pkg.is_dir():
        return []
    skip = {"test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in pkg.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def read_stdlib_functions() -> list[tuple[str, str, str]]:
    """(module, code without docstring, first docstring line) of short documented functions.

    Public functions and methods only (no _private or dunder: their docstrings are formulaic);
    code is re-rendered by ast.unparse, which drops comments and decorators, so it depends on
    the Python version (recorded in task.json) but not on formatting.
    """
    return list(_read_stdlib_functions(sysconfig.get_paths()["stdlib"]))


@functools.lru_cache(maxsize=1)
def _read_stdlib_functions(stdlib: str) -> tuple[tuple[str, str, str], ...]:
    out = []
    for name in STDLIB_MODULES:
        for path in _stdlib_files(Path(stdlib), name):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            module = ".".join(path.relative_to(stdlib).with_suffix("").parts)
            nodes = list(tree.body)
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    nodes += node.body
            for fn in nodes:
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                doc = ast.get_docstring(fn)
                if fn.name.startswith("_") or not doc or len(fn.body) < 2:
                    continue
                # the summary sentence: docstrings wrap it over lines, so join the paragraph
                para = _clean(doc.strip().split("\n\n")[0])
                first = re.split(r"(?<=[.!?])\s", para, maxsplit=1)[0]
                if not 3 <= _words(first) <= 16 or not first.isascii():
                    continue
                stripped = copy.deepcopy(fn)
                stripped.body = stripped.body[1:]
                stripped.decorator_list = []
                code = ast.unparse(stripped)
                if code.count("\n") + 1 > CODE_MAX_LINES or len(code) > CODE_MAX_CHARS:
                    continue
                if not code.isascii():
                    continue
                out.append((module.removesuffix(".__init__"), code, first))
    return tuple(out)


def build_code_docstring(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """A short stdlib function's code -> the summary sentence of its docstring.

    Identical code (posixpath/ntpath twins, copied methods) is kept once, so the split is
    disjoint by function body and no validation function was seen in training.
    """

    def row(p: tuple[str, str, str]) -> dict[str, str]:
        return {"prompt": f"# module: {p[0]}\n{p[1]}\n# Summary:", "completion": " " + p[2]}

    seen: set[str] = set()
    pool = []
    for p in read_stdlib_functions():
        # code runs ~2.7 characters per token: keeps prompt + completion under about 96 tokens
        if p[1] not in seen and sum(map(len, row(p).values())) <= CODE_ROW_MAX_CHARS:
            seen.add(p[1])
            pool.append(p)
    random.Random(f"code-docstring:{seed}").shuffle(pool)
    val, train = pool[:n_val], pool[n_val : n_val + n_train]
    root = Path(sysconfig.get_paths()["stdlib"])
    meta = {
        "split": "disjoint by function body",
        "pool": len(pool),
        "modules_missing": [m for m in STDLIB_MODULES if not _stdlib_files(root, m)],
    }
    return [row(p) for p in train], [row(p) for p in val], meta
