"""Report: the terminal summary of a recommendation, and the gradient spectrum's per-layer table
and plots. The last stage: it reads what the others produced and nothing below imports it."""

from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lorank.util import atomic_write_text, save_figure

if TYPE_CHECKING:
    from lorank.decide import Recommendation


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


def profile_lines(prof: dict) -> list[str]:
    """The data profile in three short lines: what there is to learn, before any estimate."""
    lengths = prof.get("length_percentiles") or {}
    lines = [f"data: {prof['examples']:,} train / {prof['val_examples']:,} val examples "
             f"({prof['format']}), {prof['supervised_tokens']:,} supervised tokens"]
    shape = [f"{100 * prof['duplicate_rate']:.1f}% exact duplicates"]
    if lengths:
        shape.insert(0, "length p50/p90/max " + "/".join(
            f"{lengths[k]:.0f}" for k in ("p50", "p90", "max") if k in lengths) + " tokens")
    lines.append("; ".join(shape))
    if prof.get("base_loss_nats") is not None:
        lines.append(f"base model pays {prof['base_loss_nats']:.3f} nats "
                     f"({prof['base_loss_bits']:.3f} bits) per supervised token")
    return lines


def _say(console: Console, text: str, first: str = "", rest: str = "", style: str = "") -> None:
    """A paragraph wrapped to the console's width with a hanging indent (`first` before its
    first line, `rest` before the others); never read as markup."""
    width = max(20, console.width)
    wrapped = textwrap.fill(str(text), width=width, initial_indent=first, subsequent_indent=rest,
                            break_long_words=True, break_on_hyphens=False)
    console.print(Text(wrapped, style=style), soft_wrap=True)


def print_recommendation(rec: Recommendation, console: Console | None = None, *,
                         out: Path | None = None, command: str = "recommend") -> None:
    """The terminal summary, every line within the console's width (80 columns with
    COLUMNS=80): the data, the cost and each estimator's word per candidate rank, the measured
    curves, the decision and its reasons, what was measured and how sure it is, every file
    written to `out` (when given) and the next step."""
    from lorank.export import written_files
    from lorank.summary import confidence_words, measured_lines, next_step

    console = console or Console()
    if rec.inputs.get("profile"):
        lines = profile_lines(rec.inputs["profile"])
        _say(console, lines[0], rest="  ")
        for line in lines[1:]:
            _say(console, line, first="  ", rest="  ")
        for note in rec.inputs["profile"].get("notes") or []:  # which split went where
            _say(console, note, first="  ", rest="    ")
    console.print(candidates_table(rec))
    for table in curve_tables(rec):
        console.print(table)
    memory = rec.memory.get("total")
    decision = (f"recommended rank {rec.rank}, lora_alpha {rec.lora_alpha:g} "
                f"(use_rslora={rec.use_rslora}), targets {', '.join(rec.target_modules)}; "
                f"{human_count(rec.trainable_params)} trainable params"
                + (f", ~{human_bytes(memory)} to train" if memory else "")
                + f"; confidence {rec.confidence}")
    _say(console, decision, rest="  ", style="bold green")
    for reason in rec.rationale:
        _say(console, reason, first="  • ", rest="    ")
    for warning in rec.warnings:
        _say(console, f"warning: {warning}", first="  ", rest="    ", style="yellow")
    if rec.evidence:
        console.print("measured:", style="bold")
        for line in measured_lines(rec):
            _say(console, line, first="  • ", rest="    ")
    console.print("how sure:", style="bold")
    _say(console, confidence_words(rec), first="  ", rest="  ")
    if out is not None:
        _say(console, f"files in {out}/:", style="bold")
        files = written_files(rec)
        pad = min(28, max(len(name) for name, _ in files))
        for name, what in files:
            _say(console, f"{name:<{pad}}  {what}", first="  ", rest=" " * (pad + 4))
    console.print("next:", style="bold")
    for step in next_step(rec, out, command):
        _say(console, step, first="  • ", rest="    ")


def escape(text: str) -> str:
    """Escape dataset text before it goes into HTML."""
    return html.escape(str(text), quote=True)


def write_gradient_report(spectrum, out: Path) -> dict[str, str]:
    """Per-layer table (markdown) and one plot per layer group: left, the spectra of halves A
    and B (directions the data asks for stand out in both; noise differs between them); right,
    the cross-fitted t of both directions (A's directions on B, B's on A) against the noise
    band, whose top edge is the max-statistic threshold a direction must clear to count.
    Returns the files written (names in `out`) and what each holds."""
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
    files = {"gradient_layers.md": "the gradient spectrum's per-layer table"}
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
        files[f"gradient_{group}.png"] = f"spectra and cross-fitted t of the {group} layers"
    return files
