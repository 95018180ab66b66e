"""The `lorank` command: a thin typer layer over the Python API (same verbs, same options).

Each command calls the API function of its own name with the same keywords (checked by
tests/test_option_names.py); shared options live in `lorank.cli_options`, what is printed
after the call in `lorank.cli_output`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from lorank.cli_exit import run_app
from lorank.cli_options import (
    AdapterArg,
    AdapterDataOpt,
    AdapterModelOpt,
    AdapterValDataOpt,
    CalibOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    EpochsOpt,
    EvalBatchOpt,
    FormatOpt,
    LrOpt,
    MaxLengthOpt,
    ModelOpt,
    OfflineOpt,
    ProbeMethodOpt,
    ProbeRankOpt,
    ProgressOpt,
    RemoteCodeOpt,
    SeedOpt,
    SplitSeedOpt,
    StepsOpt,
    TargetsOpt,
    ValDataOpt,
    console,
    err_console,
    parse_lrs,
    say,
)
from lorank.errors import LorankError

__all__ = ["app", "main", "console", "err_console", "say"]

# rich_markup_mode=None: click's plain help, each option's text wrapped beside it, reads well
# at 80 columns (rich's option table squeezed the help into a narrow column)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Which LoRA rank? Measure the model and the data, then recommend.")


@app.command()
def recommend(
    model: str = ModelOpt,
    data: str = DataOpt,
    targets: str = typer.Option("all-linear", help="all-linear, attention, mlp, names "
                                "(q_proj,v_proj) or re:REGEX"),
    format: str = typer.Option(None, "--format", help="text, prompt-completion, alpaca, chat, "
                               "classification (default: detected from the columns)"),
    val_data: str = typer.Option(None, help="validation data (default: split 10% off, ≤256)"),
    max_length: int = MaxLengthOpt,
    rank: int = typer.Option(None, min=1, help="force this rank (checked against the targets)"),
    max_rank: int = typer.Option(256, min=1, help="largest candidate rank"),
    batch_size: int = typer.Option(8, min=1, help="the planned run's batch size (also of the "
                                   "measurements and the memory model)"),
    epochs: float = EpochsOpt,
    steps: int = StepsOpt,
    seed: int = typer.Option(0, help="seed: same seed, same inputs -> same recommendation"),
    out: Path = typer.Option(Path("lorank-out"), help="output directory"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    budget: str = typer.Option(None, help="add the one-run probe with this budget: training "
                               "steps (200) or minutes (10m)"),
    probe_method: str = ProbeMethodOpt,
    probe_rank: int = ProbeRankOpt,
    lr: str = LrOpt,
    calib: int = CalibOpt,
    sweep: Path = typer.Option(None, help="a `lorank sweep --out` directory on this data: its "
                               "measured rank–loss curve decides"),
    offline: bool = OfflineOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Recommend rank, alpha and targets for this model and data.

    Writes recommendation.json, adapter_config.json, snippets.md and report.html to --out.
    """
    from lorank.api import recommend as api_recommend
    from lorank.cli_output import print_recommended

    rec = api_recommend(model, data, targets=targets, format=format, val_data=val_data,
                        max_length=max_length, rank=rank, max_rank=max_rank,
                        batch_size=batch_size, epochs=epochs, steps=steps, seed=seed, out=out,
                        dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        budget=budget, probe_method=probe_method, probe_rank=probe_rank,
                        lr=parse_lrs(lr), calib=calib, sweep=sweep, offline=offline,
                        progress=progress)
    print_recommended(rec, out, "recommend")


