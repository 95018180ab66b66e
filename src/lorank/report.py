"""Report: progress bars, terminal tables and plots of the evidence."""

from __future__ import annotations

import contextlib
import html
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from lorank.decide import Recommendation


class _NoProgress:
    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass


def new_progress(console: Console | None = None) -> Progress:
    """lorank's one progress-bar layout: description, bar, n/total, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console or Console(stderr=True), transient=False,
    )


@contextlib.contextmanager
def progress_bar(enabled: bool = True, console: Console | None = None) -> Iterator[Progress]:
    """A rich progress bar with ETA, or a silent stand-in when disabled."""
    if not enabled:
        yield _NoProgress()  # type: ignore[misc]
        return
    with new_progress(console) as bar:
        yield bar


@contextlib.contextmanager
def ticker(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A progress bar over `total` units; yields the function that advances it by one."""
    with progress_bar(enabled) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def candidates_table(rec: Recommendation) -> Table:
    """Per candidate rank: params, memory, and what each estimator says."""
    names = [e["name"] for e in rec.evidence]
    table = Table(title="candidate ranks", header_style="bold")
    for col in ("rank", "trainable", "adapter", "train memory", *names):
        table.add_column(col, justify="right" if col != "rank" or True else "left")
    for row in rec.candidates:
        mark = " ←" if row["rank"] == rec.rank else ""
        table.add_row(
            f"{row['rank']}{mark}", human_count(row["params"]), human_bytes(row["adapter_bytes"]),
            human_bytes(row["memory_total"]), *[row["says"].get(n, "") for n in names],
        )
    return table


def curve_tables(rec: Recommendation) -> list[Table]:
    """Each measured rank-loss curve (probe, sweep) as a terminal chart: every rank it read,
    candidate or not, its loss ± se and a bar from the best loss (0) to the worst (full)."""
    tables = []
    for e in rec.evidence:
        curve = {int(r): c for r, c in (e.get("curve") or {}).items()
                 if c and np.isfinite(c.get("loss", np.nan))}
        if len(curve) < 2:
            continue
        lo, hi = min(c["loss"] for c in curve.values()), max(c["loss"] for c in curve.values())
        table = Table(title=f"{e['name']}: validation loss by rank", header_style="bold")
        for col in ("rank", "loss", "± se", ""):
            table.add_column(col, justify="left" if col == "" else "right")
        for r in sorted(curve):
            c = curve[r]
            width = 0 if hi == lo else round(30 * (c["loss"] - lo) / (hi - lo))
            mark = " ←" if r == rec.rank else ""
            table.add_row(f"{r}{mark}", f"{c['loss']:.4f}", f"{c.get('se', 0.0):.4f}",
                          "▇" * width + ("▏" if width == 0 else ""))
        tables.append(table)
    return tables


def profile_line(prof: dict) -> str:
    """The data profile in one line: what there is to learn, before any estimate."""
    lengths = prof.get("length_percentiles") or {}
    parts = [f"data: {prof['examples']:,} train / {prof['val_examples']:,} val examples "
             f"({prof['format']})", f"{prof['supervised_tokens']:,} supervised tokens"]
    if lengths:
        parts.append("length p50/p90/max " + "/".join(
            f"{lengths[k]:.0f}" for k in ("p50", "p90", "max") if k in lengths))
    parts.append(f"{100 * prof['duplicate_rate']:.1f}% exact duplicates")
    if prof.get("base_loss_nats") is not None:
        parts.append(f"base model pays {prof['base_loss_nats']:.3f} nats "
                     f"({prof['base_loss_bits']:.3f} bits) per supervised token")
    return "; ".join(parts)


def print_recommendation(rec: Recommendation, console: Console | None = None) -> None:
    console = console or Console()
    if rec.inputs.get("profile"):
        console.print(profile_line(rec.inputs["profile"]), markup=False, highlight=False,
                      soft_wrap=True)
    console.print(candidates_table(rec))
    for table in curve_tables(rec):
        console.print(table)
    console.print(
        f"[bold green]recommended rank {rec.rank}[/], lora_alpha {rec.lora_alpha:g} "
        f"(use_rslora={rec.use_rslora}), targets {escape_markup(', '.join(rec.target_modules))}; "
        f"{human_count(rec.trainable_params)} trainable params, "
        f"~{human_bytes(rec.memory['total'])} to train; confidence [bold]{rec.confidence}[/]"
    )
    for reason in rec.rationale:
        console.print(f"  • {reason}", markup=False, highlight=False)
    for warning in rec.warnings:
        console.print(Text("  warning: ", style="yellow") + Text(str(warning)))


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically as PNG."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)


