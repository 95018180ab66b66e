"""The package's layers import only downward: a stage may use the ones below it, never above.

Every module under src/lorank is parsed with `ast`; each `import` of a lorank module, at module
level or inside a function, must go to the same or a lower layer. The benchmark harness
(`lorank.bench`) imports the library and only the CLI imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lorank"

# Lowest first. A name covers its submodules (`lorank.estimators` holds every estimator), except
# `lorank`, which names only the package's own __init__. The parts of a package split into
# modules (data, train, sweep, runs, bench.tasks, bench.score) have layers of their own, in the order they
# are read, below the package's name, which then stands for its __init__ (the re-exports).
LAYERS: list[tuple[str, ...]] = [
    ("lorank.util", "lorank.errors", "lorank.hub"),
    ("lorank.data.formats",),
    ("lorank.data.reading",),
    ("lorank.data.prepared", "lorank.data.batching"),
    ("lorank.data.profiling",),
    ("lorank.data", "lorank.models", "lorank.targets", "lorank.planned_run", "lorank.losses",
     "lorank.heads", "lorank.hooks", "lorank.plots"),
    ("lorank.train.recipe", "lorank.train.evaluation", "lorank.train.checkpoints"),
    ("lorank.train.callbacks",),
    ("lorank.train.loop",),
    ("lorank.estimators", "lorank.train", "lorank.scoring", "lorank.callback", "lorank.adapters",
     "lorank.adapter_loss"),
    ("lorank.sweep.grid",),
    ("lorank.sweep.curve", "lorank.sweep.storage"),
    ("lorank.sweep.trial_queue",),
    ("lorank.sweep.liveness", "lorank.sweep.summary"),
    ("lorank.sweep.trial_run",),
    ("lorank.sweep.worker",),
    ("lorank.sweep", "lorank.decide"),
    ("lorank.export", "lorank.frameworks", "lorank.report", "lorank.summary",
     "lorank.html_report"),
    ("lorank.runs.inputs",),
    ("lorank.runs.gradient", "lorank.runs.probe"),
    ("lorank.runs.estimate",),
    ("lorank.runs",),
    ("lorank.api", "lorank"),  # `lorank` itself: the verbs, loaded lazily from api
    ("lorank.bench.tasks.source_text",),
    ("lorank.bench.tasks.wordnet", "lorank.bench.tasks.acronyms", "lorank.bench.tasks.man_pages",
     "lorank.bench.tasks.stdlib_code"),
    ("lorank.bench.tasks.recipes",),
    ("lorank.bench.tasks.build",),
    ("lorank.bench.score.truth", "lorank.bench.score.replays", "lorank.bench.score.gradient_rules",
     "lorank.bench.score.estimator_runs"),
    ("lorank.bench.score.calibration", "lorank.bench.score.method_rows"),
    ("lorank.bench.score.tables",),
    ("lorank.bench.score.run",),
    ("lorank.demo", "lorank.bench"),
    ("lorank.cli_options",),
    ("lorank.cli_output", "lorank.cli_exit"),
    ("lorank.cli",),
]
BENCH_USERS = ("lorank.cli", "lorank.bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def covered_by(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def owner(module: str) -> str | None:
    """The LAYERS entry that covers `module` (the longest matching name)."""
    names = [n for layer in LAYERS for n in layer
             if module == n or (n != "lorank" and covered_by(module, n))]
    return max(names, key=len) if names else None


def layer(module: str) -> int:
    name = owner(module)
    assert name is not None, f"{module} has no layer: add it to LAYERS in {Path(__file__).name}"
    return next(i for i, names in enumerate(LAYERS) if name in names)


def imports(module: str) -> list[tuple[int, str]]:
    """(line, lorank module) for each import in `module`: module level, functions, classes."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from lorank import data` imports the module lorank.data
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return sorted({(line, name) for line, name in found if covered_by(name, "lorank")})


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if owner(m) is None]
    assert not missing, f"modules without a layer in LAYERS: {missing}"


def test_every_layer_name_is_a_module():
    """A module moved or renamed takes its LAYERS entry along (a stale name checks nothing)."""
    stale = [n for names in LAYERS for n in names if n not in MODULES]
    assert not stale, f"names in LAYERS with no module under src/lorank: {stale}"


def test_imports_go_to_the_same_or_a_lower_layer():
    upward = [f"{m}:{line} imports {target} (layer {layer(target)} > {layer(m)})"
              for m in MODULES for line, target in imports(m) if layer(target) > layer(m)]
    assert not upward, "imports going up a layer:\n" + "\n".join(upward)


def test_only_the_cli_imports_the_benchmark_harness():
    users = [f"{m}:{line} imports {target}" for m in MODULES for line, target in imports(m)
             if covered_by(target, "lorank.bench")
             and not any(covered_by(m, u) for u in BENCH_USERS)]
    assert not users, "the library imports the benchmark harness:\n" + "\n".join(users)


def test_the_check_sees_imports_inside_functions():
    """The parser finds a function-level import (cli imports the API only when a command runs)."""
    assert any(target == "lorank.api" for _, target in imports("lorank.cli"))
    assert "lorank.data" in {t for _, t in imports("lorank.api")}  # `from lorank import data`