@app.command()
def analyze(
    model: str = ModelOpt,
    data: str = DataOpt,
    targets: str = TargetsOpt,
    calib: int = CalibOpt,
    gradient_max_rank: int = typer.Option(None, min=1, help="largest rank the gradient "
                                          "spectrum reads per layer [min(64, layer dims)]"),
    format: str = FormatOpt,
    val_data: str = ValDataOpt,
    max_length: int = MaxLengthOpt,
    batch_size: int = typer.Option(8, min=1, help="the planned run's batch size (also of the "
                                   "forward/backward passes)"),
    epochs: float = EpochsOpt,
    steps: int = StepsOpt,
    sketch_check: bool = typer.Option(False, help="report each sketched layer's principal "
                                      "angles to an independent replica sketch (costs more)"),
    seed: int = typer.Option(0, help="seed of the calibration sample and the halves"),
    gradient_replay_mb: float = typer.Option(None, help="memory (MiB, on the model's device) "
                                             "that half A's layer inputs and gradients may "
                                             "take to replay the last pass instead of running "
                                             "it, and a classifier's forward graphs to serve "
                                             "its head fit; 0: always run both [2048]"),
    out: Path = typer.Option(Path("lorank-analyze"), help="output directory"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Per-layer and overall rank from gradients, before training.

    The gradient spectrum: directions that replicate across two halves of the data.
    """
    from lorank.api import analyze as api_analyze
    from lorank.cli_output import print_recommended

    rec = api_analyze(model, data, targets=targets, calib=calib,
                      gradient_max_rank=gradient_max_rank, format=format, val_data=val_data,
                      max_length=max_length, batch_size=batch_size, epochs=epochs, steps=steps,
                      sketch_check=sketch_check, seed=seed,
                      gradient_replay_mb=gradient_replay_mb, out=out, dtype=dtype,
                      device=device, trust_remote_code=trust_remote_code, offline=offline,
                      progress=progress)
    print_recommended(rec, out, "analyze")


@app.command()
def probe(
    model: str = ModelOpt,
    data: str = DataOpt,
    val_data: str = ValDataOpt,
    probe_rank: int = ProbeRankOpt,
    budget: str = typer.Option(None, help="training steps (200) or minutes (10m); default "
                               "the planned run (--epochs/--steps), else about one epoch"),
    probe_method: str = ProbeMethodOpt,
    lr: str = LrOpt,
    targets: str = TargetsOpt,
    format: str = FormatOpt,
    max_length: int = MaxLengthOpt,
    batch_size: int = typer.Option(8, min=1, help="the planned run's batch size per step"),
    epochs: float = EpochsOpt,
    steps: int = StepsOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("lorank-probe"), help="output directory"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    progress: bool = ProgressOpt,
) -> None:
    """One training run's rank–loss curve, and a rank from it alone."""
    from lorank.api import probe as api_probe
    from lorank.cli_output import print_recommended

    rec = api_probe(model, data, val_data=val_data, probe_rank=probe_rank, budget=budget,
                    probe_method=probe_method, lr=parse_lrs(lr), targets=targets, format=format,
                    max_length=max_length, batch_size=batch_size, epochs=epochs, steps=steps,
                    seed=seed, out=out, dtype=dtype, device=device,
                    trust_remote_code=trust_remote_code, offline=offline, progress=progress)
    print_recommended(rec, out, "probe")


@app.command()
def targets(
    model: str = ModelOpt,
    targets: str = TargetsOpt,
    num_labels: int = typer.Option(None, min=2, help="load as a classifier with this many "
                                   "labels [2 for a classifier model]"),
    batch_size: int = typer.Option(8, min=1, help="batch size for the memory model"),
    seq_len: int = typer.Option(512, min=1, help="sequence length for the memory model"),
    offline: bool = OfflineOpt,
) -> None:
    """List target modules, shapes, and params / memory per rank."""
    from lorank.cli_output import print_targets
    from lorank.models import load_model, model_task
    from lorank.targets import resolve_targets

    assumed_labels = num_labels is None and model_task(model, offline=offline) == "classification"
    if assumed_labels:  # the head's size only moves the counts by its own few parameters
        num_labels = 2
    loaded = load_model(model, task="classification" if num_labels else None,
                        num_labels=num_labels, offline=offline)
    print_targets(resolve_targets(loaded.model, targets), batch_size, seq_len, assumed_labels)


# sweep: with --task, the options left out (None here) take the task's recipe, else these
SWEEP_DEFAULTS = {"ranks": "1,2,4,8,16,32,64", "lrs": "5e-4,2e-3", "seeds": "0,1",
                  "steps": 100, "batch_size": 8, "max_length": 512, "lora_alpha": None,
                  "skip_margin": None}


@app.command()
def sweep(
    model: str = typer.Option(None, "--model", "-m", help="as in `recommend` (or from --task)"),
    data: str = typer.Option(None, "--data", "-d", help="as in `recommend` (or from --task)"),
    task: str = typer.Option(None, help="a benchmark task (lorank.bench.tasks): builds its data into "
                             "OUT/data and takes its recipe; options given here override it"),
    ranks: str = typer.Option(None, help="comma-separated ranks [1,2,4,8,16,32,64]"),
    lrs: str = typer.Option(None, help="comma-separated learning rates [5e-4,2e-3]"),
    seeds: str = typer.Option(None, help="comma-separated training seeds [0,1]"),
    steps: int = typer.Option(None, min=1, help="optimizer steps per run [100]"),
    batch_size: int = typer.Option(None, min=1, help="batch size per step [8]"),
    eval_every: int = typer.Option(0, min=0, help="evaluate every N steps (0: steps/4)"),
    targets: str = TargetsOpt,
    format: str = FormatOpt,
    val_data: str = ValDataOpt,
    max_length: int = typer.Option(None, min=1, help="truncate examples to this many tokens [512]"),
    lora_alpha: float = typer.Option(None, help="fixed alpha for every rank (rsLoRA) [8]"),
    storage: str = typer.Option(None, help="study storage URL (default: sqlite in --out); "
                                "postgresql://... lets many workers share the sweep"),
    heartbeat: int = typer.Option(None, min=1, help="seconds between the heartbeats of a "
                                  "worker holding a trial (database server storage) [30]"),
    grace: int = typer.Option(None, min=2, help="seconds without a heartbeat after which a "
                              "trial's worker counts as dead and its point runs again [180]"),
    prune: bool = typer.Option(False, help="successive-halving pruning of weak runs"),
    skip_margin: float = typer.Option(None, min=0.0, help="nats: a later seed skips an lr that lost to "
                                      "its rank's best lr by more at the first seed [off]"),
    settle: bool = typer.Option(False, help="after the grid, add seeds (up to 5) at the best lr "
                                "of each rank whose verdict hinges on seed noise"),
    max_trials: int = typer.Option(None, min=1, help="stop this worker after N trials"),
    gradient_checkpointing: bool = typer.Option(False, help="recompute activations in "
                                                "backward: less memory, more time"),
    out: Path = typer.Option(Path("lorank-sweep"), help="output directory"),
    seed: int = typer.Option(0, help="seed of the task build and the train/validation split"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Train one LoRA per (rank, lr, seed): the measured truth.

    Resumable; writes sweep.json and rank_loss.png.
    """
    from lorank.api import sweep as api_sweep
    from lorank.cli_output import print_sweep
    from lorank.util import parse_list

    given = {"ranks": ranks, "lrs": lrs, "seeds": seeds, "steps": steps,
             "batch_size": batch_size, "max_length": max_length, "lora_alpha": lora_alpha,
             "skip_margin": skip_margin}
    defaults = dict(SWEEP_DEFAULTS)
    if task is not None:
        from lorank.bench.tasks import task_inputs

        task_model, task_data, task_val, recipe = task_inputs(task, out, seed=seed)
        if data is None:  # the task's validation split belongs to the task's own data
            data, val_data = task_data, val_data or task_val
        model = model or task_model
        defaults |= recipe
    elif model is None or data is None:
        raise LorankError("sweep needs --model and --data, or --task NAME")
    opts = {k: v if v is not None else defaults[k] for k, v in given.items()}
    result = api_sweep(model, data, ranks=parse_list(opts["ranks"], int, "ranks"),
                       lrs=parse_list(opts["lrs"], float, "lrs"),
                       seeds=parse_list(opts["seeds"], int, "seeds"),
                       steps=int(opts["steps"]), batch_size=int(opts["batch_size"]),
                       eval_every=eval_every, targets=targets, format=format, val_data=val_data,
                       max_length=int(opts["max_length"]), lora_alpha=opts["lora_alpha"],
                       storage=storage, prune=prune, skip_margin=opts["skip_margin"],
                       settle=settle, max_trials=max_trials,
                       gradient_checkpointing=gradient_checkpointing, out=out, seed=seed,
                       dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                       progress=progress, command=shlex.join(["lorank", *sys.argv[1:]]),
                       heartbeat=heartbeat, grace=grace, offline=offline)
    print_sweep(result, out)


@app.command()
def bench(
    results: Path = typer.Option(Path("benchmarks/results"), help="one folder per task, each "
                                 "with sweep.json from `lorank sweep --task`"),
    markdown: Path = typer.Option(Path("benchmarks/BENCHMARKS.md"), help="file whose generated "
                                  "block is rewritten"),
    run: str = typer.Option("", help="first run these estimators on every task with a sweep "
                            "(comma-separated: capacity, gradient, svd-probe, nested-probe); "
                            "their Evidence is stored and reused"),
    baselines: str = typer.Option("", help="first train these per-layer baselines on every "
                                  "task with a sweep (comma-separated: eva, adalora, fisher, gradient); "
                                  "stored in TASK/baselines and reused"),
    tasks: str = typer.Option("", help="only run --run / --baselines on these tasks "
                              "(comma-separated folder names); scoring covers every task"),
    progress: bool = ProgressOpt,
) -> None:
    """Score every method against the sweeps (regret, waste, cost)."""
    from lorank.bench.score import (
        markdown_tables,
        overall,
        run_bench,
        run_task_estimators,
        update_markdown,
    )
    from lorank.cli_output import print_overall

    if not results.is_dir():
        raise LorankError(f"--results {results}: not a directory")
    from lorank.bench.baselines import BASELINES, run_task_baselines

    names = [n.strip() for n in run.split(",") if n.strip()]
    layerwise = [n.strip() for n in baselines.split(",") if n.strip()]
    unknown = [n for n in layerwise if n not in BASELINES]
    if unknown:
        raise LorankError(f"--baselines {unknown[0]}: unknown; known: {', '.join(BASELINES)}")
    swept = sorted(p for p in results.iterdir() if (p / "sweep.json").exists())
    only = {t.strip() for t in tasks.split(",") if t.strip()}
    if only - {p.name for p in swept}:
        raise LorankError(f"--tasks {', '.join(sorted(only - {p.name for p in swept}))}: no "
                          f"such task with a sweep.json under {results}")
    for task_dir in swept:
        if only and task_dir.name not in only:
            continue
        if names:
            run_task_estimators(task_dir, names, progress=progress)
        if layerwise:
            run_task_baselines(task_dir, layerwise, progress=progress)
    scored = run_bench(results)
    update_markdown(markdown, markdown_tables(scored, results))
    print_overall(overall(scored), markdown)


@app.command()
def demo(
    out: Path = typer.Option(Path("lorank-demo"), help="output directory"),
    n: int = typer.Option(300, help="examples to build from the standard library"),
    budget: str = typer.Option(None, help="also run the probe: steps (40) or minutes (10m)"),
    seed: int = SeedOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Run `recommend` on SmolLM2 with a dataset from the stdlib.

    The dataset: short standard-library functions and their docstrings' first lines.
    """
    from lorank.demo import run_demo
    from lorank.report import print_recommendation

    rec, data_path = run_demo(out, n=n, seed=seed, budget=budget, progress=progress)
    say(f"demo data: {data_path}")
    print_recommendation(rec, console, out=out, command="demo")


@app.command()
def inspect(
    adapter: Path = AdapterArg,
    tol: float = typer.Option(0.1, min=0.0, max=1.0, help="relative error a truncation may "
                              "make; the per-layer rank that keeps within it is shown"),
    data: str = AdapterDataOpt,
    model: str = AdapterModelOpt,
    format: str = FormatOpt,
    val_data: str = AdapterValDataOpt,
    max_length: int = MaxLengthOpt,
    batch_size: int = EvalBatchOpt,
    seed: int = SplitSeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    progress: bool = ProgressOpt,
) -> None:
    """How much of its rank a trained adapter uses, per layer.

    Without --data no model is loaded; with it, the validation loss truncated to each
    candidate rank.
    """
    from lorank.api import inspect as api_inspect
    from lorank.cli_output import print_inspection

    report = api_inspect(adapter, tol=tol, data=data, model=model, format=format,
                         val_data=val_data, max_length=max_length, batch_size=batch_size,
                         seed=seed, dtype=dtype, device=device,
                         trust_remote_code=trust_remote_code, offline=offline,
                         progress=progress)
    print_inspection(report, adapter, tol)


@app.command()
def shrink(
    adapter: Path = AdapterArg,
    out: Path = typer.Option(..., help="directory for the smaller adapter"),
    rank: int = typer.Option(None, min=1, help="one rank for every layer"),
    tol: float = typer.Option(None, help="per-layer ranks: each keeps its update within this "
                              "relative (Frobenius) error; written as rank_pattern"),
    data: str = AdapterDataOpt,
    model: str = AdapterModelOpt,
    format: str = FormatOpt,
    val_data: str = AdapterValDataOpt,
    max_length: int = MaxLengthOpt,
    batch_size: int = EvalBatchOpt,
    seed: int = SplitSeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Shrink a trained adapter by an exact SVD re-factorization.

    The smaller adapter loads in PEFT; with --data, the validation loss change it makes.
    """
    from lorank.api import shrink as api_shrink
    from lorank.cli_output import print_shrunk

    summary = api_shrink(adapter, out, rank=rank, tol=tol, data=data, model=model,
                         format=format, val_data=val_data, max_length=max_length,
                         batch_size=batch_size, seed=seed, dtype=dtype, device=device,
                         trust_remote_code=trust_remote_code, offline=offline,
                         progress=progress)
    print_shrunk(summary, out)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C or SIGTERM
    keep finished work and exit with 130 or 143 after one line (see `lorank.cli_exit`)."""
    run_app(app)


@app.command()
def export(
    directory: Path = typer.Argument(..., metavar="DIR", help="a `lorank recommend --out` "
                                     "directory (reads its recommendation.json)"),
    to: str = typer.Option(..., "--to", help="peft, trl, axolotl, llamafactory, unsloth, "
                           "torchtune"),
    out: Path = typer.Option(None, "--out", help="write to this file (atomically) instead of "
                             "printing"),
) -> None:
    """Print a recommendation as one framework's configuration.

    --out FILE writes it to a file instead.
    """
    from lorank.export import read_recommendation
    from lorank.frameworks import FRAMEWORKS, export_config
    from lorank.util import atomic_write_text

    if to not in FRAMEWORKS:  # before any file is read
        raise LorankError(f"--to {to}: unknown framework; known: {', '.join(FRAMEWORKS)}")
    text = export_config(read_recommendation(directory), to)
    if out is None:
        sys.stdout.write(text)
        return
    if out.is_dir():
        raise LorankError(f"--out {out}: is a directory; expected a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    except OSError as err:
        raise LorankError(f"--out {out}: cannot write ({err.strerror})") from None
    say(f"wrote {out}")


def _print_version(value: bool) -> None:
    if value:
        from lorank import __version__

        say(f"lorank {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="print the version and exit"),
) -> None:
    """Options before the command: `lorank --version` prints the version and exits."""


if __name__ == "__main__":
    main()
