"""Plots of measured curves: validation loss against rank, and against step; the capacity
estimate's bits per rank; per-layer ranks as a heatmap.

Drawn by the stages that measure them (the sweep, the probe, the benchmark) and by the HTML
report, so they sit below all of those; matplotlib loads only when a plot is drawn. The
`*_figure` functions return an open figure (the caller saves it, or `figure_png` turns it into
PNG bytes and closes it).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from lorank.util import save_figure


def _pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (tight bounding box); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _rank_axis(ax: Any, ranks: set[int]) -> None:
    """A log2 rank axis labelled with the ranks themselves (8, not 2^3)."""
    ax.set_xscale("log", base=2)
    ticks = sorted(ranks)
    ax.set_xticks(ticks, [str(r) for r in ticks])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank")


def rank_curve_figure(curves: dict[str, dict[int, dict[str, float]]], *,
                      picks: dict[str, int] | None = None,
                      title: str = "rank–loss curve") -> Any:
    """Validation loss against rank (log2 axis), error bars ±2 se; one dashed line per picked
    rank, naming every method that picked it."""
    plt = _pyplot()
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
    _rank_axis(ax, {r for curve in curves.values() for r in curve} | set(by_rank))
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    if by_rank:  # the legend beside the axes, so it never covers the curve
        fig.set_size_inches(10, 4)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7)
    return fig


def plot_rank_curve(curves: dict[str, dict[int, dict[str, float]]], path: Path, *,
                    picks: dict[str, int] | None = None, title: str = "rank–loss curve") -> None:
    """`rank_curve_figure` saved as a PNG file."""
    fig = rank_curve_figure(curves, picks=picks, title=title)
    save_figure(fig, path)
    _pyplot().close(fig)


def capacity_figure(stored: dict[int, float], total_bits: float, *, spread_log2: float = 0.0,
                    pick: int | None = None, title: str = "capacity") -> Any:
    """Bits an adapter of each rank stores (`stored`, log axes) against the bits the data holds
    to learn (horizontal line); a band of ×2^±`spread_log2` around the stored bits (the
    estimate's range), and the picked rank as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ranks = sorted(stored)
    bits = [max(stored[r], 1e-9) for r in ranks]
    ax.plot(ranks, bits, marker="o", color="C0", label="bits an adapter of this rank stores")
    if spread_log2 > 0:
        ax.fill_between(ranks, [b * 2 ** -spread_log2 for b in bits],
                        [b * 2 ** spread_log2 for b in bits], color="C0", alpha=0.15, lw=0,
                        label=f"range (×/÷ {2 ** spread_log2:.2g})")
    ax.axhline(max(total_bits, 1e-9), color="C3", lw=1.5, label="bits to learn in the data")
    if pick is not None:
        ax.axvline(pick, color="C2", ls="--", label=f"recommended r={pick}")
    _rank_axis(ax, set(ranks) | ({pick} if pick is not None else set()))
    ax.set_yscale("log")
    ax.set_ylabel("bits")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def heatmap_figure(grid: list[list[float | None]], rows: list[str], cols: list[str], *,
                   title: str = "rank per layer") -> Any:
    """Ranks as a heatmap (`grid[i][j]` for row i, column j; None: no layer there), colour on
    a log2 scale, each cell labelled with its rank where the grid is small enough to read."""
    import numpy as np

    plt = _pyplot()
    values = np.array([[math.nan if v is None else float(v) for v in row] for row in grid])
    height = min(12.0, 1.2 + 0.28 * len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(cols) + 2), height))
    shown = np.log2(np.where(np.isnan(values), np.nan, np.maximum(values, 1)))
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    step = max(1, len(rows) // 40)
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
    if values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if not math.isnan(v):
                ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] < np.nanmax(shown) * 0.6 else "black")
    bar = fig.colorbar(image, ax=ax)
    finite = shown[~np.isnan(shown)]
    ticks = list(range(int(finite.min()), int(np.ceil(finite.max())) + 1)) if finite.size else []
    bar.set_ticks(ticks, labels=[str(2 ** t) for t in ticks])
    bar.set_label("rank")
    ax.set_title(title, fontsize=10)
    return fig


def plot_learning_curves(trials: list[dict], curve: dict[int, dict], path: Path) -> None:
    """Validation loss against step for each rank's runs at its best lr (one line per seed),
    to see whether runs converged and whether a rank's best lr was still improving."""
    plt = _pyplot()
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