def _default_mode() -> int:
    """The mode a plain open() would give (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def plot_rank_curve(curves: dict[str, dict[int, dict[str, float]]], path: Path, *,
                    picks: dict[str, int] | None = None, title: str = "rank–loss curve") -> None:
    """Validation loss against rank (log2 axis) with error bars; each method's pick marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ranks = sorted(curve)
        loss = [curve[r]["loss"] for r in ranks]
        se = [curve[r].get("se", 0.0) for r in ranks]
        ax.errorbar(ranks, loss, yerr=[2 * s for s in se], marker="o", capsize=3, label=label)
    by_rank: dict[int, list[str]] = {}  # one line per picked rank, naming every method on it
    for name, rank in (picks or {}).items():
        by_rank.setdefault(rank, []).append(name)
    for i, (rank, names) in enumerate(sorted(by_rank.items())):
        ax.axvline(rank, linestyle="--", alpha=0.6, color=f"C{(i + len(curves)) % 10}",
                   label=f"r={rank}: " + ", ".join(names))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    if by_rank:  # the legend beside the axes, so it never covers the curve
        fig.set_size_inches(10, 4)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def plot_learning_curves(trials: list[dict], curve: dict[int, dict], path: Path) -> None:
    """Validation loss against step for each rank's runs at its best lr (one line per seed),
    to see whether runs converged and whether a rank's best lr was still improving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, rank in enumerate(sorted(curve)):
        runs = [t for t in trials if t["rank"] == rank and t["lr"] == curve[rank]["lr"]
                and t["status"] == "ok" and t.get("curve")]
        for j, run in enumerate(sorted(runs, key=lambda t: t["seed"])):
            steps, _, val = zip(*run["curve"], strict=True)
            ax.plot(steps, val, color=f"C{i % 10}", alpha=0.8, linestyle="-" if j == 0 else ":",
                    label=f"r={rank} (lr {curve[rank]['lr']:g})" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("learning curves at each rank's best lr (dotted: later seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(fig, path)
    plt.close(fig)


def escape(text: str) -> str:
    """Escape dataset text before it goes into HTML."""
    return html.escape(str(text), quote=True)


def write_gradient_report(spectrum, out: Path) -> None:
    """Per-layer table (markdown) and one plot per layer group: left, the spectra of halves A
    and B (directions the data asks for stand out in both; noise differs between them); right,
    the cross-fitted t of both directions (A's directions on B, B's on A) against the noise
    band, whose top edge is the max-statistic threshold a direction must clear to count."""
    rows = spectrum.layer_table()
    cols = ["layer", "shape", "method", "replication_by_fraction", "replication",
            "gavish_donoho", "energy90", "energy95", "replicated_energy90", "stable",
            "extrapolated", "interval", "exponent", "top_t", "inputs90", "inputs95",
            "sketch_angle"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join("–" if r[c] is None else str(r[c]) for c in cols) + " |"
              for r in rows]
    lines += ["", "inputs90 / inputs95: input directions holding 90% / 95% of the layer's input "
              "energy (real tokens). sketch_angle: largest principal angle (degrees) between a "
              "sketched layer's top signal subspaces and an independent replica sketch's (with "
              "--sketch-check); – for exact layers or without it."]
    atomic_write_text(Path(out) / "gradient_layers.md", "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from lorank.targets import layer_kinds

    kinds = layer_kinds([layer.name for layer in spectrum.layers])
    groups: dict[str, list] = {}
    for layer in spectrum.layers:
        groups.setdefault(kinds[layer.name], []).append(layer)
    for group, layers in groups.items():
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        cmap = plt.get_cmap("viridis")
        band = max(max(layer.threshold_ab, layer.threshold_ba) for layer in layers)
        right.axhspan(-band, band, color="grey", alpha=0.15, lw=0)
        for i, layer in enumerate(layers):
            color = cmap(i / max(len(layers) - 1, 1))
            for values, ls in ((layer.singular_values_a, "-"), (layer.singular_values_b, "--")):
                sv = np.asarray(values, float)
                left.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv, 1e-12), color=color,
                              ls=ls, lw=1)
            for t, thr, ls in ((layer.t_ab, layer.threshold_ab, "-"),
                               (layer.t_ba, layer.threshold_ba, "--")):
                right.plot(np.arange(1, len(t) + 1), np.asarray(t, float), color=color, ls=ls,
                           lw=1, alpha=0.8)
                right.axhline(thr, color=color, ls=":", lw=0.8)
        fig.suptitle(f"{group}: {len(layers)} layers, colour shallow→deep", fontsize=10)
        left.set(title="singular values of each half", xlabel="direction", ylabel="σ")
        left.legend(handles=[Line2D([], [], color="k", ls="-", label="half A"),
                             Line2D([], [], color="k", ls="--", label="half B")], fontsize=7)
        right.axhline(0, color="grey", lw=0.5)
        right.set(title="cross-fitted t; dotted: threshold; grey: noise band",
                  xlabel="direction", ylabel="t")
        right.legend(handles=[Line2D([], [], color="k", ls="-", label="A's directions on B"),
                              Line2D([], [], color="k", ls="--", label="B's directions on A")],
                     fontsize=7)
        save_figure(fig, Path(out) / f"gradient_{group}.png")
        plt.close(fig)
