"""What the CLI prints after a command's API call: tables and one-line summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from lorank.cli_options import console, say


def print_recommended(rec, out: Path, command: str) -> None:
    """`recommend`, `analyze`, `probe`: reused measurements, then the recommendation."""
    from lorank.report import print_recommendation

    for line in rec.inputs.get("reused", []):  # finished measurements of an earlier run
        say(line)
    print_recommendation(rec, console, out=out, command=command)


def print_targets(ts, batch_size: int, seq_len: int, assumed_labels: bool) -> None:
    """`targets`: the target modules' shapes, then the cost of each candidate rank."""
    from lorank.decide import candidate_ranks
    from lorank.report import human_bytes, human_count
    from lorank.targets import adapter_bytes, memory_estimate

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


def print_sweep(result, out: Path) -> None:
    """`sweep`: the data notes, the rank–loss curve (best lr per rank), the files written."""
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


def print_overall(rows: list[dict[str, Any]], markdown: Path) -> None:
    """`bench`: each method's scores over the tasks."""
    table = Table(title="overall", header_style="bold")
    for col in ("method", "tasks", "mean regret", "worst regret", "within tol", "waste", "cost"):
        table.add_column(col, justify="right")
    for o in rows:
        table.add_row(o["method"], str(o["tasks"]), f"{o['mean_regret']:.2%}",
                      f"{o['worst_regret']:.2%}", f"{o['within_tol']}/{o['tasks']}",
                      f"{o['mean_waste']:.2f}", f"{o['mean_cost']:.3f}")
    console.print(table)
    say(f"updated {markdown}")


def print_inspection(report, adapter: Path, tol: float) -> None:
    """`inspect`: rank use per layer and the verdict; with data, the loss per truncated rank."""
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


def print_shrunk(summary: dict[str, Any], out: Path) -> None:
    """`shrink`: what was written and, with data, the validation loss change it makes."""
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
