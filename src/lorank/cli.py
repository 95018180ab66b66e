"""The `lorank` command: a thin typer layer over the Python API (same verbs, same options)."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from lorank.errors import LorankError

# rich_markup_mode=None: click's plain help, each option's text wrapped beside it, reads well
# at 80 columns (rich's option table squeezed the help into a narrow column)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Which LoRA rank? Measure the model and the data, then recommend.")
console = Console()
err_console = Console(stderr=True)


def say(text: str) -> None:
    """One plain line: paths and names are printed as they are, never read as rich markup
    (an output directory named "out[bold]" printed as "out")."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


MODEL_HELP = ("HF directory, hub id (org/name: downloaded when not cached), .gguf file, or "
              "alias: smollm2-135m, minilm-l6")
ModelOpt = typer.Option(..., "--model", "-m", help=MODEL_HELP)
CalibOpt = typer.Option(256, help="calibration examples for the gradient spectrum (split "
                        "into halves A and B)")
BUDGET_METHOD = typer.Option("svd", "--probe-method", "--method",
                             help="svd: one plain adapter read by SVD truncation; nested: "
                             "nested-dropout training (DyLoRA)")
EpochsOpt = typer.Option(None, help="the planned run: passes over the training data (or "
                         "--steps) [3, the Trainer's default]")
StepsOpt = typer.Option(None, min=1, help="the planned run: optimizer steps, instead of --epochs")
RemoteCodeOpt = typer.Option(False, help="allow the model's own code to run (off by default)")
DATA_HELP = (".jsonl/.json/.csv/.parquet, a directory of them (train-*/test-* files: splits), "
             "a `save_to_disk` folder, or a `datasets` name")
DataOpt = typer.Option(..., "--data", "-d", help=DATA_HELP)
OfflineOpt = typer.Option(False, help="read hub models and datasets from the local cache only "
                          "(as HF_HUB_OFFLINE=1): never download")


# `inspect --data` and `shrink --data`: the validation loss of a trained adapter, measured with
# recommend's model and data options (same names, same meanings, same validation split)
AdapterModelOpt = typer.Option(None, "--model", "-m", help=MODEL_HELP + " [the adapter's "
                               "base_model_name_or_path]")
AdapterDataOpt = typer.Option(None, "--data", "-d", help="with it, the validation loss of the "
                              "adapter (as in `recommend`: " + DATA_HELP + ")")
FormatOpt = typer.Option(None, "--format", help="as in `recommend`")
ValDataOpt = typer.Option(None, help="validation data (default: the seeded split `recommend` "
                          "makes)")
MaxLengthOpt = typer.Option(512, min=1, help="truncate examples to this many tokens")
EvalBatchOpt = typer.Option(8, min=1, help="batch size of the evaluation")
SplitSeedOpt = typer.Option(0, help="seed of the validation split (as in `recommend`)")
DtypeOpt = typer.Option("float32", help="float32, bfloat16, float16, auto")
DeviceOpt = typer.Option("cpu", help="cpu, cuda, cuda:N, auto")
QuietOpt = typer.Option(False, help="no progress bars")


