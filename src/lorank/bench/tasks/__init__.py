"""Benchmark tasks: builders that turn real text on this machine into train/validation sets.

Every task comes from text that is either installed offline from a Debian package (WordNet,
V.E.R.A. acronyms, the Linux man-pages) or is the Python standard library's own source, so the
benchmark never downloads anything. Builders are deterministic from a seed: the same seed on the
same machine (same package versions, same Python) gives byte-identical files; task.json records
those versions so a result can say exactly what it was measured on.

Each task has a recipe (`TaskSpec`): model alias, training steps, learning-rate grid, seeds and
ranks of the ground-truth sweep, and an estimate of what that sweep costs on 2 CPU cores.

Formats written (JSONL, one object per line):
  generation:      {"prompt": str, "completion": str}
  classification:  {"text": str, "label": str}

Modules, lowest first (each imports only those before it): `source_text` (row types, the
installed-package check, text helpers), one builder module per source (`wordnet`, `acronyms`,
`man_pages`, `stdlib_code`), `recipes` (`TaskSpec`, `TASKS`), `build` (`build_task`,
`task_inputs`). The names callers use are re-exported here. The data directories
(`wordnet.WORDNET_DIR`, `acronyms.VERA_DIR`, `man_pages.MAN_DIR`) are not: a test points a
builder elsewhere by patching its own module.
"""

from lorank.bench.tasks.acronyms import acronym_facts, build_facts, read_acronyms
from lorank.bench.tasks.build import build_task, task_inputs
from lorank.bench.tasks.man_pages import build_man_names, read_man_names
from lorank.bench.tasks.recipes import TASKS, TaskSpec
from lorank.bench.tasks.source_text import INSTALL_HINT, Builder, Rows, package_version
from lorank.bench.tasks.stdlib_code import (
    STDLIB_MODULES,
    build_code_docstring,
    read_stdlib_functions,
)
from lorank.bench.tasks.wordnet import (
    LEXNAME_CLASSES,
    Synset,
    build_format_json,
    build_wordnet_chat,
    build_wordnet_lexname,
    read_wordnet,
)

__all__ = [
    "INSTALL_HINT",
    "LEXNAME_CLASSES",
    "STDLIB_MODULES",
    "TASKS",
    "Builder",
    "Rows",
    "Synset",
    "TaskSpec",
    "acronym_facts",
    "build_code_docstring",
    "build_facts",
    "build_format_json",
    "build_man_names",
    "build_task",
    "build_wordnet_chat",
    "build_wordnet_lexname",
    "package_version",
    "read_acronyms",
    "read_man_names",
    "read_stdlib_functions",
    "read_wordnet",
    "task_inputs",
]
