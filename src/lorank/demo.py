"""The built-in demo: a real dataset from the Python standard library's own source.

Each example is a short stdlib function with its docstring removed (prompt) and the first line
of that docstring (completion): a summarization task on real code that needs no download.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
from pathlib import Path

from lorank.decide import Recommendation
from lorank.util import atomic_write_text

STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "codecs", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getpass", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "imaplib", "inspect", "ipaddress", "json", "linecache",
    "locale", "logging", "mailbox", "mimetypes", "netrc", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "posixpath",
    "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "urllib.parse", "uuid", "wave", "webbrowser", "zipfile",
)


def stdlib_docstring_pairs(max_lines: int = 8, max_chars: int = 400) -> list[dict[str, str]]:
    """(function source without docstring -> first docstring line) for short stdlib functions."""
    pairs = []
    for module in STDLIB_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 2:
                continue
            summary = doc.strip().splitlines()[0].strip()
            if not 10 <= len(summary) <= 120:
                continue
            node.body = node.body[1:]
            node.decorator_list = []
            code = ast.unparse(node)
            if code.count("\n") + 1 > max_lines or len(code) > max_chars:
                continue
            pairs.append({"prompt": f"{code}\n# Summary:", "completion": f" {summary}",
                          "source": f"{module}.{node.name}"})
    unique = {(p["prompt"], p["completion"]): p for p in pairs}
    return sorted(unique.values(), key=lambda p: (p["source"], p["prompt"]))


def build_demo_data(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Write `n` seeded examples as JSONL (prompt/completion) and return the path."""
    pairs = stdlib_docstring_pairs()
    random.Random(seed).shuffle(pairs)
    lines = [json.dumps({"prompt": p["prompt"], "completion": p["completion"]})
             for p in pairs[:n]]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run_demo(out: Path, n: int = 300, seed: int = 0, progress: bool = True,
             estimators: tuple[str, ...] | None = None,
             budget: str | None = None) -> tuple[Recommendation, Path]:
    """Build the stdlib dataset and recommend a rank for SmolLM2-135M on it; `budget` adds
    the one-run probe (steps, or minutes as "10m")."""
    from lorank.api import DEFAULT_ESTIMATORS, recommend

    out = Path(out)
    data_path = build_demo_data(out / "stdlib_docstrings.jsonl", n=n, seed=seed)
    rec = recommend("smollm2-135m", data_path, max_length=160, seed=seed, out=out,
                    estimators=estimators or DEFAULT_ESTIMATORS, budget=budget,
                    progress=progress)
    return rec, data_path