@app.command()
def recommend(
    model: str = ModelOpt,
    data: str = DataOpt,
    targets: str = typer.Option("all-linear", help="all-linear, attention, mlp, names "
                                "(q_proj,v_proj) or re:REGEX"),
    fmt: str = typer.Option(None, "--format", help="text, prompt-completion, alpaca, chat, "
                            "classification (default: detected from the columns)"),
    val_data: str = typer.Option(None, help="validation data (default: split 10% off, ≤256)"),
    max_length: int = typer.Option(512, min=1, help="truncate examples to this many tokens"),
    rank: int = typer.Option(None, min=1, help="force this rank (checked against the targets)"),
    max_rank: int = typer.Option(256, min=1, help="largest candidate rank"),
    batch_size: int = typer.Option(8, min=1, help="the planned run's batch size (also of the "
                                   "measurements and the memory model)"),
    epochs: float = EpochsOpt,
    steps: int = StepsOpt,
    seed: int = typer.Option(0, help="seed: same seed, same inputs -> same recommendation"),
    out: Path = typer.Option(Path("lorank-out"), help="output directory"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16, auto"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, auto"),
    trust_remote_code: bool = RemoteCodeOpt,
    budget: str = typer.Option(None, help="add the one-run probe with this budget: training "
                               "steps (200) or minutes (10m)"),
    probe_method: str = BUDGET_METHOD,
    probe_max_rank: int = typer.Option(64, min=1, help="rank the probe trains at (reads all below)"),
    lr: str = typer.Option("1e-3", help="learning rate of the probe run; several "
                           "(2e-3,8e-3): a short pilot at the middle rank picks one"),
    calib: int = CalibOpt,
    sweep: Path = typer.Option(None, help="a `lorank sweep --out` directory on this data: its "
                               "measured rank–loss curve decides"),
    offline: bool = OfflineOpt,
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Recommend rank, alpha and targets for this model and data.

    Writes recommendation.json, adapter_config.json, snippets.md and report.html to --out.
    """
    _recommend(model, data, targets=targets, fmt=fmt, val_data=val_data, max_length=max_length,
               rank=rank, max_rank=max_rank, batch_size=batch_size, epochs=epochs, steps=steps,
               seed=seed, out=out,
               dtype=dtype, device=device, trust_remote_code=trust_remote_code, budget=budget,
               probe_method=probe_method, probe_max_rank=probe_max_rank, lr=_lrs(lr), calib=calib,
               sweep=sweep, offline=offline, progress=not quiet)


@app.command()
def analyze(
    model: str = ModelOpt,
    data: str = DataOpt,
    targets: str = typer.Option("all-linear", help="as in `recommend`"),
    calib: int = CalibOpt,
    max_rank: int = typer.Option(None, min=1, help="largest rank read per layer [min(64, layer dims)]"),
    fmt: str = typer.Option(None, "--format", help="as in `recommend`"),
    val_data: str = typer.Option(None, help="validation data (default: seeded split)"),
    max_length: int = typer.Option(512, min=1, help="truncate examples to this many tokens"),
    batch_size: int = typer.Option(8, min=1, help="the planned run's batch size (also of the "
                                   "forward/backward passes)"),
    epochs: float = EpochsOpt,
    steps: int = StepsOpt,
    sketch_check: bool = typer.Option(False, help="report each sketched layer's principal "
                                      "angles to an independent replica sketch (costs more)"),
    seed: int = typer.Option(0, help="seed of the calibration sample and the halves"),
    replay_mb: float = typer.Option(2048, help="memory (MiB, on the model's device) that half A's "
                                    "layer inputs and gradients may take to replay the last "
                                    "pass instead of running it, and a classifier's forward "
                                    "graphs to serve its head fit; 0: always run both"),
    out: Path = typer.Option(Path("lorank-analyze"), help="output directory"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16, auto"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, auto"),
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Per-layer and overall rank from gradients, before training.

    The gradient spectrum: directions that replicate across two halves of the data.
    """
    _recommend(model, data, targets=targets, fmt=fmt, val_data=val_data, max_length=max_length,
               batch_size=batch_size, epochs=epochs, steps=steps, seed=seed, out=out,
               dtype=dtype, device=device,
               trust_remote_code=trust_remote_code, estimators=("gradient",), calib=calib,
               gradient_max_rank=max_rank, sketch_check=sketch_check,
               gradient_replay_mb=replay_mb, offline=offline, progress=not quiet,
               command="analyze")


def _lrs(text: str) -> float | list[float]:
    """One learning rate, or several for the probe's pilot to choose from."""
    from lorank.util import parse_list

    values = parse_list(text, float, "lr")
    return values[0] if len(values) == 1 else values


def _recommend(model: str, data: str, out: Path, command: str = "recommend", **kwargs) -> None:
    from lorank.api import recommend as api_recommend
    from lorank.report import print_recommendation

    rec = api_recommend(model, data, out=out, **kwargs)
    for line in rec.inputs.get("reused", []):  # finished measurements of an earlier run
        say(line)
    print_recommendation(rec, console, out=out, command=command)


@app.command()
def probe(
    model: str = ModelOpt,
    data: str = DataOpt,
    val_data: str = typer.Option(None, help="validation data (default: seeded split)"),
    max_rank: int = typer.Option(64, min=1, help="rank the probe trains at; every rank below is read"),
    budget: str = typer.Option(None, help="training steps (200) or minutes (10m); default "
                               "the planned run (--epochs/--steps), else about one epoch"),
    method: str = BUDGET_METHOD,
    lr: str = typer.Option("1e-3", help="learning rate; several (2e-3,8e-3): a short pilot "
                           "at the middle rank picks one"),
    targets: str = typer.Option("all-linear", help="as in `recommend`"),
    fmt: str = typer.Option(None, "--format", help="as in `recommend`"),
    max_length: int = typer.Option(512, min=1, help="truncate examples to this many tokens"),
    batch_size: int = typer.Option(8, min=1, help="the planned run's batch size per step"),
    epochs: float = EpochsOpt,
    steps: int = StepsOpt,
    seed: int = typer.Option(0, help="seed"),
    out: Path = typer.Option(Path("lorank-probe"), help="output directory"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16, auto"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, auto"),
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """One training run's rank–loss curve, and a rank from it alone."""
    _recommend(model, data, targets=targets, fmt=fmt, val_data=val_data, max_length=max_length,
               batch_size=batch_size, epochs=epochs, steps=steps, seed=seed, out=out,
               dtype=dtype, device=device,
               trust_remote_code=trust_remote_code, estimators=("capacity", "probe"),
               budget=budget or "auto", probe_method=method, probe_max_rank=max_rank, lr=_lrs(lr),
               offline=offline, progress=not quiet, command="probe")


@app.command()
def targets(
    model: str = ModelOpt,
    targets: str = typer.Option("all-linear", help="as in `recommend`"),
    num_labels: int = typer.Option(None, min=2, help="load as a classifier with this many "
                                   "labels [2 for a classifier model]"),
    batch_size: int = typer.Option(8, min=1, help="batch size for the memory model"),
    seq_len: int = typer.Option(512, min=1, help="sequence length for the memory model"),
    offline: bool = OfflineOpt,
) -> None:
    """List target modules, shapes, and params / memory per rank."""
    from rich.table import Table

    from lorank.decide import candidate_ranks
    from lorank.models import load_model, model_task
    from lorank.report import human_bytes, human_count
    from lorank.targets import adapter_bytes, memory_estimate, resolve_targets

    assumed_labels = num_labels is None and model_task(model, offline=offline) == "classification"
    if assumed_labels:  # the head's size only moves the counts by its own few parameters
        num_labels = 2
    loaded = load_model(model, task="classification" if num_labels else None,
                        num_labels=num_labels, offline=offline)
    ts = resolve_targets(loaded.model, targets)
    shapes = Table(title=f"{len(ts.layers)} target modules", header_style="bold")
    for col in ("module", "d_in", "d_out", "group"):
        shapes.add_column(col)
    for t in ts.layers:
        shapes.add_row(t.name, str(t.d_in), str(t.d_out), t.group)
    console.print(shapes)
    cost = Table(title="cost per rank", header_style="bold")
    for col in ("rank", "trainable", "adapter", "train memory"):
        cost.add_column(col, justify="right")
    for r in candidate_ranks(ts):
        mem = memory_estimate(ts, r, batch_size=batch_size, seq_len=seq_len)
        cost.add_row(str(r), human_count(ts.params(r)), human_bytes(adapter_bytes(ts, r)),
                     human_bytes(mem.total))
    console.print(cost)
    say(f"PEFT target_modules: {ts.peft_target_modules}")
    if assumed_labels:
        say("a classifier: counted with a 2-label head (--num-labels N for yours)")


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
    targets: str = typer.Option("all-linear", help="as in `recommend`"),
    fmt: str = typer.Option(None, "--format", help="as in `recommend`"),
    val_data: str = typer.Option(None, help="validation data (default: seeded split)"),
    max_length: int = typer.Option(None, min=1, help="truncate examples to this many tokens [512]"),
    lora_alpha: float = typer.Option(None, help="fixed alpha for every rank (rsLoRA) [8]"),
    storage: str = typer.Option(None, help="study storage URL (default: sqlite in --out); "
                                "postgresql://... lets many workers share the sweep"),
    heartbeat: int = typer.Option(30, min=1, help="seconds between the heartbeats of a worker "
                                  "holding a trial (database server storage)"),
    grace: int = typer.Option(180, min=2, help="seconds without a heartbeat after which a "
                              "trial's worker counts as dead and its point runs again"),
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
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16, auto"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, auto"),
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Train one LoRA per (rank, lr, seed): the measured truth.

    Resumable; writes sweep.json and rank_loss.png.
    """
    from lorank.api import sweep as api_sweep
    from lorank.util import parse_list

    given = {"ranks": ranks, "lrs": lrs, "seeds": seeds, "steps": steps,
             "batch_size": batch_size, "max_length": max_length, "lora_alpha": lora_alpha,
             "skip_margin": skip_margin}
    defaults = {"ranks": "1,2,4,8,16,32,64", "lrs": "5e-4,2e-3", "seeds": "0,1", "steps": 100,
                "batch_size": 8, "max_length": 512, "lora_alpha": None, "skip_margin": None}
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
                       eval_every=eval_every, targets=targets, fmt=fmt, val_data=val_data,
                       max_length=int(opts["max_length"]), lora_alpha=opts["lora_alpha"],
                       storage=storage, prune=prune, skip_margin=opts["skip_margin"],
                       settle=settle, max_trials=max_trials, gradient_checkpointing=gradient_checkpointing,
                       out=out, seed=seed,
                       dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                       progress=not quiet, command=shlex.join(["lorank", *sys.argv[1:]]),
                       heartbeat=heartbeat, grace=grace, offline=offline)
    from rich.table import Table

    for note in result.data_notes:
        say(note)

    table = Table(title="rank–loss curve (best lr per rank)", header_style="bold")
    for col in ("rank", "val loss", "± se", "seed sd", "lr", "seeds"):
        table.add_column(col, justify="right")
    for r, row in sorted(result.curve.items()):
        seed_sd = f"{row['seed_sd']:.4f}" if row["seeds"] > 1 else "–"  # one seed: no spread
        table.add_row(str(r), f"{row['loss']:.4f}", f"{row['se']:.4f}", seed_sd,
                      f"{row['lr']:g}", str(row["seeds"]))
    console.print(table)
    say(f"{len(result.trials)} finished trials; wrote {out}/sweep.json, {out}/rank_loss.png")


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
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Score every method against the sweeps (regret, waste, cost)."""
    from lorank.bench.score import (
        markdown_tables,
        overall,
        run_bench,
        run_task_estimators,
        update_markdown,
    )

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
            run_task_estimators(task_dir, names, progress=not quiet)
        if layerwise:
            run_task_baselines(task_dir, layerwise, progress=not quiet)
    scored = run_bench(results)
    update_markdown(markdown, markdown_tables(scored, results))
    from rich.table import Table

    table = Table(title="overall", header_style="bold")
    for col in ("method", "tasks", "mean regret", "worst regret", "within tol", "waste", "cost"):
        table.add_column(col, justify="right")
    for o in overall(scored):
        table.add_row(o["method"], str(o["tasks"]), f"{o['mean_regret']:.2%}",
                      f"{o['worst_regret']:.2%}", f"{o['within_tol']}/{o['tasks']}",
                      f"{o['mean_waste']:.2f}", f"{o['mean_cost']:.3f}")
    console.print(table)
    say(f"updated {markdown}")


@app.command()
def demo(
    out: Path = typer.Option(Path("lorank-demo"), help="output directory"),
    n: int = typer.Option(300, help="examples to build from the standard library"),
    budget: str = typer.Option(None, help="also run the probe: steps (40) or minutes (10m)"),
    seed: int = typer.Option(0, help="seed"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Run `recommend` on SmolLM2 with a dataset from the stdlib.

    The dataset: short standard-library functions and their docstrings' first lines.
    """
    from lorank.demo import run_demo
    from lorank.report import print_recommendation

    rec, data_path = run_demo(out, n=n, seed=seed, budget=budget, progress=not quiet)
    say(f"demo data: {data_path}")
    print_recommendation(rec, console, out=out, command="demo")


@app.command()
def inspect(
    adapter: Path = typer.Argument(..., help="a PEFT LoRA adapter directory (safetensors)"),
    tol: float = typer.Option(0.1, min=0.0, max=1.0, help="relative error a truncation may "
                              "make; the per-layer rank that keeps within it is shown"),
    data: str = AdapterDataOpt,
    model: str = AdapterModelOpt,
    fmt: str = FormatOpt,
    val_data: str = ValDataOpt,
    max_length: int = MaxLengthOpt,
    batch_size: int = EvalBatchOpt,
    seed: int = SplitSeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    quiet: bool = QuietOpt,
) -> None:
    """How much of its rank a trained adapter uses, per layer.

    Without --data no model is loaded; with it, the validation loss truncated to each
    candidate rank.
    """
    from rich.table import Table

    from lorank.api import inspect as api_inspect

    report = api_inspect(adapter, tol=tol, data=data, model=model, fmt=fmt, val_data=val_data,
                         max_length=max_length, batch_size=batch_size, seed=seed, dtype=dtype,
                         device=device, trust_remote_code=trust_remote_code, offline=offline,
                         progress=not quiet)
    table = Table(title=f"{adapter}: rank use per layer", header_style="bold")
    for col in ("layer", "rank", "effective", f"rank for {tol:g}", "top-1 energy"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for lay in report.layers:
        table.add_row(Text(lay.name), str(lay.rank), f"{lay.effective_rank:.1f}",
                      str(lay.rank_for(tol)), f"{lay.energy[min(lay.energy)]:.0%}")
    console.print(table)
    say(report.verdict)
    curve = report.losses
    if curve is None:
        return
    for note in report.notes:
        say(note)
    table = Table(title=f"validation loss per truncated rank ({report.model}, "
                  f"{curve.n_examples} examples)", header_style="bold")
    for col in ("rank", "val loss", "vs best", "± paired se", "within tol"):
        table.add_column(col, justify="right")
    best = curve.loss[curve.best_rank]
    for r in curve.ranks:
        table.add_row(str(r), f"{curve.loss[r]:.4f}", f"{curve.loss[r] - best:+.4f}",
                      f"{curve.se[r]:.4f}", "yes" if curve.within(r) else "no")
    console.print(table)
    say(report.loss_verdict or "")


@app.command()
def shrink(
    adapter: Path = typer.Argument(..., help="a PEFT LoRA adapter directory (safetensors)"),
    out: Path = typer.Option(..., help="directory for the smaller adapter"),
    rank: int = typer.Option(None, min=1, help="one rank for every layer"),
    tol: float = typer.Option(None, help="per-layer ranks: each keeps its update within this "
                              "relative (Frobenius) error; written as rank_pattern"),
    data: str = AdapterDataOpt,
    model: str = AdapterModelOpt,
    fmt: str = FormatOpt,
    val_data: str = ValDataOpt,
    max_length: int = MaxLengthOpt,
    batch_size: int = EvalBatchOpt,
    seed: int = SplitSeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    offline: bool = OfflineOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Shrink a trained adapter by an exact SVD re-factorization.

    The smaller adapter loads in PEFT; with --data, the validation loss change it makes.
    """
    from lorank.api import shrink as api_shrink

    summary = api_shrink(adapter, out, rank=rank, tol=tol, data=data, model=model, fmt=fmt,
                         val_data=val_data, max_length=max_length, batch_size=batch_size,
                         seed=seed, dtype=dtype, device=device,
                         trust_remote_code=trust_remote_code, offline=offline,
                         progress=not quiet)
    say(f"wrote {out}: rank {summary['rank']}"
        + (f" with {len(summary['rank_pattern'])} per-layer ranks" if summary["rank_pattern"]
           else "")
        + f", {summary['params_after']:,} parameters (was {summary['params_before']:,}), "
          f"largest relative error {summary['max_relative_error']:.2e}")
    loss = summary.get("loss")
    if loss is None:
        return
    for note in summary["notes"]:
        say(note)
    verdict = "within" if loss["within_tolerance"] else "outside"
    say(f"validation loss ({summary['model']}, {loss['n_examples']} examples): "
        f"{loss['loss_before']:.4f} -> {loss['loss_after']:.4f}, change "
        f"{loss['change']:+.4f} ± {loss['se']:.4f}, {verdict} tolerance {loss['tol']:.4f}")


INTERRUPTED = "interrupted: finished work is kept; run the same command again to continue"


class _Signals:
    """The stop signal received, if any (SIGTERM is turned into a KeyboardInterrupt)."""

    received: int | None = None


def _stop_like_ctrl_c(signum: int, frame) -> None:
    """SIGTERM handler: stop the way Ctrl-C does, so the finally blocks and context managers
    that keep finished work run (Python's default for SIGTERM ends the process at once)."""
    _Signals.received = signum
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupted(signum: int) -> NoReturn:
    """One line on stderr, then the shell's exit code for the signal (130, SIGTERM 143)."""
    name = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    err_console.print(INTERRUPTED.replace("interrupted", f"interrupted{name}", 1),
                      soft_wrap=True, markup=False, highlight=False)
    sys.exit(128 + signum)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C or SIGTERM
    keep finished work and exit with 130 or 143 after one line."""
    _Signals.received = None
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c) if on_main_thread else None
    try:
        _main()
    finally:
        if on_main_thread:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main() -> None:
    try:
        code = app(standalone_mode=False)
        # typer turns Ctrl-C (and typer.Exit) into a returned exit code when not standalone
        if code == 130:
            _interrupted(_Signals.received or signal.SIGINT)
        if isinstance(code, int) and code:
            sys.exit(code)
    except LorankError as err:
        err_console.print(Text("error: ", style="red") + Text(str(err)), soft_wrap=True)
        sys.exit(2)
    except FileNotFoundError as err:
        err_console.print(Text("error: ", style="red") + Text(f"file not found: {err.filename}"),
                          soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted(_Signals.received or signal.SIGINT)
    except Exception as err:  # click usage errors (typer vendors click) show themselves
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            sys.exit(2)
        if type(err).__name__ == "Abort":
            sys.exit(1)
        raise


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
