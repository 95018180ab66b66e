"""One name per concept: every option of every command is the keyword of the API function the
command calls, with the same name (dashes -> underscores) and the same default.

The CLI is a thin skin: `lorank recommend` calls `lorank.api.recommend`, `lorank analyze` calls
`lorank.api.analyze`, and so on. The few differences are listed here, each with its reason."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer
from typer.models import ArgumentInfo, OptionInfo

from lorank import api, cli, demo
from lorank.cli_options import parse_lrs

# command -> the API function it calls
API_OF = {
    "recommend": api.recommend,
    "analyze": api.analyze,
    "probe": api.probe,
    "sweep": api.sweep,
    "inspect": api.inspect,
    "shrink": api.shrink,
    "demo": demo.run_demo,
}
# commands with no API verb of their own: they read files or list what a model holds
CLI_ONLY_COMMANDS = {"targets", "bench", "export"}
# (command, option) of the CLI alone
CLI_ONLY_OPTIONS = {
    ("sweep", "task"),  # builds a benchmark task's data (lorank.bench), which the API never imports
}
# options whose CLI default differs from the API's, and why
OTHER_DEFAULT = {
    # the API writes no files unless given `out`; the CLI always writes, to a folder per command
    **{(name, "out"): "a default output folder" for name in ("recommend", "analyze", "probe")},
    # `--task` fills these when they are left out (None), else SWEEP_DEFAULTS does
    **{("sweep", name): "from --task or SWEEP_DEFAULTS"
       for name in ("model", "data", "ranks", "lrs", "seeds", "steps", "batch_size",
                    "max_length")},
    ("demo", "out"): "run_demo needs a folder: it writes the demo data there",
}
# options the CLI reads as text and parses before the call: (parser, what the API default is)
PARSED = {"lr": parse_lrs}


def commands() -> dict:
    return {(c.name or c.callback.__name__): c.callback for c in cli.app.registered_commands}


def cli_default(param: inspect.Parameter):
    info = param.default
    if isinstance(info, (OptionInfo, ArgumentInfo)):
        return info.default
    return info


def api_default(param: inspect.Parameter):
    return ... if param.default is inspect.Parameter.empty else param.default


def test_every_command_is_mapped():
    unmapped = set(commands()) - set(API_OF) - CLI_ONLY_COMMANDS
    assert not unmapped, f"commands with no API function in API_OF: {sorted(unmapped)}"


def test_every_option_is_a_keyword_of_the_api_function():
    problems = []
    for name, callback in commands().items():
        if name in CLI_ONLY_COMMANDS:
            continue
        api_params = inspect.signature(API_OF[name]).parameters
        for param in inspect.signature(callback).parameters.values():
            if (name, param.name) in CLI_ONLY_OPTIONS:
                continue
            if param.name not in api_params:
                problems.append(f"{name} --{param.name.replace('_', '-')}: no keyword "
                                f"{param.name!r} in {API_OF[name].__qualname__}")
                continue
            if (name, param.name) in OTHER_DEFAULT:
                continue
            mine, theirs = cli_default(param), api_default(api_params[param.name])
            if param.name in PARSED and isinstance(mine, str):
                mine = PARSED[param.name](mine)
            if isinstance(mine, Path):  # typer hands the callback a Path
                mine = str(mine)
            if isinstance(mine, float) or isinstance(theirs, float):
                same = mine is not None and theirs is not None and float(mine) == float(theirs)
            else:
                same = mine == theirs
            if not same:
                problems.append(f"{name} --{param.name.replace('_', '-')}: default {mine!r}, "
                                f"the API's {theirs!r}")
    assert not problems, "\n".join(problems)


# the three ranks once all called --max-rank: each has its own name, the same on every command
RANK_OPTIONS = {"max_rank": "largest candidate rank", "probe_rank": "rank the probe trains at",
                "gradient_max_rank": "gradient spectrum"}


def test_a_rank_option_means_one_thing_on_every_command():
    found = {}
    for name, callback in commands().items():
        for param in inspect.signature(callback).parameters.values():
            if param.name in RANK_OPTIONS:
                found.setdefault(param.name, []).append(name)
                assert RANK_OPTIONS[param.name] in param.default.help, (name, param.name)
    assert found == {"max_rank": ["recommend"], "probe_rank": ["recommend", "probe"],
                     "gradient_max_rank": ["analyze"]}


def test_progress_is_one_flag_with_quiet_as_its_off_switch():
    for name, callback in commands().items():
        params = inspect.signature(callback).parameters
        assert "quiet" not in params, f"{name}: --quiet is the off side of --progress/--quiet"
        if "progress" in params:
            info = params["progress"].default
            assert info.default is True and "--progress/--quiet" in info.param_decls, name


def test_the_app_is_typer():
    assert isinstance(cli.app, typer.Typer)
