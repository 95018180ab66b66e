"""docs/cli.md shows every CLI option in a runnable example that parses; README.md's Python
quickstart runs as written."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup, TyperOption

from lorank.cli import app

try:  # typer >= 0.2x vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # older typer uses click itself
    from click.exceptions import UsageError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
SECTION = "docs/cli.md"
PREFIX = ".venv/bin/lorank"


def commands() -> dict:
    """Subcommand name -> its click command."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return dict(group.commands)


def long_options(cmd) -> list[str]:
    """Every long option of a command; for `--flag/--no-flag` only the positive one."""
    opts = []
    for param in cmd.params:
        if isinstance(param, TyperOption):
            opts += [o for o in param.opts if o.startswith("--") and o != "--help"]
    return opts


def off_switches(cmd) -> dict[str, str]:
    """A flag's positive name -> its negative one (`--progress` -> `--quiet`): an example of
    either shows the flag."""
    return {on: off for param in cmd.params if isinstance(param, TyperOption)
            for on in param.opts[:1] for off in param.secondary_opts[:1]}


def reference_section() -> str:
    return CLI_DOC.read_text(encoding="utf-8")


def example_commands() -> list[str]:
    """Command lines inside ``` fences of the section (backslash continuations joined)."""
    examples, in_fence, current = [], False, None
    for ln in reference_section().splitlines():
        if ln.lstrip().startswith("```"):
            in_fence, current = not in_fence, None
            continue
        if not in_fence:
            continue
        text = ln.strip()
        if current is not None:
            current += " " + text.removesuffix("\\").strip()
        elif text.startswith(PREFIX + " "):
            current = text.removesuffix("\\").strip()
        else:
            continue
        if not text.endswith("\\"):
            examples.append(current)
            current = None
    return examples


def split_example(line: str) -> tuple[str, list[str]]:
    """(subcommand, its arguments) of one example line; `# comments` dropped."""
    words = shlex.split(line, comments=True)
    assert len(words) >= 2 and words[0] == PREFIX, line
    return words[1], words[2:]


def used_options(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def test_every_option_has_an_example():
    examples = [split_example(line) for line in example_commands()]
    used: dict[str, set[str]] = {}
    for name, args in examples:
        used.setdefault(name, set()).update(used_options(args))
    without_example = sorted(set(commands()) - set(used))
    missing = [f"{name} {opt}" for name, cmd in commands().items()
               for opt in long_options(cmd) if opt not in used.get(name, set())
               and off_switches(cmd).get(opt) not in used.get(name, set())]
    assert not without_example, f"commands with no example in {SECTION}: {without_example}"
    assert not missing, f"options with no example in {SECTION}: {missing}"


def test_examples_parse():
    cmds = commands()
    examples = example_commands()
    assert examples, f"no `{PREFIX} ...` lines in {SECTION}"
    for line in examples:
        name, args = split_example(line)
        assert name in cmds, f"unknown command in example: {line}"
        # a full parse, not resilient_parsing=True: with typer's vendored click that mode
        # swallows unknown options and missing values; make_context never runs the command
        try:
            cmds[name].make_context(name, list(args))
        except UsageError as err:
            pytest.fail(f"example does not parse ({err.format_message()}): {line}")


def quickstart_python() -> str:
    """The one ```python block of README.md's Quickstart."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart"):]
    section = section[: section.index("\n## ", 1)]
    start = section.index("```python\n") + len("```python\n")
    return section[start: section.index("```", start)]


@pytest.mark.integration
def test_readme_quickstart_runs(tmp_path, monkeypatch):
    """The README's Python snippet, as written, on the packaged SmolLM2 and a stdlib dataset
    saved as the train.jsonl it names: it recommends and the adapter config loads into PEFT."""
    import contextlib
    import io
    import json

    from lorank.demo import stdlib_docstring_pairs

    rows = stdlib_docstring_pairs()[:48]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(quickstart_python(), "README.md", "exec"), {})  # noqa: S102
    assert (tmp_path / "out" / "adapter_config.json").exists()
    rec = json.loads((tmp_path / "out" / "recommendation.json").read_text())
    assert printed.getvalue().startswith(f"{rec['rank']} {rec['confidence']} capacity:")
    assert "trainable params" in printed.getvalue()
